"""Hessian-vector-product backbones.

All backbones compute ``v -> H v`` for the Hessian of one batch's loss with respect to the
selected parameter tensors, for a single probe (a list of per-tensor tangents) or a batch
of probes (every tangent with a leading probe dimension).

``reverse``
    Reverse-over-reverse (double backward). The first-order graph
    ``g = autograd.grad(loss, theta, create_graph=True)`` is built ONCE per batch and each
    probe costs one backward pass through it: ``Hv = autograd.grad(g, theta, v)``.
``reverse-batched``
    The same graph, several probes per backward via ``is_grads_batched=True`` (vmap over
    the backward graph).
``forward``
    Forward-over-reverse, ``torch.func.jvp(torch.func.grad(f), (theta,), (v,))`` on a
    ``functional_call`` of the model. No graph is kept between probes. (Never
    ``jvp(jacrev(f))``: it returns wrong products for LayerNorm weights on current torch.)
``forward-vmap``
    ``torch.func.vmap`` of ``forward`` over chunks of probes.
``auto``
    Times the candidates on the first probes of a call (those products are used, not
    wasted), keeps the fastest for the remaining probes, and caches the timings per
    model / input signature.

Every forward pass of one batch runs from the same RNG state (:class:`~hutchtrace.state.ForwardRNG`),
so all probes see the same dropout mask.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from .errors import HVPUnsupportedError, LossError, is_second_order_failure, unsupported_hvp
from .loss import BatchClosure, check_loss_value
from .state import ForwardRNG

__all__ = [
    "BACKBONES",
    "HVPBackbone",
    "ReverseHVP",
    "ForwardHVP",
    "make_backbone",
    "register_backbone",
    "backbones_for",
    "AutoHVP",
]

BACKBONES = ("reverse", "reverse-batched", "forward", "forward-vmap")


def _no_dependence_error() -> LossError:
    return LossError(
        "the loss does not depend on any of the selected trainable parameters (no gradient path); "
        "check that the closure calls the model and that the blocks select parameters the loss uses"
    )


class HVPBackbone:
    """Base class: ``prepare(batch)`` once per batch, then ``hvp(vs)`` per probe (chunk)."""

    name = "base"
    batched = False
    #: ``hvp(vs, support=...)`` is accepted (see :meth:`ReverseHVP.hvp`)
    accepts_support = False

    def __init__(self, model: nn.Module, names: Sequence[str], tensors: Sequence[torch.Tensor], rng: ForwardRNG):
        self.model = model
        self.names = list(names)
        self.tensors = list(tensors)
        self.rng = rng
        self.batch: BatchClosure | None = None

    def prepare(self, batch: BatchClosure) -> None:
        self.batch = batch

    def hvp(self, vs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError

    def release(self) -> None:
        self.batch = None

    def _wrap_errors(self, exc: RuntimeError, alternatives: list[str]) -> Exception:
        msg = str(exc)
        if is_second_order_failure(msg):
            return unsupported_hvp(self.name, msg, alternatives)
        return exc


def once_differentiable_functions(loss: torch.Tensor) -> list[str]:
    """Names of custom autograd.Functions with a ``@once_differentiable`` backward in the
    graph of ``loss``. Their gradients are detached by PyTorch, so a double backward through
    them returns zero curvature instead of failing."""
    found: list[str] = []
    seen: set[int] = set()
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        cls = getattr(node, "_forward_cls", None)
        if cls is not None and hasattr(getattr(cls, "backward", None), "__wrapped__"):
            if cls.__name__ not in found:
                found.append(cls.__name__)
        stack.extend(nxt for nxt, _ in node.next_functions)
    return found


class ReverseHVP(HVPBackbone):
    """Double backward through a first-order graph built once per batch."""

    name = "reverse"
    accepts_support = True

    def __init__(self, *args, batched: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.batched = batched
        if batched:
            self.name = "reverse-batched"
        self._grads: list[torch.Tensor] | None = None
        self._live: list[int] = []
        self.loss_value: torch.Tensor | None = None

    def prepare(self, batch: BatchClosure) -> None:
        super().prepare(batch)
        with torch.enable_grad(), self.rng.forward():
            loss = check_loss_value(batch.fn(self.model))
        if not loss.requires_grad:
            raise _no_dependence_error()
        once = once_differentiable_functions(loss)
        if once:
            raise HVPUnsupportedError(
                f"the model uses custom autograd.Function(s) {once} whose backward is "
                "@once_differentiable: double backward would silently drop the curvature through "
                "them (PyTorch detaches their gradients). Give the Function a differentiable "
                "backward, or use hvp='forward' with a Function that implements jvp."
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


class _ClosureModule(nn.Module):
    """Lets ``functional_call`` reparametrise a model around an arbitrary closure."""

    def __init__(self, model: nn.Module, fn):
        super().__init__()
        self.model = model
        self._fn = fn

    def forward(self):
        return self._fn(self.model)


class ForwardHVP(HVPBackbone):
    """Forward-over-reverse: ``jvp(grad(f))`` on a functional call; no retained graph."""

    name = "forward"

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


_REGISTRY: dict[str, tuple[str, object]] = {}


def register_backbone(name: str, factory, curvature: str = "hessian") -> None:
    """Register ``factory(model, names, tensors, rng) -> HVPBackbone`` under ``name``.

    ``curvature`` names the matrix the backbone multiplies by (``"hessian"``, ``"ggn"``);
    ``hvp="auto"`` chooses among the backbones of the requested curvature.
    """
    _REGISTRY[name] = (curvature, factory)


def backbones_for(curvature: str) -> tuple[str, ...]:
    """Registered backbone names of one curvature, in registration order."""
    if curvature == "ggn":
        from . import ggn  # noqa: F401  (registers the GGN backbones)
    names = tuple(n for n, (c, _) in _REGISTRY.items() if c == curvature)
    if not names:
        raise ValueError(f"unknown curvature {curvature!r}; use 'hessian' or 'ggn'")
    return names


register_backbone("reverse", lambda *a: ReverseHVP(*a))
register_backbone("reverse-batched", lambda *a: ReverseHVP(*a, batched=True))
register_backbone("forward", lambda *a: ForwardHVP(*a))
register_backbone("forward-vmap", lambda *a: ForwardHVP(*a, batched=True))


def make_backbone(name: str, model, names, tensors, rng) -> HVPBackbone:
    """Construct the registered backbone called ``name`` (see :func:`backbones_for`)."""
    if name not in _REGISTRY and name.startswith("ggn"):
        from . import ggn  # noqa: F401
    if name not in _REGISTRY:
        raise ValueError(f"unknown hvp backbone {name!r}; choose 'auto' or one of {tuple(_REGISTRY)}")
    return _REGISTRY[name][1](model, names, tensors, rng)


# Timings per (model structure, input signature): backbone -> (prepare s, per-row s, chunk rows)
_AUTO_CACHE: dict[tuple, dict[str, tuple[float, float, int]]] = {}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class AutoHVP:
    """Chooses the fastest backbone by timing each once on real probes of the call.

    ``choose(rows_total)`` returns the backbone name minimising
    ``prepare + rows_total * per_row`` per batch from the measured (or cached) timings.
    Candidates that fail on an op are dropped; if all fail, the first error is raised.
    """

    def __init__(self, key: tuple, candidates: Sequence[str] = BACKBONES):
        self.key = key
        self.timings = _AUTO_CACHE.setdefault(key, {})
        self.candidates = [c for c in candidates]
        self.errors: dict[str, Exception] = {}

    def untimed(self) -> list[str]:
        return [c for c in self.candidates if c not in self.timings and c not in self.errors]

    def record(self, name: str, prepare_s: float, per_row_s: float, rows: int) -> None:
        self.timings[name] = (prepare_s, per_row_s, rows)

    def fail(self, name: str, exc: Exception) -> None:
        self.errors[name] = exc

    def choose(self, rows_total: int) -> str:
        usable = {k: v for k, v in self.timings.items() if k in self.candidates and k not in self.errors}
        if not usable:
            first = next(iter(self.errors.values()), None)
            if isinstance(first, HVPUnsupportedError):
                names = ", ".join(self.errors)
                raise HVPUnsupportedError(f"no HVP backbone works for this model (tried {names}). {first}")
            if first is not None:
                raise first
            raise RuntimeError("no HVP backbone was timed")
        return min(usable, key=lambda k: usable[k][0] + rows_total * usable[k][1])


class Stopwatch:
    """Wall-clock timing that synchronises the device first."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        _sync(self.device)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        _sync(self.device)
        self.seconds = time.perf_counter() - self.t0
