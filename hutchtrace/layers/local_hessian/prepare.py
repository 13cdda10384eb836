"""The local scalar function ``S_i`` set up for one layer (docs/maths.md section 7).

.. math::

    S_i(\\theta_i) = \\varphi\\big(A_i(P_i(z_i; \\theta_i))\\big)

with ``phi = sum`` by default (summed over the output units *and* over the samples of the
batch), ``"mean"``, or a callable ``y -> scalar``. :func:`prepare` validates one layer at its
captured block input ``z_i`` and casts what the paths compute with: the trainable tensors
``theta_i`` in coordinate order, ``z_i`` in the working dtype, the memory budget and the
number of samples ``N``. The result, a :class:`PreparedLayer`, is what the closed form
(:mod:`.closed_form`) and the row iterator (:mod:`.rows`) take.

Example:
    >>> from hutchtrace.layers.local_hessian.activation import resolve_activation
    >>> layer = torch.nn.Linear(3, 2)
    >>> p = prepare(layer, "", (torch.randn(5, 3),), {}, resolve_activation("tanh"), "sum", 2**20,
    ...             torch.float64)
    >>> p.numel, p.num_inputs, p.args[0].dtype, p.budget
    (8, 5, torch.float64, 1048576)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...core.errors import HVPUnsupportedError
from ...estimate.engine import default_memory_budget
from .activation import Activation
from .capture import trainable_parameters
from .errors import LocalHessianError

__all__ = ["PreparedLayer", "apply_phi", "phi_label", "prepare"]


def phi_label(phi) -> str:
    """Validate ``phi`` and name it: ``"sum"``, ``"mean"`` or the callable's name."""
    if isinstance(phi, str):
        if phi not in ("sum", "mean"):
            raise ValueError(f"phi must be 'sum', 'mean' or a callable y -> scalar, got {phi!r}")
        return phi
    if callable(phi):
        return getattr(phi, "__name__", type(phi).__name__)
    raise TypeError(f"phi must be 'sum', 'mean' or a callable y -> scalar, got {type(phi).__name__}")


def apply_phi(phi, y) -> torch.Tensor:
    """``phi(y)`` as a 0-dim tensor (LocalHessianError when ``y`` or ``phi(y)`` is not a tensor / scalar)."""
    if not torch.is_tensor(y):
        raise LocalHessianError(
            f"the block output is a {type(y).__name__}, not a tensor; pass phi=callable mapping it to "
            "a scalar"
        )
    if phi == "sum":
        return y.sum()
    if phi == "mean":
        return y.mean()
    out = phi(y)
    if not torch.is_tensor(out) or out.numel() != 1:
        raise LocalHessianError("phi must return a scalar tensor (e.g. lambda y: (y ** 2).sum())")
    return out.reshape(())


@dataclass(frozen=True)
class PreparedLayer:
    """One layer at its block input, validated and cast to the working dtype.

    Attributes:
        module, name: the layer and its name in the model (``""`` for the model itself).
        params: ``theta_i``, the trainable ``(name, tensor)`` pairs in coordinate order
            (the model's own tensors; the paths work on cast copies).
        args, kwargs: the block input ``z_i``, floating tensors cast to :attr:`dtype`.
        act, phi: ``A_i`` and ``phi``.
        dtype: the working dtype; budget: the byte budget (``max_memory``).
        num_inputs: ``N``, samples in the block input (its leading dimension).
    """

    module: nn.Module
    name: str
    params: list[tuple[str, torch.Tensor]]
    args: tuple
    kwargs: dict
    act: Activation
    phi: Any
    dtype: torch.dtype
    budget: int
    num_inputs: int

    @property
    def numel(self) -> int:
        """``p_i``."""
        return sum(p.numel() for _, p in self.params)


def prepare(mod, name, args, kwargs, act, phi, max_memory, dtype) -> PreparedLayer:
    """Validate ``theta_i`` and ``A_i``, pick the budget and dtype, cast ``z_i``."""
    params = trainable_parameters(mod, name)
    if act.kind == "nondiff":
        raise HVPUnsupportedError(
            f"activation {act.name!r} of layer {name or '(model)'!r} is piecewise constant "
            "(non-differentiable at its jumps, zero derivative elsewhere): the local Hessian is "
            "undefined/uninformative. Use a differentiable activation (tanh, sigmoid, softplus, gelu)"
        )
    device = params[0][1].device
    budget = int(max_memory) if max_memory is not None else default_memory_budget(device)
    work_dtype = dtype if dtype is not None else params[0][1].dtype
    if not isinstance(work_dtype, torch.dtype) or not work_dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype, got {work_dtype}")
    args, kwargs = _cast(args, work_dtype), _cast(kwargs, work_dtype)
    z0 = args[0] if args else next((v for v in kwargs.values() if torch.is_tensor(v)), None)
    unbatched = 3 if isinstance(mod, nn.Conv2d) else 1  # (C, H, W) / (n,) inputs are one sample
    N = int(z0.shape[0]) if torch.is_tensor(z0) and z0.dim() > unbatched else 1
    return PreparedLayer(mod, name, params, args, kwargs, act, phi, work_dtype, budget, N)


def _cast(obj, dtype: torch.dtype):
    if torch.is_tensor(obj):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_cast(o, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _cast(v, dtype) for k, v in obj.items()}
    return obj
