"""Exact local Hessians of single layers (SPEC section 7; seed paper 003, sections 2-3).

A network is a composition of blocks ``C_i(z) = A_i(P_i(z; theta_i))``. With the block
input ``z_i`` held fixed, the *local scalar function* and the *local Hessian* are

.. math::

    S_i(\\theta_i) = \\varphi\\big(A_i(P_i(z_i; \\theta_i))\\big), \\qquad
    LH_i = \\nabla^2_{\\theta_i} S_i \\in \\mathbb{R}^{p_i \\times p_i},

with ``phi = sum`` by default (summed over the output units *and* over the samples of the
batch). ``LH_i`` is **not** a block of the loss Hessian: it ignores the layers above, the
loss and the targets, and it holds ``z_i`` constant. For the loss Hessian use
:func:`hutchtrace.block_traces` / :func:`hutchtrace.backbones.exact.exact_hessian`.

Closed form (``nn.Linear`` / ``nn.Conv2d`` followed by an elementwise ``A``). With rows
``z_r`` (the samples for Linear; the samples x output positions of the unfolded patches for
Conv2d), ``u_{r,k} = w_k^T z_r + b_k`` and ``z~_r = [z_r; 1]``:

.. math::

    \\frac{\\partial^2 S}{\\partial w_{kj} \\partial w_{k'j'}}
        = \\delta_{kk'} \\sum_r A''(u_{rk}) z_{rj} z_{rj'},
    \\qquad LH^{(k)} = \\tilde Z^T \\mathrm{diag}(A''(u_{:,k})) \\tilde Z
        \\in \\mathbb{R}^{(n+1)\\times(n+1)},

so ``LH_i`` is block-diagonal over output units (over output channels for Conv2d; groups
restrict ``z~`` to the unit's group). Its rank is at most ``m min(R, n+1)``; for one input
the unit block is ``A''(u_k) z~ z~^T`` with the single non-zero eigenvalue
``A''(u_k)(||z||^2 + 1)``. The closed form takes ``O(R m n^2)`` time and ``m (n+1)^2``
memory, against ``O(R m^2 n^2)`` and ``p_i^2`` for the dense paths (SPEC section 7).

Paths (``method=``):
    ``"closed_form"``: the block-diagonal formula above (:attr:`LocalHessian.blocks`).
    ``"generic"``: ``torch.func``: forward-over-reverse HVPs ``jvp(grad(S_i))`` against
    chunks of basis vectors, vmapped, on the layer as a function of its own parameters
    (``functional_call``) with ``z_i`` fixed. Any module, any ``phi``, any activation.
    ``"rows"``: the seed's Algorithm 1: ``g = grad S_i`` with ``create_graph``, then row
    ``j`` is ``grad(g_j)``; ``chunk=1`` is the literal one-backward-per-row loop, larger
    chunks batch rows (``is_grads_batched``).
    ``"auto"``: ``"closed_form"`` where it applies, else ``"generic"``, falling back to
    ``"rows"`` if some op lacks forward-mode AD.

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

Degenerate and invalid cases (documented decisions):
    * Piecewise-linear ``A`` (ReLU & co., identity) makes ``S_i`` piecewise linear in
      ``theta_i`` for Linear/Conv layers, so ``LH_i = 0`` almost everywhere (the second
      derivative is undefined only on the measure-zero kinks). This is a correct answer, so
      it is **returned** (the exact zero matrix) with a :class:`DegenerateLocalHessianWarning`.
      The same warning is raised whenever a computed ``LH_i`` is identically zero.
    * Piecewise-constant / non-differentiable ``A`` (``"sign"``, ``"step"``, rounding) or an
      op without a second derivative raise an error: there is no curvature to speak of.
    * Coupling activations (softmax, GLU) are not elementwise; ``LH_i`` is then not
      block-diagonal and ``method="closed_form"`` raises :class:`LocalHessianError`.
    * A layer without trainable parameters raises :class:`~hutchtrace.core.errors.BlockSpecError`.
    * Dense ``p_i^2`` (or block ``m (n+1)^2``) storage over ``max_memory`` raises
      :class:`~hutchtrace.core.errors.MemoryBudgetError` pointing to ``hutchtrace.block_traces``.

Example:
    >>> import torch
    >>> from hutchtrace.layers.local_hessian import local_hessian
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> x = torch.randn(8, 3, dtype=torch.float64)
    >>> lh = local_hessian(net.double(), x, "0")                 # A = the Tanh that follows
    >>> lh.method, lh.activation, lh.numel, tuple(lh.blocks.shape)
    ('closed_form', 'tanh', 16, (4, 4, 4))
    >>> lh.dense().shape                                         # (W row-major, then b)
    torch.Size([16, 16])
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from ...core.errors import (
    BlockSpecError,
    HutchtraceError,
    HVPUnsupportedError,
    MemoryBudgetError,
    NonFiniteWarning,
    is_second_order_failure,
)
from ...core.progress import Progress
from ...core.state import PreservedState
from ...estimate.engine import default_memory_budget
from ...problem.blocks import unwrap_model
from ...problem.loss import call_model

__all__ = [
    "ACTIVATION_NAMES",
    "DegenerateLocalHessianWarning",
    "LocalHessian",
    "LocalHessianError",
    "capture_block_inputs",
    "local_hessian",
    "local_hessian_rows",
    "resolve_activation",
]

METHODS = ("auto", "closed_form", "generic", "rows")


class LocalHessianError(HutchtraceError, ValueError):
    """The layer / activation / ``phi`` combination does not fit the requested local-Hessian path."""


class DegenerateLocalHessianWarning(UserWarning):
    """The local Hessian is identically zero (piecewise-linear activation or a linear block)."""


# --------------------------------------------------------------------------------------------
# activations


@dataclass(frozen=True)
class _Activation:
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


def _from_module(m: nn.Module) -> _Activation:
    if isinstance(m, nn.Identity):
        return _Activation("identity", None, "piecewise_linear")
    if isinstance(m, _SMOOTH_MODULES):
        kind = "elementwise"
    elif isinstance(m, _PL_MODULES):
        kind = "piecewise_linear"
    elif isinstance(m, _COUPLED_MODULES):
        kind = "coupled"
    else:
        kind = "custom"
    return _Activation(_module_name(m), m, kind)


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


def resolve_activation(activation, model: nn.Module | None = None, layer_name: str = "") -> _Activation:
    """Resolve ``activation=`` (see the module docs for the rule) into an activation object."""
    if isinstance(activation, str) and activation == "auto":
        nxt = _next_in_sequential(model, layer_name) if model is not None else None
        if nxt is None or not _is_activation_module(nxt):
            return _Activation("identity", None, "piecewise_linear")
        return _from_module(nxt)
    if activation is None:
        return _Activation("identity", None, "piecewise_linear")
    if isinstance(activation, str):
        key = activation.lower()
        if key not in _NAMED:
            raise ValueError(
                f"unknown activation {activation!r}; use one of {list(ACTIVATION_NAMES)}, an activation "
                "module (nn.Tanh()), a callable, None (identity) or 'auto' (the next module in an "
                "nn.Sequential)"
            )
        fn, kind = _NAMED[key]
        return _Activation(key, fn, kind)
    if isinstance(activation, nn.Module):
        return _from_module(activation)
    if callable(activation):
        name = _KNOWN_FUNCTIONS.get(activation)
        if name is not None:
            kind = _NAMED[name][1]
            return _Activation(getattr(activation, "__name__", name), activation, kind)
        owner = getattr(activation, "__self__", None)  # e.g. MyFunction.apply
        label = (
            owner.__name__
            if isinstance(owner, type)
            else getattr(activation, "__name__", type(activation).__name__)
        )
        return _Activation(label, activation, "custom")
    raise TypeError(
        "activation must be 'auto', a name, an nn.Module, a callable or None, "
        f"got {type(activation).__name__}"
    )


# --------------------------------------------------------------------------------------------
# phi


def _phi_name(phi) -> str:
    if isinstance(phi, str):
        if phi not in ("sum", "mean"):
            raise ValueError(f"phi must be 'sum', 'mean' or a callable y -> scalar, got {phi!r}")
        return phi
    if callable(phi):
        return getattr(phi, "__name__", type(phi).__name__)
    raise TypeError(f"phi must be 'sum', 'mean' or a callable y -> scalar, got {type(phi).__name__}")


def _apply_phi(phi, y) -> torch.Tensor:
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


# --------------------------------------------------------------------------------------------
# block input capture


def _layer_and_name(model: nn.Module, layer) -> tuple[nn.Module, str]:
    if isinstance(layer, str):
        try:
            return model.get_submodule(layer), layer
        except AttributeError:
            names = [n for n, _ in model.named_modules() if n][:12]
            raise BlockSpecError(
                f"the model has no submodule named {layer!r}; pass a module or one of its names, e.g. {names}"
            ) from None
    if isinstance(layer, nn.Module):
        for name, m in model.named_modules():
            if m is layer:
                return m, name
        raise BlockSpecError(
            f"the layer {type(layer).__name__} is not a submodule of the model; pass a module of the model "
            "(or its name), or call local_hessian(layer, block_input, layer) to give the block input directly"
        )
    raise TypeError(f"layer must be an nn.Module or a module name, got {type(layer).__name__}")


def _trainable(layer: nn.Module, name: str) -> list[tuple[str, torch.Tensor]]:
    params = [(n, p) for n, p in layer.named_parameters() if p.requires_grad]
    if not params:
        what = "has no parameters" if not list(layer.parameters()) else "has only frozen parameters"
        raise BlockSpecError(
            f"layer {name or '(model)'!r} ({type(layer).__name__}) {what}, so it has no local Hessian. "
            "Pass the parameterised layer (an nn.Linear / nn.Conv2d / any module with trainable parameters); "
            "its activation is found automatically when it follows in an nn.Sequential, or pass activation="
        )
    return params


def _detach(obj):
    if torch.is_tensor(obj):
        return obj.detach()
    if isinstance(obj, (tuple, list)):
        return type(obj)(_detach(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _detach(v) for k, v in obj.items()}
    return obj


def capture_block_inputs(model: nn.Module, inputs, layers) -> dict[str, tuple[tuple, dict]]:
    """Run ``model(inputs)`` once and return each layer's block input ``(args, kwargs)``.

    The forward runs under ``torch.no_grad`` inside :class:`~hutchtrace.core.state.PreservedState`
    (no parameter, buffer, mode or RNG change); the model's current train/eval mode is used.
    Raises :class:`LocalHessianError` when a layer runs zero times or more than once.
    """
    return _capture(model, inputs, layers)[0]


def _capture(model: nn.Module, inputs, layers):
    """``(block inputs by layer name, model output)`` from one no-grad forward."""
    model = unwrap_model(model)
    resolved = [_layer_and_name(model, layer) for layer in layers]
    seen: dict[str, list] = {name: [] for _, name in resolved}
    handles = []

    def hook_for(name):
        def hook(module, args, kwargs, output):
            seen[name].append((_detach(args), _detach(kwargs)))

        return hook

    try:
        for mod, name in resolved:
            handles.append(mod.register_forward_hook(hook_for(name), with_kwargs=True))
        with PreservedState(model), torch.no_grad():
            output = call_model(model, inputs)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for mod, name in resolved:
        calls = seen[name]
        if not calls:
            raise LocalHessianError(
                f"layer {name!r} did not run in model(inputs); its block input z_i is undefined. Check the "
                "layer name and that the forward uses it"
            )
        if len(calls) > 1:
            raise LocalHessianError(
                f"layer {name!r} ran {len(calls)} times in one forward (a reused module); LH_i is "
                "defined for one block input. Capture the input you want and call "
                "local_hessian(layer, z, layer)"
            )
        out[name] = calls[0]
    return out, _detach(output)


# --------------------------------------------------------------------------------------------
# result


@dataclass
class LocalHessian:
    """An exact local Hessian ``LH_i`` (SPEC section 7).

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
            ``m min(R, n+1)`` (SPEC section 7). A numerical rank below it means saturated units.
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
        _check_budget(
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
        """``tr LH_i`` (SPEC section 7: ``sum_{r,k} A''(u_rk)(||z_r||^2 + 1)`` in the closed form)."""
        t = self.blocks if self.blocks is not None else self.matrix
        return float(t.diagonal(dim1=-2, dim2=-1).sum())

    def summary(self, **kwargs):
        """:func:`hutchtrace.layers.spectrum.spectrum_summary` of this matrix (keyword args passed on)."""
        from ..spectrum import spectrum_summary

        return spectrum_summary(self, **kwargs)


# --------------------------------------------------------------------------------------------
# memory


def _check_budget(nbytes: int, budget: int, layer: str, P: int, what: str) -> None:
    if nbytes > budget:
        raise MemoryBudgetError(
            f"{what} for layer {layer or '(model)'!r} (p_i = {P:,} parameters) needs "
            f"{nbytes / 2**20:,.1f} MiB > max_memory = {budget / 2**20:,.1f} MiB. An exact local Hessian "
            "stores p_i^2 entries (block-diagonal closed form: m (n+1)^2). Raise max_memory, or use the "
            "stochastic estimators: hutchtrace.block_traces(model, loss, blocks={...}) estimates block "
            "traces without forming the matrix (for tr LH_i pass a closure computing S_i; "
            "SnapshotRecorder does this automatically)"
        )


def _row_chunk(P: int, per_row: int, budget: int, reserved: int) -> int:
    free = budget - reserved
    return int(max(1, min(P, 4096, free // max(per_row, 1))))


# --------------------------------------------------------------------------------------------
# public entry point


def local_hessian(
    model: nn.Module,
    inputs,
    layer,
    phi="sum",
    *,
    activation="auto",
    method: str = "auto",
    max_memory: int | None = None,
    chunk: int | None = None,
    dtype: torch.dtype | None = None,
    progress: bool | None = None,
) -> LocalHessian:
    """The exact local Hessian ``LH_i = d^2 phi(A_i(P_i(z_i; theta_i))) / d theta_i^2`` of ``layer``.

    Args:
        model: the network; ``model(inputs)`` is run once (no grad, state preserved) and a
            forward hook on ``layer`` captures its block input ``z_i``. Pass the layer itself
            as ``model`` to give ``z_i`` directly: ``local_hessian(layer, z, layer)``.
        inputs: the network inputs (a tensor, a tuple unpacked, or a dict of keywords).
        layer: a submodule of ``model`` or its name. Its trainable parameters are ``theta_i``.
        phi: ``"sum"`` (the seed's), ``"mean"``, or a callable ``y -> scalar``.
        activation: ``A_i``; ``"auto"`` takes the next module in the parent ``nn.Sequential``
            when it is an activation (see the module docs for the full rule).
        method: ``"auto"``, ``"closed_form"``, ``"generic"`` or ``"rows"`` (module docs).
        max_memory: byte budget for the stored matrix plus working memory (default: 2 GiB
            on CPU, half the free memory on CUDA). Over budget -> MemoryBudgetError.
        chunk: Hessian rows per batched pass for ``"generic"`` / ``"rows"`` (default: from
            ``max_memory``); ``method="rows", chunk=1`` is the seed's Algorithm 1 verbatim.
        dtype: compute in this dtype (parameters and ``z_i`` are cast copies; the model is
            untouched). Default: the parameters' dtype.
        progress: progress display for long row loops (None: only after a few seconds).

    Returns:
        :class:`LocalHessian`; block-diagonal (``.blocks``) for the closed form, dense
        (``.matrix``) otherwise. ``.dense()``, ``.eigenvalues()``, ``.trace()``, ``.summary()``.

    Raises:
        BlockSpecError: unknown layer, or a layer without trainable parameters.
        LocalHessianError: the layer ran 0 or >1 times; ``method="closed_form"`` on a layer /
            activation / phi it does not cover.
        MemoryBudgetError: ``p_i^2`` (dense) or ``m (n+1)^2`` (closed form) over budget.
        HVPUnsupportedError: ``A_i`` is piecewise constant / non-differentiable, or an op has
            no second derivative.
    Warns:
        DegenerateLocalHessianWarning: ``LH_i`` is identically zero (e.g. ReLU, identity).

    Example:
        >>> layer = torch.nn.Linear(2, 3).double()
        >>> z = torch.randn(5, 2, dtype=torch.float64)
        >>> lh = local_hessian(layer, z, layer, activation="softplus")
        >>> torch.allclose(lh.dense(), local_hessian(layer, z, layer, activation="softplus",
        ...                                          method="generic").dense())
        True
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk must be a positive int or None, got {chunk!r}")
    if max_memory is not None and (
        isinstance(max_memory, bool) or not isinstance(max_memory, int) or max_memory <= 0
    ):
        raise ValueError(f"max_memory must be a positive number of bytes or None, got {max_memory!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    model = unwrap_model(model)
    mod, name = _layer_and_name(model, layer)
    _trainable(mod, name)
    phi_name = _phi_name(phi)
    act = resolve_activation(activation, model, name)
    args, kwargs = capture_block_inputs(model, inputs, [mod])[name]
    return _local_hessian_at(
        mod, name, args, kwargs, phi, phi_name, act, method, max_memory, chunk, dtype, progress
    )


def _closed_form_problem(mod: nn.Module, act: _Activation, phi, method: str) -> str | None:
    """Why the closed form does not apply (None when it does)."""
    if type(mod) not in (nn.Linear, nn.Conv2d):
        return f"the closed form covers nn.Linear and nn.Conv2d (exact types), not {type(mod).__name__}"
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(mod):
        return "the layer is parametrized (its weight is computed from other tensors)"
    if mod._forward_hooks or mod._forward_pre_hooks:
        return "the layer has forward hooks that may change its output"
    names = {n for n, p in mod.named_parameters() if p.requires_grad}
    if not names <= {"weight", "bias"}:
        return f"the layer has parameters other than weight/bias: {sorted(names - {'weight', 'bias'})}"
    if not (phi == "sum" or phi == "mean"):
        return "phi is a custom callable (the closed form needs phi = 'sum' or 'mean')"
    if act.kind == "coupled":
        return (
            f"activation {act.name!r} couples the output units, so LH_i is not block-diagonal; "
            "use method='generic'"
        )
    if act.kind == "custom" and method != "closed_form":
        return (
            f"activation {act.name!r} is not known to be elementwise (pass method='closed_form' to assert it)"
        )
    return None


def _prepare(mod, name, args, kwargs, act, max_memory, dtype):
    """Validate and cast: ``(params, args, kwargs, budget, dtype, N)``."""
    params = _trainable(mod, name)
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

    def cast(obj):
        if torch.is_tensor(obj):
            return obj.to(work_dtype) if obj.is_floating_point() else obj
        if isinstance(obj, (tuple, list)):
            return type(obj)(cast(o) for o in obj)
        if isinstance(obj, dict):
            return {k: cast(v) for k, v in obj.items()}
        return obj

    args, kwargs = cast(args), cast(kwargs)
    z0 = args[0] if args else next((v for v in kwargs.values() if torch.is_tensor(v)), None)
    unbatched = 3 if isinstance(mod, nn.Conv2d) else 1  # (C, H, W) / (n,) inputs are one sample
    N = int(z0.shape[0]) if torch.is_tensor(z0) and z0.dim() > unbatched else 1
    return params, args, kwargs, budget, work_dtype, N


def _local_hessian_at(
    mod, name, args, kwargs, phi, phi_name, act, method, max_memory, chunk, dtype, progress
) -> LocalHessian:
    params, args, kwargs, budget, work_dtype, N = _prepare(mod, name, args, kwargs, act, max_memory, dtype)
    problem = _closed_form_problem(mod, act, phi, method)
    if method == "closed_form" and problem is not None:
        raise LocalHessianError(
            f"method='closed_form' does not apply to layer {name or '(model)'!r}: {problem}; "
            "use method='generic' (any module) or 'auto'"
        )
    use = method
    if method == "auto":
        use = "closed_form" if problem is None else "generic"

    base = {
        "layer": name,
        "params": tuple(n for n, _ in params),
        "shapes": tuple(tuple(p.shape) for _, p in params),
        "numel": sum(p.numel() for _, p in params),
        "activation": act.name,
        "phi": phi_name,
        "num_inputs": N,
        "max_memory": budget,
    }
    if use == "closed_form":
        if len(args) != 1 or kwargs:
            raise LocalHessianError(
                f"layer {name!r} was called with {len(args)} positional and {len(kwargs)} "
                "keyword inputs; the closed form needs one input tensor"
            )
        blocks, coords, R, bound = _closed_form(mod, args[0], act, phi, work_dtype, budget, name)
        res = LocalHessian(
            method="closed_form", num_rows=R, blocks=blocks, unit_coords=coords, rank_bound=bound, **base
        )
        mat = blocks
    else:
        P = base["numel"]
        _check_budget(
            P * P * torch.empty((), dtype=work_dtype).element_size(),
            budget,
            name,
            P,
            "the dense local Hessian",
        )
        dense_args = (mod, params, args, kwargs, act, phi, work_dtype, budget, chunk)
        if method == "auto":
            try:
                mat = _dense(*dense_args, "generic", name, progress)
                use = "generic"
            except RuntimeError:
                # e.g. no forward-mode AD / no functorch support for some op: double backward may work
                mat = _dense(*dense_args, "rows", name, progress)
                use = "rows"
        else:
            mat = _dense(*dense_args, use, name, progress)
        res = LocalHessian(method=use, num_rows=None, matrix=mat, **base)
    _flag(res, mat, act)
    return res


def local_hessian_rows(
    model: nn.Module,
    inputs,
    layer,
    phi="sum",
    *,
    activation="auto",
    method: str = "generic",
    rows=None,
    chunk: int | None = None,
    max_memory: int | None = None,
    dtype: torch.dtype | None = None,
    progress: bool | None = None,
):
    """Stream rows of ``LH_i`` without storing the ``p_i x p_i`` matrix (seed, Lemma 1).

    Yields ``(idx, block)``: ``idx`` a 1-D LongTensor of row numbers (dense coordinate order)
    and ``block`` the ``(len(idx), p_i)`` rows; memory is ``O(chunk p_i)``. ``rows`` selects
    which rows (an iterable of ints or a LongTensor; default all, in order). Other arguments
    as in :func:`local_hessian`; ``method`` is ``"generic"`` (vmapped ``jvp(grad S)``) or
    ``"rows"`` (Algorithm 1). Use it for layers too large to store: the diagonal, row
    norms, ``||LH_i||_F``, or spot checks of single rows.

    Example:
        >>> layer = torch.nn.Linear(3, 2).double()
        >>> z = torch.randn(4, 3, dtype=torch.float64)
        >>> diag = torch.cat([block[torch.arange(len(idx)), idx] for idx, block in
        ...                   local_hessian_rows(layer, z, layer, activation="tanh", chunk=3)])
        >>> torch.allclose(diag, local_hessian(layer, z, layer, activation="tanh").diagonal())
        True
    """
    if method not in ("generic", "rows"):
        raise ValueError(f"local_hessian_rows: method must be 'generic' or 'rows', got {method!r}")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk must be a positive int or None, got {chunk!r}")
    model = unwrap_model(model)
    mod, name = _layer_and_name(model, layer)
    _trainable(mod, name)
    phi_name = _phi_name(phi)  # noqa: F841  (validates phi)
    act = resolve_activation(activation, model, name)
    args, kwargs = capture_block_inputs(model, inputs, [mod])[name]
    params, args, kwargs, budget, work_dtype, _ = _prepare(mod, name, args, kwargs, act, max_memory, dtype)
    P = sum(p.numel() for _, p in params)
    index = None
    if rows is not None:
        index = torch.as_tensor(list(rows) if not torch.is_tensor(rows) else rows, dtype=torch.long).reshape(
            -1
        )
        if index.numel() == 0 or int(index.min()) < 0 or int(index.max()) >= P:
            raise ValueError(
                f"rows must be non-empty row numbers in [0, {P}) for layer {name or '(model)'!r}"
            )
    return _iter_rows(
        mod,
        params,
        args,
        kwargs,
        act,
        phi,
        work_dtype,
        budget,
        chunk,
        method,
        name,
        progress,
        reserved=0,
        index=index,
    )


def _flag(res: LocalHessian, mat: torch.Tensor, act: _Activation) -> None:
    finite = bool(torch.isfinite(mat).all())
    res.finite = finite
    where = res.layer or "(model)"
    if not finite:
        warnings.warn(
            f"the local Hessian of layer {where!r} has NaN/Inf entries (overflow in A'' or in the "
            "inputs); it is returned as computed and flagged finite=False",
            NonFiniteWarning,
            stacklevel=4,
        )
        return
    if not bool((mat != 0).any()):
        if act.kind == "piecewise_linear":
            why = (
                f"activation {act.name!r} is piecewise linear, so S_i is piecewise linear in the layer's "
                "parameters and LH_i = 0 almost everywhere (A'' vanishes except on measure-zero kinks, "
                "where it is undefined)"
            )
        else:
            why = "S_i is linear in the layer's parameters at this point"
        warnings.warn(
            f"the local Hessian of layer {where!r} is identically zero: {why}. The exact zero matrix is "
            "returned. For curvature information use a smooth activation (tanh, softplus, gelu), pass "
            "activation= if the activation was not detected, or study the loss Hessian "
            "(hutchtrace.block_traces)",
            DegenerateLocalHessianWarning,
            stacklevel=4,
        )


# --------------------------------------------------------------------------------------------
# closed form


def _unit_rows(mod: nn.Module, z: torch.Tensor, W: torch.Tensor):
    """``(Zt, u_lin, groups)``: rows ``Zt`` ``(g, R, F)`` and ``u - b`` ``(g, m_g, R)``."""
    if isinstance(mod, nn.Linear):
        n = mod.in_features
        if z.shape[-1] != n:
            raise LocalHessianError(f"block input has last dim {z.shape[-1]}, the Linear layer expects {n}")
        Z = z.reshape(-1, n)
        return Z.unsqueeze(0), (W @ Z.T).unsqueeze(0), 1
    # Conv2d: unfold patches; unbatched (C, H, W) input is one sample.
    x = z if z.dim() == 4 else z.unsqueeze(0)
    mode = "constant" if mod.padding_mode == "zeros" else mod.padding_mode
    x = F.pad(x, mod._reversed_padding_repeated_twice, mode=mode)
    patches = F.unfold(
        x, mod.kernel_size, dilation=mod.dilation, padding=0, stride=mod.stride
    )  # (N, C*kk, L)
    Nn, _, L = patches.shape
    g = mod.groups
    Fg = mod.in_channels // g * math.prod(mod.kernel_size)
    Zt = patches.reshape(Nn, g, Fg, L).permute(1, 0, 3, 2).reshape(g, Nn * L, Fg)
    Wg = W.reshape(g, mod.out_channels // g, Fg)
    return Zt, Wg @ Zt.transpose(1, 2), g


def _second_derivative(act: _Activation, u: torch.Tensor) -> torch.Tensor:
    """Elementwise ``A''(u)`` by double backward through ``A`` (keeps module hyper-parameters)."""
    if act.fn is None:
        return torch.zeros_like(u)
    with torch.enable_grad():
        uu = u.detach().requires_grad_(True)
        try:
            y = act(uu)
            (g1,) = torch.autograd.grad(y.sum(), uu, create_graph=True)
            if not g1.requires_grad:
                return torch.zeros_like(u)
            (g2,) = torch.autograd.grad(g1.sum(), uu, allow_unused=True)
        except RuntimeError as e:
            raise HVPUnsupportedError(
                f"activation {act.name!r} has no second derivative in autograd ({str(e).splitlines()[0]}); "
                "use a twice-differentiable activation"
            ) from e
    return torch.zeros_like(u) if g2 is None else g2.detach()


def _closed_form(mod, z, act, phi, dtype, budget, name):
    W = mod.weight.detach().to(dtype)
    b = mod.bias.detach().to(dtype) if mod.bias is not None else None
    use_w = mod.weight.requires_grad
    use_b = b is not None and mod.bias.requires_grad
    m = W.shape[0]
    Fk = W[0].numel()
    q = (Fk if use_w else 0) + (1 if use_b else 0)
    itemsize = torch.empty((), dtype=dtype).element_size()
    _check_budget(
        m * q * q * itemsize,
        budget,
        name,
        (m * Fk if use_w else 0) + (m if use_b else 0),
        "the closed-form blocks",
    )
    Zt, u, g = _unit_rows(mod, z, W)
    mg = m // g
    if b is not None:
        u = u + b.reshape(g, mg, 1)
    a2 = _second_derivative(act, u)
    if phi == "mean":
        a2 = a2 / u.numel()
    R = Zt.shape[1]
    cols = ([Zt] if use_w else []) + ([torch.ones(g, R, 1, dtype=dtype, device=Zt.device)] if use_b else [])
    Z1 = torch.cat(cols, -1)  # (g, R, q)
    blocks = torch.zeros(g, mg, q, q, dtype=dtype, device=Zt.device)
    # Rows per pass so the (m, rows, q) temporary uses at most a quarter of the remaining budget.
    spare = max(budget - m * q * q * itemsize, 0) // 4
    rc = int(max(1, min(R, spare // max(m * q * itemsize, 1))))
    for r0 in range(0, R, rc):
        Zc = Z1[:, r0 : r0 + rc]  # (g, rc, q)
        tmp = a2[:, :, r0 : r0 + rc, None] * Zc[:, None]  # (g, mg, rc, q)
        blocks += tmp.transpose(-1, -2) @ Zc[:, None]  # (g, mg, q, q)
    blocks = blocks.reshape(m, q, q)
    # Dense-order coordinates of unit k: its weight row (row-major), then its bias.
    k = torch.arange(m, device=Zt.device)
    parts = []
    if use_w:
        parts.append(k[:, None] * Fk + torch.arange(Fk, device=Zt.device)[None, :])
    if use_b:
        parts.append(((m * Fk if use_w else 0) + k)[:, None])
    coords = torch.cat(parts, 1)
    # each unit k: rank(Z~^T D_k Z~) <= rank(Z~); undefined for non-finite inputs (flagged later)
    bound = mg * int(torch.linalg.matrix_rank(Z1).sum()) if bool(torch.isfinite(Z1).all()) else None
    return blocks, coords, R, bound


# --------------------------------------------------------------------------------------------
# dense paths


def _dense(mod, params, args, kwargs, act, phi, dtype, budget, chunk, how, name, progress) -> torch.Tensor:
    P = sum(p.numel() for _, p in params)
    H = torch.empty((P, P), dtype=dtype, device=params[0][1].device)
    for idx, rows in _iter_rows(
        mod,
        params,
        args,
        kwargs,
        act,
        phi,
        dtype,
        budget,
        chunk,
        how,
        name,
        progress,
        reserved=P * P * H.element_size(),
    ):
        H[idx] = rows
    return H


def _iter_rows(
    mod, params, args, kwargs, act, phi, dtype, budget, chunk, how, name, progress, reserved, index=None
):
    """Yield ``(idx, rows)``: ``(c, P)`` chunks of rows ``idx`` of ``LH_i`` (default: all, in order)."""
    names = [n for n, _ in params]
    sizes = [p.numel() for _, p in params]
    shapes = [p.shape for _, p in params]
    P = sum(sizes)
    trainable = set(names)
    consts = {
        n: t.detach().to(dtype) if t.is_floating_point() else t.detach()
        for n, t in list(mod.named_parameters()) + list(mod.named_buffers())
        if n not in trainable
    }
    theta = torch.cat([p.detach().to(dtype).reshape(-1) for _, p in params])
    itemsize = theta.element_size()
    with PreservedState(mod):
        out_numel = _probe_output_numel(mod, args, kwargs, consts, names, theta, sizes, shapes)
    in_numel = sum(a.numel() for a in args if torch.is_tensor(a))
    # working memory of one batched row: basis vector, result, and tangents of the activations
    per_row = itemsize * (4 * P + 6 * out_numel + in_numel)
    c = chunk or _row_chunk(P, per_row, budget, reserved)
    order = torch.arange(P, device=theta.device) if index is None else index.to(theta.device)
    R = order.numel()

    def S_of(pieces):
        ps = dict(consts)
        ps.update({n: t.reshape(s) for n, t, s in zip(names, pieces, shapes)})
        return _apply_phi(phi, act(functional_call(mod, ps, args, kwargs, tie_weights=True, strict=False)))

    def basis(idx):
        E = torch.zeros(idx.numel(), P, dtype=dtype, device=theta.device)
        E[torch.arange(idx.numel(), device=theta.device), idx] = 1
        return E

    def fail(e: RuntimeError):
        if is_second_order_failure(str(e)):
            return HVPUnsupportedError(
                f"layer {name or '(model)'!r} (activation {act.name!r}) contains an op without the second "
                f"derivative the {how!r} path needs: {str(e).splitlines()[0]}"
                + (". method='rows' (double backward) may work" if how == "generic" else "")
            )
        return e

    prog = Progress(R, f"local Hessian {name or '(model)'} [{how}]", progress, unit="row")
    try:
        if how == "generic":

            def S(flat):
                return S_of(torch.split(flat, sizes))

            vhvp = vmap(lambda v: jvp(grad(S), (theta,), (v,))[1])
            for s in range(0, R, c):
                idx = order[s : s + c]
                try:
                    with PreservedState(mod), torch.enable_grad():
                        rows = vhvp(basis(idx))
                except RuntimeError as err:
                    raise fail(err) from err
                prog.update(idx.numel())
                yield idx, rows
            return
        # how == "rows": the seed's Algorithm 1 on one retained graph.
        leaves = [t.clone().requires_grad_(True) for t in torch.split(theta, sizes)]
        try:
            with PreservedState(mod), torch.enable_grad():
                gparts = torch.autograd.grad(S_of(leaves), leaves, create_graph=True, allow_unused=True)
        except RuntimeError as err:
            raise fail(err) from err
        g = torch.cat(
            [
                torch.zeros(n, dtype=dtype, device=theta.device) if gi is None else gi.reshape(-1)
                for gi, n in zip(gparts, sizes)
            ]
        )

        def assemble(parts, r):
            return torch.cat(
                [
                    torch.zeros(r, n, dtype=dtype, device=theta.device) if h is None else h.reshape(r, -1)
                    for h, n in zip(parts, sizes)
                ],
                1,
            )

        batched = c > 1
        s = 0
        while s < R:
            idx = order[s : s + (c if batched else 1)]
            if not g.requires_grad:  # every g_j is constant in theta: the rows are 0 (Algorithm 1, line 12)
                rows = torch.zeros(idx.numel(), P, dtype=dtype, device=theta.device)
            elif batched:
                try:
                    parts = torch.autograd.grad(
                        g,
                        leaves,
                        grad_outputs=basis(idx),
                        retain_graph=True,
                        allow_unused=True,
                        is_grads_batched=True,
                    )
                except RuntimeError as err:
                    if is_second_order_failure(str(err)) and "atching rule" not in str(err):
                        raise fail(err) from err
                    batched = False  # a backward without a batching rule: one row at a time
                    continue
                rows = assemble(parts, idx.numel())
            else:
                j = int(idx[0])
                if g[j].requires_grad:
                    try:
                        parts = torch.autograd.grad(g[j], leaves, retain_graph=True, allow_unused=True)
                    except RuntimeError as err:
                        raise fail(err) from err
                    rows = assemble(parts, 1)
                else:
                    rows = torch.zeros(1, P, dtype=dtype, device=theta.device)
            prog.update(idx.numel())
            yield idx, rows
            s += idx.numel()
    finally:
        prog.close()


def _probe_output_numel(mod, args, kwargs, consts, names, theta, sizes, shapes) -> int:
    ps = dict(consts)
    ps.update({n: t.reshape(s) for n, t, s in zip(names, torch.split(theta, sizes), shapes)})
    with torch.no_grad():
        out = functional_call(mod, ps, args, kwargs, tie_weights=True, strict=False)
    return out.numel() if torch.is_tensor(out) else 0
