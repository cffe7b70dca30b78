"""Data-parallel training under ``torchrun``: the process group, all-reduce helpers, the shared stop.

This module owns everything that differs between one process and several:
:class:`Dist` (this process's rank, the process group's set-up and teardown,
the all-reduces the loop needs), :func:`rank_seed` (each rank's random
streams), :func:`stop_signals` (SIGINT/SIGTERM as a stop request that the
ranks agree on) and :func:`write_weights_hash` (a test hook).

Launched by ``torchrun`` (``WORLD_SIZE > 1`` in the environment), e.g.
``torchrun --nproc-per-node 2 -m dxtrain train ...``, the loop runs
data-parallel: one process per rank (gloo on the CPU, NCCL on CUDA, rank
``LOCAL_RANK``'s GPU), identical initial weights, each rank drawing its own
noise and positives (streams seeded from seed and rank), gradients all-reduced
by ``DistributedDataParallel``.  ``batch`` is per rank: the global batch is
``batch x world size``.  Projected-field summaries are built with each rank
summarising a shard of the real rows (``rank::world_size``) on landmarks chosen
identically from all the data, then all-reduced.  Only rank 0 writes the run
folder (config, metrics, samples, checkpoints, summaries, eval); the logged
loss and drift norm are averages over the ranks.  All ranks stop at the same
step (signals and the time budget are agreed every step).  Resuming under DDP
restores weights, optimiser, EMA, step and rank 0's random streams; the other
ranks re-derive theirs from (seed, rank, step), so exact resume is guaranteed
only for single-process runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal

import numpy as np
import torch

from .rundir import write_json

DEBUG_DIR_ENV = "DXTRAIN_DEBUG_DIR"  # tests: each rank writes a hash of its final weights there


class Dist:
    """This process's place in a torchrun launch (``WORLD_SIZE > 1``), or a single process."""

    def __init__(self):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
        self.rank = int(os.environ.get("RANK", "0") or 0) if self.world_size > 1 else 0
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0) if self.world_size > 1 else 0
        self.enabled = self.world_size > 1
        self.owned = False  # True when we initialised the process group (and so destroy it)
        self.comm = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def init(self, device: torch.device) -> torch.device:
        """Initialise the process group; returns this rank's device (``cuda:LOCAL_RANK`` on CUDA)."""
        if not self.enabled:
            return device
        import torch.distributed as dist

        if not dist.is_available():
            raise ValueError("WORLD_SIZE > 1 but this torch has no torch.distributed")
        if device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            self.owned = True
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.comm = device if device.type == "cuda" else torch.device("cpu")
        return device

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """What the step calls: ``model`` itself, or under DDP its ``DistributedDataParallel`` wrapper."""
        if not self.enabled:
            return model
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    def allreduce_numpy(self, a: np.ndarray) -> np.ndarray:
        """Sum of a float64 array over the ranks (the same result on every rank)."""
        import torch.distributed as dist

        t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)).to(self.comm)
        dist.all_reduce(t)
        return t.cpu().numpy()

    def agree(self, *flags: bool) -> list[bool]:
        """Each flag OR-ed over the ranks (an all-reduce MAX), so every rank takes the same branch."""
        if not self.enabled:
            return [bool(f) for f in flags]
        import torch.distributed as dist

        t = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int32, device=self.comm)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def mean(self, *values: float) -> list[float]:
        """Each value averaged over the ranks."""
        if not self.enabled:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.comm)
        dist.all_reduce(t)
        return [v / self.world_size for v in t.tolist()]

    def close(self, sync: bool = True) -> None:
        """Destroy the process group this object created.  ``sync`` (a finished run, every rank
        at the same step): first wait until every rank is here, since a rank that tears down
        while its peer still talks to it can abort inside gloo ("terminate called without an
        active exception", seen once in CI at the end of a finished run)."""
        if self.owned:
            import torch.distributed as dist

            if dist.is_initialized():
                try:
                    if sync:
                        dist.barrier()
                finally:
                    dist.destroy_process_group()
            self.owned = False


@contextlib.contextmanager
def process_group():
    """A :class:`Dist` for the block; its process group is torn down when the block ends."""
    dist = Dist()
    try:
        yield dist
    except BaseException:
        dist.close(sync=False)  # a failed rank must not wait for peers that may never come
        raise
    dist.close(sync=True)


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """Seed of a rank's random streams: ``seed`` itself for a fresh single-process (or rank 0) run."""
    if rank == 0 and step == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed) & (2 ** 63 - 1), rank, step]).generate_state(1, np.uint64)[0]
               % (2 ** 62))


class _Stop:  # made by stop_signals(); tests recognise the installed handler by this class name
    """SIGINT/SIGTERM ask the loop to checkpoint and stop after the current step."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:  # second signal: give up immediately
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def stop_signals() -> _Stop:
    """A context manager whose ``requested`` turns True at SIGINT/SIGTERM (a second signal raises
    ``KeyboardInterrupt``); the previous handlers come back when it exits.  Under DDP the loop
    agrees on it over the ranks (:meth:`Dist.agree`), so no rank stops inside a collective."""
    return _Stop()


def write_weights_hash(model: torch.nn.Module, rank: int, step: int) -> None:
    """With ``$DXTRAIN_DEBUG_DIR`` set (tests): write ``rank<R>.json``, a hash of this rank's final weights."""
    folder = os.environ.get(DEBUG_DIR_ENV)
    if not folder:
        return
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    os.makedirs(folder, exist_ok=True)
    write_json(os.path.join(folder, f"rank{rank}.json"), {"rank": rank, "step": step, "sha256": h.hexdigest()})
