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
