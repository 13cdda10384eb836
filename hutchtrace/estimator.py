"""``block_traces``: unbiased trace estimates of every diagonal Hessian block.

For probes ``z^(k)`` with i.i.d. entries (``E z_i = 0``, ``E z_i^2 = 1``) and blocks
``I_1..I_L`` of the parameter vector, one Hessian-vector product ``w = H z`` gives for
every block at once

.. math:: t_b^{(k)} = z_b^{(k)\\top} (H z^{(k)})_b, \\qquad
          \\mathbb E\\, t_b = \\operatorname{tr} H_{bb},

with variance ``2(||H_bb||_F^2 - ||diag H_bb||^2) + sum_{c != b} ||H_bc||_F^2`` for
Rademacher probes (SPEC section 1; Gaussian: ``2||H_bb||_F^2 + sum_{c != b} ...``). The
cross-block term is why the probing scheme matters (:mod:`hutchtrace.probing`).

The estimate is the mean of ``K`` samples; its standard error is ``sqrt(V_b / K)`` with
``V_b`` the pairwise U-statistic variance estimate (:mod:`hutchtrace.variance`; the sample
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

from .blocks import BlockLayout, resolve_blocks, unwrap_model
from .engine import ProbeRunner, RowBatch, Sink, check_probe_count
from .errors import NonFiniteWarning
from .loss import make_loss_spec
from .probing import ProbePlan, global_plan, isolated_plan
from .variance import PairwiseSink
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


PROBINGS = ("global", "isolated", "colored", "auto")
VARIANCES = ("auto", "pairwise", "sample")


def _check_probe_kind(probe: str) -> str:
    if probe not in PROBE_KINDS:
        raise ValueError(f"probe must be one of {PROBE_KINDS}, got {probe!r}")
    return probe


class _Accumulator:
    """Merges the per-round sample sinks: samples, Welford states (Chan merge), energies."""

    def __init__(self, L: int, device):
        self.samples: list[torch.Tensor] = []
        self.energy: list[torch.Tensor] = []
        self.energy_valid = True
        self.state = WelfordState.zeros(L + 1, device=device)

    def add(self, sink: SampleSink) -> None:
        self.samples.append(sink.samples)
        self.energy.append(sink.energy)
        self.energy_valid &= sink.energy_valid
        self.state.merge(sink.state)

    @property
    def K(self) -> int:
        return sum(s.shape[0] for s in self.samples)

    def all_samples(self) -> torch.Tensor:
        return torch.cat(self.samples, 0)


def _variances(acc: _Accumulator, pair: PairwiseSink | None):
    """Per-column variance used for error bars, the sample variance and the pairwise one."""
    sample_var = acc.state.variance().cpu()
    if pair is not None and pair.available:
        pw_blocks = pair.block_variance().cpu()
        pw = torch.cat([pw_blocks, torch.tensor([pair.total_variance()], dtype=torch.float64)])
        use = torch.where(pw > 0, pw, sample_var)
        return use, sample_var, pw
    return sample_var, sample_var, None


def _target_met(mean, var, K, rtol, atol, stop_on) -> tuple[bool, float]:
    """Whether every block (or the total) has SE <= max(rtol |mean|, atol); and the K needed."""
    se = torch.sqrt(var.clamp_min(0) / K)
    blocks_mean = mean[:-1]
    big = float(blocks_mean.abs().max()) if blocks_mean.numel() else 0.0
    r = rtol or 0.0
    a = atol if atol is not None else 0.01 * r * big
    eps = torch.maximum(r * mean.abs(), torch.full_like(mean, a))
    cols = slice(-1, None) if stop_on == "total" else slice(0, -1)
    ok = bool((se[cols] <= eps[cols]).all()) and bool(torch.isfinite(se[cols]).all())
    need = float((var[cols].clamp_min(0) / eps[cols].clamp_min(1e-300) ** 2).max())
    return ok, need


def _estimates(layout: BlockLayout, acc: _Accumulator, pair, level: float, energy_override=None):
    samples = acc.all_samples()
    K = samples.shape[0]
    mean = acc.state.mean.cpu()
    use, sample_var, pw = _variances(acc, pair)
    se, lo, hi = mean_se_ci(mean, use, K, level)
    if energy_override is not None:
        energy = energy_override.cpu()
    else:
        energy = torch.cat(acc.energy, 0).mean(0).cpu() if acc.energy_valid else None
    finite = torch.isfinite(samples).all(0).cpu()

    def est(name, params, aliases, numel, col, ok, row_energy=None):
        return BlockEstimate(
            name=name,
            params=params,
            aliases=aliases,
            numel=numel,
            mean=float(mean[col]) if ok else math.nan,
            se=float(se[col]) if ok else math.nan,
            ci=(float(lo[col]), float(hi[col])) if ok else (math.nan, math.nan),
            variance=float(use[col]) if ok else math.nan,
            sample_variance=float(sample_var[col]) if ok else math.nan,
            pairwise_variance=(float(pw[col]) if (pw is not None and ok) else None),
            row_energy=row_energy if ok else None,
            finite=ok,
        )

    blocks = [
        est(blk.name, blk.params, blk.aliases, blk.numel, b, bool(finite[b]),
            float(energy[b]) if energy is not None else None)
        for b, blk in enumerate(layout.blocks)
    ]
    total = est("total", tuple(p for blk in layout.blocks for p in blk.params), (), layout.numel, -1,
                bool(finite.all()))
    return blocks, total, samples


def _resolve_plan(probing, groups, layout, runner, pilot_K, rtol, atol, next_probe):
    """``(plan, pilot, predicted costs, next probe index)``; colored/auto run a pilot first."""
    L = layout.num_blocks
    if isinstance(probing, ProbePlan):
        probing.group_of_block(L)  # validates
        return probing, None, None, next_probe
    if probing not in PROBINGS:
        raise ValueError(f"unknown probing scheme {probing!r}; use one of {PROBINGS} or a ProbePlan")
    if probing == "global":
        return global_plan(L), None, None, next_probe
    if probing == "isolated":
        return isolated_plan(L), None, None, next_probe
    from .coloring import _weights, candidate_partitions, choose_plan, color_blocks, predicted_cost, run_pilot

    if L == 1:
        return global_plan(L), None, None, next_probe
    pilot = run_pilot(runner, layout, pilot_K, first_probe=next_probe)
    next_probe += pilot_K
    if probing == "auto":
        choice = choose_plan(pilot, rtol, atol)
        return choice.plan, pilot, choice.costs, next_probe
    # colored: a fixed number of groups, or the best G strictly between global and isolated
    w = _weights(pilot.trace, rtol, atol)
    v0 = torch.nan_to_num(pilot.v0, nan=0.0)
    if groups is not None:
        if not isinstance(groups, int) or not 1 <= groups <= L:
            raise ValueError(f"groups must be an int in [1, {L}], got {groups!r}")
        parts = color_blocks(pilot.F, v0, w, groups)
    else:
        cands = [p for p in candidate_partitions(pilot.F, v0, w) if 1 < len(p) < L]
        cands = cands or [color_blocks(pilot.F, v0, w, min(2, L))]
        parts = min(cands, key=lambda p: predicted_cost(pilot.F, v0, p, w))
    costs = {len(parts): predicted_cost(pilot.F, v0, parts, w)}
    return ProbePlan("colored", tuple(tuple(g) for g in parts)), pilot, costs, next_probe


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
    pilot_K: int = 4,
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
        K: number of probes (an int >= 1; K >= 2 for standard errors). With ``rtol`` /
            ``atol`` it is the first round's size.
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
        probing: ``"global"`` (one HVP per probe for all blocks; the seed paper's method),
            ``"isolated"`` (one HVP per block per probe; no cross-block variance),
            ``"colored"`` (G groups of weakly coupled blocks), ``"auto"`` (a pilot of
            ``pilot_K`` block-supported probes picks the scheme with the least predicted time
            to the target; :mod:`hutchtrace.coloring`), or a ``ProbePlan``.
        groups: number of groups for ``probing="colored"`` (default: the best by the pilot).
        variance: ``"auto"`` / ``"pairwise"`` (the unbiased pairwise U-statistic, lower spread
            than the sample variance; needs the products of a round of probes in memory) or
            ``"sample"``.
        rtol, atol: adaptive stopping targets on the standard error (see module docs).
        max_K: probe budget for adaptive stopping (default 10000).
        stop_on: ``"blocks"`` (every block meets the target) or ``"total"``.
        level: confidence level of the intervals.
        curvature: ``"hessian"`` (default) or ``"ggn"`` (the generalised Gauss-Newton
            matrix ``G = J^T Lambda J``; needs a criterion form of ``loss``).
        pilot_K: probes of the pilot for ``"colored"`` / ``"auto"``.
        probe_batch: probes per batched HVP (default: from ``max_memory``).
        max_memory: byte budget for batched probes and pairwise rounds.
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
    _check_probe_kind(probe)
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
    if stop_on not in ("blocks", "total"):
        raise ValueError(f"stop_on must be 'blocks' or 'total', got {stop_on!r}")
    adaptive = rtol is not None or atol is not None
    for nm, v in (("rtol", rtol), ("atol", atol)):
        if v is not None and (not isinstance(v, (int, float)) or not v > 0):
            raise ValueError(f"{nm} must be a positive number or None, got {v!r}")
    if max_K is None:
        max_K = 10_000 if adaptive else K
    elif isinstance(max_K, bool) or not isinstance(max_K, int) or max_K < K:
        raise ValueError(f"max_K must be an int >= K ({K}), got {max_K!r}")
    if not isinstance(pilot_K, int) or pilot_K < 2:
        raise ValueError(f"pilot_K must be an int >= 2, got {pilot_K!r}")
    if seed is None:
        seed = draw_seed()
    elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63) or None, got {seed!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    inner = unwrap_model(model)
    layout = resolve_blocks(inner, blocks)
    spec = make_loss_spec(loss, data)
    if adaptive and not spec.reiterable:
        raise ValueError("adaptive stopping (rtol/atol) needs re-iterable data (a list or a DataLoader), "
                         "not a one-shot iterator")
    from . import distributed

    group = distributed.resolve_group(process_group)
    reducer = distributed.sample_sink_reducer(group) if group is not None else None
    if group is not None:
        seed = distributed.broadcast_seed(seed, group)
    single = spec.kind != "dataset" and group is None
    with PreservedState(inner):
        runner = ProbeRunner(
            inner, layout, spec, seed=seed, kind=probe, hvp=hvp, curvature=curvature,
            probe_batch=probe_batch, max_memory=max_memory, progress=progress, desc="block_traces",
        )
        plan, pilot, costs, first_probe = _resolve_plan(probing, groups, layout, runner, pilot_K, rtol, atol, 0)
        pilot_hvps = pilot.hvps if pilot is not None else 0
        pair = _pairwise_sink(variance, layout, plan, runner, probe, K, max_memory, single, group, first_probe,
                              adaptive)
        acc = _Accumulator(layout.num_blocks, layout.device())
        next_k = first_probe
        round_K = K
        hvps = 0
        rows = pilot.rows if pilot is not None else 0
        info = None
        converged = None
        while True:
            sink = SampleSink(round_K, layout, plan, single_batch=single, first_k=next_k, reducer=reducer)
            sinks = [sink] + ([pair] if pair is not None else [])
            info = runner.run(plan, range(next_k, next_k + round_K), sinks)
            hvps += info.hvps
            rows += info.rows * info.n_batches
            acc.add(sink)
            next_k += round_K
            if not adaptive:
                break
            use, _, _ = _variances(acc, pair)
            mean = acc.state.mean.cpu()
            converged, need = _target_met(mean, use, acc.K, rtol, atol, stop_on)
            done = acc.K
            if converged or done >= max_K:
                break
            grow = max(8, int(math.ceil(1.1 * need)) - done) if math.isfinite(need) else done
            round_K = int(min(max(grow, 8), max(done, 8), max_K - done))
    energy_override = pair.row_energy() if (pair is not None and not single and pair.available and group is None) else None
    blocks_est, total, samples = _estimates(layout, acc, pair, level, energy_override)
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
        warnings.warn(
            f"non-finite Hessian-vector products in blocks {bad}: they are reported as NaN "
            "(finite=False), not averaged. Check for overflow (fp16/bf16), exploding activations or "
            "a NaN loss.",
            NonFiniteWarning,
            stacklevel=2,
        )
    meta = {
        "K": acc.K,
        "seed": seed,
        "first_probe": first_probe,
        "probe": probe,
        "probing": plan.name,
        "probing_requested": probing if isinstance(probing, str) else "plan",
        "groups": [list(g) for g in plan.groups] if plan.name == "colored" else plan.num_groups,
        "curvature": curvature,
        "variance": "pairwise" if (pair is not None and pair.available) else "sample",
        "hvp": info.backbone,
        "hvp_requested": hvp,
        "hvp_timings": info.timings,
        "backend": info.backend,
        "n_batches": info.n_batches,
        "n_samples": info.total_count if spec.kind == "dataset" else None,
        "hvps": hvps + pilot_hvps,
        "hvp_rows": rows,
        "pilot_hvps": pilot_hvps,
        "loss_form": spec.kind,
        "device": str(layout.device()),
        "dtype": str(layout.tensors[0].dtype),
        "wall_time_s": time.perf_counter() - t0,
    }
    if adaptive:
        meta.update({"rtol": rtol, "atol": atol, "max_K": max_K, "converged": converged, "stop_on": stop_on})
    extras = {}
    if pilot is not None:
        extras["pilot"] = {"F": pilot.F, "v0": pilot.v0, "trace": pilot.trace, "probes": pilot.probes}
        extras["predicted_costs"] = costs
    return BlockTraces(blocks=blocks_est, total=total, samples=samples.cpu(), level=level, meta=meta,
                       extras=extras)


def _pairwise_sink(variance, layout, plan, runner, probe, K, max_memory, single, group, first_probe, adaptive):
    """The pairwise-variance sink when requested and affordable, else None."""
    if variance == "sample" or group is not None:
        return None
    if K < 2 and not adaptive:
        return None
    from .engine import default_memory_budget

    budget = max_memory if max_memory is not None else default_memory_budget(layout.device())
    P = sum(t.numel() * t.element_size() for t in layout.tensors)
    if single:
        round_size = int(min(16, budget // max(1, 2 * P)))
        accumulate = False
    else:  # dataset mode keeps every probe's accumulated product
        round_size = K if (K * 2 * P <= budget and not adaptive) else 0
        accumulate = True
    if round_size < 2:
        if variance == "pairwise":
            raise MemoryError(
                f"variance='pairwise' needs {2 * P * max(K, 2)} bytes for the products of a probe round, "
                f"over max_memory={budget}; use variance='sample' or raise max_memory"
            )
        return None
    gob = plan.group_of_block(layout.num_blocks)
    got = [gob[b] for b in layout.block_index]
    return PairwiseSink(layout, plan, lambda ks, gs: runner.make_probes(ks, gs, got), probe, round_size,
                        first_k=first_probe, accumulate=accumulate)
