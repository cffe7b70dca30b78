"""FID, KID and IS through torch-fidelity from a local weights file (dxtrain/inception.py).

torch-fidelity's InceptionV3 is built with random weights, saved in the format
torch-fidelity loads (a state dict in a ``.pth`` file) and loaded back from that
file: nothing is downloaded.  torch-fidelity needs torchvision (the ``images``
extra), so these tests skip where it cannot be imported, unless
``DXTRAIN_REQUIRE_ENCODERS=1`` (CI's encoder venv), which makes that an error.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from dxtrain import inception
from dxtrain.data import Dataset, train_test_split
from dxtrain.evaluate import evaluate_samples, frechet_distance


def _importable() -> str | None:
    try:
        import torch_fidelity.feature_extractor_inceptionv3  # noqa: F401
        import torch_fidelity.metric_kid  # noqa: F401
    except Exception as error:  # ImportError, or torchvision's "operator torchvision::nms does not exist"
        return f"{type(error).__name__}: {error}"
    return None


WHY_NOT = _importable()
if WHY_NOT and os.environ.get("DXTRAIN_REQUIRE_ENCODERS", "").strip() not in ("", "0"):
    raise RuntimeError(f"DXTRAIN_REQUIRE_ENCODERS is set but torch-fidelity cannot be imported ({WHY_NOT})")
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=f"torch-fidelity cannot be imported here ({WHY_NOT})")


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
    """torch-fidelity's InceptionV3 with random weights, as a ``.pth`` state dict on disk."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    real_download, real_load = fe.load_state_dict_from_url, fe.FeatureExtractorInceptionV3.load_state_dict
    fe.load_state_dict_from_url = lambda *a, **k: None  # built without weights: nothing is fetched or loaded
    fe.FeatureExtractorInceptionV3.load_state_dict = lambda self, state, *a, **k: None
    try:
        torch.manual_seed(0)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    finally:
        fe.load_state_dict_from_url, fe.FeatureExtractorInceptionV3.load_state_dict = real_download, real_load
    path = tmp_path_factory.mktemp("inception") / "inception-random.pth"
    torch.save(net.state_dict(), path)
    return str(path)


def _images(rng, n, channels=3, offset=0.0):
    return np.tanh(rng.normal(size=(n, channels, 16, 16)) + offset).astype(np.float32)


def test_features_from_the_local_file_and_a_set_against_itself(random_inception):
    features = inception.inception_features(random_inception, "cpu")
    x = _images(np.random.default_rng(0), 12)
    pool, logits = features(x)
    assert pool.shape == (12, 2048) and logits.shape == (12, 1008) and np.isfinite(pool).all()
    again, _ = features(x)
    np.testing.assert_array_equal(pool, again)  # deterministic, eval mode
    spread = np.trace(np.cov(pool.T))  # random weights give small features: the scale to compare with
    other, _ = features(_images(np.random.default_rng(5), 12, offset=1.0))
    assert frechet_distance(pool, other) > 0.1 * spread
    unit = pool / np.sqrt(spread)  # FD scales with the features' square: compare at trace(cov) = 1
    assert abs(frechet_distance(unit, unit)) < 1e-6  # FD of a set against itself: 0
    same = inception._scores(unit, unit, logits, seed=0)
    apart = inception._scores(unit, other / np.sqrt(spread), None, seed=0)
    assert abs(same["FID"]) < 1e-4  # (torch-fidelity: the eigenvalues of a rank-11 product)
    assert apart["FID"] > 0.1 and apart["KID"] > 20 * abs(same["KID"])  # KID's subsets are drawn independently
    assert same["IS"] >= 1.0 - 1e-9  # exp(mean KL) >= 1


def test_the_report_has_fid_kid_is_and_their_floors(random_inception):
    rng = np.random.default_rng(1)
    ds = Dataset("rgb", _images(rng, 60), None, "images", 0)
    train, test = train_test_split(ds, test_fraction=0.3)
    good = evaluate_samples(_images(rng, 10), train, test, inception_weights=random_inception, max_points=16)
    shifted = evaluate_samples(_images(rng, 10, offset=2.0), train, test, inception_weights=random_inception,
                               max_points=16)
    for key in ("FID", "KID", "KID_std", "IS", "IS_std"):
        assert np.isfinite(good[key]) and key in good["floor"], key
    assert good["fid_n"] == 10 and not any("skipped" in n for n in good["notes"] if "FID" in n or "IS" in n)
    assert shifted["FID"] > 3 * good["FID"] and shifted["KID"] > good["KID"]
    grey = Dataset("grey", _images(rng, 40, channels=1), None, "images", 0)
    gtrain, gtest = train_test_split(grey, test_fraction=0.3)
    report = evaluate_samples(_images(rng, 10, channels=1), gtrain, gtest, inception_weights=random_inception,
                              max_points=16)
    assert "FID" in report and "IS" not in report and any("IS skipped" in n for n in report["notes"])


def test_a_file_of_other_weights_is_refused_naming_it(tmp_path):
    bad = tmp_path / "resnet.pth"
    torch.save({"conv.weight": torch.zeros(2, 2)}, bad)
    with pytest.raises(ValueError, match=r"'.*resnet.pth' does not hold torch-fidelity's InceptionV3 weights"):
        inception.inception_features(str(bad), "cpu")
    text = tmp_path / "notes.pth"
    text.write_text("not a torch file")
    with pytest.raises(ValueError, match="notes.pth"):
        inception.inception_features(str(text), "cpu")


def test_eval_refuses_other_weights_before_scoring(tmp_path):
    from click.testing import CliRunner

    from dxtrain.cli import main

    run = tmp_path / "run"
    common = ["--steps", "2", "--batch", "40", "--positives", "60", "--landmarks", "8", "--no-eval", "--no-progress",
              "--device", "cpu", "--encoder", "none"]
    assert CliRunner().invoke(main, ["train", "--data", "digits", "--out", str(run), *common]).exit_code == 0
    bad = tmp_path / "resnet.pth"
    torch.save({"conv.weight": torch.zeros(2, 2)}, bad)
    result = CliRunner().invoke(main, ["eval", "--run", str(run), "--inception-weights", str(bad)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"--inception-weights {bad} does not hold torch-fidelity's InceptionV3 weights" in result.output
    assert not (run / "eval.json").exists()  # refused before any scoring
