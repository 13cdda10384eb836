"""The memory budget of an exact local Hessian (docs/maths.md section 7, "Cost").

An exact ``LH_i`` stores ``p_i^2`` entries on the dense paths and ``m (n+1)^2`` in the closed
form's unit blocks. Both are checked against ``max_memory`` before anything that size is
allocated (:func:`check_budget`); what the budget leaves after the stored matrix sets how many
rows the row iterator computes per batched pass (:func:`row_chunk`).

Example:
    >>> row_chunk(P=10_000, per_row=8 * 40_000, budget=2**30, reserved=8 * 10_000**2)
    855
"""

from __future__ import annotations

from ...core.errors import MemoryBudgetError

__all__ = ["check_budget", "row_chunk"]


def check_budget(nbytes: int, budget: int, layer: str, P: int, what: str) -> None:
    """Raise :class:`~hutchtrace.core.errors.MemoryBudgetError` when ``nbytes`` exceed ``budget``."""
    if nbytes > budget:
        raise MemoryBudgetError(
            f"{what} for layer {layer or '(model)'!r} (p_i = {P:,} parameters) needs "
            f"{nbytes / 2**20:,.1f} MiB > max_memory = {budget / 2**20:,.1f} MiB. An exact local Hessian "
            "stores p_i^2 entries (block-diagonal closed form: m (n+1)^2). Raise max_memory, or use the "
            "stochastic estimators: hutchtrace.block_traces(model, loss, blocks={...}) estimates block "
            "traces without forming the matrix (for tr LH_i pass a closure computing S_i; "
            "SnapshotRecorder does this automatically)"
        )


def row_chunk(P: int, per_row: int, budget: int, reserved: int) -> int:
    """Rows per batched pass: what ``budget - reserved`` holds at ``per_row`` bytes, in ``[1, min(P, 4096)]``."""
    free = budget - reserved
    return int(max(1, min(P, 4096, free // max(per_row, 1))))
