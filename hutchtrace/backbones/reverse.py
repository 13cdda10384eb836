"""Reverse-over-reverse backbones (``reverse``, ``reverse-batched``): the exact symmetric Hessian
product from a first-order graph built once per batch (see :mod:`.base`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..core.errors import (
    CHECKPOINT_FIX,
    HVPUnsupportedError,
)
from ..problem.loss import BatchClosure, check_loss_value
from .base import HVPBackbone, _no_dependence_error, register_backbone
from .graph import GraphReport, inspect_graph


class ReverseHVP(HVPBackbone):
    """Double backward through a first-order graph built once per batch."""

    name = "reverse"
    family = "reverse"
    accepts_support = True

    def __init__(self, *args, batched: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.batched = batched
        if batched:
            self.name = "reverse-batched"
        self._grads: list[torch.Tensor] | None = None
        self._live: list[int] = []
        self.loss_value: torch.Tensor | None = None
        #: what the last prepare() found in the graph (``auto`` reads it; None before)
        self.graph_report: GraphReport | None = None

    def prepare(self, batch: BatchClosure) -> None:
        super().prepare(batch)
        with torch.enable_grad(), self.rng.forward():
            loss = check_loss_value(batch.fn(self.model))
        if not loss.requires_grad:
            raise _no_dependence_error()
        report = self.graph_report = inspect_graph(loss)
        once = report.once_differentiable
        if once:
            fix = "give the Function a differentiable backward"
            raise HVPUnsupportedError(
                f"the model uses custom autograd.Function(s) {once} whose backward is "
                "@once_differentiable: double backward would silently drop the curvature through "
                f"them (PyTorch detaches their gradients). Fix: {fix}, or use hvp='forward' with a "
                "Function that implements jvp.",
                backbone=self.name, fix=fix + " (or a jvp, for the forward-mode backbones)",
                reason=f"custom autograd.Function(s) {once} have a @once_differentiable backward "
                "(double backward would silently drop their curvature)",
            )
        if report.reentrant_checkpoint:
            reason = "torch.utils.checkpoint with use_reentrant=True cannot run under torch.autograd.grad"
            raise HVPUnsupportedError(
                f"the model uses {reason} (every HVP needs it; PyTorch's forward mode cannot run the "
                f"reentrant checkpoint either). Fix: {CHECKPOINT_FIX}.",
                backbone=self.name, reason=reason, fix=CHECKPOINT_FIX,
            )
        try:
            grads = torch.autograd.grad(loss, self.tensors, create_graph=True, allow_unused=True)
        except RuntimeError as exc:
            raise self._wrap_errors(exc, ["forward"]) from exc
        if all(g is None for g in grads):
            raise _no_dependence_error()
        self.loss_value = loss.detach()
        self._grads = list(grads)
        # Gradients that are constant in theta (loss linear in a tensor) contribute H v = 0.
        self._live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]

    def sibling(self, batched: bool) -> ReverseHVP:
        """A ReverseHVP (``batched`` or not) sharing this one's prepared first-order graph:
        ``auto`` times both members of the family on one prepare."""
        other = ReverseHVP(self.model, self.names, self.tensors, self.rng, batched=batched)
        other.batch = self.batch
        other._grads = list(self._grads) if self._grads is not None else None
        other._live = list(self._live)
        other.loss_value = self.loss_value
        other.graph_report = self.graph_report
        return other

    def gradient(self) -> list[torch.Tensor]:
        """The batch gradient (zeros for unused tensors), detached."""
        assert self._grads is not None
        return [torch.zeros_like(t) if g is None else g.detach() for g, t in zip(self._grads, self.tensors)]

    def hvp(self, vs: Sequence[torch.Tensor], support: Sequence[int] | None = None) -> list[torch.Tensor]:
        """``H v`` for every tensor. ``support``: indices of the tensors whose tangent may be
        nonzero (the others MUST be zero). Only their gradients seed the double backward,

        .. math:: H v = \\sum_{i \\in S} \\partial (g_i \\cdot v_i) / \\partial \\theta ,

        so the parts of the first-order graph that feed no seeded gradient are never
        traversed: a block-supported probe costs about half a full HVP on typical nets.
        """
        assert self._grads is not None, "prepare() first"
        lead = (vs[0].shape[0],) if self.batched else ()
        if support is None:
            live = self._live
        else:
            keep = set(support)
            live = [i for i in self._live if i in keep]
        if not live:
            return [torch.zeros(lead + tuple(t.shape), dtype=t.dtype, device=t.device) for t in self.tensors]
        try:
            out = torch.autograd.grad(
                [self._grads[i] for i in live],
                self.tensors,
                grad_outputs=[vs[i] for i in live],
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=self.batched,
            )
        except RuntimeError as exc:
            raise self._wrap_errors(exc, ["forward", "reverse"] if self.batched else ["forward"]) from exc
        return [
            torch.zeros(lead + tuple(t.shape), dtype=t.dtype, device=t.device) if h is None else h
            for h, t in zip(out, self.tensors)
        ]

    def release(self) -> None:
        super().release()
        self._grads = None
        self._live = []
        self.loss_value = None


register_backbone("reverse", lambda *a: ReverseHVP(*a))
register_backbone("reverse-batched", lambda *a: ReverseHVP(*a, batched=True))
