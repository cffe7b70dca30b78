"""One exponential per entry and temperature (docs/design.md section 8.36): :class:`dxfield.blocksums.Side` against
dense float64 formulas written here, and the corrected field through it against the field formed term by term
(the per-temperature path it falls back to), in every regime of its ranges."""

import numpy as np
import pytest

import dxfield
import dxfield.attraction as attraction
import dxfield.blocksums as blocksums
import dxfield.correction as correction
from dxfield.blocksums import Side


def block(seed=0, groups=3, rows=7, cols=9, spread=1.0):
    """Distances with masked pairs (inf), an empty column and an empty row in the first group."""
    rng = np.random.default_rng(seed)
    r = rng.random((groups, rows, cols)) * spread + rng.random((groups, 1, cols)) * spread
    r[rng.random(r.shape) < 0.2] = np.inf
    r[0, :, 2] = np.inf  # a column no query reaches
    r[0, 3, :] = np.inf  # a query without targets
    return r


def dense(r, c):
    """``exp(-c (r - min_j r))`` and ``b_j = -0.5 log sum_i exp(-c r_ij)`` (-inf for an empty column), float64."""
    with np.errstate(invalid="ignore", divide="ignore"):
        f = np.where(np.isfinite(r).any(axis=2), r.min(axis=2), 0)
        P = np.exp(-c * (r - f[:, :, None]))
        top = np.where(np.isfinite(r).any(axis=1), r.min(axis=1), 0)
        log_c = -c * top + np.log(np.exp(-c * (r - top[:, None, :])).sum(axis=1))
    return P, np.where(np.isfinite(r).any(axis=1), -0.5 * log_c, -np.inf)


@pytest.mark.parametrize("coefs", [(0.5, 2.0, 5.0), (3.0,)])
@pytest.mark.parametrize("limit", [None, 4.0])  # column sums from P; or, for the larger coefficients, their own pass
def test_a_side_gives_the_exponentials_and_column_factors_of_the_dense_formula(monkeypatch, coefs, limit):
    if limit is not None:
        monkeypatch.setattr(blocksums, "span_limit", lambda dtype: limit)
    r = block()
    side = Side(np, r.copy(), np.float64)
    P, F, top, ok = side.exps(list(coefs))
    assert limit is None or len(coefs) == 1 or any(c * side.span > limit for c in coefs)  # the own pass is taken
    for i, c in enumerate(coefs):
        Pd, b = dense(r, c)
        np.testing.assert_allclose(P[i], Pd, rtol=1e-12, atol=0)
        fin = np.isfinite(b)
        spread = max(b[g][fin[g]].max() - b[g][fin[g]].min() for g in range(b.shape[0]))
        assert ok[i] == (limit is None or spread <= limit)
        if not ok[i]:
            continue
        with np.errstate(divide="ignore"):
            np.testing.assert_allclose((np.log(F[i]) + top[i][:, None])[fin], b[fin], rtol=0, atol=1e-10)
        assert (F[i][~fin] == 0).all() and (F[i].max(axis=1) == 1).all()
        rows = np.isfinite(r).any(axis=2)
        np.testing.assert_allclose(side.units([c])[0], -c * np.where(rows, r.min(axis=2), side.lo[:, None]))


def test_a_side_refuses_factors_that_spread_beyond_range():
    r = block(spread=1.0)
    r[1, :, 4] = 1e3  # a target far from every query of its group: its factor is exp(c 1e3 / 2) times the others'
    P, F, top, ok = Side(np, r, np.float32).exps([1.0, 1e-3])
    assert ok == [False, True]


def stacked_and_term_by_term(monkeypatch, pf, x, block=correction._Block, **kw):
    """The field through ``block`` (checked to be used), and with every temperature term by term."""
    V = pf.field(x, normalization="bidirectional", **kw)
    used = []
    real = block.sums
    monkeypatch.setattr(block, "sums", lambda self, ks: used.append(ks) or real(self, ks))
    assert np.array_equal(pf.field(x, normalization="bidirectional", **kw), V) and used
    monkeypatch.setattr(block, "sums", lambda self, ks: {})  # every temperature term by term
    return V, pf.field(x, normalization="bidirectional", **kw)


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-10), (np.float32, 2e-4)])
@pytest.mark.parametrize("limit", [None, 6.0, 1.0])  # A: column sums from P; B: their own pass; C: term by term
@pytest.mark.parametrize("classes,dim", [(None, 6), (4, 6), (4, 40)])  # 40: fewer queries than columns per class
@pytest.mark.parametrize("maps", [False, True])
def test_the_stacked_corrected_field_equals_the_field_term_by_term(monkeypatch, dtype, tol, limit, classes, dim,
                                                                    maps):
    if limit is not None:
        monkeypatch.setattr(blocksums, "span_limit", lambda d: limit)
    rng = np.random.default_rng(3)
    lab = None if classes is None else rng.integers(0, classes, 400)
    pos = (rng.normal(size=(400, dim)) + (0 if lab is None else lab[:, None])).astype(dtype)
    pf = dxfield.ProjectedField.build(pos, labels=lab, landmarks=10, temperatures=(0.02, 0.05, 0.2), dtype=dtype)
    rows = rng.choice(400, 90, replace=False)
    qlab = None if lab is None else rng.integers(0, classes, 40)
    x = (rng.normal(size=(40, dim)) * 1.3 + (0 if qlab is None else qlab[:, None])).astype(dtype)
    kw = dict(labels=qlab, pos_sample=pos[rows], pos_sample_labels=None if lab is None else lab[rows])
    if maps:
        kw["pos_sample_maps"] = pf.sample_maps(pos, lab)[rows]
    V, Vt = stacked_and_term_by_term(monkeypatch, pf, x, **kw)
    assert np.isfinite(V).all() and np.abs(V).max() > 0
    np.testing.assert_allclose(V, Vt, rtol=0, atol=tol * np.abs(Vt).max())


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-10), (np.float32, 2e-4)])
@pytest.mark.parametrize("limit", [None, 6.0, 1.0])
@pytest.mark.parametrize("dim", [6, 40])
def test_the_stacked_uncorrected_field_equals_the_field_term_by_term(monkeypatch, dtype, tol, limit, dim):
    """The batched Nystrom sums of class groups (docs/design.md section 8.37), their negatives included."""
    if limit is not None:
        monkeypatch.setattr(blocksums, "span_limit", lambda d: limit)
    rng = np.random.default_rng(4)
    lab = rng.integers(0, 5, 500)
    pos = (rng.normal(size=(500, dim)) + lab[:, None]).astype(dtype)
    pf = dxfield.ProjectedField.build(pos, labels=lab, landmarks=12, temperatures=(0.02, 0.05, 0.2), dtype=dtype)
    qlab = np.repeat(np.arange(5), [9, 4, 7, 2, 12])  # unequal groups: padding
    x = (rng.normal(size=(34, dim)) * 1.3 + qlab[:, None]).astype(dtype)
    V, Vt = stacked_and_term_by_term(monkeypatch, pf, x, block=attraction._NystromBlock, labels=qlab)
    assert np.isfinite(V).all() and np.abs(V).max() > 0
    np.testing.assert_allclose(V, Vt, rtol=0, atol=tol * np.abs(Vt).max())


def test_the_stacked_field_keeps_nystrom_alone_where_the_sample_turns_a_sum_negative(monkeypatch):
    rng = np.random.default_rng(157)  # a two-row sample whose residual turns one query's sum negative
    pos = rng.normal(size=(300, 3))
    pf = dxfield.ProjectedField.build(pos, landmarks=6, method="uniform", temperatures=(0.1, 0.3), seed=157)
    x = rng.normal(size=(30, 3)) * 1.5
    V, Vt = stacked_and_term_by_term(monkeypatch, pf, x, pos_sample=pos[rng.choice(300, 2, replace=False)])
    assert sum(pf.last_stats["attraction_fallback_rows"]) > 0
    np.testing.assert_allclose(V, Vt, rtol=0, atol=1e-10 * np.abs(Vt).max())


def test_temperatures_one_at_a_time_where_their_stack_would_exceed_the_budget(monkeypatch):
    rng = np.random.default_rng(6)
    pos = rng.normal(size=(300, 5))
    x = rng.normal(size=(50, 5))
    seen = []
    real = correction._Block.sums
    monkeypatch.setattr(correction._Block, "sums", lambda self, ks: seen.append(list(ks)) or real(self, ks))
    fields = []
    for budget in ("64MiB", "1MiB"):
        pf = dxfield.ProjectedField.build(pos, landmarks=8, temperatures=(0.05, 0.2), memory_budget=budget)
        fields.append(pf.field(x, normalization="bidirectional", pos_sample=pos[::4]))
    assert seen == [[0, 1], [0], [1]]
    np.testing.assert_allclose(fields[0], fields[1], rtol=0, atol=1e-12 * np.abs(fields[0]).max())
