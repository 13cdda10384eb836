"""Probe noise vs mini-batch noise, and the critical probe count K* (docs/maths.md section 3).

With batches B drawn i.i.d., ``tau(B) = tr H_B,bb`` and ``sigma^2(B) = Var(t_b | B)``, the
mean of K probes on one batch has (law of total variance)

.. math:: \\operatorname{Var}(\\bar t_K) = \\frac{\\mathbb E_B \\sigma^2(B)}{K} + \\operatorname{Var}_B \\tau(B)
          = \\operatorname{Var}_B\\tau \\,(1 + K^*/K),\\qquad K^* = \\frac{\\mathbb E_B\\sigma^2}{\\operatorname{Var}_B\\tau}.

Beyond ``K ~ 3 K*`` more probes cut the variance by at most another 1.33x: the batch is the
floor. ANOVA over ``M`` batches with ``K >= 2`` probes each (``t_mk``)::

    s_w^2 = sum_m sum_k (t_mk - tbar_m)^2 / (M (K - 1))      E = E_B sigma^2        (unbiased)
    s_b^2 = sum_m (tbar_m - tbar)^2 / (M - 1)                E = Var_B tau + E sigma^2 / K
    V_B   = s_b^2 - s_w^2 / K                                E = Var_B tau          (unbiased)
    K*    = s_w^2 / V_B                                      (a ratio: consistent, not unbiased)

Uncertainties come from a bootstrap over batches. When ``V_B <= 0`` only the lower bound
``K* >= s_w^2 / (V_B + 2 SE(V_B))`` is reported. ``K*`` grows with the batch size and is
often far above the seed paper's [5, 10] for small blocks under global probing.
Recommended: ``K`` in ``[K*, 3 K*]`` when the batch is free; ``K_opt = sqrt(K* c_B / c_z)``
for a fixed budget with cost ``c_B`` per batch and ``c_z`` per HVP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.errors import DataFormatError

__all__ = ["VarianceDecomposition", "BlockDecomposition", "variance_decomposition", "anova"]


@dataclass(frozen=True)
class BlockDecomposition:
    """Per-block ANOVA result.

    Attributes:
        name: block name (``"total"`` for the per-probe total).
        mean: grand mean of the samples (estimates the population trace ``E_B tau``).
        probe_variance: ``s_w^2``, estimate of ``E_B sigma^2`` (per-probe variance).
        batch_variance: ``V_B``, estimate of ``Var_B tau`` (may be negative).
        k_star: ``K*`` estimate (``inf`` when ``V_B <= 0``).
        k_star_lower: lower confidence bound for ``K*`` (from the bootstrap).
        k_star_ci: bootstrap 90 % interval of ``K*`` (percentiles 5 and 95).
        recommended_K: ``ceil(K*)`` .. ``ceil(3 K*)``: the range where more probes stop paying.
        probe_variance_se, batch_variance_se: bootstrap standard errors.
    """

    name: str
    mean: float
    probe_variance: float
    batch_variance: float
    k_star: float
    k_star_lower: float
    k_star_ci: tuple[float, float]
    recommended_K: tuple[int, int] | None
    probe_variance_se: float
    batch_variance_se: float


@dataclass
class VarianceDecomposition:
    """The result of :func:`variance_decomposition`: per-block ANOVA plus the raw ``M x K x (L+1)``
    samples and metadata."""

    blocks: list[BlockDecomposition]
    total: BlockDecomposition
    samples: torch.Tensor
    meta: dict = field(default_factory=dict)

    def __getitem__(self, name: str) -> BlockDecomposition:
        for b in self.blocks + [self.total]:
            if b.name == name:
                return b
        raise KeyError(name)

    def table(self) -> str:
        head = f"{'block':<24} {'E sigma^2':>11} {'Var_B tau':>11} {'K*':>9} {'K* 90% CI':>19} {'recommended K':>14}"
        lines = [head, "-" * len(head)]
        for b in self.blocks + [self.total]:
            rec = f"{b.recommended_K[0]}-{b.recommended_K[1]}" if b.recommended_K else f">={b.k_star_lower:.0f}"
            lines.append(
                f"{b.name[:24]:<24} {b.probe_variance:11.4g} {b.batch_variance:11.4g} {b.k_star:9.3g} "
                f"[{b.k_star_ci[0]:8.3g},{b.k_star_ci[1]:8.3g}] {rec:>14}"
            )
        m = self.meta
        lines.append(f"M={m.get('n_batches')} batches x K={m.get('K')} probes, probing={m.get('probing')}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return "VarianceDecomposition\n" + self.table()

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame([b.__dict__ for b in self.blocks + [self.total]]).set_index("name")


def anova(t: torch.Tensor) -> dict:
    """ANOVA components of samples ``t`` of shape ``(M, K, ...)`` (M batches x K probes).

    Returns ``mean``, ``s_w2``, ``s_b2``, ``v_b`` (= s_b2 - s_w2 / K) and ``k_star``.
    """
    M, K = t.shape[0], t.shape[1]
    if M < 2 or K < 2:
        raise ValueError(f"the ANOVA needs at least 2 batches and 2 probes per batch, got M={M}, K={K}")
    tbar_m = t.mean(1)
    s_w2 = ((t - tbar_m.unsqueeze(1)) ** 2).sum((0, 1)) / (M * (K - 1))
    s_b2 = tbar_m.var(0, unbiased=True)
    v_b = s_b2 - s_w2 / K
    k_star = torch.where(v_b > 0, s_w2 / v_b.clamp_min(1e-300), torch.full_like(v_b, math.inf))
    return {"mean": t.mean((0, 1)), "s_w2": s_w2, "s_b2": s_b2, "v_b": v_b, "k_star": k_star}


def _bootstrap(t: torch.Tensor, reps: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    M = t.shape[0]
    out = {"s_w2": [], "v_b": [], "k_star": []}
    for _ in range(reps):
        idx = torch.randint(0, M, (M,), generator=g)
        a = anova(t[idx])
        for key in out:
            out[key].append(a[key])
    return {k: torch.stack(v) for k, v in out.items()}


def variance_decomposition(
    model: nn.Module,
    loss,
    data,
    K: int = 8,
    n_batches: int = 30,
    *,
    blocks="param",
    probing="global",
    probe: str = "rademacher",
    seed: int | None = None,
    hvp: str = "auto",
    bootstrap: int = 500,
    progress: bool | None = None,
) -> VarianceDecomposition:
    """Split the variance of block-trace estimates into probe noise and mini-batch noise.

    Runs ``K`` independent probes on each of ``n_batches`` batches drawn from ``data`` (an
    iterable of ``(inputs, targets)`` batches; a DataLoader with ``shuffle=True`` gives
    i.i.d.-like batches) and applies the ANOVA of the module docstring per block and to the
    per-probe total.

    Args:
        model, loss: as in :func:`hutchtrace.block_traces` (``loss`` a criterion).
        data: an iterable of batches; the first ``n_batches`` are used.
        K: probes per batch (>= 2).
        n_batches: number of batches M (>= 2; 30-100 is typical: the K-hat* SE shrinks like 1/sqrt(M), docs/maths.md section 3).
        blocks, probing, probe, hvp: passed to :func:`~hutchtrace.block_traces`.
        seed: probe seed of the first batch; each later batch uses a fresh key derived from
            the previous one (SplitMix64), so probes are independent across batches.
        bootstrap: bootstrap replicates over batches for the uncertainties.

    Returns:
        :class:`VarianceDecomposition`.

    Example:
        >>> from hutchtrace import zoo
        >>> model, crit, (x, y) = zoo.make_mlp(n=64)
        >>> batches = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 64, 8)]
        >>> vd = variance_decomposition(model, crit, batches, K=4, n_batches=8, seed=0, bootstrap=50)
        >>> len(vd.blocks)
        6
    """
    from ..core.progress import Progress
    from ..core.validate import resolve_seed
    from ..estimate.estimator import block_traces

    if isinstance(K, bool) or not isinstance(K, int) or K < 2:
        raise ValueError(f"K must be an int >= 2 (the within-batch variance needs 2 probes), got {K!r}")
    if isinstance(n_batches, bool) or not isinstance(n_batches, int) or n_batches < 2:
        raise ValueError(f"n_batches must be an int >= 2, got {n_batches!r}")
    seed = resolve_seed(seed)
    first_seed = seed
    samples = []
    names = None
    prog = Progress(n_batches, "variance_decomposition", progress, unit="batch")
    used_probing = None
    try:
        for m, batch in enumerate(data):
            if m >= n_batches:
                break
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise DataFormatError(f"batch {m} is not an (inputs, targets) pair")
            res = block_traces(model, loss, K=K, data=tuple(batch), blocks=blocks, probing=probing, probe=probe,
                               seed=seed, hvp=hvp, variance="sample", progress=False)
            samples.append(torch.cat([res.samples, res.samples.sum(1, keepdim=True)], 1))
            names = res.names
            used_probing = res.meta["probing"]
            seed = _next_seed(seed)
            prog.update(1)
    finally:
        prog.close()
    if len(samples) < n_batches:
        raise DataFormatError(f"data yielded {len(samples)} batches, fewer than n_batches={n_batches}")
    t = torch.stack(samples)  # (M, K, L+1)
    a = anova(t)
    bs = _bootstrap(t, bootstrap, seed & 0xFFFFFFFF) if bootstrap else None
    out = []
    for j in range(t.shape[2]):
        name = names[j] if j < len(names) else "total"
        vb = float(a["v_b"][j])
        sw = float(a["s_w2"][j])
        if bs is not None:
            vb_se = float(bs["v_b"][:, j].std())
            sw_se = float(bs["s_w2"][:, j].std())
            ks = torch.sort(bs["k_star"][:, j]).values  # may hold inf (V_B <= 0 in a replicate)
            lo_q = float(ks[int(0.05 * (len(ks) - 1))])
            hi_q = float(ks[int(math.ceil(0.95 * (len(ks) - 1)))])
        else:
            vb_se = sw_se = math.nan
            lo_q = hi_q = math.nan
        kstar = float(a["k_star"][j])
        lower = sw / (vb + 2 * vb_se) if (vb + 2 * vb_se) > 0 else 0.0
        rec = (max(1, math.ceil(kstar)), max(1, math.ceil(3 * kstar))) if math.isfinite(kstar) else None
        out.append(BlockDecomposition(name=name, mean=float(a["mean"][j]), probe_variance=sw, batch_variance=vb,
                                      k_star=kstar, k_star_lower=lower, k_star_ci=(lo_q, hi_q), recommended_K=rec,
                                      probe_variance_se=sw_se, batch_variance_se=vb_se))
    meta = {"K": K, "n_batches": len(samples), "probing": used_probing, "probe": probe, "bootstrap": bootstrap,
            "seed": first_seed}
    return VarianceDecomposition(blocks=out[:-1], total=out[-1], samples=t, meta=meta)


def _next_seed(seed: int) -> int:
    """A new key for the next batch's probes (SplitMix64 step: distinct, well-mixed keys)."""
    z = (seed + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & ((1 << 63) - 1)
