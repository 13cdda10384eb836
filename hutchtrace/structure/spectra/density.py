"""Spectral density of diagonal blocks by stochastic Lanczos quadrature (SLQ, docs/maths.md
section 8, Algorithm 8.1): :func:`spectral_density`.

``n_v`` Lanczos runs of ``m`` steps from probes ``z_l / ||z_l||``
(:mod:`~hutchtrace.structure.spectra.krylov`). With ``T_m = U diag(theta) U^T`` and
``tau_j = U[0, j]^2``, ``||z||^2 sum_j tau_j f(theta_j)`` estimates ``z^T f(A) z`` and is
**exactly** ``z^T A^p z`` for ``p <= 2m - 1`` (Gauss quadrature), so polynomial traces inherit
Hutchinson's unbiasedness. The density is

.. math:: \\varphi(t) = \\frac{1}{n_v}\\sum_l \\sum_j \\frac{\\|z_l\\|^2}{n}\\,\\tau_j^{(l)}
          \\,\\mathcal N(t;\\, \\theta_j^{(l)}, \\sigma^2).

Cost: ``n_v * m`` matvecs per block, all blocks and vectors in lockstep.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...core.progress import Progress
from ...estimate.engine import check_probe_count
from .krylov import lanczos_lanes
from .session import _meta, _session

__all__ = ["SpectralDensity", "slq", "spectral_density"]

_F64 = torch.float64


def slq(op, ids: Sequence[int], starts: Sequence[torch.Tensor], m: int, on_step=None):
    """Stochastic Lanczos quadrature nodes and weights, one lane per start vector.

    Returns a list of ``(theta, tau, ||z||^2)``: Ritz values, ``tau_j = U[0, j]^2`` (summing to 1)
    and the squared norm of the start ``z``; ``||z||^2 sum_j tau_j f(theta_j)`` estimates
    ``z^T f(A) z`` (exact for polynomials of degree ``<= 2 * steps - 1``).
    """
    runs = lanczos_lanes(op, ids, starts, m, on_step=on_step)
    out = []
    for z, run in zip(starts, runs):
        theta, U = torch.linalg.eigh(run.tridiagonal())
        out.append((theta, U[0] ** 2, float(z.to(_F64).pow(2).sum())))
    return out



@dataclass
class SpectralDensity:
    """SLQ output per block: nodes ``theta`` and weights ``tau`` of ``n_v`` Lanczos runs.

    Attributes:
        names, numel; nodes, weights: per block, lists of ``n_v`` tensors (``tau`` sums to 1 per
        run); norms2: per block, ``(n_v,)`` squared norms ``||z_l||^2`` of the start probes; meta.
    """

    names: list[str]
    numel: list[int]
    nodes: list[list[torch.Tensor]]
    weights: list[list[torch.Tensor]]
    norms2: list[torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    def _b(self, block) -> int:
        return block if isinstance(block, int) else self.names.index(block)

    def samples(self, block, f: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``(n_v,)`` per-vector estimates ``||z_l||^2 sum_j tau_j f(theta_j)`` of ``tr f(A)``."""
        b = self._b(block)
        return torch.stack([nz * (tau * f(th)).sum() for th, tau, nz in
                            zip(self.nodes[b], self.weights[b], self.norms2[b])])

    def trace(self, block, f: Callable[[torch.Tensor], torch.Tensor] = lambda x: x) -> tuple[float, float]:
        """``(estimate, SE)`` of ``tr f(M_bb)``: the mean over the ``n_v`` vectors and its SE."""
        x = self.samples(block, f)
        se = float(x.std() / math.sqrt(x.numel())) if x.numel() > 1 else math.nan
        return float(x.mean()), se

    def moment(self, block, p: int) -> tuple[float, float]:
        """``(estimate, SE)`` of ``tr M_bb^p``; exact per vector for ``p <= 2m - 1``."""
        return self.trace(block, lambda x: x**p)

    def extremes(self, block) -> tuple[float, float]:
        """Smallest and largest Ritz value over all runs (inner bounds of the spectrum)."""
        b = self._b(block)
        return float(min(t.min() for t in self.nodes[b])), float(max(t.max() for t in self.nodes[b]))

    def density(self, block, grid: torch.Tensor | None = None, sigma: float | None = None,
                points: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
        """``(grid, phi)``: Gaussian-smoothed spectral density (integrates to ~1).

        ``sigma`` defaults to 1 % of the Ritz range; the default grid spans the Ritz range
        padded by ``4 sigma``.
        """
        b = self._b(block)
        lo, hi = self.extremes(b)
        if sigma is None:
            sigma = max(hi - lo, 1e-12 * max(abs(lo), abs(hi), 1.0)) / 100
        if grid is None:
            grid = torch.linspace(lo - 4 * sigma, hi + 4 * sigma, points, dtype=_F64)
        grid = torch.as_tensor(grid, dtype=_F64)
        n = self.numel[b]
        nodes = torch.cat(self.nodes[b])
        w = torch.cat([tau * nz / n for tau, nz in zip(self.weights[b], self.norms2[b])]) / len(self.nodes[b])
        k = torch.exp(-0.5 * ((grid[:, None] - nodes[None, :]) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
        return grid, k @ w


def spectral_density(
    model: nn.Module,
    loss,
    *,
    n_v: int = 10,
    m: int = 40,
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
) -> SpectralDensity:
    """Spectral density of each diagonal block by stochastic Lanczos quadrature (docs/maths.md Algorithm 8.1).

    Cost: ``n_v * m`` matvecs per block (all blocks and vectors in lockstep).

    Example:
        >>> import torch
        >>> from hutchtrace import spectral_density
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> sd = spectral_density(net, torch.nn.CrossEntropyLoss(), n_v=4, m=10, data=(x, y), seed=0)
        >>> grid, phi = sd.density("0.weight")
        >>> abs(float(phi.sum() * (grid[1] - grid[0])) - 1) < 1e-3
        True
    """
    t0 = time.perf_counter()
    n_v = check_probe_count(n_v)
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"m (Lanczos steps) must be a positive int, got {m!r}")
    with _session(model, loss, data, blocks, curvature, seed, probe, hvp, select, probe_batch, max_memory) as s:
        prog = Progress(None, "spectral_density", progress, unit="matvec")
        try:
            ids = [b for b in s.select for _ in range(n_v)]
            starts = [s.draw(b, 0, n_v)[l] for b in s.select for l in range(n_v)]
            out = slq(s.op, ids, starts, m, on_step=prog.update)
        finally:
            prog.close()
        meta = _meta(s, t0, curvature=curvature, n_v=n_v, m=m)
    names = [s.layout.block_names[b] for b in s.select]
    nodes, weights, norms = [], [], []
    for i in range(len(s.select)):
        part = out[i * n_v : (i + 1) * n_v]
        nodes.append([p[0] for p in part])
        weights.append([p[1] for p in part])
        norms.append(torch.tensor([p[2] for p in part], dtype=_F64))
    return SpectralDensity(names=names, numel=[s.layout.blocks[b].numel for b in s.select], nodes=nodes,
                           weights=weights, norms2=norms, meta=meta)
