"""Exact dense Hessians of small models: the references every estimator is tested against.

:func:`exact_hessian` returns the full ``P x P`` Hessian of the same loss
:func:`~hutchtrace.block_traces` estimates, over the same selected parameters, in the same
global element order (so ``H[I_b, I_b]`` is block ``b``), together with the layout. It
shares the estimator's loss normalisation (closure / criterion / dataset mean) and its
model handling (BatchNorm in train mode, math attention, restored state), so a mismatch
means an estimator bug, not a modelling difference.

Methods:
    ``"func"``: ``torch.func.jacfwd(torch.func.grad(f))``, the forward-over-reverse Jacobian
    of the gradient. (Not ``torch.func.hessian``, i.e. ``jacfwd(jacrev(f))``: on current torch
    it returns a wrong, asymmetric matrix for LayerNorm / BatchNorm models.)
    ``"autograd"``: one forward pass, then rows ``e_i^T H`` by batched double backward.
    Models that draw random numbers in ``forward`` (dropout) need ``"autograd"``: its single
    forward fixes the mask, exactly as the estimator's backbones do.
    ``"auto"`` (default): ``"func"``, kept only if it is symmetric to rounding
    (``max|H - H^T| <= sqrt(eps) max|H|``), else ``"autograd"``. PyTorch's autograd modes
    disagree on some ops: for ``nn.Embedding(padding_idx=...)`` with pad tokens,
    forward-over-reverse zeroes only the pad *row* of the Hessian (a non-symmetric matrix),
    double backward the row and the column. The symmetric double-backward matrix is the
    reference, as for the estimator's ``hvp="auto"``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, jacfwd

from ..core.errors import MemoryBudgetError
from ..core.state import ForwardRNG, PreservedState
from ..problem.blocks import BlockLayout, resolve_blocks, unwrap_model
from ..problem.loss import check_loss_value, make_loss_spec
from .base import _ClosureModule

__all__ = ["exact_hessian", "exact_block_traces", "block_slices"]

DEFAULT_MAX_ENTRIES = 64_000_000  # 512 MB of float64


def block_slices(layout: BlockLayout) -> list[torch.Tensor]:
    """Index tensors ``I_b`` of each block into the concatenated selected parameters."""
    starts = []
    pos = 0
    for t in layout.tensors:
        starts.append(pos)
        pos += t.numel()
    out = []
    for b in range(layout.num_blocks):
        idx = [torch.arange(starts[j], starts[j] + layout.tensors[j].numel()) for j in layout.tensors_of(b)]
        out.append(torch.cat(idx) if idx else torch.zeros(0, dtype=torch.int64))
    return out


def exact_hessian(
    model: nn.Module,
    loss,
    *,
    data=None,
    blocks="param",
    method: str = "auto",
    dtype: torch.dtype | None = torch.float64,
    max_entries: int = DEFAULT_MAX_ENTRIES,
) -> tuple[torch.Tensor, BlockLayout]:
    """The dense Hessian of the loss w.r.t. the selected parameters.

    Args:
        model, loss, data, blocks: as in :func:`hutchtrace.block_traces`.
        method: ``"func"`` (``jacfwd(grad(f))``), ``"autograd"`` (double backward on one
            forward; required for models with dropout) or ``"auto"`` (``"func"``, then
            ``"autograd"`` if some op lacks forward-mode AD).
        dtype: compute in this dtype (a float64 copy of the model is used); ``None`` keeps
            the model's dtype.
        max_entries: refuse when ``P^2`` exceeds this (a clear :class:`MemoryBudgetError`).

    Returns:
        ``(H, layout)``: ``H`` is ``(P, P)`` over the selected tensors in global order.

    Example:
        >>> net = nn.Linear(3, 1)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> H, layout = exact_hessian(net, nn.functional.mse_loss, data=(x, y))
        >>> H.shape
        torch.Size([4, 4])
    """
    model = unwrap_model(model)
    layout = resolve_blocks(model, blocks)
    P = sum(t.numel() for t in layout.tensors)
    if P * P > max_entries:
        raise MemoryBudgetError(
            f"the exact Hessian would have {P}^2 = {P * P:,} entries (> max_entries={max_entries:,}); "
            "use the stochastic estimators (block_traces) for models of this size"
        )
    spec = make_loss_spec(loss, data)
    if dtype is not None and any(t.dtype != dtype for t in layout.tensors):
        # Work on a converted copy so the caller's model is untouched.
        import copy

        work = copy.deepcopy(model).to(dtype)
        layout_w = resolve_blocks(work, _remap_blocks(blocks, model, work))
    else:
        work, layout_w = model, layout
    H = torch.zeros((P, P), dtype=layout_w.tensors[0].dtype, device=layout_w.device())
    total = 0.0
    with PreservedState(work):
        rng = ForwardRNG([layout_w.device()])
        for batch in spec.batches():
            fn = batch.fn
            if dtype is not None:
                fn = _casting(fn, dtype)
            rng.start_batch()
            Hm = _hessian_one(work, layout_w, fn, method, rng)
            rng.end_batch()
            H += batch.weight * Hm
            total += batch.count
    H /= total
    return H, layout


def _remap_blocks(blocks, model, work):
    """Translate tensor/module block entries of ``model`` to the deep copy ``work``."""
    if isinstance(blocks, dict):
        tmap = {id(p): q for p, q in zip(model.parameters(), work.parameters())}
        mmap = {id(m): w for m, w in zip(model.modules(), work.modules())}

        def tr(item):
            if isinstance(item, torch.Tensor):
                return tmap.get(id(item), item)
            if isinstance(item, nn.Module):
                return mmap.get(id(item), item)
            return item

        return {
            k: ([tr(i) for i in v] if isinstance(v, (list, tuple, set)) else tr(v)) for k, v in blocks.items()
        }
    return blocks


def _casting(fn, dtype):
    """Run a batch closure with floating inputs cast: the copy of the model is in ``dtype``."""

    def cast(obj):
        if torch.is_tensor(obj) and obj.is_floating_point():
            return obj.to(dtype)
        return obj

    def wrapped(model):
        # criterion closures capture their inputs; re-cast them through a forward pre-hook
        handle = model.register_forward_pre_hook(
            lambda mod, args, kwargs: (tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}),
            with_kwargs=True,
        )
        try:
            out = fn(model)
        finally:
            handle.remove()
        return out.to(dtype) if torch.is_tensor(out) else out

    return wrapped


def _hessian_one(model, layout, fn, method, rng) -> torch.Tensor:
    if method == "auto":
        try:
            H = _hessian_one(model, layout, fn, "func", rng)
        except RuntimeError:
            return _hessian_one(model, layout, fn, "autograd", rng)
        if _is_symmetric(H):
            return H
        return _hessian_one(model, layout, fn, "autograd", rng)
    tensors = layout.tensors
    shapes = [t.shape for t in tensors]
    sizes = [t.numel() for t in tensors]
    if method == "func":
        keys = ["model." + n for n in layout.names]
        wrapper = _ClosureModule(model, fn)

        def f(flat):
            parts = torch.split(flat, sizes)
            ps = {k: p.reshape(s) for k, p, s in zip(keys, parts, shapes)}
            return check_loss_value(functional_call(wrapper, ps, (), tie_weights=True, strict=False))

        theta = torch.cat([t.detach().reshape(-1) for t in tensors])
        with rng.forward():
            return jacfwd(grad(f))(theta)
    if method == "autograd":
        with torch.enable_grad(), rng.forward():
            loss = check_loss_value(fn(model))
        grads = torch.autograd.grad(loss, tensors, create_graph=True, allow_unused=True)
        g = torch.cat([
            (torch.zeros(n, dtype=t.dtype, device=t.device) if gi is None else gi.reshape(-1))
            for gi, t, n in zip(grads, tensors, sizes)
        ])
        P = g.numel()
        rows = []
        eye = torch.eye(P, dtype=g.dtype, device=g.device)
        if not g.requires_grad:
            return torch.zeros((P, P), dtype=g.dtype, device=g.device)
        for s in range(0, P, 256):
            hs = torch.autograd.grad(g, tensors, grad_outputs=eye[s : s + 256], retain_graph=True,
                                     allow_unused=True, is_grads_batched=True)
            rows.append(torch.cat([
                (torch.zeros(h_.shape[0] if h_ is not None else eye[s:s+256].shape[0], n, dtype=g.dtype, device=g.device)
                 if h_ is None else h_.reshape(h_.shape[0], -1))
                for h_, n in zip(hs, sizes)
            ], 1))
        return torch.cat(rows, 0)
    raise ValueError(f"method must be 'func' or 'autograd', got {method!r}")


def _is_symmetric(H: torch.Tensor) -> bool:
    """``max|H - H^T| <= sqrt(eps) max|H|``: rounding leaves about ``eps``; an operator the
    autograd modes disagree on leaves O(1) relative asymmetry (see the module docs)."""
    scale = float(H.abs().max()) if H.numel() else 0.0
    tol = torch.finfo(H.dtype).eps ** 0.5 * scale
    return float((H - H.T).abs().max()) <= tol if H.numel() else True


def exact_block_traces(H: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """``(L,)`` tensor of exact ``tr H_bb`` from a dense Hessian."""
    d = torch.diagonal(H)
    return torch.stack([d[idx].sum() for idx in block_slices(layout)])
