"""Choosing the probing scheme: a coupling model, block coloring and the ``auto`` rule.

**What a plan costs.** Under a plan with groups ``g``, block b's per-probe variance is
(``docs/maths.md`` section 1)

.. math:: V_b(\\text{plan}) = V0_b + \\sum_{c \\in g(b), c \\ne b} F_{bc},\\qquad
          V0_b = 2F_{bb} + (\\mu_4 - 3) d_b,\\quad F_{bc} = \\lVert H_{bc}\\rVert_F^2,

and a probe costs one HVP row per group. To reach a standard error ``eps_b`` on every block
needs ``K = max_b V_b / eps_b^2`` probes, i.e. ``G * max_b V_b / eps_b^2`` rows. The target
is ``eps_b = rtol |tr H_bb|`` for non-negligible blocks and ``eps_b = atol`` otherwise
(default ``atol = 0.01 * rtol * max_c |tr H_cc|``), so the time to trustworthy error bars is

.. math:: T(\\text{plan}) \\propto G \\cdot \\max_b w_b V_b(\\text{plan}),\\qquad w_b = 1/\\epsilon_b^2 .

**Coloring** (heuristic, documented, not optimal): for a threshold ``lam`` on ``w_b V_b``,
*first fit* puts blocks, most demanding first (by ``w_b (V0_b + X_b)``, ``X_b = sum_{c != b}
F_bc``), into the first group where neither they nor any member would exceed ``lam`` (adding
b raises every member m's variance by ``F_mb`` and b's by the group's coupling to it); a new
group opens otherwise. ``auto`` scans a geometric grid of ``lam`` between the isolated
bottleneck ``max_b w_b V0_b`` and the global one and keeps the partition with the least
predicted ``T``. G = 1 is ``global`` and G = L ``isolated``. A fixed G
(``probing="colored", groups=G``) takes the smallest ``lam`` whose first fit needs at most
G groups (bisection).

**The coupling model** (:class:`CouplingModel`). Every HVP row of every plan measures
couplings: a row supported on group ``g`` gives, for EVERY block b,

.. math:: \\mathbb E\\,\\lVert (H z_g)_b \\rVert^2 = S_{bg} = \\sum_{c \\in g} F_{bc}
          \\quad(\\text{docs/maths.md (Q2); } F_{bb} \\text{ included when } b \\in g),

so a plan with G groups measures the ``L x G`` group sums of ``F`` at G rows per probe,
whatever L (:class:`GroupEnergySink`; tested unbiased against the dense Hessian). The model
keeps, per distinct partition, the mean of these energies and their standard errors, and
fits ``F`` to them: the non-negative symmetric matrix whose group sums match the measured
ones, found by multiplicative (iterative-proportional) updates from the flat prior
``F_bc = rho_b / L`` (``rho_b`` the measured row energy), each partition weighted by its
probe count. For choosing a plan each measured sum is first raised by ``z = 2`` standard
errors (a coupling measured from a few probes is not trusted to be small); the pooling
weights use ``z = 0``. With singleton groups (block-supported rows) ``S_bc = F_bc`` and the
fit is the direct estimate of ``docs/maths.md`` section 6(a). Over random partitions a pair shares a group
about once in G, which lets the fit tell pairs apart, and the group sums of the plan being
run are measured directly. The fit is not an unbiased estimate of each ``F_bc`` (``L^2``
unknowns, ``L`` numbers per row); its group sums are.

``V0`` and ``F_bb`` come from the pairwise U-statistics of each block's own-group rows,
which are unbiased for ``F_bb`` and ``d_b`` under ANY plan (``docs/maths.md`` section 1):
``V0 = 2 F_bb + (mu4 - 3) d_b``, pooled over segments by pair count; ``F_bb`` is held fixed
in the fit, which then splits an own-group sum into ``F_bb`` and couplings correctly.
Without pairwise statistics (``variance="sample"``, sequential mode, adaptive dataset
mode): ``(V_b - W_b)_+`` per segment, ``W_b`` the within-group coupling under the fit,
pooled with weights ``K_s / V_s^2``.

**The pilot** (:func:`pilot_plans`). With ``L <= PILOT_GROUPS`` (16) blocks it is
block-supported (isolated, ``L * pilot_K`` rows). With more blocks it is ``pilot_K`` probes
over random balanced partitions into 16 groups, a new partition every two probes:
``16 * pilot_K`` rows (128 by default), independent of L. Its samples are unbiased and
are kept.

**Re-planning** (:mod:`hutchtrace.estimate.plan_choice`). A short pilot cannot resolve the traces of
small, strongly coupled blocks (under a random partition their variance is about
``X_b / G``), and the weights ``w_b`` need those traces. So with adaptive stopping the
choice is revisited after every round from everything measured so far: the pooled traces
and their standard errors (a block is planned for with the lower bound
``(|tr_b| - SE_b)_+``, so an unresolved trace counts as small and its block is protected),
``V0``, and the fit, which has just absorbed the current plan's own group sums. A new
partition replaces the current one when predicted to cost less than ``0.8`` times it
under the same model (at most 8 changes per call). The estimate pools the samples of every
segment, each counted once, except a random-partition pilot's
(:func:`hutchtrace.estimate.accumulate.estimate_segments`).

Example:
    >>> import torch
    >>> F = torch.tensor([[1., 4., 0.], [4., 1., 0.], [0., 0., 1.]], dtype=torch.float64)
    >>> v0, w = torch.ones(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    >>> color_blocks(F, v0, w, 2)     # the strongly coupled pair is split
    [[0, 2], [1]]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .engine import RowBatch, Sink
from .probing import ProbePlan, global_plan, isolated_plan
from .variance import MU4

__all__ = [
    "PilotStats",
    "CouplingModel",
    "GroupEnergySink",
    "PILOT_GROUPS",
    "plan_of",
    "pilot_plans",
    "color_blocks",
    "candidate_partitions",
    "predicted_variance",
    "predicted_cost",
    "choose_plan",
    "AutoChoice",
]

#: groups of the random-partition pilot (blocks up to this many get the isolated pilot)
PILOT_GROUPS = 16
#: probes per random partition of the pilot (two: a within-segment variance exists)
PILOT_PROBES_PER_PARTITION = 2
#: measured group sums enter the fit raised by this many standard errors
COUPLING_Z = 2.0
#: plan with the lower confidence bound of each trace (see :func:`_weights`)
PLAN_WITH_LOWER_BOUND = True


@dataclass
class PilotStats:
    """What a plan is chosen from: ``F`` (L x L couplings, zero diagonal), ``v0`` (L,),
    ``trace`` (L,) and ``se`` (L,) its standard errors (None: ``sqrt(v0 / probes)``),
    the pilot's ``probes`` and cost."""

    F: torch.Tensor
    v0: torch.Tensor
    trace: torch.Tensor
    probes: int
    seconds_per_row: float = 0.0
    hvps: int = 0
    rows: int = 0
    se: torch.Tensor | None = None


def pilot_plans(L: int, pilot_K: int, seed: int) -> list[tuple[ProbePlan, int]]:
    """The pilot's ``(plan, probes)`` segments: isolated for ``L <= PILOT_GROUPS``, else
    ``pilot_K // 2`` random balanced partitions into ``PILOT_GROUPS`` groups (a pure function
    of ``seed``; the global RNG is not touched)."""
    if L <= PILOT_GROUPS:
        return [(isolated_plan(L), pilot_K)]
    R = max(1, pilot_K // PILOT_PROBES_PER_PARTITION)
    sizes = [pilot_K // R + (1 if r < pilot_K % R else 0) for r in range(R)]
    out = []
    for r, k in enumerate(sizes):
        perm = np.random.default_rng([seed, r, 0x9E3779B9]).permutation(L)
        groups = tuple(tuple(sorted(int(b) for b in perm[g::PILOT_GROUPS])) for g in range(PILOT_GROUPS))
        out.append((ProbePlan("random", groups), k))
    return out


class GroupEnergySink(Sink):
    """Per group g and block b: the sum over probes of ``||(H z_g)_b||^2`` (and of its square).

    One batch: exact sums. Several batches: ``sum_m (weight_m / N) ||(H_m z_g)_b||^2``, the
    count-weighted mean of per-batch energies, which by Jensen's inequality is at least the
    energy of the dataset-mean product (mean-reduced criteria; sum-reduced ones overstate it
    further): the couplings come out too large, which only makes the coloring cautious.
    """

    def __init__(self, plan: ProbePlan, L: int):
        self.plan = plan
        self.G = plan.num_groups
        self.L = L
        self._sum = None
        self._sq = None
        self._rows = [0] * self.G
        self.batches = 0

    def on_rows(self, rb: RowBatch) -> None:
        if self._sum is None:
            self._sum = torch.zeros(self.G, self.L, dtype=torch.float64, device=rb.sq.device)
            self._sq = torch.zeros_like(self._sum)
        sq = rb.sq.detach()
        if all(g == rb.gs[0] for g in rb.gs):  # the engine's chunks hold rows of one group
            g = rb.gs[0]
            self._sum[g].add_(sq.sum(0), alpha=rb.weight)
            self._sq[g].add_((sq * sq).sum(0))
        else:
            gs = torch.as_tensor(rb.gs, device=sq.device)
            self._sum.index_add_(0, gs, sq, alpha=rb.weight)
            self._sq.index_add_(0, gs, sq * sq)
        if self.batches == 0:
            for g in rb.gs:
                self._rows[g] += 1

    def on_batch_end(self, batch_index: int, weight: float) -> None:
        self.batches += 1

    def finish(self, total_count: float) -> None:
        if self._sum is not None:
            self._sum = self._sum.cpu() / total_count
            self._sq = self._sq.cpu()

    @property
    def probes(self) -> int:
        return min(self._rows) if self._rows else 0

    def sums(self):
        """``(sum, sum of squares or None, probes)``; the squares only for one batch."""
        if self._sum is None:
            return None
        return self._sum, (self._sq if self.batches == 1 else None), self.probes


class CouplingModel:
    """Group energies of every plan run so far, the fit of ``F`` to them and pooled ``V0``
    (module docs)."""

    def __init__(self, L: int, kind: str = "rademacher", z: float = COUPLING_Z):
        self.L = L
        self.z = z
        self.mu = MU4[kind] - 3.0
        self._parts: dict[tuple, dict] = {}
        self._fits: dict[float, torch.Tensor] = {}
        self._v0 = torch.full((L,), math.nan, dtype=torch.float64)
        self._diag: np.ndarray | None = None  # F_bb from the pairwise U-statistics

    # ------------------------------------------------------------------ data
    def observe(self, sink: GroupEnergySink) -> None:
        """Add one round's group energies."""
        got = sink.sums()
        if got is None or got[2] == 0:
            return
        s, sq, n = got
        key = sink.plan.groups
        p = self._parts.get(key)
        if p is None:
            gob = torch.tensor(sink.plan.group_of_block(self.L), dtype=torch.int64)
            p = self._parts[key] = {"gob": gob, "G": sink.G, "sum": torch.zeros_like(s),
                                    "sq": torch.zeros_like(s), "n": 0, "sq_ok": True}
        p["sum"] += s
        if sq is None:
            p["sq_ok"] = False
        else:
            p["sq"] += sq
        p["n"] += n
        self._fits = {}

    @property
    def measured_probes(self) -> int:
        return sum(p["n"] for p in self._parts.values())

    # ------------------------------------------------------------------ estimates
    def v0(self) -> torch.Tensor:
        """``V0`` as last set by :meth:`update_v0` (NaN before)."""
        return self._v0

    def update_v0(self, segments) -> torch.Tensor:
        """``V0_b`` and ``F_bb`` from the segments run so far (each with ``plan``, ``K``,
        ``variances()`` and ``pair``).

        With pairwise sinks: the U-statistics of the rows of b's own group are unbiased for
        ``F_bb`` and ``d_b`` under any plan (``docs/maths.md`` section 1), so ``V0 = 2 F_bb + (mu4 - 3) d_b``,
        pooled by pair count; ``F_bb`` is also held fixed in the fit, which then splits an
        own-group sum into ``F_bb`` and the couplings correctly. Without them:
        ``(V_b - W_b)_+``, ``W_b`` the within-group coupling under the fit WITHOUT the
        confidence margin, pooled with weights ``K_s / V_s^2`` (the inverse spread of a
        variance estimate), so an isolated segment (``W = 0``) outweighs a plan whose
        within-group coupling buries ``V0``.
        """
        pieces = [s.pair.block_energies() for s in segments
                  if s.K > 0 and s.pair is not None and s.pair.available]
        if pieces:
            pairs = sum(p[2] for p in pieces)
            Fbb = sum(p[0] * p[2] for p in pieces) / pairs
            dbb = sum(p[1] * p[2] for p in pieces) / pairs
            diag = Fbb.clamp_min(0).numpy()
            if self._diag is None or not np.array_equal(diag, self._diag):
                self._diag = diag
                self._fits = {}
            self._v0 = (2 * Fbb + self.mu * dbb).clamp_min(0)
            return self._v0
        num = torch.zeros(self.L, dtype=torch.float64)
        den = torch.zeros(self.L, dtype=torch.float64)
        for seg in segments:
            V = seg.variances()[0][:-1].double().cpu()
            groups = seg.plan.groups
            if seg.K < 2 or not torch.isfinite(V).all():
                continue
            W = (self.within(groups, z=0.0) if len(groups) < self.L
                 else torch.zeros(self.L, dtype=torch.float64))
            wt = seg.K / V.clamp_min(1e-300) ** 2
            num += wt * (V - W).clamp_min(0)
            den += wt
        if bool((den > 0).all()):
            self._v0 = num / den
        return self._v0

    def couplings(self, z: float | None = None, iterations: int = 40) -> torch.Tensor:
        """The fitted ``F`` (L x L, symmetric, zero diagonal), measured group sums raised by
        ``z`` standard errors (default: the model's ``z``)."""
        z = self.z if z is None else z
        if z not in self._fits:
            self._fits[z] = torch.from_numpy(self._fit_numpy(z, iterations))
        return self._fits[z]

    def _targets(self, z: float):
        out = []
        for p in self._parts.values():
            n = p["n"]
            y = (p["sum"] / n).numpy()
            if z and n > 1 and p["sq_ok"]:
                var = np.clip((p["sq"] / n).numpy() - y**2, 0, None) * n / (n - 1)
                y = y + z * np.sqrt(var / n)
            out.append((p["gob"].numpy(), p["G"], y, n))
        return out

    def _fit_numpy(self, z: float, iterations: int) -> np.ndarray:
        L = self.L
        targets = self._targets(z)
        if not targets:
            return np.zeros((L, L))
        total = sum(n for *_, n in targets)
        rho = sum(y.sum(0) * n for _, _, y, n in targets) / total
        tiny = 1e-300 + 1e-15 * max(float(rho.max()), 0.0)
        if self._diag is not None:  # F_bb known: fit the couplings to the group sums less F_bb
            targets = [(gob, G, _minus_diagonal(y, gob, self._diag), n) for gob, G, y, n in targets]
            rho = np.maximum(rho - self._diag, 0)
        F = np.repeat(np.maximum(rho, tiny)[:, None] / L, L, axis=1)
        if self._diag is not None:
            np.fill_diagonal(F, 0.0)
        onehots = [np.eye(G)[gob] for gob, G, _, _ in targets]  # (L, G)
        single = len(targets) == 1 and targets[0][1] == L  # block-supported only: one step is exact
        for _ in range(1 if single else iterations):
            log_step = np.zeros((L, L))
            for (gob, G, y, n), M in zip(targets, onehots):
                S = F @ M  # S[b, g] = sum_{c in g} F[b, c]
                ratio = np.maximum(y.T, tiny) / np.maximum(S, tiny)
                log_step += (n / total) * np.log(ratio)[:, gob]
            if self._diag is not None:
                np.fill_diagonal(log_step, 0.0)
            F = F * np.exp(np.clip(log_step, -50.0, 50.0))
            F = 0.5 * (F + F.T)
            if float(np.abs(log_step).max()) < 1e-6:  # converged: every group sum matched
                break
        np.fill_diagonal(F, 0.0)
        return F

    def within(self, groups, z: float | None = None) -> torch.Tensor:
        """``W_b = sum_{c in g(b), c != b} F_bc`` under the fit, for a partition."""
        F = self.couplings(z)
        gob = _group_index(groups, self.L)
        same = gob[:, None] == gob[None, :]
        return (F * same).sum(1)

    def predicted_variance(self, groups) -> torch.Tensor:
        """``V0_b + W_b`` for a partition, from the fit without the confidence margin (the
        pooling weights of :func:`hutchtrace.estimate.accumulate.combine`)."""
        return torch.nan_to_num(self.v0(), nan=0.0) + self.within(groups, z=0.0)


def _minus_diagonal(y: np.ndarray, gob: np.ndarray, diag: np.ndarray) -> np.ndarray:
    """Group sums ``y[g, b]`` less ``F_bb`` in b's own group."""
    y = y.copy()
    y[gob, np.arange(len(gob))] = np.maximum(y[gob, np.arange(len(gob))] - diag, 0)
    return y


def _group_index(groups, L: int) -> torch.Tensor:
    gob = torch.full((L,), -1, dtype=torch.int64)
    for g, members in enumerate(groups):
        gob[list(members)] = g
    return gob


def _weights(trace: torch.Tensor, rtol: float | None, atol: float | None, se: torch.Tensor | None = None,
             lower: bool = False) -> torch.Tensor:
    """``w_b = 1/eps_b^2`` with ``eps_b = max(rtol m_b, atol_eff)``.

    ``m_b = |tr_b| + se_b`` by default; ``lower=True`` takes the lower confidence bound
    ``(|tr_b| - se_b)_+``, for planning: a block whose trace is not yet resolved is treated
    as if it were small (held to ``atol``), so the plan protects it instead of ignoring it.
    """
    se = torch.zeros_like(trace) if se is None else torch.nan_to_num(se, nan=0.0)
    mag = (trace.abs() - se).clamp_min(0) if lower else trace.abs() + se
    big = float(trace.abs().max()) if trace.numel() else 0.0
    r = rtol if rtol is not None else 0.0
    a = atol if atol is not None else (0.01 * r * big if r > 0 else 0.0)
    eps = torch.maximum(r * mag, torch.full_like(trace, a))
    if float(eps.max()) <= 0:
        # no target: equal relative precision on every non-negligible block
        eps = torch.maximum(trace.abs(), torch.full_like(trace, 0.01 * max(big, 1e-300)))
    return 1.0 / eps.clamp_min(1e-300) ** 2


def pilot_se(pilot: PilotStats) -> torch.Tensor:
    """Standard errors of the pilot's block traces."""
    if pilot.se is not None:
        return pilot.se
    return torch.sqrt(torch.nan_to_num(pilot.v0, nan=0.0).clamp_min(0) / max(1, pilot.probes))


def predicted_variance(F: torch.Tensor, v0: torch.Tensor, groups) -> torch.Tensor:
    """``V_b = V0_b + sum_{c in g(b), c != b} F_bc`` for a partition ``groups``."""
    L = F.shape[0]
    gob = _group_index(groups, L)
    same = (gob[:, None] == gob[None, :]) & ~torch.eye(L, dtype=torch.bool)
    return v0 + (F * same).sum(1)


def predicted_cost(F, v0, groups, weights) -> float:
    """Relative time to target: ``G * max_b w_b V_b``."""
    V = predicted_variance(F, v0, groups)
    return len(groups) * float((weights * V.clamp_min(0)).max())


def _first_fit(F: np.ndarray, v0: np.ndarray, w: np.ndarray, lam: float, order) -> list[list[int]] | None:
    """First-fit partition with every ``w_b V_b <= lam``; None when a block cannot fit even alone.

    Vectorised over groups: ``loads[g, m] = sum_{c in g} F_mc`` and, per group, the largest
    member value of ``w_m V_m`` after b would join (``w_m (v0_m + loads[g(m), m] + F_mb)``).
    """
    L = F.shape[0]
    gob = np.full(L, -1)
    loads = np.zeros((0, L))
    wv0 = w * v0
    members = np.zeros(0, dtype=np.int64)
    for b in order:
        if wv0[b] > lam:
            return None
        G = loads.shape[0]
        target = G
        if G:
            own_ok = w[b] * (v0[b] + loads[:, b]) <= lam
            if members.size:
                after = wv0[members] + w[members] * (loads[gob[members], members] + F[members, b])
                worst = np.full(G, -np.inf)
                np.maximum.at(worst, gob[members], after)
                own_ok &= worst <= lam
            hit = np.flatnonzero(own_ok)
            if hit.size:
                target = int(hit[0])
        if target == G:
            loads = np.vstack([loads, F[:, b][None, :]])
        else:
            loads[target] += F[:, b]
        gob[b] = target
        members = np.append(members, b)
    groups = [sorted(np.flatnonzero(gob == g).tolist()) for g in range(loads.shape[0])]
    return groups


def _prepare(F, v0, weights):
    Fz = F.detach().double().cpu().numpy().copy()
    np.fill_diagonal(Fz, 0)
    Fz = np.clip(Fz, 0, None)  # unbiased estimates can dip below 0; a coupling is never negative
    v0 = np.clip(torch.nan_to_num(v0.double(), nan=0.0).cpu().numpy(), 0, None)
    w = weights.double().cpu().numpy()
    demand = w * (v0 + Fz.sum(1))
    order = [int(b) for b in np.argsort(-demand, kind="stable")]
    lo = float((w * v0).max())
    hi = float(demand.max())
    return Fz, v0, w, order, lo, max(hi, lo)


def color_blocks(F: torch.Tensor, v0: torch.Tensor, weights: torch.Tensor, G: int) -> list[list[int]]:
    """A partition into at most ``G`` groups with the smallest first-fit threshold (bisection)."""
    L = F.shape[0]
    if G >= L:
        return [[b] for b in range(L)]
    if G <= 1:
        return [list(range(L))]
    Fz, v0n, w, order, lo, hi = _prepare(F, v0, weights)
    best = [list(range(L))]
    a, b = lo, hi
    for _ in range(60):
        mid = math.sqrt(a * b) if a > 0 else (a + b) / 2
        parts = _first_fit(Fz, v0n, w, mid, order)
        if parts is not None and len(parts) <= G:
            best, b = parts, mid
        else:
            a = mid
        if b - a <= 1e-9 * max(b, 1e-300):
            break
    return best


def candidate_partitions(F: torch.Tensor, v0: torch.Tensor, weights: torch.Tensor, points: int = 48):
    """Partitions along a geometric grid of thresholds, plus global and isolated."""
    L = F.shape[0]
    Fz, v0n, w, order, lo, hi = _prepare(F, v0, weights)
    seen = set()
    out = []
    for parts in ([list(range(L))], [[b] for b in range(L)]):
        key = tuple(tuple(p) for p in parts)
        seen.add(key)
        out.append(parts)
    if hi > 0 and lo >= 0:
        start = max(lo, hi * 1e-12)
        for i in range(points + 1):
            lam = start * (hi / start) ** (i / points) if start > 0 else hi * i / points
            parts = _first_fit(Fz, v0n, w, lam * (1 + 1e-12), order)
            if parts is None:
                continue
            key = tuple(tuple(p) for p in sorted(parts))
            if key not in seen:
                seen.add(key)
                out.append(parts)
    return out


@dataclass
class AutoChoice:
    """The outcome of :func:`choose_plan`: the plan, its predicted relative cost, the
    predicted cost of every candidate G and the pilot it rests on."""

    plan: ProbePlan
    cost: float
    costs: dict
    pilot: PilotStats


def plan_of(groups, L: int) -> ProbePlan:
    """``global`` / ``isolated`` / ``colored`` plan for a partition."""
    if len(groups) == 1:
        return global_plan(L)
    if len(groups) == L:
        return isolated_plan(L)
    return ProbePlan("colored", tuple(tuple(g) for g in groups))


def choose_plan(pilot: PilotStats, rtol: float | None = None, atol: float | None = None,
                max_groups: int | None = None, colored_only: bool = False, lower: bool = False) -> AutoChoice:
    """The partition with the least predicted time ``G * max_b w_b V_b`` (global ... isolated).

    ``colored_only`` keeps ``1 < G < L``; ``lower`` plans with the lower confidence bound of
    each trace (:func:`_weights`).
    """
    L = pilot.F.shape[0]
    w = _weights(pilot.trace, rtol, atol, pilot_se(pilot), lower=lower)
    v0 = torch.nan_to_num(pilot.v0, nan=0.0)
    costs = {}
    best = None
    cands = candidate_partitions(pilot.F, v0, w)
    if colored_only:
        cands = [p for p in cands if 1 < len(p) < L] or [color_blocks(pilot.F, v0, w, min(2, L))]
    for groups in cands:
        if max_groups is not None and len(groups) > max_groups:
            continue
        c = predicted_cost(pilot.F, v0, groups, w)
        costs[len(groups)] = min(c, costs.get(len(groups), math.inf))
        if best is None or c < best[0]:
            best = (c, groups)
    assert best is not None
    c, groups = best
    return AutoChoice(plan=plan_of(groups, L), cost=c, costs=costs, pilot=pilot)
