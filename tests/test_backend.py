"""Backends and array interchange.

* DLPack: a torch CPU tensor is taken zero-copy (same memory), also with
  ``requires_grad=True``; bfloat16 / float16 tensors are upcast to float32;
  results of torch inputs are NumPy arrays equal to the NumPy-input results.
* ``import dxfield`` never imports torch.
* Backend selection: ``backend=`` argument and ``$DXFIELD_BACKEND``, clear
  errors for unknown names and for CuPy without a GPU.
* Results follow the input across all public functions (NumPy in -> NumPy
  out, CuPy in -> CuPy out on the same device), and the CuPy backend agrees
  with the NumPy one (GPU tests, marked ``gpu``, skipped without a GPU).
"""

import subprocess
import sys

import numpy as np
import pytest

import dxfield
from dxfield import backend
from helpers import namespace_of, rel_err, to_numpy


@pytest.fixture(scope="module")
def pts():
    rng = np.random.default_rng(9)
    x = rng.normal(size=(20, 4)).astype(np.float32)
    pos = (rng.normal(size=(30, 4)) + 1).astype(np.float32)
    neg = (rng.normal(size=(8, 4)) - 1).astype(np.float32)
    return x, pos, neg


# -- DLPack / torch ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_ingest_torch_cpu_tensor_is_zero_copy(torch, requires_grad, dtype):
    t = torch.arange(12, dtype=getattr(torch, dtype)).reshape(3, 4).requires_grad_(requires_grad)
    a = backend.ingest(t, "x")
    assert isinstance(a, np.ndarray)
    assert a.ctypes.data == t.data_ptr()
    assert a.shape == (3, 4) and a.dtype == np.dtype(dtype)
    with torch.no_grad():
        t[1, 2] = -7.0  # a write through torch is seen by the array: same memory
    assert a[1, 2] == -7.0


def test_ingest_passes_numpy_through_and_converts_lists():
    a = np.ones((2, 3))
    assert backend.ingest(a, "x") is a
    assert backend.ingest(None, "x") is None
    b = backend.ingest([[1.0, 2.0]], "x")
    assert isinstance(b, np.ndarray) and b.shape == (1, 2)


@pytest.mark.parametrize("normalization", ["bidirectional", "row"])
@pytest.mark.parametrize("tdtype", ["float32", "float64"])
def test_drift_field_accepts_torch_tensors(torch, pts, normalization, tdtype):
    x, pos, neg = (a.astype(tdtype) for a in pts)
    tx, tpos, tneg = (torch.from_numpy(a.copy()) for a in (x, pos, neg))
    tx.requires_grad_(True)  # a generator's output usually carries a graph
    for kw in ({}, dict(neg=tneg, neg_weight=torch.linspace(0.5, 2.0, len(neg)), include_self=True)):
        v = dxfield.drift_field(tx, tpos, normalization=normalization, **kw)
        np_kw = {k: (val.numpy() if hasattr(val, "numpy") else val) for k, val in kw.items()}
        expected = dxfield.drift_field(x, pos, normalization=normalization, **np_kw)
        assert isinstance(v, np.ndarray)
        assert v.dtype == np.dtype(tdtype)
        np.testing.assert_allclose(v, expected, rtol=1e-6, atol=1e-6)
    assert tx.grad is None
    np.testing.assert_array_equal(tx.detach().numpy(), x)  # inputs untouched


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_half_precision_torch_tensors_are_upcast_to_float32(torch, pts, half):
    x, pos, _ = pts
    tx, tpos = (torch.from_numpy(a).to(getattr(torch, half)) for a in (x, pos))
    v = dxfield.drift_field(tx, tpos)
    assert isinstance(v, np.ndarray) and v.dtype == np.float32
    # equal to the float32 computation on the (rounded) half-precision values
    expected = dxfield.drift_field(tx.float().numpy(), tpos.float().numpy())
    np.testing.assert_allclose(v, expected, rtol=1e-6, atol=1e-6)


def test_kernel_functions_accept_torch_tensors(torch, pts):
    x, pos, _ = pts
    tx, tpos = torch.from_numpy(x), torch.from_numpy(pos)
    w = torch.linspace(-1, 1, len(pos))
    s = dxfield.kernel_matvec(tx, tpos, w, tau=2.0)
    assert isinstance(s, np.ndarray) and s.shape == (len(x),)
    np.testing.assert_allclose(s, dxfield.kernel_matvec(x, pos, w.numpy(), tau=2.0), rtol=1e-6)
    d = dxfield.pairwise_distances(tx, tpos)
    assert isinstance(d, np.ndarray)
    np.testing.assert_allclose(d, dxfield.pairwise_distances(x, pos), rtol=1e-6)


def test_import_dxfield_does_not_import_torch():
    code = "import sys, dxfield; dxfield.drift_field([[0.0, 1.0], [1.0, 0.0]], [[2.0, 2.0]]); " \
           "assert 'torch' not in sys.modules, 'dxfield imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


# -- backend selection ------------------------------------------------------------------

def test_numpy_backend_by_argument_and_environment(pts, monkeypatch):
    x, pos, _ = pts
    monkeypatch.delenv("DXFIELD_BACKEND", raising=False)
    auto = dxfield.drift_field(x, pos)
    by_arg = dxfield.drift_field(x, pos, backend="numpy")
    assert isinstance(by_arg, np.ndarray)
    np.testing.assert_array_equal(by_arg, auto)
    monkeypatch.setenv("DXFIELD_BACKEND", "numpy")
    np.testing.assert_array_equal(dxfield.drift_field(x, pos), auto)
    monkeypatch.setenv("DXFIELD_BACKEND", "auto")
    np.testing.assert_array_equal(dxfield.drift_field(x, pos), auto)


@pytest.mark.parametrize("fn", ["drift_field", "kernel_matvec"])
def test_unknown_backend_name_is_a_value_error_naming_it(pts, fn):
    x, pos, _ = pts
    call = (lambda **kw: dxfield.drift_field(x, pos, **kw)) if fn == "drift_field" else \
        (lambda **kw: dxfield.kernel_matvec(x, pos, np.ones(len(pos)), **kw))
    with pytest.raises(ValueError, match="tensorflow"):
        call(backend="tensorflow")


def test_bad_backend_environment_variable_is_named(pts, monkeypatch):
    x, pos, _ = pts
    monkeypatch.setenv("DXFIELD_BACKEND", "bogus")
    with pytest.raises(ValueError, match="DXFIELD_BACKEND"):
        dxfield.drift_field(x, pos)
    # an explicit argument overrides the environment
    assert isinstance(dxfield.drift_field(x, pos, backend="numpy"), np.ndarray)


def test_cupy_backend_without_gpu_is_a_clear_runtime_error(pts, monkeypatch):
    if dxfield.cupy_available():
        pytest.skip("CuPy and a GPU are available here")
    x, pos, _ = pts
    with pytest.raises(RuntimeError, match="CuPy"):
        dxfield.drift_field(x, pos, backend="cupy")
    with pytest.raises(RuntimeError, match="CuPy"):
        backend.require_cupy()
    monkeypatch.setenv("DXFIELD_BACKEND", "cupy")
    with pytest.raises(RuntimeError, match="CuPy"):
        dxfield.kernel_matvec(x, pos, np.ones(len(pos)))


def test_place_keeps_none_entries_and_ingests_the_rest(pts, monkeypatch):
    monkeypatch.delenv("DXFIELD_BACKEND", raising=False)
    x, pos, _ = pts
    placement, arrays = backend.place({"x": x, "pos": pos, "neg": None})
    assert placement.xp is np
    assert arrays["neg"] is None
    assert arrays["x"] is x and arrays["pos"] is pos  # no copies on the CPU


# -- results follow the input -----------------------------------------------------------

def test_every_public_function_answers_in_the_input_namespace(xp, pts):
    x, pos, _ = (xp.asarray(a) for a in pts)
    w = xp.asarray(np.linspace(0, 1, pos.shape[0], dtype=np.float32))
    outs = [
        dxfield.drift_field(x, pos),
        dxfield.drift_field(x, pos, normalization="row"),
        dxfield.kernel_matvec(x, pos, w, tau=1.0),
        dxfield.kernel_matrix(x, pos, tau=1.0),
        dxfield.kernel_matrix(x, tau=1.0),
        dxfield.pairwise_distances(x, pos),
        dxfield.pairwise_distances(x),
    ]
    for out in outs:
        assert namespace_of(out) == xp.__name__
        assert out.dtype == np.float32


@pytest.mark.gpu
def test_cupy_input_gives_cupy_output_on_the_same_device(pts):
    import cupy

    x, pos, neg = pts
    with cupy.cuda.Device(0):
        cx, cpos, cneg = (cupy.asarray(a) for a in pts)
    v = dxfield.drift_field(cx, cpos, cneg, include_self=True, neg_weight=2.0)
    assert isinstance(v, cupy.ndarray) and v.device.id == cx.device.id
    assert rel_err(v, dxfield.drift_field(x, pos, neg, include_self=True, neg_weight=2.0,
                                          backend="numpy")) <= 1e-5


@pytest.mark.gpu
def test_explicit_backend_moves_work_but_results_follow_the_input(pts):
    import cupy

    x, pos, _ = pts
    on_gpu = dxfield.drift_field(x, pos, backend="cupy")
    assert isinstance(on_gpu, np.ndarray)  # computed on the GPU, returned to the CPU input's side
    on_cpu = dxfield.drift_field(cupy.asarray(x), cupy.asarray(pos), backend="numpy")
    assert isinstance(on_cpu, cupy.ndarray)
    assert rel_err(on_gpu, dxfield.drift_field(x, pos, backend="numpy")) <= 1e-5
    assert rel_err(on_cpu, to_numpy(on_gpu)) <= 1e-5


@pytest.mark.gpu
def test_mixing_host_and_device_inputs_is_an_error_naming_them(pts):
    import cupy

    x, pos, _ = pts
    with pytest.raises(ValueError, match="pos"):
        dxfield.drift_field(cupy.asarray(x), pos)


@pytest.mark.gpu
def test_torch_cuda_tensor_is_taken_zero_copy_into_cupy(torch):
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    import cupy

    t = torch.arange(12, dtype=torch.float32, device="cuda").reshape(3, 4)
    a = backend.ingest(t, "x")
    assert isinstance(a, cupy.ndarray)
    assert a.data.ptr == t.data_ptr()
    v = dxfield.drift_field(t, t + 1.0)
    assert isinstance(v, cupy.ndarray)
