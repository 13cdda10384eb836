"""The dense paths: rows of ``LH_i`` from second-order autograd (docs/maths.md section 7, "Cost").

Both paths treat the layer as a function of its own flattened trainable parameters
(``functional_call``) with the block input ``z_i`` fixed, ``S_i(theta) = phi(A(layer(z_i;
theta)))``, and produce ``LH_i`` a chunk of rows at a time; row ``j`` is ``LH_i e_j``:

* ``"generic"``: forward-over-reverse HVPs ``jvp(grad S_i)`` against chunks of basis vectors,
  vmapped (``torch.func``). Any module, any ``phi``, any activation with forward-mode AD.
* ``"rows"``: the seed's Algorithm 1: ``g = grad S_i`` with ``create_graph``, then row ``j``
  is ``grad(g_j)``; ``chunk=1`` is the literal one-backward-per-row loop, larger chunks batch
  rows (``is_grads_batched``), falling back to one row at a time for a backward without a
  batching rule.

:func:`iter_rows` streams ``(idx, rows)`` chunks in ``O(chunk p_i)`` memory (the chunk size
from the budget left after ``reserved`` bytes); :func:`dense` fills the ``(p_i, p_i)`` matrix
from them. The model is never modified (:class:`~hutchtrace.core.state.PreservedState`).

Example:
    >>> from hutchtrace.layers.local_hessian.activation import resolve_activation
    >>> from hutchtrace.layers.local_hessian.prepare import prepare
    >>> layer = torch.nn.Linear(2, 3).double()
    >>> p = prepare(layer, "", (torch.randn(4, 2, dtype=torch.float64),), {},
    ...             resolve_activation("tanh"), "sum", 2**20, None)
    >>> H = dense(p, "generic", chunk=None, progress=False)
    >>> torch.allclose(H, dense(p, "rows", chunk=1, progress=False)), tuple(H.shape)
    (True, (9, 9))
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.func import functional_call, grad, jvp, vmap

from ...core.errors import HVPUnsupportedError, is_second_order_failure
from ...core.progress import Progress
from ...core.state import PreservedState
from .budget import row_chunk
from .prepare import PreparedLayer, apply_phi

__all__ = ["dense", "iter_rows"]

Rows = Iterator[tuple[torch.Tensor, torch.Tensor]]


def dense(layer: PreparedLayer, how: str, chunk: int | None, progress) -> torch.Tensor:
    """The ``(p_i, p_i)`` matrix from :func:`iter_rows` (``how``: ``"generic"`` or ``"rows"``)."""
    P = layer.numel
    H = torch.empty((P, P), dtype=layer.dtype, device=layer.params[0][1].device)
    for idx, rows in iter_rows(layer, how, chunk, progress, reserved=P * P * H.element_size()):
        H[idx] = rows
    return H


def iter_rows(layer: PreparedLayer, how: str, chunk: int | None, progress, reserved: int, index=None) -> Rows:
    """Yield ``(idx, rows)``: ``(c, P)`` chunks of rows ``idx`` of ``LH_i`` (default: all, in order)."""
    f = _FlatFunction(layer)
    with PreservedState(layer.module):
        out_numel = f.output_numel()
    in_numel = sum(a.numel() for a in layer.args if torch.is_tensor(a))
    # working memory of one batched row: basis vector, result, and tangents of the activations
    per_row = f.theta.element_size() * (4 * f.P + 6 * out_numel + in_numel)
    c = chunk or row_chunk(f.P, per_row, layer.budget, reserved)
    order = torch.arange(f.P, device=f.theta.device) if index is None else index.to(f.theta.device)
    fail = _SecondOrderFailure(layer, how)
    prog = Progress(order.numel(), f"local Hessian {layer.name or '(model)'} [{how}]", progress, unit="row")
    try:
        if how == "generic":
            yield from _generic_rows(f, order, c, fail, prog)
        else:
            yield from _double_backward_rows(f, order, c, fail, prog)
    finally:
        prog.close()


class _FlatFunction:
    """``S_i`` as a function of the flat trainable vector ``theta`` (a cast, detached copy)."""

    def __init__(self, layer: PreparedLayer):
        self.layer = layer
        dtype = layer.dtype
        self.names = [n for n, _ in layer.params]
        self.sizes = [p.numel() for _, p in layer.params]
        self.shapes = [p.shape for _, p in layer.params]
        self.P = sum(self.sizes)
        trainable = set(self.names)
        mod = layer.module
        # frozen parameters and buffers enter functional_call as constants
        self.consts = {
            n: t.detach().to(dtype) if t.is_floating_point() else t.detach()
            for n, t in list(mod.named_parameters()) + list(mod.named_buffers())
            if n not in trainable
        }
        self.theta = torch.cat([p.detach().to(dtype).reshape(-1) for _, p in layer.params])

    def _call(self, pieces):
        ps = dict(self.consts)
        ps.update({n: t.reshape(s) for n, t, s in zip(self.names, pieces, self.shapes)})
        layer = self.layer
        return functional_call(layer.module, ps, layer.args, layer.kwargs, tie_weights=True, strict=False)

    def of_pieces(self, pieces) -> torch.Tensor:
        """``S_i`` at the per-tensor pieces of ``theta``."""
        return apply_phi(self.layer.phi, self.layer.act(self._call(pieces)))

    def of_flat(self, flat: torch.Tensor) -> torch.Tensor:
        return self.of_pieces(torch.split(flat, self.sizes))

    def output_numel(self) -> int:
        """Elements of the layer's output at ``theta`` (0 for a non-tensor output)."""
        with torch.no_grad():
            out = self._call(torch.split(self.theta, self.sizes))
        return out.numel() if torch.is_tensor(out) else 0

    def basis(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows ``e_j``, ``j`` in ``idx``: ``(len(idx), P)``."""
        E = self.zeros(idx.numel())
        E[torch.arange(idx.numel(), device=self.theta.device), idx] = 1
        return E

    def zeros(self, r: int) -> torch.Tensor:
        return torch.zeros(r, self.P, dtype=self.theta.dtype, device=self.theta.device)

    def assemble(self, parts, r: int) -> torch.Tensor:
        """``(r, P)`` rows from per-tensor gradients (``None``: that tensor does not enter)."""
        return torch.cat(
            [
                torch.zeros(r, n, dtype=self.theta.dtype, device=self.theta.device)
                if h is None
                else h.reshape(r, -1)
                for h, n in zip(parts, self.sizes)
            ],
            1,
        )


class _SecondOrderFailure:
    """Turns autograd's "no second derivative" errors into a HVPUnsupportedError naming the layer."""

    def __init__(self, layer: PreparedLayer, how: str):
        self.where, self.act_name, self.how = layer.name or "(model)", layer.act.name, how

    def __call__(self, e: RuntimeError) -> Exception:
        if is_second_order_failure(str(e)):
            return HVPUnsupportedError(
                f"layer {self.where!r} (activation {self.act_name!r}) contains an op without the second "
                f"derivative the {self.how!r} path needs: {str(e).splitlines()[0]}"
                + (". method='rows' (double backward) may work" if self.how == "generic" else "")
            )
        return e


def _generic_rows(f: _FlatFunction, order, c: int, fail, prog) -> Rows:
    """Rows by vmapped forward-over-reverse HVPs ``jvp(grad S)`` against basis vectors."""
    vhvp = vmap(lambda v: jvp(grad(f.of_flat), (f.theta,), (v,))[1])
    for s in range(0, order.numel(), c):
        idx = order[s : s + c]
        try:
            with PreservedState(f.layer.module), torch.enable_grad():
                rows = vhvp(f.basis(idx))
        except RuntimeError as err:
            raise fail(err) from err
        prog.update(idx.numel())
        yield idx, rows


def _double_backward_rows(f: _FlatFunction, order, c: int, fail, prog) -> Rows:
    """The seed's Algorithm 1 on one retained graph: row ``j`` is ``grad(g_j)``, ``g = grad S``."""
    leaves, g = _gradient_with_graph(f, fail)
    batched = c > 1
    s, R = 0, order.numel()
    while s < R:
        idx = order[s : s + (c if batched else 1)]
        if not g.requires_grad:  # every g_j is constant in theta: the rows are 0 (Algorithm 1, line 12)
            rows = f.zeros(idx.numel())
        elif batched:
            rows = _batched_rows(f, g, leaves, idx, fail)
            if rows is None:  # a backward without a batching rule: one row at a time
                batched = False
                continue
        else:
            rows = _single_row(f, g, leaves, int(idx[0]), fail)
        prog.update(idx.numel())
        yield idx, rows
        s += idx.numel()


def _gradient_with_graph(f: _FlatFunction, fail) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``(leaves, g)``: per-tensor leaves of ``theta`` and the flat ``g = grad S`` with its graph."""
    leaves = [t.clone().requires_grad_(True) for t in torch.split(f.theta, f.sizes)]
    try:
        with PreservedState(f.layer.module), torch.enable_grad():
            gparts = torch.autograd.grad(f.of_pieces(leaves), leaves, create_graph=True, allow_unused=True)
    except RuntimeError as err:
        raise fail(err) from err
    g = torch.cat(
        [
            torch.zeros(n, dtype=f.theta.dtype, device=f.theta.device) if gi is None else gi.reshape(-1)
            for gi, n in zip(gparts, f.sizes)
        ]
    )
    return leaves, g


def _batched_rows(f: _FlatFunction, g, leaves, idx, fail) -> torch.Tensor | None:
    """Rows ``idx`` from one batched backward; ``None`` when a backward has no batching rule."""
    try:
        parts = torch.autograd.grad(
            g,
            leaves,
            grad_outputs=f.basis(idx),
            retain_graph=True,
            allow_unused=True,
            is_grads_batched=True,
        )
    except RuntimeError as err:
        if is_second_order_failure(str(err)) and "atching rule" not in str(err):
            raise fail(err) from err
        return None
    return f.assemble(parts, idx.numel())


def _single_row(f: _FlatFunction, g, leaves, j: int, fail) -> torch.Tensor:
    """Row ``j``: one backward of ``g_j`` (zero when ``g_j`` is constant in ``theta``)."""
    if not g[j].requires_grad:
        return f.zeros(1)
    try:
        parts = torch.autograd.grad(g[j], leaves, retain_graph=True, allow_unused=True)
    except RuntimeError as err:
        raise fail(err) from err
    return f.assemble(parts, 1)
