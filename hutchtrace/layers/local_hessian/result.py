"""The result type of an exact local Hessian, :class:`LocalHessian` (docs/maths.md section 7).

The closed form stores ``LH_i`` block-diagonally: ``m`` unit blocks ``(q, q)`` over
``(w_k, b_k)``, ``q = n + 1``, with each block's coordinates in the dense order; the dense
paths store the ``(p_i, p_i)`` matrix. Eigenvalues of a block-diagonal ``LH_i`` are the union
of its blocks' (``m`` eigendecompositions of size ``n + 1`` instead of one of size ``p_i``),
and ``tr LH_i = sum_{r,k} A''(u_rk)(||z_r||^2 + 1)`` is the sum of the blocks' diagonals.

Example:
    >>> lh = LocalHessian("fc", ("weight",), ((1, 2),), 2, "closed_form", "tanh", "sum", 1, 1,
    ...                   2**20, blocks=torch.tensor([[[2.0, 1.0], [1.0, 2.0]]]),
    ...                   unit_coords=torch.tensor([[0, 1]]))
    >>> lh.trace(), lh.eigenvalues().tolist(), lh.dense().tolist()
    (4.0, [1.0, 3.0], [[2.0, 1.0], [1.0, 2.0]])
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..spectrum import EigenvalueSource, SpectrumSummary, spectrum_summary
from .budget import check_budget

__all__ = ["LocalHessian"]


@dataclass
class LocalHessian(EigenvalueSource):
    """An exact local Hessian ``LH_i`` (docs/maths.md section 7).

    Attributes:
        layer: the layer's name in the model (``""`` for the model itself).
        params: names (within the layer) of the trainable tensors, in coordinate order.
        shapes: their shapes. The dense coordinate order is these tensors flattened
            row-major and concatenated (Linear/Conv2d: ``W`` row-major, then ``b``).
        numel: ``p_i``.
        method: ``"closed_form"``, ``"generic"`` or ``"rows"``.
        activation: the name of ``A_i``; phi: ``"sum"``, ``"mean"`` or a callable's name.
        num_inputs: ``N``, samples in the block input (its leading dimension).
        num_rows: ``R``, rows summed by the closed form (``N`` x output positions); ``None``
            for the dense paths.
        rank_bound: closed form only: ``sum_k rank(Z~_k) = m rank([Z, 1])`` (per group for
            grouped convs), the rank ``LH_i`` has when no ``A''(u_rk)`` vanishes; at most
            ``m min(R, n+1)`` (docs/maths.md section 7). A numerical rank below it means saturated units.
        blocks: closed form only: ``(m, q, q)`` unit blocks over ``(w_k, b_k)``; ``q = n+1``.
        unit_coords: closed form only: ``(m, q)`` dense-order coordinates of each block.
        matrix: dense paths only: the ``(p_i, p_i)`` matrix.
        max_memory: the byte budget the result was computed under (``dense()`` honours it).
        finite: ``False`` when some entry is NaN/Inf (flagged with a NonFiniteWarning).
    """

    layer: str
    params: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    numel: int
    method: str
    activation: str
    phi: str
    num_inputs: int
    num_rows: int | None
    max_memory: int
    blocks: torch.Tensor | None = None
    rank_bound: int | None = None
    unit_coords: torch.Tensor | None = None
    matrix: torch.Tensor | None = None
    finite: bool = True
    _eig: torch.Tensor | None = field(default=None, repr=False)

    @property
    def is_block_diagonal(self) -> bool:
        return self.blocks is not None

    @property
    def dtype(self) -> torch.dtype:
        return (self.blocks if self.blocks is not None else self.matrix).dtype

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored representation (blocks, or the dense matrix)."""
        t = self.blocks if self.blocks is not None else self.matrix
        return t.numel() * t.element_size()

    def dense(self) -> torch.Tensor:
        """The ``(p_i, p_i)`` matrix in the generic path's coordinate order.

        For a block-diagonal result this assembles the blocks; it refuses (MemoryBudgetError)
        when ``p_i^2`` entries exceed :attr:`max_memory`.
        """
        if self.matrix is not None:
            return self.matrix
        P = self.numel
        check_budget(
            P * P * self.blocks.element_size(),
            self.max_memory,
            self.layer,
            P,
            "assembling the dense matrix from its blocks",
        )
        H = torch.zeros((P, P), dtype=self.blocks.dtype, device=self.blocks.device)
        idx = self.unit_coords
        H[idx[:, :, None], idx[:, None, :]] = self.blocks
        return H

    def eigenvalues(self) -> torch.Tensor:
        """All ``p_i`` eigenvalues, ascending (the union of the unit blocks' when block-diagonal)."""
        if self._eig is None:
            if self.blocks is not None:
                ev = torch.linalg.eigvalsh(self.blocks).reshape(-1)
            else:
                ev = torch.linalg.eigvalsh(self.matrix)
            self._eig = ev.sort().values
        return self._eig

    def diagonal(self) -> torch.Tensor:
        """The diagonal, in dense coordinate order."""
        if self.matrix is not None:
            return self.matrix.diagonal().clone()
        d = torch.zeros(self.numel, dtype=self.blocks.dtype, device=self.blocks.device)
        d[self.unit_coords.reshape(-1)] = self.blocks.diagonal(dim1=-2, dim2=-1).reshape(-1)
        return d

    def trace(self) -> float:
        """``tr LH_i`` (docs/maths.md section 7: ``sum_{r,k} A''(u_rk)(||z_r||^2 + 1)`` in the closed form)."""
        t = self.blocks if self.blocks is not None else self.matrix
        return float(t.diagonal(dim1=-2, dim2=-1).sum())

    def summary(self, **kwargs) -> SpectrumSummary:
        """:func:`hutchtrace.layers.spectrum.spectrum_summary` of this matrix (keyword args passed on)."""
        return spectrum_summary(self, **kwargs)
