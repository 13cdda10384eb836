"""Variance of block-Hutchinson samples: closed form and unbiased estimators.

Closed form (SPEC section 1, Theorem 1.1). For a symmetric H, blocks ``I_1..I_L`` and a
probe plan whose group ``g(b)`` contains block b, the sample
``t_b = z_b^T (H z_{g(b)})_b`` has

.. math::
    \\operatorname{Var} t_b = 2F_{bb} + (\\mu_4 - 3) d_b + \\sum_{c \\in g(b), c \\ne b} F_{bc},
    \\qquad F_{bc} = \\lVert H_{bc} \\rVert_F^2,\\quad d_b = \\sum_{i \\in I_b} H_{ii}^2,

with ``mu4 = 1`` (Rademacher) or ``3`` (Gaussian). Global probing keeps every cross term,
isolated probing none. The per-probe total ``T = sum_b t_b`` is a sum of independent group
terms ``z_g^T H_gg z_g``, so ``Var T = sum_g [2||H_gg||_F^2 + (mu4 - 3) sum_{i in g} H_ii^2]``.

Unbiased estimate from K >= 2 probes (the pairwise U-statistic of SPEC section 1). With
``W_b`` and ``Z_b`` the ``K x n_b`` matrices of ``w_b^(k) = (H z^(k))_b`` and ``z_b^(k)``,
``M_b = W_b Z_b^T`` and ``D^(k) = z_b^(k) * w_b^(k)``::

    F_hat = (sum_{k != l} M[k,l] M[l,k]) / (K(K-1))            E = ||H_bb||_F^2
    d_hat = (||sum_k D^(k)||^2 - sum_k ||D^(k)||^2) / (K(K-1))  E = sum_i H_ii^2
    V_hat = mean_k ||w_b^(k)||^2 + F_hat + (mu4 - 3) d_hat      E = Var t_b

It holds for any plan (``w`` then comes from the group's HVP), had 36-60 % of the spread
of the sample variance at K = 4 on the SPEC's MLP, and can be negative for small K.

The row energy ``mean_k ||w_b^(k)||^2`` estimates ``||H_{b,:}||_F^2`` (the whole row of
blocks the probe touches), NOT the variance (SPEC section 10).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .blocks import BlockLayout
from .engine import RowBatch, Sink
from .probing import ProbePlan, global_plan, isolated_plan

__all__ = ["MU4", "exact_variance", "pairwise_variance", "PairwiseSink"]

MU4 = {"rademacher": 1.0, "gaussian": 3.0}


def _index_sets(H: torch.Tensor, blocks) -> list[torch.Tensor]:
    if isinstance(blocks, BlockLayout):
        from .exact import block_slices

        return block_slices(blocks)
    if isinstance(blocks, int):
        raise TypeError("blocks must be a BlockLayout, a list of block sizes or a list of index tensors")
    blocks = list(blocks)
    if all(isinstance(b, int) for b in blocks):
        if sum(blocks) != H.shape[0]:
            raise ValueError(f"block sizes sum to {sum(blocks)}, but H is {H.shape[0]} x {H.shape[1]}")
        out, s = [], 0
        for n in blocks:
            out.append(torch.arange(s, s + n))
            s += n
        return out
    return [torch.as_tensor(b, dtype=torch.int64) for b in blocks]


def _plan(probing, L: int) -> ProbePlan:
    if isinstance(probing, ProbePlan):
        return probing
    if probing == "global":
        return global_plan(L)
    if probing == "isolated":
        return isolated_plan(L)
    if isinstance(probing, Sequence) and not isinstance(probing, str):
        return ProbePlan("colored", tuple(tuple(int(b) for b in g) for g in probing))
    raise ValueError(f"probing must be 'global', 'isolated', a ProbePlan or a list of groups, got {probing!r}")


def block_energies(H: torch.Tensor, blocks) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(F, d, tr)``: ``F[b, c] = ||H_bc||_F^2``, ``d[b] = sum_{i in b} H_ii^2``, ``tr[b] = tr H_bb``."""
    idx = _index_sets(H, blocks)
    L = len(idx)
    F = torch.zeros(L, L, dtype=torch.float64)
    d = torch.zeros(L, dtype=torch.float64)
    tr = torch.zeros(L, dtype=torch.float64)
    Hd = H.double()
    for b in range(L):
        rows = Hd[idx[b]]
        diag = torch.diagonal(Hd[idx[b]][:, idx[b]])
        d[b] = (diag**2).sum()
        tr[b] = diag.sum()
        for c in range(L):
            F[b, c] = (rows[:, idx[c]] ** 2).sum()
    return F, d, tr


def exact_variance(H: torch.Tensor, blocks, probing="global", probe: str = "rademacher") -> dict:
    """Closed-form per-probe variances of block-Hutchinson samples for an explicit ``H``.

    Args:
        H: symmetric ``P x P`` matrix.
        blocks: a :class:`~hutchtrace.blocks.BlockLayout`, a list of block sizes (contiguous
            blocks in order) or a list of index tensors.
        probing: ``"global"``, ``"isolated"``, a :class:`ProbePlan` or a list of block groups.
        probe: ``"rademacher"`` or ``"gaussian"``.

    Returns:
        dict with ``variance`` (L,), ``v0`` (L,) the block-alone part, ``cross`` (L,) the
        cross-block inflation kept by the plan, ``total`` the variance of the per-probe
        total, ``trace`` (L,) and ``F`` (L x L).

    Example:
        >>> H = torch.tensor([[2., 1.], [1., 3.]], dtype=torch.float64)
        >>> exact_variance(H, [1, 1], "global")["variance"].tolist()   # 2(F-d) + cross
        [1.0, 1.0]
        >>> exact_variance(H, [1, 1], "isolated")["variance"].tolist()  # 1x1 blocks: exact
        [0.0, 0.0]
    """
    if probe not in MU4:
        raise ValueError(f"probe must be one of {tuple(MU4)}, got {probe!r}")
    F, d, tr = block_energies(H, blocks)
    L = F.shape[0]
    plan = _plan(probing, L)
    gob = plan.group_of_block(L)
    same = torch.tensor([[gob[b] == gob[c] and b != c for c in range(L)] for b in range(L)])
    v0 = 2 * torch.diagonal(F) + (MU4[probe] - 3) * d
    cross = (F * same).sum(1)
    # groups are independent coordinate sets: Var T = sum_g Var(z_g^T H_gg z_g)
    total = 0.0
    for members in plan.groups:
        m = list(members)
        total += float(2 * F[m][:, m].sum() + (MU4[probe] - 3) * d[m].sum())
    return {"variance": v0 + cross, "v0": v0, "cross": cross, "total": total, "trace": tr, "F": F}


def pairwise_variance(W: torch.Tensor, Z: torch.Tensor, probe: str = "rademacher") -> dict:
    """The pairwise U-statistic estimate of ``Var t`` from K probe/product pairs.

    Args:
        W: ``(K, n)`` products ``w^(k)`` restricted to one block (or one group).
        Z: ``(K, n)`` the matching probes.
        probe: the probe distribution (sets ``mu4``).

    Returns:
        dict with ``variance`` (``V_hat``, unbiased, may be < 0), ``frob2`` (``F_hat``),
        ``diag2`` (``d_hat``) and ``row_energy`` (``mean ||w||^2``); NaN for K < 2.
    """
    K = W.shape[0]
    W = W.double()
    Z = Z.double()
    energy = (W * W).sum(1).mean()
    if K < 2:
        nan = torch.tensor(math.nan, dtype=torch.float64)
        return {"variance": nan, "frob2": nan, "diag2": nan, "row_energy": energy}
    M = W @ Z.T
    pairs = K * (K - 1)
    frob2 = ((M * M.T).sum() - (torch.diagonal(M) ** 2).sum()) / pairs
    D = Z * W
    diag2 = ((D.sum(0) ** 2).sum() - (D * D).sum()) / pairs
    var = energy + frob2 + (MU4[probe] - 3) * diag2
    return {"variance": var, "frob2": frob2, "diag2": diag2, "row_energy": energy}


class PairwiseSink(Sink):
    """Pairwise U-statistic variances per block (and for the total), computed in rounds.

    Probes are processed in rounds of ``round_size`` consecutive indices; inside a round the
    products ``w`` are kept (``round_size x P`` memory) and the probes regenerated (one kernel
    call per tensor). The U-statistic is assembled from per-tensor pieces, which add up over
    the disjoint coordinates of a block or a group::

        M_j = W_j Z_j^T,   s_j = ||sum_k D_j^(k)||^2,   q_j = sum_k ||D_j^(k)||^2,   e_j = sum_k ||W_j^(k)||^2

    then per block ``F_hat = (sum(M o M^T) - sum diag(M)^2) / (R(R-1))``,
    ``d_hat = (s - q) / (R(R-1))`` and ``V_hat = e/R + F_hat + (mu4 - 3) d_hat``; the same for
    each probe group gives the variance of the per-probe total. Round estimates are
    unbiased; they are averaged with weights ``R(R-1)`` (their pair counts). This is an
    incomplete U-statistic: for K beyond the round size it keeps the ``O(1/K)`` leading
    variance term of the full one at a fraction of its ``O(K^2 P)`` cost. Everything stays on
    the device (no host synchronisation).

    In single-batch mode rounds are evaluated as soon as they are complete. With
    ``accumulate=True`` (dataset mode) every row's ``sum_m weight_m w_m`` is kept across
    batches and everything is evaluated in :meth:`finish`, after division by the sample
    count; the row energies ``||w_b||^2`` of the dataset-mean product then become available.
    """

    def __init__(self, layout: BlockLayout, plan: ProbePlan, seed: int, kind: str, round_size: int,
                 first_k: int = 0, accumulate: bool = False):
        self.layout = layout
        self.seed = seed
        self.kind = kind
        self.round_size = max(2, round_size)
        self.first_k = first_k
        self.G = plan.num_groups
        L = layout.num_blocks
        gob = plan.group_of_block(L)
        self.group_of_tensor = [gob[b] for b in layout.block_index]
        self.tensors_of_group = [[j for j, gj in enumerate(self.group_of_tensor) if gj == g] for g in range(self.G)]
        dev = layout.device()
        self._block_of_tensor = torch.tensor(layout.block_index, dtype=torch.int64, device=dev)
        self._group_index = torch.tensor(self.group_of_tensor, dtype=torch.int64, device=dev)
        self._rounds: dict[int, dict] = {}
        self._sum_block = torch.zeros(L, dtype=torch.float64, device=dev)
        self._sum_group = torch.zeros(self.G, dtype=torch.float64, device=dev)
        self._energy = torch.zeros(L, dtype=torch.float64, device=dev)
        self._energy_n = 0
        self._pairs = 0.0
        self.accumulate = accumulate
        self._scale = 1.0

    def _round(self, rnd: int) -> dict:
        if rnd not in self._rounds:
            self._rounds[rnd] = {"w": [None] * len(self.layout.tensors), "rows": set()}
        return self._rounds[rnd]

    def on_rows(self, rb: RowBatch) -> None:
        R = len(rb.ks)
        r = 0
        while r < R:  # runs of one group with consecutive k, split at round boundaries
            g, k0 = rb.gs[r], rb.ks[r]
            rnd = (k0 - self.first_k) // self.round_size
            e = r
            while (e + 1 < R and rb.gs[e + 1] == g and rb.ks[e + 1] == rb.ks[e] + 1
                   and (rb.ks[e + 1] - self.first_k) // self.round_size == rnd):
                e += 1
            state = self._round(rnd)
            base = self.first_k + rnd * self.round_size
            sl = slice(k0 - base, k0 - base + e - r + 1)
            for j in self.tensors_of_group[g]:
                src = rb.w[j][r : e + 1].detach().reshape(e - r + 1, -1)
                buf = state["w"][j]
                if buf is None:
                    buf = torch.zeros((self.round_size, src.shape[1]), dtype=torch.float64, device=src.device)
                    state["w"][j] = buf
                buf[sl].add_(src, alpha=rb.weight)
            state["rows"].update((k, g) for k in range(k0, k0 + e - r + 1))
            if not self.accumulate and len(state["rows"]) == self.round_size * self.G:
                self._flush(rnd)
            r = e + 1

    def _flush(self, rnd: int) -> None:
        from . import ops

        state = self._rounds.pop(rnd, None)
        if state is None:
            return
        ks = sorted({k for k, _ in state["rows"]})
        R = len(ks)
        if R < 2 or len(state["rows"]) != R * self.G or ks != list(range(ks[0], ks[0] + R)):
            return
        base = self.first_k + rnd * self.round_size
        lo = ks[0] - base
        Ms, s2, q2, en = [], [], [], []
        for j, t in enumerate(self.layout.tensors):
            W = state["w"][j][lo : lo + R] * self._scale
            Z = ops.probes(self.seed, ks[0], self.layout.offsets[j], t.numel(), num_probes=R, kind=self.kind,
                           dtype=torch.float64, device=W.device)
            D = Z * W
            Ms.append(W @ Z.T)
            s2.append((D.sum(0) ** 2).sum())
            q2.append((D * D).sum())
            en.append((W * W).sum())
        L = self.layout.num_blocks
        pairs = R * (R - 1)
        mu = MU4[self.kind] - 3

        def reduce(index, n):
            M = torch.zeros((n, R, R), dtype=torch.float64, device=index.device).index_add_(0, index, torch.stack(Ms))
            S = torch.zeros(n, dtype=torch.float64, device=index.device).index_add_(0, index, torch.stack(s2))
            Q = torch.zeros(n, dtype=torch.float64, device=index.device).index_add_(0, index, torch.stack(q2))
            E = torch.zeros(n, dtype=torch.float64, device=index.device).index_add_(0, index, torch.stack(en))
            diag = torch.diagonal(M, dim1=1, dim2=2)
            frob2 = ((M * M.transpose(1, 2)).sum((1, 2)) - (diag**2).sum(1)) / pairs
            diag2 = (S - Q) / pairs
            return E / R + frob2 + mu * diag2, E / R

        vb, eb = reduce(self._block_of_tensor, L)
        vg, _ = reduce(self._group_index, self.G)
        self._sum_block += vb * pairs
        self._sum_group += vg * pairs
        self._energy += eb * R
        self._pairs += pairs
        self._energy_n += R

    def finish(self, total_count: float) -> None:
        if self.accumulate:
            self._scale = 1.0 / total_count
        for rnd in sorted(self._rounds):
            self._flush(rnd)

    def row_energy(self) -> torch.Tensor:
        """``(L,)`` mean of ``||w_b||^2`` over the evaluated probes (estimates ``||H_{b,:}||_F^2``
        restricted to the probed group)."""
        return self._energy / max(1, self._energy_n)

    @property
    def available(self) -> bool:
        return self._pairs > 0

    def block_variance(self) -> torch.Tensor:
        """``(L,)`` pairwise estimates of ``Var t_b`` (NaN before two probes)."""
        if not self.available:
            return torch.full_like(self._sum_block, math.nan)
        return self._sum_block / self._pairs

    def total_variance(self) -> float:
        """Pairwise estimate of the variance of the per-probe total ``sum_b t_b``."""
        if not self.available:
            return math.nan
        return float(self._sum_group.sum() / self._pairs)
