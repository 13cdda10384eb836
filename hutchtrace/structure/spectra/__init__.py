"""Per-block spectra: extreme eigenvalues, stable rank, spectral density (SLQ) and Hutch++.

Everything here works on the **block operator** of a diagonal block (SPEC sections 6c, 8)

.. math:: A_b : v \\mapsto (M\\,[v \\text{ on } I_b])_b = M_{bb} v, \\qquad M \\in \\{H, G\\},

at one Hessian- (or GGN-) vector product per matvec: ``v`` is placed on the block's
coordinates, zeros elsewhere, and the block's part of the product is read back. The product
is prepared once per batch (one batch: once in all); with several batches every matvec sums
the weighted per-batch products (:class:`~hutchtrace.backbones.curvature_op.CurvatureProducts`).
All blocks advance **in lockstep**: one batched product serves one step of every block's
recurrence.

Algorithms (float64 throughout, whatever the model dtype):

* **Lanczos** with full re-orthogonalisation (two Gram-Schmidt passes per step). After ``m``
  steps ``Q^T A Q = T_m`` (tridiagonal) and each Ritz pair ``(theta_j, Q s_j)`` has residual
  ``||A y - theta y|| = beta_m |s_j[m-1]|``. Ritz values lie in ``[lambda_min, lambda_max]``,
  so ``max|theta|`` is a lower bound of ``||A||_2``. The top-k use **deflation** (locking):
  converged Ritz vectors are locked and Lanczos restarts on ``(I - VV^T) A (I - VV^T)``.
* **Power iteration** (``method="power"``) with the same deflation; ``which="LA"/"SA"`` run
  it on ``A + s I`` / ``s I - A`` with ``s`` a bound on ``||A||_2`` from a first ``"LM"`` run.
  It converges slowly when ``lambda_max ~ -lambda_min``: prefer Lanczos.
* **Stable rank** ``D_b = ||A||_F^2 / ||A||_2^2 in [1, rank A]``: the Frobenius part from
  ``K`` block-supported probes (``E||A z_b||^2 = ||A||_F^2``; the first is the Lanczos start
  vector, so it is free), ``||A||_2`` from Lanczos. ``D^`` is **biased upward** until the
  top Ritz value has converged (SPEC: Lanczos-20 recovers ``||.||_2`` to 4 digits on MLP blocks).
* **SLQ** (SPEC Algorithm 8.1): ``n_v`` Lanczos runs of ``m`` steps from probes ``z/||z||``;
  with ``T_m = U diag(theta) U^T`` and ``tau_j = U[0, j]^2``, ``||z||^2 sum_j tau_j f(theta_j)``
  estimates ``z^T f(A) z`` and is **exactly** ``z^T A^p z`` for ``p <= 2m - 1`` (Gauss
  quadrature), so polynomial traces inherit Hutchinson's unbiasedness. The density is
  ``phi(t) = (1/n_v) sum_l sum_j (||z_l||^2 / n) tau_j N(t; theta_j, sigma^2)``.
* **Hutch++** (SPEC Algorithm 8.2) with ``m`` matvecs: ``S`` (``m/3`` probes),
  ``Q = qr(A S)``, ``tr^ = tr(Q^T A Q) + (1/|G|) tr(G_perp^T A G_perp)`` with ``G_perp = (I - QQ^T) G``.
  Unbiased. It beats Hutchinson only on near-low-rank blocks: **switch when the top-m/3
  eigenvalues hold more than 2/3 of the Frobenius energy** (:func:`hutchpp_wins`, from Ritz
  values); on a flat spectrum it is much worse (SPEC section 8).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...backbones.curvature_op import CurvatureProducts, probe_rows
from ...core.progress import Progress
from ...core.state import PreservedState
from ...core.validate import check_model, check_probe_kind, resolve_seed
from ...estimate.engine import check_probe_count
from ...problem.blocks import BlockLayout, resolve_blocks, unwrap_model
from ...problem.loss import make_loss_spec
from ..decompose import _rows_per_call

__all__ = [
    "BlockEigenvalues",
    "BlockOperator",
    "DenseOperator",
    "HutchppTraces",
    "LanczosRun",
    "SpectralDensity",
    "StableRank",
    "block_eigenvalues",
    "eigsh",
    "energy_fraction",
    "hutchpp",
    "hutchpp_trace",
    "hutchpp_wins",
    "lanczos",
    "power_iteration",
    "slq",
    "spectral_density",
    "stable_rank",
]

WHICH = ("LM", "LA", "SA")
_F64 = torch.float64


# ============================================================================ operators
class DenseOperator:
    """Explicit symmetric matrices as lanes of a multi-operator (tests and small problems).

    ``apply(ids, X)`` returns ``[X_i @ A_{ids[i]}]`` for row blocks ``X_i`` of shape ``(r, n)``.
    """

    def __init__(self, mats: Sequence[torch.Tensor]):
        self.mats = [m.to(_F64) for m in mats]
        self.sizes = [m.shape[0] for m in self.mats]
        self.matvecs = [0] * len(self.mats)

    def apply(self, ids: Sequence[int], X: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for i, x in zip(ids, X):
            self.matvecs[i] += x.shape[0]
            out.append(x @ self.mats[i])
        return out


class BlockOperator:
    """The block operators ``v -> (M [v on I_b])_b`` of a model, one lane per block.

    ``apply(ids, X)`` evaluates ``X_i`` (``(r_i, n_b)`` rows of block ``ids[i]``) for all
    ``i`` with ONE batched product of ``sum_i r_i`` rows. ``matvecs[b]`` counts rows per block.
    """

    def __init__(self, products: CurvatureProducts, layout: BlockLayout, curvature: str):
        self.products = products
        self.layout = layout
        self.curvature = curvature
        self.sizes = [blk.numel for blk in layout.blocks]
        self.matvecs = [0] * layout.num_blocks

    def apply(self, ids: Sequence[int], X: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        lay = self.layout
        R = sum(x.shape[0] for x in X)
        bufs = [torch.zeros((R,) + tuple(t.shape), dtype=t.dtype, device=t.device) for t in lay.tensors]
        pos = 0
        spans = []
        for b, x in zip(ids, X):
            r = x.shape[0]
            off = 0
            for j in lay.tensors_of(b):
                n = lay.tensors[j].numel()
                bufs[j][pos : pos + r] = x[:, off : off + n].reshape((r,) + tuple(lay.tensors[j].shape))
                off += n
            spans.append((b, pos, r))
            pos += r
            self.matvecs[b] += r
        W = self.products.apply(bufs, (self.curvature,))[self.curvature]
        out = []
        for b, p, r in spans:
            parts = [W[j][p : p + r].reshape(r, -1) for j in lay.tensors_of(b)]
            out.append((torch.cat(parts, 1) if len(parts) > 1 else parts[0]).to(_F64))
        return out


def _apply1(op, ids: Sequence[int], vecs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """One vector per lane: ``[A_{ids[i]} vecs[i]]``."""
    if not ids:
        return []
    return [y[0] for y in op.apply(ids, [v[None] for v in vecs])]


# ============================================================================ Lanczos
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
    Qs, alphas, betas, firsts = [], [], [], [None] * nl
    active, exhausted, scale = [], [False] * nl, [0.0] * nl
    for i in range(nl):
        v = _orth(starts[i].to(_F64), locked[i])
        nv = v.norm()
        if not torch.isfinite(nv) or nv == 0:
            raise ValueError("a Lanczos start vector is zero (or lies in the locked subspace)")
        Qs.append([v / nv])
        alphas.append([])
        betas.append([])
        n_free = op.sizes[ids[i]] - (0 if locked[i] is None else locked[i].shape[0])
        ms[i] = max(1, min(ms[i], n_free))
        active.append(True)
    step = 0
    while any(active):
        act = [i for i in range(nl) if active[i]]
        ws = _apply1(op, [ids[i] for i in act], [Qs[i][-1] for i in act])
        for i, w in zip(act, ws):
            if step == 0:
                firsts[i] = w.clone()
            q = Qs[i][-1]
            if locked[i] is not None:
                w = _orth(w, locked[i])
            a = torch.dot(w, q)
            basis = torch.stack(Qs[i])
            w = _orth(w, basis if locked[i] is None else torch.cat([basis, locked[i]], 0))
            b = w.norm()
            alphas[i].append(a)
            betas[i].append(b)
            scale[i] = max(scale[i], float(a.abs()) + float(b))
            if not (torch.isfinite(a) and torch.isfinite(b)):
                raise FloatingPointError("non-finite curvature product in a Lanczos step (overflow or a NaN loss)")
            done = len(alphas[i]) >= ms[i]
            if float(b) <= breakdown * max(scale[i], 1e-300):
                exhausted[i] = True
                done = True
            if len(alphas[i]) >= op.sizes[ids[i]] - (0 if locked[i] is None else locked[i].shape[0]):
                exhausted[i] = True
            if done:
                active[i] = False
            else:
                Qs[i].append(w / b)
        step += 1
        if on_step is not None:
            on_step(len(act))
    return [
        LanczosRun(alpha=torch.stack(alphas[i]), beta=torch.stack(betas[i]),
                   Q=torch.stack(Qs[i][: len(alphas[i])]),
                   first=firsts[i], exhausted=exhausted[i])
        for i in range(nl)
    ]


def lanczos(matvec: Callable[[torch.Tensor], torch.Tensor], v0: torch.Tensor, m: int) -> LanczosRun:
    """``m``-step Lanczos with full re-orthogonalisation of the symmetric operator ``matvec``.

    Example:
        >>> A = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
        >>> run = lanczos(lambda v: A @ v, torch.ones(10, dtype=torch.float64), 10)
        >>> theta, _, _ = run.ritz()
        >>> torch.allclose(theta, torch.arange(1.0, 11.0, dtype=torch.float64))
        True
    """

    class _One:
        sizes = (v0.shape[0],)

        @staticmethod
        def apply(ids, X):
            return [torch.stack([matvec(x) for x in X[0]])]

    return lanczos_lanes(_One, [0], [v0], m)[0]


def _order(theta: torch.Tensor, which: str) -> torch.Tensor:
    if which == "LM":
        return torch.argsort(theta.abs(), descending=True)
    if which == "LA":
        return torch.argsort(theta, descending=True)
    if which == "SA":
        return torch.argsort(theta)
    raise ValueError(f"which must be one of {WHICH}, got {which!r}")


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


def _better(a: float, b: float, which: str) -> bool:
    if which == "LM":
        return abs(a) > abs(b)
    return a > b if which == "LA" else a < b


def _against(ln: _EigLane) -> torch.Tensor | None:
    rows = ([ln.vecs] if ln.vecs is not None else []) + ([torch.stack(ln.V)] if ln.V else [])
    return torch.cat(rows, 0) if rows else None


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
    nl = len(ids)
    lanes = [_EigLane() for _ in ids]
    fresh_count = [0] * nl

    def fresh(i: int) -> torch.Tensor | None:
        for _ in range(3):
            v = _orth(draw(ids[i], fresh_count[i]).to(_F64), _against(lanes[i]))
            fresh_count[i] += 1
            nv = v.norm()
            if nv > 1e-8:
                return v / nv
        return None

    for i in range(nl):
        lanes[i].nxt = fresh(i)
    last: dict[int, tuple] = {}
    for rnd in range(max_restarts + 1):
        need = [i for i in range(nl) if not lanes[i].done]
        if not need:
            break
        for i in need:
            lanes[i].broke = False
        # ---- extend every lane's basis to m vectors (lockstep)
        while True:
            act = []
            for i in need:
                ln = lanes[i]
                n_locked = 0 if ln.vecs is None else ln.vecs.shape[0]
                if ln.nxt is not None and len(ln.V) < m and len(ln.V) + n_locked < op.sizes[ids[i]]:
                    act.append(i)
            if not act:
                break
            ws = _apply1(op, [ids[i] for i in act], [lanes[i].nxt for i in act])
            if on_step is not None:
                on_step(len(act))
            for i, w in zip(act, ws):
                ln = lanes[i]
                if not bool(torch.isfinite(w).all()):
                    raise FloatingPointError(
                        "non-finite curvature product in a Lanczos step (overflow or NaN loss)")
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
        # ---- Rayleigh-Ritz, locking, thick restart
        for i in need:
            ln = lanes[i]
            n = op.sizes[ids[i]]
            want = min(k, n)
            if not ln.V:
                ln.done = True
                continue
            Vm, AVm = torch.stack(ln.V), torch.stack(ln.AV)
            Hs = Vm @ AVm.T
            theta, S = torch.linalg.eigh(0.5 * (Hs + Hs.T))
            Y, AY = S.T @ Vm, S.T @ AVm
            res = (AY - theta[:, None] * Y).norm(dim=1)
            scale = max(float(theta.abs().max()), 1e-300)
            order = _order(theta, which).tolist()
            locked_idx, entered = [], False
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
                entered = True
            if locked_idx:
                ln.vecs = Y[locked_idx] if ln.vecs is None else torch.cat([ln.vecs, Y[locked_idx]], 0)
            rest = [j for j in order if j not in locked_idx]
            last[i] = (theta[rest], res[rest])
            n_locked = 0 if ln.vecs is None else ln.vecs.shape[0]
            if n_locked >= n or (len(ln.vals) >= want and not (ln.broke and entered)):
                ln.done = True
                continue
            keep = rest[: max(1, min(len(rest), max(want - len(ln.vals) + 2, m // 2)))]
            ln.V = [Y[j] for j in keep]
            ln.AV = [AY[j] for j in keep]
            if ln.nxt is None:  # invariant subspace: look for more (repeated eigenvalues)
                ln.nxt = fresh(i)
                if ln.nxt is None:
                    ln.done = True
    for i, ln in enumerate(lanes):
        want = min(k, op.sizes[ids[i]])
        if len(ln.vals) < want and i in last:
            theta, res = last[i]
            for j in range(theta.shape[0]):
                if len(ln.vals) >= want:
                    break
                ln.vals.append(float(theta[j]))
                ln.res.append(float(res[j]))
                ln.conv.append(False)
        idx = _order(torch.tensor(ln.vals, dtype=_F64), which).tolist()[:want] if ln.vals else []
        ln.vals = [ln.vals[j] for j in idx]
        ln.res = [ln.res[j] for j in idx]
        ln.conv = [ln.conv[j] for j in idx]
        ln.V, ln.AV = [], []
    return lanes


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
    lanes = [_EigLane() for _ in ids]
    nl = len(ids)
    want = [min(k, op.sizes[i]) for i in ids]
    cur: list[torch.Tensor | None] = [None] * nl
    prev = [math.nan] * nl
    count = [0] * nl
    rnd = [0] * nl

    def fresh(i):
        v = draw(ids[i], 100 + rnd[i]).to(_F64)
        v = _orth(v, lanes[i].vecs)
        rnd[i] += 1
        return v / v.norm()

    for i in range(nl):
        cur[i] = fresh(i)
    while True:
        act = [i for i in range(nl) if len(lanes[i].vals) < want[i]]
        if not act:
            break
        ws = _apply1(op, [ids[i] for i in act], [cur[i] for i in act])
        if on_step is not None:
            on_step(len(act))
        for i, w in zip(act, ws):
            v = cur[i]
            lam = float(torch.dot(v, w))  # Rayleigh quotient of A
            bw = sign * w + shift[i] * v
            bw = _orth(bw, lanes[i].vecs)
            count[i] += 1
            nb = bw.norm()
            conv = abs(lam - prev[i]) <= tol * max(abs(lam), 1e-300)
            if conv or count[i] >= iters or nb == 0:
                lanes[i].vals.append(lam)
                lanes[i].res.append(float((w - lam * v).norm()))
                lanes[i].conv.append(bool(conv))
                lanes[i].vecs = v[None] if lanes[i].vecs is None else torch.cat([lanes[i].vecs, v[None]], 0)
                count[i], prev[i] = 0, math.nan
                if len(lanes[i].vals) < want[i]:
                    cur[i] = fresh(i)
                continue
            prev[i] = lam
            cur[i] = bw / nb
    for ln in lanes:
        idx = _order(torch.tensor(ln.vals, dtype=_F64), which).tolist()
        ln.vals = [ln.vals[j] for j in idx]
        ln.res = [ln.res[j] for j in idx]
        ln.conv = [ln.conv[j] for j in idx]
    return lanes


# ============================================================================ SLQ / Hutch++
def slq(op, ids: Sequence[int], starts: Sequence[torch.Tensor], m: int, on_step=None):
    """Stochastic Lanczos quadrature nodes and weights, one lane per start vector.

    Returns a list of ``(theta, tau, ||z||^2)``: Ritz values, ``tau_j = U[0, j]^2`` (summing to 1)
    and the squared norm of the start ``z``; ``||z||^2 sum_j tau_j f(theta_j)`` estimates
    ``z^T f(A) z`` (exact for polynomials of degree ``<= 2 * steps - 1``).
    """
    runs = lanczos_lanes(op, ids, starts, m, on_step=on_step)
    out = []
    for z, run in zip(starts, runs):
        theta, U = torch.linalg.eigh(run.tridiagonal())
        out.append((theta, U[0] ** 2, float(z.to(_F64).pow(2).sum())))
    return out


def hutchpp_trace(op, ids: Sequence[int], m: int, draw: Callable[[int, int, int], torch.Tensor],
                  on_step=None) -> list[float]:
    """Hutch++ (SPEC Algorithm 8.2) on every lane with ``m`` matvecs each (``m >= 3``).

    ``draw(id, first, count)`` returns ``(count, n)`` probes; ``S`` uses probes ``0..s-1`` and
    ``G`` probes ``s..m-s-1`` with ``s = m // 3``. Returns one unbiased trace estimate per lane.
    """
    if m < 3:
        raise ValueError(f"Hutch++ needs a budget of m >= 3 matvecs, got {m}")
    s = m // 3
    g = m - 2 * s
    S = [draw(i, 0, s).to(_F64) for i in ids]
    AS = op.apply(ids, S)
    if on_step:
        on_step(s * len(ids))
    Qs = [torch.linalg.qr(y.T)[0].T for y in AS]  # rows: orthonormal basis of range(A S)
    AQ = op.apply(ids, Qs)
    if on_step:
        on_step(s * len(ids))
    Gs = [draw(i, s, g).to(_F64) for i in ids]
    Gp = [x - (x @ q.T) @ q for x, q in zip(Gs, Qs)]
    AG = op.apply(ids, Gp)
    if on_step:
        on_step(g * len(ids))
    return [float((q * aq).sum() + (gp * ag).sum() / g) for q, aq, gp, ag in zip(Qs, AQ, Gp, AG)]


def energy_fraction(eigenvalues: torch.Tensor, frobenius2: float, k: int) -> float:
    """``sum_{i <= k} theta_i^2 / ||A||_F^2`` over the ``k`` largest ``|theta|``."""
    th = torch.as_tensor(eigenvalues, dtype=_F64).abs().sort(descending=True).values
    return float((th[:k] ** 2).sum() / frobenius2)


def hutchpp_wins(eigenvalues: torch.Tensor, frobenius2: float, m: int) -> bool:
    """SPEC section 8's switching rule: Hutch++ with ``m`` matvecs beats Hutchinson when the
    top ``m/3`` eigenvalues hold more than 2/3 of ``||A||_F^2`` (Gaussian-probe criterion
    ``||A - A_{m/3}||_F^2 < ||A||_F^2 / 3``; Rademacher Hutchinson is even better on
    near-diagonal blocks). ``eigenvalues``: the top eigenvalues or Ritz values.

    Example:
        >>> hutchpp_wins(torch.tensor([10.0, 1.0, 0.1]), 101.01 + 5.0, m=3)
        True
        >>> hutchpp_wins(torch.ones(30), 100.0, m=30)
        False
    """
    return energy_fraction(eigenvalues, frobenius2, m // 3) > 2.0 / 3.0


# ============================================================================ model-level API
@dataclass
class _Session:
    layout: BlockLayout
    op: BlockOperator
    products: CurvatureProducts
    seed: int
    probe: str
    select: list[int]
    spec_kind: str

    def draw(self, b: int, index: int, count: int = 1) -> torch.Tensor:
        """``(count, n_b)`` float64 counter-based probes ``index .. index+count-1`` on block ``b``."""
        z = probe_rows(self.layout, self.seed, self.probe, list(range(index, index + count)), [b] * count)
        parts = [z[j].reshape(count, -1) for j in self.layout.tensors_of(b)]
        return (torch.cat(parts, 1) if len(parts) > 1 else parts[0]).to(_F64)


def _select(layout: BlockLayout, select) -> list[int]:
    if select is None:
        return list(range(layout.num_blocks))
    items = [select] if isinstance(select, (str, int)) else list(select)
    out = []
    for it in items:
        if isinstance(it, int) and not isinstance(it, bool):
            if not 0 <= it < layout.num_blocks:
                raise ValueError(f"block index {it} out of range (L={layout.num_blocks})")
            out.append(it)
        else:
            out.append(layout.index(it))
    return out


@contextlib.contextmanager
def _session(model, loss, data, blocks, curvature, seed, probe, hvp, select, probe_batch, max_memory):
    if curvature not in ("hessian", "ggn"):
        raise ValueError(f"curvature must be 'hessian' or 'ggn', got {curvature!r}")
    check_probe_kind(probe)
    seed = resolve_seed(seed)
    check_model(model)
    inner = unwrap_model(model)
    layout = resolve_blocks(inner, blocks)
    spec = make_loss_spec(loss, data)
    sel = _select(layout, select)
    rows = _rows_per_call(layout, probe_batch, max_memory)
    with PreservedState(inner):
        prods = CurvatureProducts(inner, layout, spec, (curvature,), hvp=hvp, max_rows=rows)
        try:
            yield _Session(layout, BlockOperator(prods, layout, curvature), prods, seed, probe, sel, spec.kind)
        finally:
            prods.close()


def _meta(s: _Session, t0: float, **kw) -> dict:
    info = s.products.describe()
    return {"seed": s.seed, "probe": s.probe, "hvp": next(iter(info["backbones"].values()), None),
            "matvecs": {s.layout.block_names[b]: s.op.matvecs[b] for b in s.select}, "passes": info["passes"],
            "n_batches": info["n_batches"], "loss_form": s.spec_kind, "wall_time_s": time.perf_counter() - t0,
            **kw}


@dataclass
class BlockEigenvalues:
    """Extreme eigenvalues of diagonal blocks ``M_bb``.

    Attributes:
        names: the analysed blocks; eigenvalues / residuals / converged: per block, ``(k,)``
        tensors in ``which`` order (residual: ``||A y - theta y||``, an error bound on theta);
        which, method, meta.
    """

    names: list[str]
    eigenvalues: list[torch.Tensor]
    residuals: list[torch.Tensor]
    converged: list[torch.Tensor]
    which: str
    method: str
    meta: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: int | str) -> torch.Tensor:
        return self.eigenvalues[key if isinstance(key, int) else self.names.index(key)]

    @property
    def norm2(self) -> torch.Tensor:
        """``(L,)`` max ``|eigenvalue|`` found per block (``||M_bb||_2`` when ``which="LM"``)."""
        return torch.tensor([float(e.abs().max()) for e in self.eigenvalues], dtype=_F64)

    def table(self) -> str:
        lines = [f"{'block':<28} {'eigenvalues (' + self.which + ')':<48} {'max resid':>10} conv"]
        for n, e, r, c in zip(self.names, self.eigenvalues, self.residuals, self.converged):
            ev = " ".join(f"{float(x):.5g}" for x in e[:6]) + (" ..." if e.numel() > 6 else "")
            lines.append(f"{n[-28:]:<28} {ev:<48} {float(r.max()):10.2e} {int(c.sum())}/{c.numel()}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"BlockEigenvalues(which={self.which!r}, method={self.method!r})\n" + self.table()


def block_eigenvalues(
    model: nn.Module,
    loss,
    k: int = 1,
    *,
    data=None,
    blocks="param",
    select=None,
    which: str = "LM",
    method: str = "lanczos",
    m: int | None = None,
    tol: float = 1e-6,
    max_restarts: int = 5,
    iters: int = 100,
    curvature: str = "hessian",
    seed: int | None = None,
    probe: str = "rademacher",
    hvp: str = "auto",
    probe_batch: int | None = None,
    max_memory: int | None = None,
    progress: bool | None = None,
) -> BlockEigenvalues:
    """Top-``k`` eigenvalues of each diagonal block ``M_bb`` (``M = H`` or ``G``).

    Args:
        model, loss, data, blocks, curvature, seed, probe, hvp: as in ``block_traces``.
        k: eigenvalues per block (at most the block size).
        select: block names/indices to analyse (default: all), each costs its own matvecs.
        which: ``"LM"`` (largest magnitude), ``"LA"`` (largest), ``"SA"`` (smallest, i.e. the
            most negative curvature).
        method: ``"lanczos"`` (default; ``m`` steps per round with full re-orthogonalisation,
            deflation by locking, up to ``max_restarts`` extra rounds) or ``"power"``
            (``iters`` products per eigenvalue at most).
        m: Lanczos steps per round (default ``max(20, 3k)``, capped at the block size).
        tol: convergence tolerance (relative Ritz residual, or relative change of the
            Rayleigh quotient for power iteration).

    Returns:
        :class:`BlockEigenvalues`.

    Example:
        >>> import torch
        >>> from hutchtrace.structure.spectra import block_eigenvalues
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> ev = block_eigenvalues(net, torch.nn.CrossEntropyLoss(), k=2, data=(x, y), select="2.weight", seed=0)
        >>> ev["2.weight"].shape
        torch.Size([2])
    """
    t0 = time.perf_counter()
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if method not in ("lanczos", "power"):
        raise ValueError(f"method must be 'lanczos' or 'power', got {method!r}")
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    m = m or max(20, 3 * k)
    with _session(model, loss, data, blocks, curvature, seed, probe, hvp, select, probe_batch, max_memory) as s:
        prog = Progress(None, "block_eigenvalues", progress, unit="matvec")
        try:
            draw = lambda b, r: s.draw(b, r)[0]
            if method == "lanczos":
                lanes = eigsh(s.op, s.select, k, which, draw, m=m, tol=tol, max_restarts=max_restarts,
                              on_step=prog.update)
            else:
                lanes = power_iteration(s.op, s.select, k, which, draw, iters=iters, tol=tol, on_step=prog.update)
        finally:
            prog.close()
        meta = _meta(s, t0, curvature=curvature, k=k, m=m, tol=tol)
    names = [s.layout.block_names[b] for b in s.select]
    return BlockEigenvalues(
        names=names,
        eigenvalues=[torch.tensor(ln.vals, dtype=_F64) for ln in lanes],
        residuals=[torch.tensor(ln.res, dtype=_F64) for ln in lanes],
        converged=[torch.tensor(ln.conv, dtype=torch.bool) for ln in lanes],
        which=which, method=method, meta=meta,
    )


@dataclass
class StableRank:
    """Stable rank ``D_b = ||M_bb||_F^2 / ||M_bb||_2^2`` per block.

    Attributes:
        names; D, D_se: ``(L,)`` estimates and SEs (from the Frobenius SE only: ``||.||_2`` is
        taken as converged; until it is, ``D`` is biased upward); frobenius2, frobenius2_se:
        ``||M_bb||_F^2`` from block-supported probes; norm2: ``max|theta|`` (a lower bound on
        ``||M_bb||_2``); residual: its Ritz residual; ritz: per block, all Ritz values of the
        Lanczos run (for :meth:`energy_fraction` / :meth:`hutchpp_recommended`); meta.
    """

    names: list[str]
    D: torch.Tensor
    D_se: torch.Tensor
    frobenius2: torch.Tensor
    frobenius2_se: torch.Tensor
    norm2: torch.Tensor
    residual: torch.Tensor
    ritz: list[torch.Tensor]
    samples: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    def energy_fraction(self, k: int) -> torch.Tensor:
        """``(L,)`` fraction of ``||M_bb||_F^2`` in the ``k`` largest ``|Ritz values|``."""
        return torch.tensor([energy_fraction(r, float(f), k) for r, f in zip(self.ritz, self.frobenius2)],
                            dtype=_F64)

    def hutchpp_recommended(self, m: int) -> list[bool]:
        """Per block: would Hutch++ with ``m`` matvecs beat Hutchinson (SPEC section 8 rule)?
        Reliable for ``m/3`` well below the Lanczos steps (only extreme Ritz values converge)."""
        return [bool(f > 2.0 / 3.0) for f in self.energy_fraction(m // 3)]

    def table(self) -> str:
        lines = [f"{'block':<28} {'D':>9} {'± D':>8} {'||.||_F^2':>11} {'||.||_2':>10} {'resid':>9}"]
        for b, n in enumerate(self.names):
            lines.append(f"{n[-28:]:<28} {float(self.D[b]):9.4g} {float(self.D_se[b]):8.2g} "
                         f"{float(self.frobenius2[b]):11.4g} {float(self.norm2[b]):10.4g} "
                         f"{float(self.residual[b]):9.2e}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return "StableRank\n" + self.table()


def stable_rank(
    model: nn.Module,
    loss,
    K: int = 10,
    *,
    m: int = 20,
    data=None,
    blocks="param",
    select=None,
    curvature: str = "hessian",
    seed: int | None = None,
    probe: str = "rademacher",
    hvp: str = "auto",
    probe_batch: int | None = None,
    max_memory: int | None = None,
    progress: bool | None = None,
) -> StableRank:
    """Stable rank ``D_b = ||M_bb||_F^2 / ||M_bb||_2^2`` of each diagonal block (SPEC 6c).

    Cost per block: ``m`` Lanczos steps plus ``K - 1`` block-supported probes (the first
    Frobenius sample is the Lanczos start vector's product).

    Example:
        >>> import torch
        >>> from hutchtrace.structure.spectra import stable_rank
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> sr = stable_rank(net, torch.nn.CrossEntropyLoss(), K=4, data=(x, y), seed=0, select="0.weight")
        >>> sr.D.shape, bool(sr.norm2[0] > 0)
        (torch.Size([1]), True)
    """
    t0 = time.perf_counter()
    K = check_probe_count(K)
    with _session(model, loss, data, blocks, curvature, seed, probe, hvp, select, probe_batch, max_memory) as s:
        prog = Progress(None, "stable_rank", progress, unit="matvec")
        try:
            starts = [s.draw(b, 0)[0] for b in s.select]
            runs = lanczos_lanes(s.op, s.select, starts, m, on_step=prog.update)
            samples = torch.zeros((K, len(s.select)), dtype=_F64)
            for i, (z, run) in enumerate(zip(starts, runs)):
                samples[0, i] = run.first.pow(2).sum() * z.pow(2).sum()
            if K > 1:
                Z = [s.draw(b, 1, K - 1) for b in s.select]
                W = s.op.apply(s.select, Z)
                prog.update(sum(z.shape[0] for z in Z))
                for i, w in enumerate(W):
                    samples[1:, i] = w.pow(2).sum(1)
        finally:
            prog.close()
        meta = _meta(s, t0, curvature=curvature, K=K, m=m)
    fro = samples.mean(0)
    fro_se = samples.std(0) / math.sqrt(K) if K > 1 else torch.full_like(fro, math.nan)
    norm2, resid, ritz = [], [], []
    for run in runs:
        theta, _, res = run.ritz()
        j = int(theta.abs().argmax())
        norm2.append(float(theta[j].abs()))
        resid.append(float(res[j]))
        ritz.append(theta)
    norm2 = torch.tensor(norm2, dtype=_F64)
    D = fro / norm2**2
    return StableRank(names=[s.layout.block_names[b] for b in s.select], D=D, D_se=fro_se / norm2**2,
                      frobenius2=fro,
                      frobenius2_se=fro_se, norm2=norm2, residual=torch.tensor(resid, dtype=_F64), ritz=ritz,
                      samples=samples, meta=meta)


@dataclass
class SpectralDensity:
    """SLQ output per block: nodes ``theta`` and weights ``tau`` of ``n_v`` Lanczos runs.

    Attributes:
        names, numel; nodes, weights: per block, lists of ``n_v`` tensors (``tau`` sums to 1 per
        run); norms2: per block, ``(n_v,)`` squared norms ``||z_l||^2`` of the start probes; meta.
    """

    names: list[str]
    numel: list[int]
    nodes: list[list[torch.Tensor]]
    weights: list[list[torch.Tensor]]
    norms2: list[torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    def _b(self, block) -> int:
        return block if isinstance(block, int) else self.names.index(block)

    def samples(self, block, f: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``(n_v,)`` per-vector estimates ``||z_l||^2 sum_j tau_j f(theta_j)`` of ``tr f(A)``."""
        b = self._b(block)
        return torch.stack([nz * (tau * f(th)).sum() for th, tau, nz in
                            zip(self.nodes[b], self.weights[b], self.norms2[b])])

    def trace(self, block, f: Callable[[torch.Tensor], torch.Tensor] = lambda x: x) -> tuple[float, float]:
        """``(estimate, SE)`` of ``tr f(M_bb)``: the mean over the ``n_v`` vectors and its SE."""
        x = self.samples(block, f)
        se = float(x.std() / math.sqrt(x.numel())) if x.numel() > 1 else math.nan
        return float(x.mean()), se

    def moment(self, block, p: int) -> tuple[float, float]:
        """``(estimate, SE)`` of ``tr M_bb^p``; exact per vector for ``p <= 2m - 1``."""
        return self.trace(block, lambda x: x**p)

    def extremes(self, block) -> tuple[float, float]:
        """Smallest and largest Ritz value over all runs (inner bounds of the spectrum)."""
        b = self._b(block)
        return float(min(t.min() for t in self.nodes[b])), float(max(t.max() for t in self.nodes[b]))

    def density(self, block, grid: torch.Tensor | None = None, sigma: float | None = None,
                points: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
        """``(grid, phi)``: Gaussian-smoothed spectral density (integrates to ~1).

        ``sigma`` defaults to 1 % of the Ritz range; the default grid spans the Ritz range
        padded by ``4 sigma``.
        """
        b = self._b(block)
        lo, hi = self.extremes(b)
        if sigma is None:
            sigma = max(hi - lo, 1e-12 * max(abs(lo), abs(hi), 1.0)) / 100
        if grid is None:
            grid = torch.linspace(lo - 4 * sigma, hi + 4 * sigma, points, dtype=_F64)
        grid = torch.as_tensor(grid, dtype=_F64)
        n = self.numel[b]
        nodes = torch.cat(self.nodes[b])
        w = torch.cat([tau * nz / n for tau, nz in zip(self.weights[b], self.norms2[b])]) / len(self.nodes[b])
        k = torch.exp(-0.5 * ((grid[:, None] - nodes[None, :]) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
        return grid, k @ w


def spectral_density(
    model: nn.Module,
    loss,
    *,
    n_v: int = 10,
    m: int = 40,
    data=None,
    blocks="param",
    select=None,
    curvature: str = "hessian",
    seed: int | None = None,
    probe: str = "rademacher",
    hvp: str = "auto",
    probe_batch: int | None = None,
    max_memory: int | None = None,
    progress: bool | None = None,
) -> SpectralDensity:
    """Spectral density of each diagonal block by stochastic Lanczos quadrature (SPEC 8.1).

    Cost: ``n_v * m`` matvecs per block (all blocks and vectors in lockstep).

    Example:
        >>> import torch
        >>> from hutchtrace.structure.spectra import spectral_density
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> sd = spectral_density(net, torch.nn.CrossEntropyLoss(), n_v=4, m=10, data=(x, y), seed=0)
        >>> grid, phi = sd.density("0.weight")
        >>> abs(float(phi.sum() * (grid[1] - grid[0])) - 1) < 1e-3
        True
    """
    t0 = time.perf_counter()
    n_v = check_probe_count(n_v)
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"m (Lanczos steps) must be a positive int, got {m!r}")
    with _session(model, loss, data, blocks, curvature, seed, probe, hvp, select, probe_batch, max_memory) as s:
        prog = Progress(None, "spectral_density", progress, unit="matvec")
        try:
            ids = [b for b in s.select for _ in range(n_v)]
            starts = [s.draw(b, 0, n_v)[l] for b in s.select for l in range(n_v)]
            out = slq(s.op, ids, starts, m, on_step=prog.update)
        finally:
            prog.close()
        meta = _meta(s, t0, curvature=curvature, n_v=n_v, m=m)
    names = [s.layout.block_names[b] for b in s.select]
    nodes, weights, norms = [], [], []
    for i in range(len(s.select)):
        part = out[i * n_v : (i + 1) * n_v]
        nodes.append([p[0] for p in part])
        weights.append([p[1] for p in part])
        norms.append(torch.tensor([p[2] for p in part], dtype=_F64))
    return SpectralDensity(names=names, numel=[s.layout.blocks[b].numel for b in s.select], nodes=nodes,
                           weights=weights, norms2=norms, meta=meta)


@dataclass
class HutchppTraces:
    """Hutch++ trace estimates per block: ``estimates`` ``(reps, L)``, ``mean``, ``se`` (NaN for one rep)."""

    names: list[str]
    estimates: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def mean(self) -> torch.Tensor:
        return self.estimates.mean(0)

    @property
    def se(self) -> torch.Tensor:
        r = self.estimates.shape[0]
        return self.estimates.std(0) / math.sqrt(r) if r > 1 else torch.full((self.estimates.shape[1],), math.nan)


def hutchpp(
    model: nn.Module,
    loss,
    m: int = 30,
    *,
    reps: int = 1,
    data=None,
    blocks="param",
    select=None,
    curvature: str = "hessian",
    seed: int | None = None,
    probe: str = "rademacher",
    hvp: str = "auto",
    probe_batch: int | None = None,
    max_memory: int | None = None,
    progress: bool | None = None,
) -> HutchppTraces:
    """Hutch++ trace of each diagonal block with ``m`` matvecs per block and repetition.

    Use it for near-low-rank blocks only (see :func:`hutchpp_wins` and
    :meth:`StableRank.hutchpp_recommended`); independent repetitions (``reps >= 2``) give an SE.

    Example:
        >>> import torch
        >>> from hutchtrace.structure.spectra import hutchpp
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> hutchpp(net, torch.nn.CrossEntropyLoss(), m=9, reps=2, data=(x, y), seed=0).estimates.shape
        torch.Size([2, 4])
    """
    t0 = time.perf_counter()
    reps = check_probe_count(reps)
    with _session(model, loss, data, blocks, curvature, seed, probe, hvp, select, probe_batch, max_memory) as s:
        prog = Progress(None, "hutchpp", progress, unit="matvec")
        try:
            est = torch.zeros((reps, len(s.select)), dtype=_F64)
            for r in range(reps):
                draw = lambda b, first, count, r=r: s.draw(b, r * m + first, count)
                est[r] = torch.tensor(hutchpp_trace(s.op, s.select, m, draw, on_step=prog.update), dtype=_F64)
        finally:
            prog.close()
        meta = _meta(s, t0, curvature=curvature, m=m, reps=reps)
    return HutchppTraces(names=[s.layout.block_names[b] for b in s.select], estimates=est, meta=meta)
