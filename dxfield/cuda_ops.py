"""CUDA plumbing for the fused engine: the kernel source, its launch table, cuBLAS GEMMs.

The kernels live in ``dxfield/cuda/kernels.cu`` and are compiled at run time by
NVRTC through :class:`cupy.RawModule` (CuPy caches the binary on disk, so the
compile happens once per machine and CUDA version).  Nothing here imports CuPy
at module import time: :class:`CupyOps` is built lazily when a GPU call asks
for the fused engine.

:data:`SIGNATURES` lists every kernel's parameters (``p`` pointer, ``i``
int32, ``q`` int64, ``f`` float32).  It is the single place the Python side
describes the kernels; the GPU launcher casts its arguments with it and the
CPU emulator used by the tests (``tests/cuda_emu``) builds its ``ctypes``
prototypes from it.

Precision (``precision=``): the GEMMs run through ``cublasGemmEx`` with compute
type ``CUBLAS_COMPUTE_32F`` (``"float32"``, the default), ``..._FAST_TF32``
(``"tf32"``) or ``..._FAST_16BF`` (``"bf16"``, inputs rounded to bfloat16 inside
cuBLAS, float32 accumulation).  ``"tf32x3"`` splits each operand into two TF32
parts (``dx_split_tf32``) and takes ``a_hi b_hi + a_hi b_lo + a_lo b_hi`` as ONE
TF32 product over a three times longer inner dimension: float32-level accuracy
(about 21 bits) on the tensor cores, at three times the TF32 work.  The
RawKernels always compute in float32.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

SOURCE_PATH = Path(__file__).with_name("cuda") / "kernels.cu"
BLOCK = 256  # DX_BLOCK in the source: threads per block of the row kernels
COL_BLOCK = (32, 8)  # DX_COL_X, DX_COL_Y
MAX_TEMPERATURES = 8  # DX_MAX_TEMPS
MAX_GRID = 4096  # blocks of the grid-stride kernels
NVRTC_OPTIONS = ("--std=c++14",)
PRECISIONS = ("float32", "tf32x3", "tf32", "bf16")


def declarations(text: str) -> dict[str, list[str]]:
    """``{kernel: [parameter declarations]}`` from the ``extern "C" __global__`` definitions
    of the source, parameter-list macros (``#define NAME_PARAMS ...``) expanded."""
    import re

    joined = text.replace("\\\n", " ")
    macros = dict(re.findall(r"^#define\s+(\w+_PARAMS)\s+(.*)$", joined, flags=re.M))
    out = {}
    for name, params in re.findall(r'extern "C" __global__ void (\w+)\(([^)]*)\)', joined):
        decls = []
        for raw in params.split(","):
            raw = raw.strip()
            decls.extend(p.strip() for p in macros.get(raw, raw).split(","))
        out[name] = [" ".join(d.replace("*", " * ").split()) for d in decls if d.strip()]
    return out


def _code(decl: str) -> str:
    """Argument code of one declaration: ``p`` pointer, ``i`` int, ``q`` long long, ``f`` float."""
    if "*" in decl:
        return "p"
    for prefix, code in (("long long", "q"), ("int", "i"), ("float", "f")):
        if decl.startswith(prefix):
            return code
    raise ValueError(f"kernels.cu: parameter type of {decl!r} is not one dxfield launches")


SIGNATURES = {name: "".join(_code(d) for d in decls)
              for name, decls in declarations(SOURCE_PATH.read_text()).items()}


def source() -> str:
    """The CUDA C++ source of every kernel."""
    return SOURCE_PATH.read_text()


def _scalar(code: str, value):
    if code == "i":
        return np.int32(value)
    if code == "q":
        return np.int64(value)
    if code == "f":
        return np.float32(value)
    raise ValueError(f"unknown argument code {code!r}")


class CupyOps:
    """Launch the kernels and run GEMMs on the current CuPy device and stream."""

    _lock = threading.Lock()
    _modules: dict = {}

    block = BLOCK  # threads per block of the 1-D kernels (DX_BLOCK of the build)

    def __init__(self, cupy):
        self.xp = cupy
        self.cupy = cupy

    # -- kernels ---------------------------------------------------------------------
    def _module(self):
        dev = int(self.cupy.cuda.runtime.getDevice())
        with self._lock:
            mod = self._modules.get(dev)
            if mod is None:
                mod = self.cupy.RawModule(code=source(), options=NVRTC_OPTIONS)
                self._modules[dev] = mod
        return mod

    def compile(self) -> None:
        """Compile (or load from CuPy's cache) every kernel now; raises on NVRTC errors."""
        mod = self._module()
        for name in SIGNATURES:
            mod.get_function(name)

    def launch(self, name: str, grid, block, args) -> None:
        sig = SIGNATURES[name]
        if len(args) != len(sig):
            raise TypeError(f"{name} takes {len(sig)} arguments, got {len(args)}")
        cast = []
        for code, a in zip(sig, args):
            if code == "p":
                if a is None:
                    cast.append(np.uint64(0))
                else:
                    if not isinstance(a, self.cupy.ndarray):
                        raise TypeError(f"{name}: pointer argument must be a CuPy array, got {type(a).__name__}")
                    cast.append(a)
            else:
                cast.append(_scalar(code, a))
        self._module().get_function(name)(tuple(int(g) for g in grid), tuple(int(b) for b in block), tuple(cast))

    # -- GEMM ------------------------------------------------------------------------
    def gemm(self, a, b, out, *, trans_b: bool = False, beta: float = 0.0, precision: str = "float32") -> None:
        """``out = a @ (b.T if trans_b else b) + beta * out`` for float32 row-major matrices.

        Rows may be strided (views of row ranges); columns must be contiguous.
        """
        if precision == "tf32x3":
            return split_gemm(self, a, b, out, trans_b=trans_b, beta=beta)
        from cupy_backends.cuda.api import runtime
        from cupy_backends.cuda.libs import cublas

        compute = {"float32": cublas.CUBLAS_COMPUTE_32F,
                   "tf32": cublas.CUBLAS_COMPUTE_32F_FAST_TF32,
                   "bf16": cublas.CUBLAS_COMPUTE_32F_FAST_16BF}[precision]
        n, k = a.shape
        p = b.shape[0] if trans_b else b.shape[1]
        if (b.shape[1] if trans_b else b.shape[0]) != k or out.shape != (n, p):
            raise ValueError(f"gemm: shapes {a.shape} x {b.shape}{'^T' if trans_b else ''} -> {out.shape}")
        for name, arr in (("a", a), ("b", b), ("out", out)):
            if arr.dtype != np.float32 or arr.strides[1] != 4 or arr.strides[0] % 4:
                raise ValueError(f"gemm: {name} must be float32 with contiguous rows")
        if n == 0 or p == 0:
            return
        lda, ldb, ldc = a.strides[0] // 4, b.strides[0] // 4, out.strides[0] // 4
        # Row-major C (n x p) is column-major C^T (p x n) = op(B)^T A^T in cuBLAS terms.
        alpha_h = np.array(1.0, dtype=np.float32)
        beta_h = np.array(beta, dtype=np.float32)
        handle = self.cupy.cuda.device.get_cublas_handle()
        cublas.gemmEx(handle, cublas.CUBLAS_OP_T if trans_b else cublas.CUBLAS_OP_N, cublas.CUBLAS_OP_N,
                      p, n, k, alpha_h.ctypes.data, b.data.ptr, runtime.CUDA_R_32F, ldb,
                      a.data.ptr, runtime.CUDA_R_32F, lda, beta_h.ctypes.data,
                      out.data.ptr, runtime.CUDA_R_32F, ldc, compute, cublas.CUBLAS_GEMM_DEFAULT)


def split_gemm(ops, a, b, out, *, trans_b: bool = False, beta: float = 0.0) -> None:
    """``precision="tf32x3"``: ``[a_hi a_hi a_lo] @ [b_hi; b_lo; b_hi]`` as one TF32 GEMM.

    The split operands are three times the size of ``a`` and ``b`` (work space).
    """
    xp = ops.xp
    n, k = a.shape
    a3 = xp.empty((n, 3 * k), dtype=np.float32)
    _split(ops, a, a3, axis=1, which=(0, 0, 1))
    if trans_b:  # b is (p, k): its parts side by side, [b_hi b_lo b_hi]
        b3 = xp.empty((b.shape[0], 3 * k), dtype=np.float32)
        _split(ops, b, b3, axis=1, which=(0, 1, 0))
    else:  # b is (k, p): its parts stacked, [b_hi; b_lo; b_hi]
        b3 = xp.empty((3 * k, b.shape[1]), dtype=np.float32)
        _split(ops, b, b3, axis=0, which=(0, 1, 0))
    ops.gemm(a3, b3, out, trans_b=trans_b, beta=beta, precision="tf32")


def grid_1d(total: int, block: int) -> int:
    """Blocks of a grid-stride kernel over ``total`` entries (at most MAX_GRID)."""
    return max(1, min(MAX_GRID, -(-total // block)))


def _split(ops, src, dst, *, axis: int, which) -> None:
    rows, cols = src.shape
    ops.launch("dx_split_tf32", (grid_1d(rows * cols, ops.block),), (ops.block,),
               [src, rows, cols, src.strides[0] // 4, dst, dst.strides[0] // 4, axis, *which])


def nvcc_compile(path_out: str, arch: str = "sm_80", nvcc: str = "nvcc") -> None:
    """Compile the source with ``nvcc`` to a cubin (a build check for machines without a GPU)."""
    import subprocess

    subprocess.run([nvcc, f"-arch={arch}", "-cubin", "-std=c++14", "-Werror", "all-warnings",
                    "-x", "cu", str(SOURCE_PATH), "-o", path_out], check=True, capture_output=True, text=True)


def _nvrtc_library():
    """``ctypes.CDLL`` of NVRTC, or None: ``$DXFIELD_NVRTC``, the NVIDIA pip wheels, CUDA_HOME, the loader."""
    import ctypes
    import ctypes.util
    import glob
    import os
    import site
    import sys

    candidates = []
    if os.environ.get("DXFIELD_NVRTC"):
        candidates.append(os.environ["DXFIELD_NVRTC"])
    roots = list(site.getsitepackages()) + [site.getusersitepackages()] + sys.path
    for root in roots:
        for sub in ("nvidia/cu13/lib", "nvidia/cuda_nvrtc/lib", "nvidia/cu12/lib"):
            candidates += sorted(glob.glob(os.path.join(root, sub, "libnvrtc.so.*")))
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates += sorted(glob.glob(os.path.join(home, "lib64", "libnvrtc.so*")))
    found = ctypes.util.find_library("nvrtc")
    if found:
        candidates.append(found)
    for path in candidates:
        if ".alt." in os.path.basename(path):
            continue
        folder = os.path.dirname(path)
        try:
            # NVRTC dlopens its builtins by soname; load them first from the same folder.
            for builtins in sorted(glob.glob(os.path.join(folder, "libnvrtc-builtins.so*"))):
                if ".alt." not in builtins:
                    ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


def nvrtc_compile(arch: str = "compute_80") -> bool:
    """Compile the source with NVRTC exactly as CuPy would (no host headers); False when
    NVRTC is not installed, RuntimeError with the compiler log when the source fails."""
    import ctypes

    lib = _nvrtc_library()
    if lib is None:
        return False
    prog = ctypes.c_void_p()
    status = lib.nvrtcCreateProgram(ctypes.byref(prog), source().encode(), b"kernels.cu", 0, None, None)
    if status != 0:
        raise RuntimeError(f"nvrtcCreateProgram failed with status {status}")
    try:
        opts = [f"--gpu-architecture={arch}".encode()] + [o.encode() for o in NVRTC_OPTIONS]
        status = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(max(1, size.value))
        lib.nvrtcGetProgramLog(prog, log)
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
    if status != 0:
        raise RuntimeError(f"NVRTC failed to compile dxfield/cuda/kernels.cu for {arch}:\n"
                           f"{log.value.decode(errors='replace')}")
    return True
