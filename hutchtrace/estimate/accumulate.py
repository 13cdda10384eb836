"""Accumulating per-probe samples into estimates, across rounds and probing plans.

A *segment* is a run of probes under one :class:`~hutchtrace.estimate.probing.ProbePlan` (the
``auto`` / ``colored`` schemes have pilot segments, then the chosen plan's segment and a new
segment at every change of plan; adaptive stopping adds rounds to a segment). Every sample of
every segment is unbiased for ``tr H_bb``, so the pooled mean over the ``K = sum_s K_s``
samples of the segments in the estimate (:func:`estimate_segments`) is unbiased, with

.. math:: \\operatorname{Var}(\\bar t_b) = \\frac{1}{K^2} \\sum_s K_s V_{s,b},

``V_{s,b}`` the per-probe variance under segment s's plan (its pairwise U-statistic estimate
when available and positive, else its sample variance). Intervals use Student t with
Welch-Satterthwaite degrees of freedom ``(sum_s a_s)^2 / sum_s a_s^2/(K_s - 1)``,
``a_s = K_s V_s / K^2`` (``K - 1`` for a single segment).
"""

from __future__ import annotations

import math

import torch

from ..problem.blocks import BlockLayout
from .engine import RowBatch, Sink
from .probing import ProbePlan
from .result import BlockEstimate
from .stats import WelfordState, t_quantile
from .variance import PairwiseSink

__all__ = ["SampleSink", "Segment", "combine", "build_estimates"]


class SampleSink(Sink):
    """Accumulates per-probe block samples ``t_b^(k)`` and row energies ``||(Hz)_b||^2``.

    The row energy is split by where the probe lived: ``energy[k, b] = sum_g ||(H z_g)_b||^2``
    over all groups g of the plan, an unbiased estimate of ``||H_{b,:}||_F^2``; ``own[k, b]``
    keeps the term of b's own group, ``||(H z_{g(b)})_b||^2``, unbiased for
    ``sum_{c in g(b)} ||H_bc||_F^2``. Their difference measures the coupling of b to the
    blocks outside its group, which a global probe would add to b's variance
    (:meth:`Segment.cross_energy`).

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
        self.own = torch.zeros((K, L), dtype=torch.float64, device=dev)
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
            self.own[sl].add_(rb.sq[r : e + 1] * self.masks[rb.gs[r]], alpha=rb.weight**2)
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
        self.own /= total_count**2
        self.state.update(torch.cat([self.samples, self.samples.sum(1, keepdim=True)], 1))


class Segment:
    """The rounds run under one plan: samples, merged Welford state, optional pairwise sink."""

    def __init__(self, plan: ProbePlan, L: int, device, pair: PairwiseSink | None, first_probe: int):
        self.plan = plan
        self.pair = pair
        self.first_probe = first_probe
        self.samples: list[torch.Tensor] = []
        self.energy: list[torch.Tensor] = []
        self.own: list[torch.Tensor] = []
        self.energy_valid = True
        self.state = WelfordState.zeros(L + 1, device=device)
        self.global_count: float | None = None  # set under data parallelism

    def add(self, sink: SampleSink) -> None:
        self.global_count = getattr(sink, "global_count", self.global_count)
        self.samples.append(sink.samples)
        self.energy.append(sink.energy)
        self.own.append(sink.own)
        self.energy_valid &= sink.energy_valid
        self.state.merge(sink.state)  # Chan's merge of the round into the segment

    @property
    def K(self) -> int:
        return sum(s.shape[0] for s in self.samples)

    @property
    def next_probe(self) -> int:
        return self.first_probe + self.K

    def cross_energy(self) -> torch.Tensor | None:
        """Per block, the mean of ``||(H z_g)_b||^2`` over the groups g other than b's own:
        unbiased for ``X_b = sum_{c not in g(b)} ||H_bc||_F^2`` ((L,), on the CPU), or None
        when the row energies are not valid (several batches).

        It is what a global probe adds to b's per-probe variance under this plan (``docs/maths.md``
        section 6: ``V_global,b = V_plan,b + X_b``), so the current plan's measured variance
        predicts the global scheme's without running it.
        """
        if not self.energy_valid or not self.samples:
            return None
        cross = torch.cat(self.energy) - torch.cat(self.own)
        return cross.mean(0).cpu()

    def variances(self):
        """Per-probe ``(used, sample, pairwise or None)`` variances, (L+1,) each, on the CPU."""
        sample = self.state.variance().cpu()
        if self.pair is not None and self.pair.available:
            pw = torch.cat([self.pair.block_variance().cpu(),
                            torch.tensor([self.pair.total_variance()], dtype=torch.float64)])
            return torch.where(pw > 0, pw, sample), sample, pw
        return sample, sample, None


def estimate_segments(segments: list[Segment]) -> list[Segment]:
    """The segments whose samples make the estimate: all but a random-partition pilot.

    Beyond 16 blocks the pilot probes random partitions of the blocks into 16 groups
    (:func:`hutchtrace.estimate.coloring.pilot_plans`), whose samples carry the cross-block variance of
    about ``L / 16`` blocks each: counted once each they can dominate the pooled variance, and
    weighting them by a variance predicted or measured from the same handful of samples
    under-reports the error (measured on a BERT: one pilot pair that agreed by chance took the
    weight, |z| = 8.8 against an independent estimate). The later segments do not depend on
    the pilot's samples except through the plan chosen, so leaving the pilot out keeps the
    estimate unbiased and its error bar honest; its rows are counted in
    ``meta["pilot_rows"]``. A block-supported pilot (16 blocks or fewer) is kept: its samples
    are isolated-probing samples, the least variable per block.
    """
    kept = [s for s in segments if s.plan.name != "random"]
    return kept or list(segments)


def combine(segments: list[Segment]) -> dict:
    """Pooled mean, variance of the mean and degrees of freedom over segments (module docs)."""
    segs = [s for s in segments if s.K > 0]
    K = sum(s.K for s in segs)
    mean = sum(s.state.mean.cpu() * s.K for s in segs) / K
    used = [s.variances() for s in segs]
    var_mean = sum(u[0] * s.K for u, s in zip(used, segs)) / K**2
    var_mean_sample = sum(u[1] * s.K for u, s in zip(used, segs)) / K**2
    pw = None
    if all(u[2] is not None for u in used):
        pw = sum(u[2] * s.K for u, s in zip(used, segs)) / K**2 * K
    if len(segs) == 1:
        df = torch.full_like(mean, K - 1.0)
    else:
        a = [u[0] * s.K / K**2 for u, s in zip(used, segs)]
        num = sum(a) ** 2
        den = sum(ai**2 / max(s.K - 1, 1) for ai, s in zip(a, segs))
        df = torch.where(den > 0, num / den.clamp_min(1e-300), torch.full_like(mean, K - 1.0))
    return {"K": K, "mean": mean, "var_mean": var_mean, "var_mean_sample": var_mean_sample, "pairwise": pw,
            "df": df}


def target_met(comb: dict, rtol, atol, stop_on: str) -> tuple[bool, float]:
    """Whether every block (or the total) has SE <= max(rtol |mean|, atol); and the K needed.

    ``atol`` defaults to ``0.01 * rtol * max_b |mean_b|``: blocks below 1 % of the largest
    trace are held to 1 % of its tolerance, so a zero or negative trace neither stops the
    loop early (the rule uses |mean|) nor keeps it running forever.
    """
    mean, var_mean, K = comb["mean"], comb["var_mean"], comb["K"]
    se = torch.sqrt(var_mean.clamp_min(0))
    blocks_mean = mean[:-1]
    big = float(blocks_mean.abs().max()) if blocks_mean.numel() else 0.0
    r = rtol or 0.0
    a = atol if atol is not None else 0.01 * r * big
    eps = torch.maximum(r * mean.abs(), torch.full_like(mean, a))
    cols = slice(-1, None) if stop_on == "total" else slice(0, -1)
    ok = bool((se[cols] <= eps[cols]).all()) and bool(torch.isfinite(se[cols]).all())
    need = float((var_mean[cols].clamp_min(0) * K / eps[cols].clamp_min(1e-300) ** 2).max())
    return ok, need


def build_estimates(layout: BlockLayout, segments: list[Segment], level: float, energy_override=None):
    """``(blocks, total, samples)`` from the segments (``variance`` fields are per probe)."""
    comb = combine(segments)
    K = comb["K"]
    samples = torch.cat([torch.cat(s.samples, 0) for s in segments if s.K > 0], 0)
    mean = comb["mean"]
    se = torch.sqrt(comb["var_mean"].clamp_min(0)) if K > 1 else torch.full_like(mean, math.nan)
    q = torch.tensor([t_quantile(int(round(float(d))), level) if float(d) >= 1 else math.nan
                      for d in comb["df"]], dtype=torch.float64)
    lo, hi = mean - q * se, mean + q * se
    used = comb["var_mean"] * K
    sample_var = comb["var_mean_sample"] * K
    pw = comb["pairwise"]
    if energy_override is not None:
        energy = energy_override.cpu()
    elif all(s.energy_valid for s in segments if s.K > 0):
        energy = torch.cat([torch.cat(s.energy, 0) for s in segments if s.K > 0], 0).mean(0).cpu()
    else:
        energy = None
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
            variance=float(used[col]) if ok else math.nan,
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
