"""Measurement helpers shared by the benchmarks: isolated workers, peak RSS, atomic JSON.

Each method under test lives in its own spawned process (:class:`Worker`):

* its thread pools never compete with another library's (torch's OpenMP pool
  and NumPy's OpenBLAS pool both spin-wait after a call; on a 2-core machine a
  torch call right after a NumPy call, or the reverse, can take 2-3x longer);
* its first full call runs on a clean heap, so the peak resident memory of that
  call is the method's own (:func:`peak_extra_rss`);
* the parent can interleave timed calls of several methods (round robin), so a
  slow spell of a shared or throttled machine hits all methods alike.

Peak RSS: Linux keeps the resident high-water mark in ``VmHWM`` of
``/proc/self/status``; writing ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0)
resets it to the current RSS.  The baseline is taken after ``gc.collect()`` and
``malloc_trim(0)`` (which hands freed heap pages back to the OS), so memory the
set-up freed cannot be reused by the measured call without showing up.  If
``clear_refs`` cannot be written, a thread samples ``VmRSS`` every millisecond
instead (it can miss peaks shorter than that).

On a GPU (``device="cuda"``) the peak is the device memory the call takes above
what was in use before it (inputs included in the baseline), read from the
allocators: ``torch.cuda.max_memory_allocated`` for torch, and for CuPy a
tracking allocator around the default memory pool that records the pool's
high-water mark of bytes in use (:class:`CupyPeak`).  Memory that does not
come from these allocators (cuBLAS workspaces, loaded kernels, the CUDA
context) is not counted.  Timed calls are synchronised before and after.
"""

from __future__ import annotations

import gc
import json
import multiprocessing as mp
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

MiB = 2 ** 20


# --------------------------------------------------------------------------------------
# resident memory
# --------------------------------------------------------------------------------------
def status_kib(*keys) -> dict:
    """Fields of /proc/self/status in KiB, e.g. ``status_kib("VmRSS", "VmHWM")``."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, rest = line.partition(":")
            if k in keys:
                out[k] = int(rest.split()[0])
    return out


def malloc_trim() -> None:
    """Give freed heap memory back to the OS (glibc); no-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:
        pass


def reset_hwm() -> bool:
    """Reset VmHWM to the current RSS; True if the kernel took it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        s = status_kib("VmHWM", "VmRSS")
    except OSError:
        return False
    return s["VmHWM"] <= s["VmRSS"] + 1024  # within 1 MiB of the current RSS


class RssSampler:
    """Fallback: sample VmRSS every ``period`` seconds from a thread (misses shorter peaks)."""

    def __init__(self, period: float = 1e-3):
        self.period, self.peak_kib = period, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        page_kib = os.sysconf("SC_PAGE_SIZE") // 1024
        with open("/proc/self/statm") as f:
            while not self._stop.is_set():
                f.seek(0)
                self.peak_kib = max(self.peak_kib, int(f.read().split()[1]) * page_kib)
                time.sleep(self.period)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def peak_extra_rss(fn):
    """Run ``fn()`` once; return ``(result, info)`` with the peak RSS above the baseline."""
    gc.collect()
    malloc_trim()
    if reset_hwm():
        base = status_kib("VmRSS")["VmRSS"]
        out = fn()
        peak = status_kib("VmHWM")["VmHWM"]
        how = "VmHWM after clear_refs=5"
    else:
        base = status_kib("VmRSS")["VmRSS"]
        with RssSampler() as s:
            out = fn()
        peak = max(s.peak_kib, base)
        how = "VmRSS sampled every 1 ms (clear_refs unavailable)"
    return out, {"mechanism": how, "baseline_rss_mib": base / 1024, "peak_rss_mib": peak / 1024,
                 "extra_mib": (peak - base) / 1024}


# --------------------------------------------------------------------------------------
# GPU: synchronisation, device memory
# --------------------------------------------------------------------------------------
def cuda_sync() -> None:
    """Wait for the GPU work of the libraries this process has used (torch, CuPy)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    cupy = sys.modules.get("cupy")
    if cupy is not None:
        cupy.cuda.runtime.deviceSynchronize()


def _no_sync() -> None:
    pass


def synchronizer(device: str):
    """The function that makes a call's work finished when it returns: :func:`cuda_sync` or a no-op."""
    return cuda_sync if device == "cuda" else _no_sync


class CupyPeak:
    """CuPy allocator: a memory pool's ``malloc``, recording the pool's high-water mark of bytes in use.

    Bytes in use only grow in ``malloc``, so reading ``used_bytes()`` right after
    each allocation sees every peak.  Install with
    ``cupy.cuda.set_allocator(CupyPeak(cupy.get_default_memory_pool()).malloc)``.
    """

    def __init__(self, pool):
        self.pool = pool
        self.peak = pool.used_bytes()

    def malloc(self, size):
        mem = self.pool.malloc(size)
        used = self.pool.used_bytes()
        if used > self.peak:
            self.peak = used
        return mem


def _torch_cuda():
    torch = sys.modules.get("torch")
    return torch if torch is not None and torch.cuda.is_initialized() else None


def device_bytes_in_use() -> int:
    """Device bytes held by live torch tensors and live CuPy arrays (default pool) in this process."""
    n = 0
    torch = _torch_cuda()
    if torch is not None:
        n += torch.cuda.memory_allocated()
    cupy = sys.modules.get("cupy")
    if cupy is not None:
        n += cupy.get_default_memory_pool().used_bytes()
    return n


def memory_in_use_mib(device: str) -> float:
    """What a set-up step is charged with: resident memory on the CPU, allocator bytes in use on a GPU."""
    if device == "cuda":
        cuda_sync()
        return device_bytes_in_use() / MiB
    return status_kib("VmRSS")["VmRSS"] / 1024


def peak_extra_cuda(fn):
    """Run ``fn()`` once on the GPU; return ``(result, info)`` with its peak device memory above the baseline."""
    gc.collect()
    cuda_sync()
    torch, cupy = _torch_cuda(), sys.modules.get("cupy")
    base = device_bytes_in_use()
    parts = {}
    t0 = 0  # torch's bytes before the call (0 if the call itself initialises torch's CUDA state)
    if torch is not None:
        torch.cuda.reset_peak_memory_stats()
        t0 = torch.cuda.memory_allocated()
    if cupy is not None:
        previous = cupy.cuda.get_allocator()
        tracker = CupyPeak(cupy.get_default_memory_pool())
        c0 = tracker.peak
        cupy.cuda.set_allocator(tracker.malloc)
    try:
        out = fn()
        cuda_sync()
    finally:
        if cupy is not None:
            cupy.cuda.set_allocator(previous)
    torch = _torch_cuda()
    if torch is not None:
        parts["torch_extra_mib"] = (torch.cuda.max_memory_allocated() - t0) / MiB
    if cupy is not None:
        parts["cupy_extra_mib"] = (tracker.peak - c0) / MiB
    return out, {"mechanism": "GPU allocators: torch.cuda.max_memory_allocated, CuPy pool high-water mark "
                              "(tracking allocator); baseline after the inputs",
                 "baseline_mib": base / MiB, "extra_mib": sum(parts.values()), **parts}


def to_host(a):
    """A result as a NumPy array: torch tensors (any device), CuPy arrays, NumPy arrays."""
    if isinstance(a, np.ndarray):
        return a
    if hasattr(a, "detach"):  # torch
        import torch

        a = a.detach().cpu()
        return (a if a.dtype in (torch.float32, torch.float64) else a.float()).numpy()
    if type(a).__module__.startswith("cupy"):
        return a.get()
    return np.asarray(a)


# --------------------------------------------------------------------------------------
# isolated workers
# --------------------------------------------------------------------------------------
def _worker_main(conn, setup, args, warmup_args, measure_memory, traced, device="cpu", return_output=False):
    """Body of a :class:`Worker` process.  ``setup(*args)`` returns the zero-argument call."""
    exit_with_parent()
    sync = synchronizer(device)
    try:
        if warmup_args is not None:  # thread pools, lazily loaded code, first-call caches, kernel compiles
            setup(*warmup_args)()
            sync()
        fn = setup(*args)
        ready = dict(getattr(fn, "setup_info", None) or {})  # e.g. a cache's build time (not timed below)
        t0 = time.perf_counter()
        if measure_memory:
            out, mem = (peak_extra_cuda if device == "cuda" else peak_extra_rss)(fn)
            ready.update(mem)
        else:
            out = fn()
            sync()
        ready["first_call_ms"] = (time.perf_counter() - t0) * 1e3
        if return_output:
            ready["output"] = to_host(out)
        del out
        conn.send(ready)
    except Exception as e:  # report, never raise
        conn.send({"error": f"{type(e).__name__}: {e}"})
        return
    while True:
        cmd = conn.recv()
        try:
            if cmd == "time":
                sync()
                c0, t0 = time.process_time(), time.perf_counter()
                fn()
                sync()
                conn.send({"wall_ms": (time.perf_counter() - t0) * 1e3,
                           "cpu_ms": (time.process_time() - c0) * 1e3})
            elif cmd == "tracemalloc":
                if not traced:
                    conn.send({})
                    continue
                import tracemalloc

                gc.collect()
                tracemalloc.start()
                fn()
                peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
                conn.send({"tracemalloc_peak_mib": peak / MiB})
            elif cmd == "stop":
                conn.send({})
                return
            else:
                conn.send({"error": f"unknown command {cmd!r}"})
        except Exception as e:
            conn.send({"error": f"{type(e).__name__}: {e}"})


class Worker:
    """One method in its own spawned process.

    ``setup`` must be a module-level function; ``setup(*args)`` builds the inputs
    and returns a zero-argument callable.  On start the worker runs
    ``setup(*warmup_args)()`` (a tiny problem), builds the real problem, and runs
    the real call once (measuring its peak extra RSS if ``measure_memory``): that
    call is the warm-up for the timed calls.  ``traced``: also offer a
    tracemalloc peak (meaningful for NumPy code only).

    Work done in ``setup`` (building a cache, say) is neither timed nor counted
    in the peak: the memory baseline is taken after it.  If the returned
    callable has a dict attribute ``setup_info`` (e.g. the build time), its
    items are sent back in :attr:`ready`; with ``return_output`` so is the
    first call's result, as a NumPy array (``ready["output"]``).

    ``device="cuda"``: calls are synchronised, and the peak is device memory
    (:func:`peak_extra_cuda`).  The constructor returns once the process has
    started; :attr:`ready` waits for the set-up and the first call, so several
    workers can start side by side (on a GPU their start-up is mostly imports,
    context creation and kernel compiles; on a small CPU keep them one at a time).
    """

    def __init__(self, setup, args, *, warmup_args=None, measure_memory=True, traced=False,
                 device: str = "cpu", return_output: bool = False, timeout: float = 900.0):
        ctx = mp.get_context("spawn")
        self.timeout = timeout
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, daemon=True,
                                args=(child, setup, args, warmup_args, measure_memory, traced, device,
                                      return_output))
        self.proc.start()
        child.close()
        self._ready = None

    @property
    def ready(self) -> dict:
        """What the worker sent after its set-up and first call (``{"error": ...}`` if it failed)."""
        if self._ready is None:
            self._ready = self._recv()
        return self._ready

    def _recv(self) -> dict:
        try:
            if self.conn.poll(self.timeout):
                return self.conn.recv()
            return {"error": f"worker gave no answer in {self.timeout:.0f} s"}
        except (EOFError, OSError):
            return {"error": f"worker died (exit code {self.proc.exitcode})"}

    def ask(self, cmd: str) -> dict:
        if not self.proc.is_alive():
            return {"error": f"worker died (exit code {self.proc.exitcode})"}
        self.conn.send(cmd)
        return self._recv()

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send("stop")
                self.conn.poll(10)
            except (OSError, BrokenPipeError):
                pass
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.terminate()  # this worker only, by its own handle
            self.proc.join(5)
        self.conn.close()


def exit_with_parent(poll_s: float = 1.0) -> None:
    """In a spawned worker: end this process as soon as its parent is gone.

    A benchmark killed by a signal (SIGTERM, a closed terminal) cannot clean
    up, and its spawned workers would otherwise keep training or timing on the
    cores the next run measures with."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def call_in_worker(func, *args):
    """``func(*args)`` in a worker process that ends with its parent (:func:`exit_with_parent`)."""
    exit_with_parent()
    return func(*args)


def run_isolated(func, *args):
    """``func(*args)`` in a fresh spawned process; its return value (or ``{"error": ...}``)."""
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as ex:
            return ex.submit(call_in_worker, func, *args).result(timeout=900)
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}


# --------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------
def code_revision(root: Path, paths: tuple[str, ...]) -> dict:
    """Which code a benchmark measured: ``{"git_commit", "dirty"}``.

    In a git work tree: ``HEAD`` and whether ``paths`` have local edits.  In a copy outside git
    (``git archive HEAD | tar -x``, the way runs are kept off a working tree being edited) the
    commit is the ``DX_GIT_COMMIT`` environment variable if set, and ``dirty`` is None: unknown,
    not clean.
    """
    def git(*argv):
        try:
            return subprocess.run(["git", *argv], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None

    inside = git("rev-parse", "--show-toplevel")
    if inside is None or inside.returncode != 0 or Path(inside.stdout.strip()).resolve() != Path(root).resolve():
        return {"git_commit": os.environ.get("DX_GIT_COMMIT") or None, "dirty": None}
    head = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--", *paths)
    return {"git_commit": (head.stdout.strip() or None) if head and head.returncode == 0 else None,
            "dirty": bool(status.stdout.strip()) if status and status.returncode == 0 else None}


def gpu_kind(name: str | None) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"h100"``; ``"NVIDIA H200"`` -> ``"h200"`` (result file names)."""
    toks = re.findall(r"[a-z]*\d+[a-z0-9]*", (name or "").lower().replace("nvidia", ""))
    return toks[0] if toks else "gpu"


def _json_default(obj):
    """NumPy/CuPy scalars and arrays as plain numbers and lists; anything else as its text."""
    return obj.tolist() if hasattr(obj, "tolist") else str(obj)


def write_json_atomic(path: Path, data) -> None:
    """Write ``data`` as JSON to ``path`` via a temporary file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, default=_json_default)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
