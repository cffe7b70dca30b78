"""The run folder: everything a training run writes, each file atomically.

A run folder holds ``config.json``, ``metrics.jsonl``, ``checkpoint.pt``,
``samples/*.png``, ``summaries/`` and ``eval.json``.  Every write goes through
:mod:`dxfield.atomic`, so an interrupted run never leaves a half-written file.
"""

from __future__ import annotations

import json

import torch

from dxfield.atomic import atomic_write


def atomic_torch_save(obj, path: str) -> None:
    """``torch.save`` to a temp file in the same folder, fsync, then rename over ``path``."""
    atomic_write(path, lambda fh: torch.save(obj, fh), "wb")


def write_json(path: str, obj) -> None:
    """``obj`` as indented JSON (NumPy scalars as floats), atomically."""
    atomic_write(path, lambda fh: json.dump(obj, fh, indent=1, default=float), "w")
