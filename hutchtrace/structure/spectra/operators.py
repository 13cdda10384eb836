"""Multi-lane symmetric operators: the interface every spectral algorithm here runs on.

A *multi-operator* has ``sizes`` (one dimension per operator), ``matvecs`` (rows applied per
operator, for the cost report) and ``apply(ids, X)``, which maps row blocks ``X_i`` of shape
``(r_i, n)`` to ``[X_i A_{ids[i]}]`` (``= (A X_i^T)^T``, the operators being symmetric) in ONE
call. A *lane* is one recurrence (a Lanczos run, a power iteration) on one operator; all lanes
advance in lockstep, so one call serves one step of every lane.

For a model, the operator of block ``b`` is the block operator (docs/maths.md sections 6(c), 8)

.. math:: A_b : v \\mapsto (M\\,[v \\text{ on } I_b])_b = M_{bb} v, \\qquad M \\in \\{H, G\\}:

``v`` is placed on the block's coordinates, zeros elsewhere, and the block's part of one
Hessian- (or GGN-) vector product is read back (:class:`BlockOperator`, one batched product for
all lanes). :class:`DenseOperator` holds explicit matrices (tests and small problems).

Example:
    >>> import torch
    >>> op = DenseOperator([torch.eye(2), 2 * torch.eye(3)])  # stored as float64
    >>> X = [torch.ones(4, 3, dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64)]
    >>> [y.shape for y in op.apply([1, 0], X)], op.matvecs
    ([torch.Size([4, 3]), torch.Size([1, 2])], [1, 4])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...backbones.curvature_op import CurvatureProducts
from ...problem.blocks import BlockLayout

__all__ = ["BlockOperator", "DenseOperator"]

_F64 = torch.float64


class DenseOperator:
    """Explicit symmetric matrices as lanes of a multi-operator (tests and small problems).

    ``apply(ids, X)`` returns ``[X_i @ A_{ids[i]}]`` for row blocks ``X_i`` of shape ``(r, n)``.
    """

    def __init__(self, mats: Sequence[torch.Tensor]):
        self.mats = [m.to(_F64) for m in mats]
        self.sizes = [m.shape[0] for m in self.mats]
        self.matvecs = [0] * len(self.mats)

    def apply(self, ids: Sequence[int], X: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for i, x in zip(ids, X):
            self.matvecs[i] += x.shape[0]
            out.append(x @ self.mats[i])
        return out


class BlockOperator:
    """The block operators ``v -> (M [v on I_b])_b`` of a model, one lane per block.

    ``apply(ids, X)`` evaluates ``X_i`` (``(r_i, n_b)`` rows of block ``ids[i]``) for all
    ``i`` with ONE batched product of ``sum_i r_i`` rows. ``matvecs[b]`` counts rows per block.
    The product is prepared once per batch (one batch: once in all); with several batches every
    matvec sums the weighted per-batch products
    (:class:`~hutchtrace.backbones.curvature_op.CurvatureProducts`).
    """

    def __init__(self, products: CurvatureProducts, layout: BlockLayout, curvature: str):
        self.products = products
        self.layout = layout
        self.curvature = curvature
        self.sizes = [blk.numel for blk in layout.blocks]
        self.matvecs = [0] * layout.num_blocks

    def apply(self, ids: Sequence[int], X: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        lay = self.layout
        R = sum(x.shape[0] for x in X)
        bufs = [torch.zeros((R,) + tuple(t.shape), dtype=t.dtype, device=t.device) for t in lay.tensors]
        pos = 0
        spans = []
        for b, x in zip(ids, X):
            r = x.shape[0]
            off = 0
            for j in lay.tensors_of(b):
                n = lay.tensors[j].numel()
                bufs[j][pos : pos + r] = x[:, off : off + n].reshape((r,) + tuple(lay.tensors[j].shape))
                off += n
            spans.append((b, pos, r))
            pos += r
            self.matvecs[b] += r
        W = self.products.apply(bufs, (self.curvature,))[self.curvature]
        out = []
        for b, p, r in spans:
            parts = [W[j][p : p + r].reshape(r, -1) for j in lay.tensors_of(b)]
            out.append((torch.cat(parts, 1) if len(parts) > 1 else parts[0]).to(_F64))
        return out


def _apply1(op, ids: Sequence[int], vecs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """One vector per lane: ``[A_{ids[i]} vecs[i]]``."""
    if not ids:
        return []
    return [y[0] for y in op.apply(ids, [v[None] for v in vecs])]
