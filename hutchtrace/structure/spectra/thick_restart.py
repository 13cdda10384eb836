"""Top-``k`` eigenpairs of many lanes: thick-restart Lanczos with locking (:func:`eigsh`).

A round extends each lane's orthonormal basis ``V`` to ``m`` vectors, one matvec per step,
re-orthogonalised against ``V`` and the locked vectors (so the recurrence runs on the deflated
operator ``(I - V_l V_l^T) A (I - V_l V_l^T)``). Rayleigh-Ritz on ``V^T A V = S diag(theta) S^T``
gives the Ritz pairs ``(theta_j, y_j = V^T s_j)`` and, from the stored products ``A V``, their
exact residuals ``||A y_j - theta_j y_j||``. The leading pairs in ``which`` order with residual
``<= tol * max|theta|`` are **locked** (deflation); the round's best unconverged Ritz vectors
are kept (thick restart) and the basis grows on from the last residual direction. When the
Krylov space becomes invariant (a repeated eigenvalue has more copies than one start vector
can see), a fresh random vector orthogonal to everything found continues the search.
Ritz values lie in ``[lambda_min, lambda_max]`` (docs/maths.md section 6(c)); unconverged ones
fill the missing places at the end, flagged ``conv = False``.

Example:
    >>> import torch
    >>> from hutchtrace.structure.spectra.operators import DenseOperator
    >>> op = DenseOperator([torch.diag(torch.arange(1.0, 9.0))])
    >>> draw = lambda b, r: torch.ones(8, dtype=torch.float64) + r
    >>> [round(x, 9) for x in eigsh(op, [0], 2, "LA", draw, m=8)[0].vals]
    [8.0, 7.0]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .eigenlanes import WHICH, _against, _better, _EigLane, _order, _sort_lane
from .krylov import _orth
from .operators import _apply1

__all__ = ["eigsh"]

_F64 = torch.float64


def _grow(ln: _EigLane, w: torch.Tensor) -> None:
    """Add ``ln.nxt`` (with its product ``w``) to the basis and set the next direction."""
    if not bool(torch.isfinite(w).all()):
        raise FloatingPointError("non-finite curvature product in a Lanczos step (overflow or NaN loss)")
    v = ln.nxt
    ln.V.append(v)
    ln.AV.append(w)
    ln.scale = max(ln.scale, float(w.norm()))
    r = _orth(w, _against(ln))
    nr = r.norm()
    if float(nr) <= 1e-10 * max(ln.scale, 1e-300):
        ln.nxt = None
        ln.broke = True
    else:
        ln.nxt = r / nr


def _rayleigh_ritz(ln: _EigLane) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(theta, Y, AY, residual)``: the Ritz pairs of the basis, ``AY`` from the stored products."""
    Vm, AVm = torch.stack(ln.V), torch.stack(ln.AV)
    Hs = Vm @ AVm.T
    theta, S = torch.linalg.eigh(0.5 * (Hs + Hs.T))
    Y, AY = S.T @ Vm, S.T @ AVm
    return theta, Y, AY, (AY - theta[:, None] * Y).norm(dim=1)


def _lock(ln: _EigLane, theta: torch.Tensor, res: torch.Tensor, Y: torch.Tensor, order: list[int], want: int,
          which: str, tol: float) -> list[int]:
    """Lock the leading converged Ritz pairs in ``order`` that still belong to the top ``want``;
    returns their indices."""
    scale = max(float(theta.abs().max()), 1e-300)
    locked_idx = []
    for j in order:
        if float(res[j]) > tol * scale:
            break
        if len(ln.vals) >= want:
            kth = ln.vals[int(_order(torch.tensor(ln.vals, dtype=_F64), which)[want - 1])]
            if not _better(float(theta[j]), kth, which):
                break
        ln.vals.append(float(theta[j]))
        ln.res.append(float(res[j]))
        ln.conv.append(True)
        locked_idx.append(j)
    if locked_idx:
        ln.vecs = Y[locked_idx] if ln.vecs is None else torch.cat([ln.vecs, Y[locked_idx]], 0)
    return locked_idx


class _ThickRestart:
    """The lanes of one :func:`eigsh` call and the three steps of a round: extend, restart, finish."""

    def __init__(self, op, ids: Sequence[int], k: int, which: str, draw: Callable[[int, int], torch.Tensor],
                 m: int, tol: float):
        self.op, self.ids, self.k, self.which, self.draw, self.m, self.tol = op, ids, k, which, draw, m, tol
        self.lanes = [_EigLane() for _ in ids]
        self.drawn = [0] * len(ids)  # random start vectors drawn per lane
        self.last: dict[int, tuple] = {}  # lane -> the last round's unlocked (theta, residual)
        for i in range(len(ids)):
            self.lanes[i].nxt = self.fresh(i)

    def fresh(self, i: int) -> torch.Tensor | None:
        """A unit random vector orthogonal to everything lane ``i`` holds (None after 3 misses)."""
        for _ in range(3):
            v = _orth(self.draw(self.ids[i], self.drawn[i]).to(_F64), _against(self.lanes[i]))
            self.drawn[i] += 1
            nv = v.norm()
            if nv > 1e-8:
                return v / nv
        return None

    def _can_grow(self, i: int) -> bool:
        ln = self.lanes[i]
        n_locked = 0 if ln.vecs is None else ln.vecs.shape[0]
        return ln.nxt is not None and len(ln.V) < self.m and len(ln.V) + n_locked < self.op.sizes[self.ids[i]]

    def extend(self, need: list[int], on_step) -> None:
        """Grow the bases of lanes ``need`` to ``m`` vectors, one batched matvec per step."""
        for i in need:
            self.lanes[i].broke = False
        while True:
            act = [i for i in need if self._can_grow(i)]
            if not act:
                break
            ws = _apply1(self.op, [self.ids[i] for i in act], [self.lanes[i].nxt for i in act])
            if on_step is not None:
                on_step(len(act))
            for i, w in zip(act, ws):
                _grow(self.lanes[i], w)

    def restart(self, i: int) -> None:
        """Rayleigh-Ritz on lane ``i``'s basis, lock the converged pairs, keep the best others."""
        ln = self.lanes[i]
        n = self.op.sizes[self.ids[i]]
        want = min(self.k, n)
        if not ln.V:
            ln.done = True
            return
        theta, Y, AY, res = _rayleigh_ritz(ln)
        order = _order(theta, self.which).tolist()
        locked_idx = _lock(ln, theta, res, Y, order, want, self.which, self.tol)
        entered = bool(locked_idx)  # a new eigenvalue was found this round
        rest = [j for j in order if j not in locked_idx]
        self.last[i] = (theta[rest], res[rest])
        n_locked = 0 if ln.vecs is None else ln.vecs.shape[0]
        if n_locked >= n or (len(ln.vals) >= want and not (ln.broke and entered)):
            ln.done = True
            return
        keep = rest[: max(1, min(len(rest), max(want - len(ln.vals) + 2, self.m // 2)))]
        ln.V = [Y[j] for j in keep]
        ln.AV = [AY[j] for j in keep]
        if ln.nxt is None:  # invariant subspace: look for more (repeated eigenvalues)
            ln.nxt = self.fresh(i)
            if ln.nxt is None:
                ln.done = True

    def finish(self, i: int) -> None:
        """Fill lane ``i``'s missing values with the best unconverged Ritz values; sort."""
        ln = self.lanes[i]
        want = min(self.k, self.op.sizes[self.ids[i]])
        if len(ln.vals) < want and i in self.last:
            theta, res = self.last[i]
            for j in range(theta.shape[0]):
                if len(ln.vals) >= want:
                    break
                ln.vals.append(float(theta[j]))
                ln.res.append(float(res[j]))
                ln.conv.append(False)
        _sort_lane(ln, self.which, want)
        ln.V, ln.AV = [], []


def eigsh(op, ids: Sequence[int], k: int, which: str, draw: Callable[[int, int], torch.Tensor], *, m: int = 20,
          tol: float = 1e-6, max_restarts: int = 5, on_step=None) -> list[_EigLane]:
    """Top-``k`` eigenpairs of every lane's operator: thick-restart Lanczos with locking.

    Each round extends the lane's orthonormal basis ``V`` (full re-orthogonalisation against
    ``V`` and the locked vectors) to ``m`` vectors, one matvec per step, and takes the
    Rayleigh-Ritz pairs of ``V^T A V`` with their exact residuals ``||A y - theta y||`` (from the
    stored products). Leading pairs in ``which`` order with residual ``<= tol * max|theta|``
    are **locked** (deflated: later vectors are kept orthogonal to them); the next round keeps
    the best unconverged Ritz vectors (thick restart) and continues from the last residual
    direction. If the Krylov space becomes invariant (repeated eigenvalues), a fresh random
    vector orthogonal to everything found continues the search, so missing copies of repeated
    eigenvalues are found. After ``max_restarts`` extra rounds the missing values are filled with
    the best unconverged Ritz values (``conv = False``).
    """
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    solver = _ThickRestart(op, ids, k, which, draw, m, tol)
    for _ in range(max_restarts + 1):
        need = [i for i, ln in enumerate(solver.lanes) if not ln.done]
        if not need:
            break
        solver.extend(need, on_step)
        for i in need:
            solver.restart(i)
    for i in range(len(ids)):
        solver.finish(i)
    return solver.lanes
