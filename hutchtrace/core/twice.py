r"""Twice-differentiable stand-ins for ops whose second derivative PyTorch gets wrong or lacks.

A Hessian-vector product differentiates the model's backward pass. Surveying torch.nn's
activations, timm's and transformers' activation layers, a few torchvision ops and the
torchvision / timm model families on torch 2.14 (``bench/second_order_survey.py``, results in
``bench/results/second_order_survey.md``) found two ops with an equal formulation that fixes
them:

* ``hardsigmoid``: ``aten::hardsigmoid_backward`` has neither a derivative (double backward)
  nor a forward-mode derivative (forward-over-reverse), so no backbone can run. It is the
  squeeze-and-excitation gate of MobileNetV3 (and of LR-ASPP segmentation heads on it).
* ``normalize`` (``F.normalize``, p = 2): at an all-zero vector, where the function is
  ``x / eps`` and perfectly smooth, the norm's backward divides 0 by 0 and the second
  derivative is NaN. Swin V2's cosine attention hits it whenever windows are padded (e.g.
  224 x 224 inputs): its zero-padded tokens have all-zero keys.

:func:`twice_differentiable` computes them, for the duration of a ``with`` block, by formulas
that are the same functions written with ops whose second derivatives exist and are finite:

.. math:: \operatorname{hardsigmoid}(x) = \frac{\operatorname{relu6}(x + 3)}{6}, \qquad
          \operatorname{normalize}(x) = \frac{x}{\max(\lVert x\rVert, \epsilon)}
          = x \cdot \max\big(\textstyle\sum_i x_i^2, \epsilon^2\big)^{-1/2},

equal to the originals up to rounding, with the same first derivatives and the same second
derivatives wherever those are defined (``relu6`` is ``hardtanh(x, 0, 6)``, twice
differentiable in both modes; the sum of squares is smooth at 0 where the norm is not).

The swap is a :class:`torch.overrides.TorchFunctionMode`: calls of
``torch.nn.functional.hardsigmoid`` (which ``nn.Hardsigmoid`` uses), ``torch._C._nn.hardsigmoid``
/ ``hardsigmoid_`` and ``torch.nn.functional.normalize`` are intercepted while the mode is
active. Nothing is modified: not the model, not its modules, not ``torch.nn.functional``, so
leaving the block, normally or by an exception, leaves no trace. Torch-function modes are
thread-local: other threads are unaffected. Calls through ``torch.ops.aten`` directly (traced
or exported graphs) are not seen.

Example:
    >>> import torch, hutchtrace
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Hardsigmoid(), torch.nn.Linear(8, 1))
    >>> x, y = torch.randn(16, 4), torch.randn(16, 1)
    >>> with hutchtrace.twice_differentiable():
    ...     res = hutchtrace.block_traces(net, torch.nn.functional.mse_loss, K=4, data=(x, y), seed=0)
    >>> res.names
    ['0.weight', '0.bias', '2.weight', '2.bias']
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["twice_differentiable", "SWAPS", "Swap", "swap_for_failing_op"]


def _hardsigmoid(x: torch.Tensor) -> torch.Tensor:
    # hardtanh(x + 3, 0, 6) is relu6(x + 3); written with hardtanh so no other swap can apply
    return F.hardtanh(x + 3.0, 0.0, 6.0) / 6.0


def _in_place(formula: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The in-place form: compute from a copy, then write into ``x``.

    The formula saves its input for backward; computing it from ``x`` itself and then
    overwriting ``x`` would invalidate that saved tensor. From a clone the graph is the one
    the original in-place op would record: ``x`` becomes the op's output, its old value is
    only read.
    """

    def apply(x: torch.Tensor) -> torch.Tensor:
        return x.copy_(formula(x.clone()))

    return apply


def _hardsigmoid_targets() -> dict:
    in_place = _in_place(_hardsigmoid)

    def functional(input, inplace=False):  # F.hardsigmoid's signature
        return in_place(input) if inplace else _hardsigmoid(input)

    return {F.hardsigmoid: functional, torch._C._nn.hardsigmoid: _hardsigmoid,
            torch._C._nn.hardsigmoid_: in_place}


def _normalize(input, p=2.0, dim=1, eps=1e-12, out=None):
    if p != 2 or out is not None:  # only the Euclidean form is swapped
        return F.normalize(input, p, dim, eps, out)
    # max(||x||, eps) = sqrt(max(||x||^2, eps^2)); the sum of squares is smooth at 0, the norm is not
    return input * torch.rsqrt(input.pow(2).sum(dim, keepdim=True).clamp_min(eps * eps))


@dataclass(frozen=True)
class Swap:
    """One op replaced by :func:`twice_differentiable`.

    Attributes:
        name: the op (as in ``torch.nn.functional``).
        problem: what PyTorch's second derivative of the original does.
        backward_op: the aten op named in PyTorch's error message when the derivative is
            missing (``None`` when PyTorch returns NaN instead of raising).
        formula: the equal, twice-differentiable formulation.
        targets: ``{torch function: replacement with the same signature}``.
    """

    name: str
    problem: str
    backward_op: str | None
    formula: str
    targets: Callable[[], dict]


#: every op swapped, with what goes wrong without the swap
SWAPS: tuple[Swap, ...] = (
    Swap("hardsigmoid", "no second derivative in any mode", "hardsigmoid_backward", "relu6(x + 3) / 6",
         _hardsigmoid_targets),
    Swap("normalize", "NaN second derivative at an all-zero vector (0/0 in the norm's backward)", None,
         "x * rsqrt(max(sum(x^2), eps^2))", lambda: {F.normalize: _normalize}),
)


class _SwapMode(TorchFunctionMode):
    """Routes the swapped ops to their twice-differentiable formulations."""

    def __init__(self):
        super().__init__()
        self._table = {}
        for s in SWAPS:
            self._table.update(s.targets())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # the mode is switched off while this runs, so the formulas' own calls are not routed
        return self._table.get(func, func)(*args, **(kwargs or {}))


def twice_differentiable() -> TorchFunctionMode:
    """Context manager: ops without a second derivative are computed by equal formulas that have one.

    Wrap any hutchtrace call (or a whole training loop with a :class:`~hutchtrace.Monitor`) on
    a model using the ops in :data:`SWAPS` (``hardsigmoid``: MobileNetV3's gate; ``normalize``:
    Swin V2's cosine attention on padded windows). Values are
    those of the original ops up to rounding, first and second derivatives are those of the
    same function, and nothing is modified: the model and ``torch`` are exactly as before on
    exit, also after an exception.

    Example:
        >>> import torch, hutchtrace
        >>> x = torch.randn(5, requires_grad=True)
        >>> with hutchtrace.twice_differentiable():
        ...     g, = torch.autograd.grad(torch.tanh(torch.nn.functional.hardsigmoid(x)).sum(), x,
        ...                              create_graph=True)
        ...     h, = torch.autograd.grad(g.sum(), x)   # fails without the context manager
    """
    return _SwapMode()


def swap_for_failing_op(message: str) -> Swap | None:
    """The swap that fixes the missing derivative an autograd error message names, if any."""
    for s in SWAPS:
        if s.backward_op is not None and s.backward_op in message:
            return s
    return None
