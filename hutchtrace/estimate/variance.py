"""Variance of block-Hutchinson samples: closed form and unbiased estimators.

Closed form (``docs/maths.md`` section 1, Theorem 1.1). For a symmetric H, blocks ``I_1..I_L`` and a
probe plan whose group ``g(b)`` contains block b, the sample
``t_b = z_b^T (H z_{g(b)})_b`` has

.. math::
    \\operatorname{Var} t_b = 2F_{bb} + (\\mu_4 - 3) d_b + \\sum_{c \\in g(b), c \\ne b} F_{bc},
    \\qquad F_{bc} = \\lVert H_{bc} \\rVert_F^2,\\quad d_b = \\sum_{i \\in I_b} H_{ii}^2,

with ``mu4 = 1`` (Rademacher) or ``3`` (Gaussian). Global probing keeps every cross term,
isolated probing none. The per-probe total ``T = sum_b t_b`` is a sum of independent group
terms ``z_g^T H_gg z_g``, so ``Var T = sum_g [2||H_gg||_F^2 + (mu4 - 3) sum_{i in g} H_ii^2]``.

Unbiased estimate from K >= 2 probes (the pairwise U-statistic of ``docs/maths.md`` section 1). With
``W_b`` and ``Z_b`` the ``K x n_b`` matrices of ``w_b^(k) = (H z^(k))_b`` and ``z_b^(k)``,
``M_b = W_b Z_b^T`` and ``D^(k) = z_b^(k) * w_b^(k)``::

    F_hat = (sum_{k != l} M[k,l] M[l,k]) / (K(K-1))            E = ||H_bb||_F^2
    d_hat = (||sum_k D^(k)||^2 - sum_k ||D^(k)||^2) / (K(K-1))  E = sum_i H_ii^2
    V_hat = mean_k ||w_b^(k)||^2 + F_hat + (mu4 - 3) d_hat      E = Var t_b

It holds for any plan (``w`` then comes from the group's HVP), had 36-60 % of the spread
of the sample variance at K = 4 on the MLP of ``docs/maths.md``, and can be negative for small K.

The row energy ``mean_k ||w_b^(k)||^2`` estimates ``||H_{b,:}||_F^2`` (the whole row of
blocks the probe touches), NOT the variance (``docs/maths.md`` section 10).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..backbones.exact import block_slices
from ..kernels import ops
from ..problem.blocks import BlockLayout
from .engine import Columns, RowBatch, Sink
from .probing import ProbePlan, global_plan, isolated_plan

__all__ = ["MU4", "exact_variance", "pairwise_variance", "PairwiseSink"]

MU4 = {"rademacher": 1.0, "gaussian": 3.0}


def _index_sets(H: torch.Tensor, blocks) -> list[torch.Tensor]:
    if isinstance(blocks, BlockLayout):
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
        blocks: a :class:`~hutchtrace.problem.blocks.BlockLayout`, a list of block sizes (contiguous
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
    products ``w`` (and, in single-batch mode, the probes ``z``) are kept (``round_size x P``
    memory each). The U-statistic is assembled from per-tensor pieces, which add up over
    the disjoint coordinates of a block or a group::

        M_j = W_j Z_j^T,   s_j = ||sum_k D_j^(k)||^2,   q_j = sum_k ||D_j^(k)||^2,   e_j = sum_k ||W_j^(k)||^2

    then per block ``F_hat = (sum(M o M^T) - sum diag(M)^2) / (R(R-1))``,
    ``d_hat = (s - q) / (R(R-1))`` and ``V_hat = e/R + F_hat + (mu4 - 3) d_hat``; the same for
    each probe group gives the variance of the per-probe total. Round estimates are
    unbiased; they are averaged with weights ``R(R-1)`` (their pair counts). This is an
    incomplete U-statistic: for K beyond the round size it keeps the ``O(1/K)`` leading
    variance term of the full one at a fraction of its ``O(K^2 P)`` cost. Everything stays on
    the device (no host synchronisation).

    Single-batch mode keeps the rows in the model's dtype, copied whole from the engine's
    flat buffers (the probe is the one the HVP used, so it is never regenerated), takes
    ``e`` from the fused reduction's ``||w_b||^2`` and, for Rademacher probes, ``q = e``
    (``z_i^2 = 1``); the float64 products happen per tensor at the end of a round. With
    ``accumulate=True`` (dataset mode) every row's ``sum_m weight_m w_m`` is kept in float64
    across batches and everything is evaluated in :meth:`finish`, after division by the
    sample count, with the probes regenerated; the row energies ``||w_b||^2`` of the
    dataset-mean product then become available.
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
        self._group_of_block = torch.tensor(gob, dtype=torch.int64, device=dev)
        masks = torch.zeros((self.G, L), dtype=torch.float64)
        for b, g in enumerate(gob):
            masks[g, b] = 1.0
        self._masks = masks.to(dev)
        self._rounds: dict[int, dict] = {}
        self._sum_block = torch.zeros(L, dtype=torch.float64, device=dev)
        self._sum_group = torch.zeros(self.G, dtype=torch.float64, device=dev)
        self._sum_frob = torch.zeros(L, dtype=torch.float64, device=dev)
        self._sum_diag = torch.zeros(L, dtype=torch.float64, device=dev)
        self._energy = torch.zeros(L, dtype=torch.float64, device=dev)
        self._energy_n = 0
        self._pairs = 0.0
        self.accumulate = accumulate
        self._scale = 1.0
        self._cols = Columns(layout)
        self._fast = not accumulate and self._cols.uniform
        self._pool: list[tuple[torch.Tensor, torch.Tensor]] = []
        # per-tensor products of a round: float64 for float64 models, float32 otherwise (the
        # rows are float32-exact products; the R x R and length-n results are summed in
        # float64). Their rounding (~1e-7 relative) is far below the estimator's own spread.
        self._work_dtype = torch.float64 if self._cols.dtype == torch.float64 else torch.float32
        # column runs of each group's tensors: one copy per run of a row chunk
        self._col_runs = [[(c0, c1) for c0, c1, _ in self._cols.runs(m)] for m in self.tensors_of_group]

    def _round(self, rnd: int) -> dict:
        if rnd not in self._rounds:
            st = {"w": [None] * len(self.layout.tensors), "rows": set()}
            if self._fast:
                cols = self._cols
                if self._pool:  # buffers of a flushed round: every row is overwritten before use
                    st["W"], st["Z"] = self._pool.pop()
                else:
                    shape = (self.round_size, cols.P)
                    st["W"] = torch.zeros(shape, dtype=cols.dtype, device=cols.device)
                    st["Z"] = torch.zeros(shape, dtype=cols.dtype, device=cols.device)
                st["E"] = torch.zeros(self.layout.num_blocks, dtype=torch.float64, device=cols.device)
            self._rounds[rnd] = st
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
            if self._fast:
                self._keep_rows(state, rb, g, r, e + 1, sl)
            else:
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

    def _keep_rows(self, state: dict, rb: RowBatch, g: int, r0: int, r1: int, sl: slice) -> None:
        """Copy rows ``r0:r1`` of group ``g`` (its tensors' columns) into the round buffers."""
        cols = self._cols
        W, Z = state["W"], state["Z"]
        for c0, c1 in self._col_runs[g]:
            for dst, flat, parts in ((W, rb.w_flat, rb.w), (Z, rb.z_flat, rb.z)):
                if flat is not None:
                    dst[sl, c0:c1].copy_(flat[r0:r1, c0:c1].detach())
                else:  # per-tensor rows (batched backbones, single rows)
                    for j in self.tensors_of_group[g]:
                        c = cols.cols[j]
                        if c0 <= c < c1:
                            dst[sl, c : c + cols.numel[j]].copy_(parts[j][r0:r1].detach().reshape(r1 - r0, -1))
        if rb.weight != 1.0:
            for c0, c1 in self._col_runs[g]:
                W[sl, c0:c1].mul_(rb.weight)
        # ||w_b||^2 of the group's blocks, from the fused reduction
        state["E"].add_(rb.sq[r0:r1].detach().sum(0) * self._masks[g], alpha=rb.weight**2)

    def _flush(self, rnd: int) -> None:
        state = self._rounds.pop(rnd, None)
        if state is None:
            return
        ks = sorted({k for k, _ in state["rows"]})
        R = len(ks)
        if R < 2 or len(state["rows"]) != R * self.G or ks != list(range(ks[0], ks[0] + R)):
            return
        base = self.first_k + rnd * self.round_size
        lo = ks[0] - base
        if self._fast:
            Ms, s2, q2 = self._pieces_kept(state, lo, R)
            E_block = state["E"]
            self._pool.append((state["W"], state["Z"]))
        else:
            Ms, s2, q2, en = self._pieces_regenerated(state, ks[0], lo, R)
            E_block = torch.zeros(self.layout.num_blocks, dtype=torch.float64,
                                  device=self._block_of_tensor.device).index_add_(0, self._block_of_tensor, en)
        L = self.layout.num_blocks
        pairs = R * (R - 1)
        mu = MU4[self.kind] - 3
        M_t, s_t = torch.stack(Ms), torch.stack(s2)
        q_t = torch.stack(q2) if q2 else None

        def reduce(index, n, E):
            dev = index.device
            M = torch.zeros((n, R, R), dtype=torch.float64, device=dev).index_add_(0, index, M_t)
            S = torch.zeros(n, dtype=torch.float64, device=dev).index_add_(0, index, s_t)
            # Rademacher: q = sum_k ||z o w||^2 = sum_k ||w||^2 = E
            Q = E if q_t is None else torch.zeros(n, dtype=torch.float64, device=dev).index_add_(0, index, q_t)
            diag = torch.diagonal(M, dim1=1, dim2=2)
            frob2 = ((M * M.transpose(1, 2)).sum((1, 2)) - (diag**2).sum(1)) / pairs
            diag2 = (S - Q) / pairs
            return E / R + frob2 + mu * diag2, frob2, diag2

        E_group = torch.zeros(self.G, dtype=torch.float64, device=E_block.device).index_add_(
            0, self._group_of_block, E_block)
        vb, fb, db = reduce(self._block_of_tensor, L, E_block)
        vg, _, _ = reduce(self._group_index, self.G, E_group)
        self._sum_frob += fb * pairs
        self._sum_diag += db * pairs
        self._sum_block += vb * pairs
        self._sum_group += vg * pairs
        self._energy += E_block
        self._pairs += pairs
        self._energy_n += R

    def _pieces_kept(self, state: dict, lo: int, R: int):
        """Per-tensor ``M_j``, ``s_j`` (and ``q_j`` for Gaussian probes) from the kept rows."""
        cols = self._cols
        wd = self._work_dtype
        W, Z = state["W"][lo : lo + R], state["Z"][lo : lo + R]
        rademacher = self.kind == "rademacher"
        Ms, s2, q2 = [], [], []
        for c, n in zip(cols.cols, cols.numel):
            Wj = W[:, c : c + n].to(wd)
            Zj = Z[:, c : c + n].to(wd)
            Ms.append((Wj @ Zj.T).to(torch.float64))
            D = Wj * Zj
            Dsum = D.sum(0).to(torch.float64)
            s2.append(torch.dot(Dsum, Dsum))
            if not rademacher:
                D = D.reshape(-1).to(torch.float64)
                q2.append(torch.dot(D, D))
        return Ms, s2, q2

    def _pieces_regenerated(self, state: dict, k0: int, lo: int, R: int):
        """Dataset mode: per-tensor pieces from the accumulated float64 rows, probes regenerated."""
        Ms, s2, q2, en = [], [], [], []
        for j, t in enumerate(self.layout.tensors):
            W = state["w"][j][lo : lo + R] * self._scale
            Z = ops.probes(self.seed, k0, self.layout.offsets[j], t.numel(), num_probes=R, kind=self.kind,
                           dtype=torch.float64, device=W.device)
            D = Z * W
            Ms.append(W @ Z.T)
            s2.append((D.sum(0) ** 2).sum())
            q2.append((D * D).sum())
            en.append((W * W).sum())
        return Ms, s2, q2, torch.stack(en)

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

    def block_energies(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """``(F_hat, d_hat, pairs)``: the pooled unbiased estimates of ``||H_bb||_F^2`` and
        ``sum_i H_ii^2`` per block (``(L,)`` each, on the CPU) and their pair count, or None
        before two probes. They give the block-alone variance ``V0 = 2 F + (mu4 - 3) d`` under
        any plan (used by :mod:`hutchtrace.estimate.coloring`)."""
        if not self.available:
            return None
        return (self._sum_frob / self._pairs).cpu(), (self._sum_diag / self._pairs).cpu(), self._pairs

    def total_variance(self) -> float:
        """Pairwise estimate of the variance of the per-probe total ``sum_b t_b``."""
        if not self.available:
            return math.nan
        return float(self._sum_group.sum() / self._pairs)
