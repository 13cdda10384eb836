"""``block_traces``: unbiased trace estimates of every diagonal Hessian block.

For probes ``z^(k)`` with i.i.d. entries (``E z_i = 0``, ``E z_i^2 = 1``) and blocks
``I_1..I_L`` of the parameter vector, one Hessian-vector product ``w = H z`` gives for
every block at once

.. math:: t_b^{(k)} = z_b^{(k)\\top} (H z^{(k)})_b, \\qquad
          \\mathbb E\\, t_b = \\operatorname{tr} H_{bb},

with variance ``2(||H_bb||_F^2 - ||diag H_bb||^2) + sum_{c != b} ||H_bc||_F^2`` for
Rademacher probes (SPEC section 1; Gaussian: ``2||H_bb||_F^2 + sum_{c != b} ...``). The
cross-block term is why the probing scheme matters (:mod:`hutchtrace.estimate.probing`).

The estimate is the mean of ``K`` samples; its standard error is ``sqrt(V_b / K)`` with
``V_b`` the pairwise U-statistic variance estimate (:mod:`hutchtrace.estimate.variance`; the sample
variance ``s_b^2`` when the pairwise one is unavailable or not positive), and the interval
a Student-t interval with ``K-1`` degrees of freedom.

Adaptive stopping (``rtol`` / ``atol``): probes are added in rounds until every block (or
the total, ``stop_on="total"``) has ``SE_b <= max(rtol |mean_b|, atol)``. The rule uses
``|mean_b|`` and an absolute floor, so negative and near-zero traces neither stop the loop
early nor keep it running forever (``atol`` defaults to ``0.01 * rtol * max_c |mean_c|``).
"""


from __future__ import annotations

import math
import time
import warnings

import torch
from torch import nn

from ..core.errors import NonFiniteWarning
from ..core.state import PreservedState
from ..core.validate import PROBE_KINDS, check_level, check_model, check_probe_kind, draw_seed, resolve_seed
from ..problem.blocks import resolve_blocks, unwrap_model
from ..problem.loss import make_loss_spec
from . import comm
from .accumulate import SampleSink, Segment, build_estimates, combine, estimate_segments, target_met
from .engine import ProbeRunner, check_probe_count
from .probing import ProbePlan, global_plan, isolated_plan
from .result import BlockTraces
from .variance import PairwiseSink

__all__ = ["block_traces", "draw_seed", "SampleSink", "PROBE_KINDS"]

PROBINGS = ("global", "isolated", "colored", "auto")
VARIANCES = ("auto", "pairwise", "sample")


def _fixed_plan(probing, L: int) -> ProbePlan | None:
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


def _choose(probing, groups, pilot, rtol, atol, L) -> tuple[ProbePlan, dict]:
    """Colored / auto plan from pilot statistics (see :mod:`hutchtrace.estimate.coloring`)."""
    from .coloring import PLAN_WITH_LOWER_BOUND, _weights, choose_plan, color_blocks, pilot_se, predicted_cost

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


#: ``auto`` leaves its plan for one predicted to cost less than this times its own. 1: the
#: samples already taken keep counting after a switch, and each scheme is tried at most
#: once, so a greedy switch cannot oscillate (a margin of 0.8 kept the tiny LM of
#: examples/probing_study.py on a colored plan 1.5x longer than needed)
SWITCH_MARGIN = 1.0


def _revalidate(seg, comb, pilot, rtol, atol, L, tried, energy_ok=True):
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
    from .coloring import PLAN_WITH_LOWER_BOUND, _weights

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


#: a re-colored plan (predicted, not yet measured, by the coupling model) replaces the
#: current one only when predicted to cost less than this times the current plan's cost
#: under the same model: the model's optimum is biased low (it is the minimum over noisy
#: candidates), and every change of plan starts a new segment
RECOLOR_MARGIN = 0.8
#: changes of plan per call, at most (re-coloring and revalidation together)
MAX_SWITCHES = 8


def _pilot_stats(model, segments, K) -> "PilotStats":
    """The coupling model's view after the segments so far: fit, ``V0``, pooled traces."""
    from .coloring import PilotStats

    v0 = model.update_v0(segments)
    comb = combine(segments)  # every pilot sample: the choice may use the random partitions too
    return PilotStats(F=model.couplings(), v0=torch.nan_to_num(v0, nan=0.0), trace=comb["mean"][:-1].clone(),
                      probes=K, se=torch.sqrt(comb["var_mean"][:-1].clamp_min(0)))


def _v0_view(model, segments):
    """A stand-in pilot for :func:`_revalidate` with the model's latest pooled ``V0``."""
    from types import SimpleNamespace

    v0 = model.update_v0(segments)
    return SimpleNamespace(v0=torch.nan_to_num(v0, nan=0.0))


def _recolor(model, segments, seg, probing, groups, rtol, atol, L):
    """``(plan, predicted cost, the current plan's predicted cost)`` under the coupling model
    after a round (:mod:`hutchtrace.estimate.coloring`), or None when the best plan is the current one."""
    from .coloring import PLAN_WITH_LOWER_BOUND, _weights, pilot_se, predicted_cost

    stats = _pilot_stats(model, segments, sum(s.K for s in segments))
    plan, _ = _choose(probing, groups, stats, rtol, atol, L)
    if plan.groups == seg.plan.groups:
        return None
    w = _weights(stats.trace, rtol, atol, pilot_se(stats), lower=PLAN_WITH_LOWER_BOUND)
    return (plan, predicted_cost(stats.F, stats.v0, plan.groups, w),
            predicted_cost(stats.F, stats.v0, seg.plan.groups, w))


def block_traces(
    model: nn.Module,
    loss,
    K: int = 10,
    *,
    data=None,
    blocks="param",
    probe: str = "rademacher",
    seed: int | None = None,
    hvp: str = "auto",
    probing="global",
    groups: int | None = None,
    variance: str = "auto",
    rtol: float | None = None,
    atol: float | None = None,
    max_K: int | None = None,
    stop_on: str = "blocks",
    level: float = 0.95,
    curvature: str = "hessian",
    pilot_K: int = 8,
    probe_batch: int | None = None,
    max_memory: int | None = None,
    progress: bool | None = None,
    process_group=None,
    cuda_graph: bool = False,
) -> BlockTraces:
    """Estimate the trace of every diagonal block of the loss Hessian.

    Args:
        model: any ``nn.Module`` (DDP / DataParallel wrappers are unwrapped).
        loss: a closure ``loss(model) -> scalar`` (with ``data=None``), or a criterion
            ``loss(outputs, targets)`` with ``data``.
        K: number of probes (an int >= 1; K >= 2 for standard errors). With ``rtol`` /
            ``atol`` it is the first round's size.
        data: ``(inputs, targets)`` for one batch, or an iterable of such batches (a list,
            a DataLoader); then the target is the Hessian of the dataset-mean loss,
            batches weighted by their sample counts.
        blocks: ``"param"`` (one block per unique trainable tensor; tied tensors are one
            block), ``"module"``, ``"all"``, a dict ``name -> params/modules`` or a callable
            ``param_name -> group`` (see :func:`hutchtrace.problem.blocks.resolve_blocks`).
        probe: ``"rademacher"`` (default, never worse) or ``"gaussian"``.
        seed: probe seed (int in [0, 2^63)); ``None`` draws one from OS entropy through a
            private generator and records it in ``result.meta["seed"]``.
        hvp: ``"auto"``, ``"reverse"``, ``"reverse-batched"``, ``"forward"`` or
            ``"forward-vmap"`` (see :mod:`hutchtrace.backbones.base`).
        probing: ``"global"`` (one HVP per probe for all blocks; the seed paper's method),
            ``"isolated"`` (one HVP per block per probe; no cross-block variance),
            ``"colored"`` (G groups of weakly coupled blocks), ``"auto"`` (a pilot of
            ``pilot_K`` probes, block-supported for up to 16 blocks and over random
            partitions into 16 groups beyond, so at most ``16 * pilot_K`` rows whatever the
            number of blocks, feeds a coupling model that picks the scheme with the least
            predicted time to the target, :mod:`hutchtrace.estimate.coloring`; with adaptive stopping
            the choice is revisited after every round from everything measured so far), or a
            ``ProbePlan``. The estimate pools the samples of every segment, each counted once,
            except a random-partition pilot's, which only choose the plan
            (:func:`hutchtrace.estimate.accumulate.estimate_segments`).
        groups: number of groups for ``probing="colored"`` (default: the best by the pilot).
        variance: ``"pairwise"`` (the unbiased pairwise U-statistic, lower spread than the
            sample variance; keeps the products and probes of a round of up to 16 probes),
            ``"sample"``, or ``"auto"``: pairwise when a round fits the memory budget, except
            in sequential mode (one probe row per HVP, e.g. ``probe_batch=1``), which asks
            for the least memory and gets the sample variance.
        rtol, atol: adaptive stopping targets on the standard error (see module docs).
        max_K: probe budget for adaptive stopping (default 10000).
        stop_on: ``"blocks"`` (every block meets the target) or ``"total"``.
        level: confidence level of the intervals.
        curvature: ``"hessian"`` (default) or ``"ggn"`` (the generalised Gauss-Newton
            matrix ``G = J^T Lambda J``; needs a criterion form of ``loss``).
        pilot_K: probes of the pilot for ``"colored"`` / ``"auto"`` (``min(L, 16) * pilot_K``
            HVP rows, ``meta["pilot_rows"]``).
        probe_batch: probes per batched HVP (default: from ``max_memory``).
        max_memory: byte budget for batched probes and pairwise rounds.
        progress: show a progress display (``None``: only for runs longer than a few seconds).
        process_group: a ``torch.distributed`` group for data-parallel estimation (each rank
            passes its shard of the data; identical probes are drawn on every rank and only
            the per-block sums are reduced). ``None`` auto-detects an initialised default
            group with more than one rank; ``False`` disables.
        cuda_graph: replay the HVPs and reductions of each chunk of probes from a captured CUDA
            graph (CUDA only, reverse backbones, static shapes; see :mod:`hutchtrace.estimate.engine`).

    Returns:
        :class:`~hutchtrace.estimate.result.BlockTraces`.

    Raises:
        LossError, BlockSpecError, DataFormatError, HVPUnsupportedError, DeviceMismatchError,
        TypeError/ValueError for bad arguments. Blocks whose products are NaN/Inf are
        reported with ``finite=False`` and a :class:`~hutchtrace.core.errors.NonFiniteWarning`.

    Example:
        >>> import torch, hutchtrace
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> x, y = torch.randn(32, 4), torch.randn(32, 1)
        >>> res = hutchtrace.block_traces(net, torch.nn.functional.mse_loss, K=20, data=(x, y),
        ...                               seed=0, probing="isolated")
        >>> res.names
        ['0.weight', '0.bias', '2.weight', '2.bias']
        >>> res["2.bias"].mean   # d^2/db^2 of mean((f - y)^2) is exactly 2; a 1x1 block is exact
        2.0
    """
    t0 = time.perf_counter()
    K = check_probe_count(K)
    check_probe_kind(probe)
    check_level(level)
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
    if stop_on not in ("blocks", "total"):
        raise ValueError(f"stop_on must be 'blocks' or 'total', got {stop_on!r}")
    adaptive = rtol is not None or atol is not None
    for nm, v in (("rtol", rtol), ("atol", atol)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0):
            raise ValueError(f"{nm} must be a positive number or None, got {v!r}")
    if max_K is None:
        max_K = 10_000 if adaptive else K
    elif isinstance(max_K, bool) or not isinstance(max_K, int) or max_K < K:
        raise ValueError(f"max_K must be an int >= K ({K}), got {max_K!r}")
    if isinstance(pilot_K, bool) or not isinstance(pilot_K, int) or pilot_K < 2:
        raise ValueError(f"pilot_K must be an int >= 2, got {pilot_K!r}")
    seed = resolve_seed(seed)
    check_model(model)
    inner = unwrap_model(model)
    layout = resolve_blocks(inner, blocks)

    group = comm.resolve_group(process_group)
    if group is not None and data is not None and isinstance(data, tuple) and len(data) == 2 \
            and not isinstance(data[1], (tuple, list)):
        # one (inputs, targets) shard per rank: weight it by its sample count like a dataset batch
        data = [data]
    spec = make_loss_spec(loss, data, allow_empty=group is not None)
    if adaptive and not spec.reiterable:
        raise ValueError("adaptive stopping (rtol/atol) needs re-iterable data (a list or a DataLoader), "
                         "not a one-shot iterator")
    L = layout.num_blocks
    plan = _fixed_plan(probing, L)
    reducer = comm.sample_sink_reducer(group) if group is not None else None
    if group is not None and progress is None and not comm.is_main_process(group):
        progress = False  # one progress display per job, on rank 0
    if group is not None:
        seed = comm.broadcast_seed(seed, group)
    single = spec.kind != "dataset" and group is None
    device = layout.device()
    with PreservedState(inner):
        runner = ProbeRunner(
            inner, layout, spec, seed=seed, kind=probe, hvp=hvp, curvature=curvature,
            probe_batch=probe_batch, max_memory=max_memory, progress=progress, desc="block_traces",
            cuda_graph=cuda_graph,
        )
        run_state = {"hvps": 0, "rows": 0, "info": None}

        def new_segment(p: ProbePlan, first: int, expected_K: int) -> Segment:
            pair = _pairwise_sink(variance, layout, p, runner, probe, expected_K, max_memory, single, group, first,
                                  adaptive)
            return Segment(p, L, device, pair, first)

        def run_round(seg: Segment, n: int, extra=()) -> None:
            sink = SampleSink(n, layout, seg.plan, single_batch=single, first_k=seg.next_probe, reducer=reducer)
            sinks = [sink] + ([seg.pair] if seg.pair is not None else []) + list(extra)
            info = runner.run(seg.plan, range(seg.next_probe, seg.next_probe + n), sinks)
            run_state["hvps"] += info.hvps
            run_state["rows"] += info.rows * info.n_batches
            run_state["info"] = info
            seg.add(sink)

        segments: list[Segment] = []
        pilot = None
        costs = None
        model = None
        if plan is None:  # colored / auto: pilot segments first (coloring.pilot_plans)
            from .coloring import CouplingModel, GroupEnergySink, pilot_plans

            model = CouplingModel(L, probe)
            for p_plan, k in pilot_plans(L, pilot_K, seed):
                pseg = new_segment(p_plan, sum(s.K for s in segments), k)
                sink = GroupEnergySink(p_plan, L)
                run_round(pseg, k, [sink])
                model.observe(sink)
                segments.append(pseg)
            info = run_state["info"]
            pilot = _pilot_stats(model, segments, pilot_K)
            pilot.seconds_per_row = info.seconds / max(1, info.rows * info.n_batches)
            pilot.hvps, pilot.rows = run_state["hvps"], run_state["rows"]
            plan, costs = _choose(probing, groups, pilot, rtol, atol, L)
            if group is not None:  # couplings are rank-local estimates: rank 0 decides for all
                plan = comm.broadcast_plan(plan, group)
        # re-coloring and model-weighted pooling need the same model on every rank: one process only
        replan = model is not None and group is None and adaptive
        seg = segments[-1] if (segments and segments[-1].plan == plan) else new_segment(
            plan, sum(s.K for s in segments), K)
        if seg is not (segments[-1] if segments else None):
            segments.append(seg)
        round_K = K
        tried = {seg.plan.name}  # auto switches to global / isolated at most once: no oscillation
        switches = 0
        converged = None
        while True:
            sink = GroupEnergySink(seg.plan, L) if model is not None else None
            run_round(seg, round_K, [sink] if sink is not None else ())
            if sink is not None:
                model.observe(sink)
            if not adaptive:
                break
            comb = combine(estimate_segments(segments))
            converged, need = target_met(comb, rtol, atol, stop_on)
            done = comb["K"]
            if converged or done >= max_K:
                break
            if pilot is not None and probing in ("auto", "colored") and switches < MAX_SWITCHES:
                better, ratio = None, 1.0
                if probing == "auto":
                    cand, measured = _revalidate(seg, comb, _v0_view(model, segments), rtol, atol, L, tried,
                                                 energy_ok=group is None)
                    # the pilot's predictions, then the latest measurements
                    costs = {**(costs or {}), **measured}
                    if cand is not None:
                        better = cand
                        ratio = measured[f"measured_{cand.name}"] / max(measured["measured_plan"], 1e-300)
                if replan:
                    rec = _recolor(model, segments, seg, probing, groups, rtol, atol, L)
                    if rec is not None and rec[1] < RECOLOR_MARGIN * rec[2] and rec[1] / rec[2] < ratio:
                        better = rec[0]
                        costs = {**(costs or {}), "predicted_recolored": rec[1], "predicted_plan": rec[2]}
                if group is not None:  # V0 comes from rank-local couplings: rank 0 decides for all
                    chosen = comm.broadcast_plan(better or seg.plan, group)
                    better = None if chosen == seg.plan else chosen
                if better is not None:
                    tried.add(better.name)
                    switches += 1
                    seg = new_segment(better, sum(s.K for s in segments), K)  # fresh probe indices (pilot too)
                    segments.append(seg)
            grow = max(8, int(math.ceil(1.1 * need)) - done) if math.isfinite(need) else done
            round_K = int(min(max(grow, 8), max(done, 8), max_K - done))
    info = run_state["info"]
    energy_override = None
    last = segments[-1]
    if len(segments) == 1 and last.pair is not None and not single and last.pair.available and group is None:
        energy_override = last.pair.row_energy()
    in_estimate = estimate_segments(segments)
    blocks_est, total, samples = build_estimates(layout, in_estimate, level, energy_override)
    if adaptive and not converged:
        warnings.warn(
            f"adaptive stopping did not reach rtol={rtol}, atol={atol} within max_K={max_K} probes; "
            "the reported standard errors are larger than requested. Raise max_K, loosen the target, "
            "or use probing='auto' (less variance per HVP)",
            RuntimeWarning,
            stacklevel=2,
        )
    bad = [b.name for b in blocks_est if not b.finite]
    if bad:
        if any(t.dtype == torch.float16 for t in layout.tensors):
            # measured: 26 of 28 blocks of a GPT-2 overflow in float16, none in bfloat16 (README)
            advice = ("The model is float16, whose range (max 65504) Hessian-vector products overflow (a plain "
                      "double backward does too): measure in bfloat16 or float32, e.g. on a copy "
                      "copy.deepcopy(model).to(torch.bfloat16).")
        else:
            advice = ("Check for overflow (bf16), exploding activations or a NaN loss. F.normalize of an all-zero "
                      "vector (Swin V2 on padded windows) has a NaN second derivative in PyTorch: wrap the call in "
                      "`with hutchtrace.twice_differentiable():`.")
        warnings.warn(
            f"non-finite Hessian-vector products in blocks {bad}: they are reported as NaN "
            f"(finite=False), not averaged. {advice}",
            NonFiniteWarning,
            stacklevel=2,
        )
    final = segments[-1].plan
    meta = {
        "K": samples.shape[0],
        "seed": seed,
        "probe": probe,
        "probing": final.name,
        "probing_requested": probing if isinstance(probing, str) else "plan",
        "groups": [list(g) for g in final.groups] if final.name == "colored" else final.num_groups,
        # first_probe: the probe index (probes are a function of seed and index); rows of
        # `samples` hold the segments with in_estimate=True, in this order
        "segments": [{"probing": s.plan.name, "groups": s.plan.num_groups, "K": s.K, "first_probe": s.first_probe,
                      "in_estimate": any(s is e for e in in_estimate)}
                     for s in segments],
        "curvature": curvature,
        "variance": "pairwise" if all(s.pair is not None and s.pair.available for s in in_estimate) else "sample",
        "hvp": info.backbone,
        "hvp_requested": hvp,
        "hvp_timings": info.timings,
        # hvp="auto" found backbones multiplying by different matrices and used the reference only
        "hvp_disagreement": info.timings.get("disagreement"),
        "backend": info.backend,
        "n_batches": info.n_batches,
        "n_samples": (_global_count(segments, info) if spec.kind == "dataset" else None),
        "world_size": comm.world_size(group),
        "hvps": run_state["hvps"],
        "hvp_rows": run_state["rows"],
        "pilot_rows": pilot.rows if pilot is not None else 0,
        "plan_switches": switches if pilot is not None else 0,
        "loss_form": spec.kind,
        "device": str(device),
        "dtype": str(layout.tensors[0].dtype),
        "wall_time_s": time.perf_counter() - t0,
    }
    if adaptive:
        meta.update({"rtol": rtol, "atol": atol, "max_K": max_K, "converged": converged, "stop_on": stop_on})
    extras = {}
    if pilot is not None:
        extras["pilot"] = {"F": pilot.F, "v0": pilot.v0, "trace": pilot.trace, "probes": pilot.probes,
                           "scheme": segments[0].plan.name,
                           "partitions": sum(s.plan.name == "random" for s in segments)}
        extras["predicted_costs"] = costs
    return BlockTraces(blocks=blocks_est, total=total, samples=samples.cpu(), level=level, meta=meta,
                       extras=extras)


def _global_count(segments, info) -> float:
    """Samples behind the estimate: the all-reduced count under data parallelism."""
    for s in segments:
        if s.global_count is not None:
            return s.global_count
    return info.total_count


def _pairwise_sink(variance, layout, plan, runner, probe, K, max_memory, single, group, first_probe, adaptive):
    """The pairwise-variance sink when requested and affordable, else None."""
    if variance == "sample" or group is not None:
        return None
    if variance == "auto" and runner.max_rows == 1:
        # sequential mode (probe_batch=1, or a budget for one row): the caller wants the
        # least memory, and a pairwise round keeps 2 x 16 rows of P besides the HVP
        return None
    if K < 2 and not adaptive:
        return None
    from .engine import default_memory_budget

    budget = max_memory if max_memory is not None else default_memory_budget(layout.device())
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
    return PairwiseSink(layout, plan, runner.seed, probe, round_size, first_k=first_probe, accumulate=accumulate)
