"""cudasim: hutchtrace's CUDA kernels, executed on the CPU by an emulator written for them.

The emulator (``include/cudasim/cudasim.h``) runs the real ``csrc/cuda/*.cu`` sources,
compiled by g++ (``build.py``), as ``torch.ops.hutchtrace_emu.*`` on CPU tensors. The
kernel tests run them under several schedules (thread and block order, SM count); see
``tests/cuda_backends.py``.

Environment:
    HUTCHTRACE_CUDASIM=1            run the emulated tests (builds the library, cached under
                                    build/cudasim/, about 2 minutes on 2 cores the first time)
    HUTCHTRACE_CUDASIM_LIB=PATH     load this prebuilt library instead (the mutation check
                                    points it at a build of a planted defect)
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

ENV_ENABLE = "HUTCHTRACE_CUDASIM"
ENV_LIB = "HUTCHTRACE_CUDASIM_LIB"
NAMESPACE = "hutchtrace_emu"
HARDWARE_MAX_GRID_Y = 65535


@dataclass(frozen=True)
class Schedule:
    """How the emulator orders work: which runnable thread of a block resumes first, in which
    order blocks run, and the SM count that grid sizing sees (8 blocks per SM)."""

    thread_order: str  # "forward" | "reverse" | "random"
    block_order: str
    seed: int
    sm_count: int

    @property
    def id(self) -> str:
        short = {"forward": "fwd", "reverse": "rev", "random": f"rnd{self.seed}"}
        order = short[self.thread_order]
        if self.block_order != self.thread_order:
            order += "-" + short[self.block_order]
        return f"emu-{order}-sm{self.sm_count}"


#: Every emulated test runs under each of these: three thread orders, three block orders,
#: three SM counts (1 SM: grid-stride loops iterate over many items per thread; 132: an H100).
SCHEDULES = (
    Schedule("forward", "forward", 0, 1),
    Schedule("reverse", "reverse", 0, 132),
    Schedule("random", "random", 1, 3),
)

_OPS = None


def enabled() -> bool:
    """Whether the emulated tests should run (``HUTCHTRACE_CUDASIM=1`` or a library path given)."""
    return os.environ.get(ENV_ENABLE, "0") not in ("", "0", "false", "False") or bool(os.environ.get(ENV_LIB))


def library_path() -> Path:
    """The emulated extension: ``HUTCHTRACE_CUDASIM_LIB``, or a (cached) build of this checkout."""
    given = os.environ.get(ENV_LIB)
    if given:
        return Path(given)
    from .build import build

    return build()


def load():
    """Load the emulated extension once; returns ``torch.ops.hutchtrace_emu``."""
    global _OPS
    if _OPS is None:
        import torch

        torch.ops.load_library(str(library_path()))
        from hutchtrace.kernels import fake

        fake.register_fakes(NAMESPACE)
        _OPS = getattr(torch.ops, NAMESPACE)
    return _OPS


def configure(schedule: Schedule, max_grid_y: int = HARDWARE_MAX_GRID_Y) -> None:
    """Set the schedule for the following launches (also clears the launch log)."""
    load()._cudasim_configure(
        schedule.thread_order, schedule.block_order, schedule.seed, schedule.sm_count, max_grid_y
    )


@contextlib.contextmanager
def grid_y_limit(max_grid_y: int):
    """Launches inside see a device whose grid.y limit is ``max_grid_y`` (hardware: 65535),
    so that code splitting launches at that limit is exercised with a few rows. The launch
    log is kept."""
    ops = load()
    ops._cudasim_limit_grid_y(max_grid_y)
    try:
        yield
    finally:
        ops._cudasim_limit_grid_y(HARDWARE_MAX_GRID_Y)


def launches() -> list[dict]:
    """The launches since the last :func:`configure`: kernel name, grid and block."""
    out = []
    for line in load()._cudasim_log().splitlines():
        m = _LOG_LINE.match(line)
        v = [int(g) for g in m.groups()[1:]]
        out.append({"kernel": m.group(1), "grid": tuple(v[:3]), "block": tuple(v[3:])})
    return out


_LOG_LINE = re.compile(r"^(.*) grid=\((\d+), (\d+), (\d+)\) block=\((\d+), (\d+), (\d+)\)$")
