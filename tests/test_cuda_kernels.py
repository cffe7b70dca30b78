"""The fused engine's CUDA kernels, checked without a GPU and on one.

Without a GPU: ``dxfield/cuda/kernels.cu`` compiles with nvcc (build check), and
it runs on the CPU through the emulation in ``tests/cuda_emu`` (each block's
threads as real threads with a barrier), driven by the same Python code as on
the GPU (``dxfield.fused``); its results must match the composed NumPy path and
the dense float64 reference.  With a GPU (``tox -e gpu``), the same comparisons
run on the real kernels in ``test_fused_gpu``.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import types

import numpy as np
import pytest

import dxfield
from dxfield import cuda_ops, engine, memory

import reference
from emulated_cuda import build
from helpers import make_points as _make_points, rel_err

TOL = 1e-5  # fused vs composed, float32 (the parity bound)


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    ops = build(tmp_path_factory.mktemp("emu"))
    if ops is None:
        pytest.skip("no C++20 compiler for the CUDA emulation")
    return ops


@pytest.fixture
def fused(emu, monkeypatch):
    """engine='fused' runs the emulated kernels on NumPy inputs."""
    monkeypatch.setattr(engine, "_OPS_OVERRIDE", emu)
    emu.launches.clear()
    emu.gemm_precisions.clear()
    return emu


def make_points(*args, **kw):
    """float32 points: the fused engine computes in float32."""
    return tuple(a.astype(np.float32) for a in _make_points(*args, **kw))


def _pair(fn, **kw):
    return fn(engine="fused", **kw), fn(engine="composed", **kw)


# -- build checks --------------------------------------------------------------------------
def test_signatures_parsed_from_the_source():
    sig = cuda_ops.SIGNATURES
    assert set(sig) == {"dx_dist_sum", "dx_col_partial", "dx_col_merge", "dx_row_pass", "dx_scale_rows",
                        "dx_kernel_rows", "dx_split_tf32"}
    tile = "piiippppifqippi"
    assert sig["dx_dist_sum"] == tile + "pp"
    assert sig["dx_row_pass"].startswith(tile) and sig["dx_row_pass"].endswith("f")
    assert sig["dx_col_merge"] == "ppiipipp"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_kernels_compile_with_nvcc(tmp_path, arch):
    try:
        cuda_ops.nvcc_compile(str(tmp_path / "k.cubin"), arch=arch)
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"nvcc failed:\n{exc.stderr}")
    assert (tmp_path / "k.cubin").stat().st_size > 0


@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
def test_kernels_compile_with_nvrtc(arch):
    """What CuPy does at run time (NVRTC, no host headers), checked without a GPU."""
    if not cuda_ops.nvrtc_compile(arch):
        pytest.skip("NVRTC is not installed (pip install nvidia-cuda-nvrtc, or set DXFIELD_NVRTC)")


# -- the exact field ---------------------------------------------------------------------------
@pytest.mark.parametrize("normalization", ["bidirectional", "row"])
@pytest.mark.parametrize("kernel", ["laplace", "gaussian"])
def test_fused_matches_composed(fused, normalization, kernel):
    rng = np.random.default_rng(1)
    x, pos = make_points(rng, 37, 53, 5)
    fn = lambda **kw: dxfield.drift_field(x, pos, normalization=normalization, kernel=kernel,
                                          temperatures=(0.02, 0.05, 0.2), **kw)
    vf, vc = _pair(fn)
    assert rel_err(vf, vc) < TOL
    assert fused.launches["dx_row_pass"] >= 1 and fused.launches["dx_dist_sum"] >= 1
    if normalization == "bidirectional":
        assert fused.launches["dx_col_partial"] >= 1
    ref, _ = reference.field(x, pos, normalization=normalization, kernel=kernel)
    assert rel_err(vf, ref) < 1e-4


def test_fused_many_tiles_two_pass(fused):
    """Query tiles smaller than N: the columns are completed in a first pass over the queries."""
    rng = np.random.default_rng(2)
    x, pos, neg = make_points(rng, 45, 70, 6, 30)
    kw = dict(neg=neg, neg_weight=rng.uniform(0.0, 2.0, size=30).astype(np.float32), include_self=True,
              temperatures=(0.05, 0.2), block_size=(16, 24))
    vf, vc = _pair(lambda **k: dxfield.drift_field(x, pos, **kw, **k))
    assert rel_err(vf, vc) < TOL
    ref, _ = reference.field(x, pos, neg, neg_weight=kw["neg_weight"], include_self=True,
                             temperatures=(0.05, 0.2))
    assert rel_err(vf, ref) < 1e-4


def test_fused_narrower_tiles_than_the_plan(fused, monkeypatch):
    """The fused engine cuts the plan's target tiles to its own width (memory budget)."""
    rng = np.random.default_rng(10)
    x, pos, neg = make_points(rng, 30, 50, 4, 20)
    lab, plab, nlab = rng.integers(0, 2, 30), rng.integers(0, 2, 50), rng.integers(0, 2, 20)
    kw = dict(neg=neg, include_self=True, labels=lab, pos_labels=plab, neg_labels=nlab,
              neg_weight=rng.uniform(0.5, 1.5, 20).astype(np.float32))
    vc = dxfield.drift_field(x, pos, engine="composed", **kw)
    monkeypatch.setattr(memory, "fused_tile_width", lambda *args, **kwargs: 7)
    vf = dxfield.drift_field(x, pos, engine="fused", **kw)
    assert rel_err(vf, vc) < TOL
    assert fused.launches["dx_row_pass"] == -(-50 // 7) + -(-30 // 7) + -(-20 // 7)


def test_fused_labels_and_raw_units(fused):
    rng = np.random.default_rng(3)
    x, pos = make_points(rng, 40, 60, 4)
    lab, plab = rng.integers(0, 3, 40), rng.integers(0, 3, 60)
    for kw in (dict(labels=lab, pos_labels=plab), dict(feature_scale=None, drift_norm=False, temperatures=0.5)):
        vf, vc = _pair(lambda **k: dxfield.drift_field(x, pos, block_size=(40, 17), **kw, **k))
        assert rel_err(vf, vc) < TOL, kw


def test_fused_small_temperature_and_outliers(fused):
    """Logits of hundreds and a far outlier: the streaming maxima and the row rescaling hold."""
    rng = np.random.default_rng(4)
    x, pos = make_points(rng, 30, 50, 3)
    x[0] += 40.0  # an outlier query
    pos[-1] -= 60.0  # an outlier target, last, so its column arrives after the reference was set
    vf, vc = _pair(lambda **k: dxfield.drift_field(x, pos, temperatures=(0.003, 0.02), block_size=(30, 8), **k))
    assert np.isfinite(vf).all()
    assert rel_err(vf, vc) < 1e-4


def test_fused_near_duplicates_are_refined(fused):
    rng = np.random.default_rng(5)
    base = rng.normal(size=(20, 8)).astype(np.float32) + 50.0  # far from the origin: cancellation
    x = base + 1e-4 * rng.normal(size=base.shape).astype(np.float32)
    pos = np.concatenate([base, base + 1.0]).astype(np.float32)
    vf, vc = _pair(lambda **k: dxfield.drift_field(x, pos, temperatures=0.02, **k))
    assert rel_err(vf, vc) < 1e-4


# -- the projected field ----------------------------------------------------------------------
@pytest.mark.parametrize("labels", [False, True])
def test_fused_projected_matches_composed(fused, labels):
    rng = np.random.default_rng(6)
    x, pos = make_points(rng, 33, 300, 6)
    plab = rng.integers(0, 2, 300) if labels else None
    pf = dxfield.ProjectedField.build(pos, landmarks=40, temperatures=(0.05, 0.2), labels=plab, seed=0)
    qlab = rng.integers(0, 2, 33) if labels else None
    af, ac = (pf.attraction(x, labels=qlab, engine=e) for e in ("fused", "composed"))
    assert rel_err(af, ac) < TOL
    assert fused.launches["dx_kernel_rows"] >= 1
    vf, vc = (pf.field(x, labels=qlab, engine=e) for e in ("fused", "composed"))
    assert rel_err(vf, vc) < TOL
    # bidirectional: the negatives' bidirectional sweep on the fused kernels, the attraction composed
    before = fused.launches.get("dx_col_partial", 0)
    vf, vc = (pf.field(x, labels=qlab, engine=e, normalization="bidirectional") for e in ("fused", "composed"))
    assert rel_err(vf, vc) < TOL
    assert fused.launches["dx_col_partial"] > before


def test_tf32x3_is_float32_accurate_and_tf32_is_not(fused):
    """The emulated tensor cores round to TF32: plain TF32 loses ~1e-3, the 3-part split does not."""
    rng = np.random.default_rng(9)
    x, pos = make_points(rng, 40, 64, 32)
    x += 3.0  # away from the origin: products carry large magnitudes
    pos += 3.0
    vc = dxfield.drift_field(x, pos, engine="composed")
    v3 = dxfield.drift_field(x, pos, engine="fused", precision="tf32x3")
    v1 = dxfield.drift_field(x, pos, engine="fused", precision="tf32")
    assert fused.launches["dx_split_tf32"] >= 1
    assert rel_err(v3, vc) < TOL
    assert rel_err(v1, vc) > 10 * rel_err(v3, vc)
    a = rng.normal(size=(13, 70)).astype(np.float32) * 100
    b = rng.normal(size=(70, 9)).astype(np.float32)
    out = np.empty((13, 9), np.float32)
    fused.gemm(a, b, out, precision="tf32x3")
    exact = a.astype(np.float64) @ b
    assert np.abs(out - exact).max() / np.abs(exact).max() < 2e-6


def test_precision_reaches_the_gemms(fused):
    rng = np.random.default_rng(7)
    x, pos = make_points(rng, 20, 30, 4)
    dxfield.drift_field(x, pos, engine="fused", precision="tf32")
    assert set(fused.gemm_precisions) == {"tf32"}
    pf = dxfield.ProjectedField.build(pos, landmarks=10, temperatures=0.05)
    fused.gemm_precisions.clear()
    ab = pf.attraction(x, engine="fused", precision="bf16")
    assert set(fused.gemm_precisions) == {"bf16"}
    err = rel_err(ab, pf.attraction(x, engine="composed"))
    assert 1e-5 < err < 5e-2  # bfloat16 products: visibly lossy, still close


# -- the GPU launcher's plumbing, checked on the CPU ---------------------------------------------
class _Dev(np.ndarray):
    """A NumPy array that exposes ``.data.ptr`` like a CuPy array."""

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.ctypes.data)


def _colmajor(ptr, rows, cols, ld):
    buf = (ctypes.c_float * (ld * (cols - 1) + rows)).from_address(ptr)
    flat = np.ctypeslib.as_array(buf)
    return np.lib.stride_tricks.as_strided(flat, shape=(rows, cols), strides=(4, 4 * ld))


def _fake_cublas():
    """cublasGemmEx with column-major semantics, in NumPy (checks the row-major mapping)."""
    calls = []

    def gemmEx(handle, transa, transb, m, n, k, alpha, A, atype, lda, B, btype, ldb, beta, C, ctype, ldc,
               compute, algo):
        calls.append(compute)
        a = _colmajor(A, k, m, lda).T if transa == 1 else _colmajor(A, m, k, lda)
        b = _colmajor(B, n, k, ldb).T if transb == 1 else _colmajor(B, k, n, ldb)
        c = _colmajor(C, m, n, ldc)
        al = ctypes.c_float.from_address(alpha).value
        be = ctypes.c_float.from_address(beta).value
        c[...] = al * (a.astype(np.float64) @ b) + be * c

    return types.SimpleNamespace(gemmEx=gemmEx, CUBLAS_OP_N=0, CUBLAS_OP_T=1, CUBLAS_COMPUTE_32F=68,
                                 CUBLAS_COMPUTE_32F_FAST_TF32=77, CUBLAS_COMPUTE_32F_FAST_16BF=75,
                                 CUBLAS_GEMM_DEFAULT=-1, calls=calls)


def test_cupy_gemm_mapping(monkeypatch):
    libs = pytest.importorskip("cupy_backends.cuda.libs", reason="CuPy is not installed (the gpu extra)")

    fake = _fake_cublas()
    monkeypatch.setitem(vars(libs), "cublas", fake)  # no getattr: the real one needs libcublas
    ops = cuda_ops.CupyOps.__new__(cuda_ops.CupyOps)
    ops.cupy = types.SimpleNamespace(cuda=types.SimpleNamespace(device=types.SimpleNamespace(
        get_cublas_handle=lambda: 0)))
    rng = np.random.default_rng(0)
    a = rng.normal(size=(9, 5)).astype(np.float32)
    bt = rng.normal(size=(7, 5)).astype(np.float32)
    b = rng.normal(size=(5, 7)).astype(np.float32)
    big = np.zeros((12, 7), np.float32)
    out = big.view(_Dev)[2:11]  # a row range of a bigger array
    ops.gemm(a.view(_Dev), bt.view(_Dev), out, trans_b=True)
    np.testing.assert_allclose(big[2:11], a @ bt.T, rtol=1e-5, atol=1e-5)
    assert not big[:2].any() and not big[11:].any()
    ops.gemm(a.view(_Dev), b.view(_Dev), out, beta=1.0, precision="tf32")
    np.testing.assert_allclose(big[2:11], a @ bt.T + a @ b, rtol=1e-5, atol=1e-5)
    assert fake.calls == [68, 77]
    with pytest.raises(ValueError, match="shapes"):
        ops.gemm(a.view(_Dev), b.view(_Dev), out, trans_b=True)


class _CastCheckOps(cuda_ops.CupyOps):
    """CupyOps.launch with a recording module: checks every argument's width against the
    signature, then runs the kernel in the emulator."""

    def __init__(self, emu):
        self.emu = emu
        self.xp = np
        self.cupy = types.SimpleNamespace(ndarray=np.ndarray)
        self.block = emu.block

    def _module(self):
        emu = self.emu

        class Mod:
            def get_function(self, name):
                def call(grid, block, args):
                    sig = cuda_ops.SIGNATURES[name]
                    want = {"i": np.int32, "q": np.int64, "f": np.float32}
                    fwd = []
                    for code, a in zip(sig, args):
                        if code == "p":
                            assert isinstance(a, np.ndarray) or (type(a) is np.uint64 and a == 0), (name, a)
                            fwd.append(a if isinstance(a, np.ndarray) else None)
                        else:
                            assert type(a) is want[code], (name, code, type(a))
                            fwd.append(a.item())
                    assert all(type(g) is int for g in grid + block)
                    emu.launch(name, grid, block, fwd)
                return call

        return Mod()

    def gemm(self, *args, **kw):
        self.emu.gemm(*args, **kw)


def test_cupy_launch_casts_arguments(emu, monkeypatch):
    monkeypatch.setattr(engine, "_OPS_OVERRIDE", _CastCheckOps(emu))
    rng = np.random.default_rng(8)
    x, pos, neg = make_points(rng, 20, 30, 4, 10)
    lab, plab = rng.integers(0, 2, 20), rng.integers(0, 2, 30)
    vf = dxfield.drift_field(x, pos, neg, include_self=True, labels=lab, pos_labels=plab,
                             neg_weight=np.float32(0.5), engine="fused")
    vc = dxfield.drift_field(x, pos, neg, include_self=True, labels=lab, pos_labels=plab,
                             neg_weight=np.float32(0.5), engine="composed")
    assert rel_err(vf, vc) < TOL
    pf = dxfield.ProjectedField.build(pos, landmarks=8, temperatures=0.1)
    assert rel_err(pf.attraction(x, engine="fused"), pf.attraction(x, engine="composed")) < TOL


# -- engine selection ----------------------------------------------------------------------------
def test_engine_errors_on_the_cpu():
    x = np.zeros((4, 2), np.float32)
    y = np.ones((5, 2), np.float32)
    with pytest.raises(ValueError, match="engine='fused' runs CUDA kernels"):
        dxfield.drift_field(x, y, engine="fused")
    with pytest.raises(ValueError, match="precision='tf32'"):
        dxfield.drift_field(x, y, precision="tf32")
    with pytest.raises(ValueError, match="engine="):
        dxfield.drift_field(x, y, engine="cuda")
    with pytest.raises(ValueError, match="precision="):
        dxfield.drift_field(x, y, precision="fp8")


def test_engine_env(monkeypatch):
    x = np.zeros((4, 2), np.float32)
    y = np.ones((5, 2), np.float32)
    monkeypatch.setenv(engine.ENGINE_ENV, "nonsense")
    with pytest.raises(ValueError, match=engine.ENGINE_ENV):
        dxfield.drift_field(x, y)
    monkeypatch.setenv(engine.ENGINE_ENV, "composed")
    assert dxfield.drift_field(x, y).shape == (4, 2)
