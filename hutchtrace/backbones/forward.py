"""Forward-over-reverse backbones (``forward``, ``forward-vmap``): ``jvp(grad(f))`` on a functional
call of the model, no graph kept between probes (see :mod:`.base`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.func import functional_call, grad, jvp, vmap

from ..core.errors import (
    CHECKPOINT_FIX,
    HVPUnsupportedError,
)
from ..problem.loss import BatchClosure, check_loss_value
from .base import HVPBackbone, _ClosureModule, _no_dependence_error, register_backbone
from .graph import GraphReport, inspect_graph


class ForwardHVP(HVPBackbone):
    """Forward-over-reverse: ``jvp(grad(f))`` on a functional call; no retained graph."""

    name = "forward"
    family = "forward"

    def __init__(self, *args, batched: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.batched = batched
        if batched:
            self.name = "forward-vmap"
        self._primals = tuple(t.detach() for t in self.tensors)
        self._keys = ["model." + n for n in self.names]
        self._single = None
        self._vmapped = None
        self._validated = False

    def prepare(self, batch: BatchClosure) -> None:
        super().prepare(batch)
        if not self._validated:
            # torch.func would differentiate a constant loss silently to zero: check once.
            with torch.enable_grad(), self.rng.forward():
                loss = check_loss_value(batch.fn(self.model))
            if not loss.requires_grad:
                raise _no_dependence_error()
            self._refuse_known_failures(inspect_graph(loss))
            self._validated = True
        wrapper = _ClosureModule(self.model, batch.fn)
        keys = self._keys

        def f(*ps):
            out = functional_call(wrapper, dict(zip(keys, ps)), (), tie_weights=True, strict=False)
            return check_loss_value(out)

        argnums = tuple(range(len(self._primals)))
        g = grad(f, argnums=argnums)
        primals = self._primals

        def single(*vs):
            return jvp(g, primals, vs)[1]

        self._single = single
        self._vmapped = vmap(single, in_dims=0, randomness="same") if self.batched else None

    def _refuse_known_failures(self, report: GraphReport) -> None:
        """Name what torch.func cannot run before it fails with a generic message."""
        if report.reentrant_checkpoint:
            reason = ("torch.utils.checkpoint with use_reentrant=True runs a legacy autograd.Function, "
                      "which torch.func cannot run (and torch.autograd.grad cannot run it either)")
            raise HVPUnsupportedError(
                f"The {self.name!r} HVP backbone cannot run: {reason}. Fix: {CHECKPOINT_FIX}.",
                backbone=self.name, reason=reason, fix=CHECKPOINT_FIX)
        why = report.forward_blockers().get(self.name)
        if why is not None:
            fix = ("use hvp='reverse', or give the Function(s) setup_context and jvp staticmethods "
                   "(and vmap or generate_vmap_rule=True for forward-vmap)")
            raise HVPUnsupportedError(f"The {self.name!r} HVP backbone cannot run: {why}. Fix: {fix}.",
                                      backbone=self.name, reason=why,
                                      fix="give the custom autograd.Function(s) setup_context and jvp "
                                          "staticmethods (and vmap or generate_vmap_rule=True)")

    def hvp(self, vs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        fn = self._vmapped if self.batched else self._single
        assert fn is not None, "prepare() first"
        try:
            with self.rng.forward():
                out = fn(*vs)
        except RuntimeError as exc:
            msg = str(exc)
            if "appears to not have been used in the graph" in msg or "does not require grad" in msg:
                raise _no_dependence_error() from exc
            raise self._wrap_errors(exc, ["reverse"]) from exc
        # parameters outside the blocks still require grad and enter the closure as
        # constants: without detach, every sample accumulated from these products would drag
        # an autograd graph along (memory growing with K)
        return [o.detach() for o in out]

    def release(self) -> None:
        super().release()
        self._single = None
        self._vmapped = None


register_backbone("forward", lambda *a: ForwardHVP(*a))
register_backbone("forward-vmap", lambda *a: ForwardHVP(*a, batched=True))
