"""Choosing the probing scheme: pilot statistics, block coloring and the ``auto`` rule.

Under a plan with groups ``g``, block b's per-probe variance is (SPEC section 1)

.. math:: V_b(\\text{plan}) = V0_b + \\sum_{c \\in g(b), c \\ne b} F_{bc},\\qquad
          V0_b = 2F_{bb} + (\\mu_4 - 3) d_b,\\quad F_{bc} = \\lVert H_{bc}\\rVert_F^2,

and a probe costs one HVP per group. To reach a standard error ``eps_b`` on every block
needs ``K = max_b V_b / eps_b^2`` probes, i.e. ``G * max_b V_b / eps_b^2`` HVPs. The target
is ``eps_b = rtol |tr H_bb|`` for non-negligible blocks and ``eps_b = atol`` otherwise
(default ``atol = 0.01 * rtol * max_c |tr H_cc|``: blocks below 1 % of the largest trace are
held to 1 % of its tolerance), so the time to trustworthy error bars is

.. math:: T(\\text{plan}) \\propto G \\cdot \\max_b w_b V_b(\\text{plan}),\\qquad w_b = 1/\\epsilon_b^2 .

Heuristic (documented, not optimal): for a threshold ``lam`` on ``w_b V_b`` (i.e. on the
number of probes), *first fit*: blocks, most demanding first (by ``w_b (V0_b + X_b)``), go
into the first group where neither they nor any member would exceed ``lam`` (adding b
raises every member m's variance by ``F_mb`` and b's by the group's coupling to it); a new
group opens otherwise. The predicted time is ``G(lam) * max_b w_b V_b``; ``auto`` scans a
geometric grid of ``lam`` between the isolated bottleneck ``max_b w_b V0_b`` and the global
one, and keeps the cheapest partition. G = 1 is ``global`` and G = L ``isolated``. A fixed
G (``probing="colored", groups=G``) takes the smallest ``lam`` whose first fit needs at most
G groups (bisection).

Couplings measured from a few probes are noisy, so the pilot's ``F`` enters as an upper
confidence bound (mean + 2 SE), which makes ``global`` look worse than it is when L is
large and the pilot short. With adaptive stopping ``auto`` therefore re-validates its
choice after every round from *measured* quantities (``estimator._revalidate``): the plan's
cost ``G max_b w_b V_b``, the isolated plan's ``L max_b w_b V0_b`` and the global plan's
``max_b w_b (V_b + X_b)``, where ``X_b``, the mean of ``||(H z_g)_b||^2`` over the groups
g other than b's own, is unbiased for exactly the couplings a global probe would add to
b's variance (no per-pair estimate needed). It moves to the cheapest scheme not tried
before when that costs less than the current plan.

The ingredients come from a short *pilot* with block-supported probes (the isolated plan):
row ``(k, c)`` gives ``w = H z_c``, so ``||w_b||^2`` is an unbiased sample of ``F_bc`` for
every b (SPEC section 6a), the block-alone samples give ``tr H_bb`` and ``V0_b``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .engine import RowBatch, Sink
from .probing import ProbePlan, global_plan, isolated_plan

__all__ = [
    "PilotStats",
    "CouplingSink",
    "color_blocks",
    "candidate_partitions",
    "predicted_cost",
    "choose_plan",
    "AutoChoice",
]


@dataclass
class PilotStats:
    """Pilot estimates: ``F`` (L x L, symmetrised ``||H_bc||_F^2``), ``v0`` (L,), ``trace`` (L,),
    ``probes`` used and the measured seconds per HVP row."""

    F: torch.Tensor
    v0: torch.Tensor
    trace: torch.Tensor
    probes: int
    seconds_per_row: float
    hvps: int
    rows: int = 0


class CouplingSink(Sink):
    """Collects ``F_bc`` samples from block-supported rows: row group c is the single block c,
    so ``w = H z_c`` and ``||w_b||^2`` is an unbiased sample of ``||H_bc||_F^2`` for every b.

    In dataset mode the per-batch products' norms overestimate ``F_bc`` by the between-batch
    spread, which only makes the coloring more cautious.
    """

    def __init__(self, L: int):
        self.L = L
        self._F = None
        self._F2 = None
        self.F = torch.zeros(L, L, dtype=torch.float64)
        self.F2 = torch.zeros(L, L, dtype=torch.float64)

    def on_rows(self, rb: RowBatch) -> None:
        if self._F is None:
            self._F = torch.zeros(self.L, self.L, dtype=torch.float64, device=rb.sq.device)
            self._F2 = torch.zeros_like(self._F)
        for r, c in enumerate(rb.gs):
            x = rb.sq[r].detach() * rb.weight**2
            self._F[:, c] += x
            self._F2[:, c] += x * x

    def finish(self, total_count: float) -> None:
        if self._F is not None:
            self.F = self._F.cpu() / total_count**2
            self.F2 = self._F2.cpu() / total_count**4

    def estimate(self, probes: int, z: float = 0.0) -> torch.Tensor:
        """Symmetrised mean ``F_hat`` over ``probes`` block-supported probes, plus ``z``
        standard errors (an upper confidence bound when ``z > 0``: a coupling measured from
        a few probes is not trusted to be small)."""
        n = max(1, probes)
        mean = self.F / n
        if z and n > 1:
            var = (self.F2 / n - mean**2).clamp_min(0) * n / (n - 1)
            mean = mean + z * torch.sqrt(var / n)
        return 0.5 * (mean + mean.T)


def _weights(trace: torch.Tensor, rtol: float | None, atol: float | None, se: torch.Tensor | None = None) -> torch.Tensor:
    """``w_b = 1/eps_b^2`` with ``eps_b = max(rtol (|tr_b| + se_b), atol_eff)``.

    Adding the trace's standard error keeps a block whose trace is not yet resolved from
    dominating a decision through a noisy, tiny ``|tr_b|``.
    """
    mag = trace.abs() if se is None else trace.abs() + torch.nan_to_num(se, nan=0.0)
    big = float(mag.max()) if trace.numel() else 0.0
    r = rtol if rtol is not None else 0.0
    a = atol if atol is not None else (0.01 * r * big if r > 0 else 0.0)
    eps = torch.maximum(r * mag, torch.full_like(trace, a))
    if float(eps.max()) <= 0:
        # no target: equal relative precision on every non-negligible block
        eps = torch.maximum(mag, torch.full_like(trace, 0.01 * max(big, 1e-300)))
    return 1.0 / eps.clamp_min(1e-300) ** 2


def pilot_se(pilot: PilotStats) -> torch.Tensor:
    """Standard errors of the pilot's block traces (block-alone samples)."""
    return torch.sqrt(torch.nan_to_num(pilot.v0, nan=0.0).clamp_min(0) / max(1, pilot.probes))


def predicted_variance(F: torch.Tensor, v0: torch.Tensor, groups) -> torch.Tensor:
    """``V_b = V0_b + sum_{c in g(b), c != b} F_bc`` for a partition ``groups``."""
    L = F.shape[0]
    gob = [0] * L
    for g, members in enumerate(groups):
        for b in members:
            gob[b] = g
    same = torch.tensor([[gob[b] == gob[c] and b != c for c in range(L)] for b in range(L)])
    return v0 + (F * same).sum(1)


def predicted_cost(F, v0, groups, weights) -> float:
    """Relative time to target: ``G * max_b w_b V_b``."""
    V = predicted_variance(F, v0, groups)
    return len(groups) * float((weights * V.clamp_min(0)).max())


def _first_fit(F: torch.Tensor, v0: torch.Tensor, w: torch.Tensor, lam: float, order) -> list[list[int]] | None:
    """First-fit partition with every ``w_b V_b <= lam``; None when a block cannot fit even alone."""
    groups: list[list[int]] = []
    loads: list[torch.Tensor] = []  # loads[g][m] = sum_{c in g} F_mc
    for b in order:
        if float(w[b] * v0[b]) > lam:
            return None
        placed = False
        for g, members in enumerate(groups):
            if float(w[b] * (v0[b] + loads[g][b])) > lam:
                continue
            idx = torch.tensor(members)
            if float((w[idx] * (v0[idx] + loads[g][idx] + F[idx, b])).max()) > lam:
                continue
            members.append(b)
            loads[g] = loads[g] + F[:, b]
            placed = True
            break
        if not placed:
            groups.append([b])
            loads.append(F[:, b].clone())
    return [sorted(g) for g in groups]


def _prepare(F, v0, weights):
    Fz = F.clone().double()
    Fz.fill_diagonal_(0)
    Fz = Fz.clamp_min(0)  # unbiased estimates can dip below 0; a coupling is never negative
    v0 = v0.double().clamp_min(0)
    demand = weights * (v0 + Fz.sum(1))
    order = sorted(range(F.shape[0]), key=lambda b: -float(demand[b]))
    lo = float((weights * v0).max())
    hi = float(demand.max())
    return Fz, v0, order, lo, max(hi, lo)


def color_blocks(F: torch.Tensor, v0: torch.Tensor, weights: torch.Tensor, G: int) -> list[list[int]]:
    """A partition into at most ``G`` groups with the smallest first-fit threshold (bisection)."""
    L = F.shape[0]
    if G >= L:
        return [[b] for b in range(L)]
    if G <= 1:
        return [list(range(L))]
    Fz, v0, order, lo, hi = _prepare(F, v0, weights)
    best = [list(range(L))]
    a, b = lo, hi
    for _ in range(60):
        mid = math.sqrt(a * b) if a > 0 else (a + b) / 2
        parts = _first_fit(Fz, v0, weights, mid, order)
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
    Fz, v0, order, lo, hi = _prepare(F, v0, weights)
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
            parts = _first_fit(Fz, v0, weights, lam * (1 + 1e-12), order)
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


def choose_plan(pilot: PilotStats, rtol: float | None = None, atol: float | None = None,
                max_groups: int | None = None) -> AutoChoice:
    """The partition with the least predicted time ``G * max_b w_b V_b`` (global ... isolated)."""
    L = pilot.F.shape[0]
    w = _weights(pilot.trace, rtol, atol, pilot_se(pilot))
    v0 = torch.nan_to_num(pilot.v0, nan=0.0)
    costs = {}
    best = None
    for groups in candidate_partitions(pilot.F, v0, w):
        if max_groups is not None and len(groups) > max_groups:
            continue
        c = predicted_cost(pilot.F, v0, groups, w)
        costs[len(groups)] = min(c, costs.get(len(groups), math.inf))
        if best is None or c < best[0]:
            best = (c, groups)
    assert best is not None
    c, groups = best
    if len(groups) == 1:
        plan = global_plan(L)
    elif len(groups) == L:
        plan = isolated_plan(L)
    else:
        plan = ProbePlan("colored", tuple(tuple(g) for g in groups))
    return AutoChoice(plan=plan, cost=c, costs=costs, pilot=pilot)
