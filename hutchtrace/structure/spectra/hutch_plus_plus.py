"""Hutch++ trace estimates of diagonal blocks (docs/maths.md section 8, Algorithm 8.2):
:func:`hutchpp`, and the rule for when to use it (:func:`hutchpp_wins`).

With a budget of ``m`` matvecs: ``S`` (``m/3`` probes), ``Q = qr(A S)``, ``G`` the remaining
probes and ``G_perp = (I - QQ^T) G``;

.. math:: \\widehat{\\operatorname{tr}} = \\operatorname{tr}(Q^\\top A Q)
          + \\frac{1}{|G|}\\operatorname{tr}(G_\\perp^\\top A G_\\perp),

unbiased for any symmetric ``A``. It beats Hutchinson only on near-low-rank blocks: **switch
when the top-m/3 eigenvalues hold more than 2/3 of the Frobenius energy** (:func:`hutchpp_wins`,
from Ritz values); on a flat spectrum it is much worse, and Rademacher Hutchinson is nearly
exact on near-diagonal blocks, which Hutch++ destroys.
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
from .session import _meta, _session

__all__ = ["HutchppTraces", "energy_fraction", "hutchpp", "hutchpp_trace", "hutchpp_wins"]

_F64 = torch.float64


def hutchpp_trace(op, ids: Sequence[int], m: int, draw: Callable[[int, int, int], torch.Tensor],
                  on_step=None) -> list[float]:
    """Hutch++ (docs/maths.md Algorithm 8.2) on every lane with ``m`` matvecs each (``m >= 3``).

    ``draw(id, first, count)`` returns ``(count, n)`` probes; ``S`` uses probes ``0..s-1`` and
    ``G`` probes ``s..m-s-1`` with ``s = m // 3``. Returns one unbiased trace estimate per lane.
    """
    if m < 3:
        raise ValueError(f"Hutch++ needs a budget of m >= 3 matvecs, got {m}")
    s = m // 3
    g = m - 2 * s
    S = [draw(i, 0, s).to(_F64) for i in ids]
    AS = op.apply(ids, S)
    if on_step:
        on_step(s * len(ids))
    Qs = [torch.linalg.qr(y.T)[0].T for y in AS]  # rows: orthonormal basis of range(A S)
    AQ = op.apply(ids, Qs)
    if on_step:
        on_step(s * len(ids))
    Gs = [draw(i, s, g).to(_F64) for i in ids]
    Gp = [x - (x @ q.T) @ q for x, q in zip(Gs, Qs)]
    AG = op.apply(ids, Gp)
    if on_step:
        on_step(g * len(ids))
    return [float((q * aq).sum() + (gp * ag).sum() / g) for q, aq, gp, ag in zip(Qs, AQ, Gp, AG)]


def energy_fraction(eigenvalues: torch.Tensor, frobenius2: float, k: int) -> float:
    """``sum_{i <= k} theta_i^2 / ||A||_F^2`` over the ``k`` largest ``|theta|``."""
    th = torch.as_tensor(eigenvalues, dtype=_F64).abs().sort(descending=True).values
    return float((th[:k] ** 2).sum() / frobenius2)


def hutchpp_wins(eigenvalues: torch.Tensor, frobenius2: float, m: int) -> bool:
    """The switching rule of docs/maths.md section 8: Hutch++ with ``m`` matvecs beats Hutchinson when the
    top ``m/3`` eigenvalues hold more than 2/3 of ``||A||_F^2`` (Gaussian-probe criterion
    ``||A - A_{m/3}||_F^2 < ||A||_F^2 / 3``; Rademacher Hutchinson is even better on
    near-diagonal blocks). ``eigenvalues``: the top eigenvalues or Ritz values.

    Example:
        >>> hutchpp_wins(torch.tensor([10.0, 1.0, 0.1]), 101.01 + 5.0, m=3)
        True
        >>> hutchpp_wins(torch.ones(30), 100.0, m=30)
        False
    """
    return energy_fraction(eigenvalues, frobenius2, m // 3) > 2.0 / 3.0



@dataclass
class HutchppTraces:
    """Hutch++ trace estimates per block: ``estimates`` ``(reps, L)``, ``mean``, ``se`` (NaN for one rep)."""

    names: list[str]
    estimates: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def mean(self) -> torch.Tensor:
        return self.estimates.mean(0)

    @property
    def se(self) -> torch.Tensor:
        r = self.estimates.shape[0]
        return self.estimates.std(0) / math.sqrt(r) if r > 1 else torch.full((self.estimates.shape[1],), math.nan)


def hutchpp(
    model: nn.Module,
    loss,
    m: int = 30,
    *,
    reps: int = 1,
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
) -> HutchppTraces:
    """Hutch++ trace of each diagonal block with ``m`` matvecs per block and repetition.

    Use it for near-low-rank blocks only (see :func:`hutchpp_wins` and
    :meth:`StableRank.hutchpp_recommended`); independent repetitions (``reps >= 2``) give an SE.

    Example:
        >>> import torch
        >>> from hutchtrace import hutchpp
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> hutchpp(net, torch.nn.CrossEntropyLoss(), m=9, reps=2, data=(x, y), seed=0).estimates.shape
        torch.Size([2, 4])
    """
    t0 = time.perf_counter()
    reps = check_probe_count(reps)
    with _session(model, loss, data, blocks, curvature, seed, probe, hvp, select, probe_batch, max_memory) as s:
        prog = Progress(None, "hutchpp", progress, unit="matvec")
        try:
            est = torch.zeros((reps, len(s.select)), dtype=_F64)
            for r in range(reps):
                draw = lambda b, first, count, r=r: s.draw(b, r * m + first, count)
                est[r] = torch.tensor(hutchpp_trace(s.op, s.select, m, draw, on_step=prog.update), dtype=_F64)
        finally:
            prog.close()
        meta = _meta(s, t0, curvature=curvature, m=m, reps=reps)
    return HutchppTraces(names=[s.layout.block_names[b] for b in s.select], estimates=est, meta=meta)
