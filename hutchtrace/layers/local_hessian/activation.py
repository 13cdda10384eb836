"""The activation ``A_i`` of a local Hessian: how it is found and what kind it is (docs/maths.md section 7).

``S_i(theta_i) = phi(A_i(P_i(z_i; theta_i)))``; the kind of ``A_i`` decides which path
applies: the closed form needs an elementwise ``A`` (``LH_i`` is then block-diagonal over
output units), a piecewise-linear one gives ``LH_i = 0`` almost everywhere, a coupling one
(softmax, GLU) needs the generic path, and a piecewise-constant one has no curvature at all.

How ``A_i`` is identified (``activation=``):
    * ``"auto"`` (default): the module that immediately follows ``layer`` in its parent
      ``nn.Sequential``, if that module is an activation (a known elementwise one such as
      ``nn.Tanh``/``nn.Sigmoid``/``nn.Softplus``/``nn.GELU``/``nn.SiLU``/``nn.ELU``, a
      piecewise-linear one such as ``nn.ReLU``/``nn.LeakyReLU``/``nn.Identity``, or a coupling
      one such as ``nn.Softmax``). Anything else (no parent Sequential, the last module, a
      Dropout/BatchNorm/Linear next) means ``A_i = identity``. Activations applied inside a
      custom ``forward`` (``torch.tanh(self.fc(x))``) are invisible: pass them explicitly.
    * a name: ``"tanh"``, ``"sigmoid"``, ``"softplus"``, ``"gelu"``, ``"silu"``, ``"elu"``,
      ``"selu"``, ``"celu"``, ``"mish"``, ``"logsigmoid"``, ``"softsign"``, ``"exp"``,
      ``"relu"``, ``"leaky_relu"``, ``"relu6"``, ``"hardtanh"``, ``"identity"``,
      ``"softmax"``, ``"log_softmax"`` (over the last dim), ``"sign"``, ``"step"``.
    * an activation module (its hyper-parameters are kept, e.g. ``nn.Softplus(beta=2)``),
      or a callable. Known torch functions (``torch.tanh``, ``F.softplus``, ...) are
      recognised; other callables are treated as non-elementwise (generic path) unless
      ``method="closed_form"`` is requested, which trusts that they are elementwise.
    * ``None``: identity.

Example:
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Softplus(beta=2))
    >>> act = resolve_activation("auto", net, "0")
    >>> act.name, act.kind, act.elementwise
    ('softplus(beta=2, threshold=20.0)', 'elementwise', True)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ACTIVATION_NAMES", "Activation", "resolve_activation"]


@dataclass(frozen=True)
class Activation:
    """``A_i`` with its class: elementwise (smooth), piecewise_linear, coupled, custom, nondiff."""

    name: str
    fn: Callable | None  # None: identity
    kind: str

    def __call__(self, y):
        return y if self.fn is None else self.fn(y)

    @property
    def elementwise(self) -> bool:
        return self.kind in ("elementwise", "piecewise_linear")


def _step(y):
    return (y > 0).to(y.dtype)


_NAMED: dict[str, tuple[Callable | None, str]] = {
    "tanh": (torch.tanh, "elementwise"),
    "sigmoid": (torch.sigmoid, "elementwise"),
    "softplus": (F.softplus, "elementwise"),
    "gelu": (F.gelu, "elementwise"),
    "silu": (F.silu, "elementwise"),
    "elu": (F.elu, "elementwise"),
    "selu": (F.selu, "elementwise"),
    "celu": (F.celu, "elementwise"),
    "mish": (F.mish, "elementwise"),
    "logsigmoid": (F.logsigmoid, "elementwise"),
    "softsign": (F.softsign, "elementwise"),
    "exp": (torch.exp, "elementwise"),
    "relu": (F.relu, "piecewise_linear"),
    "leaky_relu": (F.leaky_relu, "piecewise_linear"),
    "relu6": (F.relu6, "piecewise_linear"),
    "hardtanh": (F.hardtanh, "piecewise_linear"),
    "identity": (None, "piecewise_linear"),
    "softmax": (lambda y: torch.softmax(y, -1), "coupled"),
    "log_softmax": (lambda y: torch.log_softmax(y, -1), "coupled"),
    "sign": (torch.sign, "nondiff"),
    "step": (_step, "nondiff"),
}
ACTIVATION_NAMES: tuple[str, ...] = tuple(_NAMED)

_KNOWN_FUNCTIONS: dict[Any, str] = {
    torch.tanh: "tanh",
    F.tanh: "tanh",
    torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid",
    F.softplus: "softplus",
    F.gelu: "gelu",
    F.silu: "silu",
    F.elu: "elu",
    F.selu: "selu",
    F.celu: "celu",
    F.mish: "mish",
    F.logsigmoid: "logsigmoid",
    F.softsign: "softsign",
    torch.exp: "exp",
    torch.relu: "relu",
    F.relu: "relu",
    F.leaky_relu: "leaky_relu",
    F.relu6: "relu6",
    F.hardtanh: "hardtanh",
    torch.sign: "sign",
    torch.round: "sign",
    torch.floor: "sign",
    torch.ceil: "sign",
}

_SMOOTH_MODULES = (
    nn.Tanh,
    nn.Sigmoid,
    nn.Softplus,
    nn.GELU,
    nn.SiLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.Mish,
    nn.LogSigmoid,
    nn.Softsign,
    nn.Tanhshrink,
    nn.Hardswish,
)
_PL_MODULES = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.Hardtanh,
    nn.Identity,
    nn.Threshold,
    nn.Hardshrink,
    nn.Softshrink,
    nn.Hardsigmoid,
    nn.PReLU,
    nn.RReLU,
)
_COUPLED_MODULES = (nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.Softmax2d, nn.GLU)


def _module_name(m: nn.Module) -> str:
    extra = m.extra_repr()
    return type(m).__name__.lower() + (f"({extra})" if extra else "")


def _from_module(m: nn.Module) -> Activation:
    if isinstance(m, nn.Identity):
        return Activation("identity", None, "piecewise_linear")
    if isinstance(m, _SMOOTH_MODULES):
        kind = "elementwise"
    elif isinstance(m, _PL_MODULES):
        kind = "piecewise_linear"
    elif isinstance(m, _COUPLED_MODULES):
        kind = "coupled"
    else:
        kind = "custom"
    return Activation(_module_name(m), m, kind)


def _is_activation_module(m: nn.Module) -> bool:
    return isinstance(m, _SMOOTH_MODULES + _PL_MODULES + _COUPLED_MODULES)


def _next_in_sequential(model: nn.Module, layer_name: str) -> nn.Module | None:
    if not layer_name:
        return None
    parent_name, _, key = layer_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not isinstance(parent, nn.Sequential):
        return None
    keys = list(parent._modules)
    i = keys.index(key)
    return parent._modules[keys[i + 1]] if i + 1 < len(keys) else None


def resolve_activation(activation, model: nn.Module | None = None, layer_name: str = "") -> Activation:
    """Resolve ``activation=`` (see the module docs for the rule) into an activation object."""
    if isinstance(activation, str) and activation == "auto":
        nxt = _next_in_sequential(model, layer_name) if model is not None else None
        if nxt is None or not _is_activation_module(nxt):
            return Activation("identity", None, "piecewise_linear")
        return _from_module(nxt)
    if activation is None:
        return Activation("identity", None, "piecewise_linear")
    if isinstance(activation, str):
        key = activation.lower()
        if key not in _NAMED:
            raise ValueError(
                f"unknown activation {activation!r}; use one of {list(ACTIVATION_NAMES)}, an activation "
                "module (nn.Tanh()), a callable, None (identity) or 'auto' (the next module in an "
                "nn.Sequential)"
            )
        fn, kind = _NAMED[key]
        return Activation(key, fn, kind)
    if isinstance(activation, nn.Module):
        return _from_module(activation)
    if callable(activation):
        name = _KNOWN_FUNCTIONS.get(activation)
        if name is not None:
            kind = _NAMED[name][1]
            return Activation(getattr(activation, "__name__", name), activation, kind)
        owner = getattr(activation, "__self__", None)  # e.g. MyFunction.apply
        label = (
            owner.__name__
            if isinstance(owner, type)
            else getattr(activation, "__name__", type(activation).__name__)
        )
        return Activation(label, activation, "custom")
    raise TypeError(
        "activation must be 'auto', a name, an nn.Module, a callable or None, "
        f"got {type(activation).__name__}"
    )
