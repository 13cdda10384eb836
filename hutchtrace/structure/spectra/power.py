"""Top-``k`` eigenvalues of many lanes by power iteration with deflation (:func:`power_iteration`).

``"LM"``: iterate ``v <- A v / ||A v||``, kept orthogonal to the eigenvectors already locked,
until the Rayleigh quotient ``v^T A v`` changes by at most ``tol`` relative; then lock ``v``
and start again from a fresh random vector. ``"LA"`` / ``"SA"`` run the same on ``A + s I`` /
``s I - A`` with ``s = 1.01 |lambda|_max`` from a first ``"LM"`` run, which makes the wanted
end of the spectrum dominant. The error after ``t`` steps shrinks like
``|lambda_2 / lambda_1|^t``, so it converges slowly when ``lambda_max ~ -lambda_min``: prefer
Lanczos (:func:`~hutchtrace.structure.spectra.eigsh`; docs/maths.md section 6(c)).

Example:
    >>> import torch
    >>> from hutchtrace.structure.spectra.operators import DenseOperator
    >>> op = DenseOperator([torch.diag(torch.tensor([1.0, 2.0, 10.0]))])
    >>> draw = lambda b, r: torch.ones(3, dtype=torch.float64)
    >>> round(power_iteration(op, [0], 1, "LM", draw, tol=1e-12)[0].vals[0], 6)
    10.0
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .eigenlanes import WHICH, _EigLane, _sort_lane
from .krylov import _orth
from .operators import _apply1

__all__ = ["power_iteration"]

_F64 = torch.float64


@dataclass
class _PowerLane:
    """One lane's iteration on ``sign * A + shift * I``; the found eigenpairs go to ``found``."""

    op_id: int
    want: int
    shift: float
    found: _EigLane = field(default_factory=_EigLane)
    cur: torch.Tensor | None = None  # the current unit iterate
    prev: float = math.nan  # the previous Rayleigh quotient
    count: int = 0  # products spent on the current eigenvalue
    drawn: int = 0  # random start vectors drawn

    def fresh(self, draw: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
        v = draw(self.op_id, 100 + self.drawn).to(_F64)
        v = _orth(v, self.found.vecs)
        self.drawn += 1
        return v / v.norm()


def _power_step(pl: _PowerLane, w: torch.Tensor, sign: float, iters: int, tol: float,
                draw: Callable[[int, int], torch.Tensor]) -> None:
    """One iteration given ``w = A v``: lock ``v`` once it has converged (or ``iters`` ran out)."""
    v = pl.cur
    lam = float(torch.dot(v, w))  # Rayleigh quotient of A
    bw = _orth(sign * w + pl.shift * v, pl.found.vecs)
    pl.count += 1
    nb = bw.norm()
    conv = abs(lam - pl.prev) <= tol * max(abs(lam), 1e-300)
    if conv or pl.count >= iters or nb == 0:
        ln = pl.found
        ln.vals.append(lam)
        ln.res.append(float((w - lam * v).norm()))
        ln.conv.append(bool(conv))
        ln.vecs = v[None] if ln.vecs is None else torch.cat([ln.vecs, v[None]], 0)
        pl.count, pl.prev = 0, math.nan
        if len(ln.vals) < pl.want:
            pl.cur = pl.fresh(draw)
        return
    pl.prev = lam
    pl.cur = bw / nb


def power_iteration(op, ids: Sequence[int], k: int, which: str, draw: Callable[[int, int], torch.Tensor], *,
                    iters: int = 100, tol: float = 1e-6, on_step=None) -> list[_EigLane]:
    """Top-``k`` eigenvalues of every lane's operator by power iteration with deflation.

    ``"LM"``: iterate ``v <- A v / ||A v||`` (orthogonal to the locked vectors) until the
    Rayleigh quotient changes by ``<= tol`` relative, at most ``iters`` products per eigenvalue.
    ``"LA"``/``"SA"``: the same on ``A + s I`` / ``s I - A`` with ``s = 1.01 |lambda|_max`` from a
    first ``"LM"`` run, which makes the wanted end of the spectrum dominant.
    """
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    shift = [0.0] * len(ids)
    sign = 1.0
    if which != "LM":
        top = power_iteration(op, ids, 1, "LM", draw, iters=iters, tol=tol, on_step=on_step)
        shift = [1.01 * abs(t.vals[0]) for t in top]
        sign = 1.0 if which == "LA" else -1.0
    lanes = [_PowerLane(b, min(k, op.sizes[b]), s) for b, s in zip(ids, shift)]
    for pl in lanes:
        pl.cur = pl.fresh(draw)
    while True:
        act = [pl for pl in lanes if len(pl.found.vals) < pl.want]
        if not act:
            break
        ws = _apply1(op, [pl.op_id for pl in act], [pl.cur for pl in act])
        if on_step is not None:
            on_step(len(act))
        for pl, w in zip(act, ws):
            _power_step(pl, w, sign, iters, tol, draw)
    for pl in lanes:
        _sort_lane(pl.found, which)
    return [pl.found for pl in lanes]
