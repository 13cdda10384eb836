"""Stable rank of diagonal blocks of a model: :func:`stable_rank` (docs/maths.md section 6(c)).

.. math:: D_b = \\frac{\\|M_{bb}\\|_F^2}{\\|M_{bb}\\|_2^2} \\in [1, \\operatorname{rank} M_{bb}].

The Frobenius part comes from ``K`` block-supported probes: ``E||A z_b||^2 = ||A||_F^2`` for any
isotropic probe, and the first sample is the Lanczos start vector's product ``A z``, so it is
free. ``||A||_2`` is the largest ``|Ritz value|`` of an ``m``-step Lanczos run
(:mod:`~hutchtrace.structure.spectra.krylov`): a lower bound, so ``D^`` is **biased upward**
until the top Ritz value has converged (Lanczos-20 recovers ``||.||_2`` to 4 digits on MLP
blocks). The Ritz values also give the energy fraction of the top eigenvalues, from which
:meth:`StableRank.hutchpp_recommended` applies the Hutch++ switching rule.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...core.progress import Progress
from ...estimate.engine import check_probe_count
from .hutch_plus_plus import energy_fraction
from .krylov import lanczos_lanes
from .session import _meta, _session

__all__ = ["StableRank", "stable_rank"]

_F64 = torch.float64


@dataclass
class StableRank:
    """Stable rank ``D_b = ||M_bb||_F^2 / ||M_bb||_2^2`` per block.

    Attributes:
        names; D, D_se: ``(L,)`` estimates and SEs (from the Frobenius SE only: ``||.||_2`` is
        taken as converged; until it is, ``D`` is biased upward); frobenius2, frobenius2_se:
        ``||M_bb||_F^2`` from block-supported probes; norm2: ``max|theta|`` (a lower bound on
        ``||M_bb||_2``); residual: its Ritz residual; ritz: per block, all Ritz values of the
        Lanczos run (for :meth:`energy_fraction` / :meth:`hutchpp_recommended`); meta.
    """

    names: list[str]
    D: torch.Tensor
    D_se: torch.Tensor
    frobenius2: torch.Tensor
    frobenius2_se: torch.Tensor
    norm2: torch.Tensor
    residual: torch.Tensor
    ritz: list[torch.Tensor]
    samples: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    def energy_fraction(self, k: int) -> torch.Tensor:
        """``(L,)`` fraction of ``||M_bb||_F^2`` in the ``k`` largest ``|Ritz values|``."""
        return torch.tensor([energy_fraction(r, float(f), k) for r, f in zip(self.ritz, self.frobenius2)],
                            dtype=_F64)

    def hutchpp_recommended(self, m: int) -> list[bool]:
        """Per block: would Hutch++ with ``m`` matvecs beat Hutchinson (docs/maths.md section 8 rule)?
        Reliable for ``m/3`` well below the Lanczos steps (only extreme Ritz values converge)."""
        return [bool(f > 2.0 / 3.0) for f in self.energy_fraction(m // 3)]

    def table(self) -> str:
        lines = [f"{'block':<28} {'D':>9} {'± D':>8} {'||.||_F^2':>11} {'||.||_2':>10} {'resid':>9}"]
        for b, n in enumerate(self.names):
            lines.append(f"{n[-28:]:<28} {float(self.D[b]):9.4g} {float(self.D_se[b]):8.2g} "
                         f"{float(self.frobenius2[b]):11.4g} {float(self.norm2[b]):10.4g} "
                         f"{float(self.residual[b]):9.2e}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return "StableRank\n" + self.table()


def stable_rank(
    model: nn.Module,
    loss,
    K: int = 10,
    *,
    m: int = 20,
    data=None,
    blocks="param",
    select=None,
    curvature: str = "hessian",
    seed: int | None = None,
    probe: str = "rademacher",
    hvp: str = "auto",
    probe_batch: int | None = None,
    max_memory: int | None = None,
    progress: bool | None = None,
) -> StableRank:
    """Stable rank ``D_b = ||M_bb||_F^2 / ||M_bb||_2^2`` of each diagonal block (docs/maths.md section 6(c)).

    Cost per block: ``m`` Lanczos steps plus ``K - 1`` block-supported probes (the first
    Frobenius sample is the Lanczos start vector's product).

    Example:
        >>> import torch
        >>> from hutchtrace import stable_rank
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> sr = stable_rank(net, torch.nn.CrossEntropyLoss(), K=4, data=(x, y), seed=0, select="0.weight")
        >>> sr.D.shape, bool(sr.norm2[0] > 0)
        (torch.Size([1]), True)
    """
    t0 = time.perf_counter()
    K = check_probe_count(K)
    with _session(model, loss, data, blocks, curvature, seed, probe, hvp, select, probe_batch, max_memory) as s:
        prog = Progress(None, "stable_rank", progress, unit="matvec")
        try:
            starts = [s.draw(b, 0)[0] for b in s.select]
            runs = lanczos_lanes(s.op, s.select, starts, m, on_step=prog.update)
            samples = torch.zeros((K, len(s.select)), dtype=_F64)
            for i, (z, run) in enumerate(zip(starts, runs)):
                samples[0, i] = run.first.pow(2).sum() * z.pow(2).sum()
            if K > 1:
                Z = [s.draw(b, 1, K - 1) for b in s.select]
                W = s.op.apply(s.select, Z)
                prog.update(sum(z.shape[0] for z in Z))
                for i, w in enumerate(W):
                    samples[1:, i] = w.pow(2).sum(1)
        finally:
            prog.close()
        meta = _meta(s, t0, curvature=curvature, K=K, m=m)
    fro = samples.mean(0)
    fro_se = samples.std(0) / math.sqrt(K) if K > 1 else torch.full_like(fro, math.nan)
    norm2, resid, ritz = [], [], []
    for run in runs:
        theta, _, res = run.ritz()
        j = int(theta.abs().argmax())
        norm2.append(float(theta[j].abs()))
        resid.append(float(res[j]))
        ritz.append(theta)
    norm2 = torch.tensor(norm2, dtype=_F64)
    D = fro / norm2**2
    return StableRank(names=[s.layout.block_names[b] for b in s.select], D=D, D_se=fro_se / norm2**2,
                      frobenius2=fro,
                      frobenius2_se=fro_se, norm2=norm2, residual=torch.tensor(resid, dtype=_F64), ritz=ritz,
                      samples=samples, meta=meta)
