"""The backbone interface and registry: every backbone computes ``v -> H v`` for one batch.

A backbone multiplies by the Hessian (or another curvature, e.g. the GGN of :mod:`.ggn`) of one
batch's loss with respect to the selected parameter tensors, for a single probe (a list of
per-tensor tangents) or a batch of probes (every tangent with a leading probe dimension).
The registered Hessian backbones:

``reverse``
    Reverse-over-reverse (double backward). The first-order graph
    ``g = autograd.grad(loss, theta, create_graph=True)`` is built ONCE per batch and each
    probe costs one backward pass through it: ``Hv = autograd.grad(g, theta, v)``.
    Exact through ``torch.utils.checkpoint(use_reentrant=False)`` (the default of Hugging
    Face's ``gradient_checkpointing_enable``); the reentrant form cannot run under
    ``autograd.grad`` and is refused with the fix named.
``reverse-batched``
    The same graph, several probes per backward via ``is_grads_batched=True`` (vmap over
    the backward graph).
``forward``
    Forward-over-reverse, ``torch.func.jvp(torch.func.grad(f), (theta,), (v,))`` on a
    ``functional_call`` of the model. No graph is kept between probes. (Never
    ``jvp(jacrev(f))``: it returns wrong products for LayerNorm weights on current torch.)
    Needs forward-mode derivatives of every op, ``setup_context`` + ``jvp`` on custom
    ``autograd.Function`` s, and no saved-tensor hooks (so no gradient checkpointing).
``forward-vmap``
    ``torch.func.vmap`` of ``forward`` over chunks of probes.
``auto``
    :class:`~hutchtrace.backbones.auto.AutoHVP` (its rules are in :mod:`.auto`).

Every forward pass of one batch runs from the same RNG state (:class:`~hutchtrace.core.state.ForwardRNG`),
so all probes of a call see the same dropout mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..core.errors import (
    LossError,
    is_second_order_failure,
    unsupported_hvp,
)
from ..core.state import ForwardRNG
from ..problem.loss import BatchClosure

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
    #: backbones of one family multiply by the same matrix (``auto`` compares families)
    family = None
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


class _ClosureModule(nn.Module):
    """Lets ``functional_call`` reparametrise a model around an arbitrary closure."""

    def __init__(self, model: nn.Module, fn):
        super().__init__()
        self.model = model
        self._fn = fn

    def forward(self):
        return self._fn(self.model)


_REGISTRY: dict[str, tuple[str, object]] = {}
#: backbone name -> (family, batched); see :func:`register_backbone`
_KINDS: dict[str, tuple[str, bool]] = {}
_BATCH_SUFFIXES = ("-batched", "-vmap")


def register_backbone(name: str, factory, curvature: str = "hessian", family: str | None = None,
                      batched: bool | None = None) -> None:
    """Register ``factory(model, names, tensors, rng) -> HVPBackbone`` under ``name``.

    ``curvature`` names the matrix the backbone multiplies by (``"hessian"``, ``"ggn"``);
    ``hvp="auto"`` chooses among the backbones of the requested curvature. ``family``
    groups backbones that compute the same products the same way (default: ``name`` less a
    ``-batched``/``-vmap`` suffix); ``auto`` checks a family against the reference family
    before using its products. ``batched``: whether ``hvp`` takes a leading probe dimension
    (default: from that suffix).
    """
    stem = name
    for suf in _BATCH_SUFFIXES:
        if name.endswith(suf):
            stem = name[: -len(suf)]
    _REGISTRY[name] = (curvature, factory)
    _KINDS[name] = (family or stem, stem != name if batched is None else bool(batched))


def backbones_for(curvature: str) -> tuple[str, ...]:
    """Registered backbone names of one curvature, in registration order."""
    names = tuple(n for n, (c, _) in _REGISTRY.items() if c == curvature)
    if not names:
        raise ValueError(f"unknown curvature {curvature!r}; use 'hessian' or 'ggn'")
    return names


def backbone_family(name: str) -> str:
    """The family of a registered backbone (``reverse``, ``forward``, ...)."""
    return _KINDS[name][0]


def is_batched(name: str) -> bool:
    """Whether a registered backbone takes a leading probe dimension."""
    return _KINDS[name][1]


def make_backbone(name: str, model, names, tensors, rng) -> HVPBackbone:
    """Construct the registered backbone called ``name`` (see :func:`backbones_for`)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown hvp backbone {name!r}; choose 'auto' or one of {tuple(_REGISTRY)}")
    return _REGISTRY[name][1](model, names, tensors, rng)
