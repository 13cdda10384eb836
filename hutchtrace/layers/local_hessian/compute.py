"""The public entry points :func:`local_hessian` and :func:`local_hessian_rows` (docs/maths.md section 7).

They resolve the layer and its activation, capture the block input, choose the path and
assemble the :class:`~.result.LocalHessian`.

Paths (``method=``):
    ``"closed_form"``: the block-diagonal formula of :mod:`.closed_form`
    (:attr:`LocalHessian.blocks`).
    ``"generic"``: ``torch.func``: forward-over-reverse HVPs ``jvp(grad(S_i))`` against
    chunks of basis vectors, vmapped, on the layer as a function of its own parameters
    (``functional_call``) with ``z_i`` fixed. Any module, any ``phi``, any activation.
    ``"rows"``: the seed's Algorithm 1: ``g = grad S_i`` with ``create_graph``, then row
    ``j`` is ``grad(g_j)``; ``chunk=1`` is the literal one-backward-per-row loop, larger
    chunks batch rows (``is_grads_batched``).
    ``"auto"``: ``"closed_form"`` where it applies, else ``"generic"``, falling back to
    ``"rows"`` if some op lacks forward-mode AD.

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
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ...core.errors import NonFiniteWarning
from ...problem.blocks import unwrap_model
from .activation import Activation, resolve_activation
from .budget import check_budget
from .capture import capture_block_inputs, layer_and_name, trainable_parameters
from .closed_form import closed_form, closed_form_problem
from .errors import DegenerateLocalHessianWarning, LocalHessianError
from .prepare import PreparedLayer, phi_label, prepare
from .result import LocalHessian
from .rows import dense, iter_rows

__all__ = ["METHODS", "local_hessian", "local_hessian_at", "local_hessian_rows"]

METHODS = ("auto", "closed_form", "generic", "rows")


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
    mod, name = layer_and_name(model, layer)
    trainable_parameters(mod, name)
    phi_name = phi_label(phi)
    act = resolve_activation(activation, model, name)
    args, kwargs = capture_block_inputs(model, inputs, [mod])[name]
    return local_hessian_at(
        mod, name, args, kwargs, phi, phi_name, act, method, max_memory, chunk, dtype, progress
    )


def local_hessian_at(
    mod, name, args, kwargs, phi, phi_name, act, method, max_memory, chunk, dtype, progress
) -> LocalHessian:
    """:func:`local_hessian` of ``mod`` at its captured block input ``(args, kwargs)``.

    ``phi_name`` is :func:`~.prepare.phi_label` of ``phi`` and ``act`` the resolved ``A_i``;
    the other arguments as in :func:`local_hessian`.
    """
    layer = prepare(mod, name, args, kwargs, act, phi, max_memory, dtype)
    problem = closed_form_problem(mod, act, phi, method)
    if method == "closed_form" and problem is not None:
        raise LocalHessianError(
            f"method='closed_form' does not apply to layer {name or '(model)'!r}: {problem}; "
            "use method='generic' (any module) or 'auto'"
        )
    use = method
    if method == "auto":
        use = "closed_form" if problem is None else "generic"
    if use == "closed_form":
        blocks, coords, R, bound = closed_form(layer)
        res = LocalHessian(
            method="closed_form",
            num_rows=R,
            blocks=blocks,
            unit_coords=coords,
            rank_bound=bound,
            **_fields(layer, phi_name),
        )
        mat = blocks
    else:
        use, mat = _dense_matrix(layer, method, use, chunk, progress)
        res = LocalHessian(method=use, num_rows=None, matrix=mat, **_fields(layer, phi_name))
    _flag(res, mat, act)
    return res


def _fields(layer: PreparedLayer, phi_name: str) -> dict:
    """The :class:`LocalHessian` fields every path shares."""
    return {
        "layer": layer.name,
        "params": tuple(n for n, _ in layer.params),
        "shapes": tuple(tuple(p.shape) for _, p in layer.params),
        "numel": layer.numel,
        "activation": layer.act.name,
        "phi": phi_name,
        "num_inputs": layer.num_inputs,
        "max_memory": layer.budget,
    }


def _dense_matrix(layer: PreparedLayer, method: str, use: str, chunk, progress) -> tuple[str, torch.Tensor]:
    """``(path used, (p_i, p_i) matrix)``; ``"auto"`` falls back from ``"generic"`` to ``"rows"``."""
    P = layer.numel
    check_budget(
        P * P * torch.empty((), dtype=layer.dtype).element_size(),
        layer.budget,
        layer.name,
        P,
        "the dense local Hessian",
    )
    if method != "auto":
        return use, dense(layer, use, chunk, progress)
    try:
        return "generic", dense(layer, "generic", chunk, progress)
    except RuntimeError:
        # e.g. no forward-mode AD / no functorch support for some op: double backward may work
        return "rows", dense(layer, "rows", chunk, progress)


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
    mod, name = layer_and_name(model, layer)
    trainable_parameters(mod, name)
    phi_label(phi)  # validates phi
    act = resolve_activation(activation, model, name)
    args, kwargs = capture_block_inputs(model, inputs, [mod])[name]
    prepared = prepare(mod, name, args, kwargs, act, phi, max_memory, dtype)
    P = prepared.numel
    index = None
    if rows is not None:
        index = torch.as_tensor(list(rows) if not torch.is_tensor(rows) else rows, dtype=torch.long).reshape(
            -1
        )
        if index.numel() == 0 or int(index.min()) < 0 or int(index.max()) >= P:
            raise ValueError(
                f"rows must be non-empty row numbers in [0, {P}) for layer {name or '(model)'!r}"
            )
    return iter_rows(prepared, method, chunk, progress, reserved=0, index=index)


def _flag(res: LocalHessian, mat: torch.Tensor, act: Activation) -> None:
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
