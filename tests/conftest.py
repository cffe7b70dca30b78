"""Shared fixtures for the dxfield suite.

* ``xp`` -- the array namespace a test feeds dxfield with, parametrised over
  NumPy and CuPy.  The CuPy case is skipped cleanly unless CuPy imports *and*
  sees a CUDA device (``dxfield.cupy_available()``); with
  ``DXFIELD_REQUIRE_GPU=1`` (tox env ``gpu``) a missing GPU is an error
  instead of a skip, so a GPU run cannot silently test nothing.
* ``rng`` -- a seeded NumPy generator, fresh per test.

Tests marked ``gpu`` are skipped the same way when no GPU is usable.
"""

import os
import sys
import tempfile

import numpy as np
import pytest

import dxfield

# Make the dense reference (tests/reference.py) and helpers importable whatever
# pytest's import mode is.
sys.path.insert(0, os.path.dirname(__file__))


def _gpu_required() -> bool:
    return os.environ.get("DXFIELD_REQUIRE_GPU", "").strip() not in ("", "0")


def _skip_without_gpu() -> None:
    if dxfield.cupy_available():
        return
    why = "CuPy with a usable CUDA GPU is not available"
    if _gpu_required():
        pytest.fail(f"DXFIELD_REQUIRE_GPU is set but {why}")
    pytest.skip(why)


def pytest_configure(config):
    # Also registered in pyproject.toml; repeated so the suite runs from any rootdir.
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU and CuPy (skipped cleanly without them)")
    # Feature files and the digits classifier go to a cache of the session's own, not the user's.
    os.environ["DXTRAIN_CACHE"] = tempfile.mkdtemp(prefix="dxtrain-test-cache-")


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu") is not None:
        _skip_without_gpu()


@pytest.fixture(scope="session", params=["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def xp(request):
    """The array namespace inputs are given in: ``numpy`` or ``cupy``."""
    if request.param == "numpy":
        return np
    _skip_without_gpu()
    import cupy

    return cupy


@pytest.fixture
def rng():
    return np.random.default_rng(20240613)
