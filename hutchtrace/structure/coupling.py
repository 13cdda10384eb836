"""Inter-block coupling: ``||M_bc||_F^2`` for every pair of blocks, resonance and coupling
fraction, for ``M = H`` (the Hessian) or ``M = G`` (the Gauss-Newton matrix).

Definitions (docs/maths.md sections 0 and 6), for a symmetric ``M`` split into blocks ``I_1..I_L``:

* ``F_bc = ||M_bc||_F^2`` (so ``F_bc = F_cb``);
* row energy ``rho_b = ||M_{b,:}||_F^2 = sum_c F_bc``; cross energy ``X_b = sum_{c != b} F_bc``
  (exactly the variance that global probing adds to block ``b``'s trace estimate);
* coupling fraction ``C_b = X_b / rho_b = 1 - F_bb / rho_b``, in ``[0, 1]``;
* resonance ``R_bc = ||M_bc||_F / sqrt(||M_bb||_F ||M_cc||_F)``. It is invariant to rescaling
  blocks (``theta_b -> a_b theta_b``). It is ``<= 1`` **only for PSD matrices** (so for ``G``,
  whenever the criterion is convex in the outputs), not for ``H``: near a saddle it can be
  ``>> 1``. It is never clipped; use ``curvature="ggn"`` for a ``[0, 1]`` correlation-like scale.

Estimators (``mode``):

``"block"`` (recommended; ``L`` products per probe)
    Block-supported probes: ``z^(c)`` is the probe restricted to block ``c`` (zeros elsewhere),
    so ``w = M z^(c)`` has ``w_b = M_bc z_c`` for **every** ``b`` and ``F_bc^ = ||w_b||^2`` is
    unbiased (``E||Az||^2 = ||A||_F^2`` for any isotropic probe), with variance
    ``2||M_cb M_bc||_F^2 + (mu4 - 3) sum_j (M_cb M_bc)_jj^2``. One probe index gives all ``L^2``
    entries; they are symmetrised ``(F_bc^ + F_cb^)/2``. ``R`` and ``C`` are ratios of the averaged
    estimates (never of per-probe ratios); their SEs come from the delta method on the per-probe
    samples.
``"rowsum"`` (one product per probe)
    Global probes: ``E||(Mz)_b||^2 = rho_b``. With ``K >= 2`` the diagonal ``F_bb`` comes free from
    the pairwise U-statistic below, so ``C_b`` is reported too; off-diagonal entries are NaN.
``"ustat"`` (one product per probe, all pairs)
    The zero-extra-cost all-pairs U-statistic from ``K >= 2`` global probes (only ``E zz^T = I``
    is needed). With the Gram matrices ``Mg_b = W_b^T Z_b`` (``Mg_b[k,l] = w_b^(k) . z_b^(l)``)::

        S_bc = (<Mg_b, Mg_c^T>_F - sum_k Mg_b[k,k] Mg_c[k,k]) / (K (K - 1))

    is unbiased for ``F_bc``. Caveats: being an order-2 U-statistic its variance is about
    ``4 zeta1/K + 2 zeta2/K^2``, i.e. per product 1.5-43x that of block probes at ``K = 64`` and
    up to 225x at ``K = 4`` (docs/maths.md section 6); it is usable for large blocks with many probes, not
    for small ones; it can be **negative**, so ``R`` (NaN where an entry is <= 0) and ``C`` are
    only meaningful where the estimates are clearly positive; it costs ``O(K^2 P)`` flops.
    The SE of ``F`` comes from an unbiased variance estimate (``K >= 4``, see
    :func:`ustat_from_gram`); those of ``R`` and ``C`` are leave-one-probe-out jackknife SEs
    (``K >= 3``), conservative for U-statistics (measured 1.4-3x the variance on the test MLP).

:func:`estimate_coupling_matrix` is the cheap pilot ``(F^, SE)`` used to choose probe groups;
:class:`GramSink` collects the U-statistic's Gram matrices inside any
:class:`~hutchtrace.estimate.engine.ProbeRunner` run (``block_traces``' own probes, zero extra products).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..backbones.curvature_op import CurvatureProducts, probe_rows
from ..core.progress import Progress
from ..core.state import PreservedState
from ..core.validate import check_model, check_probe_kind, resolve_seed
from ..estimate.engine import RowBatch, Sink, check_probe_count
from ..problem.blocks import BlockLayout, resolve_blocks, unwrap_model
from ..problem.loss import make_loss_spec
from .decompose import _rows_per_call

__all__ = [
    "Coupling",
    "GramSink",
    "UStatistic",
    "block_coupling",
    "coupling_fraction",
    "estimate_coupling_matrix",
    "resonance",
    "ustat_from_gram",
]

MODES = ("block", "rowsum", "ustat")
CURVATURES = ("hessian", "ggn")


# ---------------------------------------------------------------------------- derived metrics
def resonance(F: torch.Tensor) -> torch.Tensor:
    """``R_bc = sqrt(F_bc) / (F_bb F_cc)^(1/4)`` from an ``(L, L)`` matrix of ``||M_bc||_F^2``.

    Not clipped; NaN where an entry is <= 0 (possible for the U-statistic).

    Example:
        >>> resonance(torch.tensor([[4.0, 1.0], [1.0, 1.0]]))[0, 1].item()   # 1 / sqrt(2 * 1)
        0.7071067690849304
    """
    d = torch.diagonal(F)
    denom = (d[:, None] * d[None, :]).sqrt().sqrt()
    R = F.sqrt() / denom
    return torch.where((F > 0) & (denom > 0), R, torch.full_like(R, math.nan))


def coupling_fraction(F: torch.Tensor) -> torch.Tensor:
    """``C_b = sum_{c != b} F_bc / sum_c F_bc`` from an ``(L, L)`` matrix of ``||M_bc||_F^2``."""
    rho = F.sum(1)
    return (rho - torch.diagonal(F)) / rho


def _jackknife_se(loo: torch.Tensor) -> torch.Tensor:
    """Jackknife SE from leave-one-out values ``(..., K)``: ``sqrt((K-1)/K sum (v_i - v_.)^2)``."""
    K = loo.shape[-1]
    if K < 3:
        return torch.full(loo.shape[:-1], math.nan, dtype=loo.dtype)
    ok = torch.isfinite(loo).all(-1)
    dev = loo - loo.mean(-1, keepdim=True)
    se = ((K - 1) / K * (dev * dev).sum(-1)).sqrt()
    return torch.where(ok, se, torch.full_like(se, math.nan))


@dataclass
class UStatistic:
    """The all-pairs U-statistic: ``estimate`` ``(L, L)``, its unbiased (unclamped) ``variance``,
    ``se = sqrt(max(variance, 0))`` and the ``(L, L, K)`` leave-one-probe-out estimates ``loo``."""

    estimate: torch.Tensor
    variance: torch.Tensor
    se: torch.Tensor
    loo: torch.Tensor | None


def ustat_from_gram(G: torch.Tensor, *, jackknife: bool = True) -> UStatistic:
    """All-pairs U-statistic of ``||M_bc||_F^2`` from Gram matrices ``G[b, k, l] = w_b^(k) . z_b^(l)``.

    ``S_bc = (sum_{k,l} G_b[k,l] G_c[l,k] - sum_k G_b[k,k] G_c[k,k]) / (K (K - 1))`` (docs/maths.md section 6a) is an
    order-2 U-statistic with the symmetric kernel ``phi_kl = (a_kl + a_lk) / 2``,
    ``a_kl = G_b[k,l] G_c[l,k]``: unbiased for ``||M_bc||_F^2`` whenever ``E zz^T = I`` and the ``K``
    probes are independent.

    Its variance is estimated **unbiasedly** (``K >= 4``) as ``S^2 - theta2``, where ``theta2``, the
    average of ``phi_ij phi_kl`` over ordered quadruples of distinct probes, is unbiased for
    ``(E S)^2``: with ``r_i = sum_{j != i} phi_ij`` and ``Sum = sum_i r_i``,
    ``sum_distinct = Sum^2 - 4 sum_i r_i^2 + 2 sum_{i != j} phi_ij^2``. The estimate can be
    negative for small ``K``; the SE is ``sqrt(max(var, 0))``.

    Returns:
        :class:`UStatistic`: the ``(L, L)`` estimates, their variance estimates and SEs (NaN for
        ``K < 4``), and the ``(L, L, K)`` leave-one-probe-out estimates for jackknifing smooth
        functions of ``S`` (``None`` unless ``jackknife`` and ``K >= 3``).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> A = torch.randn(5, 5, generator=g, dtype=torch.float64); A = A + A.T   # one block
        >>> Z = torch.randint(0, 2, (400, 5), generator=g).double() * 2 - 1
        >>> u = ustat_from_gram(((Z @ A) @ Z.T)[None])          # Gram[k, l] = (A z_k) . z_l
        >>> abs(float(u.estimate) - float((A ** 2).sum())) < 4 * float(u.se)
        True
    """
    G = G.to(torch.float64)
    K = G.shape[1]
    if K < 2:
        raise ValueError(f"the U-statistic needs K >= 2 probes, got K={K}")
    rows = torch.einsum("bil,cli->bci", G, G)  # sum_l a_il            (L, L, K)
    cols = torch.einsum("cik,bki->bci", G, G)  # sum_k a_ki
    diag = torch.diagonal(G, dim1=1, dim2=2)  # (L, K)
    aii = diag[:, None, :] * diag[None, :, :]  # a_ii
    A = rows.sum(-1) - aii.sum(-1)
    S = A / (K * (K - 1))
    var = torch.full_like(S, math.nan)
    if K >= 4:
        r = 0.5 * (rows + cols) - aii
        G2 = G * G
        GGt = G * G.transpose(1, 2)
        a2 = (aii**2).sum(-1)
        sum_phi2 = (0.5 * (torch.einsum("bij,cji->bc", G2, G2) - a2)
                    + 0.5 * (torch.einsum("bij,cij->bc", GGt, GGt) - a2))
        quad = A * A - 4 * (r * r).sum(-1) + 2 * sum_phi2
        var = S * S - quad / (K * (K - 1) * (K - 2) * (K - 3))
    loo = None
    if jackknife and K >= 3:
        loo = (A[..., None] - (rows + cols - 2 * aii)) / ((K - 1) * (K - 2))
    return UStatistic(estimate=S, variance=var, se=var.clamp_min(0).sqrt(), loo=loo)


class GramSink(Sink):
    """Collects ``Gram[b, k, l] = w_b^(k) . z_b^(l)`` from global-probe rows of a
    :class:`~hutchtrace.estimate.engine.ProbeRunner` run (zero extra HVPs).

    Add it to the sinks of a **global-plan** run over probe indices ``0..K-1`` (rows of other
    plans are restricted probes, for which this Gram matrix means something else); after the run,
    :attr:`gram` holds the Gram matrices of the full (dataset-mean) matrix and
    :meth:`estimate` returns :func:`ustat_from_gram`. The ``z^(l)`` are regenerated from
    ``(seed, l, offsets)`` in chunks of ``chunk`` probes, so memory stays
    ``O(chunk * P + L K^2)``; the cost is ``O(K^2 P)`` flops.
    """

    def __init__(self, layout: BlockLayout, seed: int, kind: str, K: int, chunk: int = 16):
        self.layout = layout
        self.seed, self.kind, self.K, self.chunk = seed, kind, K, chunk
        self.gram = torch.zeros((layout.num_blocks, K, K), dtype=torch.float64, device=layout.device())

    def on_rows(self, rb: RowBatch) -> None:
        add_gram_(self.gram, self.layout, rb.w, rb.ks, self.seed, self.kind, self.chunk, alpha=rb.weight)

    def finish(self, total_count: float) -> None:
        if total_count != 1.0:
            self.gram /= total_count

    def estimate(self, jackknife: bool = True) -> UStatistic:
        return ustat_from_gram(self.gram.cpu(), jackknife=jackknife)


def add_gram_(gram: torch.Tensor, layout: BlockLayout, w, ks, seed: int, kind: str, chunk: int = 16,
              alpha: float = 1.0) -> None:
    """``gram[b, ks[r], l] += alpha * w_b[r] . z_b^(l)`` for all ``l < K`` (probes regenerated)."""
    K = gram.shape[1]
    L = layout.num_blocks
    rows = torch.as_tensor(ks, device=gram.device)
    for s in range(0, K, chunk):
        ls = list(range(s, min(K, s + chunk)))
        Z = probe_rows(layout, seed, kind, ls)
        part = torch.zeros((L, len(ks), len(ls)), dtype=torch.float64, device=gram.device)
        for j in range(len(layout.tensors)):
            wj = w[j].reshape(w[j].shape[0], -1).to(torch.float64)
            zj = Z[j].reshape(len(ls), -1).to(torch.float64)
            part[layout.block_index[j]] += wj @ zj.T
        gram[:, rows, s : s + len(ls)] += alpha * part


# ---------------------------------------------------------------------------- result
@dataclass
class Coupling:
    """Block x block coupling of ``M`` (``curvature``) estimated in ``mode``.

    Attributes:
        names: block names.
        F, F_se: ``(L, L)`` estimates of ``||M_bc||_F^2`` and their SEs (NaN where the mode
            does not estimate an entry).
        R, R_se: ``(L, L)`` resonance ``||M_bc||_F / sqrt(||M_bb||_F ||M_cc||_F)`` (never clipped).
        C, C_se: ``(L,)`` coupling fraction ``X_b / rho_b``.
        rho, rho_se: ``(L,)`` row energy ``||M_{b,:}||_F^2``.
        X: ``(L,)`` cross energy ``sum_{c != b} ||M_bc||_F^2`` (the inflation of ``Var t_b``
            under global probing).
        samples: block mode: ``(K, L, L)`` symmetrised per-probe samples; otherwise ``(K, L)``
            per-probe ``||(Mz)_b||^2``.
        mode, curvature, meta.
    """

    names: list[str]
    F: torch.Tensor
    F_se: torch.Tensor
    R: torch.Tensor
    R_se: torch.Tensor
    C: torch.Tensor
    C_se: torch.Tensor
    rho: torch.Tensor
    rho_se: torch.Tensor
    X: torch.Tensor
    samples: torch.Tensor
    mode: str
    curvature: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def K(self) -> int:
        return int(self.samples.shape[0])

    def index(self, name: str) -> int:
        return self.names.index(name)

    def resonance(self, b: int | str, c: int | str) -> float:
        """``R_bc`` by block index or name."""
        b = self.index(b) if isinstance(b, str) else b
        c = self.index(c) if isinstance(c, str) else c
        return float(self.R[b, c])

    def table(self) -> str:
        """Per-block row energy, cross energy and coupling fraction."""
        head = f"{'block':<28} {'rho=||M_b,:||^2':>16} {'X_b':>11} {'C_b':>7} {'± C':>7}"
        lines = [head, "-" * len(head)]
        for b, n in enumerate(self.names):
            name = n if len(n) <= 28 else "…" + n[-27:]
            lines.append(f"{name:<28} {float(self.rho[b]):16.5g} {float(self.X[b]):11.4g} {float(self.C[b]):7.3f} "
                         f"{float(self.C_se[b]):7.3f}")
        lines.append(f"mode={self.mode}, curvature={self.curvature}, K={self.K}, "
                     f"products={self.meta.get('products')}, {self.meta.get('wall_time_s', math.nan):.3g} s")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Coupling(L={len(self.names)}, mode={self.mode!r}, curvature={self.curvature!r}, K={self.K})\n" + \
            self.table()

    def to_dataframe(self):
        """Long-form pandas DataFrame: one row per ordered pair ``(b, c)`` (needs pandas)."""
        try:
            import pandas as pd
        except ImportError as exc:  # pragma: no cover - depends on environment
            raise ImportError("to_dataframe() needs pandas: pip install pandas") from exc
        rows = []
        for b, nb in enumerate(self.names):
            for c, nc in enumerate(self.names):
                rows.append({"block": nb, "other": nc, "F": float(self.F[b, c]), "F_se": float(self.F_se[b, c]),
                             "R": float(self.R[b, c]), "R_se": float(self.R_se[b, c])})
        return pd.DataFrame(rows)


# ---------------------------------------------------------------------------- estimators
def _check_args(K, mode, curvature, probe, seed, model):
    K = check_probe_count(K)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
    check_probe_kind(probe)
    if mode == "ustat" and K < 2:
        raise ValueError("mode='ustat' needs K >= 2 probes (pairs of distinct probes); K >= 16 is advisable")
    seed = resolve_seed(seed)
    check_model(model)
    return K, seed


def _mean_se(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    K = x.shape[0]
    m = x.mean(0)
    se = x.std(0) / math.sqrt(K) if K > 1 else torch.full_like(m, math.nan)
    return m, se


def _block_mode(op: CurvatureProducts, layout: BlockLayout, K: int, seed: int, probe: str, rows: int, prog,
                curvature: str) -> torch.Tensor:
    """``(K, L, L)`` raw samples ``||(M z^(k,c))_b||^2`` (column ``c`` = the probe's block)."""
    L = layout.num_blocks
    raw = torch.zeros((K, L, L), dtype=torch.float64)
    pairs = [(k, c) for k in range(K) for c in range(L)]
    for s in range(0, len(pairs), rows):
        chunk = pairs[s : s + rows]
        ks = [k for k, _ in chunk]
        cs = [c for _, c in chunk]
        z = probe_rows(layout, seed, probe, ks, row_blocks=cs)
        w = op.apply(z)[curvature]
        sq = _block_sq(w, layout)
        for r, (k, c) in enumerate(chunk):
            raw[k, :, c] = sq[r]
        prog.update(len(chunk))
    return raw


def _block_sq(w, layout: BlockLayout) -> torch.Tensor:
    """``(R, L)`` float64 ``||w_b||^2`` per row."""
    R = w[0].shape[0]
    sq = torch.zeros((R, layout.num_blocks), dtype=torch.float64, device=w[0].device)
    for j, wj in enumerate(w):
        sq[:, layout.block_index[j]] += wj.reshape(R, -1).to(torch.float64).pow(2).sum(1)
    return sq.cpu()


def block_coupling(
    model: nn.Module,
    loss,
    K: int = 4,
    *,
    data=None,
    blocks="param",
    mode: str = "block",
    curvature: str = "hessian",
    seed: int | None = None,
    probe: str = "rademacher",
    hvp: str = "auto",
    probe_batch: int | None = None,
    max_memory: int | None = None,
    progress: bool | None = None,
) -> Coupling:
    """Estimate ``||M_bc||_F^2`` for all block pairs, the resonance and the coupling fraction.

    Args:
        model, loss, data, blocks: as in :func:`hutchtrace.block_traces` (``curvature="ggn"``
            needs a criterion with data).
        K: probe indices. ``mode="block"`` costs ``K * L`` products, the others ``K``.
        mode: ``"block"`` (block-supported probes, unbiased, recommended), ``"rowsum"`` (row
            energies, one product per probe) or ``"ustat"`` (all pairs from global probes; see
            the module docstring for its caveats).
        curvature: ``"hessian"`` (``M = H``) or ``"ggn"`` (``M = G``; then ``R <= 1``).
        seed, probe, hvp, probe_batch, max_memory, progress: as in ``block_traces``.

    Returns:
        :class:`Coupling`.

    Example:
        >>> import torch
        >>> from hutchtrace import block_coupling
        >>> g = torch.Generator().manual_seed(0)
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> x, y = torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g)
        >>> cp = block_coupling(net, torch.nn.CrossEntropyLoss(), K=8, data=(x, y), curvature="ggn", seed=0)
        >>> cp.F.shape, bool(torch.allclose(cp.F, cp.F.T))
        (torch.Size([4, 4]), True)
        >>> bool((cp.C >= 0).all() and (cp.C <= 1).all())
        True
    """
    t0 = time.perf_counter()
    K, seed = _check_args(K, mode, curvature, probe, seed, model)
    inner = unwrap_model(model)
    layout = resolve_blocks(inner, blocks)
    spec = make_loss_spec(loss, data)
    L = layout.num_blocks
    rows = _rows_per_call(layout, probe_batch, max_memory)
    n_rows = K * L if mode == "block" else K
    prog = Progress(n_rows, f"block_coupling[{mode}]", progress)
    with PreservedState(inner):
        op = CurvatureProducts(inner, layout, spec, (curvature,), hvp=hvp, max_rows=rows)
        try:
            if mode == "block":
                raw = _block_mode(op, layout, K, seed, probe, rows, prog, curvature)
            else:
                energy, gram = _global_mode(op, layout, K, seed, probe, rows, prog, curvature)
        finally:
            op.close()
            prog.close()
    info = op.describe()
    meta = {"K": K, "seed": seed, "probe": probe, "mode": mode, "curvature": curvature,
            "hvp": info["backbones"].get(curvature), "products": info["products"].get(curvature),
            "passes": info["passes"], "n_batches": info["n_batches"], "loss_form": spec.kind,
            "device": str(layout.device()), "dtype": str(layout.tensors[0].dtype)}

    if mode == "block":
        est = _block_estimates(raw, K)
    else:
        est = _global_estimates(energy, gram, K, L, mode)
    meta["wall_time_s"] = time.perf_counter() - t0
    return Coupling(names=layout.block_names, **est, mode=mode, curvature=curvature, meta=meta)


def _global_mode(op, layout, K, seed, probe, rows, prog, curvature):
    """Global probes: per-probe block row energies ``||(M z)_b||^2`` ``(K, L)`` and, for
    ``K >= 2``, the per-block Gram matrices of the products for the U-statistic."""
    L = layout.num_blocks
    energy = torch.zeros((K, L), dtype=torch.float64)
    gram = torch.zeros((L, K, K), dtype=torch.float64, device=layout.device())
    for s in range(0, K, rows):
        ks = list(range(s, min(K, s + rows)))
        z = probe_rows(layout, seed, probe, ks)
        w = op.apply(z)[curvature]
        energy[ks[0] : ks[-1] + 1] = _block_sq(w, layout)
        if K >= 2:
            add_gram_(gram, layout, w, ks, seed, probe, chunk=rows)
        prog.update(len(ks))
    return energy, gram


def _block_estimates(raw: torch.Tensor, K: int) -> dict:
    """``mode="block"``: F, R, C and their SEs from the ``(K, L, L)`` block-probe samples."""
    samples = 0.5 * (raw + raw.transpose(1, 2))
    F, F_se = _mean_se(samples)
    rho_s = samples.sum(2)
    X_s = rho_s - torch.diagonal(samples, dim1=1, dim2=2)
    rho, rho_se = _mean_se(rho_s)
    X = X_s.mean(0)
    R = resonance(F)
    C = X / rho
    d = torch.diagonal(F)
    dk = torch.diagonal(samples, dim1=1, dim2=2)
    # delta method on per-probe linearisations of log R and log C
    lin_R = 0.5 * samples / F - 0.25 * (dk / d)[:, :, None] - 0.25 * (dk / d)[:, None, :]
    R_se = R * _sd(lin_R) / math.sqrt(K)
    lin_C = X_s / X - rho_s / rho
    C_se = C * _sd(lin_C) / math.sqrt(K)
    return dict(F=F, F_se=F_se, R=R, R_se=R_se, C=C, C_se=C_se, rho=rho, rho_se=rho_se, X=X, samples=samples)


def _global_estimates(energy: torch.Tensor, gram: torch.Tensor, K: int, L: int, mode: str) -> dict:
    """``mode="rowsum"``/``"ustat"``: the diagonal (rowsum) or all of F (ustat), C and the SEs
    (jackknife over probes) from the row energies and the Gram matrices."""
    nan_LL = torch.full((L, L), math.nan, dtype=torch.float64)
    samples = energy
    rho, rho_se = _mean_se(energy)
    if K >= 2:
        u = ustat_from_gram(gram.cpu())
        S, S_se, loo = u.estimate, u.se, u.loo
    else:
        S, S_se, loo = nan_LL.clone(), nan_LL.clone(), None
    d = torch.diagonal(S)
    C = 1 - d / rho
    if loo is not None:
        rho_loo = (rho[:, None] * K - energy.T) / (K - 1)  # (L, K)
        d_loo = torch.diagonal(loo, dim1=0, dim2=1).T  # (L, K)
        C_se = _jackknife_se(1 - d_loo / rho_loo)
    else:
        C_se = torch.full_like(C, math.nan)
    if mode == "ustat":
        F, F_se = S, S_se
        R = resonance(F)
        R_se = _jackknife_se(torch.stack([resonance(loo[:, :, i]) for i in range(K)], -1)) \
            if loo is not None else nan_LL.clone()
    else:  # rowsum: only the diagonal of F
        eye = torch.eye(L, dtype=torch.bool)
        F = torch.where(eye, S, nan_LL)
        F_se = torch.where(eye, S_se, nan_LL)
        R = torch.where(eye, torch.ones_like(F), nan_LL)
        R_se = torch.where(eye, torch.zeros_like(F), nan_LL)
    X = rho - d
    return dict(F=F, F_se=F_se, R=R, R_se=R_se, C=C, C_se=C_se, rho=rho, rho_se=rho_se, X=X, samples=samples)


def _sd(x: torch.Tensor) -> torch.Tensor:
    if x.shape[0] < 2:
        return torch.full(x.shape[1:], math.nan, dtype=x.dtype)
    return x.std(0)


def estimate_coupling_matrix(model: nn.Module, loss, *, data=None, blocks="param", K: int = 2, mode: str = "block",
                             curvature: str = "hessian", seed: int | None = None, probe: str = "rademacher",
                             hvp: str = "auto", probe_batch: int | None = None, max_memory: int | None = None,
                             progress: bool | None = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Cheap pilot of the coupling matrix: ``(F^, SE)``, both ``(L, L)`` float64 on the CPU.

    ``F^[b, c]`` estimates ``||M_bc||_F^2`` (symmetric). The default (``mode="block"``,
    ``K=2``) costs ``2L`` products and is unbiased; ``mode="ustat"`` costs ``K`` products
    (take ``K >= 16``; entries may be negative and small blocks are noisy). This is what a
    probe-grouping ("colored") scheme needs: put strongly coupled blocks in different groups.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> x, y = torch.randn(8, 3), torch.randn(8, 2)
        >>> F, se = estimate_coupling_matrix(net, lambda o, t: ((o - t) ** 2).mean(), data=(x, y), seed=0)
        >>> F.shape, se.shape
        (torch.Size([4, 4]), torch.Size([4, 4]))
    """
    res = block_coupling(model, loss, K, data=data, blocks=blocks, mode=mode, curvature=curvature, seed=seed,
                         probe=probe, hvp=hvp, probe_batch=probe_batch, max_memory=max_memory, progress=progress)
    return res.F, res.F_se
