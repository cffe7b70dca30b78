"""Benchmark: dxfield's exact and projected drifting fields against the peers' full-matrix Algorithm 2.

Three suites (``--suite``; every option given on the command line overrides the preset), on
``--device cpu`` (default; NumPy inputs) or ``--device cuda`` (CuPy inputs; the peer runs torch
on the same GPU):

* ``exact`` (default): G=1024, P=16384, D=512, temperatures (0.02, 0.05, 0.2),
  methods ``peer dxfield dxfield@16MiB``, 7 repeats -> ``field-<host-kind>.json``.
* ``projected``: the projected-field issue's goal, G=1024, P=65536, D=512,
  m=1024 landmarks, ONE temperature 0.05 (the DriftXpress release setting, and
  the one the issue's 140 GFLOP figure counts), methods
  ``peer dxfield projected projected@m=512``, 5 repeats, no float64 peer ->
  ``field-projected-<host-kind>.json``.  Goal: ``projected`` at least 40x faster
  than ``peer`` (best times); the report states met / NOT met and the flop bound.
* ``grid``: every method over a grid of shapes (G, P, D, m) (``--grid GxPxD[xm] ...``),
  one temperature 0.05 -> ``field-grid-<host-kind>.json`` (written after each
  shape, so a run cut short keeps the shapes it finished).  Default grid and methods:

  - CPU (about 3-5 min on 2 cores): 256x4096x128 m=256, 1024x4096x256 m=512,
    1024x16384x512 m=1024, 2048x16384x512 m=1024, 4096x16384x256 m=1024,
    1024x65536x512 m=1024 (the projected suite's shape);
    ``peer dxfield projected attraction``; 3 repeats.
  - CUDA: the issue's GPU goal shape G=4096, P=65536, D=512, m=1024 (exact field
    2*G*(P+G)*D*2 = 584 GFLOP; attraction 2*G*m*D + 2*G*m*(D+1) = 8.6 GFLOP), then
    1024x16384x512 m=1024 (the CPU suites' shape); ``peer dxfield fused fused-tf32
    projected projected-tf32 projected-bf16 attraction attraction-tf32
    attraction-bf16``; 5 repeats.
  - ``--quick``: 64x512x32 m=64 and 128x1024x64 m=128, 3 repeats (seconds).

Methods (``--methods``; a ``-tf32`` / ``-bf16`` suffix picks the precision, float32 otherwise)
--------------------------------------------------------------------------------------------
* ``peer`` -- :func:`peer_field` below: the field written in torch the way the
  public reimplementations of the drifting paper write it: one ``torch.cdist``
  over the concatenated targets ``[pos, x]``, the self pairs pushed away by
  +1e6, then per temperature a row softmax and a column softmax of the full
  G x (P + G) logits, ``A = sqrt(row * col)``, the W+/W- weighting and two
  matmuls.  float32 (torch's default matmul precision, no TF32),
  ``torch.no_grad()``, on the benchmark's device.  ``peer-f64``: the same in float64.
* ``dxfield`` / ``dxfield@<budget>`` -- ``dxfield.drift_field(x, pos,
  engine="composed")``, the composed NumPy/CuPy path, with its defaults:
  bidirectional normalisation (Algorithm 2), ``feature_scale="auto"``,
  ``drift_norm=True``, negatives = the queries with self pairs masked; tiled,
  memory bounded by ``memory_budget`` (dxfield's default, or ``<budget>``, e.g.
  ``dxfield@16MiB``: at the exact suite's shape its tiles can no longer span
  all 1024 queries, so each target tile is swept twice).  A budget below what
  the per-query accumulators need makes it raise ValueError: an error row.
* ``fused`` / ``fused-tf32x3`` / ``fused-tf32`` -- ``drift_field(x, pos, engine="fused",
  precision="float32"|"tf32x3"|"tf32")`` (tf32x3: three TF32 tensor-core products per GEMM
  from a two-part split of each operand, float32-level accuracy): the CuPy RawKernel engine (GPU only; on NumPy
  inputs it raises ValueError, reported as an error row).
* ``projected`` / ``projected-tf32`` / ``projected-bf16`` (``@m=<m>`` for other
  than the shape's landmarks) -- ``dxfield.ProjectedField``: set-up (not timed;
  reported as "build time") is ``ProjectedField.build(pos, landmarks=m,
  method="uniform", temperatures=TEMPS, feature_scale="auto")`` plus one call
  on 4 queries that makes the cache's working copies on the device; the timed
  call is ``pf.field(x, engine=..., precision=...)``: Nystrom attraction over ALL P
  positives from the cached folded summaries, exact row-normalised repulsion
  over the G queries (self pairs masked), ``drift_norm=True``.
* ``bidirectional`` (``@m=<m>``) -- the same cache, timed call
  ``pf.field(x, normalization="bidirectional")``: Algorithm 2 against ALL P
  positives with their column sums taken at the landmarks (the peer's own
  normalisation, so its error against the peer is the approximation's).
* ``attraction`` / ``attraction-tf32`` / ``attraction-bf16`` -- the same cache,
  timed call ``pf.attraction(x, engine=..., precision=...)``: the barycentres b+ alone, the
  part whose cost is O(G m D) (the attraction goal).

All methods use the same temperatures (``--temperatures``).  dxfield's
``engine`` is always explicit (so ``$DXFIELD_ENGINE`` cannot change what is
measured): "composed" for ``dxfield``, "fused" for ``fused``, and for the
projected and attraction methods "composed" on the CPU and "fused" on a GPU
(where "auto" would fall back to the composed path, with only a warning, if the
kernels failed to compile).  A keyword the installed dxfield does not know
(TypeError) or a precision/engine the device cannot do (ValueError) is
reported as an error row, never raised.

What is measured
----------------
1. Each method gets its own spawned worker process (``bench/_measure.py``): on
   the CPU because torch's OpenMP pool and NumPy's OpenBLAS pool spin-wait
   after each call (on 2 cores a call of one library right after the other's
   runs 2-3x slower); on a GPU so that one method's fault (a kernel error
   poisons its CUDA context) cannot take the others down, and so that each
   allocator's peak is the method's own.  CPU workers start one at a time; GPU
   workers start side by side (their start-up is imports, context creation and
   kernel compiles).
2. Warm-up: the worker first runs the method on a tiny problem (16 queries, 64
   positives: thread pools, lazily loaded code, NVRTC compiles, cuBLAS
   handles), then builds the real inputs (and a projected cache), then makes
   one real call, which is also the warm-up of the timed calls.
3. Peak extra memory of that first call.  CPU: resets the resident high-water
   mark (``5`` > ``/proc/self/clear_refs``, Linux >= 4.0; checked) after
   ``gc.collect()`` + ``malloc_trim(0)`` and reads ``VmHWM``: extra = VmHWM -
   VmRSS before the call (fallback: VmRSS sampled every 1 ms).  For NumPy
   methods the worker also reports the ``tracemalloc`` peak of one more call as
   a cross-check.  GPU: device bytes above those in use before the call (the
   inputs are allocated before the baseline): ``torch.cuda.max_memory_allocated``
   (peak stats reset first) for torch, and for CuPy a tracking allocator around
   the default memory pool's ``malloc`` that records the pool's high-water mark
   of bytes in use.  Both include the output.  A projected cache is built
   before the baseline, so it is not in the extra; its size is reported
   separately: ``4*(m*D + n_temps*(m*(D+1) + m*m))`` bytes (float32 landmarks,
   folded summaries ``A [G | t]``, factors ``A``), the float64 host arrays the
   cache keeps, and the memory the build took (RSS growth on the CPU, allocator
   bytes on a GPU).
4. Agreement, from the first call's output (sent back by the worker):
   max |V - V_ref| / max |V_ref| over all entries (``max_rel``) and
   ||V - V_ref||_F / ||V_ref||_F (``fro_rel``), against

   - the peer (``vs peer``): the same field for the exact methods; the
     projected ones approximate a different field (below), so theirs is context;
   - the float64 peer (exact suite; ``--no-f64`` skips it, the projected and
     grid suites always do);
   - a reference method (``vs ref``): ``fused`` and ``fused-tf32`` against
     ``dxfield`` (composed, float32): goal ``max_rel`` <= 1e-5 in float32 and
     <= 1e-3 in TF32; the ``-tf32``/``-bf16`` projected and attraction methods
     against their float32 version (the precision's own effect);
   - projected methods, in their worker (same device): the exact
     row-normalised field they approximate (docs/design.md section 2.2),
     ``V_row = dxfield.drift_field(x, pos, normalization="row",
     temperatures=TEMPS, feature_scale=S, engine="composed")`` with ``S =
     pf.feature_scale`` (the cache's fixed scale).  The projected suite adds
     ``pf.diagnostics(x, pos)["attraction_relative_error"]`` (``|b+_proj - b+|
     / |b+ - x|`` per temperature) and, per temperature, the cancellation factor
     ``|b+ - x| / |b+ - b-|`` (exact; ``b+`` from a float64
     ``dxfield.kernel_matvec``): the exact repulsion is common to both fields,
     so the field's relative error is about the attraction's times this factor;
     and, for context, the row field's difference from the peer's bidirectional
     field (different fields by design; the peer's ``S`` comes from all
     query-target pairs, the cache's from the positives).
5. Time: ``--repeats`` rounds, each timing one call per method
   (``time.perf_counter`` inside the worker; on a GPU around a call
   synchronised before and after), the order rotated every round and
   ``--pause`` s idle before each call (0.3 s on the CPU, 0.05 s on a GPU), so
   a slow spell of the machine hits all methods alike.  Best and median are
   reported (CPU time per call goes to the JSON).
6. Effective GFLOP/s: the exact methods (peer, dxfield, fused) are credited
   ``2*G*(G+P)*D`` (distances) ``+ n_temps * 2*G*(G+P)*D`` (weighted sums);
   work a method does beyond that (dxfield's extra distance sweep for the mean
   distance, for instance) is not credited.  Projected: ``2*G*m*D``
   (query-landmark distances) ``+ n_temps*2*G*m*(D+1)`` (kernel block times the
   folded matrix) ``+ 2*G*G*D + n_temps*2*G*G*D`` (exact repulsion);
   attraction: the first two terms.  The ratio of the counts bounds the
   speed-up at equal GFLOP/s (32.5x at the projected suite's shape: 139.6 vs
   4.30 GFLOP).
7. Reference matrix products on the same device, each library in its own
   process, after the timed calls (the machine's state during them), best of 5:
   (G x D) @ (D x P) and, with projected or attraction methods, (G x D) @ (D x m).
   CPU: NumPy's BLAS and torch, float32.  GPU: cuBLAS through torch in float32
   (TF32 off), TF32 and bfloat16, and through CuPy in float32.  A rate is
   timed over enough back-to-back products to span about 5 ms (one product at
   the benchmark shapes), so at small shapes it is a throughput.  Each
   method's share = its GFLOP/s / the best float32 rate at its own product
   shape (P for exact methods, m for projected/attraction), and "same
   precision" = / the best rate in its precision (TF32, bf16).  A share near
   100% means the method runs as fast as one matrix product of its size could.

Output: a markdown table on stdout (with projected methods: a speed table, then
a cache-and-accuracy table; the grid: one table over all shapes, the matmul
rates, and the key figures last), and the same data as JSON in
``bench/results/`` (written atomically).  ``--summarize FILE`` prints the key
figures of a grid JSON again.  Benchmarks print and save figures; they never assert.

Run::

    python bench/field.py                    # G=1024, P=16384, D=512 (~1-2 min on 2 cores)
    python bench/field.py --suite projected  # G=1024, P=65536, D=512, m=1024, tau=0.05 (~2-3 min)
    python bench/field.py --suite grid       # CPU grid (~3-5 min on 2 cores)
    python bench/field.py --suite grid --device cuda        # GPU grid incl. the goal shape
    python bench/field.py --suite grid --grid 1024x16384x512x1024 4096x65536x512 --methods peer fused
    python bench/field.py --suite projected --methods peer projected@m=2048 --repeats 3
    python bench/field.py --quick            # tiny smoke run (seconds; its times are
                                             # thread wake-up latency, not throughput)
    python bench/field.py --suite grid --quick
    python bench/field.py -G 512 -P 8192 -D 256 --repeats 3
    python bench/field.py --methods peer dxfield dxfield@32MiB --memory-budget 48MiB
    python bench/field.py --profile          # also cProfile one dxfield call
    python bench/field.py --summarize bench/results/field-grid-h100.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import gc
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import (MiB, Worker, code_revision, gpu_kind, malloc_trim, memory_in_use_mib,  # noqa: E402
                      run_isolated, synchronizer, to_host, write_json_atomic)

HERE = Path(__file__).resolve().parent
TEMPERATURES = (0.02, 0.05, 0.2)
DEFAULT_LANDMARKS = 1024
DEFAULT_METHODS = ("peer", "dxfield", "dxfield@16MiB")
GOAL_SHAPE = (4096, 65536, 512, 1024)  # the issue's GPU goal: G, P, D, m (one temperature 0.05)
GRIDS = {
    "cpu": [(256, 4096, 128, 256), (1024, 4096, 256, 512), (1024, 16384, 512, 1024),
            (2048, 16384, 512, 1024), (4096, 16384, 256, 1024), (1024, 65536, 512, 1024)],
    "cuda": [GOAL_SHAPE, (1024, 16384, 512, 1024)],
    "quick": [(64, 512, 32, 64), (128, 1024, 64, 128)],
}
GRID_METHODS = {
    "cpu": ["peer", "dxfield", "projected", "attraction"],
    "cuda": ["peer", "dxfield", "fused", "fused-tf32x3", "fused-tf32", "projected", "projected-tf32", "projected-bf16",
             "attraction", "attraction-tf32", "attraction-bf16"],
}
# presets: --suite NAME fills every option left unset on the command line; a value given per
# device ({"cpu": ..., "cuda": ...}) is taken for --device
SUITES = {
    "exact": dict(G=1024, P=16384, D=512, repeats=7, methods=list(DEFAULT_METHODS),
                  temperatures=list(TEMPERATURES), landmarks=DEFAULT_LANDMARKS),
    "projected": dict(G=1024, P=65536, D=512, repeats=5, landmarks=DEFAULT_LANDMARKS,
                      methods=["peer", "dxfield", "projected", "projected@m=512", "bidirectional"],
                      temperatures=[0.05]),  # DriftXpress release setting: one temperature
    "grid": dict(grid=GRIDS, repeats={"cpu": 3, "cuda": 5}, methods=GRID_METHODS, temperatures=[0.05],
                 landmarks=DEFAULT_LANDMARKS),
}
# seconds a worker may take to answer (set-up + first call, or one timed call) before its method
# becomes an error row: on a GPU a hung kernel must not eat the whole run
WORKER_TIMEOUT = {"cpu": 900.0, "cuda": 120.0}
PROJECTED_GOAL = 40.0  # the projected issue's "Done when": projected >= 40x faster than the peer
FUSED_GOAL = {"float32": 1e-5, "tf32x3": 1e-5, "tf32": 1e-3}  # max rel difference, fused vs composed
CACHE_FAMILIES = ("projected", "bidirectional", "attraction")  # methods that run on a ProjectedField cache


# --------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------
def make_data(G: int, P: int, D: int, seed: int = 0, n_modes: int = 16):
    """Queries Gaussian; positives from a Gaussian mixture.  float32, no float64 temporaries."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_modes, D), dtype=np.float32)
    labels = rng.integers(n_modes, size=P)
    pos = rng.standard_normal((P, D), dtype=np.float32)
    pos *= 0.5
    pos += centers[labels]
    x = rng.standard_normal((G, D), dtype=np.float32)
    x *= 1.2
    return x, pos


def parse_shape(spec: str, default_landmarks: int = DEFAULT_LANDMARKS) -> tuple[int, int, int, int]:
    """``"GxPxD"`` or ``"GxPxDxm"`` (``x`` or ``,`` between the numbers) -> ``(G, P, D, m)``."""
    parts = re.split(r"[x,]", spec.strip().lower())
    if len(parts) in (3, 4) and all(p.isdigit() and int(p) > 0 for p in parts):
        G, P, D, *m = (int(p) for p in parts)
        return G, P, D, (m[0] if m else int(default_landmarks))
    raise SystemExit(f"--grid: bad shape {spec!r}: use GxPxD or GxPxDxm with positive integers, "
                     "e.g. 4096x65536x512x1024")


def shape_name(shape) -> str:
    G, P, D, m = shape
    return f"{G}x{P}x{D} m={m}"


# --------------------------------------------------------------------------------------
# the peer: full-matrix Algorithm 2 in torch, as the public reimplementations write it
# --------------------------------------------------------------------------------------
def peer_field(x, pos, temperatures=TEMPERATURES):
    """Bidirectional drifting field with full G x (P + G) matrices (torch, any device).

    Mirrors dxfield.drift_field(x, pos) defaults: feature_scale="auto",
    drift_norm=True, negatives = queries with self pairs masked.
    """
    import torch

    with torch.no_grad():
        G, D = x.shape
        P = pos.shape[0]
        targets = torch.cat([pos, x], dim=0)                      # (P + G, D)
        dist = torch.cdist(x, targets)                             # (G, P + G)
        self_d = dist[:, P:].diagonal()                            # view: self pairs
        mean_d = (dist.sum() - self_d.sum()) / (G * (P + G) - G)   # mean over non-self pairs
        self_d.add_(1e6)                                           # mask self pairs
        S = mean_d / math.sqrt(D)                                  # feature scale
        dist = dist / S
        pos_s, x_s = pos / S, x / S
        total = torch.zeros_like(x)
        for tau in temperatures:
            logits = -dist / (tau * math.sqrt(D))
            A = torch.sqrt(torch.softmax(logits, dim=1) * torch.softmax(logits, dim=0))
            A_pos, A_neg = A[:, :P], A[:, P:]
            W_pos = A_pos * A_neg.sum(1, keepdim=True)
            W_neg = A_neg * A_pos.sum(1, keepdim=True)
            V = W_pos @ pos_s - W_neg @ x_s
            V = V / torch.sqrt((V * V).sum(1).mean() / D)          # drift normalisation
            total += V
        return total


# --------------------------------------------------------------------------------------
# methods
# --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Method:
    """One benchmarked call: ``family`` (peer, peer-f64, dxfield, fused, projected, attraction),
    its ``precision``, and the memory ``budget`` (dxfield, fused) or landmarks ``m`` (cache methods)."""

    name: str
    family: str
    precision: str = "float32"
    budget: str | None = None
    m: int | None = None
    engine: str | None = None  # dxfield's engine= (None for the peer)

    @property
    def uses_cache(self) -> bool:
        return self.family in CACHE_FAMILIES

    @property
    def is_peer(self) -> bool:
        return self.family.startswith("peer")

    @property
    def product(self) -> str:
        """Which reference product its share is taken of: ``"P"`` or ``"m=<m>"``."""
        return f"m={self.m}" if self.uses_cache else "P"

    @property
    def label(self) -> str:
        p = "" if self.precision == "float32" else f", {self.precision}"
        if self.family == "peer":
            return "peer (torch, full matrices)"
        if self.family == "peer-f64":
            return "peer (torch, float64)"
        if self.family == "dxfield":
            return f"dxfield composed ({self.budget or 'default'} budget{p})"
        if self.family == "fused":
            return f"fused kernel ({self.precision}" + (f", {self.budget} budget)" if self.budget else ")")
        e = ", fused" if self.engine == "fused" else ""
        if self.family == "projected":
            return f"projected (m={self.m}, exact repulsion{e}{p})"
        if self.family == "bidirectional":
            return f"projected bidirectional (m={self.m}, exact negatives{e}{p})"
        return f"attraction only (m={self.m}{e}{p})"


_METHOD_RE = re.compile(r"(peer-f64|peer|dxfield|fused|projected|bidirectional|attraction)(?:-(tf32x3|tf32|bf16))?(?:@(.+))?")


def parse_method(name: str, default_budget=None, default_landmarks=DEFAULT_LANDMARKS,
                 device: str = "cpu") -> Method:
    """Method name -> :class:`Method`.

    ``peer``, ``peer-f64``; ``dxfield[-tf32][@<budget>]`` (engine "composed"),
    ``fused[-tf32][@<budget>]`` (engine "fused"; budget e.g. ``16MiB``, default
    ``default_budget``); ``projected[-tf32|-bf16][@m=<m>]``,
    ``attraction[-tf32|-bf16][@m=<m>]`` (``@<m>`` also works; default
    ``default_landmarks``; engine "composed" on the CPU, "fused" on a GPU, so
    that a GPU run cannot silently fall back to the composed path).  Whether a
    precision is supported is the library's business: an unsupported one is an error row.
    """
    mo = _METHOD_RE.fullmatch(name)
    if mo:
        family, precision, param = mo.group(1), mo.group(2) or "float32", mo.group(3)
        if family in ("peer", "peer-f64"):
            if precision == "float32" and param is None:
                return Method(name, family, "float64" if family == "peer-f64" else "float32")
        elif family in ("dxfield", "fused"):
            return Method(name, family, precision, budget=param if param is not None else default_budget,
                          engine="composed" if family == "dxfield" else "fused")
        else:
            spec = str(default_landmarks) if param is None else param
            spec = spec[2:] if spec.startswith("m=") else spec
            if spec.isdigit() and int(spec) > 0:
                return Method(name, family, precision, m=int(spec),
                              engine="fused" if device == "cuda" else "composed")
    raise SystemExit(f"unknown method {name!r}: use peer, peer-f64, dxfield[@<budget>] (e.g. dxfield@16MiB), "
                     "fused, fused-tf32, projected[-tf32|-bf16][@m=<m>] (e.g. projected@m=512), bidirectional[@m=<m>], "
                     "attraction[-tf32|-bf16][@m=<m>]")


def method_flops(mt: Method, G: int, P: int, D: int, nt: int) -> float:
    """Flops credited to one call (see the module docstring)."""
    if mt.uses_cache:
        m = min(mt.m, P)
        attraction = 2.0 * G * m * D + nt * 2.0 * G * m * (D + 1)
        return attraction if mt.family == "attraction" else attraction + 2.0 * G * G * D + nt * 2.0 * G * G * D
    return 2.0 * G * (G + P) * D * (1 + nt)


def reference_of(mt: Method, methods: list[Method]) -> Method | None:
    """The method ``mt`` is compared with beyond the peer: fused (and tf32 variants of dxfield) ->
    ``dxfield`` composed float32 at the default budget; tf32/bf16 projected or attraction -> the
    float32 one with the same landmarks."""
    if mt.family == "fused" or (mt.family == "dxfield" and mt.precision != "float32"):
        want = lambda o: o.family == "dxfield" and o.precision == "float32" and o.budget == mt.budget  # noqa: E731
        alt = lambda o: o.family == "dxfield" and o.precision == "float32"  # noqa: E731
        return next((o for o in methods if want(o)), None) or next((o for o in methods if alt(o)), None)
    if mt.uses_cache and mt.precision != "float32":
        return next((o for o in methods if o.family == mt.family and o.m == mt.m and o.precision == "float32"),
                    None)
    return None


def cache_mib(m: int, D: int, nt: int) -> dict:
    """Size of a projected cache with ``m`` landmarks.

    ``f32``: m*D (landmarks) + per temperature m*(D+1) (folded ``A [G | t]``) +
    m*m (factor ``A``), float32.  ``f64_host``: the float64 host arrays the
    cache keeps (and saves): landmarks, and per temperature factor, ``G`` (m x D) and ``t``.
    """
    return {"f32": (m * D + nt * (m * (D + 1) + m * m)) * 4 / MiB,
            "f64_host": (m * D + nt * (m * m + m * D + m)) * 8 / MiB}


def place(mt: Method, x, pos, device: str):
    """The inputs where the method takes them: torch tensors for the peer, NumPy on the CPU, CuPy on a GPU."""
    if mt.is_peer:
        import torch

        xt, pt = torch.from_numpy(x), torch.from_numpy(pos)
        if mt.family == "peer-f64":
            xt, pt = xt.double(), pt.double()
        return (xt.cuda(), pt.cuda()) if device == "cuda" else (xt, pt)
    if device == "cuda":
        import cupy

        return cupy.asarray(x), cupy.asarray(pos)
    return x, pos


def build_projected(pos, m: int, temperatures, seed: int = 0):
    """The projected field's cache, as the benchmark builds it: ``(pf, build seconds)``.

    Uniform landmarks (the DriftXpress release), ``feature_scale="auto"`` (fixed
    here, stored with the cache); ``m`` is capped at the number of positives.
    """
    import dxfield

    t0 = time.perf_counter()
    pf = dxfield.ProjectedField.build(pos, landmarks=min(int(m), pos.shape[0]), method="uniform",
                                      temperatures=tuple(temperatures), feature_scale="auto", seed=seed)
    return pf, time.perf_counter() - t0


def prepare(mt: Method, x, pos, temperatures=TEMPERATURES):
    """A zero-argument callable that runs the method on inputs already placed (:func:`place`).

    Cache methods build the cache here (not part of the call) and make its
    working copies with one call on 4 queries; the callable carries ``pf`` and
    ``setup_info`` (build time, m, the cache's feature scale).
    """
    temperatures = tuple(temperatures)
    if mt.is_peer:
        return lambda: peer_field(x, pos, temperatures)
    import dxfield

    kw = dict(engine=mt.engine, precision=mt.precision)
    if mt.family in ("dxfield", "fused"):
        return lambda: dxfield.drift_field(x, pos, temperatures=temperatures, memory_budget=mt.budget, **kw)
    pf, build_s = build_projected(pos, mt.m, temperatures)
    call = pf.attraction if mt.family == "attraction" else pf.field
    if mt.family == "bidirectional":
        kw["normalization"] = "bidirectional"
    call(x[:4], **kw)  # working copies of landmarks and folded summaries (device, dtype)
    fn = lambda: call(x, **kw)  # noqa: E731  (projected: exact repulsion over the queries, drift_norm=True)
    fn.pf = pf
    fn.setup_info = {"build_s": build_s, "m": pf.n_landmarks, "feature_scale_cache": pf.feature_scale}
    return fn


def is_numpy_method(mt: Method, device: str) -> bool:
    return device == "cpu" and not mt.is_peer


# --------------------------------------------------------------------------------------
# work done in isolated processes (module level, so spawn can find it)
# --------------------------------------------------------------------------------------
def make_method(name: str, G: int, P: int, D: int, m: int, seed: int, default_budget,
                temperatures=TEMPERATURES, device: str = "cpu", accuracy: str | None = None):
    """Build the inputs on ``device`` and return the zero-argument call of ``name`` (a Worker's setup).

    Cache methods: the cache is built here (timed as ``build_s``, with its
    working copies), ``build_mem_mib`` is the memory it took (RSS on the CPU,
    allocator bytes on a GPU).  ``accuracy`` (projected methods): ``"row"``
    adds the error against the exact row field, ``"full"`` also the
    diagnostics, cancellation factors and the row field itself
    (``row_output``, for the parent's context line).
    """
    mt = parse_method(name, default_budget, m, device)
    x, pos = place(mt, *make_data(G, P, D, seed=seed), device)
    if not mt.uses_cache:
        return prepare(mt, x, pos, temperatures)
    gc.collect()
    malloc_trim()
    before = memory_in_use_mib(device)
    fn = prepare(mt, x, pos, temperatures)
    gc.collect()
    malloc_trim()
    fn.setup_info["build_mem_mib"] = memory_in_use_mib(device) - before
    if accuracy and mt.family == "projected":
        fn.setup_info.update(projected_accuracy(fn, x, pos, temperatures, detailed=accuracy == "full"))
    return fn


def method_output(*make_method_args):
    """The output of one call of a method, as a NumPy array (e.g. the float64 peer, in its own process)."""
    fn = make_method(*make_method_args)
    return to_host(fn())


def gemm_rates(lib: str, device: str, products, repeats: int = 5) -> dict:
    """Best-of GFLOP/s of ``(G x D) @ (D x N)`` for each ``(key, G, D, N)`` in ``products``.

    Returns ``{key: {precision: GFLOP/s}}``.  CPU: ``lib`` "numpy" (its BLAS) or
    "torch", float32.  GPU: "torch" (cuBLAS; float32 with TF32 off, "tf32",
    "bf16") or "cupy" (float32), synchronised.  Each timing spans enough
    back-to-back products to last about 5 ms (one product at benchmark
    shapes), so small shapes give a throughput, not a wake-up latency.
    """
    sync = synchronizer(device)
    rng = np.random.default_rng(123)
    out = {}
    for key, G, D, N in products:
        a = rng.standard_normal((G, D), dtype=np.float32)
        b = rng.standard_normal((D, N), dtype=np.float32)
        flops = 2.0 * G * D * N
        rates = {}
        if lib == "numpy":
            rates["float32"] = _best_rate(lambda: a @ b, flops, sync, repeats)
        elif lib == "cupy":
            import cupy

            ac, bc = cupy.asarray(a), cupy.asarray(b)
            rates["float32"] = _best_rate(lambda: ac @ bc, flops, sync, repeats)
        elif lib == "torch":
            import torch

            at, bt = torch.from_numpy(a), torch.from_numpy(b)
            if device == "cuda":
                at, bt = at.cuda(), bt.cuda()
            previous = torch.get_float32_matmul_precision()
            try:
                for precision in (("float32", "tf32", "bf16") if device == "cuda" else ("float32",)):
                    torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
                    aa, bb = (at.bfloat16(), bt.bfloat16()) if precision == "bf16" else (at, bt)
                    rates[precision] = _best_rate(lambda: aa @ bb, flops, sync, repeats)  # noqa: B023
            finally:
                torch.set_float32_matmul_precision(previous)
        else:
            raise ValueError(f"gemm_rates: unknown lib {lib!r}: use numpy, torch or cupy")
        out[key] = rates
    return out


def _best_rate(mm, flops: float, sync, repeats: int) -> float:
    mm()  # warm-up (thread pools; cuBLAS handle, workspace)
    sync()
    t0 = time.perf_counter()
    mm()
    sync()
    n = int(min(1000, max(1, math.ceil(5e-3 / max(time.perf_counter() - t0, 1e-7)))))
    best = math.inf
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            mm()
        sync()
        best = min(best, (time.perf_counter() - t0) / n)
    return flops / best / 1e9


def profile_dxfield(G: int, P: int, D: int, seed: int, budget, top: int = 18,
                    temperatures=TEMPERATURES) -> str:
    """cProfile text of one dxfield call (after a warm-up call), sorted by own time."""
    import cProfile
    import io
    import pstats

    fn = make_method("dxfield", G, P, D, DEFAULT_LANDMARKS, seed, budget, temperatures)
    fn()
    pr = cProfile.Profile()
    pr.enable()
    fn()
    pr.disable()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()


def agreement(v, ref) -> dict:
    v = np.asarray(v, np.float64)
    ref = np.asarray(ref, np.float64)
    diff = np.abs(v - ref)
    return {
        "max_rel": float(diff.max() / np.abs(ref).max()),
        "fro_rel": float(np.linalg.norm(v - ref) / np.linalg.norm(ref)),
        "max_abs": float(diff.max()),
    }


def projected_accuracy(fn, x, pos, temperatures, detailed: bool) -> dict:
    """Errors of the projected call ``fn`` against the exact row-normalised field (docs/design.md section 2.2).

    ``V_row = dxfield.drift_field(x, pos, normalization="row", feature_scale=S,
    engine="composed")`` with the cache's ``S``, on the inputs' device.
    ``detailed`` adds ``pf.diagnostics(x, pos)`` and the cancellation factors
    (:func:`cancellation`), and returns ``V_row`` as ``row_output``.
    """
    import dxfield

    pf = fn.pf
    try:
        v = to_host(fn())
        stats = dict(getattr(pf, "last_stats", None) or {})
        v_row = to_host(dxfield.drift_field(x, pos, normalization="row", temperatures=tuple(temperatures),
                                            feature_scale=pf.feature_scale, engine="composed"))
        a = agreement(v, v_row)
        out = {"fro_rel_vs_row": a["fro_rel"], "max_rel_vs_row": a["max_rel"], "fallback_rows": stats}
        if detailed:
            diag = pf.diagnostics(x, pos)
            out.update(attraction_relative_error=diag.get("attraction_relative_error"), diagnostics=diag,
                       cancellation=cancellation(to_host(x), to_host(pos), temperatures, pf.feature_scale),
                       row_output=v_row)
        return out
    except Exception as e:  # benchmarks report, never raise
        return {"accuracy_error": f"{type(e).__name__}: {e}"}


def cancellation(x, pos, temperatures, scale) -> list:
    """Per temperature ``|b+ - x| / |b+ - b-|`` (exact; NumPy, float64 kernel sums).

    The exact repulsion is common to the projected and the row field, so the
    field's relative error is about the attraction's times this factor.
    ``None`` where the unshifted kernel sums underflow.
    """
    import dxfield

    D = x.shape[1]
    x64, pos64 = x.astype(np.float64), pos.astype(np.float64)
    w = np.concatenate([pos64, np.ones((pos.shape[0], 1))], axis=1)
    out = []
    for t in temperatures:
        v_raw = dxfield.drift_field(x, pos, normalization="row", temperatures=(t,), feature_scale=scale,
                                    drift_norm=False, engine="composed")
        v_raw = to_host(v_raw).astype(np.float64) * scale  # b+ - b-, raw units
        ks = dxfield.kernel_matvec(x64, pos64, w, tau=t * scale * math.sqrt(D))
        den = ks[:, D]
        if not np.all(np.isfinite(ks)) or not np.all(den > 0):  # unshifted kernel sums underflowed
            out.append(None)
            continue
        disp = np.linalg.norm(ks[:, :D] / den[:, None] - x64)
        out.append(float(disp / np.linalg.norm(v_raw)))
    return out


def peer_scale(x, pos, block: int = 256) -> float:
    """The peer's (and drift_field's "auto") feature scale: mean query-target distance / sqrt(D).

    Over all G x (P + G) pairs except the self pairs, as :func:`peer_field` takes it.
    """
    G, D = x.shape
    t = np.concatenate([pos, x])
    tt = np.einsum("ij,ij->i", t, t)
    total = 0.0
    for i0 in range(0, G, block):
        q = x[i0:i0 + block]
        d2 = np.einsum("ij,ij->i", q, q)[:, None] + tt[None, :] - 2.0 * (q @ t.T)
        d = np.sqrt(np.maximum(d2, 0.0))
        rows = np.arange(q.shape[0])
        d[rows, pos.shape[0] + i0 + rows] = 0.0  # self pairs are not counted
        total += float(d.sum(dtype=np.float64))
    return total / (G * (G + pos.shape[0]) - G) / math.sqrt(D)


def gpu_available() -> bool:
    """True when CuPy can use a GPU (``dxfield.cuda_available()``)."""
    import dxfield

    return bool(getattr(dxfield, "cuda_available", dxfield.cupy_available)())


def gpu_name() -> str | None:
    try:
        import cupy

        name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:
        return None


def host_kind(device: str = "cpu") -> str:
    return gpu_kind(gpu_name()) if device == "cuda" else f"cpu{os.cpu_count()}"


def machine_info(device: str = "cpu") -> dict:
    import torch

    info = {
        "host": platform.node(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_model": None,
        "numpy": np.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        cfg = np.show_config(mode="dicts")
        blas = cfg["Build Dependencies"]["blas"]
        info["numpy_blas"] = f"{blas.get('name')} {blas.get('version')}"
    except Exception:
        pass
    try:
        for tok in torch.__config__.show().replace(",", "\n").splitlines():
            tok = tok.strip()
            if tok.startswith(("BLAS_INFO=", "LAPACK_INFO=")):
                info["torch_" + tok.split("=")[0].lower()] = tok.split("=", 1)[1]
    except Exception:
        pass
    if device == "cuda":
        info["gpu"] = gpu_name()
        info["torch_cuda"] = torch.version.cuda
        info["torch_float32_matmul_precision"] = torch.get_float32_matmul_precision()
        try:
            import cupy

            info["cupy"] = cupy.__version__
            info["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
            info["cuda_driver"] = cupy.cuda.runtime.driverGetVersion()
        except Exception:
            pass
    try:
        import dxfield

        info["dxfield"] = getattr(dxfield, "__version__", None)
    except Exception:
        pass
    # which dxfield was measured: commit, and whether dxfield/ had local edits (None: unknown)
    rev = code_revision(HERE.parent, ("dxfield",))
    info["git_commit"], info["dxfield_dirty"] = rev["git_commit"], rev["dirty"]
    return info


# --------------------------------------------------------------------------------------
# one shape: workers, agreement, timing, reference products
# --------------------------------------------------------------------------------------
def measure_shape(args, shape) -> dict:
    """Run every method of ``args.methods`` at ``shape = (G, P, D, m)``.

    Returns ``{"G", "P", "D", "m", "flops_exact", "memory_mechanism", "gemm", "context", "rows"}``:
    one row per method (times, rates and shares, peak memory, agreement, or ``error``),
    the reference products' rates, and notes that belong to no row.
    """
    G, P, D, m = shape
    temps, device = args.temperatures, args.device
    nt = len(temps)
    methods = [parse_method(n, args.memory_budget, m, device) for n in args.methods]
    print(f"# shape G={G} P={P} D={D} m={m}: {[mt.name for mt in methods]}", flush=True)
    rows = [{"method": mt.name, "label": mt.label, "family": mt.family, "precision": mt.precision,
             "flops": method_flops(mt, G, P, D, nt), "product": mt.product} for mt in methods]
    for mt, r in zip(methods, rows):
        if mt.uses_cache:
            size = cache_mib(min(mt.m, P), D, nt)
            r.update(m=min(mt.m, P), cache_mib_f32=size["f32"], cache_mib_f64_host=size["f64_host"])
    accuracy = "full" if args.suite == "projected" else "row"

    # 1. one spawned worker per method: set-up, warm-up, first call (peak memory, output)
    def start(mt):
        return Worker(make_method, (mt.name, G, P, D, m, args.seed, args.memory_budget, temps, device, accuracy),
                      warmup_args=(mt.name, 16, 64, D, min(m, 64), args.seed + 1, args.memory_budget, temps,
                                   device, None),
                      measure_memory=not args.no_memory, traced=is_numpy_method(mt, device), device=device,
                      return_output=True, timeout=WORKER_TIMEOUT[device])

    pending = {mt.name: start(mt) for mt in methods} if device == "cuda" else {}  # GPU: start side by side
    workers, outputs, context = {}, {}, {}
    mechanism = "skipped"
    for mt, r in zip(methods, rows):
        print(f"# worker: {mt.label} (set-up, first call) ...", flush=True)
        w = pending.pop(mt.name, None) or start(mt)
        ready = dict(w.ready)
        if ready.get("error"):
            r["error"] = ready["error"]
            w.close()
            continue
        workers[mt.name] = w
        outputs[mt.name] = ready.pop("output", None)
        row_output = ready.pop("row_output", None)
        if row_output is not None and "row_output" not in context:
            context["row_output"] = row_output
        r["first_call_ms"] = ready["first_call_ms"]
        for key in ("build_s", "build_mem_mib", "feature_scale_cache", "fro_rel_vs_row", "max_rel_vs_row",
                    "attraction_relative_error", "cancellation", "fallback_rows", "diagnostics",
                    "accuracy_error", "torch_extra_mib", "cupy_extra_mib"):
            if key in ready:
                r[key] = ready[key]
        if not args.no_memory:
            r["peak_extra_mib"] = ready["extra_mib"]
            r["baseline_mib"] = ready.get("baseline_rss_mib", ready.get("baseline_mib"))
            mechanism = ready["mechanism"]

    # 2. agreement, from the first calls' outputs
    peer_out = outputs.get(next((mt.name for mt in methods if mt.family == "peer"), None))
    f64 = None
    if not args.no_f64:
        print("# float64 peer (own process) ...", flush=True)
        f64 = run_isolated(method_output, "peer-f64", G, P, D, m, args.seed, None, temps, device)
        if isinstance(f64, dict):  # {"error": ...}
            context["f64_error"] = f64.get("error")
            f64 = None
    for mt, r in zip(methods, rows):
        v = outputs.get(mt.name)
        if v is None:
            continue
        if peer_out is not None and mt.family != "attraction" and v.shape == peer_out.shape:
            a = agreement(v, peer_out)
            r["max_rel_vs_peer"], r["fro_rel_vs_peer"] = a["max_rel"], a["fro_rel"]
        if f64 is not None and not mt.uses_cache:
            a = agreement(v, f64)
            r["max_rel_vs_f64"], r["fro_rel_vs_f64"] = a["max_rel"], a["fro_rel"]
        ref = reference_of(mt, methods)
        if ref is not None and outputs.get(ref.name) is not None:
            a = agreement(v, outputs[ref.name])
            r.update(ref_method=ref.name, max_rel_vs_ref=a["max_rel"], fro_rel_vs_ref=a["fro_rel"])
            goal = FUSED_GOAL.get(mt.precision) if mt.family == "fused" else None
            if goal is not None:
                r["ref_goal"] = goal
    if context.get("row_output") is not None and peer_out is not None:
        context["row_vs_peer"] = agreement(context["row_output"], peer_out)
    context.pop("row_output", None)
    del outputs, peer_out, f64

    # 3. timed calls, round robin over the workers (order rotated every round)
    print(f"# timing: {args.repeats} rounds over {len(workers)} worker(s) ...", flush=True)
    times = {name: [] for name in workers}
    cpu = {name: [] for name in workers}
    order = list(workers)
    try:
        for k in range(args.repeats):
            for name in order[k % len(order):] + order[:k % len(order)] if order else []:
                time.sleep(args.pause)
                t = workers[name].ask("time")
                if t.get("error"):
                    next(r for r in rows if r["method"] == name).setdefault("time_error", t["error"])
                    continue
                times[name].append(t["wall_ms"])
                cpu[name].append(t["cpu_ms"])
        if not args.no_memory:
            for mt in methods:
                if mt.name in workers and is_numpy_method(mt, device):
                    next(r for r in rows if r["method"] == mt.name).update(workers[mt.name].ask("tracemalloc"))
    finally:
        for w in workers.values():
            w.close()
    for r in rows:
        ts = times.get(r["method"])
        if ts:
            r["times_ms"], r["cpu_times_ms"] = ts, cpu[r["method"]]
            r["time_best_ms"] = min(ts)
            r["time_median_ms"] = statistics.median(ts)
            r["cpu_best_ms"] = min(cpu[r["method"]])
            r["gflops_eff"] = r["flops"] / (min(ts) / 1e3) / 1e9

    # 4. reference matrix products, each library in its own process
    print("# reference matrix products ...", flush=True)
    products = [("P", G, D, P)] + [(k, G, D, min(int(k[2:]), P))
                                   for k in dict.fromkeys(mt.product for mt in methods if mt.uses_cache)]
    gemm = {key: {"shape": f"({g}x{d})@({d}x{n})", "flops": 2.0 * g * d * n, "gflops": {}}
            for key, g, d, n in products}
    for lib in (("cupy", "torch") if device == "cuda" else ("numpy", "torch")):
        res = run_isolated(gemm_rates, lib, device, products)
        for key, rates in (res.items() if "error" not in res else ()):
            for precision, rate in rates.items():
                gemm[key]["gflops"][f"{lib} {precision}"] = rate
        if "error" in res:
            context[f"gemm_{lib}_error"] = res["error"]

    peer = next((r for r in rows if r["family"] == "peer" and r.get("time_best_ms")), None)
    for mt, r in zip(methods, rows):
        if r.get("error"):
            continue
        if peer and r.get("time_best_ms"):
            r["time_ratio_vs_peer"] = r["time_best_ms"] / peer["time_best_ms"]
            r["speedup_vs_peer"] = peer["time_best_ms"] / r["time_best_ms"]
        if peer and r.get("peak_extra_mib") is not None and peer.get("peak_extra_mib"):
            r["mem_ratio_vs_peer"] = r["peak_extra_mib"] / peer["peak_extra_mib"]
        if r.get("gflops_eff") and mt.product in gemm:
            f32, same = matmul_rate(gemm[mt.product], "float32"), matmul_rate(gemm[mt.product], mt.precision)
            r["matmul_gflops_f32"], r["matmul_gflops_same"] = f32, same
            r["share_f32"] = r["gflops_eff"] / f32 if f32 else None
            r["share_same"] = r["gflops_eff"] / same if same else None
    return {"G": G, "P": P, "D": D, "m": m, "flops_exact": 2.0 * G * (G + P) * D * (1 + nt),
            "memory_mechanism": mechanism, "gemm": gemm, "context": context, "rows": rows}


def matmul_rate(product: dict, precision: str):
    """Best rate over the libraries at one product shape in ``precision``; None if none measured it
    (float64, or TF32/bf16 on the CPU)."""
    rates = [v for k, v in product["gflops"].items() if k.split(" ", 1)[1] == precision and v]
    return max(rates) if rates else None


# --------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------
def _f(v, fmt):
    return "n/a" if v is None else format(v, fmt)


def _pct(v):
    return "n/a" if v is None else f"{100.0 * v:.0f}"


def _gf(flops: float) -> str:
    """GFLOP, readable at benchmark and at smoke-test sizes."""
    g = flops / 1e9
    return f"{g:.2f}" if g >= 0.1 else f"{g:.2e}"


def _err(e: str, n: int = 160) -> str:
    """An error message fit for one table cell."""
    e = " ".join(str(e).split()).replace("|", "/")
    return e if len(e) <= n else e[:n - 3] + "..."


def _md_row(lead, cells, error=None, width: int = 0) -> str:
    """One markdown table row: the ``lead`` cells, then ``cells``; for a failed method its
    ``error`` and empty cells up to ``width`` columns instead."""
    if error:
        cells = [f"error: {_err(error)}"] + [""] * (width - len(lead) - 1)
    return "| " + " | ".join(list(lead) + list(cells)) + " |"


def _gemm_text(gemm: dict) -> str:
    return "; ".join(f"{g['shape']}: " + (", ".join(f"{k} {v:.1f}" for k, v in g["gflops"].items() if v)
                                          or "n/a") for g in gemm.values())


def _spread_lines(rows) -> list[str]:
    spread = [r["time_median_ms"] / r["time_best_ms"] for r in rows if r.get("time_best_ms")]
    if not spread:
        return []
    return ["", f"timing spread, median/best: max {max(spread):.2f} over methods"
            + (" -- the machine was noisy or throttled during the run; compare best times"
               if max(spread) > 1.3 else "")]


def render(rows, meta) -> str:
    G, P, D, nt = meta["G"], meta["P"], meta["D"], meta["n_temperatures"]
    lines = [
        f"## Exact drifting field: G={G} queries, P={P} positives, D={D}, float32, "
        f"{nt} temperatures {meta['temperatures']} ({meta['device_name']})",
        "",
        f"flops counted: 2*G*(G+P)*D * (1 + n_temps) = {_gf(meta['flops'])} GFLOP "
        "(distances + one weighted sum per temperature; extra sweeps are not credited)",
        f"memory: peak extra of the first call in a fresh process ({meta['memory_mechanism']}); "
        f"one G x (G+P) float32 matrix = {G * (G + P) * 4 / MiB:.1f} MiB; output V = {G * D * 4 / MiB:.1f} MiB",
        "agreement: max|V - V_ref| / max|V_ref| over all entries; ref = peer float32 and peer float64",
        "",
        "| method | time best (ms) | time median (ms) | GFLOP/s eff. | % of f32 matmul | peak extra mem (MiB) "
        "| time / peer | mem / peer | max rel diff vs peer | max rel diff vs float64 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(_md_row([r["label"]], [] if r.get("error") else [
            _f(r.get("time_best_ms"), ".1f"), _f(r.get("time_median_ms"), ".1f"), _f(r.get("gflops_eff"), ".1f"),
            _pct(r.get("share_f32")), _f(r.get("peak_extra_mib"), ".1f"), _f(r.get("time_ratio_vs_peer"), ".2f"),
            _f(r.get("mem_ratio_vs_peer"), ".3f"), _f(r.get("max_rel_vs_peer"), ".2e"),
            _f(r.get("max_rel_vs_f64"), ".2e")], r.get("error"), 10))
    lines += ["", f"reference matrix products, GFLOP/s (best of 5, own process per library): {_gemm_text(meta['gemm'])}"]
    return "\n".join(lines + _spread_lines(rows) + _cpu_and_tracemalloc_lines(rows))


def _cpu_and_tracemalloc_lines(rows) -> list[str]:
    """Footer lines shared by the reports: CPU time per call and the tracemalloc cross-check."""
    lines = []
    cpu = [r for r in rows if r.get("cpu_best_ms") is not None]
    if cpu:
        lines += ["", "CPU time per call, best (all threads; spin-waiting included): " + "; ".join(
            f"{r['label']}: {r['cpu_best_ms']:.0f} ms" for r in cpu)]
    tm = [r for r in rows if r.get("tracemalloc_peak_mib") is not None]
    if tm:
        lines += ["", "cross-check, tracemalloc peak of one call (NumPy buffers only): " + "; ".join(
            f"{r['label']}: {r['tracemalloc_peak_mib']:.1f} MiB" for r in tm)]
    return lines


def render_projected(rows, meta) -> str:
    """Report of a run that includes projected methods: speed vs the peer, then cache and accuracy."""
    G, P, D, nt = meta["G"], meta["P"], meta["D"], meta["n_temperatures"]
    pj = meta["projected"]
    lines = [
        f"## Projected field vs the peers' full-matrix Algorithm 2: G={G} queries, P={P} positives, D={D}, "
        f"float32, {nt} temperature{'s' if nt > 1 else ''} {meta['temperatures']} ({meta['device_name']})",
        "",
        f"flops counted, peer and dxfield exact: 2*G*(G+P)*D * (1 + n_temps) = {_gf(meta['flops'])} GFLOP",
    ]
    for name, f in pj["flops"].items():
        lines.append(f"flops counted, {name}: 2*G*m*D + n_temps*2*G*m*(D+1) + 2*G*G*D + n_temps*2*G*G*D "
                     f"= {_gf(f)} GFLOP (m={pj['m'][name]}) -> bound on the speed-up at equal GFLOP/s: "
                     f"{meta['flops'] / f:.1f}x")
    lines += [
        f"memory: peak extra of the first call in a fresh process ({meta['memory_mechanism']}); the projected "
        "cache is built before the baseline (its size is in the second table); output V = "
        f"{G * D * 4 / MiB:.1f} MiB; one G x (G+P) float32 matrix = {G * (G + P) * 4 / MiB:.1f} MiB",
        "% of f32 matmul: achieved GFLOP/s / the best float32 matrix product of the method's own shape "
        "((G x D)@(D x P) for exact methods, (G x D)@(D x m) for projected ones)",
        "",
        "| method | time best (ms) | time median (ms) | GFLOP counted | GFLOP/s achieved | % of f32 matmul "
        "| peak extra mem (MiB) | speed-up vs peer | mem / peer |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(_md_row([r["label"]], [] if r.get("error") else [
            _f(r.get("time_best_ms"), ".1f"), _f(r.get("time_median_ms"), ".1f"), _gf(r["flops"]),
            _f(r.get("gflops_eff"), ".1f"), _pct(r.get("share_f32")), _f(r.get("peak_extra_mib"), ".1f"),
            _f(r.get("speedup_vs_peer"), ".1f"), _f(r.get("mem_ratio_vs_peer"), ".3f")], r.get("error"), 9))
    lines += ["", f"reference matrix products, GFLOP/s (best of 5, own process per library; measured after the "
                  f"timed calls: the machine's state during them): {_gemm_text(meta['gemm'])}"]
    peer_rate = next((r["gflops_eff"] for r in rows if r["family"] == "peer" and r.get("gflops_eff")), None)
    pr = [r for r in rows if r["family"] == "projected" and r.get("speedup_vs_peer")]
    if pr:
        lines.append("")
        for r in pr:
            verdict = "met" if r["speedup_vs_peer"] >= PROJECTED_GOAL else "NOT met"
            lines.append(f"goal: {r['label']} at least {PROJECTED_GOAL:.0f}x faster than the peer (best times): "
                         f"{r['speedup_vs_peer']:.1f}x -> {verdict} (flop bound "
                         f"{meta['flops'] / r['flops']:.1f}x; GFLOP/s projected / peer = "
                         f"{r['gflops_eff'] / peer_rate if peer_rate else float('nan'):.2f})")
    lines += _spread_lines(rows)
    lines += [
        "",
        f"### Projected cache and accuracy (feature scale S of the cache = {_f(pj.get('feature_scale'), '.4f')}, "
        f"fixed at build)",
        "",
        "error vs row field: ||V_proj - V_row||_F / ||V_row||_F and max|V_proj - V_row| / max|V_row|, "
        "V_row = dxfield.drift_field(x, pos, normalization='row', feature_scale=S), the exact field the "
        "projected one approximates (docs/design.md section 2.2); attraction err = pf.diagnostics(x, pos) (|b+_proj - b+| / "
        "|b+ - x|, per temperature); cancellation = |b+ - x| / |b+ - b-| (exact, per temperature): the exact "
        "repulsion is shared, so the field's error is about attraction err x cancellation",
        "",
        "| method | m | build time (s) | cache f32 (MiB) | host f64 (MiB) | memory of build (MiB) "
        "| err vs row (Frobenius) | max rel vs row | attraction err | cancellation | fallback rows |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lst = lambda v, fmt: "n/a" if not v else ", ".join(_f(e, fmt) for e in v)  # noqa: E731
    for r in rows:
        if r["family"] not in CACHE_FAMILIES:
            continue
        error = r.get("error") or r.get("accuracy_error")
        fb = r.get("fallback_rows") or {}
        lines.append(_md_row([r["label"]], [] if error else [
            str(r.get("m", "n/a")), _f(r.get("build_s"), ".2f"), _f(r.get("cache_mib_f32"), ".1f"),
            _f(r.get("cache_mib_f64_host"), ".1f"), _f(r.get("build_mem_mib"), ".1f"),
            _f(r.get("fro_rel_vs_row"), ".3e"), _f(r.get("max_rel_vs_row"), ".3e"),
            lst(r.get("attraction_relative_error"), ".3e"), lst(r.get("cancellation"), ".2f"),
            f"attraction {lst(fb.get('attraction_fallback_rows'), 'd')}, "
            f"repulsion {fb.get('repulsion_fallback_rows', 'n/a')}"], error, 11))
    ctx = meta.get("context") or {}
    lines += [""]
    if ctx.get("row_vs_peer"):
        c = ctx["row_vs_peer"]
        lines.append(
            f"context: exact row field (S={_f(ctx.get('feature_scale_cache'), '.4f')}) vs the peer's bidirectional "
            f"field (S={_f(ctx.get('feature_scale_peer'), '.4f')}, from all query-target pairs): Frobenius "
            f"{c['fro_rel']:.3e}, max rel {c['max_rel']:.3e} -- different fields by design (row-normalised mean "
            "shift, docs/design.md section 2.2, vs Algorithm 2's row x column normalisation, 2.1), so this is not an error "
            "of either; the projected field is measured against the row field above")
    for r in rows:
        if r.get("max_rel_vs_peer") is not None and r["family"] != "peer":
            what = "same field" if r["family"] not in CACHE_FAMILIES else "different field, for context"
            lines.append(f"{r['label']} vs peer ({what}): max rel {r['max_rel_vs_peer']:.3e}, "
                         f"Frobenius {_f(r.get('fro_rel_vs_peer'), '.3e')}")
    return "\n".join(lines + _cpu_and_tracemalloc_lines(rows))


def _vs_ref(r) -> str:
    if r.get("max_rel_vs_ref") is None:
        return ""
    text = f"{r['max_rel_vs_ref']:.1e} vs {r['ref_method']}"
    if r.get("ref_goal") is not None:
        text += f" (goal {r['ref_goal']:.0e}: {'met' if r['max_rel_vs_ref'] <= r['ref_goal'] else 'NOT met'})"
    return text


def render_grid(data) -> str:
    """The grid report: one table over all shapes, the reference products, then the key figures."""
    meta, shapes = data["meta"], data["shapes"]
    mech = next((s["memory_mechanism"] for s in shapes if s["memory_mechanism"] != "skipped"), "skipped")
    lines = [
        f"## Drifting fields over a grid of shapes: {meta['device_name']}, float32 inputs, "
        f"temperatures {meta['temperatures']}, {meta['repeats']} timed calls per method",
        "",
        "flops counted (T temperatures): exact methods (peer, dxfield, fused) 2*G*(G+P)*D*(1+T); projected "
        "2*G*m*D + T*2*G*m*(D+1) + 2*G*G*D + T*2*G*G*D; attraction 2*G*m*D + T*2*G*m*(D+1)",
        "% mm: achieved GFLOP/s / the best float32 matrix product of the method's own shape on this device "
        "((G x D)@(D x P) for exact methods, (G x D)@(D x m) for projected and attraction); % same-prec. mm: "
        "/ the product in the method's precision (TF32, bf16)",
        f"memory: peak extra of the first call in a fresh process ({mech})",
        "agreement (max|V - V_ref| / max|V_ref|): vs peer -- the same field for exact methods, a different one "
        "for projected (context); vs ref -- fused vs dxfield composed (goal <= 1e-5 float32, <= 1e-3 TF32), "
        "tf32/bf16 vs the float32 method; vs row -- projected vs the exact row-normalised field it "
        "approximates (Frobenius)",
        "",
        "| G | P | D | m | method | best ms | median ms | GFLOP | GFLOP/s | % f32 mm | % same-prec. mm "
        "| peak extra MiB | speed-up vs peer | max rel vs peer | vs ref (max rel) | vs row (Frobenius) |",
        "|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for s in shapes:
        for r in s["rows"]:
            lead = [str(s["G"]), str(s["P"]), str(s["D"]), str(r.get("m", "")), r["label"]]
            row_err = r.get("fro_rel_vs_row")
            lines.append(_md_row(lead, [] if r.get("error") else [
                _f(r.get("time_best_ms"), ".2f"), _f(r.get("time_median_ms"), ".2f"), _gf(r["flops"]),
                _f(r.get("gflops_eff"), ".1f"), _pct(r.get("share_f32")), _pct(r.get("share_same")),
                _f(r.get("peak_extra_mib"), ".1f"), _f(r.get("speedup_vs_peer"), ".2f"),
                _f(r.get("max_rel_vs_peer"), ".1e"), _vs_ref(r), _f(row_err, ".2e") if row_err is not None else ""],
                r.get("error"), 16))
    lines += ["", "reference matrix products, GFLOP/s (best of 5, own process per library, after the timed calls):"]
    for s in shapes:
        lines.append(f"- G={s['G']} P={s['P']} D={s['D']}: {_gemm_text(s['gemm'])}")
    notes = []
    for s in shapes:
        for key, v in (s.get("context") or {}).items():
            if key.endswith("_error"):
                notes.append(f"- {shape_name((s['G'], s['P'], s['D'], s['m']))}: {key}: {_err(v)}")
        for r in s["rows"]:
            for key in ("accuracy_error", "time_error"):
                if r.get(key):
                    notes.append(f"- {shape_name((s['G'], s['P'], s['D'], s['m']))}: {r['label']}: {key}: "
                                 f"{_err(r[key])}")
    if notes:
        lines += ["", "notes:"] + notes
    lines += _spread_lines([r for s in shapes for r in s["rows"]])
    return "\n".join(lines)


def _pick(shape: dict, family: str, precision: str = "float32"):
    """The first row of ``family`` in ``precision`` at a shape, if it ran."""
    return next((r for r in shape["rows"] if r["family"] == family and r["precision"] == precision), None)


def summarize(data) -> str:
    """The key figures of a grid run: one column per shape, best times (``--summarize FILE``)."""
    shapes = data.get("shapes") or []
    if not shapes:
        return "### Key figures: no shape finished" + ("" if data.get("complete", True) else " (run cut short)")
    goal = tuple(GOAL_SHAPE)

    def get(family, key, precision="float32", fmt=".2f", scale=1.0):
        def cell(s):
            r = _pick(s, family, precision)
            v = None if r is None else r.get(key)
            return None if v is None else format(v * scale, fmt)
        return cell

    def joined(*cells):
        def cell(s):
            vals = [c(s) for c in cells]
            return None if all(v is None for v in vals) else " / ".join(v or "n/a" for v in vals)
        return cell

    def goal_cell(family, precision):
        def cell(s):
            r = _pick(s, family, precision)
            if r is None or r.get("max_rel_vs_ref") is None:
                return None
            g = FUSED_GOAL[precision]
            return f"{r['max_rel_vs_ref']:.1e} ({'met' if r['max_rel_vs_ref'] <= g else 'NOT met'})"
        return cell

    def gemm_cell(product_of, precisions=("float32", "tf32", "bf16")):
        def cell(s):
            key = product_of(s)
            g = s["gemm"].get(key) if key else None
            if not g:
                return None
            vals = [matmul_rate(g, p) for p in precisions]
            return " / ".join(_f(v, ".0f") for v in vals)
        return cell

    def errors(s):
        errs = [f"{r['method']}: {_err(r['error'], 70)}" for r in s["rows"] if r.get("error")]
        return "; ".join(errs) if errs else None

    prec3 = ("float32", "tf32", "bf16")
    metrics = [
        ("peer time, best (ms)", get("peer", "time_best_ms")),
        ("dxfield composed / fused / fused-tf32 time (ms)",
         joined(get("dxfield", "time_best_ms"), get("fused", "time_best_ms"),
                get("fused", "time_best_ms", "tf32"))),
        ("speed-up vs peer: fused", get("fused", "speedup_vs_peer")),
        ("speed-up vs peer: fused-tf32x3 (float32-accurate)", get("fused", "speedup_vs_peer", "tf32x3")),
        ("speed-up vs peer: fused-tf32", get("fused", "speedup_vs_peer", "tf32")),
        ("speed-up vs peer: dxfield composed", get("dxfield", "speedup_vs_peer")),
        ("exact GFLOP/s: peer / composed / fused / fused-tf32",
         joined(get("peer", "gflops_eff", fmt=".0f"), get("dxfield", "gflops_eff", fmt=".0f"),
                get("fused", "gflops_eff", fmt=".0f"), get("fused", "gflops_eff", "tf32", fmt=".0f"))),
        ("exact share of f32 matmul (%): peer / composed / fused / fused-tf32",
         joined(get("peer", "share_f32", fmt=".0f", scale=100), get("dxfield", "share_f32", fmt=".0f", scale=100),
                get("fused", "share_f32", fmt=".0f", scale=100),
                get("fused", "share_f32", "tf32", fmt=".0f", scale=100))),
        ("peak extra memory (MiB): peer / composed / fused / fused-tf32",
         joined(get("peer", "peak_extra_mib", fmt=".0f"), get("dxfield", "peak_extra_mib", fmt=".0f"),
                get("fused", "peak_extra_mib", fmt=".0f"), get("fused", "peak_extra_mib", "tf32", fmt=".0f"))),
        (f"fused vs composed, max rel (goal {FUSED_GOAL['float32']:.0e})", goal_cell("fused", "float32")),
        (f"fused-tf32x3 vs composed, max rel (goal {FUSED_GOAL['tf32x3']:.0e})", goal_cell("fused", "tf32x3")),
        (f"fused-tf32 vs composed, max rel (goal {FUSED_GOAL['tf32']:.0e})", goal_cell("fused", "tf32")),
        ("max rel vs peer: composed / fused / fused-tf32",
         joined(get("dxfield", "max_rel_vs_peer", fmt=".1e"), get("fused", "max_rel_vs_peer", fmt=".1e"),
                get("fused", "max_rel_vs_peer", "tf32", fmt=".1e"))),
        ("projected speed-up vs peer: f32 / tf32 / bf16",
         joined(*(get("projected", "speedup_vs_peer", p, fmt=".1f") for p in prec3))),
        ("projected vs exact row field, Frobenius: f32 / tf32 / bf16",
         joined(*(get("projected", "fro_rel_vs_row", p, fmt=".1e") for p in prec3))),
        ("attraction time (ms): f32 / tf32 / bf16",
         joined(*(get("attraction", "time_best_ms", p, fmt=".3f") for p in prec3))),
        ("attraction GFLOP/s: f32 / tf32 / bf16",
         joined(*(get("attraction", "gflops_eff", p, fmt=".0f") for p in prec3))),
        ("attraction share of matmul, same precision (%): f32 / tf32 / bf16",
         joined(*(get("attraction", "share_same", p, fmt=".0f", scale=100) for p in prec3))),
        ("attraction share of f32 matmul (%): f32 / tf32 / bf16",
         joined(*(get("attraction", "share_f32", p, fmt=".0f", scale=100) for p in prec3))),
        ("attraction tf32 / bf16 vs f32, max rel",
         joined(get("attraction", "max_rel_vs_ref", "tf32", fmt=".1e"),
                get("attraction", "max_rel_vs_ref", "bf16", fmt=".1e"))),
        ("matmul GFLOP/s (GxD)@(DxP): f32 / tf32 / bf16", gemm_cell(lambda s: "P")),
        ("matmul GFLOP/s (GxD)@(Dxm): f32 / tf32 / bf16",
         gemm_cell(lambda s: next((k for k in s["gemm"] if k.startswith("m=")), None))),
        ("errors", errors),
    ]
    cols = [shape_name((s["G"], s["P"], s["D"], s["m"])) + (" (goal)" if (s["G"], s["P"], s["D"], s["m"]) == goal
                                                            else "") for s in shapes]
    lines = ["### Key figures (best times; " + (data.get("meta") or {}).get("device_name", "?")
             + ("" if data.get("complete", True) else "; run cut short: shapes that finished") + ")", "",
             "| | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for label, cell in metrics:
        vals = [cell(s) for s in shapes]
        if all(v is None for v in vals):
            continue
        lines.append(f"| {label} | " + " | ".join(v if v is not None else "n/a" for v in vals) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------
def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=sorted(SUITES), default="exact",
                   help="preset for every option not given: 'exact' (default): G=1024 P=16384 D=512, "
                        "temperatures 0.02 0.05 0.2, peer vs dxfield; 'projected': G=1024 P=65536 D=512, "
                        "m=1024, temperature 0.05, peer vs dxfield vs projected (m=1024 and 512), 5 repeats; "
                        "'grid': every method over a grid of shapes (--grid), temperature 0.05")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu (NumPy inputs; default) or cuda (CuPy inputs, the peer in torch on the same GPU)")
    p.add_argument("--grid", nargs="+", default=None, metavar="GxPxD[xm]",
                   help="shapes of the grid suite, e.g. 4096x65536x512x1024 (m defaults to --landmarks); "
                        "default: a CPU grid or the GPU goal grid (see the module docstring)")
    p.add_argument("-G", type=int, default=None, help="generated samples (queries), default 1024")
    p.add_argument("-P", type=int, default=None, help="positives, default 16384 (projected suite: 65536)")
    p.add_argument("-D", type=int, default=None, help="feature dimension, default 512")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed calls per method after the warm-up (default 7; projected suite: 5; "
                        "grid: 3 on the CPU, 5 on a GPU)")
    p.add_argument("--methods", nargs="+", default=None,
                   help="peer, peer-f64, dxfield, dxfield@<budget>, fused, fused-tf32, bidirectional, "
                        "projected[-tf32|-bf16][@m=<m>], attraction[-tf32|-bf16][@m=<m>]; "
                        f"default: {' '.join(DEFAULT_METHODS)} (projected suite: "
                        f"{' '.join(SUITES['projected']['methods'])}; grid: {' '.join(GRID_METHODS['cpu'])} "
                        f"on the CPU, {' '.join(GRID_METHODS['cuda'])} on a GPU)")
    p.add_argument("--temperatures", type=float, nargs="+", default=None,
                   help="temperatures of every method (default 0.02 0.05 0.2; projected and grid suites: 0.05)")
    p.add_argument("--landmarks", "-m", type=int, default=None,
                   help=f"landmarks of the plain projected/attraction methods (default {DEFAULT_LANDMARKS}; "
                        "grid: each shape's m)")
    p.add_argument("--memory-budget", default=None,
                   help="memory_budget for the plain 'dxfield' and 'fused' methods (e.g. 48MiB); "
                        "default: dxfield's own")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pause", type=float, default=None,
                   help="seconds of idle before each timed call, so the previous worker's threads stop spinning "
                        "(default 0.3 on the CPU, 0.05 on a GPU)")
    p.add_argument("--quick", action="store_true",
                   help="tiny smoke run: G=64, P=512, D=32, 3 repeats (projected suite: m=128; grid: "
                        "64x512x32x64 and 128x1024x64x128)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--no-f64", action="store_true",
                   help="skip the float64 peer used as ground truth (the projected and grid suites always skip it)")
    p.add_argument("--profile", action="store_true", help="also print a cProfile of one dxfield call (CPU)")
    p.add_argument("--out", default=None,
                   help="JSON path (default bench/results/field-<host-kind>.json; projected suite: "
                        "field-projected-<host-kind>.json; grid: field-grid-<host-kind>.json; host kind "
                        "e.g. cpu2, h100, h200; '-quick' added for --quick)")
    p.add_argument("--summarize", metavar="FILE", default=None,
                   help="print the key figures of a grid JSON written earlier, and exit")
    return p


def resolve_args(args):
    """Fill the options left unset from the suite preset (and --quick); ``args.shapes`` = [(G, P, D, m)]."""
    preset = SUITES[args.suite]
    repeats_given = args.repeats is not None

    def pick(value):
        return value[args.device] if isinstance(value, dict) else value

    for key in ("repeats", "methods", "temperatures"):
        if getattr(args, key) is None:
            setattr(args, key, list(pick(preset[key])) if key != "repeats" else pick(preset[key]))
    if args.suite == "grid":
        if any(getattr(args, k) is not None for k in ("G", "P", "D")):
            raise SystemExit("--suite grid takes its shapes from --grid GxPxD[xm] ..., not -G/-P/-D")
        m_default = args.landmarks if args.landmarks is not None else preset["landmarks"]
        if args.grid:
            args.shapes = [parse_shape(s, m_default) for s in args.grid]
        else:
            args.shapes = list(GRIDS["quick"] if args.quick else pick(preset["grid"]))
            if args.landmarks is not None:
                args.shapes = [(G, P, D, args.landmarks) for G, P, D, _ in args.shapes]
        args.landmarks = m_default
        args.no_f64 = True  # the float64 peer checks Algorithm 2 itself: the exact suite's business
    else:
        if args.grid:
            raise SystemExit("--grid needs --suite grid (the other suites take -G -P -D)")
        quick = dict(G=64, P=512, D=32) if args.quick else {}
        for key in ("G", "P", "D", "landmarks"):
            if getattr(args, key) is None:
                setattr(args, key, quick.get(key, preset[key]))
        if args.quick and args.suite == "projected":
            args.landmarks = min(args.landmarks, 128)
        if args.suite == "projected":
            args.no_f64 = True
        args.shapes = [(args.G, args.P, args.D, args.landmarks)]
    if args.quick and not repeats_given:
        args.repeats = 3
    if args.pause is None:
        args.pause = 0.05 if args.device == "cuda" else 0.3
    args.methods = list(dict.fromkeys(args.methods))
    args.temperatures = tuple(float(t) for t in args.temperatures)
    for name in args.methods:  # unknown names stop the run before anything starts
        parse_method(name, args.memory_budget, args.landmarks)
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.summarize:
        print(summarize(json.loads(Path(args.summarize).read_text())))
        return 0
    args = resolve_args(args)
    if args.device == "cuda" and not gpu_available():
        raise SystemExit("--device cuda: no usable CUDA GPU here (dxfield.cuda_available() is False); "
                         "run on a GPU machine or use --device cpu")
    device_name = (gpu_name() or "GPU") if args.device == "cuda" else f"CPU, {os.cpu_count()} cores"
    temps = args.temperatures
    meta = {
        "suite": args.suite, "device": args.device, "device_name": device_name, "dtype": "float32",
        "seed": args.seed, "temperatures": list(temps), "n_temperatures": len(temps),
        "repeats": args.repeats, "pause_s": args.pause, "memory_budget": args.memory_budget,
        "methods": args.methods,
        "agreement_metric": "max|V - V_ref| / max|V_ref| (max_rel); ||V - V_ref||_F / ||V_ref||_F (fro_rel)",
        "timing": "one spawned process per method; its first call (memory run) is the warm-up; timed calls "
                  "round robin over methods" + ("; GPU calls synchronised before and after"
                                                if args.device == "cuda" else ""),
    }
    stem = {"exact": "field", "projected": "field-projected", "grid": "field-grid"}[args.suite]
    out = Path(args.out) if args.out else HERE / "results" / f"{stem}-{host_kind(args.device)}" \
                                                             f"{'-quick' if args.quick else ''}.json"
    print(f"# bench/field.py: suite={args.suite} device={args.device} ({device_name}) "
          f"shapes={[shape_name(s) for s in args.shapes]} temperatures={list(temps)} repeats={args.repeats} "
          f"methods={args.methods}", flush=True)

    if args.suite == "grid":
        data = {"benchmark": "bench/field.py", "argv": argv, "complete": False, "meta": meta, "shapes": []}
        for shape in args.shapes:
            data["shapes"].append(measure_shape(args, shape))
            write_json_atomic(out, data)  # a run cut short keeps the shapes it finished
        data.update(complete=True, machine=machine_info(args.device))
        print()
        print(render_grid(data))
        print()
        print(summarize(data))
        write_json_atomic(out, data)
        print(f"\nwrote {out}")
        return 0

    res = measure_shape(args, args.shapes[0])
    rows, context = res.pop("rows"), res["context"]
    meta.update(res, flops=res["flops_exact"], flops_formula="2*G*(G+P)*D * (1 + n_temps)")
    projected = [r for r in rows if r["family"] == "projected"]
    if projected:
        scale = next((r["feature_scale_cache"] for r in projected if r.get("feature_scale_cache")), None)
        context["feature_scale_cache"] = scale
        if context.get("row_vs_peer"):
            context["feature_scale_peer"] = peer_scale(*make_data(args.G, args.P, args.D, seed=args.seed))
        meta["projected"] = {
            "landmarks_default": args.landmarks, "landmark_method": "uniform", "repulsion": "exact",
            "drift_norm": True, "feature_scale": scale,
            "flops_formula": "2*G*m*D + n_temps*2*G*m*(D+1) + 2*G*G*D + n_temps*2*G*G*D",
            "flops": {r["label"]: r["flops"] for r in projected},
            "m": {r["label"]: r["m"] for r in projected},
            "goal_speedup": PROJECTED_GOAL,
            "cache_mib_formula": "f32: 4*(m*D + n_temps*(m*(D+1) + m*m)); f64_host: 8*(m*D + n_temps*(m*m + m*D + m))",
            "error_reference": "dxfield.drift_field(x, pos, normalization='row', temperatures, feature_scale=S_cache, "
                               "engine='composed')",
        }
    print()
    print(render_projected(rows, meta) if projected else render(rows, meta))

    if args.profile:
        print("\n## cProfile of one dxfield call (default budget, own process), by own time\n")
        print(run_isolated(profile_dxfield, args.G, args.P, args.D, args.seed, args.memory_budget, 18, temps))

    write_json_atomic(out, {"benchmark": "bench/field.py", "argv": argv, "meta": meta,
                            "machine": machine_info(args.device), "rows": rows})
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
