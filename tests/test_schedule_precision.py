"""The learning-rate schedule (warmup, cosine decay) and bf16 autocast of the generator and encoder, the field
staying float32."""

import json

import numpy as np
import pytest

import dxtrain  # noqa: F401  (before torch: dxtrain/__init__.py)

torch = pytest.importorskip("torch")

import dxfield  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from dxtrain.cli import main  # noqa: E402
from dxtrain.config import TrainConfig  # noqa: E402
from helpers import describe  # noqa: E402

FAST = ["--batch", "40", "--positives", "60", "--landmarks", "8", "--log-every", "1", "--no-eval", "--no-progress",
        "--device", "cpu"]


def _invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)
    assert result.exit_code == 0, describe(result)
    return result


def test_lr_warmup_then_constant_or_cosine_by_hand():
    flat = TrainConfig(lr=0.01, lr_warmup=4, steps=10)
    assert [flat.lr_at(s) for s in range(6)] == pytest.approx([0.0025, 0.005, 0.0075, 0.01, 0.01, 0.01])
    cos = TrainConfig(lr=0.01, lr_warmup=0, lr_schedule="cosine", steps=10)
    assert cos.lr_at(0) == pytest.approx(0.01) and cos.lr_at(5) == pytest.approx(0.005)
    assert cos.lr_at(10) == pytest.approx(0.0) and cos.lr_at(12) == pytest.approx(0.0)  # resumed past the horizon
    both = TrainConfig(lr=0.01, lr_warmup=2, lr_schedule="cosine", steps=4)
    assert both.lr_at(0) == pytest.approx(0.005 * 0.5 * (1 + np.cos(0)))
    assert both.lr_at(3) == pytest.approx(0.01 * 0.5 * (1 + np.cos(np.pi * 3 / 4)))
    assert TrainConfig().lr_at(1000) == TrainConfig().lr  # the default: constant, no warmup
    for bad in (dict(lr_schedule="linear"), dict(lr_warmup=-1)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TrainConfig(**bad).validate()


def test_the_optimiser_steps_with_the_scheduled_rate(tmp_path, monkeypatch):
    seen = []
    real_step = torch.optim.AdamW.step

    def spy(self, *a, **kw):
        seen.append(self.param_groups[0]["lr"])
        return real_step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    out = tmp_path / "run"
    _invoke("train", "--data", "moons", "--out", out, "--steps", 6, "--lr", 0.01, "--lr-warmup", 2, "--lr-schedule",
            "cosine", "--encoder", "none", *FAST)
    cfg = TrainConfig(lr=0.01, lr_warmup=2, lr_schedule="cosine", steps=6)
    assert seen == pytest.approx([cfg.lr_at(s) for s in range(6)])
    logged = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged == pytest.approx(seen)


@pytest.mark.parametrize("field", ["exact", "projected"])
def test_bf16_autocasts_the_generator_and_encoder_on_the_cpu_and_the_field_stays_float32(tmp_path, monkeypatch,
                                                                                          field):
    from dxtrain import models

    gen_dtypes, field_dtypes = [], []
    real_forward = models.ConvGenerator.forward

    def gen_spy(self, *a, **kw):
        out = real_forward(self, *a, **kw)
        if torch.is_grad_enabled():  # the training step (not the EMA's sample sheet)
            gen_dtypes.append(out.dtype)
        return out

    real_exact, real_projected = dxfield.drift_field, dxfield.ProjectedField.field

    def exact_spy(x, *a, **kw):
        field_dtypes.append(x.dtype)
        return real_exact(x, *a, **kw)

    def projected_spy(self, x, *a, **kw):
        field_dtypes.append(x.dtype)
        return real_projected(self, x, *a, **kw)

    monkeypatch.setattr(models.ConvGenerator, "forward", gen_spy)
    monkeypatch.setattr(dxfield, "drift_field", exact_spy)
    monkeypatch.setattr(dxfield.ProjectedField, "field", projected_spy)
    out = tmp_path / "run"
    _invoke("train", "--data", "digits", "--out", out, "--steps", 2, "--field", field, "--precision", "bf16",
            "--gen-width", 8, "--max-locations", 1, *FAST)
    assert gen_dtypes == [torch.bfloat16] * 2
    assert field_dtypes and all(d == np.float32 for d in field_dtypes)
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(np.isfinite(losses))


# --------------------------------------------------------------------------- keep the best checkpoint


def test_keep_best_copies_the_checkpoint_only_when_the_score_improves(tmp_path):
    from dxtrain import rundir

    def save(step):
        rundir.write_checkpoint(str(tmp_path), {k: step for k in ("config", "generator", "ema", "optimizer", "step",
                                                                  "elapsed", "rng")})

    save(10)
    assert rundir.keep_best(str(tmp_path), 10, "FD_digits", 5.0)
    save(20)
    assert not rundir.keep_best(str(tmp_path), 20, "FD_digits", 6.0)  # worse: the best stays step 10's
    best, _ = rundir.load_checkpoint_file(str(tmp_path / rundir.BEST_CHECKPOINT), "")
    assert best["step"] == 10 and rundir.read_best(str(tmp_path))["step"] == 10
    save(30)
    assert rundir.keep_best(str(tmp_path), 30, "FD_digits", 4.0)
    best, digest = rundir.load_checkpoint_file(str(tmp_path / rundir.BEST_CHECKPOINT), "")  # its checksum holds
    assert best["step"] == 30 and rundir.read_best(str(tmp_path)) == {
        "step": 30, "score_name": "FD_digits", "score": 4.0, "sha256": digest}
    current, _ = rundir.load_checkpoint_file(str(tmp_path / rundir.CHECKPOINT), "")
    assert current["step"] == 30


def test_a_run_with_eval_every_keeps_its_best_checkpoint_and_logs_the_score(tmp_path):
    from dxtrain import rundir

    out = tmp_path / "run"
    _invoke("train", "--data", "moons", "--out", out, "--steps", 6, "--eval-every", 2, "--eval-samples", 200,
            "--encoder", "none", *FAST)
    logged = {json.loads(line)["step"]: json.loads(line).get("eval_energy_distance")
              for line in (out / "metrics.jsonl").read_text().splitlines()}
    scores = {s: v for s, v in logged.items() if v is not None}
    assert sorted(scores) == [2, 4, 6]
    best = rundir.read_best(str(out))
    assert best["score_name"] == "energy_distance" and best["score"] == min(scores.values())
    kept, _ = rundir.load_checkpoint_file(str(out / rundir.BEST_CHECKPOINT), "")
    assert kept["step"] == best["step"]
