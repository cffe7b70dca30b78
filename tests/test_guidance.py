"""Classifier-free guidance (dxtrain/guidance.py): the weight formula, the scales' law, the unconditional
negatives entering both fields, and a guided run end to end."""

import numpy as np
import pytest

import dxtrain  # noqa: F401  (before torch: dxtrain/__init__.py)

torch = pytest.importorskip("torch")

import dxfield  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from dxtrain import guidance  # noqa: E402
from dxtrain.cli import main  # noqa: E402
from dxtrain.fields import ExactField, ProjectedFieldSet  # noqa: E402
from helpers import describe  # noqa: E402


def test_negative_weights_by_hand():
    alpha = np.array([1.0, 2.0, 4.0])
    generated = np.array([10, 8, 6])  # N_neg per class
    unc = np.arange(9) % 3  # three unconditional negatives dealt to each class
    w = guidance.negative_weights(alpha, generated, unc)
    by_hand = {0: 0.0, 1: (2 - 1) * (8 - 1) / 3, 2: (4 - 1) * (6 - 1) / 3}
    np.testing.assert_allclose(w, [by_hand[c] for c in unc])
    # the unconditional negatives of a class carry (alpha - 1) times its generated negatives' mass (N_neg - 1)
    for c in range(3):
        assert w[unc == c].sum() == pytest.approx((alpha[c] - 1) * (generated[c] - 1))


def test_alpha_draws_half_at_one_and_a_power_law_above():
    rng = np.random.default_rng(0)
    a = np.concatenate([guidance.draw_alpha(rng, 10, 4.0) for _ in range(4000)])
    assert a.min() == 1.0 and a.max() <= 4.0
    assert abs((a == 1.0).mean() - guidance.AT_ONE) < 0.01
    above = np.sort(a[a > 1.0])
    k = guidance.EXPONENT - 1  # CDF of alpha^-EXPONENT on [1, 4]: (1 - a^-k) / (1 - 4^-k)
    cdf = (1 - above ** -k) / (1 - 4.0 ** -k)
    assert np.abs(cdf - (np.arange(len(above)) + 0.5) / len(above)).max() < 0.02  # Kolmogorov-Smirnov


def _two_classes(rng, n=400):
    lab = np.arange(n) % 2
    y = rng.normal(size=(n, 2)) * 0.3 + np.where(lab[:, None] == 0, -2.0, 2.0) * np.array([1.0, 0.0])
    return y.astype(np.float32), lab


@pytest.mark.parametrize("field", ["exact", "projected"])
def test_guidance_pushes_a_class_away_from_the_unconditional_data(field):
    # class 0's generated samples sit on class 0; unconditional negatives come from both classes.  With alpha > 1
    # the extra repulsion of class 1's half of them moves class 0's V away from class 1 (to -x); class 0's own
    # half is around the queries and pushes no way in particular.  (Class 1, at alpha = 1, gets weight 0; its
    # rows still change by the drift normalisation, which is over the whole batch: dxfield's tests check the
    # per-class weights with it off.)
    rng = np.random.default_rng(1)
    y, lab = _two_classes(rng)
    x = torch.from_numpy(np.concatenate([y[lab == 0][:20], y[lab == 1][:20]]) + 0.1)
    qlab = torch.from_numpy(np.repeat([0, 1], 20))
    unc = rng.choice(len(y), 200, replace=False)
    unc_lab = np.arange(200) % 2
    feats, pos = {"x": x}, {"x": torch.from_numpy(y)}
    if field == "exact":
        f = ExactField((0.2, 1.0))
        call = lambda neg: f(feats, pos, qlab, torch.from_numpy(lab), **neg)  # noqa: E731
    else:
        f = ProjectedFieldSet({"x": dxfield.ProjectedField.build(y, labels=lab, temperatures=(0.2, 1.0),
                                                                 landmarks=16, method="kmeans")})
        call = lambda neg: f(feats, None, qlab, **neg)  # noqa: E731
    plain = call({})["x"].v
    results = {}
    for a0 in (1.0, 3.0):
        w = guidance.negative_weights(np.array([a0, 1.0]), np.array([20, 20]), unc_lab)
        neg = {"features": {"x": torch.from_numpy(y[unc])}, "labels": torch.from_numpy(unc_lab),
               "weight": torch.from_numpy(w).float()}
        results[a0] = call({"negatives": neg})["x"].v
    if field == "projected":  # a fixed feature scale: weight 0 is no negative at all
        torch.testing.assert_close(results[1.0], plain)
    push = (results[3.0] - results[1.0])[:20, 0]  # class 0's queries, along the axis to class 1
    assert float(push.mean()) < -0.1 and float((push < 0).float().mean()) > 0.9, push


def _invoke(*args, ok=True):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)
    if ok:
        assert result.exit_code == 0, describe(result)
    return result


FAST = ["--batch", "40", "--positives", "60", "--landmarks", "8", "--log-every", "2", "--no-eval", "--no-progress",
        "--device", "cpu", "--encoder", "none", "--steps", "3"]


@pytest.mark.parametrize("field", ["exact", "projected"])
def test_a_guided_run_feeds_alpha_to_the_generator_and_negatives_to_the_field(tmp_path, monkeypatch, field):
    import dxtrain.train as dx_train

    seen = {"alpha": [], "negatives": []}
    real_draw = guidance.Guide.draw

    def spy(self, rng, labels):
        alpha, neg = real_draw(self, rng, labels)
        seen["alpha"].append(alpha.clone())
        seen["negatives"].append(neg)
        return alpha, neg

    monkeypatch.setattr(guidance.Guide, "draw", spy)
    out = tmp_path / "run"
    result = _invoke("train", "--data", "moons", "--out", out, "--field", field, "--guidance", "--guidance-max", 3,
                     "--guidance-negatives", 30, *FAST)
    assert "guidance: a scale per class and step in [1, 3]" in result.stderr
    assert len(seen["alpha"]) == 3 and all(a.shape == (40,) and float(a.min()) >= 1 and float(a.max()) <= 3
                                          for a in seen["alpha"])
    neg = seen["negatives"][0]
    assert neg["features"]["x"].shape == (30, 2) and neg["weight"].shape == (30,)
    assert dx_train.TrainConfig.from_dict(torch.load(out / "checkpoint.pt", weights_only=False)["config"]).guidance
    sampled = tmp_path / "s.npz"
    _invoke("sample", "--run", out, "--n", 8, "--out", sampled, "--cfg-scale", 2.5)
    with np.load(sampled) as f:
        assert f["x"].shape == (8, 2)


def test_guidance_refusals(tmp_path):
    r = _invoke("train", "--data", "moons", "--out", tmp_path / "a", "--guidance", "--unconditional", *FAST, ok=False)
    assert r.exit_code != 0 and "--guidance needs class-conditional data" in r.output
    r = _invoke("train", "--data", "moons", "--out", tmp_path / "b", "--guidance", "--repulsion", "nystrom", *FAST,
                ok=False)
    assert r.exit_code != 0 and "--repulsion exact" in r.output
    _invoke("train", "--data", "moons", "--out", tmp_path / "c", *FAST)
    r = _invoke("sample", "--run", tmp_path / "c", "--n", 4, "--out", tmp_path / "s.npz", "--cfg-scale", 2, ok=False)
    assert r.exit_code != 0 and "trained without --guidance" in r.output
    r = _invoke("train", "--data", "moons", "--out", tmp_path / "d", "--guidance-max", 1, *FAST, ok=False)
    assert r.exit_code != 0 and "--guidance-max" in r.output


def test_a_guided_run_with_warmup_resumes_exactly(tmp_path):
    # the scales and unconditional negatives come from the positives' stream and the rate from the step:
    # both are in the checkpoint, so 3 + 3 steps equal 6 in one go.  (A cosine schedule ends at --steps, so it
    # resumes exactly when --steps stays the same: an interrupted run.)
    args = ["--data", "moons", "--field", "exact", "--guidance", "--lr-warmup", 5, *FAST]
    args = [a for a in args if a != "--steps" and a != "3"]
    _invoke("train", "--out", tmp_path / "straight", "--steps", 6, *args)
    _invoke("train", "--out", tmp_path / "split", "--steps", 3, *args)
    _invoke("train", "--out", tmp_path / "split", "--steps", 6, "--resume", *args)
    a, b = (torch.load(tmp_path / r / "checkpoint.pt", weights_only=False) for r in ("straight", "split"))
    assert a["step"] == b["step"] == 6
    assert all(torch.equal(a["generator"][k], b["generator"][k]) for k in a["generator"])
