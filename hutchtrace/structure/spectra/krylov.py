"""Lanczos with full re-orthogonalisation, on many lanes in lockstep.

From a start ``q_0 = z / ||z||`` each step applies the operator once, ``w = A q_j``, and
orthogonalises ``w`` against every basis vector so far with two classical Gram-Schmidt
passes (full re-orthogonalisation: the basis stays orthonormal to rounding, so no ghost Ritz
values). ``alpha_j = q_j^T A q_j`` and ``beta_j = ||w||`` after the passes; after ``m`` steps

.. math:: Q^\\top A Q = T_m = \\operatorname{tridiag}(\\beta_{0..m-2},\\ \\alpha,\\ \\beta_{0..m-2}),

and each Ritz pair ``(theta_j, Q s_j)`` of ``T_m = S diag(theta) S^T`` has residual
``||A y - theta y|| = beta_{m-1} |S[m-1, j]|``. Ritz values lie in ``[lambda_min, lambda_max]``,
so ``max|theta|`` is a lower bound of ``||A||_2`` (docs/maths.md section 6(c)). A run stops
early when ``beta`` falls below ``breakdown * ||T||``: the Krylov space is invariant and every
Ritz pair is exact. With locked vectors ``V`` (deflation) the recurrence runs on
``P A P``, ``P = I - V V^T``.

Example:
    >>> import torch
    >>> A = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    >>> run = lanczos(lambda v: A @ v, torch.ones(3, dtype=torch.float64), 3)
    >>> run.exhausted, [round(float(t), 12) for t in run.ritz()[0]]
    (True, [1.0, 2.0, 3.0])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .operators import _apply1

__all__ = ["LanczosRun", "lanczos", "lanczos_lanes"]

_F64 = torch.float64


@dataclass
class LanczosRun:
    """One Lanczos run: ``Q^T A Q = T`` with ``T = tridiag(beta[:k-1], alpha, beta[:k-1])``.

    Attributes:
        alpha: ``(k,)`` diagonal; beta: ``(k,)``, ``beta[j]`` the norm of the residual after
        step ``j`` (``beta[k-1]`` bounds the Ritz residuals); Q: ``(k, n)`` orthonormal basis;
        first: ``A q_0`` (so ``||A z||^2 = ||first||^2 ||z||^2`` for the start ``z``);
        exhausted: the Krylov space is invariant (every Ritz pair is exact).
    """

    alpha: torch.Tensor
    beta: torch.Tensor
    Q: torch.Tensor
    first: torch.Tensor
    exhausted: bool

    @property
    def steps(self) -> int:
        return int(self.alpha.shape[0])

    def tridiagonal(self) -> torch.Tensor:
        k = self.steps
        T = torch.diag(self.alpha)
        if k > 1:
            off = self.beta[: k - 1]
            T = T + torch.diag(off, 1) + torch.diag(off, -1)
        return T

    def ritz(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(theta, S, residual)``: Ritz values (ascending), eigenvectors of ``T`` and the
        residual norms ``beta_{k-1} |S[k-1, j]|`` (0 when the space is exhausted)."""
        theta, S = torch.linalg.eigh(self.tridiagonal())
        res = torch.zeros_like(theta) if self.exhausted else self.beta[-1].abs() * S[-1].abs()
        return theta, S, res


def _orth(w: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    """Two classical Gram-Schmidt passes of ``w`` against the rows of ``basis``."""
    if basis is None or basis.shape[0] == 0:
        return w
    for _ in range(2):
        w = w - basis.T @ (basis @ w)
    return w


@dataclass
class _LanczosLane:
    """The recurrence state of one lane: operator ``op_id``, deflated against ``locked``."""

    op_id: int
    locked: torch.Tensor | None
    limit: int  # steps at most
    n_free: int  # the dimension left after deflation: the Krylov space is exhausted there
    Q: list[torch.Tensor]
    alpha: list[torch.Tensor] = field(default_factory=list)
    beta: list[torch.Tensor] = field(default_factory=list)
    first: torch.Tensor | None = None
    exhausted: bool = False
    scale: float = 0.0  # running max of |alpha| + beta, the scale of the breakdown test
    active: bool = True

    def run(self) -> LanczosRun:
        return LanczosRun(alpha=torch.stack(self.alpha), beta=torch.stack(self.beta),
                          Q=torch.stack(self.Q[: len(self.alpha)]), first=self.first,
                          exhausted=self.exhausted)


def _start_lane(op, op_id: int, start: torch.Tensor, m: int, locked: torch.Tensor | None) -> _LanczosLane:
    v = _orth(start.to(_F64), locked)
    nv = v.norm()
    if not torch.isfinite(nv) or nv == 0:
        raise ValueError("a Lanczos start vector is zero (or lies in the locked subspace)")
    n_free = op.sizes[op_id] - (0 if locked is None else locked.shape[0])
    return _LanczosLane(op_id, locked, max(1, min(m, n_free)), n_free, [v / nv])


def _lanczos_step(ln: _LanczosLane, w: torch.Tensor, breakdown: float) -> None:
    """Advance ``ln`` by one step given ``w = A q`` for its newest basis vector ``q``."""
    if ln.first is None:
        ln.first = w.clone()
    q = ln.Q[-1]
    if ln.locked is not None:
        w = _orth(w, ln.locked)
    a = torch.dot(w, q)
    basis = torch.stack(ln.Q)
    w = _orth(w, basis if ln.locked is None else torch.cat([basis, ln.locked], 0))
    b = w.norm()
    ln.alpha.append(a)
    ln.beta.append(b)
    ln.scale = max(ln.scale, float(a.abs()) + float(b))
    if not (torch.isfinite(a) and torch.isfinite(b)):
        raise FloatingPointError("non-finite curvature product in a Lanczos step (overflow or a NaN loss)")
    done = len(ln.alpha) >= ln.limit
    if float(b) <= breakdown * max(ln.scale, 1e-300):
        ln.exhausted = True
        done = True
    if len(ln.alpha) >= ln.n_free:
        ln.exhausted = True
    if done:
        ln.active = False
    else:
        ln.Q.append(w / b)


def lanczos_lanes(op, ids: Sequence[int], starts: Sequence[torch.Tensor], m: int | Sequence[int],
                  locked: Sequence[torch.Tensor | None] | None = None, breakdown: float = 1e-10,
                  on_step: Callable[[int], None] | None = None) -> list[LanczosRun]:
    """Lanczos on several lanes in lockstep (one ``op.apply`` per step for all active lanes).

    Lane ``i`` runs on operator ``ids[i]`` from ``starts[i]``, deflated against the rows of
    ``locked[i]`` (the operator becomes ``P A P``, ``P = I - V V^T``), for ``m[i]`` steps at
    most; it stops early when the residual falls below ``breakdown * ||T||`` (an invariant
    subspace) or after ``n - rank(V)`` steps.
    """
    nl = len(ids)
    ms = [m] * nl if isinstance(m, int) else list(m)
    locked = list(locked) if locked is not None else [None] * nl
    lanes = [_start_lane(op, b, z, mi, v) for b, z, mi, v in zip(ids, starts, ms, locked)]
    while any(ln.active for ln in lanes):
        act = [ln for ln in lanes if ln.active]
        ws = _apply1(op, [ln.op_id for ln in act], [ln.Q[-1] for ln in act])
        for ln, w in zip(act, ws):
            _lanczos_step(ln, w, breakdown)
        if on_step is not None:
            on_step(len(act))
    return [ln.run() for ln in lanes]


class _Matvec:
    """One operator given by its matvec, as a one-lane multi-operator."""

    def __init__(self, matvec: Callable[[torch.Tensor], torch.Tensor], n: int):
        self.matvec = matvec
        self.sizes = (n,)

    def apply(self, ids, X):
        return [torch.stack([self.matvec(x) for x in X[0]])]


def lanczos(matvec: Callable[[torch.Tensor], torch.Tensor], v0: torch.Tensor, m: int) -> LanczosRun:
    """``m``-step Lanczos with full re-orthogonalisation of the symmetric operator ``matvec``.

    Example:
        >>> A = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
        >>> run = lanczos(lambda v: A @ v, torch.ones(10, dtype=torch.float64), 10)
        >>> theta, _, _ = run.ritz()
        >>> torch.allclose(theta, torch.arange(1.0, 11.0, dtype=torch.float64))
        True
    """
    return lanczos_lanes(_Matvec(matvec, v0.shape[0]), [0], [v0], m)[0]
