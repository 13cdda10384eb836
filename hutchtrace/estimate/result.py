"""The result of :func:`hutchtrace.block_traces`.

A :class:`BlockTraces` holds, per block, the mean of the K per-probe samples (the trace
estimate), its standard error and a Student-t confidence interval, plus the raw K x L
samples; the total trace is estimated from the per-probe totals ``sum_b t_b^(k)``, so
its standard error includes every cross-block covariance ``Cov(t_b, t_c) = ||H_bc||_F^2``
instead of assuming independent blocks.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = ["BlockEstimate", "BlockTraces"]


@dataclass(frozen=True)
class BlockEstimate:
    """Trace estimate of one Hessian block.

    Attributes:
        name: block name; params: canonical tensor names; aliases: other (tied) names;
        numel: block size n_b; mean: estimate of tr H_bb; se: its standard error;
        ci: (low, high) confidence interval at ``BlockTraces.level``;
        variance: per-probe variance estimate used for ``se`` (``se = sqrt(variance/K)``):
        the pairwise one when available and positive, else the sample variance;
        sample_variance: the ordinary sample variance s_b^2 of the K samples;
        pairwise_variance: the pairwise U-statistic estimate (unbiased; may be negative),
        or None when not computed;
        row_energy: mean of ||(Hz)_b||^2, an estimate of ||H_{b,:}||_F^2 (NOT the
        variance; ``docs/maths.md`` section 10), or None when not available;
        finite: False when some probe gave a NaN/Inf sample (mean is then NaN).
    """

    name: str
    params: tuple[str, ...]
    aliases: tuple[str, ...]
    numel: int
    mean: float
    se: float
    ci: tuple[float, float]
    variance: float
    sample_variance: float
    pairwise_variance: float | None = None
    row_energy: float | None = None
    finite: bool = True

    @property
    def rel_se(self) -> float:
        """``se / |mean|`` (inf when the mean is 0)."""
        return self.se / abs(self.mean) if self.mean != 0 else math.inf


def _fmt(x: float | None, width: int = 11) -> str:
    if x is None:
        return "-".rjust(width)
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return str(x).rjust(width)
    return f"{x:{width}.4g}"


@dataclass
class BlockTraces:
    """Per-block Hessian trace estimates with standard errors.

    Attributes:
        blocks: one :class:`BlockEstimate` per block, in layout order.
        total: a :class:`BlockEstimate` named ``"total"`` for ``sum_b tr H_bb``.
        samples: ``(K, L)`` float64 tensor of per-probe samples ``t_b^(k)``.
        level: confidence level of the intervals.
        meta: K, seed, probe kind, probing scheme, HVP backbone, backend, wall time, ...
    """

    blocks: list[BlockEstimate]
    total: BlockEstimate
    samples: torch.Tensor
    level: float = 0.95
    meta: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.blocks)

    def __iter__(self):
        return iter(self.blocks)

    def __getitem__(self, key: int | str) -> BlockEstimate:
        if isinstance(key, int):
            return self.blocks[key]
        for b in self.blocks:
            if b.name == key or key in b.aliases:
                return b
        if key == "total":
            return self.total
        raise KeyError(f"no block named {key!r}; blocks are {self.names}")

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.blocks]

    @property
    def means(self) -> torch.Tensor:
        """``(L,)`` float64 tensor of trace estimates."""
        return torch.tensor([b.mean for b in self.blocks], dtype=torch.float64)

    @property
    def ses(self) -> torch.Tensor:
        """``(L,)`` float64 tensor of standard errors."""
        return torch.tensor([b.se for b in self.blocks], dtype=torch.float64)

    @property
    def K(self) -> int:
        return int(self.samples.shape[0])

    @property
    def nonfinite_blocks(self) -> list[str]:
        return [b.name for b in self.blocks if not b.finite]

    # ------------------------------------------------------------------ output
    def table(self, max_rows: int | None = None) -> str:
        """A plain-text table: block, numel, trace, SE, CI, relative SE."""
        lvl = int(round(self.level * 100))
        head = f"{'block':<28} {'numel':>9} {'trace':>11} {'SE':>11} {f'{lvl}% CI low':>11} {'high':>11} {'rel SE':>8}"
        lines = [head, "-" * len(head)]
        rows = self.blocks if max_rows is None else self.blocks[:max_rows]
        for b in rows + [self.total]:
            name = b.name if len(b.name) <= 28 else "…" + b.name[-27:]
            flag = "" if b.finite else "  NON-FINITE"
            rel = f"{b.rel_se:8.1%}" if math.isfinite(b.rel_se) else f"{'inf':>8}"
            lines.append(
                f"{name:<28} {b.numel:>9} {_fmt(b.mean)} {_fmt(b.se)} {_fmt(b.ci[0])} {_fmt(b.ci[1])} {rel}{flag}"
            )
            if b is rows[-1] and len(rows) < len(self.blocks):
                lines.append(f"... {len(self.blocks) - len(rows)} more blocks")
        m = self.meta
        lines.append(
            f"K={m.get('K')} probes ({m.get('probe')}), probing={m.get('probing')}, hvp={m.get('hvp')}, "
            f"backend={m.get('backend')}, seed={m.get('seed')}, {m.get('wall_time_s', float('nan')):.3g} s"
        )
        return "\n".join(lines)

    def __repr__(self) -> str:
        m = self.meta
        return (
            f"BlockTraces(L={len(self.blocks)}, K={self.K}, probing={m.get('probing')!r}, hvp={m.get('hvp')!r}, "
            f"backend={m.get('backend')!r}, total={self.total.mean:.6g} ± {self.total.se:.3g})\n" + self.table(max_rows=20)
        )

    def to_dict(self) -> dict:
        """JSON-serialisable dict (samples as nested lists)."""
        return {
            "blocks": [asdict(b) for b in self.blocks],
            "total": asdict(self.total),
            "level": self.level,
            "meta": {k: v for k, v in self.meta.items()},
            "samples": self.samples.tolist(),
        }

    def to_dataframe(self):
        """A pandas DataFrame with one row per block plus ``total`` (needs pandas)."""
        try:
            import pandas as pd
        except ImportError as exc:  # pragma: no cover - depends on environment
            raise ImportError("to_dataframe() needs pandas: pip install pandas") from exc
        rows = []
        for b in self.blocks + [self.total]:
            rows.append(
                {
                    "block": b.name,
                    "numel": b.numel,
                    "trace": b.mean,
                    "se": b.se,
                    "ci_low": b.ci[0],
                    "ci_high": b.ci[1],
                    "variance": b.variance,
                    "sample_variance": b.sample_variance,
                    "pairwise_variance": b.pairwise_variance,
                    "row_energy": b.row_energy,
                    "finite": b.finite,
                    "params": ",".join(b.params),
                    "aliases": ",".join(b.aliases),
                }
            )
        return pd.DataFrame(rows).set_index("block")
