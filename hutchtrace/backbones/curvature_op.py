"""Curvature products ``v -> M v`` of the full (dataset-mean) loss, for several ``M`` at once.

The structure diagnostics (:mod:`hutchtrace.structure.decompose`, :mod:`hutchtrace.structure.coupling`,
:mod:`hutchtrace.structure.spectra`) need products that :class:`~hutchtrace.estimate.engine.ProbeRunner`'s
batch-outer loop cannot give: norms ``||(M z)_b||^2`` and Lanczos recurrences are not
linear in the per-batch products, so each product must be complete (summed over every
batch) before it is used::

    M v = sum_m weight_m M_m v / sum_m count_m          (M_m: the matrix of batch m)

:class:`CurvatureProducts` does exactly that. With one batch (a closure, a single
``(inputs, targets)`` pair) the backbones are prepared once and kept, so every later
product costs one HVP. With several batches every call re-iterates ``data`` (it must be
re-iterable: a list or a DataLoader), preparing each batch's backbones anew; the RNG state
of each batch is recorded on the first pass and replayed on every later pass, so dropout
masks never change between products (the operator stays one fixed matrix).

Backbones: ``"auto"`` takes the first that works from :data:`PREFERRED` (batched reverse
mode first: it builds the first-order graph once per batch), falling back when a model op
lacks the needed derivative.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..core.state import ForwardRNG, _set_rng
from ..kernels import ops
from ..problem.blocks import BlockLayout
from ..problem.loss import LossSpec
from .base import backbones_for, make_backbone

__all__ = ["PREFERRED", "CurvatureProducts", "block_rows", "probe_rows", "rows_to_block"]

PREFERRED = {
    "hessian": ("reverse-batched", "forward-vmap", "reverse", "forward"),
    "ggn": ("ggn-vmap", "ggn"),
}


class _ReplayRNG(ForwardRNG):
    """A :class:`ForwardRNG` whose start state survives the end of a pass (replayed later)."""

    def leave(self) -> None:
        if self._after is not None:
            _set_rng(self._after, self._cuda_ids)


def probe_rows(layout: BlockLayout, seed: int, kind: str, ks: Sequence[int],
               row_blocks: Sequence[int | None] | None = None, dtype=None) -> list[torch.Tensor]:
    """Per-tensor probe rows ``(R, *shape)``: row ``r`` is the counter-based probe ``z^(ks[r])``
    (the same entries :func:`hutchtrace.block_traces` draws), restricted to block
    ``row_blocks[r]`` (zeros elsewhere) unless that is ``None``."""
    R = len(ks)
    rb = list(row_blocks) if row_blocks is not None else [None] * R
    out = []
    for j, t in enumerate(layout.tensors):
        b = layout.block_index[j]
        sel = [r for r in range(R) if rb[r] is None or rb[r] == b]
        dt = dtype or t.dtype
        buf = (torch.empty if len(sel) == R else torch.zeros)((R, t.numel()), dtype=dt, device=t.device)
        i = 0
        while i < len(sel):  # runs of adjacent rows with consecutive probe indices: one kernel call
            e = i
            while e + 1 < len(sel) and sel[e + 1] == sel[e] + 1 and ks[sel[e + 1]] == ks[sel[e]] + 1:
                e += 1
            r0 = sel[i]
            ops.fill_probes_(buf[r0 : sel[e] + 1], seed, int(ks[r0]), layout.offsets[j], kind)
            i = e + 1
        out.append(buf.view((R,) + tuple(t.shape)))
    return out


def block_rows(layout: BlockLayout, b: int, V: torch.Tensor) -> list[torch.Tensor]:
    """Embed rows ``V`` ``(R, n_b)`` of block ``b`` into per-tensor rows (zeros elsewhere)."""
    R = V.shape[0]
    out = []
    pos = 0
    for j, t in enumerate(layout.tensors):
        if layout.block_index[j] == b:
            n = t.numel()
            out.append(V[:, pos : pos + n].to(t.dtype).reshape((R,) + tuple(t.shape)))
            pos += n
        else:
            out.append(torch.zeros((R,) + tuple(t.shape), dtype=t.dtype, device=t.device))
    return out


def rows_to_block(layout: BlockLayout, b: int, W: Sequence[torch.Tensor], dtype=None) -> torch.Tensor:
    """The block-``b`` part of per-tensor rows, flattened to ``(R, n_b)``."""
    parts = [W[j].reshape(W[j].shape[0], -1) for j in layout.tensors_of(b)]
    out = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
    return out.to(dtype) if dtype is not None else out


class CurvatureProducts:
    """``apply(vs) -> {curvature: M vs}`` for the loss of ``spec`` over ``layout``'s tensors.

    Args:
        model: the unwrapped model (call inside :class:`~hutchtrace.core.state.PreservedState`).
        layout: selected tensors and blocks.
        spec: the normalised loss.
        curvatures: e.g. ``("hessian",)``, ``("ggn",)`` or ``("hessian", "ggn")``.
        hvp: ``"auto"``, a backbone name, or a dict ``curvature -> name``.
        max_rows: rows per batched call (larger requests are split).

    ``products[c]`` counts the matrix-vector products (rows) done per curvature and
    ``passes`` the passes over the data.
    """

    def __init__(self, model, layout: BlockLayout, spec: LossSpec, curvatures: Sequence[str] = ("hessian",),
                 hvp="auto", max_rows: int = 32):
        self.model = model
        self.layout = layout
        self.spec = spec
        self.curvatures = tuple(curvatures)
        self.max_rows = max(1, int(max_rows))
        self._requested = {}
        for c in self.curvatures:
            names = backbones_for(c)
            want = hvp.get(c, "auto") if isinstance(hvp, dict) else hvp
            if want != "auto" and want not in names:
                raise ValueError(f"hvp for curvature={c!r} must be 'auto' or one of {names}, got {want!r}")
            self._requested[c] = want
        self.backbone: dict[str, str] = {}
        self._bb: dict = {}
        self._rngs: list[_ReplayRNG] = []
        self._persistent = False  # one batch: backbones stay prepared
        self._first_pass_done = False
        self._weights: list[float] = []
        self._total = 0.0
        self.products = {c: 0 for c in self.curvatures}
        self.passes = 0
        self.n_batches = 0
        self.output_hessian_kind: str | None = None

    # ------------------------------------------------------------------ backbones
    def _candidates(self, c: str) -> Sequence[str]:
        want = self._requested[c]
        if want != "auto":
            return (want,)
        regs = backbones_for(c)
        pref = [n for n in PREFERRED.get(c, ()) if n in regs]
        return pref + [n for n in regs if n not in pref]

    def _product(self, c: str, batch, rng, vs: list[torch.Tensor]) -> list[torch.Tensor]:
        """``M_m vs`` for curvature ``c`` on one (prepared or to-be-prepared) batch."""
        if c not in self.backbone:  # first use: pick the first candidate that works
            errors = []
            for name in self._candidates(c):
                bb = make_backbone(name, self.model, self.layout.names, self.layout.tensors, rng)
                try:
                    bb.rng = rng
                    bb.prepare(batch)
                    out = self._rows(bb, vs)
                except (RuntimeError, NotImplementedError) as exc:
                    bb.release()
                    errors.append(exc)
                    continue
                self.backbone[c] = name
                self._bb[c] = bb
                self.output_hessian_kind = getattr(bb, "output_hessian_kind", self.output_hessian_kind)
                return out
            raise errors[0]
        bb = self._bb[c]
        if bb.batch is not batch:
            bb.rng = rng
            bb.prepare(batch)
        return self._rows(bb, vs)

    def _rows(self, bb, vs: list[torch.Tensor]) -> list[torch.Tensor]:
        R = vs[0].shape[0]
        if bb.batched:
            if R <= self.max_rows:
                return list(bb.hvp(vs))
            parts = [bb.hvp([v[s : s + self.max_rows] for v in vs]) for s in range(0, R, self.max_rows)]
            return [torch.cat([p[j] for p in parts], 0) for j in range(len(vs))]
        rows = [bb.hvp([v[r] for v in vs]) for r in range(R)]
        return [torch.stack([row[j] for row in rows]) for j in range(len(vs))]

    # ------------------------------------------------------------------ products
    def apply(self, vs: Sequence[torch.Tensor],
              curvatures: Sequence[str] | None = None) -> dict[str, list[torch.Tensor]]:
        """Products of every requested curvature with the rows ``vs`` (per tensor ``(R, *shape)``)."""
        curvs = tuple(curvatures) if curvatures is not None else self.curvatures
        vs = list(vs)
        R = vs[0].shape[0]
        if self._persistent:
            batch, rng, w = self._single
            out = {c: self._product(c, batch, rng, vs) for c in curvs}
            for c in curvs:
                self.products[c] += R
            if w != 1.0:
                out = {c: [x * w for x in ws] for c, ws in out.items()}
            return out
        acc: dict[str, list[torch.Tensor] | None] = {c: None for c in curvs}
        total = 0.0
        n = 0
        self.passes += 1
        for m, batch in enumerate(self.spec.batches()):
            n += 1
            if not self._first_pass_done:
                rng = _ReplayRNG([self.layout.device()])
                rng.start_batch()
                self._rngs.append(rng)
                self._weights.append(batch.weight)
            elif m >= len(self._rngs):
                raise RuntimeError("data yielded more batches than on the first pass; it must be re-iterable "
                                   "with the same batches every time")
            rng = self._rngs[m]
            for c in curvs:
                prod = self._product(c, batch, rng, vs)
                if acc[c] is None:
                    acc[c] = [p * batch.weight for p in prod]
                else:
                    for a, p in zip(acc[c], prod):
                        a.add_(p, alpha=batch.weight)
            total += batch.count
            if not self._first_pass_done:
                rng.leave()
            if self.n_batches == 0 and m == 0 and self.spec.kind != "dataset":
                # one batch: keep everything prepared for every later product
                self._persistent = True
                self._single = (batch, rng, batch.weight / batch.count)
                break
            for c in curvs:
                self._bb[c].release()
        if not self._first_pass_done:
            self.n_batches = n
            self._total = total
            self._first_pass_done = True
            if n == 1 and self.spec.kind == "dataset" and not self._persistent:
                # a dataset of one batch: also keep it prepared (re-iteration would rebuild it)
                self._persistent = True
                self._single = (batch, rng, batch.weight / total)
                for c in curvs:
                    self._bb[c].prepare(batch)
        for c in curvs:
            self.products[c] += R
        return {c: [a / total for a in acc[c]] for c in curvs}

    def close(self) -> None:
        """Release the backbones; leave the global RNG where one pass would have left it."""
        for bb in self._bb.values():
            bb.release()
        self._persistent = False
        if self._rngs:
            self._rngs[-1].leave()

    def __enter__(self) -> CurvatureProducts:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def total_count(self) -> float:
        return self._total

    def describe(self) -> dict:
        return {"backbones": dict(self.backbone), "products": dict(self.products), "passes": self.passes,
                "n_batches": self.n_batches}
