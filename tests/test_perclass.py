"""The labelled exact field one class at a time (dxfield.perclass) against the dense float64 reference
and against the masked sweep it replaces; the cost rule that picks between them."""

import warnings

import numpy as np
import pytest

import dxfield
import dxfield.field as F
import reference as ref
from helpers import spy_stacked
from dxfield.perclass import stack_plan


@pytest.fixture(params=[True, False], ids=["stacked", "masked"])
def split(request, monkeypatch):
    """Stacked classes allowed (True) or not; ``split.used`` counts the calls that stacked them."""
    monkeypatch.setattr(F, "STACK_CLASSES", request.param)
    calls = spy_stacked(monkeypatch)
    return type("Split", (), {"on": request.param, "used": property(lambda self: len(calls))})()


def _labelled(seed, n=60, p=150, m=40, d=5, classes=4):
    rng = np.random.default_rng(seed)
    x, pos, neg = rng.normal(size=(n, d)), rng.normal(size=(p, d)) + 0.4, rng.normal(size=(m, d)) - 0.3
    ql, pl, nl = rng.integers(0, classes, n), rng.integers(0, classes, p), rng.integers(0, classes, m)
    pl[:classes] = np.arange(classes)  # every query class has positives
    return x, pos, neg, ql, pl, nl


def _reference(x, pos, neg, ql, pl, nl, *, drift_norm, feature_scale, **kw):
    """Algorithm 2 per class (dense float64), with the automatic scale over every class's pairs and drift
    normalisation over the whole batch, as one labelled call defines them."""
    if feature_scale == "auto":
        pairs = []
        for c in np.unique(ql):
            xc = x[ql == c]
            pairs.append(ref.distances(xc, pos[pl == c]).ravel())
            if kw.get("include_self", neg is None):
                dq = ref.distances(xc, xc)
                pairs.append(dq[~np.eye(len(xc), dtype=bool)])
            if neg is not None:
                pairs.append(ref.distances(xc, neg if nl is None else neg[nl == c]).ravel())
        feature_scale = np.concatenate(pairs).mean() / np.sqrt(x.shape[1])
    temps = kw.pop("temperatures")
    out = np.zeros_like(x)
    for tau in temps:
        v = np.zeros_like(x)
        for c in np.unique(ql):
            negc = None if neg is None else (neg if nl is None else neg[nl == c])
            v[ql == c], _ = ref.field(x[ql == c], pos[pl == c], negc, temperatures=(tau,), drift_norm=False,
                                      feature_scale=feature_scale, **kw)
        if drift_norm:
            v = v / np.sqrt((v ** 2).sum(1).mean() / x.shape[1])
        out += v
    return out, feature_scale


@pytest.mark.parametrize("kernel", ["laplace", "gaussian"])
@pytest.mark.parametrize("normalization, negatives", [
    ("bidirectional", "self"), ("bidirectional", "labelled"), ("bidirectional", "both"),
    ("row", "self"), ("row", "labelled"), ("row", "unlabelled"), ("row", "both")])
def test_labelled_field_matches_the_dense_reference(split, normalization, kernel, negatives):
    # "both": the queries and labelled explicit negatives.  Unlabelled negatives under Algorithm 2 tie the
    # classes together (a negative's column sum runs over every query): test_unlabelled_negatives_keep_...
    x, pos, neg, ql, pl, nl = _labelled(1)
    neg_arg = None if negatives == "self" else neg
    nl_arg = nl if negatives in ("labelled", "both") else None
    include_self = negatives in ("self", "both")
    kw = dict(normalization=normalization, kernel=kernel, temperatures=(0.05, 0.2), include_self=include_self)
    v, s = dxfield.drift_field(x, pos, neg_arg, labels=ql, pos_labels=pl, neg_labels=nl_arg, return_scale=True, **kw)
    want, s_ref = _reference(x, pos, neg_arg, ql, pl, nl_arg, drift_norm=True, feature_scale="auto", **kw)
    assert s == pytest.approx(s_ref, rel=1e-10)
    np.testing.assert_allclose(v, want, rtol=1e-8, atol=1e-10)
    assert split.used == (split.on and negatives != "unlabelled")  # unlabelled negatives: the masked sweep


@pytest.mark.parametrize("feature_scale", [None, 0.7, "auto"])
def test_weighted_negatives_and_fixed_scales(split, feature_scale):
    x, pos, neg, ql, pl, nl = _labelled(2)
    w = np.random.default_rng(3).uniform(0.2, 2.0, neg.shape[0])
    w[:3] = 1e-300  # (nearly) weightless negatives add nothing, but count in the mean distance
    kw = dict(normalization="bidirectional", temperatures=(0.5, 2.0) if feature_scale is None else (0.05, 0.2),
              include_self=True)
    v = dxfield.drift_field(x, pos, neg, labels=ql, pos_labels=pl, neg_labels=nl, neg_weight=w,
                            feature_scale=feature_scale, drift_norm=False, **kw)
    assert split.used == split.on
    want = np.zeros_like(x)
    scale = feature_scale
    if feature_scale == "auto":
        _, scale = _reference(x, pos, neg, ql, pl, nl, drift_norm=False, feature_scale="auto", **kw)
    for c in np.unique(ql):
        want[ql == c], _ = ref.field(x[ql == c], pos[pl == c], neg[nl == c], neg_weight=w[nl == c],
                                     feature_scale=scale, drift_norm=False, **kw)
    # ref.field works in units of S, as drift_norm=False returns the field
    np.testing.assert_allclose(v, want, rtol=1e-8, atol=1e-10)


def test_per_class_equals_the_masked_sweep_in_float32(monkeypatch):
    # the float32 paths differ only by rounding: every row, a lone query in its class, a class without
    # explicit negatives, and the non-finite rows left out all agree
    x, pos, neg, ql, pl, nl = _labelled(4, n=200, p=500, m=80, d=16, classes=6)
    x, pos, neg = (a.astype(np.float32) for a in (x, pos, neg))
    ql[0] = 5
    ql[ql == 5] = 4
    ql[0] = 5  # class 5 holds one query
    nl[nl == 3] = 2  # class 3 has no explicit negative
    x[7] = np.nan
    out = {}
    for mode in (True, False):
        monkeypatch.setattr(F, "STACK_CLASSES", mode)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the lone query may warn: it is compared, not judged
            out[mode] = dxfield.drift_field(x, pos, neg, labels=ql, pos_labels=pl, neg_labels=nl, include_self=True,
                                            check_finite=False, return_scale=True)
    (v1, s1), (v0, s0) = out[True], out[False]
    assert s1 == pytest.approx(s0, rel=1e-5)
    assert np.isnan(v1[7]).all() and np.isnan(v0[7]).all()
    ok = ~np.isnan(v0).any(1)
    assert np.abs(v1[ok] - v0[ok]).max() < 2e-4 * np.abs(v0[ok]).max()


def test_unlabelled_negatives_keep_the_masked_sweep(monkeypatch):
    x, pos, neg, ql, pl, _ = _labelled(6, n=120, p=300, m=60, d=8)
    out = []
    for mode in (True, False):
        monkeypatch.setattr(F, "STACK_CLASSES", mode)
        out.append(dxfield.drift_field(x, pos, neg, labels=ql, pos_labels=pl, include_self=True))
    np.testing.assert_array_equal(out[0], out[1])
    # and the classes are tied: a query's field depends on the other classes' queries
    keep = ql != 0
    alone = dxfield.drift_field(x[keep], pos, neg, labels=ql[keep], pos_labels=pl, include_self=True,
                                drift_norm=False, feature_scale=1.0)
    whole = dxfield.drift_field(x, pos, neg, labels=ql, pos_labels=pl, include_self=True, drift_norm=False,
                                feature_scale=1.0)
    assert np.abs(whole[keep] - alone).max() > 1e-6


def test_every_sum_of_the_split_is_used(monkeypatch):
    # a wrong merge (one class's rows left at zero) must show: the per-class result differs from a call
    # whose classes are swapped between rows
    x, pos, neg, ql, pl, nl = _labelled(5, n=80, p=200, classes=3)
    monkeypatch.setattr(F, "STACK_CLASSES", True)
    v = dxfield.drift_field(x, pos, labels=ql, pos_labels=pl)
    assert (np.abs(v).sum(1) > 0).all()
    w = dxfield.drift_field(x, pos, labels=(ql + 1) % 3, pos_labels=pl)
    assert np.abs(v - w).max() > 1e-2


def _inputs(ql, pl, d=64, nl=None, m=0):
    from dxfield.inputs import FieldInputs
    n, p = len(ql), len(pl)
    return FieldInputs(np.zeros((n, d), np.float32), np.zeros((p, d), np.float32),
                       None if nl is None else np.zeros((m, d), np.float32), None, ql, pl, nl, n, None, 1.0)


def test_the_plan_stacks_only_where_the_block_is_smaller_and_fits():
    q, p = np.repeat(np.arange(10), 26), np.repeat(np.arange(10), 102)  # cmix10's exact@1024 step
    opts = dict(include_self=True, ops=None, budget=256 << 20, n_temps=3)
    plan = stack_plan(_inputs(q, p), **opts)
    assert [r.tolist() for r in plan.rows] == [np.flatnonzero(q == c).tolist() for c in range(10)] and plan.neg is None
    assert stack_plan(_inputs(np.zeros(256, int), np.zeros(1024, int)), **opts) is None  # one class: no saving
    skewed = np.r_[np.zeros(250, int), np.arange(1, 7)]  # padding to the largest class costs more than masking
    assert stack_plan(_inputs(skewed, np.repeat(np.arange(7), 100)), **opts) is None
    assert stack_plan(_inputs(q, p), **{**opts, "budget": 1 << 20}) is None  # 1.4 MB (stacked_bytes): over it
    assert stack_plan(_inputs(q, p), **{**opts, "ops": object()}) is None  # the fused engine keeps its sweep
    assert stack_plan(_inputs(q, p, nl=None, m=30), **opts) is not None  # no explicit negatives
