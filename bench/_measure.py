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
"""

from __future__ import annotations

import gc
import json
import multiprocessing as mp
import os
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

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
# isolated workers
# --------------------------------------------------------------------------------------
def _worker_main(conn, setup, args, warmup_args, measure_memory, traced):
    """Body of a :class:`Worker` process.  ``setup(*args)`` returns the zero-argument call."""
    try:
        if warmup_args is not None:  # thread pools, lazily loaded code, first-call caches
            setup(*warmup_args)()
        fn = setup(*args)
        ready = dict(getattr(fn, "setup_info", None) or {})  # e.g. a cache's build time (not timed below)
        t0 = time.perf_counter()
        if measure_memory:
            out, mem = peak_extra_rss(fn)
            ready.update(mem)
        else:
            out = fn()
        ready["first_call_ms"] = (time.perf_counter() - t0) * 1e3
        del out
        conn.send(ready)
    except Exception as e:  # report, never raise
        conn.send({"error": f"{type(e).__name__}: {e}"})
        return
    while True:
        cmd = conn.recv()
        try:
            if cmd == "time":
                c0, t0 = time.process_time(), time.perf_counter()
                fn()
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
    items are sent back in :attr:`ready`.
    """

    def __init__(self, setup, args, *, warmup_args=None, measure_memory=True, traced=False,
                 timeout: float = 900.0):
        ctx = mp.get_context("spawn")
        self.timeout = timeout
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, daemon=True,
                                args=(child, setup, args, warmup_args, measure_memory, traced))
        self.proc.start()
        child.close()
        self.ready = self._recv()

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


def run_isolated(func, *args):
    """``func(*args)`` in a fresh spawned process; its return value (or ``{"error": ...}``)."""
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as ex:
            return ex.submit(func, *args).result(timeout=900)
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}


# --------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------
def write_json_atomic(path: Path, data) -> None:
    """Write ``data`` as JSON to ``path`` via a temporary file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
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
