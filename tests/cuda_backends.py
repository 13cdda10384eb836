"""The CUDA kernels under test: on a real GPU, and emulated on the CPU (tests/cudasim).

Every CUDA kernel test takes the ``cuda_kernels`` fixture, so it runs
* on ``cuda`` when a GPU is visible and the extension has its CUDA kernels (``needs_cuda``);
* on ``emu-*``: the same ``csrc/cuda/*.cu`` sources compiled against the cudasim emulator,
  once per schedule in :data:`cudasim.SCHEDULES` (thread order, block order, SM count),
  when ``HUTCHTRACE_CUDASIM=1`` (CI sets it).

A test uses ``K.device`` for its tensors and ``K.ops`` (``torch.ops.hutchtrace`` or
``torch.ops.hutchtrace_emu``) for the operators; the compiled CPU kernels
(``torch.ops.hutchtrace`` on CPU tensors) and the reference stay the oracles.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import cudasim
import pytest
import torch

from hutchtrace.kernels import loader

KIND_CODES = {"rademacher": 0, "gaussian": 1}
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Kernels:
    name: str
    device: torch.device
    ops: Any
    schedule: Optional[cudasim.Schedule] = None

    @property
    def emulated(self) -> bool:
        return self.schedule is not None

    def probe_op(self, kind: str):
        return self.ops.rademacher_ if kind == "rademacher" else self.ops.gaussian_

    def fill_probes(self, out: torch.Tensor, seed: int, probe: int, offset: int, kind: str) -> torch.Tensor:
        self.probe_op(kind)(out, seed, probe, offset)
        return out

    def probes(self, seed, probe, offset, numel, rows, kind, dtype) -> torch.Tensor:
        out = torch.empty((rows, numel), dtype=dtype, device=self.device)
        return self.fill_probes(out, seed, probe, offset, kind)

    def block_dot(self, w, z, idx, L, batched=False, acc=torch.float64):
        return self.ops.block_dot(list(w), list(z), list(idx), L, batched, acc)

    def block_dot_regen(
        self, w, offsets, idx, L, seed, probe, kind="rademacher", batched=False, acc=torch.float64
    ):
        return self.ops.block_dot_regen(
            list(w), list(offsets), list(idx), L, seed, probe, KIND_CODES[kind], batched, acc
        )

    def grid_y_limit(self, max_grid_y: int):
        """Emulated: launches see a grid.y limit of ``max_grid_y``. Real GPU: no change."""
        if not self.emulated:
            return contextlib.nullcontext()
        return cudasim.grid_y_limit(max_grid_y)

    def launches(self) -> list[dict]:
        return cudasim.launches() if self.emulated else []

    def clear_launches(self) -> None:
        if self.emulated:
            cudasim.configure(self.schedule)


def cuda_params() -> list:
    """``cuda`` (a real GPU, marked ``needs_cuda``) and one ``emu-*`` per emulator schedule."""
    return [pytest.param(None, marks=pytest.mark.needs_cuda, id="cuda")] + emulated_params()


def emulated_params() -> list:
    """One ``emu-*`` parameter per emulator schedule; a single skipped ``emu`` when the
    emulated tests are off (the environment is read at collection, nothing is built)."""
    if not cudasim.enabled():
        reason = f"emulated CUDA kernels: set {cudasim.ENV_ENABLE}=1 to build and run them"
        return [pytest.param("off", id="emu", marks=pytest.mark.skip(reason=reason))]
    return [pytest.param(s, id=s.id) for s in cudasim.SCHEDULES]


def get_kernels(schedule: Optional[cudasim.Schedule]) -> Kernels:
    """The kernels for one parameter of ``cuda_kernels`` (skips when they are unavailable)."""
    if schedule is None:
        if not loader.cuda_compiled():
            pytest.skip("extension built without CUDA kernels")
        return Kernels("cuda", torch.device("cuda"), torch.ops.hutchtrace)
    if not cudasim.enabled():
        pytest.skip(f"emulated CUDA kernels: set {cudasim.ENV_ENABLE}=1 to build and run them")
    ops = cudasim.load()
    cudasim.configure(schedule)
    return Kernels(schedule.id, torch.device("cpu"), ops, schedule)


@pytest.fixture(params=cuda_params())
def cuda_kernels(request) -> Kernels:
    return get_kernels(request.param)
