"""Shared pytest configuration: the ``needs_cuda`` / ``needs_ext`` markers and RNG hygiene.

Kernel-test hooks come first; further shared fixtures may follow.
"""

from __future__ import annotations

import random

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_cuda: requires a CUDA device (skipped otherwise)")
    config.addinivalue_line(
        "markers", "needs_ext: requires the compiled extension hutchtrace._C (skipped otherwise)"
    )


def pytest_collection_modifyitems(config, items):
    # Only decide here, never at import: torch.cuda.is_available() is safe without a GPU.
    wants_cuda = any(item.get_closest_marker("needs_cuda") for item in items)
    wants_ext = any(item.get_closest_marker("needs_ext") for item in items)
    cuda_ok = torch.cuda.is_available() if wants_cuda else True
    ext_ok, ext_reason = True, ""
    if wants_ext:
        from hutchtrace.kernels import loader

        ext_ok, ext_reason = loader.HAS_EXT, str(loader.LOAD_ERROR)
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    skip_ext = pytest.mark.skip(reason=f"needs the compiled extension ({ext_reason})")
    for item in items:
        if not cuda_ok and item.get_closest_marker("needs_cuda"):
            item.add_marker(skip_cuda)
        if not ext_ok and item.get_closest_marker("needs_ext"):
            item.add_marker(skip_ext)


@pytest.fixture(autouse=True)
def _restore_rng_state():
    """Restore the python, numpy and torch (and initialised CUDA) RNG states after each test."""
    py_state = random.getstate()
    try:
        import numpy as np

        np_state = np.random.get_state()
    except ImportError:  # pragma: no cover
        np, np_state = None, None
    torch_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    yield
    random.setstate(py_state)
    if np is not None:
        np.random.set_state(np_state)
    torch.set_rng_state(torch_state)
    if cuda_states is not None:
        torch.cuda.set_rng_state_all(cuda_states)


# The suite runs tiny models: intra-op threads only add overhead, and on a loaded 2-core
# machine OpenMP spin-waits slow small ops down by an order of magnitude. Tests that
# exercise parallel kernels set their own thread count.
torch.set_num_threads(1)
