"""The ``dxtrain`` command line: train, summarize, sample, eval.

This module owns the options, their defaults (:class:`dxtrain.train.TrainConfig`'s)
and help texts, and turns errors into clean messages; the work is
:mod:`dxtrain.train`'s and :mod:`dxtrain.rundir`'s.

``dxtrain train`` with no arguments trains a class-conditional generator on the
embedded digits data with the projected (DriftXpress) field, on the GPU if
torch sees one, else on the CPU, and writes a run folder (``runs/digits``).
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from dataclasses import fields

import click
from click.core import ParameterSource

from dxfield.memory import parse_budget

from .errors import DEBUG_ENV, ErrorHandlingGroup, check_file, check_folder, os_error_message, writing_to
from .lock import RunFolderBusy
from .rundir import CheckpointError
from .train import FIELDS, NORMALIZATIONS, REPULSIONS, TrainConfig

_DEFAULTS = TrainConfig()
# errors whose message is written for the user; any other exception is the group's (dxtrain.errors)
_RUN_ERRORS = (ValueError, CheckpointError, RunFolderBusy)


class _Finite(click.FloatRange):
    """``click.FloatRange`` that also refuses nan and inf."""

    name = "finite float range"

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv


_SEED = click.IntRange(0, 2**63 - 1)


def _given(ctx: click.Context) -> set[str]:
    """The options set on the command line (or through the environment), not left at their defaults."""
    return {name for name in ctx.params
            if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)}


def _temps(ctx, param, value):
    if value is None:
        return None
    try:
        temps = tuple(float(t) for t in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers like 0.02,0.05,0.2, got {value!r}")
    if not temps or any(not (math.isfinite(t) and t > 0) for t in temps):
        raise click.BadParameter(f"temperatures must be finite numbers > 0, got {value!r}")
    return temps


def _budget(ctx, param, value):
    if value is not None:
        try:
            parse_budget(value, name=param.opts[0])
        except (TypeError, ValueError) as exc:
            raise click.BadParameter(str(exc))
    return value


def _device(ctx, param, value):
    import torch

    if value != "auto":
        try:
            torch.device(value)
        except (RuntimeError, ValueError):
            raise click.BadParameter(f"expected auto, cpu, cuda or cuda:N, got {value!r}")
    return value


def _data_options(f):
    f = click.option("--labels-key", default=None,
                     help="Key of the labels in a .npz/.h5 file (default: labels or y); for a CIFAR-100 folder "
                          "fine_labels (default) or coarse_labels.")(f)
    f = click.option("--data-key", default=None,
                     help="Key of the samples in a .npz/.h5 file (default: x, data or images).")(f)
    f = click.option("--data", default=_DEFAULTS.data, show_default=True,
                     help="Embedded data set (digits, moons, swissroll, checkerboard, gaussians8, or mixture: 64 "
                          "Gaussian modes in 32-D with a known density, scored against it by eval) or a "
                          ".npz/.npy/.h5 file of vectors (N x D) or images (N x H x W, N x C x H x W, "
                          "N x H x W x C), or a data folder: a CIFAR-10/100 Python folder (cifar-10-batches-py/, "
                          "cifar-100-python/) or ROOT/<class>/*.png|jpg (ROOT/train/ and ROOT/test/ for its own test "
                          "split).")(f)
    return f


def _encoder_options(f):
    """The encoder and where its features of the real data go (train and summarize)."""
    f = click.option("--feature-ram", default=None, callback=_budget,
                     help="Real features up to this size are read into RAM; larger ones stay in the feature file "
                          "and are read by chunks (summaries) and rows (a step's positives). What is left of it "
                          "holds the corrected projected field's sample maps of every training row, when they fit "
                          "[default: 4GiB].")(f)
    f = click.option("--features", default=None,
                     help="The real data's feature file (HDF5; with an encoder), computed once per data, encoder "
                          "and weights, resumed if interrupted, refused if made from others [default: "
                          "$DXTRAIN_CACHE/features/<fingerprint>.h5, DXTRAIN_CACHE=~/.cache/dxtrain].")(f)
    f = click.option("--max-locations", type=click.IntRange(min=1), default=_DEFAULTS.max_locations,
                     show_default=True, help="Per-location feature groups kept per encoder scale (evenly spaced); "
                     "each map also gives its global and patch (2x2, 4x4) means and stds, and the run log says "
                     "how many groups of which sizes.")(f)
    f = click.option("--precision", type=click.Choice(["float32", "bf16"]), default="float32", show_default=True,
                     help="bf16: the generator (in train) and the encoder run under bf16 autocast (GPU, and CPUs "
                          "that support it); the feature groups and the field stay float32 (bf16 distances underflow "
                          "at tau = 0.02).")(f)
    f = click.option("--encoder-size", type=click.IntRange(min=8), default=None,
                     help="Input size (pixels) a timm:/torchvision: encoder sees; images are resized to it "
                          "[default: the size its weights were trained at].")(f)
    f = click.option("--encoder-weights", default=None,
                     help="Weight file of a timm:/torchvision: encoder (safetensors or a torch state dict; nothing "
                          "is downloaded), or 'random' for its random initialisation.")(f)
    f = click.option("--encoder", default=_DEFAULTS.encoder, show_default=True,
                     help="Feature encoder: auto (builtin for images, none for vectors), none (pixels/vectors), "
                          "builtin (small frozen random conv, multi-scale groups), timm:<model> or "
                          "torchvision:<model> (pretrained, with --encoder-weights; every stage's maps, input "
                          "normalised with the encoder's mean and std), a TorchScript file, or "
                          "package.module:callable.")(f)
    return f


@click.group(cls=ErrorHandlingGroup, context_settings={"help_option_names": ["-h", "--help"],
                                                       "max_content_width": 100})
@click.version_option(package_name="driftxpress")
@click.option("--debug", is_flag=True, envvar=DEBUG_ENV,
              help=f"Show the traceback of an error instead of one Error: line (or set {DEBUG_ENV}=1).")
def main(debug):
    """Train one-step drifting generators; DriftXpress makes the field cheap.

    \b
    dxtrain train                       # digits, projected field, a few minutes on 2 CPU cores
    dxtrain train --field exact --time-budget 120 --out runs/exact
    dxtrain summarize --data my.npz --out cache/   # build the summaries once
    dxtrain sample --run runs/digits --n 64 --out samples.png
    dxtrain eval --run runs/digits
    """


@main.command()
@_data_options
@click.option("--field", type=click.Choice(FIELDS), default=_DEFAULTS.field, show_default=True,
              help="projected: DriftXpress (Nystrom summaries of the whole data set, exact repulsion); "
                   "exact: standard drifting (Algorithm 2 on a mini-batch of positives).")
@click.option("--steps", type=click.IntRange(min=1), default=_DEFAULTS.steps, show_default=True)
@click.option("--time-budget", type=_Finite(min=0, min_open=True), default=None,
              help="Stop after this many seconds of training (compare methods at equal wall-clock).")
@click.option("--out", default=None, help="Run folder [default: runs/<data name>].")
@click.option("--resume", is_flag=True,
              help="Continue the run in --out exactly where its checkpoint stopped, with its settings (options left "
                   "out come from the checkpoint; changing --steps, --time-budget, the intervals, --device, "
                   "--memory-budget, --cpu-threads, --eval or --progress is allowed, any other changed option is "
                   "an error). A damaged checkpoint.pt falls back to checkpoint.prev.pt.")
@click.option("--batch", type=click.IntRange(min=1), default=_DEFAULTS.batch, show_default=True,
              help="Generated samples per step (split evenly over classes when conditional).")
@click.option("--positives", type=click.IntRange(min=1), default=_DEFAULTS.positives, show_default=True,
              help="Real samples per step for --field exact (and for the correction, unless --correction-sample).")
@click.option("--temperatures", callback=_temps, default=None,
              help="Comma-separated kernel temperatures [default: 0.02,0.05,0.2].")
@click.option("--normalization", type=click.Choice(NORMALIZATIONS), default=_DEFAULTS.normalization,
              show_default=True,
              help="Of either field: bidirectional (Algorithm 2; for --field projected against the whole data set, "
                   "column sums taken at the landmarks) or row (mean shift b+ - b-).")
@click.option("--repulsion", type=click.Choice(REPULSIONS), default=_DEFAULTS.repulsion, show_default=True,
              help="Projected field's repulsion: exact over the batch, or nystrom (the batch summarised on the "
                   "attraction's landmarks: both sides through one kernel, so the field vanishes where the "
                   "generated and real distributions agree).")
@click.option("--correction/--no-correction", default=None,
              help="Projected field: correct the Nystrom sums with the residual of --positives fresh real samples "
                   "per step (an unbiased estimate of Algorithm 2 over the whole data set) [default: automatic "
                   "with the bidirectional field and exact repulsion: off until the uncorrected field's measured "
                   "bias reaches 25% of its RMS, checked after 25, 50, 100, ... steps, then on].")
@click.option("--correction-sample", type=click.IntRange(min=1), default=None,
              help="Real samples per step for the correction [default: --positives].")
@click.option("--pos-mass", default=_DEFAULTS.pos_mass, show_default=True,
              help="Projected field: the positives' weight in the bidirectional field's row sums, as a number of "
                   "real samples per step (split over the classes): all (every training sample counts fully: "
                   "Algorithm 2 against the whole data set), positives (--positives: the field standard drifting "
                   "estimates with its mini-batch, from the whole data set), a count, or balanced (measured every "
                   "step: the mass at which the median sample's row normaliser weighs the positives as much as "
                   "the generated batch, at most all; logged as pos_mass).")
@click.option("--landmarks", type=click.IntRange(min=1), default=_DEFAULTS.landmarks, show_default=True,
              help="Nystrom landmarks per class (projected field).")
@click.option("--landmark-method", type=click.Choice(["kmeans", "uniform", "kcenter", "rls"]),
              default=_DEFAULTS.landmark_method, show_default=True)
@click.option("--cache", default=None, help="Summaries folder from `dxtrain summarize` (projected field).")
@_encoder_options
@click.option("--conditional/--unconditional", default=True, show_default=True,
              help="Use class labels when the data has them.")
@click.option("--guidance/--no-guidance", default=False, show_default=True,
              help="Classifier-free guidance as drifting trains it (class-conditional data): each step draws a scale "
                   "alpha per class (half at 1, the rest from a power law on [1, --guidance-max]), the generator takes "
                   "it as an input, and unconditional real samples join that class's negatives with weight "
                   "(alpha - 1)(N_gen - 1) / N_unc. Pick the scale at inference: sample/eval --cfg-scale.")
@click.option("--guidance-max", type=_Finite(min=1, min_open=True), default=_DEFAULTS.guidance_max,
              show_default=True, help="The largest guidance scale drawn in training.")
@click.option("--guidance-negatives", type=click.IntRange(min=1), default=None,
              help="Unconditional real negatives per step, dealt to the classes in turn [default: --batch].")
@click.option("--generator", type=click.Choice(["auto", "mlp", "conv", "unet"]), default="auto", show_default=True,
              help="auto: conv for images, mlp for vectors. conv: a small upsampling generator (~0.4M parameters "
                   "at width 64 on 8x8 digits). unet: a one-step UNet for 32x32 and 64x64 images (36.7M parameters "
                   "at 32x32, 47.2M at 64x64 with 10 classes, at width 128 and depth 2). mlp: 3 hidden layers of 256.")
@click.option("--gen-width", type=click.IntRange(min=1), default=None,
              help="Generator width: MLP hidden units (256), conv channels at full resolution (64), UNet channels "
                   "at full resolution (128).")
@click.option("--gen-depth", type=click.IntRange(min=1), default=None,
              help="Generator depth: MLP hidden layers (3), UNet residual blocks per resolution (2); the conv "
                   "generator has none.")
@click.option("--lr", type=_Finite(min=0, min_open=True), default=_DEFAULTS.lr, show_default=True)
@click.option("--lr-warmup", type=click.IntRange(min=0), default=_DEFAULTS.lr_warmup, show_default=True,
              help="Steps of linear learning-rate warmup.")
@click.option("--lr-schedule", type=click.Choice(["constant", "cosine"]), default=_DEFAULTS.lr_schedule,
              show_default=True, help="After the warmup: constant, or a cosine decay reaching 0 at --steps (a "
                                      "--resume with a larger --steps stretches it to the new end).")
@click.option("--ema", type=_Finite(0, 1, max_open=True), default=_DEFAULTS.ema, show_default=True)
@click.option("--grad-clip", type=_Finite(min=0, min_open=True), default=_DEFAULTS.grad_clip,
              show_default=True)
@click.option("--seed", type=_SEED, default=_DEFAULTS.seed, show_default=True)
@click.option("--device", default="auto", show_default=True, callback=_device, help="auto, cpu, cuda or cuda:N.")
@click.option("--cpu-threads", type=click.IntRange(min=1), default=None,
              help="torch's intra-op threads for a run on the CPU [default: 1 for the MLP generator on "
                   "vectors, whose small operations lose more to waking a second thread than they gain; "
                   "torch's own, one per core, for images] (docs/design.md section 8.21).")
@click.option("--log-every", type=click.IntRange(min=1), default=_DEFAULTS.log_every, show_default=True)
@click.option("--sample-every", type=click.IntRange(min=1), default=_DEFAULTS.sample_every, show_default=True)
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=_DEFAULTS.checkpoint_every,
              show_default=True)
@click.option("--eval-every", type=click.IntRange(min=0), default=_DEFAULTS.eval_every, show_default=True,
              help="Evaluate the EMA generator every N steps (0: never) and keep checkpoint.best.pt, the checkpoint "
                   "of the best main score so far (FD_digits, else FD_encoder for images, else the energy "
                   "distance), recorded in best.json and metrics.jsonl.")
@click.option("--eval-samples", type=click.IntRange(min=10), default=None,
              help="Samples of each --eval-every evaluation [default: as many as the final evaluation].")
@click.option("--memory-budget", default=None, callback=_budget,
              help="dxfield memory budget per call, e.g. 256MiB.")
@click.option("--eval/--no-eval", "evaluate", default=True, show_default=True, help="Evaluate at the end.")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="A progress bar on stderr (drawn only on a terminal).")
@click.pass_context
def train(ctx, data, data_key, labels_key, out, resume, temperatures, **options):
    """Train a drifting generator and write checkpoints, metrics and sample PNGs to --out.

    One run at a time per --out: a second one is refused while the first lives.
    """
    from .train import train as run_training

    name = os.path.splitext(os.path.basename(data))[0] if os.path.sep in data or "." in data else data
    cfg = TrainConfig(data=data, data_key=data_key, labels_key=labels_key, out=out or os.path.join("runs", name),
                      temperatures=temperatures or _DEFAULTS.temperatures,
                      **options)
    try:
        cfg.validate()
        check_folder(cfg.out, "--out")
        if cfg.cache is not None:
            check_folder(cfg.cache, "--cache", read_only_ok=os.path.exists(os.path.join(cfg.cache, "manifest.json")))
        writing_to(cfg.out, "--out")
        result = run_training(cfg, resume=resume, given=_given(ctx) & {f.name for f in fields(TrainConfig)})
    except _RUN_ERRORS as exc:
        raise click.ClickException(str(exc))
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 speaks for the run
        click.echo(json.dumps({k: v for k, v in result.items() if k != "eval"}, default=float))
        click.echo(f"run folder: {cfg.out}")
    if result.get("interrupted"):
        sys.exit(130)  # the shell convention for SIGINT; the checkpoint is saved


@main.command()
@_data_options
@click.option("--out", required=True, help="Folder for the summaries (one HDF5 cache per feature group).")
@_encoder_options
@click.option("--temperatures", callback=_temps, default=None, help="Comma-separated [default: 0.02,0.05,0.2].")
@click.option("--landmarks", type=click.IntRange(min=1), default=_DEFAULTS.landmarks, show_default=True)
@click.option("--landmark-method", type=click.Choice(["kmeans", "uniform", "kcenter", "rls"]),
              default=_DEFAULTS.landmark_method, show_default=True)
@click.option("--conditional/--unconditional", default=True, show_default=True)
@click.option("--seed", type=_SEED, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, callback=_device)
@click.option("--test-fraction", type=_Finite(0, 1, min_open=True, max_open=True),
              default=_DEFAULTS.test_fraction, show_default=True,
              help="Held-out share (excluded from the summaries, as in `train`).")
def summarize(data, data_key, labels_key, out, features, feature_ram, encoder, encoder_weights, encoder_size,
              precision, max_locations, temperatures, landmarks, landmark_method, conditional, seed, device,
              test_fraction):
    """Build the projected field's summaries of a data set once, for `train --cache`."""
    from .train import build_summaries, make_feature_groups, pick_device, real_features, setup

    cfg = TrainConfig(data=data, data_key=data_key, labels_key=labels_key, encoder=encoder,
                      max_locations=max_locations, seed=seed, conditional=conditional, test_fraction=test_fraction,
                      temperatures=temperatures or _DEFAULTS.temperatures, landmarks=landmarks,
                      landmark_method=landmark_method, features=features, feature_ram=feature_ram,
                      encoder_weights=encoder_weights, encoder_size=encoder_size, precision=precision)
    try:
        cfg.validate()
        check_folder(out, "--out")  # before the work, not after it
        writing_to(out, "--out")
        dev = pick_device(device)
        train_ds, _, cond = setup(cfg)
        log = lambda m: click.echo(m, err=True)  # noqa: E731
        real = real_features(cfg, make_feature_groups(cfg, train_ds, dev), train_ds, dev, log)
        feats = real.arrays
        build_summaries(cfg, feats, train_ds.labels if cond else None, log,
                        progress=sys.stderr.isatty()).save(out)  # dxfield's bars, on a terminal
        real.close()
    except ValueError as exc:
        raise click.ClickException(str(exc))
    click.echo(f"summaries of {len(train_ds)} samples, {len(feats)} group(s) -> {out}")


def _load_run(run: str, data: str | None = None):
    """A run folder's config, checkpoint, EMA generator (eval mode, CPU), data split and class count;
    ``data``: the run's data file at a new place (``--data``)."""
    from .rundir import CHECKPOINT, read_checkpoint
    from .train import build_generator, setup

    if not os.path.isdir(run):
        raise click.ClickException(f"--run {run}: no such folder: name a run folder written by `dxtrain train`")
    if not os.path.exists(os.path.join(run, CHECKPOINT)):
        raise click.ClickException(f"no checkpoint in {run}: train first (dxtrain train --out {run})")
    try:
        ckpt = read_checkpoint(run, log=lambda msg: click.echo(msg, err=True))
    except CheckpointError as exc:
        raise click.ClickException(str(exc))
    cfg = TrainConfig.from_dict(ckpt["config"])
    trained_on = cfg.data
    cfg.data = data or cfg.data
    try:
        train_ds, test_ds, cond = setup(cfg)
    except (ValueError, FileNotFoundError) as exc:
        where = (f"--data {data}" if data else f"the data the run in {run} was trained on ({trained_on!r}, in "
                 f"{os.path.join(run, 'config.json')})")
        raise click.ClickException(f"{exc}: {where} cannot be loaded; put the file back, or pass its new path "
                                   f"with --data")
    saved = ckpt.get("data") or {}
    if saved and (list(train_ds.shape) != list(saved["shape"]) or train_ds.num_classes != saved["num_classes"]):
        raise click.ClickException(
            f"--data {cfg.data}: samples of shape {tuple(train_ds.shape)} with {train_ds.num_classes} classes, but "
            f"the run in {run} was trained on shape {tuple(saved['shape'])} with {saved['num_classes']} classes: "
            f"pass the run's own data file ({trained_on!r})")
    model = build_generator(cfg, train_ds.shape, train_ds.num_classes if cond else 0)
    model.load_state_dict(ckpt["ema"]["model"] if "model" in ckpt["ema"] else ckpt["generator"])
    model.eval()
    return cfg, ckpt, model, train_ds, test_ds, (train_ds.num_classes if cond else 0)


def _check_cfg_scale(cfg, run: str, scale) -> None:
    if scale is not None and not cfg.guidance:
        raise click.ClickException(f"--cfg-scale {scale:g}: the run in {run} was trained without --guidance, so its "
                                   "generator takes no guidance scale; leave the option out, or train with --guidance")


def _cfg_tag(scale) -> str:
    return "" if scale is None else f"-cfg{scale:g}"


def _per_class_grid(model, train_ds, num_classes: int, path: str, scale) -> None:
    """The EMA generator's samples as a PNG, one column per class (10 rows), at guidance scale ``scale``."""
    from .models import generate
    from .rundir import write_samples_png

    columns = num_classes or 10
    write_samples_png(path, generate(model, 10 * columns, num_classes, "cpu", seed=0, alpha=scale), train_ds,
                      nrow=columns)
    click.echo(f"samples by class -> {path}", err=True)


def _check_inception(weights: str | None) -> None:
    """Load ``--inception-weights`` once before the evaluation, so that a file of other weights fails in seconds,
    not after the other scores (where torch-fidelity cannot run, the report says why instead)."""
    from . import inception

    if weights is None or inception.unavailable(weights, "images", 3) is not None:
        return
    try:
        inception.inception_features(weights, "cpu")
    except ValueError as exc:  # named as the command line names it
        raise click.ClickException(str(exc).replace(f"inception_weights {weights!r}", f"--inception-weights {weights}"))


def _moved_data_option(f):
    return click.option("--data", default=None,
                        help="The run's data file, if it has moved since training [default: the path in the run's "
                             "config.json].")(f)


@main.command()
@click.option("--run", required=True, help="Run folder written by `dxtrain train`.")
@click.option("--n", type=click.IntRange(min=1), default=64, show_default=True, help="Samples to draw.")
@click.option("--out", required=True, help="FILE.npz (key x, plus labels) or FILE.png (grid or scatter).")
@click.option("--label", type=click.IntRange(min=0), default=None,
              help="Class to sample (conditional runs); default: cycle classes.")
@click.option("--seed", type=_SEED, default=0, show_default=True)
@click.option("--cfg-scale", type=_Finite(min=1), default=None,
              help="Guidance scale alpha of a run trained with --guidance (1: none) [default: 1].")
@_moved_data_option
def sample(run, n, out, label, seed, cfg_scale, data):
    """Draw samples from a run's EMA generator."""
    import numpy as np

    from dxfield.atomic import atomic_write

    from .models import generate
    from .rundir import write_samples_png

    ext = os.path.splitext(out)[1].lower()
    if ext not in (".npz", ".png"):
        raise click.ClickException(f"--out must end in .npz or .png, got {out!r}")
    check_file(out, "--out")
    writing_to(out, "--out")
    cfg, ckpt, model, train_ds, _, k = _load_run(run, data)
    if label is not None and not (0 <= label < max(k, 1)) or (label is not None and k == 0):
        raise click.ClickException(f"--label {label} is not a class of this run (it has {k} classes)")
    _check_cfg_scale(cfg, run, cfg_scale)
    x = generate(model, n, k, "cpu", seed=seed, label=label, alpha=cfg_scale)
    if ext == ".npz":
        labels = (np.full(n, label) if label is not None else np.arange(n) % k) if k else None
        atomic_write(out, lambda fh: np.savez(fh, x=x, **({"labels": labels} if labels is not None else {})))
    elif not write_samples_png(out, x, train_ds):
        raise click.ClickException("PNG output needs images or 2-D vectors; use an .npz file")
    click.echo(f"{n} samples -> {out}")


@main.command("eval")
@click.option("--run", required=True, help="Run folder written by `dxtrain train`.")
@click.option("--n", type=click.IntRange(min=10), default=None, help="Samples to evaluate [default: by data kind].")
@click.option("--inception-weights", default=None, help="Inception weights on disk for standard FID (images).")
@click.option("--seed", type=_SEED, default=0, show_default=True)
@click.option("--cfg-scale", "cfg_scales", type=_Finite(min=1), multiple=True,
              help="Guidance scale alpha of a run trained with --guidance [default: 1]; given several times "
                   "(--cfg-scale 1 --cfg-scale 1.5 ...) it sweeps them: one report per scale in eval.json's cfg_sweep.")
@_moved_data_option
def evaluate_cmd(run, n, inception_weights, seed, cfg_scales, data):
    """Evaluate a run's EMA generator against held-out data; prints and writes eval.json.

    Vectors: energy distance, MMD, sliced Wasserstein. Images add FD_encoder and k-NN precision/recall in the
    training encoder's pooled features, FID, KID and (RGB) IS through torch-fidelity with --inception-weights,
    and eval-samples.png (10 samples per class, a column each); the digits add FD_digits. Every score comes with
    its floor (real held-out data in the samples' place) and the sample count it used.

    The report is printed even when eval.json cannot be written (the command then fails, saying why)."""
    from .rundir import EVAL, write_eval
    from .train import evaluate_run, make_feature_groups

    if inception_weights is not None and not os.path.isfile(inception_weights):
        raise click.ClickException(f"--inception-weights {inception_weights}: no such file: give the path of the "
                                   "Inception weights (.pth) on disk, or leave the option out")
    _check_inception(inception_weights)
    cfg, ckpt, model, train_ds, test_ds, k = _load_run(run, data)
    if len(test_ds) < 2:
        raise click.ClickException(
            f"the run's data {cfg.data!r} leaves {len(test_ds)} of its {len(train_ds) + len(test_ds)} samples out "
            f"for testing ({cfg.test_fraction:.0%}); eval needs at least 2 held-out samples: train on more data")
    kwargs = {"inception_weights": inception_weights} if inception_weights else {}
    for a in cfg_scales:
        _check_cfg_scale(cfg, run, a)
    try:
        groups = make_feature_groups(cfg, train_ds, "cpu") if train_ds.kind == "images" else None
        reports = []
        with tempfile.TemporaryDirectory(prefix="dxtrain-eval-") as scratch:  # eval.json is written below, by us
            for a in cfg_scales or (None,):
                reports.append(evaluate_run(
                    model, train_ds, test_ds, k, "cpu", folder=scratch, step=int(ckpt["step"]),
                    wall=float(ckpt["elapsed"]), field=cfg.field, seed=seed, n=n, alpha=a,
                    encoder_features=None if groups is None else groups.encoder_features,
                    **kwargs))
                if train_ds.kind == "images":
                    _per_class_grid(model, train_ds, k, os.path.join(run, f"eval-samples{_cfg_tag(a)}.png"), a)
    except ValueError as exc:
        raise click.ClickException(str(exc))
    report = reports[0] if len(reports) == 1 else {"cfg_sweep": reports}
    click.echo(json.dumps(report, indent=1, default=float))
    path = os.path.join(run, EVAL)
    try:
        write_eval(run, report)
    except OSError as exc:
        reason = os_error_message(OSError(exc.errno, exc.strerror, path) if exc.errno is not None else exc)
        raise click.ClickException(f"{path} not written: {reason} (the report is printed above)")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
