"""Run dxfield's CUDA kernels on the CPU: compile kernels.cu against tests/cuda_emu/emulate.h.

:func:`build` writes a C++ file that includes the emulation header and the
kernel source, with one ``emu_<kernel>`` launcher per kernel generated from
``dxfield.cuda_ops`` (the same signature table the GPU launcher uses), compiles it
with ``g++ -std=c++20`` into a shared library and returns :class:`EmuOps`, an
object with the interface of ``dxfield.cuda_ops.CupyOps`` on NumPy arrays (GEMMs
by NumPy).  Returns None when no suitable C++ compiler is found.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np

from dxfield import cuda_ops

HERE = Path(__file__).resolve().parent
_CTYPES = {"p": ctypes.c_void_p, "i": ctypes.c_int, "q": ctypes.c_longlong, "f": ctypes.c_float}


def _launcher(name: str, decls: list[str]) -> str:
    names = [re.split(r"[\s*]+", d)[-1] for d in decls]
    params = ", ".join(["unsigned gx", "unsigned gy", "unsigned bx", "unsigned by"] + decls)
    return (f'extern "C" void emu_{name}({params}) {{\n'
            f"    dx_emu_launch(dim3(gx, gy), dim3(bx, by), [=]() {{ {name}({', '.join(names)}); }});\n}}\n")


def build(tmpdir, block: int = 32):
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        return None
    src = cuda_ops.source()
    code = ['#include "emulate.h"', f"#define DX_BLOCK {block}", src]
    code += [_launcher(n, d) for n, d in cuda_ops.declarations(src).items()]
    cpp = Path(tmpdir) / "dx_emulated.cpp"
    lib = Path(tmpdir) / "libdx_emulated.so"
    cpp.write_text("\n".join(code))
    proc = subprocess.run([cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-Wall", "-Werror",
                           "-Wno-unused-function", f"-I{HERE / 'cuda_emu'}", str(cpp), "-o", str(lib)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        if "barrier" in proc.stderr and "No such file" in proc.stderr:
            return None  # a compiler without C++20 <barrier>
        raise RuntimeError(f"emulated kernels failed to compile:\n{proc.stderr[-4000:]}")
    return EmuOps(ctypes.CDLL(str(lib)), block)


def _round_mantissa(a, bits: int):
    """Round float32 to ``bits`` mantissa bits, nearest even (TF32: 10, bfloat16: 7), in NumPy."""
    drop = 23 - bits
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + ((1 << (drop - 1)) - 1) + ((u >> drop) & 1)) & (0xFFFFFFFF ^ ((1 << drop) - 1))
    return u.astype(np.uint32).view(np.float32).reshape(a.shape)


class EmuOps:
    """``CupyOps``' interface on NumPy arrays: kernels emulated on the CPU, GEMMs by NumPy."""

    xp = np

    def __init__(self, lib, block: int):
        self.lib = lib
        self.block = block
        self.launches: dict[str, int] = {}
        self.gemm_precisions: list[str] = []
        for name, sig in cuda_ops.SIGNATURES.items():
            fn = getattr(lib, f"emu_{name}")
            fn.argtypes = [ctypes.c_uint] * 4 + [_CTYPES[c] for c in sig]
            fn.restype = None

    def launch(self, name, grid, block, args):
        sig = cuda_ops.SIGNATURES[name]
        assert len(args) == len(sig), (name, len(args), len(sig))
        cast = []
        for code, a in zip(sig, args):
            if code == "p":
                if a is None:
                    cast.append(None)
                else:
                    assert isinstance(a, np.ndarray) and (a.ndim <= 1 or a.flags.c_contiguous or a.strides[-1] == a.itemsize), name
                    cast.append(a.ctypes.data)
            else:
                cast.append(a)
        grid = tuple(grid) + (1,) * (2 - len(grid))
        block = tuple(block) + (1,) * (2 - len(block))
        self.launches[name] = self.launches.get(name, 0) + 1
        getattr(self.lib, f"emu_{name}")(grid[0], grid[1], block[0], block[1], *cast)

    def gemm(self, a, b, out, *, trans_b=False, beta=0.0, precision="float32"):
        """NumPy GEMM; "tf32"/"bf16" round the inputs to 10/7 mantissa bits like the tensor cores,
        "tf32x3" goes through dxfield's split (emulated kernel) and two-part TF32 products."""
        if precision == "tf32x3":
            return cuda_ops.split_gemm(self, a, b, out, trans_b=trans_b, beta=beta)
        self.gemm_precisions.append(precision)
        if precision in ("tf32", "bf16"):
            bits = 10 if precision == "tf32" else 7
            a, b = _round_mantissa(a, bits), _round_mantissa(b, bits)
        prod = a @ (b.T if trans_b else b)  # float32 accumulation, as on the GPU
        if beta == 0.0:
            out[...] = prod
        else:
            out *= np.float32(beta)
            out += prod
