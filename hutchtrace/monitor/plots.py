"""Plots of the curvature-structure diagnostics (needs matplotlib: ``pip install hutchtrace[plot]``).

* :func:`plot_coupling`: block x block heat map of a :class:`~hutchtrace.structure.coupling.Coupling`
  (resonance ``R``, ``||M_bc||_F^2`` on a log scale, or its share of the row energy).
* :func:`plot_decomposition`: per-block bars of ``tr H_bb``, ``tr G_bb`` and ``tr T_bb`` with
  confidence-interval error bars, from a :class:`~hutchtrace.structure.decompose.Decomposition`.
* :func:`plot_spectral_density`: SLQ densities of some blocks.

Every function draws into ``ax`` (a new figure when ``None``) and returns the axes.
"""

from __future__ import annotations

import math

import torch

__all__ = ["plot_coupling", "plot_decomposition", "plot_spectral_density"]


def _plt():
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError(
            "hutchtrace.monitor.plots needs matplotlib, an optional dependency: pip install matplotlib "
            "(or pip install 'hutchtrace[plot]')"
        ) from exc
    return plt


def _short(name: str, width: int = 18) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


def plot_coupling(coupling, quantity: str = "R", ax=None, annotate: bool | None = None, cmap: str = "viridis"):
    """Heat map of the block coupling.

    Args:
        coupling: a :class:`~hutchtrace.structure.coupling.Coupling`.
        quantity: ``"R"`` (resonance, not clipped: values > 1 are possible for ``H``),
            ``"F"`` (``log10 ||M_bc||_F^2``) or ``"share"`` (``F_bc / rho_b``: each row sums to 1).
        ax: matplotlib axes (default: a new figure).
        annotate: write the values in the cells (default: when ``L <= 12``).

    Returns:
        The axes.
    """
    plt = _plt()
    if quantity == "R":
        M, label = coupling.R, "resonance R_bc"
    elif quantity == "F":
        M, label = torch.log10(coupling.F.clamp_min(1e-300)), "log10 ||M_bc||_F^2"
        M = torch.where(torch.isfinite(coupling.F) & (coupling.F > 0), M, torch.full_like(M, math.nan))
    elif quantity == "share":
        M, label = coupling.F / coupling.rho[:, None], "F_bc / ||M_b,:||_F^2"
    else:
        raise ValueError(f"quantity must be 'R', 'F' or 'share', got {quantity!r}")
    if ax is None:
        L = len(coupling.names)
        side = max(3.5, 0.45 * L)
        _, ax = plt.subplots(figsize=(side + 1.6, side + 1.0))
    data = M.detach().cpu().double().numpy()
    im = ax.imshow(data, cmap=cmap)
    ax.figure.colorbar(im, ax=ax, label=label, fraction=0.046, pad=0.04)
    names = [_short(n) for n in coupling.names]
    ax.set_xticks(range(len(names)), names, rotation=90)
    ax.set_yticks(range(len(names)), names)
    ax.set_title(f"{coupling.curvature} coupling ({coupling.mode}, K={coupling.K})")
    if annotate is None:
        annotate = len(names) <= 12
    if annotate:
        for b in range(len(names)):
            for c in range(len(names)):
                v = data[b, c]
                if math.isfinite(v):
                    ax.text(c, b, f"{v:.2g}", ha="center", va="center", fontsize=7, color="w")
    return ax


def plot_decomposition(decomp, ax=None, errors: str = "ci"):
    """Grouped bars of ``tr H_bb``, ``tr G_bb`` and ``tr T_bb`` per block with error bars.

    Args:
        decomp: a :class:`~hutchtrace.structure.decompose.Decomposition`.
        ax: matplotlib axes (default: a new figure).
        errors: ``"ci"`` (confidence intervals at the result's level) or ``"se"``.

    Returns:
        The axes.
    """
    plt = _plt()
    if errors not in ("ci", "se"):
        raise ValueError(f"errors must be 'ci' or 'se', got {errors!r}")
    names = [_short(n) for n in decomp.names]
    L = len(names)
    if ax is None:
        _, ax = plt.subplots(figsize=(max(5.0, 0.9 * L + 2), 4))
    width = 0.27
    for i, (res, label) in enumerate([(decomp.hessian, "tr H_bb"), (decomp.ggn, "tr G_bb"),
                                      (decomp.tensor, "tr T_bb")]):
        means = [b.mean for b in res.blocks]
        if errors == "se":
            err = [[b.se for b in res.blocks]] * 2
        else:
            err = [[b.mean - b.ci[0] for b in res.blocks], [b.ci[1] - b.mean for b in res.blocks]]
        ax.bar([x + (i - 1) * width for x in range(L)], means, width, yerr=err, capsize=2, label=label)
    ax.axhline(0.0, color="k", lw=0.6)
    ax.set_xticks(range(L), names, rotation=45, ha="right")
    lvl = int(round(decomp.hessian.level * 100))
    ax.set_ylabel("trace" + (f" ({lvl}% CI)" if errors == "ci" else " (± SE)"))
    ax.set_title(f"H = G + T per block (K={decomp.K})")
    ax.legend()
    return ax


def plot_spectral_density(density, blocks=None, ax=None, sigma: float | None = None, log: bool = True,
                          points: int = 1000):
    """SLQ spectral densities of the chosen blocks (default: all) on one axes.

    All curves share one grid and one kernel width (default: 1 % of the joint Ritz range), so
    they are comparable. ``log=True`` plots ``log10(phi + 1e-8)``, as usual for Hessian spectra.
    """
    plt = _plt()
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    names = list(blocks or density.names)
    ext = [density.extremes(n) for n in names]
    lo, hi = min(e[0] for e in ext), max(e[1] for e in ext)
    if sigma is None:
        sigma = max(hi - lo, 1e-12 * max(abs(lo), abs(hi), 1.0)) / 100
    grid = torch.linspace(lo - 4 * sigma, hi + 4 * sigma, points, dtype=torch.float64)
    for name in names:
        grid, phi = density.density(name, grid=grid, sigma=sigma)
        y = torch.log10(phi + 1e-8) if log else phi
        ax.plot(grid.numpy(), y.numpy(), label=_short(name, 24))
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("log10 density" if log else "density")
    ax.legend(fontsize=7)
    return ax
