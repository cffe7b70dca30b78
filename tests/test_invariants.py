"""Structural invariants of ``dxfield.drift_field``, as hypothesis property tests.

What a user relies on without reading the formulas:

* permutation equivariance over queries (``V(x[p]) == V(x)[p]``) and
  invariance to the order of the positives and of the negatives;
* translation invariance (shift every input by the same vector), both
  normalisations;
* scale invariance with ``feature_scale="auto"`` (the field is returned in
  normalised units);
* sign flip: swapping positives and explicit negatives negates the field
  (row normalisation, and bidirectional with explicit negatives);
* weights are multiplicities: ``neg_weight`` 2 on a negative equals listing
  that negative twice (scalar and per-negative weights);
* tiling does not change the answer: any ``block_size``, including tiny ones
  and ones that force the two-pass path (query tile < N), agrees with the
  untiled result within float32 rounding.

Data are drawn as small random Gaussian clouds (sizes, dimension, offsets and
seed chosen by hypothesis); examples are few and small to keep the suite fast.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dxfield
from helpers import namespace_of, rel_err, to_numpy

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
TOL64 = 1e-9  # float64: only summation order differs
TOL32 = 2e-5  # float32: different tilings round differently

norms = st.sampled_from(["bidirectional", "row"])
kernels = st.sampled_from(["laplace", "gaussian"])
temps = st.sampled_from([(0.05,), (0.02, 0.05, 0.2), (0.3,)])


@st.composite
def clouds(draw, min_n=2, with_neg=False):
    """(x, pos, neg or None) as float64 arrays."""
    n = draw(st.integers(min_n, 12))
    p = draw(st.integers(1, 14))
    m = draw(st.integers(1, 9))
    d = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**32 - 1))
    spread = draw(st.sampled_from([0.1, 1.0, 10.0]))
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * spread
    pos = (rng.normal(size=(p, d)) + rng.normal(size=d)) * spread
    neg = (rng.normal(size=(m, d)) + rng.normal(size=d)) * spread if with_neg else None
    if draw(st.booleans()):  # exercise exact duplicates (zero distances) too
        pos[0] = x[-1]
    return x, pos, neg


def _close(a, b, tol=TOL64):
    a, b = to_numpy(a), to_numpy(b)
    scale = max(np.abs(b).max(), 1e-300)
    assert np.abs(a - b).max() <= tol * scale, np.abs(a - b).max() / scale


@SETTINGS
@given(data=clouds(min_n=2), norm=norms, kernel=kernels, temperatures=temps, perm_seed=st.integers(0, 1000))
def test_query_permutation_equivariance(xp, data, norm, kernel, temperatures, perm_seed):
    x, pos, _ = data
    p = np.random.default_rng(perm_seed).permutation(len(x))
    kw = dict(normalization=norm, kernel=kernel, temperatures=temperatures)
    v = dxfield.drift_field(xp.asarray(x), xp.asarray(pos), **kw)
    vp = dxfield.drift_field(xp.asarray(x[p]), xp.asarray(pos), **kw)
    assert namespace_of(vp) == xp.__name__
    _close(vp, to_numpy(v)[p])


@SETTINGS
@given(data=clouds(with_neg=True), norm=norms, kernel=kernels, temperatures=temps,
       include_self=st.booleans(), perm_seed=st.integers(0, 1000))
def test_target_order_does_not_matter(data, norm, kernel, temperatures, include_self, perm_seed):
    x, pos, neg = data
    rng = np.random.default_rng(perm_seed)
    pp, pn = rng.permutation(len(pos)), rng.permutation(len(neg))
    w = rng.uniform(0.5, 2.0, size=len(neg))
    kw = dict(normalization=norm, kernel=kernel, temperatures=temperatures, include_self=include_self)
    v = dxfield.drift_field(x, pos, neg, neg_weight=w, **kw)
    _close(dxfield.drift_field(x, pos[pp], neg, neg_weight=w, **kw), v)
    _close(dxfield.drift_field(x, pos, neg[pn], neg_weight=w[pn], **kw), v)


@SETTINGS
@given(data=clouds(with_neg=True), norm=norms, kernel=kernels, explicit=st.booleans(),
       shift=st.floats(-100.0, 100.0), shift_seed=st.integers(0, 1000))
def test_translation_invariance(xp, data, norm, kernel, explicit, shift, shift_seed):
    x, pos, neg = data
    c = shift * np.random.default_rng(shift_seed).uniform(-1, 1, size=x.shape[1])
    if not explicit:
        neg = None
    kw = dict(normalization=norm, kernel=kernel, include_self=True)

    def run(offset):
        return dxfield.drift_field(xp.asarray(x + offset), xp.asarray(pos + offset),
                                   None if neg is None else xp.asarray(neg + offset), **kw)

    # Shifting the inputs rounds them (x + c has fewer significant digits than x), so the
    # tolerance grows with |c| relative to the spread of the data.
    spread = np.abs(x - x.mean(0)).max() + 1e-12
    _close(run(c), run(0.0), tol=TOL64 + 1e-11 * np.abs(c).max() / spread)


@SETTINGS
@given(data=clouds(with_neg=True), norm=norms, kernel=kernels, temperatures=temps,
       factor=st.sampled_from([1e-3, 0.37, 3.0, 1e3]))
def test_auto_feature_scale_makes_the_field_scale_free(data, norm, kernel, temperatures, factor):
    x, pos, neg = data
    for drift_norm in (True, False):
        kw = dict(normalization=norm, kernel=kernel, temperatures=temperatures, drift_norm=drift_norm,
                  include_self=True, return_scale=True)
        v, s = dxfield.drift_field(x, pos, neg, **kw)
        vs, ss = dxfield.drift_field(x * factor, pos * factor, neg * factor, **kw)
        assert ss == pytest.approx(s * factor, rel=1e-12)
        _close(vs, v)


@SETTINGS
@given(data=clouds(with_neg=True), norm=norms, kernel=kernels, temperatures=temps,
       feature_scale=st.sampled_from(["auto", None]), drift_norm=st.booleans())
def test_swapping_positives_and_negatives_flips_the_sign(xp, data, norm, kernel, temperatures, feature_scale,
                                                         drift_norm):
    x, pos, neg = data
    kw = dict(normalization=norm, kernel=kernel, temperatures=temperatures, feature_scale=feature_scale,
              drift_norm=drift_norm)
    v = dxfield.drift_field(xp.asarray(x), xp.asarray(pos), xp.asarray(neg), **kw)
    flipped = dxfield.drift_field(xp.asarray(x), xp.asarray(neg), xp.asarray(pos), **kw)
    _close(flipped, -to_numpy(v))


@SETTINGS
@given(data=clouds(with_neg=True), norm=norms, kernel=kernels, temperatures=temps,
       include_self=st.booleans(), which=st.integers(0, 100))
def test_integer_weight_equals_duplicated_negative(data, norm, kernel, temperatures, include_self, which):
    # A fixed feature scale: "auto" averages distances over listed pairs, so a listed
    # duplicate (but not a weight) would move S (docs/design.md section 2.3; same in the reference).
    x, pos, neg = data
    j = which % len(neg)
    kw = dict(normalization=norm, kernel=kernel, temperatures=temperatures, include_self=include_self,
              feature_scale=1.3)
    w = np.ones(len(neg))
    w[j] = 2.0
    weighted = dxfield.drift_field(x, pos, neg, neg_weight=w, **kw)
    duplicated = dxfield.drift_field(x, pos, np.concatenate([neg, neg[j:j + 1]]), **kw)
    _close(weighted, duplicated)
    # scalar weight 2 on every negative == every negative listed twice
    _close(dxfield.drift_field(x, pos, neg, neg_weight=2, **kw),
           dxfield.drift_field(x, pos, np.concatenate([neg, neg]), **kw))


@settings(max_examples=15, deadline=None)
@given(data=clouds(min_n=4, with_neg=True), norm=norms, kernel=kernels, neg_case=st.sampled_from(["self", "explicit", "both"]))
def test_block_size_invariance(data, norm, kernel, neg_case):
    x, pos, neg = (None if a is None else a.astype(np.float32) for a in data)
    n, p = len(x), len(pos)
    kw = dict(normalization=norm, kernel=kernel)
    if neg_case != "self":
        kw.update(neg=neg, include_self=neg_case == "both", neg_weight=np.linspace(0.5, 2.0, len(neg)))
    untiled = dxfield.drift_field(x, pos, block_size=(n, max(p, n, len(neg))), **kw)
    assert untiled.dtype == np.float32
    for block in [(1, 1), (3, 5), (n - 1, 7), (n - 1, 10_000), (n, 2), (2, 10_000), (10_000, 3)]:
        tiled = dxfield.drift_field(x, pos, block_size=block, **kw)
        assert rel_err(tiled, untiled) <= TOL32, block


def test_block_size_invariance_with_default_tiling():
    """A larger case where the budget-chosen tiling itself is several tiles."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(150, 6)).astype(np.float32)
    pos = (rng.normal(size=(400, 6)) + 0.5).astype(np.float32)
    full = dxfield.drift_field(x, pos, block_size=(150, 550))
    for block in [None, (37, 53), (149, 1000), (7, 400)]:
        assert rel_err(dxfield.drift_field(x, pos, block_size=block), full) <= TOL32
    tight = dxfield.drift_field(x, pos, memory_budget="1MiB")
    assert rel_err(tight, full) <= TOL32
