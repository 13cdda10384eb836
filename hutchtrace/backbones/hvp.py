"""Hessian-vector-product backbones.

All backbones compute ``v -> H v`` for the Hessian of one batch's loss with respect to the
selected parameter tensors, for a single probe (a list of per-tensor tangents) or a batch
of probes (every tangent with a leading probe dimension).

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
    :class:`AutoHVP`, driven by :class:`~hutchtrace.estimate.engine.ProbeRunner` on the first batch of
    a run. The rules:

    * Backbones come in *families* that multiply by the same matrix (``reverse`` and
      ``reverse-batched``; ``forward`` and ``forward-vmap``). The first family that works is
      the *reference*: reverse-over-reverse for the Hessian, whose double backward is the
      symmetric Hessian. Both of its members share one first-order graph and are timed on
      real rows of the call (their products are used).
    * Another family (forward mode) is a *challenger*, through its batched member (the
      sequential forward-over-reverse product recomputes the forward and backward passes for
      every probe and was 2-10x slower than reverse mode on every model measured; it is only
      a fallback). It is timed only when the rows left in the batch are at least
      :data:`CHALLENGE_FACTOR` times the rows its timing takes, when it has not failed on
      this model before, when nothing in the first-order graph rules it out (a custom
      ``autograd.Function`` without ``setup_context``/``jvp``, reentrant checkpointing), and,
      until torch.func has been initialised in the process (its first use imports
      ``torch._dynamo``: seconds), only on a call estimated at :data:`CHALLENGE_MIN_SECONDS`
      or more. A warm-up :data:`CHALLENGE_ABORT` times slower per row than the reference's
      ends its timing. Before any of its products is used it multiplies one global comparison
      probe (a probe outside the call's rows, never used in the estimate) and must agree with
      the reference to rounding; otherwise it is rejected with one ``RuntimeWarning`` and
      ``meta["hvp_disagreement"]`` (PyTorch's autograd modes differ, e.g. ``nn.Embedding``
      with ``padding_idx``: forward-over-reverse zeroes the pad row only, not its column).
    * Every timed backbone runs a warm-up chunk, then two measurement chunks interleaved
      with the others' on rows of the same group. A challenger is chosen only when it is
      faster than the reference by :data:`MARGIN` in both measurements (its slower one
      against the reference's faster one). Within the reference family the fastest
      measurement decides (load only slows a measurement down).
    * A backbone that fails hands its rows back: every row of a run is evaluated exactly
      once, by backbones that agree (the engine checks this for every batch). When every
      candidate fails the error lists each with its reason, and only fixes to the model.
    * The measurements are cached per model structure (module tree, train/eval flags,
      parameter shapes), input signature and settings, and only when each candidate's two
      measurements are within :data:`MARGIN` of each other. A later call checks the cached
      choice on its first chunks and re-times when it is off by more than the margin.
      Deterministic failures and disagreements are cached too.

Every forward pass of one batch runs from the same RNG state (:class:`~hutchtrace.core.state.ForwardRNG`),
so all probes of a call see the same dropout mask.
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from ..core.errors import (
    CHECKPOINT_FIX,
    HVPUnsupportedError,
    LossError,
    is_second_order_failure,
    no_backbone_works,
    unsupported_hvp,
)
from ..core.state import ForwardRNG
from ..problem.loss import BatchClosure, check_loss_value

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


@dataclass
class GraphReport:
    """Custom ``autograd.Function`` s found in a loss's graph, by what they lack."""

    once_differentiable: list[str] = field(default_factory=list)
    #: no ``setup_context`` (ctx as forward's first argument) or no ``jvp``: torch.func's
    #: forward mode cannot run them
    no_forward_mode: list[str] = field(default_factory=list)
    #: no vmap rule: a vmapped forward-mode backbone cannot run them
    no_vmap: list[str] = field(default_factory=list)
    reentrant_checkpoint: bool = False

    def forward_blockers(self) -> dict[str, str]:
        """Backbone name -> why it cannot work, known before running it."""
        out = {}
        if self.no_forward_mode:
            why = (f"custom autograd.Function(s) {self.no_forward_mode} lack setup_context or jvp: "
                   "torch.func's forward mode cannot run them")
            out["forward"] = out["forward-vmap"] = why
        elif self.no_vmap:
            out["forward-vmap"] = f"custom autograd.Function(s) {self.no_vmap} have no vmap rule"
        return out


def _overrides(cls, name: str) -> bool:
    base = getattr(torch.autograd.function, "_SingleLevelFunction", torch.autograd.Function)
    return getattr(cls, name, None) is not getattr(base, name, None)


def inspect_graph(loss: torch.Tensor) -> GraphReport:
    """Walk the graph of ``loss`` once and report its custom ``autograd.Function`` s."""
    rep = GraphReport()
    seen: set[int] = set()
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        cls = getattr(node, "_forward_cls", None)
        if cls is not None:
            name = cls.__name__
            if name == "CheckpointFunction" and cls.__module__.startswith("torch.utils.checkpoint"):
                rep.reentrant_checkpoint = True
            if hasattr(getattr(cls, "backward", None), "__wrapped__") and name not in rep.once_differentiable:
                rep.once_differentiable.append(name)
            if not (_overrides(cls, "setup_context") and _overrides(cls, "jvp")):
                if name not in rep.no_forward_mode:
                    rep.no_forward_mode.append(name)
            elif not (getattr(cls, "generate_vmap_rule", False) or _overrides(cls, "vmap")):
                if name not in rep.no_vmap:
                    rep.no_vmap.append(name)
        stack.extend(nxt for nxt, _ in node.next_functions)
    return rep


def once_differentiable_functions(loss: torch.Tensor) -> list[str]:
    """Names of custom autograd.Functions with a ``@once_differentiable`` backward in the
    graph of ``loss``. Their gradients are detached by PyTorch, so a double backward through
    them returns zero curvature instead of failing."""
    return inspect_graph(loss).once_differentiable


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
    if curvature == "ggn":
        from . import ggn  # noqa: F401  (registers the GGN backbones)
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


#: ``auto`` takes a backbone of another family than the reference only when it is faster by
#: this factor in both of two interleaved measurements, and caches a choice only when each
#: timed backbone's two measurements lie within this factor of each other.
MARGIN = 1.25
#: ``auto`` times another family only when the rows left in the batch are at least this many
#: times the rows its timing takes: on a short call timing it costs more than it can save.
CHALLENGE_FACTOR = 4
#: a challenger whose warm-up chunk is this many times slower per row than the reference's
#: fastest warm-up is dropped before its measurement chunks (it cannot win by the margin)
CHALLENGE_ABORT = 3.0
#: the first torch.func transform of a process imports ``torch._dynamo`` (a one-off cost of
#: seconds, most of a first ``auto`` call that times forward mode): until something has done
#: that, forward mode is timed only on a call whose reverse-mode estimate is this long
CHALLENGE_MIN_SECONDS = 10.0


def forward_mode_initialised() -> bool:
    """Whether this process has paid torch.func's one-off import (see :data:`CHALLENGE_MIN_SECONDS`)."""
    return "torch._dynamo" in sys.modules

# Per (model structure, input signature, settings): what auto learned, see AutoHVP. At most
# _AUTO_CACHE_SIZE entries, oldest first out (a closure loss is keyed by its id: a fresh
# lambda per call would otherwise grow it without bound).
_AUTO_CACHE: dict[tuple, dict] = {}
_AUTO_CACHE_SIZE = 256


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """One backbone's timing on real rows: prepare seconds and per-row seconds of each
    measurement chunk (a warm-up chunk ran before and is not counted)."""

    prepare_s: float
    per_row_s: list[float]
    chunk: int

    def stable(self) -> bool:
        """Two measurements within :data:`MARGIN` of each other."""
        m = self.per_row_s
        return len(m) >= 2 and min(m) > 0 and max(m) <= MARGIN * min(m)

    def cost(self, rows: int, pick=statistics.median) -> float:
        """Seconds for one batch of ``rows`` rows: prepare once, then the rows."""
        return self.prepare_s + rows * pick(self.per_row_s)


def _deterministic(exc: Exception) -> bool:
    """A failure that will recur on the same model (not out-of-memory)."""
    oom = getattr(torch, "OutOfMemoryError", None)
    return not ((oom is not None and isinstance(exc, oom)) or "out of memory" in str(exc).lower())


def _without_traceback(exc: Exception) -> Exception:
    """A copy of ``exc`` for the process-wide cache: no traceback, so no frame (holding the
    model, the batch, a first-order graph) is kept alive by it."""
    try:
        copy = type(exc)(*exc.args)
    except Exception:  # an exception type with another constructor
        copy = RuntimeError(*exc.args)
    for attr in ("backbone", "reason", "fix"):
        if hasattr(exc, attr):
            setattr(copy, attr, getattr(exc, attr))
    return copy


def family_wide(exc: Exception) -> bool:
    """Whether a backbone's failure dooms every member of its family: a missing derivative of
    the family's autograd mode, yes; a missing batching rule or out-of-memory, no."""
    if not isinstance(exc, HVPUnsupportedError):
        return False
    why = str(exc.reason).lower()
    return not any(s in why for s in ("batching rule", "vmap", "out of memory"))


def agreement(w_ref: Sequence[torch.Tensor], w_other: Sequence[torch.Tensor], names: Sequence[str]):
    """``(relative difference, worst tensors)`` of two products of one probe.

    Per tensor ``||w_j - w'_j|| / (||w_j|| + sqrt(eps) ||w||)``: relative to the tensor's own
    product, with a floor for tensors whose product is rounding noise (a bias before
    BatchNorm). Rounding of two autograd modes stays below ``1e-3`` in float32 and ``1e-11``
    in float64 on every model of the test and benchmark suites.
    """
    ref = [w.detach().double().flatten() for w in w_ref]
    oth = [w.detach().double().flatten() for w in w_other]
    eps = torch.finfo(w_ref[0].dtype).eps if w_ref[0].is_floating_point() else 1e-16
    norms = torch.stack([r.norm() for r in ref])
    total = float(norms.norm())
    diffs = torch.stack([(r - o).norm() for r, o in zip(ref, oth)])
    rel = diffs / (norms + eps**0.5 * total).clamp_min(1e-300)
    worst = torch.argsort(rel, descending=True)[:3].tolist()
    return float(rel.max()), [names[j] for j in worst if float(rel[j]) > 0]


def agreement_tol(dtype: torch.dtype) -> float:
    """Largest relative difference (see :func:`agreement`) that is rounding: ``32 sqrt(eps)``
    (1.1e-2 in float32, 4.8e-7 in float64)."""
    return 32 * torch.finfo(dtype).eps ** 0.5


class AutoHVP:
    """The rules of ``hvp="auto"`` (module docs); :class:`~hutchtrace.estimate.engine.ProbeRunner`
    evaluates the rows and reports timings, failures and comparisons here.

    Args:
        key: the cache key (model structure, input signature, settings).
        candidates: registered backbone names of the requested curvature.
        batched_ok: whether batched backbones may be used (more than one row per chunk).
    """

    def __init__(self, key: tuple, candidates: Sequence[str], batched_ok: bool = True):
        self.key = key
        if key not in _AUTO_CACHE:
            while len(_AUTO_CACHE) >= _AUTO_CACHE_SIZE:
                _AUTO_CACHE.pop(next(iter(_AUTO_CACHE)))
        self.entry = _AUTO_CACHE.setdefault(
            key, {"failed": {}, "disagree": {}, "timings": {}, "challenged": False})
        self.candidates = [c for c in candidates if batched_ok or not is_batched(c)] or list(candidates)
        self.batched_ok = batched_ok
        self.errors: dict[str, Exception] = {}
        self.timings: dict[str, Timing] = {}
        self.disagreement: dict | None = None
        #: challenger -> relative difference from the reference on the comparison probe
        self.compared: dict[str, float] = {}
        self.validated = False
        self.from_cache = False
        #: the other families were timed (or ruled out) in this call
        self.challenged = False

    # ------------------------------------------------------------------ candidates
    def families(self) -> list[list[str]]:
        """Candidate names grouped by family (registration order), each family's batched
        members first when batching is allowed."""
        fams: dict[str, list[str]] = {}
        for c in self.candidates:
            fams.setdefault(backbone_family(c), []).append(c)
        return [sorted(m, key=lambda n: not is_batched(n)) if self.batched_ok else m for m in fams.values()]

    def failure(self, name: str) -> Exception | None:
        """Why ``name`` cannot be used (this call, or cached from an earlier one), or None."""
        return self.errors.get(name) or self.entry["failed"].get(name)

    def usable(self, name: str) -> bool:
        return self.failure(name) is None and name not in self.entry["disagree"]

    def fail(self, name: str, exc: Exception) -> None:
        self.errors[name] = exc
        self.timings.pop(name, None)
        if _deterministic(exc):
            self.entry["failed"][name] = _without_traceback(exc)

    def block(self, name: str, reason: str) -> None:
        """``name`` cannot work on this model, known without running it (see :class:`GraphReport`)."""
        self.fail(name, HVPUnsupportedError(reason, backbone=name, reason=reason))

    def record(self, name: str, timing: Timing) -> None:
        self.timings[name] = timing

    def disagree(self, reference: str, other: str, rel: float, tensors: list[str], tol: float) -> None:
        """``other`` multiplies by a different matrix than ``reference``: never use it here."""
        info = {"reference": reference, "rejected": other, "relative_difference": rel, "tolerance": tol,
                "tensors": tensors}
        fam = backbone_family(other)
        for c in self.candidates:  # the family's members share its matrix
            if backbone_family(c) == fam:
                self.entry["disagree"][c] = info
        self.disagreement = info
        warnings.warn(
            f"hvp='auto': the {other!r} backbone and the reference {reference!r} (double backward, the "
            f"symmetric Hessian) give different Hessian-vector products on this model (relative difference "
            f"{rel:.2g} > {tol:.2g} rounding, largest on {tensors}): PyTorch's autograd modes differentiate "
            f"some op differently (e.g. nn.Embedding with padding_idx). Using {reference!r} only; no "
            f"product of {other!r} enters the estimate. Recorded in meta['hvp_disagreement'].",
            RuntimeWarning,
            stacklevel=2,
        )

    def known_disagreement(self) -> dict | None:
        if self.disagreement is not None:
            return self.disagreement
        return next(iter(self.entry["disagree"].values()), None)

    # ------------------------------------------------------------------ decisions
    def choose(self, rows: int, timings: dict[str, Timing] | None = None) -> str:
        """The backbone for ``rows`` rows per batch: the cheapest member of the reference
        family (the first family with a timed member; by its fastest measurement, since load
        only ever slows a measurement down), unless a member of another family is cheaper by
        :data:`MARGIN` with its slower measurement against the reference's faster one (a
        margin that survives the second measurement)."""
        timings = self.timings if timings is None else timings
        usable = {n: t for n, t in timings.items() if self.usable(n)}
        if not usable:
            raise self.error()
        ref_family = next(backbone_family(n) for f in self.families() for n in f if n in usable)
        members = [n for n in usable if backbone_family(n) == ref_family]
        ref = min(members, key=lambda n: usable[n].cost(rows, min))
        best = ref
        ref_best = usable[ref].cost(rows, min)
        for n, t in usable.items():
            if backbone_family(n) == ref_family:
                continue
            if t.cost(rows, max) * MARGIN < ref_best and t.cost(rows, max) < usable[best].cost(rows, max):
                best = n
        return best

    def cached_choice(self, rows: int, want_challenge: bool) -> str | None:
        """The choice from an earlier call's stable timings, or None (time now)."""
        cached = {n: t for n, t in self.entry["timings"].items() if self.usable(n)}
        if not cached or (want_challenge and not self.entry["challenged"]):
            return None
        try:
            return self.choose(rows, cached)
        except HVPUnsupportedError:
            return None

    def still_valid(self, name: str, per_row: list[float]) -> bool:
        """A cached choice re-measured on this call: within :data:`MARGIN` of its cached range."""
        cached = self.entry["timings"].get(name)
        if cached is None or not per_row:
            return cached is not None
        lo, hi = min(cached.per_row_s), max(cached.per_row_s)
        return min(per_row) <= MARGIN * hi and max(per_row) * MARGIN >= lo

    def forget_timings(self) -> None:
        self.entry["timings"] = {}
        self.entry["challenged"] = False

    def store(self, challenged: bool) -> bool:
        """Cache this call's timings when every one is stable; returns whether it did."""
        stable = bool(self.timings) and all(t.stable() for t in self.timings.values())
        if stable:
            self.entry["timings"] = dict(self.timings)
            self.entry["challenged"] = challenged
        else:
            self.forget_timings()
        return stable

    def error(self) -> Exception:
        """Every candidate failed: one error listing them all."""
        errs = {c: self.failure(c) for c in self.candidates if self.failure(c) is not None}
        for c, info in self.entry["disagree"].items():
            why = (f"its products differ from {info['reference']!r} "
                   f"(relative {info['relative_difference']:.2g})")
            errs.setdefault(c, HVPUnsupportedError(why, backbone=c, reason=why))
        if not errs:
            return RuntimeError("hvp='auto' timed no backbone (no rows to evaluate)")
        return no_backbone_works(errs)

    def report(self) -> dict:
        """The ``timings`` part of :class:`~hutchtrace.estimate.engine.RunInfo` (and ``meta["hvp_timings"]``)."""
        out = {n: {"prepare_s": t.prepare_s, "per_hvp_s": statistics.median(t.per_row_s),
                   "measurements_s": list(t.per_row_s), "chunk": t.chunk, "stable": t.stable()}
               for n, t in self.timings.items()}
        out["failed"] = {c: str(getattr(e, "reason", e)).splitlines()[0]
                         for c in self.candidates if (e := self.failure(c)) is not None}
        out["from_cache"] = self.from_cache
        if self.compared:
            out["compared"] = dict(self.compared)
        dis = self.known_disagreement()
        if dis is not None:
            out["disagreement"] = dict(dis)
        return out


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
