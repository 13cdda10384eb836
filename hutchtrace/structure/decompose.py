"""``decompose``: per-block traces of the Hessian, its Gauss-Newton part and its tensor part,
all from the same probes, and the GN-gap.

For a criterion loss ``l = C(f(x; theta), y)`` (docs/maths.md section 5)

.. math:: H = G + T,\\qquad G = \\frac1N\\sum_n J_n^\\top\\Lambda_n J_n,\\qquad
          T = \\frac1N\\sum_n\\sum_k r_{nk}\\nabla^2_\\theta f_k(x_n),

``Lambda_n = d^2 C/df^2`` and ``r_nk = dC/df_k``. Each probe ``z`` costs one HVP and one
GGN-vector product and gives, for every block ``b``,

.. math:: h_b = z_b^\\top (Hz)_b,\\quad g_b = z_b^\\top (Gz)_b,\\quad
          h_b - g_b = z_b^\\top (Tz)_b,

unbiased for ``tr H_bb``, ``tr G_bb`` and ``tr T_bb``. Because ``h_b`` and ``g_b`` share the
probe (common random numbers), ``Var(h_b - g_b)`` is Theorem 1.1 applied to ``T``, usually far
below ``Var h_b + Var g_b``; the standard error of ``tr T_bb`` is that of the paired
differences. The same products give the row energies ``E||(Mz)_b||^2 = ||M_{b,:}||_F^2`` for
``M = H, G, T``.

GN-gaps (docs/maths.md section 5):

* trace gap ``gamma_b^tr = tr T_bb / |tr H_bb|``, estimated by the ratio of means
  ``sum_k (h_b - g_b) / |sum_k h_b|`` with the delta-method SE of docs/maths.md section 4,
  ``SE = sqrt((s_x^2 - 2 R s_xy + R^2 s_y^2) / K) / |y_bar|`` (``x = h - g``, ``y = h``,
  ``R = x_bar / y_bar``);
* row gap ``gamma_b^row = ||T_{b,:}||_F / ||H_{b,:}||_F``, estimated by
  ``sqrt(sum_k ||(Tz)_b||^2 / sum_k ||(Hz)_b||^2)`` (a ratio estimator: consistent, with an
  O(1/K) bias), SE by the delta method on the ratio, halved relative to ``gamma``.

The row gap is the default: in piecewise-linear networks (ReLU, leaky ReLU, max-pool, linear
and conv layers, residual adds; no normalisation, attention or gating) every diagonal block of
``T`` has zero trace -- ``diag T = 0`` -- so the trace gap is identically 0, while the
cross-layer blocks of ``T`` are not 0 (docs/maths.md section 10). The output layer always has
``T_LL = 0``, and the output bias has a zero ``T`` row.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..backbones.curvature_op import CurvatureProducts, probe_rows
from ..core.errors import NonFiniteWarning
from ..core.progress import Progress
from ..core.state import PreservedState
from ..core.validate import check_level, check_model, check_probe_kind, resolve_seed
from ..estimate.engine import check_probe_count, default_memory_budget
from ..estimate.result import BlockEstimate, BlockTraces
from ..estimate.stats import mean_se_ci
from ..kernels import ops
from ..problem.blocks import BlockLayout, resolve_blocks, unwrap_model
from ..problem.loss import make_loss_spec

__all__ = ["Decomposition", "decompose", "ratio_of_means", "traces_from_samples"]



def ratio_of_means(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``R = x_bar / y_bar`` column-wise and its delta-method SE (docs/maths.md section 4).

    ``SE(R) = sqrt((s_x^2 - 2 R s_xy + R^2 s_y^2) / K) / |y_bar|`` from ``K`` paired samples
    (rows of ``x``, ``y``); NaN for ``K < 2``.
    """
    K = x.shape[0]
    xm, ym = x.mean(0), y.mean(0)
    R = xm / ym
    if K < 2:
        return R, torch.full_like(R, math.nan)
    dx, dy = x - xm, y - ym
    sxx = (dx * dx).sum(0) / (K - 1)
    syy = (dy * dy).sum(0) / (K - 1)
    sxy = (dx * dy).sum(0) / (K - 1)
    var = (sxx - 2 * R * sxy + R * R * syy).clamp_min(0) / K
    return R, var.sqrt() / ym.abs()


def traces_from_samples(layout: BlockLayout, samples: torch.Tensor, energy: torch.Tensor | None, level: float,
                        meta: dict) -> BlockTraces:
    """A :class:`~hutchtrace.estimate.result.BlockTraces` from per-probe samples ``(K, L)`` (the total
    from the per-probe sums, so its SE includes every cross-block covariance)."""
    K = samples.shape[0]
    cols = torch.cat([samples, samples.sum(1, keepdim=True)], 1)
    mean = cols.mean(0)
    var = cols.var(0) if K > 1 else torch.full_like(mean, math.nan)
    se, lo, hi = mean_se_ci(mean, var, K, level)
    finite = torch.isfinite(cols).all(0)
    en = energy.mean(0) if energy is not None else None
    blocks = []
    for b, blk in enumerate(layout.blocks):
        ok = bool(finite[b])
        blocks.append(BlockEstimate(
            name=blk.name, params=blk.params, aliases=blk.aliases, numel=blk.numel,
            mean=float(mean[b]) if ok else math.nan, se=float(se[b]) if ok else math.nan,
            ci=(float(lo[b]), float(hi[b])) if ok else (math.nan, math.nan),
            variance=float(var[b]) if ok else math.nan, sample_variance=float(var[b]) if ok else math.nan,
            row_energy=(float(en[b]) if (en is not None and ok) else None), finite=ok,
        ))
    ok = bool(finite[:-1].all())
    total = BlockEstimate(
        name="total", params=tuple(p for blk in layout.blocks for p in blk.params), aliases=(),
        numel=layout.numel, mean=float(mean[-1]) if ok else math.nan, se=float(se[-1]) if ok else math.nan,
        ci=(float(lo[-1]), float(hi[-1])) if ok else (math.nan, math.nan),
        variance=float(var[-1]) if ok else math.nan, sample_variance=float(var[-1]) if ok else math.nan,
        finite=ok,
    )
    return BlockTraces(blocks=blocks, total=total, samples=samples, level=level, meta=dict(meta))


@dataclass
class Decomposition:
    """Per-block ``tr H_bb = tr G_bb + tr T_bb`` and the GN-gaps (see the module docstring).

    Attributes:
        hessian, ggn, tensor: :class:`~hutchtrace.estimate.result.BlockTraces` of ``tr H_bb``,
            ``tr G_bb`` and ``tr T_bb`` (samples ``h``, ``g``, ``h - g`` of the same probes;
            ``row_energy`` estimates ``||M_{b,:}||_F^2``).
        gap_trace, gap_trace_se: ``(L,)`` trace GN-gap ``tr T_bb / |tr H_bb|`` and its SE.
        gap_row, gap_row_se: ``(L,)`` row GN-gap ``||T_{b,:}||_F / ||H_{b,:}||_F`` and its SE.
        energy: ``{"hessian", "ggn", "tensor"}`` -> ``(K, L)`` samples of ``||(Mz)_b||^2``.
        meta: K, seed, probe, backbones, wall time, ...
    """

    hessian: BlockTraces
    ggn: BlockTraces
    tensor: BlockTraces
    gap_trace: torch.Tensor
    gap_trace_se: torch.Tensor
    gap_row: torch.Tensor
    gap_row_se: torch.Tensor
    energy: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return self.hessian.names

    @property
    def K(self) -> int:
        return self.hessian.K

    def gap(self, kind: str = "row") -> torch.Tensor:
        """``(L,)`` GN-gaps: ``"row"`` (default) or ``"trace"``."""
        if kind == "row":
            return self.gap_row
        if kind == "trace":
            return self.gap_trace
        raise ValueError(f"kind must be 'row' or 'trace', got {kind!r}")

    def __getitem__(self, key: int | str) -> dict:
        """One block's numbers as a dict (by index or name)."""
        b = key if isinstance(key, int) else self.names.index(self.hessian[key].name)
        h, g, t = self.hessian.blocks[b], self.ggn.blocks[b], self.tensor.blocks[b]
        return {"block": h.name, "numel": h.numel, "tr_H": h.mean, "se_H": h.se, "tr_G": g.mean, "se_G": g.se,
                "tr_T": t.mean, "se_T": t.se, "ci_T": t.ci, "gap_trace": float(self.gap_trace[b]),
                "gap_trace_se": float(self.gap_trace_se[b]), "gap_row": float(self.gap_row[b]),
                "gap_row_se": float(self.gap_row_se[b]), "row_H": h.row_energy, "row_G": g.row_energy,
                "row_T": t.row_energy}

    def table(self) -> str:
        """Plain-text table: tr H, tr G, tr T (with SEs) and both gaps per block."""
        head = (f"{'block':<24} {'tr H':>10} {'±':>8} {'tr G':>10} {'±':>8} {'tr T':>10} {'±':>8} "
                f"{'gap_tr':>8} {'gap_row':>8}")
        lines = [head, "-" * len(head)]
        for b in range(len(self.names)):
            r = self[b]
            name = r["block"] if len(r["block"]) <= 24 else "…" + r["block"][-23:]
            lines.append(f"{name:<24} {r['tr_H']:10.4g} {r['se_H']:8.2g} {r['tr_G']:10.4g} {r['se_G']:8.2g} "
                         f"{r['tr_T']:10.4g} {r['se_T']:8.2g} {r['gap_trace']:8.3f} {r['gap_row']:8.3f}")
        h, g, t = self.hessian.total, self.ggn.total, self.tensor.total
        lines.append(f"{'total':<24} {h.mean:10.4g} {h.se:8.2g} {g.mean:10.4g} {g.se:8.2g} "
                     f"{t.mean:10.4g} {t.se:8.2g}")
        m = self.meta
        lines.append(f"K={m.get('K')} probes ({m.get('probe')}), hvp={m.get('hvp')}, ggn={m.get('ggn')}, "
                     f"seed={m.get('seed')}, {m.get('wall_time_s', math.nan):.3g} s")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Decomposition(L={len(self.names)}, K={self.K})\n" + self.table()

    def to_dataframe(self):
        """A pandas DataFrame, one row per block (needs pandas)."""
        try:
            import pandas as pd
        except ImportError as exc:  # pragma: no cover - depends on environment
            raise ImportError("to_dataframe() needs pandas: pip install pandas") from exc
        return pd.DataFrame([self[b] for b in range(len(self.names))]).set_index("block")

    def to_dict(self) -> dict:
        """JSON-serialisable summary (per-block rows and meta)."""
        return {"blocks": [self[b] for b in range(len(self.names))], "meta": dict(self.meta)}


def decompose(
    model: nn.Module,
    loss,
    K: int = 10,
    *,
    data=None,
    blocks="param",
    seed: int | None = None,
    probe: str = "rademacher",
    hvp: str = "auto",
    ggn: str = "auto",
    level: float = 0.95,
    probe_batch: int | None = None,
    max_memory: int | None = None,
    progress: bool | None = None,
) -> Decomposition:
    """Per-block ``tr H_bb``, ``tr G_bb``, ``tr T_bb`` and the GN-gaps from the same ``K`` probes.

    Args:
        model: any ``nn.Module``.
        loss: a criterion ``loss(outputs, targets)`` (the Gauss-Newton split needs the outputs).
        K: number of probes; each costs one HVP and one GGN-vector product.
        data: ``(inputs, targets)`` or an iterable of such batches (then a re-iterable one:
            every probe chunk sums its products over all batches).
        blocks: as in :func:`hutchtrace.block_traces`.
        seed: probe seed (the probes are exactly those of ``block_traces`` with the same
            seed, so ``result.hessian`` equals ``block_traces(..., seed=seed).samples``).
        probe: ``"rademacher"`` or ``"gaussian"``.
        hvp: Hessian backbone (``"auto"`` or a name registered in :mod:`hutchtrace.backbones.base`).
        ggn: GGN backbone (``"auto"``, ``"ggn"`` or ``"ggn-vmap"``).
        level: confidence level of the intervals.
        probe_batch: probes per batched product (default: from ``max_memory``).
        max_memory: byte budget for batched probes.
        progress: progress display (``None``: only for long runs).

    Returns:
        :class:`Decomposition`.

    Example:
        >>> import torch
        >>> from hutchtrace import decompose
        >>> g = torch.Generator().manual_seed(0)
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> x, y = torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g)
        >>> d = decompose(net, torch.nn.CrossEntropyLoss(), K=20, data=(x, y), seed=0)
        >>> d.gap_row[-1].item() < 1e-3   # output bias: its T row is 0 (float32 rounding here)
        True
        >>> bool(d.gap_row[0] > 0)    # ReLU: tr T_bb = 0 in expectation, but T has cross-layer blocks
        True
    """
    t0 = time.perf_counter()
    K = check_probe_count(K)
    check_probe_kind(probe)
    check_level(level)
    seed = resolve_seed(seed)
    check_model(model)
    inner = unwrap_model(model)
    layout = resolve_blocks(inner, blocks)
    spec = make_loss_spec(loss, data)
    L = layout.num_blocks
    rows = _rows_per_call(layout, probe_batch, max_memory)
    dev = layout.device()
    h = torch.zeros(K, L, dtype=torch.float64, device=dev)
    g, t, eh, eg, et = (torch.zeros_like(h) for _ in range(5))
    prog = Progress(K, "decompose", progress, unit="probe")
    with PreservedState(inner):
        op = CurvatureProducts(inner, layout, spec, ("hessian", "ggn"), hvp={"hessian": hvp, "ggn": ggn},
                               max_rows=rows)
        try:
            for s in range(0, K, rows):
                ks = list(range(s, min(K, s + rows)))
                z = probe_rows(layout, seed, probe, ks)
                prod = op.apply(z)
                wH, wG = prod["hessian"], prod["ggn"]
                wT = [a - b for a, b in zip(wH, wG)]
                sl = slice(ks[0], ks[-1] + 1)
                h[sl], eh[sl] = ops.block_dot(wH, z, layout.block_index, L, batched=True)
                g[sl], eg[sl] = ops.block_dot(wG, z, layout.block_index, L, batched=True)
                t[sl], et[sl] = ops.block_dot(wT, z, layout.block_index, L, batched=True)
                prog.update(len(ks))
        finally:
            op.close()
            prog.close()
    h, g, t, eh, eg, et = (x.cpu() for x in (h, g, t, eh, eg, et))
    info = op.describe()
    meta = {
        "K": K, "seed": seed, "probe": probe, "level": level,
        "hvp": info["backbones"].get("hessian"), "ggn": info["backbones"].get("ggn"),
        "output_hessian": op.output_hessian_kind, "products": info["products"], "passes": info["passes"],
        "n_batches": info["n_batches"], "loss_form": spec.kind, "device": str(dev),
        "dtype": str(layout.tensors[0].dtype), "wall_time_s": time.perf_counter() - t0,
    }
    res_h = traces_from_samples(layout, h, eh, level, {**meta, "curvature": "hessian"})
    res_g = traces_from_samples(layout, g, eg, level, {**meta, "curvature": "ggn"})
    res_t = traces_from_samples(layout, t, et, level, {**meta, "curvature": "tensor"})
    gtr, gtr_se = ratio_of_means(t, h)
    gtr = gtr * torch.sign(h.mean(0))  # tr T / |tr H|
    rho, rho_se = ratio_of_means(et, eh)
    grow = rho.clamp_min(0).sqrt()
    grow_se = torch.where(grow > 0, rho_se / (2 * grow), torch.zeros_like(grow))
    bad = [n for n, ok in zip(layout.block_names, torch.isfinite(h).all(0) & torch.isfinite(g).all(0)) if not ok]
    if bad:
        warnings.warn(
            f"non-finite Hessian or GGN products in blocks {bad}: they are reported as NaN (finite=False), "
            "not averaged. Check for overflow (fp16/bf16), exploding activations or a NaN loss.",
            NonFiniteWarning, stacklevel=2,
        )
    return Decomposition(hessian=res_h, ggn=res_g, tensor=res_t, gap_trace=gtr, gap_trace_se=gtr_se,
                         gap_row=grow, gap_row_se=grow_se, energy={"hessian": eh, "ggn": eg, "tensor": et},
                         meta=meta)


def _rows_per_call(layout: BlockLayout, probe_batch: int | None, max_memory: int | None) -> int:
    """Probe rows per batched product: ``probe_batch`` or what ``max_memory`` allows (<= 32)."""
    if probe_batch is not None:
        if isinstance(probe_batch, bool) or not isinstance(probe_batch, int) or probe_batch < 1:
            raise ValueError(f"probe_batch must be a positive int or None, got {probe_batch!r}")
        return probe_batch
    budget = max_memory if max_memory is not None else default_memory_budget(layout.device())
    param_bytes = sum(t.numel() * t.element_size() for t in layout.tensors)
    # a row holds the probe, two products, their difference and the backbones' intermediates
    return int(max(1, min(32, budget // max(1, 10 * param_bytes))))
