"""Generalised Gauss-Newton (GGN) vector products: the backbones behind ``curvature="ggn"``.

For a criterion loss ``l(theta) = C(f(x; theta), y)`` with model outputs ``f`` (docs/maths.md section 5)

.. math:: H = G + T, \\qquad G = J^\\top \\Lambda J, \\qquad
          T = \\sum_k \\frac{\\partial C}{\\partial f_k} \\nabla^2_\\theta f_k,

where ``J = df/dtheta`` and ``Lambda = d^2 C / df^2`` is the Hessian of the criterion with
respect to the outputs (for a mean-reduced criterion over N samples it already carries the
``1/N``). ``G`` is PSD whenever ``C`` is convex in ``f``. One product costs one forward-mode
pass and one backward pass::

    (f, Jv) = jvp(f, theta, v)        # forward mode, functional_call of the model
    u       = Lambda (Jv)             # output Hessian of the criterion
    G v     = vjp(f, theta)(u)        # backward through a graph built once per batch

``Lambda u`` has analytic fast paths (they match the generic path to rounding, see the tests):

* softmax cross-entropy (``nn.CrossEntropyLoss`` / ``F.cross_entropy``, 2-D logits, class
  targets, no class weights, no ignored targets; label smoothing does not change
  ``Lambda``): ``Lambda u = (p * u - p (p . u)) / N``;
* squared error (``nn.MSELoss``, ``F.mse_loss``, :class:`hutchtrace.zoo.MeanSquared`):
  ``Lambda u = 2 u / numel`` (``2 u`` for ``reduction="sum"``);
* ``nn.BCEWithLogitsLoss`` without weights: ``Lambda u = s (1 - s) u / numel``.

Any other criterion goes through the generic path: reverse-over-reverse on the criterion
alone, ``u -> d/df <dC/df, u>``, whose small graph is built once per batch. (Forward-over-
reverse would hit PyTorch's ZeroTensor bug in ``F.mse_loss``; the model itself only ever
sees first-order forward and reverse mode.)

Backbones (registered under ``curvature="ggn"``): ``"ggn"`` (one probe per call) and
``"ggn-vmap"`` (a leading probe dimension: ``vmap`` over the jvp, ``is_grads_batched``
over the backward). Every forward of one batch replays the same RNG state, so dropout
masks agree between the jvp, the retained graph and the Hessian backbones.

Example:
    >>> import torch, hutchtrace
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    >>> res = hutchtrace.block_traces(net, torch.nn.CrossEntropyLoss(), K=8, data=(x, y),
    ...                               curvature="ggn", seed=0)
    >>> all(b.mean >= 0 for b in res.blocks)   # G is PSD: every diagonal block has tr >= 0
    True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp, vmap

from ..core.errors import LossError
from ..problem.loss import BatchClosure, MeanSquared, call_model, check_loss_value
from .base import HVPBackbone, _ClosureModule, _no_dependence_error, register_backbone

__all__ = ["GGN_NEEDS_CRITERION", "GGNProduct", "output_hessian"]

GGN_NEEDS_CRITERION = (
    "curvature='ggn' needs a criterion loss(outputs, targets) with data: the Gauss-Newton matrix "
    "J^T Lambda J is defined through the split loss = criterion(model(inputs), targets). A closure "
    "loss(model) hides the model outputs; pass loss=criterion and data=(inputs, targets) instead"
)


# ---------------------------------------------------------------------------- output Hessian
def _ce_fast_path(criterion, out: torch.Tensor, targets) -> bool:
    if isinstance(criterion, nn.CrossEntropyLoss):
        if criterion.weight is not None or criterion.reduction not in ("mean", "sum"):
            return False
        ignore = criterion.ignore_index
    elif criterion is F.cross_entropy:
        ignore = -100
    else:
        return False
    return (
        out.dim() == 2
        and torch.is_tensor(targets)
        and targets.dim() == 1
        and not targets.is_floating_point()
        and targets.shape[0] == out.shape[0]
        and not bool((targets == ignore).any())
    )


def _reduction(criterion) -> str:
    return getattr(criterion, "reduction", "mean")


def _mse_fast_path(criterion, out: torch.Tensor, targets) -> bool:
    ok_type = isinstance(criterion, (nn.MSELoss, MeanSquared)) or criterion is F.mse_loss
    return (
        ok_type
        and _reduction(criterion) in ("mean", "sum")
        and torch.is_tensor(targets)
        and targets.shape == out.shape
    )


def _bce_fast_path(criterion, out: torch.Tensor, targets) -> bool:
    return (
        isinstance(criterion, nn.BCEWithLogitsLoss)
        and criterion.weight is None
        and criterion.pos_weight is None
        and criterion.reduction in ("mean", "sum")
        and torch.is_tensor(targets)
        and targets.shape == out.shape
    )


def output_hessian(criterion: Callable, out: torch.Tensor, targets, *, batched: bool = False,
                   fast: bool = True) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """The map ``u -> Lambda u`` with ``Lambda = d^2 criterion(out, targets) / d out^2``.

    Args:
        criterion: ``criterion(outputs, targets) -> scalar``.
        out: the model outputs (detached inside).
        targets: the targets.
        batched: ``u`` carries a leading probe dimension.
        fast: allow the analytic paths (cross-entropy, squared error, BCE with logits).

    Returns:
        ``(apply, kind)`` with ``kind`` in ``{"cross-entropy", "squared-error", "bce-logits",
        "generic"}``.

    Example:
        >>> out, y = torch.randn(5, 3), torch.randint(0, 3, (5,))
        >>> lam, kind = output_hessian(torch.nn.CrossEntropyLoss(), out, y)
        >>> kind
        'cross-entropy'
        >>> gen, _ = output_hessian(lambda o, t: F.cross_entropy(o, t), out, y)
        >>> u = torch.randn(5, 3)
        >>> torch.allclose(lam(u), gen(u), atol=1e-6)
        True
    """
    out = out.detach()
    if fast and _ce_fast_path(criterion, out, targets):
        p = torch.softmax(out, dim=-1)
        scale = 1.0 / out.shape[0] if _reduction(criterion) == "mean" else 1.0

        def ce(u: torch.Tensor) -> torch.Tensor:
            return (p * u - p * (p * u).sum(-1, keepdim=True)) * scale

        return ce, "cross-entropy"
    if fast and _mse_fast_path(criterion, out, targets):
        scale = 2.0 / out.numel() if _reduction(criterion) == "mean" else 2.0
        return (lambda u: u * scale), "squared-error"
    if fast and _bce_fast_path(criterion, out, targets):
        s = torch.sigmoid(out)
        d = s * (1 - s) * (1.0 / out.numel() if criterion.reduction == "mean" else 1.0)
        return (lambda u: u * d), "bce-logits"

    leaf = out.clone().requires_grad_(True)
    with torch.enable_grad():
        value = check_loss_value(criterion(leaf, targets))
        if not value.requires_grad:
            raise LossError(
                "the criterion does not depend on the model outputs (no gradient path from "
                "criterion(outputs, targets) to outputs); check the criterion"
            )
        (g,) = torch.autograd.grad(value, leaf, create_graph=True)
    if not g.requires_grad:  # criterion linear in the outputs: Lambda = 0

        def zero(u: torch.Tensor) -> torch.Tensor:
            return torch.zeros_like(u)

        return zero, "generic"

    def generic(u: torch.Tensor) -> torch.Tensor:
        (r,) = torch.autograd.grad(g, leaf, grad_outputs=u, retain_graph=True, allow_unused=True,
                                   is_grads_batched=batched)
        return torch.zeros_like(u) if r is None else r

    return generic, "generic"


# ---------------------------------------------------------------------------- backbone
class GGNProduct(HVPBackbone):
    """``v -> G v = J^T Lambda J v`` for one batch (see the module docstring).

    ``prepare(batch)`` runs one forward with autograd (kept for the ``J^T`` products) and
    builds ``Lambda``; ``hvp(vs)`` then costs one jvp and one backward per probe (or per
    chunk of probes when ``batched``).
    """

    name = "ggn"

    def __init__(self, *args, batched: bool = False, fast: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.batched = batched
        if batched:
            self.name = "ggn-vmap"
        self.fast = fast
        self._primals = tuple(t.detach() for t in self.tensors)
        self._keys = ["model." + n for n in self.names]
        self._out: torch.Tensor | None = None
        self._lam = None
        self._jv = None
        self.output_hessian_kind: str | None = None

    def prepare(self, batch: BatchClosure) -> None:
        super().prepare(batch)
        if batch.criterion is None:
            raise LossError(GGN_NEEDS_CRITERION)
        inputs, targets, criterion = batch.inputs, batch.targets, batch.criterion
        with torch.enable_grad(), self.rng.forward():
            out = call_model(self.model, inputs)
        if not torch.is_tensor(out) or not out.is_floating_point():
            raise LossError(
                f"curvature='ggn' needs the model to return one floating-point tensor of outputs, got "
                f"{type(out).__name__}; wrap the model so that forward returns the tensor the criterion reads"
            )
        if not out.requires_grad:
            raise _no_dependence_error()
        self._out = out
        self._lam, self.output_hessian_kind = output_hessian(criterion, out, targets, batched=self.batched,
                                                             fast=self.fast)
        wrapper = _ClosureModule(self.model, lambda m: call_model(m, inputs))
        keys = self._keys
        primals = self._primals

        def f(*ps):
            return functional_call(wrapper, dict(zip(keys, ps)), (), tie_weights=True, strict=False)

        def jv(*vs):
            return jvp(f, primals, vs)[1]

        self._jv = vmap(jv, in_dims=0, randomness="same") if self.batched else jv

    def hvp(self, vs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        assert self._out is not None and self._jv is not None, "prepare() first"
        try:
            with self.rng.forward():
                Jv = self._jv(*vs)
            u = self._lam(Jv)
            out = torch.autograd.grad(self._out, self.tensors, grad_outputs=u, retain_graph=True,
                                      allow_unused=True, is_grads_batched=self.batched)
        except RuntimeError as exc:
            raise self._wrap_errors(exc, ["ggn"] if self.batched else []) from exc
        lead = (vs[0].shape[0],) if self.batched else ()
        return [
            torch.zeros(lead + tuple(t.shape), dtype=t.dtype, device=t.device) if g is None else g
            for g, t in zip(out, self.tensors)
        ]

    def release(self) -> None:
        super().release()
        self._out = None
        self._lam = None
        self._jv = None


register_backbone("ggn", lambda *a: GGNProduct(*a), curvature="ggn")
register_backbone("ggn-vmap", lambda *a: GGNProduct(*a, batched=True), curvature="ggn")
