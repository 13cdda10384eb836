"""Which probe plan a ``block_traces`` call runs, and when it changes plan.

Costs are in HVP rows to the target, ``T(plan) = G max_b w_b V_b(plan)`` with
``w_b = 1/eps_b^2`` (:mod:`hutchtrace.estimate.coloring`; ``docs/maths.md`` section 6):

* the explicit schemes (``global``, ``isolated``, a :class:`ProbePlan`) need nothing
  measured: :func:`fixed_plan`;
* ``colored`` and ``auto`` run a pilot first; :func:`pilot_stats` turns the coupling model
  fitted to it into a :class:`~hutchtrace.estimate.coloring.PilotStats`, and
  :func:`choose_after_pilot` picks the plan with the least predicted ``T``;
* with adaptive stopping the choice is revisited after every round: ``auto`` compares the
  current plan's MEASURED cost with the measured costs of ``global`` and ``isolated``
  (:func:`revalidate`), and both schemes re-color the blocks under the coupling model that
  has absorbed the round (:func:`recolor`). The margins :data:`SWITCH_MARGIN` and
  :data:`RECOLOR_MARGIN` and the cap :data:`MAX_SWITCHES` keep a noisy estimate from
  switching back and forth.

Example:
    >>> fixed_plan("isolated", 3).groups
    ((0,), (1,), (2,))
    >>> fixed_plan("auto", 3) is None   # needs a pilot
    True
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from .accumulate import Segment, combine
from .coloring import (
    PLAN_WITH_LOWER_BOUND,
    CouplingModel,
    PilotStats,
    _weights,
    choose_plan,
    color_blocks,
    pilot_se,
    predicted_cost,
)
from .probing import ProbePlan, global_plan, isolated_plan

__all__ = [
    "MAX_SWITCHES",
    "PROBINGS",
    "RECOLOR_MARGIN",
    "SWITCH_MARGIN",
    "choose_after_pilot",
    "fixed_plan",
    "pilot_stats",
    "recolor",
    "revalidate",
    "v0_view",
]

PROBINGS = ("global", "isolated", "colored", "auto")

#: ``auto`` leaves its plan for one predicted to cost less than this times its own. 1: the
#: samples already taken keep counting after a switch, and each scheme is tried at most
#: once, so a greedy switch cannot oscillate (a margin of 0.8 kept the tiny LM of
#: examples/probing_study.py on a colored plan 1.5x longer than needed)
SWITCH_MARGIN = 1.0
#: a re-colored plan (predicted, not yet measured, by the coupling model) replaces the
#: current one only when predicted to cost less than this times the current plan's cost
#: under the same model: the model's optimum is biased low (it is the minimum over noisy
#: candidates), and every change of plan starts a new segment
RECOLOR_MARGIN = 0.8
#: changes of plan per call, at most (re-coloring and revalidation together)
MAX_SWITCHES = 8


def fixed_plan(probing, L: int) -> ProbePlan | None:
    """The plan for explicit schemes; None for ``colored`` / ``auto`` (they need a pilot)."""
    if isinstance(probing, ProbePlan):
        probing.group_of_block(L)  # validates
        return probing
    if probing not in PROBINGS:
        raise ValueError(f"unknown probing scheme {probing!r}; use one of {PROBINGS} or a ProbePlan")
    if probing == "global" or L == 1:
        return global_plan(L)
    if probing == "isolated":
        return isolated_plan(L)
    return None


def choose_after_pilot(probing, groups, pilot, rtol, atol, L) -> tuple[ProbePlan, dict]:
    """Colored / auto plan from pilot statistics (see :mod:`hutchtrace.estimate.coloring`):
    ``(plan, predicted costs by number of groups)``."""
    lower = PLAN_WITH_LOWER_BOUND
    if probing == "auto":
        choice = choose_plan(pilot, rtol, atol, lower=lower)
        return choice.plan, choice.costs
    if groups is not None:
        if isinstance(groups, bool) or not isinstance(groups, int) or not 1 <= groups <= L:
            raise ValueError(f"groups must be an int in [1, {L}], got {groups!r}")
        w = _weights(pilot.trace, rtol, atol, pilot_se(pilot), lower=lower)
        v0 = torch.nan_to_num(pilot.v0, nan=0.0)
        parts = color_blocks(pilot.F, v0, w, groups)
        cost = predicted_cost(pilot.F, v0, parts, w)
        return ProbePlan("colored", tuple(tuple(g) for g in parts)), {len(parts): cost}
    choice = choose_plan(pilot, rtol, atol, colored_only=True, lower=lower)
    plan = choice.plan if choice.plan.name == "colored" else ProbePlan("colored", choice.plan.groups)
    return plan, {plan.num_groups: choice.cost}


def revalidate(seg, comb, pilot, rtol, atol, L, tried, energy_ok=True):
    """``(plan to switch to or None, measured costs)`` for ``probing="auto"`` after a round.

    Costs are in HVP rows to the target, ``G max_b w_b V_b`` (see :mod:`hutchtrace.estimate.coloring`),
    all from measured quantities rather than the pilot's coupling bounds:

    * the current plan: ``G`` times its measured per-probe variances;
    * ``isolated``: ``L`` times ``V0`` (``pilot.v0``: the coupling model's pooled estimate,
      unbiased U-statistics of the own-group rows, :mod:`hutchtrace.estimate.coloring`);
    * ``global``: ``V_plan,b + X_b``, with ``X_b`` the current plan's cross energy
      (:meth:`~hutchtrace.estimate.accumulate.Segment.cross_energy`, unbiased for the couplings a
      global probe adds). Only when row energies are valid (one batch, one process: every
      rank must take the same decision).

    The cheapest candidate not tried before replaces the plan when it costs less than
    :data:`SWITCH_MARGIN` times the current one.
    """
    w = _weights(comb["mean"][:-1], rtol, atol, torch.sqrt(comb["var_mean"][:-1].clamp_min(0)),
                 lower=PLAN_WITH_LOWER_BOUND)
    v_plan = seg.variances()[0][:-1].clamp_min(0)
    cost_plan = seg.plan.num_groups * float((w * v_plan).max())
    measured = {"measured_plan": cost_plan}
    candidates = {}
    if seg.plan.name != "isolated":
        candidates["isolated"] = (isolated_plan(L), L * float((w * pilot.v0.clamp_min(0)).max()))
    cross = seg.cross_energy() if energy_ok else None
    if seg.plan.name != "global" and cross is not None:
        candidates["global"] = (global_plan(L), float((w * (v_plan + cross.clamp_min(0))).max()))
    for name, (_, c) in candidates.items():
        measured[f"measured_{name}"] = c
    open_ = {n: pc for n, pc in candidates.items() if n not in tried and pc[1] < SWITCH_MARGIN * cost_plan}
    if not open_:
        return None, measured
    return min(open_.values(), key=lambda pc: pc[1])[0], measured


def pilot_stats(model: CouplingModel, segments: list[Segment], K: int) -> PilotStats:
    """The coupling model's view after the segments so far: fit, ``V0``, pooled traces."""
    v0 = model.update_v0(segments)
    comb = combine(segments)  # every pilot sample: the choice may use the random partitions too
    return PilotStats(F=model.couplings(), v0=torch.nan_to_num(v0, nan=0.0), trace=comb["mean"][:-1].clone(),
                      probes=K, se=torch.sqrt(comb["var_mean"][:-1].clamp_min(0)))


def v0_view(model: CouplingModel, segments: list[Segment]) -> SimpleNamespace:
    """A stand-in pilot for :func:`revalidate` with the model's latest pooled ``V0``."""
    v0 = model.update_v0(segments)
    return SimpleNamespace(v0=torch.nan_to_num(v0, nan=0.0))


def recolor(model: CouplingModel, segments: list[Segment], seg: Segment, probing, groups, rtol, atol, L):
    """``(plan, predicted cost, the current plan's predicted cost)`` under the coupling model
    after a round (:mod:`hutchtrace.estimate.coloring`), or None when the best plan is the current one."""
    stats = pilot_stats(model, segments, sum(s.K for s in segments))
    plan, _ = choose_after_pilot(probing, groups, stats, rtol, atol, L)
    if plan.groups == seg.plan.groups:
        return None
    w = _weights(stats.trace, rtol, atol, pilot_se(stats), lower=PLAN_WITH_LOWER_BOUND)
    return (plan, predicted_cost(stats.F, stats.v0, plan.groups, w),
            predicted_cost(stats.F, stats.v0, seg.plan.groups, w))
