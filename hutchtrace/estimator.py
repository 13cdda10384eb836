"""``block_traces``: unbiased trace estimates of every diagonal Hessian block.

For probes ``z^(k)`` with i.i.d. entries (``E z_i = 0``, ``E z_i^2 = 1``) and blocks
``I_1..I_L`` of the parameter vector, one Hessian-vector product ``w = H z`` gives for
every block at once

.. math:: t_b^{(k)} = z_b^{(k)\\top} (H z^{(k)})_b, \\qquad
          \\mathbb E\\, t_b = \\operatorname{tr} H_{bb},

with variance ``2(||H_bb||_F^2 - ||diag H_bb||^2) + sum_{c != b} ||H_bc||_F^2`` for
Rademacher probes (SPEC section 1; Gaussian: ``2||H_bb||_F^2 + sum_{c != b} ...``). The
cross-block term is why the probing scheme matters (:mod:`hutchtrace.probing`).

The estimate is the mean of ``K`` samples; its standard error is ``sqrt(s_b^2 / K)``
and the interval a Student-t interval with ``K-1`` degrees of freedom.
"""

from __future__ import annotations

import math
import time
import warnings

import torch
from torch import nn

from .blocks import BlockLayout, resolve_blocks, unwrap_model
from .engine import ProbeRunner, RowBatch, Sink, check_probe_count
from .errors import NonFiniteWarning
from .loss import make_loss_spec
from .probing import ProbePlan, global_plan, isolated_plan
from .result import BlockEstimate, BlockTraces
from .state import PreservedState
from .stats import WelfordState, mean_se_ci

__all__ = ["block_traces", "draw_seed", "SampleSink"]

PROBE_KINDS = ("rademacher", "gaussian")


def draw_seed() -> int:
    """A fresh 63-bit seed from OS entropy, via a private ``torch.Generator`` (never the global RNG)."""
    g = torch.Generator()
    return int(g.seed()) & ((1 << 63) - 1)


class SampleSink(Sink):
    """Accumulates per-probe block samples ``t_b^(k)`` and row energies ``||(Hz)_b||^2``.

    In single-batch mode every probe is complete once all its groups have been seen and
    goes straight into the on-device Welford state (columns: L blocks + the total). In
    dataset mode samples are sums over batches and enter the state at :meth:`finish`.
    """

    def __init__(self, K: int, layout: BlockLayout, plan: ProbePlan, single_batch: bool, first_k: int = 0,
                 reducer=None):
        dev = layout.device()
        L = layout.num_blocks
        self.L = L
        self.first_k = first_k
        self.samples = torch.zeros((K, L), dtype=torch.float64, device=dev)
        self.energy = torch.zeros((K, L), dtype=torch.float64, device=dev)
        masks = torch.zeros((plan.num_groups, L), dtype=torch.float64)
        for g, members in enumerate(plan.groups):
            masks[g, list(members)] = 1.0
        self.masks = masks.to(dev)
        self.G = plan.num_groups
        self.single_batch = single_batch
        self.seen = [0] * K
        self.state = WelfordState.zeros(L + 1, device=dev)
        self.energy_valid = True
        self.batches = 0
        # reducer(sink, total_count) -> global total_count: combines ranks (data parallel)
        self.reducer = reducer

    def on_rows(self, rb: RowBatch) -> None:
        # rows of the same group with consecutive k are adjacent (group-major chunks)
        r = 0
        R = len(rb.ks)
        while r < R:
            e = r
            while e + 1 < R and rb.gs[e + 1] == rb.gs[r] and rb.ks[e + 1] == rb.ks[e] + 1:
                e += 1
            k0 = rb.ks[r] - self.first_k
            n = e - r + 1
            sl = slice(k0, k0 + n)
            self.samples[sl].add_(rb.dots[r : e + 1] * self.masks[rb.gs[r]], alpha=rb.weight)
            self.energy[sl].add_(rb.sq[r : e + 1], alpha=rb.weight**2)
            if self.single_batch:
                for k in range(k0, k0 + n):
                    self.seen[k] += 1
                    if self.seen[k] == self.G:
                        self._complete(k)
            r = e + 1

    def _complete(self, k: int) -> None:
        row = self.samples[k]
        self.state.update(torch.cat([row, row.sum().reshape(1)]))

    def on_batch_end(self, batch_index: int, weight: float) -> None:
        self.batches += 1

    def finish(self, total_count: float) -> None:
        if self.single_batch:  # closure / single batch: weight = count = 1, state complete
            return
        # ||sum_m w_m||^2 is not the sum of per-batch norms: valid only for one batch.
        self.energy_valid = self.batches == 1
        if self.reducer is not None:
            total_count = self.reducer(self, total_count)
        self.samples /= total_count
        self.energy /= total_count**2
        self.state.update(torch.cat([self.samples, self.samples.sum(1, keepdim=True)], 1))


def _make_plan(probing, L: int) -> ProbePlan:
    if isinstance(probing, ProbePlan):
        return probing
    if probing == "global":
        return global_plan(L)
    if probing == "isolated":
        return isolated_plan(L)
    raise ValueError(f"unknown probing scheme {probing!r}; use 'global' or 'isolated' or a ProbePlan")


def _check_probe_kind(probe: str) -> str:
    if probe not in PROBE_KINDS:
        raise ValueError(f"probe must be one of {PROBE_KINDS}, got {probe!r}")
    return probe


def _estimates(layout: BlockLayout, sink: SampleSink, level: float) -> tuple[list[BlockEstimate], BlockEstimate]:
    K = sink.samples.shape[0]
    mean = sink.state.mean.cpu()
    var = sink.state.variance().cpu()
    se, lo, hi = mean_se_ci(mean, var, K, level)
    energy = sink.energy.mean(0).cpu() if sink.energy_valid else None
    finite = torch.isfinite(sink.samples).all(0).cpu()
    blocks = []
    for b, blk in enumerate(layout.blocks):
        ok = bool(finite[b])
        blocks.append(
            BlockEstimate(
                name=blk.name,
                params=blk.params,
                aliases=blk.aliases,
                numel=blk.numel,
                mean=float(mean[b]) if ok else math.nan,
                se=float(se[b]) if ok else math.nan,
                ci=(float(lo[b]), float(hi[b])) if ok else (math.nan, math.nan),
                variance=float(var[b]) if ok else math.nan,
                sample_variance=float(var[b]) if ok else math.nan,
                row_energy=float(energy[b]) if (energy is not None and ok) else None,
                finite=ok,
            )
        )
    all_ok = bool(finite.all())
    total = BlockEstimate(
        name="total",
        params=tuple(p for blk in layout.blocks for p in blk.params),
        aliases=(),
        numel=layout.numel,
        mean=float(mean[-1]) if all_ok else math.nan,
        se=float(se[-1]) if all_ok else math.nan,
        ci=(float(lo[-1]), float(hi[-1])) if all_ok else (math.nan, math.nan),
        variance=float(var[-1]) if all_ok else math.nan,
        sample_variance=float(var[-1]) if all_ok else math.nan,
        finite=all_ok,
    )
    return blocks, total


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
    level: float = 0.95,
    curvature: str = "hessian",
    probe_batch: int | None = None,
    max_memory: int | None = None,
    progress: bool | None = None,
    process_group=None,
) -> BlockTraces:
    """Estimate the trace of every diagonal block of the loss Hessian.

    Args:
        model: any ``nn.Module`` (DDP / DataParallel wrappers are unwrapped).
        loss: a closure ``loss(model) -> scalar`` (with ``data=None``), or a criterion
            ``loss(outputs, targets)`` with ``data``.
        K: number of probes (an int >= 1; K >= 2 for standard errors).
        data: ``(inputs, targets)`` for one batch, or an iterable of such batches (a list,
            a DataLoader); then the target is the Hessian of the dataset-mean loss,
            batches weighted by their sample counts.
        blocks: ``"param"`` (one block per unique trainable tensor; tied tensors are one
            block), ``"module"``, ``"all"``, a dict ``name -> params/modules`` or a callable
            ``param_name -> group`` (see :func:`hutchtrace.blocks.resolve_blocks`).
        probe: ``"rademacher"`` (default, never worse) or ``"gaussian"``.
        seed: probe seed (int in [0, 2^63)); ``None`` draws one from OS entropy through a
            private generator and records it in ``result.meta["seed"]``.
        hvp: ``"auto"``, ``"reverse"``, ``"reverse-batched"``, ``"forward"`` or
            ``"forward-vmap"`` (see :mod:`hutchtrace.hvp`).
        probing: ``"global"`` (one HVP per probe for all blocks) or ``"isolated"``
            (one HVP per block per probe, no cross-block variance), or a ``ProbePlan``.
        level: confidence level of the intervals.
        curvature: ``"hessian"`` (default) or ``"ggn"`` (the generalised Gauss-Newton
            matrix ``G = J^T Lambda J``; needs a criterion form of ``loss``).
        probe_batch: probes per batched HVP (default: from ``max_memory``).
        max_memory: byte budget for batched probes.
        progress: show a progress display (``None``: only for runs longer than a few seconds).
        process_group: a ``torch.distributed`` group for data-parallel estimation (each rank
            passes its shard of the data; identical probes are drawn on every rank and only
            the per-block sums are reduced). ``None`` auto-detects an initialised default
            group with more than one rank; ``False`` disables.

    Returns:
        :class:`~hutchtrace.result.BlockTraces`.

    Raises:
        LossError, BlockSpecError, DataFormatError, HVPUnsupportedError, DeviceMismatchError,
        TypeError/ValueError for bad arguments. Blocks whose products are NaN/Inf are
        reported with ``finite=False`` and a :class:`~hutchtrace.errors.NonFiniteWarning`.

    Example:
        >>> import torch, hutchtrace
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> x, y = torch.randn(32, 4), torch.randn(32, 1)
        >>> res = hutchtrace.block_traces(net, torch.nn.functional.mse_loss, K=20, data=(x, y), seed=0)
        >>> res.names
        ['0.weight', '0.bias', '2.weight', '2.bias']
        >>> res["2.bias"].mean   # MSE Hessian w.r.t. the output bias is exactly 2/n_out = 2
        2.0
    """
    t0 = time.perf_counter()
    K = check_probe_count(K)
    _check_probe_kind(probe)
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if seed is None:
        seed = draw_seed()
    elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63) or None, got {seed!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    inner = unwrap_model(model)
    layout = resolve_blocks(inner, blocks)
    spec = make_loss_spec(loss, data)
    plan = _make_plan(probing, layout.num_blocks)
    from . import distributed

    group = distributed.resolve_group(process_group)
    reducer = distributed.sample_sink_reducer(group) if group is not None else None
    if group is not None:
        seed = distributed.broadcast_seed(seed, group)
    with PreservedState(inner):
        runner = ProbeRunner(
            inner, layout, spec, seed=seed, kind=probe, hvp=hvp, curvature=curvature,
            probe_batch=probe_batch, max_memory=max_memory, progress=progress, desc="block_traces",
        )
        sink = SampleSink(K, layout, plan, single_batch=spec.kind != "dataset" and group is None,
                          reducer=reducer)
        info = runner.run(plan, range(K), [sink])
    blocks_est, total = _estimates(layout, sink, level)
    bad = [b.name for b in blocks_est if not b.finite]
    if bad:
        warnings.warn(
            f"non-finite Hessian-vector products in blocks {bad}: they are reported as NaN "
            "(finite=False), not averaged. Check for overflow (fp16/bf16), exploding activations or "
            "a NaN loss.",
            NonFiniteWarning,
            stacklevel=2,
        )
    meta = {
        "K": K,
        "seed": seed,
        "probe": probe,
        "probing": plan.name,
        "curvature": curvature,
        "groups": plan.num_groups,
        "hvp": info.backbone,
        "hvp_requested": hvp,
        "hvp_timings": info.timings,
        "backend": info.backend,
        "n_batches": info.n_batches,
        "n_samples": info.total_count if spec.kind == "dataset" else None,
        "hvps": info.hvps,
        "loss_form": spec.kind,
        "device": str(layout.device()),
        "dtype": str(layout.tensors[0].dtype),
        "wall_time_s": time.perf_counter() - t0,
    }
    return BlockTraces(blocks=blocks_est, total=total, samples=sink.samples.cpu(), level=level, meta=meta)
