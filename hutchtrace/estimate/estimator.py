"""``block_traces``: unbiased trace estimates of every diagonal Hessian block.

For probes ``z^(k)`` with i.i.d. entries (``E z_i = 0``, ``E z_i^2 = 1``) and blocks
``I_1..I_L`` of the parameter vector, one Hessian-vector product ``w = H z`` gives for
every block at once

.. math:: t_b^{(k)} = z_b^{(k)\\top} (H z^{(k)})_b, \\qquad
          \\mathbb E\\, t_b = \\operatorname{tr} H_{bb},

with variance ``2(||H_bb||_F^2 - ||diag H_bb||^2) + sum_{c != b} ||H_bc||_F^2`` for
Rademacher probes (``docs/maths.md`` section 1; Gaussian: ``2||H_bb||_F^2 + sum_{c != b} ...``). The
cross-block term is why the probing scheme matters (:mod:`hutchtrace.estimate.probing`).

The estimate is the mean of ``K`` samples; its standard error is ``sqrt(V_b / K)`` with
``V_b`` the pairwise U-statistic variance estimate (:mod:`hutchtrace.estimate.variance`; the sample
variance ``s_b^2`` when the pairwise one is unavailable or not positive), and the interval
a Student-t interval with ``K-1`` degrees of freedom.

Adaptive stopping (``rtol`` / ``atol``): probes are added in rounds until every block (or
the total, ``stop_on="total"``) has ``SE_b <= max(rtol |mean_b|, atol)``. The rule uses
``|mean_b|`` and an absolute floor, so negative and near-zero traces neither stop the loop
early nor keep it running forever (``atol`` defaults to ``0.01 * rtol * max_c |mean_c|``).

One call, step by step: :func:`~hutchtrace.estimate.resolve.resolve_call` checks the
arguments and resolves model, blocks, loss, seed and process group;
:class:`~hutchtrace.estimate.rounds.Rounds` runs the pilot (``colored`` / ``auto``), chooses
the plan (:mod:`hutchtrace.estimate.plan_choice`) and runs the rounds, revisiting the plan
after each adaptive round, through one :class:`~hutchtrace.estimate.engine.ProbeRunner`;
:func:`build_result` pools the segments (:mod:`hutchtrace.estimate.accumulate`) into the
:class:`~hutchtrace.estimate.result.BlockTraces`.
"""

from __future__ import annotations

import time
import warnings

import torch
from torch import nn

from ..core.errors import NonFiniteWarning
from ..core.state import PreservedState
from . import comm
from .accumulate import Segment, build_estimates, estimate_segments
from .resolve import Call, resolve_call
from .result import BlockTraces
from .rounds import Rounds, make_runner

__all__ = ["block_traces"]


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
    call = resolve_call(
        model, loss, K, data=data, blocks=blocks, probe=probe, seed=seed, hvp=hvp, probing=probing,
        groups=groups, variance=variance, rtol=rtol, atol=atol, max_K=max_K, stop_on=stop_on, level=level,
        curvature=curvature, pilot_K=pilot_K, probe_batch=probe_batch, max_memory=max_memory,
        progress=progress, process_group=process_group, cuda_graph=cuda_graph,
    )
    with PreservedState(call.model):
        rounds = Rounds(call, make_runner(call))
        rounds.run()
    return build_result(call, rounds, t0)


def build_result(call: Call, rounds: Rounds, t0: float) -> BlockTraces:
    """The :class:`~hutchtrace.estimate.result.BlockTraces` of a finished call: estimates
    pooled over the segments in the estimate, warnings, ``meta`` and ``extras``."""
    segments = rounds.segments
    in_estimate = estimate_segments(segments)
    blocks_est, total, samples = build_estimates(call.layout, in_estimate, call.level,
                                                 _energy_override(call, segments))
    _warn_outcome(call, rounds.converged, blocks_est)
    meta = _meta(call, rounds, in_estimate, samples.shape[0], t0)
    return BlockTraces(blocks=blocks_est, total=total, samples=samples.cpu(), level=call.level, meta=meta,
                       extras=_extras(rounds))


def _energy_override(call: Call, segments: list[Segment]):
    """Row energies from the pairwise sink of a lone dataset-mode segment (its accumulated
    products give ``||(H z)_b||^2`` of the dataset-mean Hessian), else None."""
    last = segments[-1]
    if len(segments) == 1 and last.pair is not None and not call.single and last.pair.available \
            and call.group is None:
        return last.pair.row_energy()
    return None


def _warn_outcome(call: Call, converged: bool | None, blocks_est) -> None:
    """Warn when adaptive stopping missed its target, and about blocks with non-finite products."""
    # stacklevel 4: this function, build_result, block_traces, the caller of block_traces
    if call.adaptive and not converged:
        warnings.warn(
            f"adaptive stopping did not reach rtol={call.rtol}, atol={call.atol} within max_K={call.max_K} "
            "probes; "
            "the reported standard errors are larger than requested. Raise max_K, loosen the target, "
            "or use probing='auto' (less variance per HVP)",
            RuntimeWarning,
            stacklevel=4,
        )
    bad = [b.name for b in blocks_est if not b.finite]
    if bad:
        if any(t.dtype == torch.float16 for t in call.layout.tensors):
            # measured: 26 of 28 blocks of a GPT-2 overflow in float16, none in bfloat16 (README)
            advice = ("The model is float16, whose range (max 65504) Hessian-vector products overflow "
                      "(a plain double backward does too): measure in bfloat16 or float32, e.g. on a copy "
                      "copy.deepcopy(model).to(torch.bfloat16).")
        else:
            advice = ("Check for overflow (bf16), exploding activations or a NaN loss. F.normalize of an "
                      "all-zero vector (Swin V2 on padded windows) has a NaN second derivative in PyTorch: "
                      "wrap the call in `with hutchtrace.twice_differentiable():`.")
        warnings.warn(
            f"non-finite Hessian-vector products in blocks {bad}: they are reported as NaN "
            f"(finite=False), not averaged. {advice}",
            NonFiniteWarning,
            stacklevel=4,
        )


def _meta(call: Call, rounds: Rounds, in_estimate: list[Segment], K: int, t0: float) -> dict:
    """``result.meta``: what was run and how (README's table of ``meta`` keys)."""
    segments, info, pilot = rounds.segments, rounds.info, rounds.pilot
    final = segments[-1].plan
    probing = call.probing
    meta = {
        "K": K,
        "seed": call.seed,
        "probe": call.probe,
        "probing": final.name,
        "probing_requested": probing if isinstance(probing, str) else "plan",
        "groups": [list(g) for g in final.groups] if final.name == "colored" else final.num_groups,
        # first_probe: the probe index (probes are a function of seed and index); rows of
        # `samples` hold the segments with in_estimate=True, in this order
        "segments": [{"probing": s.plan.name, "groups": s.plan.num_groups, "K": s.K,
                      "first_probe": s.first_probe, "in_estimate": any(s is e for e in in_estimate)}
                     for s in segments],
        "curvature": call.curvature,
        "variance": ("pairwise" if all(s.pair is not None and s.pair.available for s in in_estimate)
                     else "sample"),
        "hvp": info.backbone,
        "hvp_requested": call.hvp,
        "hvp_timings": info.timings,
        # hvp="auto" found backbones multiplying by different matrices and used the reference only
        "hvp_disagreement": info.timings.get("disagreement"),
        "backend": info.backend,
        "n_batches": info.n_batches,
        "n_samples": (_global_count(segments, info) if call.spec.kind == "dataset" else None),
        "world_size": comm.world_size(call.group),
        "hvps": rounds.hvps,
        "hvp_rows": rounds.rows,
        "pilot_rows": pilot.rows if pilot is not None else 0,
        "plan_switches": rounds.switches if pilot is not None else 0,
        "loss_form": call.spec.kind,
        "device": str(call.device),
        "dtype": str(call.layout.tensors[0].dtype),
        "wall_time_s": time.perf_counter() - t0,
    }
    if call.adaptive:
        meta.update({"rtol": call.rtol, "atol": call.atol, "max_K": call.max_K, "converged": rounds.converged,
                     "stop_on": call.stop_on})
    return meta


def _extras(rounds: Rounds) -> dict:
    """``result.extras``: the pilot's statistics and the predicted / measured plan costs."""
    pilot = rounds.pilot
    if pilot is None:
        return {}
    return {
        "pilot": {"F": pilot.F, "v0": pilot.v0, "trace": pilot.trace, "probes": pilot.probes,
                  "scheme": rounds.segments[0].plan.name,
                  "partitions": sum(s.plan.name == "random" for s in rounds.segments)},
        "predicted_costs": rounds.costs,
    }


def _global_count(segments, info) -> float:
    """Samples behind the estimate: the all-reduced count under data parallelism."""
    for s in segments:
        if s.global_count is not None:
            return s.global_count
    return info.total_count
