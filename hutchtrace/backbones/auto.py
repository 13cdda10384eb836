"""``hvp="auto"``: the choice among the registered backbones, on real rows of a call.

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
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..core.errors import (
    HVPUnsupportedError,
    no_backbone_works,
)
from .base import backbone_family, is_batched

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
