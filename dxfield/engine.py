"""One place that decides how a call runs: the composed path or the fused CUDA engine.

``engine="composed"`` evaluates every field with array operations (NumPy or
CuPy), one operation per step; it is the reference.  ``engine="fused"`` runs
the same math on CUDA RawKernels around cuBLAS products (:mod:`dxfield.fused`).
:func:`resolve` checks ``engine`` and ``precision`` where the inputs are and
returns the ops object that runs the fused kernels, or None for the composed
path (docs/design.md section 5).
"""

from __future__ import annotations

import os
import warnings

import numpy as np

from . import checks
from .cuda_ops import MAX_TEMPERATURES

ENGINES = ("auto", "composed", "fused")
ENGINE_ENV = "DXFIELD_ENGINE"
EXACT_PRECISIONS = ("float32", "tf32x3", "tf32")

_OPS_OVERRIDE = None  # tests: an object with the CupyOps interface that runs the kernels elsewhere
_warned: set = set()


def resolve(engine, precision, placement, dtype, n_temps: int, *, precisions=EXACT_PRECISIONS):
    """The ops object that runs the fused engine, or None for the composed path.

    Checks ``engine`` (argument, else ``$DXFIELD_ENGINE``, else ``"auto"``) and
    ``precision``; raises ValueError naming the argument when the combination
    cannot run where the inputs are.
    """
    source = "engine"
    if engine is None:
        engine = os.environ.get(ENGINE_ENV, "auto") or "auto"
        source = ENGINE_ENV
    name = checks.choice(str(engine).strip().lower(), source, ENGINES)
    precision = checks.choice(precision, "precision", precisions)
    if name == "composed":
        if precision != "float32":
            raise ValueError(f"precision={precision!r} is implemented by the fused GPU engine; "
                             "use engine='auto' or 'fused' with GPU inputs, or precision='float32'")
        return None
    emulated = _OPS_OVERRIDE is not None and name == "fused"
    if placement.device.kind != "cuda" and not emulated:
        if name == "fused":
            raise ValueError("engine='fused' runs CUDA kernels: pass GPU inputs (CuPy arrays or CUDA "
                             "tensors) or backend='cupy'; on the CPU use engine='composed' or 'auto'")
        if precision != "float32":
            raise ValueError(f"precision={precision!r} uses GPU tensor cores; on the CPU only 'float32' is available")
        return None
    why = None
    if np.dtype(dtype) != np.float32:
        why = f"it computes in float32 and the inputs are {np.dtype(dtype)}"
    elif n_temps > MAX_TEMPERATURES:
        why = f"it takes at most {MAX_TEMPERATURES} temperatures per call, got {n_temps}"
    if why is not None:
        if name == "fused" or precision != "float32":
            raise ValueError(f"engine='fused' cannot run this call: {why}; use engine='composed'")
        return None
    if emulated:
        return _OPS_OVERRIDE
    from .cuda_ops import CupyOps

    ops = CupyOps(placement.xp)
    try:
        ops.compile()
    except Exception as exc:  # NVRTC missing or failing: the composed path still works
        if name == "fused" or precision != "float32":
            raise RuntimeError(f"engine='fused': the CUDA kernels failed to compile ({exc})") from exc
        key = type(exc).__name__
        if key not in _warned:
            _warned.add(key)
            warnings.warn(f"dxfield: the fused CUDA kernels failed to compile ({exc}); using the composed "
                          "CuPy path", RuntimeWarning, stacklevel=3)
        return None
    return ops
