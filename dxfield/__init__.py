"""dxfield: drifting fields on NumPy (CPU) and CuPy (GPU), no torch required.

Rooms of the library (the design, math and formats: ``docs/design.md``):

* :mod:`dxfield.kernels` -- Laplace and Gaussian kernels, pairwise distances,
  blockwise exact kernel sums (:func:`kernel_matvec`);
* :mod:`dxfield.field` -- the exact drifting field (:func:`drift_field`),
  bidirectional (Algorithm 2 of the drifting paper) or row-normalised, run by
  :mod:`dxfield.sweep` in tiles under a memory budget (:mod:`dxfield.memory`),
  its streamed sums in :mod:`dxfield.sums`;
* :mod:`dxfield.nystrom`, :mod:`dxfield.landmarks` -- Nystrom feature maps and
  landmark selection;
* :mod:`dxfield.projected` -- the projected field (:class:`ProjectedField`):
  :mod:`dxfield.summaries` of the whole data set (cached by
  :mod:`dxfield.cache`), estimators in :mod:`dxfield.attraction`,
  :mod:`dxfield.repulsion` and :mod:`dxfield.estimators`;
* :mod:`dxfield.engine` -- composed array operations or fused CUDA kernels
  (:mod:`dxfield.fused`);
* backends -- every function takes NumPy, CuPy or DLPack arrays (torch tensors
  zero-copy) and answers in the input's namespace and device
  (:mod:`dxfield.backend`).

Example
-------
>>> import numpy as np, dxfield
>>> x = np.random.default_rng(0).normal(size=(128, 8)).astype(np.float32)
>>> y = np.random.default_rng(1).normal(size=(512, 8)).astype(np.float32) + 1
>>> dxfield.drift_field(x, y).shape
(128, 8)
"""

from .backend import BACKEND_ENV, BACKENDS, cupy_available
from .backend import cupy_available as cuda_available
from .engine import ENGINE_ENV, ENGINES
from .memory import BUDGET_ENV, DEFAULT_BUDGET
from .field import DEFAULT_TEMPERATURES, NORMALIZATIONS, drift_field
from .kernels import KERNELS, kernel_matrix, kernel_matvec, pairwise_distances
from .nystrom import Nystrom, NystromConditioningWarning
from . import landmarks
from .inputs import LoneQueryWarning
from .projected import ClassesCombinedWarning, ProjectedField

__version__ = "0.1.0.dev0"

__all__ = [
    "drift_field",
    "kernel_matvec",
    "Nystrom",
    "landmarks",
    "ProjectedField",
    "NystromConditioningWarning",
    "ClassesCombinedWarning",
    "LoneQueryWarning",
    "kernel_matrix",
    "pairwise_distances",
    "cupy_available",
    "cuda_available",
    "ENGINES",
    "ENGINE_ENV",
    "KERNELS",
    "NORMALIZATIONS",
    "DEFAULT_TEMPERATURES",
    "BACKENDS",
    "BACKEND_ENV",
    "BUDGET_ENV",
    "DEFAULT_BUDGET",
]
