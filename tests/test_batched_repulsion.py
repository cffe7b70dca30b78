"""The negatives' side formed with the attraction's batched class groups (docs/design.md section 8.19) equals
the exact sweep over the negatives, and Algorithm 2 where the attraction is exact."""

import numpy as np
import pytest

import dxfield
import dxfield.estimators as estimators
import reference as ref


def classes_with_a_lonely_query(seed=50, d=5):
    """Three classes of data; 16 queries, one of them alone in its class (no negative: V = 0)."""
    rng = np.random.default_rng(seed)
    plab = np.repeat([0, 1, 2], [90, 70, 40])
    pos = rng.normal(size=(200, d)) + plab[:, None]
    qlab = np.array([0] * 8 + [1] * 7 + [2])
    x = rng.normal(size=(16, d)) + qlab[:, None] + 0.3
    return pos, plab, x, qlab


@pytest.mark.filterwarnings("ignore::dxfield.LoneQueryWarning")  # the lonely query, on purpose
@pytest.mark.parametrize("corrected", [False, True])
@pytest.mark.parametrize("drift_norm", [False, True])
@pytest.mark.parametrize("kernel", ["laplace", "gaussian"])
def test_batched_negatives_equal_the_sweep(monkeypatch, corrected, drift_norm, kernel):
    pos, plab, x, qlab = classes_with_a_lonely_query()
    pf = dxfield.ProjectedField.build(pos, labels=plab, landmarks=12, method="uniform", kernel=kernel,
                                      temperatures=(0.02, 0.05, 0.2))
    kw = dict(labels=qlab, normalization="bidirectional", drift_norm=drift_norm)
    if corrected:
        kw.update(pos_sample=pos[::3], pos_sample_labels=plab[::3])
    swept_calls = []
    real = estimators.sweep_negatives
    monkeypatch.setattr(estimators, "sweep_negatives", lambda *a, **k: swept_calls.append(1) or real(*a, **k))
    batched = pf.field(x, **kw)
    assert not swept_calls, "the negatives went through the sweep"
    monkeypatch.setattr(estimators, "_batched_negatives", lambda c: False)
    swept = pf.field(x, **kw)
    assert len(swept_calls) == 1
    np.testing.assert_allclose(batched, swept, rtol=0, atol=1e-12 * max(1.0, np.abs(swept).max()))
    assert np.abs(batched[-1]).max() == 0  # the lonely query: nothing repels it


@pytest.mark.filterwarnings("ignore::dxfield.LoneQueryWarning")
def test_batched_negatives_give_algorithm_2_with_the_whole_data_as_sample():
    pos, plab, x, qlab = classes_with_a_lonely_query(51)
    pf = dxfield.ProjectedField.build(pos, labels=plab, landmarks=10, method="uniform", feature_scale=0.9,
                                      temperatures=(0.05, 0.2))
    V = pf.field(x, labels=qlab, normalization="bidirectional", pos_sample=pos, pos_sample_labels=plab,
                 drift_norm=False)
    for c in range(3):  # per class: Algorithm 2 of its queries against its data (independent reference)
        rows = qlab == c
        if rows.sum() < 2:
            continue
        Vc, _ = ref.field(x[rows], pos[plab == c], normalization="bidirectional", feature_scale=0.9,
                          temperatures=(0.05, 0.2), drift_norm=False)
        np.testing.assert_allclose(V[rows], Vc, rtol=0, atol=1e-9 * max(1.0, np.abs(Vc).max()))


def test_weighted_explicit_or_unconditional_negatives_still_sweep(monkeypatch):
    pos, plab, x, qlab = classes_with_a_lonely_query(52)
    pf = dxfield.ProjectedField.build(pos, labels=plab, landmarks=12, method="uniform")
    swept = []
    real = estimators.sweep_negatives
    monkeypatch.setattr(estimators, "sweep_negatives", lambda *a, **k: swept.append(1) or real(*a, **k))
    pf.field(x, x[:4], labels=qlab, normalization="bidirectional", include_self=True)
    pf.field(x, x[:4], labels=qlab, normalization="bidirectional", include_self=True, neg_weight=np.ones(4) * 2)
    assert len(swept) == 2
    # one group of all the queries (an unconditional cache): the sweep's own case without a correction; with
    # one, the negatives come in the corrected attraction's stacked block (docs/design.md section 8.36)
    unconditional = dxfield.ProjectedField.build(pos, landmarks=12, method="uniform")
    unconditional.field(x, normalization="bidirectional")
    assert len(swept) == 3
    unconditional.field(x, normalization="bidirectional", pos_sample=pos[::4])
    assert len(swept) == 3
