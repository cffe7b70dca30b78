"""Array backends: NumPy on the CPU, CuPy on CUDA GPUs, one code path.

"Everything follows the input": a NumPy array, a CuPy array or any DLPack
producer (a torch CPU or CUDA tensor, a JAX array, ...) is taken zero-copy,
the computation runs in the matching namespace, and results come back as
NumPy (CPU inputs) or CuPy (GPU inputs) arrays on the input's device.

The computing backend can also be chosen explicitly, with a ``backend=``
argument or the ``DXFIELD_BACKEND`` environment variable (``auto``, ``numpy``
or ``cupy``).  Choosing ``cupy`` for CPU inputs copies them to the current GPU
and the results back; choosing ``numpy`` for GPU inputs does the opposite.

This module never imports torch; CuPy is imported lazily, only when an input
lives on a GPU or CuPy is asked for.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

BACKENDS = ("auto", "numpy", "cupy")
BACKEND_ENV = "DXFIELD_BACKEND"

# DLPack device types (dlpack.h, DLDeviceType).
_DL_CPU = 1
_DL_CUDA = 2
_DL_CUDA_HOST = 3
_DL_CUDA_MANAGED = 13
_DL_GPU_TYPES = (_DL_CUDA, _DL_CUDA_MANAGED)


@dataclass(frozen=True)
class Device:
    """Where an array lives: ``kind`` is ``"cpu"`` or ``"cuda"``, ``index`` the GPU."""

    kind: str
    index: int = 0

    def __str__(self) -> str:
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"


CPU = Device("cpu")


def _import_cupy():
    """CuPy, or None when it is not installed or cannot load its CUDA libraries."""
    try:
        import cupy
    except Exception:  # ImportError, or a CuPy wheel that does not match the driver
        return None
    return cupy


def cupy_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    cupy = _import_cupy()
    if cupy is None:
        return False
    try:
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def require_cupy():
    """Return the CuPy module, or raise a RuntimeError that says what is missing."""
    cupy = _import_cupy()
    if cupy is None:
        raise RuntimeError(
            "the CuPy backend was asked for but CuPy is not installed (or fails to "
            "import); install a CuPy wheel matching your CUDA (e.g. "
            "`pip install 'driftxpress[gpu]'` for cupy-cuda12x, or cupy-cuda13x), "
            f"or use backend='numpy' / {BACKEND_ENV}=numpy"
        )
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # no driver, no device
        raise RuntimeError(
            f"the CuPy backend was asked for but no CUDA GPU is usable ({exc}); "
            f"use backend='numpy' / {BACKEND_ENV}=numpy"
        ) from None
    if count < 1:
        raise RuntimeError(
            "the CuPy backend was asked for but no CUDA GPU is visible; "
            f"use backend='numpy' / {BACKEND_ENV}=numpy"
        )
    return cupy


def resolve_backend(backend: str | None = None) -> str:
    """The backend name asked for: the argument, else ``$DXFIELD_BACKEND``, else ``auto``."""
    source = "backend"
    if backend is None:
        backend = os.environ.get(BACKEND_ENV, "auto") or "auto"
        source = BACKEND_ENV
    name = str(backend).strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"{source}={backend!r} is not a backend; valid: {', '.join(BACKENDS)}")
    return name


def _is_cupy_array(a: Any) -> bool:
    return type(a).__module__.split(".")[0] == "cupy" and hasattr(a, "device")


def device_of(a: Any) -> Device:
    """The device of a NumPy or CuPy array."""
    if isinstance(a, np.ndarray):
        return CPU
    if _is_cupy_array(a):
        return Device("cuda", int(a.device.id))
    raise TypeError(f"not a NumPy or CuPy array: {type(a).__name__}")


def to_host(a: Any) -> np.ndarray:
    """A NumPy array with the contents of ``a`` (copied from the GPU for CuPy arrays)."""
    return a.get() if _is_cupy_array(a) else np.asarray(a)


def array_namespace(*arrays: Any):
    """``numpy`` or ``cupy``: the namespace of the given (already ingested) arrays."""
    for a in arrays:
        if a is not None and _is_cupy_array(a):
            return _import_cupy()
    return np


def _torch_like_fixups(a: Any, name: str) -> Any:
    """Duck-typed preparation of a DLPack producer that torch would refuse to export."""
    if getattr(a, "requires_grad", False) and hasattr(a, "detach"):
        a = a.detach()  # the field is never differentiated through
    dtype = str(getattr(a, "dtype", ""))
    if dtype.endswith("bfloat16") and hasattr(a, "float"):
        a = a.float()  # neither NumPy nor CuPy has bfloat16; upcast is the documented rule
    return a


def ingest(a: Any, name: str) -> Any:
    """Take ``a`` as a NumPy or CuPy array without copying when that is possible.

    NumPy and CuPy arrays pass through; DLPack producers (torch, JAX, ...) are
    wrapped zero-copy; anything else goes through ``numpy.asarray``.
    """
    if a is None:
        return None
    if isinstance(a, np.ndarray) or _is_cupy_array(a):
        return a
    if hasattr(a, "__dlpack__") and hasattr(a, "__dlpack_device__"):
        a = _torch_like_fixups(a, name)
        dev_type, dev_id = a.__dlpack_device__()
        dev_type = int(dev_type)
        if dev_type in (_DL_CPU, _DL_CUDA_HOST):
            try:
                return np.from_dlpack(a)
            except (TypeError, BufferError, RuntimeError) as exc:
                raise TypeError(f"{name}: cannot take this {type(a).__name__} through DLPack ({exc})") from None
        if dev_type in _DL_GPU_TYPES:
            cupy = _import_cupy()
            if cupy is None:
                raise RuntimeError(
                    f"{name} lives on a CUDA device but CuPy is not installed; install a "
                    "CuPy wheel (`pip install 'driftxpress[gpu]'`) or move the tensor to the CPU"
                )
            with cupy.cuda.Device(int(dev_id)):
                return cupy.from_dlpack(a)
        raise TypeError(f"{name}: DLPack device type {dev_type} is not supported (CPU and CUDA are)")
    if type(a).__module__.split(".")[0] == "torch":  # very old torch without __dlpack__
        raise TypeError(f"{name}: this torch version does not export DLPack; upgrade torch")
    try:
        return np.asarray(a)
    except Exception as exc:
        raise TypeError(f"{name} must be an array (NumPy, CuPy or DLPack-capable), got {type(a).__name__}") from exc


@dataclass(frozen=True)
class Placement:
    """Where a call computes (``xp``, ``device``) and where its results go (``origin``)."""

    xp: Any
    device: Device
    origin: Device

    def to_origin(self, a: Any) -> Any:
        """Move a result computed here to the namespace/device the inputs came from."""
        if a is None or self.device == self.origin:
            return a
        if self.origin.kind == "cpu":
            return to_host(a)
        cupy = require_cupy()
        with cupy.cuda.Device(self.origin.index):
            return cupy.asarray(a)

    def asarray(self, a: Any) -> Any:
        """An ingested input moved (if needed) to the computing device."""
        if a is None:
            return None
        if self.device.kind == "cpu":
            return to_host(a)
        cupy = self.xp
        with cupy.cuda.Device(self.device.index):
            return cupy.asarray(a)


def place(arrays: dict[str, Any], backend: str | None = None) -> tuple[Placement, dict[str, Any]]:
    """Ingest named inputs, check they share a device, and move them where the work runs.

    Returns the placement and the inputs as arrays of its namespace (``None``
    entries stay ``None``).  Raises ``ValueError`` naming the arguments when
    inputs live on different devices.
    """
    name = resolve_backend(backend)
    ingested = {k: ingest(v, k) for k, v in arrays.items()}
    devices = {k: device_of(v) for k, v in ingested.items() if v is not None}
    distinct = set(devices.values())
    if len(distinct) > 1:
        where = ", ".join(f"{k} on {d}" for k, d in devices.items())
        raise ValueError(f"inputs are on different devices ({where}); put them on one device")
    origin = distinct.pop() if distinct else CPU
    if name == "numpy" or (name == "auto" and origin.kind == "cpu"):
        device, xp = CPU, np
    else:
        xp = require_cupy()
        device = origin if origin.kind == "cuda" else Device("cuda", int(xp.cuda.runtime.getDevice()))
    placement = Placement(xp=xp, device=device, origin=origin)
    return placement, {k: placement.asarray(v) for k, v in ingested.items()}


def placement_of(xp, a: Any) -> Placement:
    """The placement of a computation that stays where the (ingested) array ``a`` lives."""
    dev = device_of(a)
    return Placement(xp=xp, device=dev, origin=dev)


def floating_dtype(xp, *arrays: Any):
    """float64 when any input is float64, else float32 (half precision is upcast)."""
    for a in arrays:
        if a is not None and a.dtype == xp.float64:
            return xp.dtype(xp.float64)
    return xp.dtype(xp.float32)


def device_context(placement: Placement):
    """A context manager that makes the placement's GPU current (no-op on the CPU)."""
    if placement.device.kind == "cuda":
        return placement.xp.cuda.Device(placement.device.index)
    from contextlib import nullcontext

    return nullcontext()
