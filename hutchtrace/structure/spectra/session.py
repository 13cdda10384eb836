"""From a model to block operators: what every model-level spectral analysis does first.

:func:`_session` checks the arguments, resolves the blocks and the loss, prepares the
curvature products once (:class:`~hutchtrace.backbones.curvature_op.CurvatureProducts`, the
model's state preserved throughout) and yields a :class:`_Session`: the
:class:`~hutchtrace.structure.spectra.operators.BlockOperator` of the selected blocks and
``draw``, the counter-based probes restricted to one block (``z_b`` for probe index ``k`` is
the block-``b`` part of the same global probe :func:`~hutchtrace.block_traces` would draw,
docs/maths.md section 1). :func:`_meta` is the shared part of every result's ``meta``.

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 2))
    >>> data = (torch.randn(4, 3), torch.randn(4, 2))
    >>> with _session(net, torch.nn.MSELoss(), data, "param", "hessian", 0, "rademacher", "auto", "0.bias",
    ...               None, None) as s:
    ...     s.select, s.draw(1, 0, 3).shape
    ([1], torch.Size([3, 2]))
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from ...backbones.curvature_op import CurvatureProducts, probe_rows
from ...core.state import PreservedState
from ...core.validate import check_model, check_probe_kind, resolve_seed
from ...problem.blocks import BlockLayout, resolve_blocks, unwrap_model
from ...problem.loss import make_loss_spec
from ..decompose import _rows_per_call
from .operators import BlockOperator

__all__: list[str] = []

_F64 = torch.float64


@dataclass
class _Session:
    layout: BlockLayout
    op: BlockOperator
    products: CurvatureProducts
    seed: int
    probe: str
    select: list[int]
    spec_kind: str

    def draw(self, b: int, index: int, count: int = 1) -> torch.Tensor:
        """``(count, n_b)`` float64 counter-based probes ``index .. index+count-1`` on block ``b``."""
        z = probe_rows(self.layout, self.seed, self.probe, list(range(index, index + count)), [b] * count)
        parts = [z[j].reshape(count, -1) for j in self.layout.tensors_of(b)]
        return (torch.cat(parts, 1) if len(parts) > 1 else parts[0]).to(_F64)


def _select(layout: BlockLayout, select) -> list[int]:
    if select is None:
        return list(range(layout.num_blocks))
    items = [select] if isinstance(select, (str, int)) else list(select)
    out = []
    for it in items:
        if isinstance(it, int) and not isinstance(it, bool):
            if not 0 <= it < layout.num_blocks:
                raise ValueError(f"block index {it} out of range (L={layout.num_blocks})")
            out.append(it)
        else:
            out.append(layout.index(it))
    return out


@contextlib.contextmanager
def _session(model, loss, data, blocks, curvature, seed, probe, hvp, select, probe_batch, max_memory):
    if curvature not in ("hessian", "ggn"):
        raise ValueError(f"curvature must be 'hessian' or 'ggn', got {curvature!r}")
    check_probe_kind(probe)
    seed = resolve_seed(seed)
    check_model(model)
    inner = unwrap_model(model)
    layout = resolve_blocks(inner, blocks)
    spec = make_loss_spec(loss, data)
    sel = _select(layout, select)
    rows = _rows_per_call(layout, probe_batch, max_memory)
    with PreservedState(inner):
        prods = CurvatureProducts(inner, layout, spec, (curvature,), hvp=hvp, max_rows=rows)
        try:
            yield _Session(layout, BlockOperator(prods, layout, curvature), prods, seed, probe, sel, spec.kind)
        finally:
            prods.close()


def _meta(s: _Session, t0: float, **kw) -> dict:
    info = s.products.describe()
    return {"seed": s.seed, "probe": s.probe, "hvp": next(iter(info["backbones"].values()), None),
            "matvecs": {s.layout.block_names[b]: s.op.matvecs[b] for b in s.select}, "passes": info["passes"],
            "n_batches": info["n_batches"], "loss_form": s.spec_kind, "wall_time_s": time.perf_counter() - t0,
            **kw}
