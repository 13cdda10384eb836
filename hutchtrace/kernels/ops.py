"""Thin dispatchers: the compiled ``torch.ops.hutchtrace`` kernel when one exists for the
tensor's device, the pure-PyTorch reference (:mod:`hutchtrace.kernels.reference`) otherwise.

Every function here has the same contract on both paths; probes are bit-identical.
``HUTCHTRACE_DISABLE_EXT=1`` forces the reference everywhere.

The compiled block reductions take their per-tensor work list (pointers, sizes, block ids)
as kernel parameters, so ``block_index`` is needed on the host: pass a list of ints (or a
CPU tensor). A CUDA tensor works too, but its host copy costs one synchronisation the
first time it is seen (it is cached per tensor object and version afterwards).
"""

from __future__ import annotations

import operator
import weakref
from typing import Sequence

import torch

from . import loader, reference

__all__ = [
    "backend_name",
    "fill_probes_",
    "probes",
    "block_dot",
    "block_dot_flat",
    "block_dot_regen",
    "welford_update_",
    "welford_merge_",
]

_KIND_CODES = {"rademacher": 0, "gaussian": 1}
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_ACC_DTYPES = (torch.float32, torch.float64)


def backend_name(device) -> str:
    """``"compiled-cpu"``, ``"compiled-cuda"`` or ``"fallback"`` for tensors on ``device``."""
    dev = torch.device(device)
    if loader.has_kernel(dev):
        return f"compiled-{dev.type}"
    return "fallback"


def _check_probe_args(seed: int, probe: int, kind: str) -> int:
    """Validate like the reference does; returns ``probe`` as a Python int."""
    if kind not in _KIND_CODES:
        raise ValueError(f"probe kind must be one of {tuple(_KIND_CODES)}, got {kind!r}")
    reference._check_seed(seed)
    probe = operator.index(probe)
    if probe < 0:
        raise ValueError(f"probe index must be non-negative, got {probe}")
    return probe


def fill_probes_(
    out: torch.Tensor, seed: int, probe: int, offset: int, kind: str = "rademacher"
) -> torch.Tensor:
    """Fill ``out`` ((n,) or (B, n)) with probes ``probe..probe+B-1`` at global offset ``offset``."""
    probe = _check_probe_args(seed, probe, kind)
    offset = operator.index(offset)
    if offset < 0:
        raise ValueError(f"offset must be non-negative, got {offset}")
    if out.dim() not in (1, 2):
        raise ValueError(f"out must be 1-D or 2-D, got shape {tuple(out.shape)}")
    if not (loader.has_kernel(out.device) and out.dtype in _FLOAT_DTYPES):
        return reference.fill_probes_(out, seed, probe, offset, kind)
    op = torch.ops.hutchtrace.rademacher_ if kind == "rademacher" else torch.ops.hutchtrace.gaussian_
    if out.is_contiguous():
        op(out, seed, probe, offset)
    else:
        tmp = torch.empty(out.shape, dtype=out.dtype, device=out.device)
        op(tmp, seed, probe, offset)
        out.copy_(tmp)
    return out


def probes(
    seed: int,
    probe: int,
    offset: int,
    numel: int,
    *,
    num_probes: int = 1,
    kind: str = "rademacher",
    dtype: torch.dtype = torch.float32,
    device=None,
) -> torch.Tensor:
    """Allocate and fill a ``(num_probes, numel)`` probe tensor."""
    out = torch.empty((num_probes, numel), dtype=dtype, device=device)
    return fill_probes_(out, seed, probe, offset, kind)


# Host copies of index tensors, keyed by the tensor object and checked against its version.
_INDEX_CACHE: "weakref.WeakKeyDictionary[torch.Tensor, tuple[int, list[int]]]" = weakref.WeakKeyDictionary()


def _int_list(values) -> list[int]:
    """``values`` (list/tuple of ints or an integer tensor) as a list of Python ints."""
    if not torch.is_tensor(values):
        return values if isinstance(values, list) else list(values)
    hit = _INDEX_CACHE.get(values)
    if hit is not None and hit[0] == values._version:
        return hit[1]
    host = values.tolist()  # for a CUDA tensor: one device sync, then cached
    _INDEX_CACHE[values] = (values._version, host)
    return host


def block_dot(
    w: Sequence[torch.Tensor],
    z: Sequence[torch.Tensor],
    block_index: Sequence[int] | torch.Tensor,
    num_blocks: int,
    *,
    batched: bool = False,
    acc_dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block ``(sum z*w, sum w*w)``; see :func:`hutchtrace.kernels.reference.block_dot`.

    The compiled kernels sum fixed-size chunks, then each block's chunks in a fixed order:
    deterministic run to run (no atomics), but not in the reference's order, and the CPU
    and CUDA kernels chunk differently (the CUDA build also fuses multiply-adds), so the
    three paths agree to rounding, not bit for bit (the tests bound the difference).
    """
    if len(w) and loader.has_kernel(w[0].device) and acc_dtype in _ACC_DTYPES:
        idx = _int_list(block_index)
        if len(w) != len(z) or len(w) != len(idx):
            raise ValueError("w, z and block_index must have the same length")
        return torch.ops.hutchtrace.block_dot(list(w), list(z), idx, num_blocks, batched, acc_dtype)
    return reference.block_dot(w, z, block_index, num_blocks, batched=batched, acc_dtype=acc_dtype)


def block_dot_flat(
    w: torch.Tensor,
    z: torch.Tensor,
    sizes: Sequence[int],
    block_index: Sequence[int] | torch.Tensor,
    num_blocks: int,
    *,
    batched: bool = False,
    acc_dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`block_dot` on flat buffers ``(P,)`` (or ``(B, P)`` when ``batched``).

    ``sizes`` cuts the last dimension into consecutive segments (summing to ``P``); segment
    ``j`` belongs to block ``block_index[j]``. The segments are views: nothing is copied.
    """
    sizes = list(sizes)
    return block_dot(
        torch.split(w, sizes, dim=-1),
        torch.split(z, sizes, dim=-1),
        block_index,
        num_blocks,
        batched=batched,
        acc_dtype=acc_dtype,
    )


_INT64_MAX = 2**63 - 1


def _check_regen_ranges(w, offsets, probe: int, batched: bool) -> None:
    """Global element and probe indices stay in int64, as the compiled kernels require."""
    rows = w[0].shape[0] if (batched and len(w)) else 1
    if rows and probe > _INT64_MAX - rows:
        raise ValueError(
            f"probe + B = {probe} + {rows} overflows int64; use probe indices below 2**63 - 1 - B"
        )
    for j, (wj, off) in enumerate(zip(w, offsets)):
        n = wj.numel() // rows if (batched and rows) else wj.numel()  # elements per probe row
        if n and off > _INT64_MAX - n:
            raise ValueError(
                f"offsets[{j}] + n = {off} + {n} overflows int64; global element offsets must stay below "
                "2**63 - 1 - n"
            )


def block_dot_regen(
    w: Sequence[torch.Tensor],
    offsets: Sequence[int],
    block_index: Sequence[int] | torch.Tensor,
    num_blocks: int,
    *,
    seed: int,
    probe: int,
    kind: str = "rademacher",
    batched: bool = False,
    acc_dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`block_dot` with the probe regenerated from ``(seed, probe, offsets)``.

    Tensor ``j`` of ``w`` holds global elements ``offsets[j] .. offsets[j]+w[j].numel()``
    (per probe row when ``batched``; row ``r`` is probe ``probe + r``). The compiled
    kernels regenerate the probe in registers and never read it from memory.
    """
    probe = _check_probe_args(seed, probe, kind)
    _check_regen_ranges(w, _int_list(offsets), probe, batched)
    if len(w) and loader.has_kernel(w[0].device) and acc_dtype in _ACC_DTYPES:
        idx = _int_list(block_index)
        offs = _int_list(offsets)
        if len(w) != len(offs) or len(w) != len(idx):
            raise ValueError("w, offsets and block_index must have the same length")
        return torch.ops.hutchtrace.block_dot_regen(
            list(w), offs, idx, num_blocks, seed, probe, _KIND_CODES[kind], batched, acc_dtype
        )
    lead = w[0].shape[0] if (batched and len(w)) else 1
    z = []
    for wj, off in zip(w, _int_list(offsets)):
        n = wj[0].numel() if batched else wj.numel()
        zj = reference.probes(
            seed, probe, off, n, num_probes=lead, kind=kind, dtype=wj.dtype, device=wj.device
        )
        z.append(zj.reshape(wj.shape))
    return reference.block_dot(w, z, block_index, num_blocks, batched=batched, acc_dtype=acc_dtype)


def _welford_state_ok(count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor) -> bool:
    return (
        loader.has_kernel(mean.device)
        and count.dtype == torch.int64
        and count.numel() == 1
        and count.device == mean.device
        and mean.dtype == torch.float64
        and m2.dtype == torch.float64
        and m2.device == mean.device
        and mean.dim() == 1
        and m2.shape == mean.shape
        and mean.is_contiguous()
        and m2.is_contiguous()
    )


def welford_update_(count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor, x: torch.Tensor) -> None:
    """In-place Welford update with samples ``x`` ((L,) or (B, L)); no host synchronisation."""
    if (
        _welford_state_ok(count, mean, m2)
        and x.device == mean.device
        and x.dtype in (torch.float32, torch.float64)
        and x.shape[-1] == mean.shape[0]
    ):
        torch.ops.hutchtrace.welford_update_(
            count, mean, m2, x if x.dim() <= 2 else x.reshape(-1, x.shape[-1])
        )
        return
    reference.welford_update_(count, mean, m2, x)


def welford_merge_(
    count: torch.Tensor,
    mean: torch.Tensor,
    m2: torch.Tensor,
    count_b: torch.Tensor,
    mean_b: torch.Tensor,
    m2_b: torch.Tensor,
) -> None:
    """In-place Chan merge of state B into state A."""
    if (
        _welford_state_ok(count, mean, m2)
        and count_b.dtype == torch.int64
        and count_b.numel() == 1
        and count_b.device == mean.device
        and mean_b.device == mean.device
        and m2_b.device == mean.device
        and mean_b.dtype == torch.float64
        and m2_b.dtype == torch.float64
        and mean_b.numel() == mean.numel()
        and m2_b.numel() == mean.numel()
    ):
        torch.ops.hutchtrace.welford_merge_(count, mean, m2, count_b, mean_b, m2_b)
        return
    reference.welford_merge_(count, mean, m2, count_b, mean_b, m2_b)
