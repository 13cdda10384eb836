"""Shared benchmark fixtures: sizes, block counts, devices and a device-synchronising timer."""

from __future__ import annotations

import pytest
import torch

SIZES = [100_000, 1_000_000, 10_000_000]
BLOCKS = [10, 100, 1000]


def _int_list(text: str) -> list[int]:
    return [int(float(v)) for v in text.split(",") if v.strip()]


def pytest_addoption(parser):
    parser.addoption(
        "--bench-sizes",
        default=",".join(map(str, SIZES)),
        help="comma-separated parameter counts P (e.g. 1e5,1e6)",
    )
    parser.addoption(
        "--bench-blocks",
        default=",".join(map(str, BLOCKS)),
        help="comma-separated block counts L (e.g. 10,100)",
    )


def pytest_generate_tests(metafunc):
    if "P" in metafunc.fixturenames:
        metafunc.parametrize(
            "P", _int_list(metafunc.config.getoption("--bench-sizes")), ids=lambda p: f"P={p:.0e}"
        )
    if "L" in metafunc.fixturenames:
        metafunc.parametrize(
            "L", _int_list(metafunc.config.getoption("--bench-blocks")), ids=lambda v: f"L={v}"
        )
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.needs_cuda)])


def pytest_configure(config):
    import os

    # A smoke run (--benchmark-disable) times nothing: its tables must not replace the
    # committed results under bench/results/ (models.write_results reads this).
    if config.getoption("benchmark_disable", default=False):
        os.environ.setdefault("HUTCHTRACE_BENCH_OUT", "/tmp/hutchtrace-bench")


def pytest_collection_modifyitems(config, items):
    from hutchtrace.kernels import loader

    cuda_ok = torch.cuda.is_available() and loader.cuda_compiled()
    for item in items:
        if item.get_closest_marker("needs_cuda") and not cuda_ok:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device and the CUDA kernels"))
        if item.get_closest_marker("needs_ext") and not loader.HAS_EXT:
            item.add_marker(pytest.mark.skip(reason=f"needs the compiled extension ({loader.LOAD_ERROR})"))


@pytest.fixture
def run(benchmark):
    """``run(fn, device, rounds)``: time ``fn`` with the device synchronised inside the timing."""

    def _run(fn, device, rounds=5):
        def timed():
            out = fn()
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize()
            return out

        return benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)

    return _run


def rounds_for(P: int) -> int:
    """Fewer rounds for the big sizes: the reference path is slow there."""
    return 10 if P <= 100_000 else (5 if P <= 1_000_000 else 3)
