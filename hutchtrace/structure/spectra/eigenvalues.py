"""Extreme eigenvalues of diagonal blocks of a model: :func:`block_eigenvalues`.

The top-``k`` eigenvalues of every selected block operator ``A_b = M_bb`` (``M = H`` or ``G``,
docs/maths.md section 6(c)) in one of three orders (``which``: ``"LM"`` largest magnitude,
``"LA"`` largest, ``"SA"`` smallest, i.e. the most negative curvature), by thick-restart
Lanczos with locking (:mod:`~hutchtrace.structure.spectra.thick_restart`, the default) or by
power iteration with deflation (:mod:`~hutchtrace.structure.spectra.power`). All blocks advance
in lockstep: one batched curvature product serves one step of every block. Each value comes
with its residual ``||A y - theta y||``, an error bound on it, and a convergence flag.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...core.progress import Progress
from .eigenlanes import WHICH, _EigLane
from .power import power_iteration
from .session import _meta, _Session, _session
from .thick_restart import eigsh

__all__ = ["BlockEigenvalues", "block_eigenvalues"]

_F64 = torch.float64


@dataclass
class BlockEigenvalues:
    """Extreme eigenvalues of diagonal blocks ``M_bb``.

    Attributes:
        names: the analysed blocks; eigenvalues / residuals / converged: per block, ``(k,)``
        tensors in ``which`` order (residual: ``||A y - theta y||``, an error bound on theta);
        which, method, meta.
    """

    names: list[str]
    eigenvalues: list[torch.Tensor]
    residuals: list[torch.Tensor]
    converged: list[torch.Tensor]
    which: str
    method: str
    meta: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: int | str) -> torch.Tensor:
        return self.eigenvalues[key if isinstance(key, int) else self.names.index(key)]

    @property
    def norm2(self) -> torch.Tensor:
        """``(L,)`` max ``|eigenvalue|`` found per block (``||M_bb||_2`` when ``which="LM"``)."""
        return torch.tensor([float(e.abs().max()) for e in self.eigenvalues], dtype=_F64)

    def table(self) -> str:
        lines = [f"{'block':<28} {'eigenvalues (' + self.which + ')':<48} {'max resid':>10} conv"]
        for n, e, r, c in zip(self.names, self.eigenvalues, self.residuals, self.converged):
            ev = " ".join(f"{float(x):.5g}" for x in e[:6]) + (" ..." if e.numel() > 6 else "")
            lines.append(f"{n[-28:]:<28} {ev:<48} {float(r.max()):10.2e} {int(c.sum())}/{c.numel()}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"BlockEigenvalues(which={self.which!r}, method={self.method!r})\n" + self.table()


def block_eigenvalues(
    model: nn.Module,
    loss,
    k: int = 1,
    *,
    data=None,
    blocks="param",
    select=None,
    which: str = "LM",
    method: str = "lanczos",
    m: int | None = None,
    tol: float = 1e-6,
    max_restarts: int = 5,
    iters: int = 100,
    curvature: str = "hessian",
    seed: int | None = None,
    probe: str = "rademacher",
    hvp: str = "auto",
    probe_batch: int | None = None,
    max_memory: int | None = None,
    progress: bool | None = None,
) -> BlockEigenvalues:
    """Top-``k`` eigenvalues of each diagonal block ``M_bb`` (``M = H`` or ``G``).

    Args:
        model, loss, data, blocks, curvature, seed, probe, hvp: as in ``block_traces``.
        k: eigenvalues per block (at most the block size).
        select: block names/indices to analyse (default: all), each costs its own matvecs.
        which: ``"LM"`` (largest magnitude), ``"LA"`` (largest), ``"SA"`` (smallest, i.e. the
            most negative curvature).
        method: ``"lanczos"`` (default; ``m`` steps per round with full re-orthogonalisation,
            deflation by locking, up to ``max_restarts`` extra rounds) or ``"power"``
            (``iters`` products per eigenvalue at most).
        m: Lanczos steps per round (default ``max(20, 3k)``, capped at the block size).
        tol: convergence tolerance (relative Ritz residual, or relative change of the
            Rayleigh quotient for power iteration).

    Returns:
        :class:`BlockEigenvalues`.

    Example:
        >>> import torch
        >>> from hutchtrace import block_eigenvalues
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> ev = block_eigenvalues(net, torch.nn.CrossEntropyLoss(), k=2, data=(x, y), select="2.weight", seed=0)
        >>> ev["2.weight"].shape
        torch.Size([2])
    """
    t0 = time.perf_counter()
    _check_arguments(k, which, method)
    m = m or max(20, 3 * k)
    with _session(model, loss, data, blocks, curvature, seed, probe, hvp, select, probe_batch, max_memory) as s:
        prog = Progress(None, "block_eigenvalues", progress, unit="matvec")
        try:
            lanes = _solve(s, k, which, method, m=m, tol=tol, max_restarts=max_restarts, iters=iters,
                           on_step=prog.update)
        finally:
            prog.close()
        meta = _meta(s, t0, curvature=curvature, k=k, m=m, tol=tol)
    return _result(s, lanes, which, method, meta)


def _check_arguments(k, which: str, method: str) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if method not in ("lanczos", "power"):
        raise ValueError(f"method must be 'lanczos' or 'power', got {method!r}")
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")


def _solve(s: _Session, k: int, which: str, method: str, *, m: int, tol: float, max_restarts: int, iters: int,
           on_step) -> list[_EigLane]:
    """Run the chosen solver on the session's selected blocks, one lane per block."""
    draw = lambda b, r: s.draw(b, r)[0]  # the solvers draw one start vector at a time
    if method == "lanczos":
        return eigsh(s.op, s.select, k, which, draw, m=m, tol=tol, max_restarts=max_restarts, on_step=on_step)
    return power_iteration(s.op, s.select, k, which, draw, iters=iters, tol=tol, on_step=on_step)


def _result(s: _Session, lanes: list[_EigLane], which: str, method: str, meta: dict) -> BlockEigenvalues:
    return BlockEigenvalues(
        names=[s.layout.block_names[b] for b in s.select],
        eigenvalues=[torch.tensor(ln.vals, dtype=_F64) for ln in lanes],
        residuals=[torch.tensor(ln.res, dtype=_F64) for ln in lanes],
        converged=[torch.tensor(ln.conv, dtype=torch.bool) for ln in lanes],
        which=which, method=method, meta=meta,
    )


