"""What the extreme-eigenvalue solvers share: the ``which`` orders and the per-lane result.

``which`` picks the end of the spectrum: ``"LM"`` the largest ``|lambda|`` (so the first value
is ``||A||_2``), ``"LA"`` the largest (most positive) and ``"SA"`` the smallest (most negative
curvature). Both solvers (:func:`~hutchtrace.structure.spectra.eigsh`, thick-restart Lanczos,
and :func:`~hutchtrace.structure.spectra.power_iteration`) fill one :class:`_EigLane` per lane
with eigenvalues, their residuals ``||A y - theta y||`` and convergence flags, and return them
in ``which`` order.

Example:
    >>> import torch
    >>> theta = torch.tensor([1.0, -3.0, 2.0])
    >>> _order(theta, "LM").tolist(), _order(theta, "LA").tolist(), _order(theta, "SA").tolist()
    ([1, 2, 0], [2, 0, 1], [1, 0, 2])
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["WHICH"]

WHICH = ("LM", "LA", "SA")
_F64 = torch.float64


def _order(theta: torch.Tensor, which: str) -> torch.Tensor:
    if which == "LM":
        return torch.argsort(theta.abs(), descending=True)
    if which == "LA":
        return torch.argsort(theta, descending=True)
    if which == "SA":
        return torch.argsort(theta)
    raise ValueError(f"which must be one of {WHICH}, got {which!r}")


def _better(a: float, b: float, which: str) -> bool:
    if which == "LM":
        return abs(a) > abs(b)
    return a > b if which == "LA" else a < b


@dataclass
class _EigLane:
    vals: list = field(default_factory=list)
    res: list = field(default_factory=list)
    conv: list = field(default_factory=list)
    vecs: torch.Tensor | None = None  # locked eigenvectors (rows)
    V: list = field(default_factory=list)  # active basis (rows), orthogonal to the locked vectors
    AV: list = field(default_factory=list)  # A v for every row of V
    nxt: torch.Tensor | None = None  # next basis vector (unit, orthogonal to vecs and V)
    scale: float = 0.0
    broke: bool = False  # the Krylov space became invariant this round
    done: bool = False


def _against(ln: _EigLane) -> torch.Tensor | None:
    """The rows a new direction must be orthogonal to: the locked vectors and the basis."""
    rows = ([ln.vecs] if ln.vecs is not None else []) + ([torch.stack(ln.V)] if ln.V else [])
    return torch.cat(rows, 0) if rows else None


def _sort_lane(ln: _EigLane, which: str, keep: int | None = None) -> None:
    """Put ``ln``'s values (with their residuals and flags) in ``which`` order, the first ``keep``."""
    idx = _order(torch.tensor(ln.vals, dtype=_F64), which).tolist()[:keep] if ln.vals else []
    ln.vals = [ln.vals[j] for j in idx]
    ln.res = [ln.res[j] for j in idx]
    ln.conv = [ln.conv[j] for j in idx]
