"""Fake (meta) kernels for the ``torch.ops.hutchtrace`` operators.

They describe output shapes and dtypes without computing anything, which is what
``torch.compile`` (and ``torch.library.opcheck``) need to trace through the compiled ops.
:func:`register_fakes` is called by :mod:`hutchtrace.kernels.loader` only after ``hutchtrace._C``
loaded: registering a fake for an operator that does not exist would fail the import.
"""

from __future__ import annotations

import torch

_REGISTERED: set[str] = set()
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _probe_fake(out, seed, probe, offset):
    torch._check(out.dim() in (1, 2), lambda: f"out must be 1-D or 2-D, got {out.dim()}-D")
    torch._check(out.dtype in _FLOAT_DTYPES, lambda: f"unsupported probe dtype {out.dtype}")
    torch._check(seed >= 0 and probe >= 0 and offset >= 0, lambda: "seed, probe and offset must be >= 0")


def _block_outputs(w, block_index, num_blocks, batched, acc_dtype):
    torch._check(len(w) >= 1, lambda: "w must hold at least one tensor")
    torch._check(len(block_index) == len(w), lambda: "block_index must have one entry per tensor")
    acc = torch.float64 if acc_dtype is None else acc_dtype
    torch._check(
        acc in (torch.float32, torch.float64), lambda: f"acc_dtype must be float32 or float64, got {acc}"
    )
    shape = (w[0].shape[0], num_blocks) if batched else (num_blocks,)
    return w[0].new_empty(shape, dtype=acc), w[0].new_empty(shape, dtype=acc)


def _block_dot_fake(w, z, block_index, num_blocks, batched=False, acc_dtype=None):
    torch._check(len(z) == len(w), lambda: "w and z must have the same length")
    for wj, zj in zip(w, z):
        torch._check(wj.shape == zj.shape, lambda: f"shape mismatch in block_dot: {wj.shape} vs {zj.shape}")
    return _block_outputs(w, block_index, num_blocks, batched, acc_dtype)


def _block_dot_regen_fake(
    w, offsets, block_index, num_blocks, seed, probe, kind=0, batched=False, acc_dtype=None
):
    torch._check(len(offsets) == len(w), lambda: "offsets must have one entry per tensor")
    torch._check(kind in (0, 1), lambda: f"kind must be 0 or 1, got {kind}")
    return _block_outputs(w, block_index, num_blocks, batched, acc_dtype)


def _welford_update_fake(count, mean, m2, x):
    torch._check(
        mean.dtype == torch.float64 and m2.dtype == torch.float64, lambda: "mean and m2 must be float64"
    )
    torch._check(x.shape[-1] == mean.shape[-1], lambda: "x must end in the statistics' length L")


def _welford_merge_fake(count, mean, m2, count_b, mean_b, m2_b):
    torch._check(
        mean_b.shape == mean.shape and m2_b.shape == mean.shape, lambda: "states must have one shape"
    )


def register_fakes(namespace: str = "hutchtrace") -> None:
    """Register every fake kernel once per operator namespace (idempotent).

    ``namespace`` is ``"hutchtrace"`` for the real extension; the CUDA emulator of the tests
    registers the same ops as ``"hutchtrace_emu"`` and reuses these fakes.
    """
    if namespace in _REGISTERED:
        return
    reg = torch.library.register_fake
    reg(f"{namespace}::rademacher_")(_probe_fake)
    reg(f"{namespace}::gaussian_")(_probe_fake)
    reg(f"{namespace}::block_dot")(_block_dot_fake)
    reg(f"{namespace}::block_dot_regen")(_block_dot_regen_fake)
    reg(f"{namespace}::welford_update_")(_welford_update_fake)
    reg(f"{namespace}::welford_merge_")(_welford_merge_fake)
    _REGISTERED.add(namespace)
