"""Memory: the exact field never needs O(N (N + P)) memory (docs/design.md section 2.5).

Runs ``drift_field`` and ``kernel_matvec`` on NumPy under a small
``memory_budget`` with ``tracemalloc`` started after the inputs exist, and
checks that the traced peak stays within the budget while the result equals
the unconstrained one; the dense N x (N + P) float64 matrices the reference
builds would need far more, so the bound cannot hold by accident.  Also: the
budget argument's forms (bytes, "2MiB" strings, ``$DXFIELD_MEMORY_BUDGET``)
and the clear error when the budget cannot hold even one tile.
"""


import numpy as np
import pytest

import dxfield
import reference as ref
from helpers import rel_err, spy_stacked, traced_peak

BUDGET = 2 * 2**20
N, P, D = 500, 4000, 64


@pytest.fixture(scope="module")
def big():
    rng = np.random.default_rng(42)
    x = rng.normal(size=(N, D)).astype(np.float32)
    pos = (rng.normal(size=(P, D)) + 0.3).astype(np.float32)
    neg = (rng.normal(size=(300, D)) - 0.3).astype(np.float32)
    return x, pos, neg




def test_tracemalloc_sees_numpy_allocations():
    """The memory tests below are only meaningful if NumPy's buffers are traced."""
    _, peak = traced_peak(lambda: np.ones(2**20).sum())
    assert peak >= 8 * 2**20


@pytest.mark.parametrize("case", ["bidirectional", "row", "bidirectional+weighted-negatives"])
def test_drift_field_stays_within_memory_budget(big, case):
    x, pos, neg = big
    kw = dict(temperatures=(0.02, 0.05, 0.2), feature_scale="auto", backend="numpy")
    if case == "row":
        kw["normalization"] = "row"
    if case.endswith("weighted-negatives"):
        kw.update(neg=neg, neg_weight=np.linspace(0.5, 3.0, len(neg)), include_self=True)
    v, peak = traced_peak(lambda: dxfield.drift_field(x, pos, memory_budget=BUDGET, **kw))

    # The dense reference holds N x (N + P) float64 distances (and as much again for logits):
    n_targets = N + P + (len(neg) if "neg" in kw else 0)
    assert N * n_targets * 8 > 8 * BUDGET
    assert peak <= BUDGET, f"traced peak {peak} bytes > memory_budget {BUDGET}"

    free = dxfield.drift_field(x, pos, memory_budget="1GiB", **kw)
    assert v.dtype == np.float32 and np.isfinite(v).all()
    assert rel_err(v, free) <= 2e-5


@pytest.mark.parametrize("rows, classes, stacked", [(200, 20, True), (500, 2, False)])
def test_labelled_field_stays_within_memory_budget(big, monkeypatch, rows, classes, stacked):
    # 200 queries of 20 classes: the stacked block (2.10) with its padded copies fits the budget and is
    # used; 500 of 2 classes: 2 x 250 x 2250 entries would not fit, and the masked sweep runs in tiles
    import dxfield.field as F

    x, pos, _ = big
    x, pos = x[:rows], pos[:5 * rows]
    ql, pl = np.arange(len(x)) % classes, np.arange(len(pos)) % classes
    used = spy_stacked(monkeypatch)
    kw = dict(labels=ql, pos_labels=pl, backend="numpy")
    dxfield.drift_field(x[:40], pos[:200], memory_budget=BUDGET, **{**kw, "labels": ql[:40], "pos_labels": pl[:200]})
    used.clear()  # the warm-up call above made the one-time Python allocations (imports) outside the trace
    v, peak = traced_peak(lambda: dxfield.drift_field(x, pos, memory_budget=BUDGET, **kw))
    assert bool(used) == stacked
    assert peak <= BUDGET, f"traced peak {peak} bytes > memory_budget {BUDGET}"
    monkeypatch.setattr(F, "STACK_CLASSES", False)
    masked = dxfield.drift_field(x, pos, memory_budget="1GiB", **kw)
    assert rel_err(v, masked) <= 2e-5


def test_budget_string_and_env_forms_agree(big, monkeypatch):
    x, pos, _ = big
    x, pos = x[:100], pos[:600]
    monkeypatch.delenv("DXFIELD_MEMORY_BUDGET", raising=False)
    a = dxfield.drift_field(x, pos, memory_budget=BUDGET, backend="numpy")
    b = dxfield.drift_field(x, pos, memory_budget="2MiB", backend="numpy")
    np.testing.assert_array_equal(a, b)
    monkeypatch.setenv("DXFIELD_MEMORY_BUDGET", "2MiB")
    c, peak = traced_peak(lambda: dxfield.drift_field(x, pos, backend="numpy"))
    np.testing.assert_array_equal(a, c)
    assert peak <= BUDGET


def test_too_small_budget_is_a_clear_error(big):
    x, pos, _ = big
    with pytest.raises(ValueError, match="memory_budget"):
        dxfield.drift_field(x, pos, memory_budget=1000)
    with pytest.raises(ValueError, match="memory_budget"):
        dxfield.kernel_matvec(x, pos, np.ones(len(pos), np.float32), memory_budget=1000)


def test_too_small_budget_from_environment_is_an_error(big, monkeypatch):
    x, pos, _ = big
    monkeypatch.setenv("DXFIELD_MEMORY_BUDGET", "1000")
    with pytest.raises(ValueError, match="memory_budget|DXFIELD_MEMORY_BUDGET"):
        dxfield.drift_field(x, pos)
    # an explicit argument wins over the environment
    assert dxfield.drift_field(x[:50], pos[:100], memory_budget="8MiB").shape == (50, D)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("k", [None, 5])
def test_kernel_matvec_stays_within_memory_budget(dtype, k):
    rng = np.random.default_rng(3)
    n, m, d = 300, 3000, 32
    budget = 2**20
    x = rng.normal(size=(n, d)).astype(dtype)
    y = rng.normal(size=(m, d)).astype(dtype)
    w = rng.normal(size=(m,) if k is None else (m, k)).astype(dtype)
    assert n * m * 8 > 2 * budget  # the dense kernel matrix would not fit
    s, peak = traced_peak(lambda: dxfield.kernel_matvec(x, y, w, tau=2.0, memory_budget=budget, backend="numpy"))
    assert peak <= budget, f"traced peak {peak} bytes > memory_budget {budget}"
    dense = np.concatenate([np.exp(-ref.distances(x[i:i + 25], y) / 2.0) @ w for i in range(0, n, 25)])
    assert rel_err(s, dense) <= (1e-10 if dtype == np.float64 else 1e-4)
