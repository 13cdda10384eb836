"""The rounds of one ``block_traces`` call, in segments of one probe plan each.

A *segment* (:class:`~hutchtrace.estimate.accumulate.Segment`) is a run of probes under one
plan. Its probe indices continue where the previous segment's ended, so no probe is drawn
twice in a call (a probe is a function of the seed and its index). :class:`Rounds` holds
the state of the run and carries it out in order:

1. the pilot (``colored`` / ``auto`` only; :func:`hutchtrace.estimate.coloring.pilot_plans`):
   its segments feed the coupling model, from which the plan is chosen
   (:func:`hutchtrace.estimate.plan_choice.choose_after_pilot`); under data parallelism
   rank 0 decides for all;
2. the rounds of the plan: one round of ``K`` probes, or, with adaptive stopping, rounds
   until the target is met or ``max_K`` probes are spent, each sized from the probes the
   pooled variance says are still needed (:func:`next_round_size`);
3. after every adaptive round of a call with a pilot, possibly a change of plan
   (:meth:`Rounds.better_plan`; :mod:`hutchtrace.estimate.plan_choice`), which opens a new
   segment.

Each round's samples go to a :class:`~hutchtrace.estimate.accumulate.SampleSink`, its
products to a :class:`~hutchtrace.estimate.variance.PairwiseSink` when the pairwise variance
is asked for and affordable (:func:`pairwise_sink`), and, with a coupling model, its group
energies to a :class:`~hutchtrace.estimate.coloring.GroupEnergySink`.
"""

from __future__ import annotations

import math

from . import comm
from .accumulate import SampleSink, Segment, combine, estimate_segments, target_met
from .coloring import CouplingModel, GroupEnergySink, PilotStats, pilot_plans
from .engine import ProbeRunner, RunInfo, default_memory_budget
from .plan_choice import (
    MAX_SWITCHES,
    RECOLOR_MARGIN,
    choose_after_pilot,
    pilot_stats,
    recolor,
    revalidate,
    v0_view,
)
from .probing import ProbePlan
from .resolve import Call
from .variance import PairwiseSink

__all__ = ["Rounds", "make_runner", "next_round_size", "pairwise_sink"]


def make_runner(call: Call) -> ProbeRunner:
    """The probe runner of ``call`` (one per call: the ``auto`` backbone choice and the
    random state of the first pass hold for every round)."""
    return ProbeRunner(
        call.model, call.layout, call.spec, seed=call.seed, kind=call.probe, hvp=call.hvp,
        curvature=call.curvature, probe_batch=call.probe_batch, max_memory=call.max_memory,
        progress=call.progress, desc="block_traces", cuda_graph=call.cuda_graph,
    )


class Rounds:
    """The segments of one call and the rounds that fill them (module docs).

    After :meth:`run`: ``segments`` in order, ``hvps`` / ``rows`` (HVP calls and HVP rows
    times batches, pilot included), ``info`` (the last run's
    :class:`~hutchtrace.estimate.engine.RunInfo`), ``pilot`` and ``costs`` (None without a
    pilot), ``switches`` (changes of plan) and ``converged`` (None without a target).
    """

    def __init__(self, call: Call, runner: ProbeRunner):
        self.call = call
        self.runner = runner
        self.segments: list[Segment] = []
        self.hvps = 0
        self.rows = 0
        self.info: RunInfo | None = None
        self.coupling: CouplingModel | None = None
        self.pilot: PilotStats | None = None
        self.costs: dict | None = None
        self.tried: set[str] = set()
        self.switches = 0
        self.converged: bool | None = None

    @property
    def probes_drawn(self) -> int:
        """Probe indices used so far: the next segment's first probe."""
        return sum(s.K for s in self.segments)

    def run(self) -> None:
        """The pilot when the plan needs one, then the rounds until done (module docs)."""
        call = self.call
        plan = call.plan if call.plan is not None else self.run_pilot()
        seg = self.start(plan)
        self.tried = {seg.plan.name}  # auto switches to global / isolated at most once: no oscillation
        round_K = call.K
        while True:
            self.run_round(seg, round_K)
            if not call.adaptive:
                break
            comb = combine(estimate_segments(self.segments))
            self.converged, need = target_met(comb, call.rtol, call.atol, call.stop_on)
            done = comb["K"]
            if self.converged or done >= call.max_K:
                break
            if self.pilot is not None and self.switches < MAX_SWITCHES:
                seg = self.switch_if_better(seg, comb)
            round_K = next_round_size(done, need, call.max_K)

    def run_pilot(self) -> ProbePlan:
        """Run the pilot segments (:func:`~hutchtrace.estimate.coloring.pilot_plans`) and
        choose the plan from the coupling model fitted to them."""
        call = self.call
        self.coupling = CouplingModel(call.L, call.probe)
        for plan, k in pilot_plans(call.L, call.pilot_K, call.seed):
            seg = self.new_segment(plan, k)
            self.run_round(seg, k)
            self.segments.append(seg)
        info = self.info
        pilot = self.pilot = pilot_stats(self.coupling, self.segments, call.pilot_K)
        pilot.seconds_per_row = info.seconds / max(1, info.rows * info.n_batches)
        pilot.hvps, pilot.rows = self.hvps, self.rows
        plan, self.costs = choose_after_pilot(call.probing, call.groups, pilot, call.rtol, call.atol, call.L)
        if call.group is not None:  # couplings are rank-local estimates: rank 0 decides for all
            plan = comm.broadcast_plan(plan, call.group)
        return plan

    def new_segment(self, plan: ProbePlan, expected_K: int) -> Segment:
        """An empty segment for ``plan`` starting at the next unused probe index."""
        first = self.probes_drawn
        pair = pairwise_sink(self.call, self.runner, plan, expected_K, first)
        return Segment(plan, self.call.L, self.call.device, pair, first)

    def start(self, plan: ProbePlan) -> Segment:
        """The segment the rounds of ``plan`` go into: the pilot's last one when it ran ``plan``."""
        if self.segments and self.segments[-1].plan == plan:
            return self.segments[-1]
        seg = self.new_segment(plan, self.call.K)
        self.segments.append(seg)
        return seg

    def run_round(self, seg: Segment, n: int) -> None:
        """``n`` more probes of ``seg``: their samples into the segment and, with a coupling
        model, their group energies into it."""
        call = self.call
        energy = GroupEnergySink(seg.plan, call.L) if self.coupling is not None else None
        sink = SampleSink(n, call.layout, seg.plan, single_batch=call.single, first_k=seg.next_probe,
                          reducer=call.reducer)
        sinks = [sink] + [s for s in (seg.pair, energy) if s is not None]
        info = self.runner.run(seg.plan, range(seg.next_probe, seg.next_probe + n), sinks)
        self.hvps += info.hvps
        self.rows += info.rows * info.n_batches
        self.info = info
        seg.add(sink)
        if energy is not None:
            self.coupling.observe(energy)

    def switch_if_better(self, seg: Segment, comb: dict) -> Segment:
        """The segment the next round goes into: a new one when :meth:`better_plan` found a plan."""
        better = self.better_plan(seg, comb)
        if better is None:
            return seg
        self.tried.add(better.name)
        self.switches += 1
        seg = self.new_segment(better, self.call.K)  # fresh probe indices (pilot too)
        self.segments.append(seg)
        return seg

    def better_plan(self, seg: Segment, comb: dict) -> ProbePlan | None:
        """The plan to leave ``seg``'s for after an adaptive round, or None; the costs behind
        the decision are added to :attr:`costs`. ``auto`` compares measured costs
        (:func:`~hutchtrace.estimate.plan_choice.revalidate`); both schemes re-color under
        the coupling model (:func:`~hutchtrace.estimate.plan_choice.recolor`), in one
        process only (the model must be the same on every rank)."""
        call = self.call
        better, ratio = None, 1.0
        if call.probing == "auto":
            v0 = v0_view(self.coupling, self.segments)
            cand, measured = revalidate(seg, comb, v0, call.rtol, call.atol, call.L, self.tried,
                                        energy_ok=call.group is None)
            # the pilot's predictions, then the latest measurements
            self.costs = {**(self.costs or {}), **measured}
            if cand is not None:
                better = cand
                ratio = measured[f"measured_{cand.name}"] / max(measured["measured_plan"], 1e-300)
        if call.group is None:
            rec = recolor(self.coupling, self.segments, seg, call.probing, call.groups, call.rtol, call.atol,
                          call.L)
            if rec is not None and rec[1] < RECOLOR_MARGIN * rec[2] and rec[1] / rec[2] < ratio:
                better = rec[0]
                self.costs = {**(self.costs or {}), "predicted_recolored": rec[1], "predicted_plan": rec[2]}
        if call.group is not None:  # V0 comes from rank-local couplings: rank 0 decides for all
            chosen = comm.broadcast_plan(better or seg.plan, call.group)
            better = None if chosen == seg.plan else chosen
        return better


def next_round_size(done: int, need: float, max_K: int) -> int:
    """Probes of the next adaptive round after ``done``, when the pooled variance says ``need``
    probes in all reach the target: those missing to ``1.1 need`` (``done`` when ``need`` is
    not finite), at least 8 and at most ``max(done, 8)`` (a noisy early ``need`` cannot
    overshoot far), within ``max_K``.

    Example:
        >>> next_round_size(16, 20.0, 10_000), next_round_size(16, 1e6, 10_000), next_round_size(16, 1e6, 20)
        (8, 16, 4)
    """
    grow = max(8, int(math.ceil(1.1 * need)) - done) if math.isfinite(need) else done
    return int(min(max(grow, 8), max(done, 8), max_K - done))


def pairwise_sink(call: Call, runner: ProbeRunner, plan: ProbePlan, K: int,
                  first_probe: int) -> PairwiseSink | None:
    """The pairwise-variance sink of a segment of ``K`` probes from ``first_probe`` when
    requested and affordable under the memory budget, else None."""
    variance, layout, single, adaptive = call.variance, call.layout, call.single, call.adaptive
    if variance == "sample" or call.group is not None:
        return None
    if variance == "auto" and runner.max_rows == 1:
        # sequential mode (probe_batch=1, or a budget for one row): the caller wants the
        # least memory, and a pairwise round keeps 2 x 16 rows of P besides the HVP
        return None
    if K < 2 and not adaptive:
        return None
    budget = call.max_memory if call.max_memory is not None else default_memory_budget(layout.device())
    # a kept product row is float64, and its regenerated probe is float64 while evaluated
    row_bytes = 16 * sum(t.numel() for t in layout.tensors)
    if single:
        # a round holds every probe of a fixed-K call below 16: a larger buffer is never filled
        # (16 float64 rows of a resnet18 are 1.4 GB) and the pairs, hence the estimate, are the same
        round_size = int(min(16 if adaptive else max(2, K), 16, budget // max(1, row_bytes)))
        accumulate = False
    else:  # dataset mode keeps every probe's accumulated product
        round_size = K if (K * row_bytes <= budget and not adaptive) else 0
        accumulate = True
    if round_size < 2:
        if variance == "pairwise":
            raise MemoryError(
                f"variance='pairwise' needs {row_bytes * max(K, 2)} bytes for the products of a probe round, "
                f"over max_memory={budget}; use variance='sample' or raise max_memory"
            )
        return None
    return PairwiseSink(layout, plan, runner.seed, call.probe, round_size, first_k=first_probe,
                        accumulate=accumulate)
