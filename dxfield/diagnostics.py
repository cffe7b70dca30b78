"""Fidelity of a projected field's cache at probe points: what to log while training.

:func:`fidelity` compares the projected attraction with the exact
row-normalised barycentre over real samples, counts fallback rows, measures
how far the probes are from the nearest landmark, and reports each shard's
conditioning (docs/design.md sections 2.4 and 3.5).
"""

from __future__ import annotations

import math

import numpy as np

from . import checks
from .attraction import row_attraction
from .backend import device_context, to_host
from .kernels import logit_coef, sq_norms
from .landmarks import nearest
from .repulsion import exact_barycentres


def fidelity(pf, x, pos=None, *, labels=None, backend=None) -> dict:
    """Fidelity of the cache at probe points ``x`` (e.g. the current generated batch).

    Returns a JSON-ready dict: per temperature the relative error of the
    projected attraction against the exact row-normalised barycentre over
    ``pos`` (when given), rows that took the fallback, the distance from
    each probe to its nearest landmark (p50/p95/max, in units of
    ``S * sqrt(D)`` when scaled), and each shard's condition numbers and
    effective ranks.
    """
    q = pf.place_queries(x, {"pos": pos}, backend, True)
    placement, xp, xa, a = q.placement, q.xp, q.x, q.arrays
    with device_context(placement):
        groups, _ = pf.class_groups(labels, xa.shape[0])
        bs, fallback = row_attraction(pf, xp, xa, groups)
        dev = pf.on_device(placement)
        xc = xa - dev["centre"]
        _, d2 = nearest(xp, xc, sq_norms(xc), dev["uc_all"], budget=pf.memory_budget, tt=dev["uu_all"])
        unit = 1.0 if pf.feature_scale is None else pf.feature_scale * math.sqrt(pf.dim)
        dist = np.sqrt(np.maximum(to_host(d2).astype(np.float64), 0.0)) / unit
        report = {
            "temperatures": list(pf.temperatures),
            "n_landmarks": pf.n_landmarks,
            "n_samples": pf.n_samples,
            "attraction_fallback_rows": fallback,
            "nearest_landmark_distance": {"p50": float(np.percentile(dist, 50)),
                                          "p95": float(np.percentile(dist, 95)), "max": float(dist.max())},
            "shards": [{"label": s.label, "m": s.m, "n": s.n,
                        "condition_number": [sp["condition_number"] for sp in s.spectra],
                        "effective_rank": [sp["effective_rank"] for sp in s.spectra],
                        "n_clamped": [sp["n_clamped"] for sp in s.spectra],
                        "eigenvalue_range": [[sp.get("eigenvalue_min"), sp.get("eigenvalue_max")]
                                             for sp in s.spectra]} for s in pf.shards],
        }
        if a.get("pos") is not None:
            pa = checks.float_matrix(a["pos"], "pos", pf.dtype, dim=pf.dim)
            coefs = [logit_coef(pf.kernel, t) for t in pf.taus]
            errs = []
            if groups is None:
                # relative error of the attraction displacement b+(x) - x (translation invariant)
                exact = exact_barycentres(xp, xa, pa, coefs, pf.kernel, pf.memory_budget)
                mu = xa.mean(axis=0)
                for k in range(len(pf.temperatures)):
                    ex = exact[k] + mu
                    errs.append(float(xp.linalg.norm(bs[k] + dev["centre"] - ex))
                                / max(float(xp.linalg.norm(ex - xa)), 1e-300))
            report["attraction_relative_error"] = errs if errs else None
        return report
