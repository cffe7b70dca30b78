"""dxtrain: PyTorch training of one-step drifting generators on top of dxfield.

Rooms: :mod:`dxtrain.data` (embedded and user data sets), :mod:`dxtrain.models`
(generators, their samples, EMA), :mod:`dxtrain.features` (feature groups,
frozen encoders), :mod:`dxtrain.fields` (exact and projected fields through
DLPack), :mod:`dxtrain.train` (configuration, set-up and the loop),
:mod:`dxtrain.rundir` (the run folder's files: config, metrics, checkpoint,
sample pictures, eval), :mod:`dxtrain.lock` (one run at a time per run folder), :mod:`dxtrain.ddp` (multi-process runs under torchrun),
:mod:`dxtrain.evaluate` (metrics), :mod:`dxtrain.pictures` (PNG pictures) and
:mod:`dxtrain.cli` (the ``dxtrain`` command).
"""

import os as _os

# Every step alternates torch (generator) and NumPy/OpenBLAS (the field) on the
# same cores.  Both thread pools busy-wait after a parallel region by default,
# so each steals the cores the other needs: measured 2-3x slower steps on 2
# CPU cores.  Sleep-waiting pools fix that; set the variables yourself to override.
# (Effective only when dxtrain is imported before torch and NumPy, as the CLI does.)
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

__version__ = "0.1.0.dev0"
