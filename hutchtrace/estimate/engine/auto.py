"""``hvp="auto"``: choosing the HVP backbone on the first batch of a run, on real rows.

The rules (which backbones are tried, in which order, when a cached choice is re-measured,
when the other families are challenged, what counts as agreement) are those of
:class:`~hutchtrace.backbones.auto.AutoHVP` (:mod:`hutchtrace.backbones.auto` has them with
their measurements); :class:`AutoTrials` carries them out inside a
:class:`~hutchtrace.estimate.engine.runner.ProbeRunner` run. Every row it evaluates while
choosing is a row of the call and is delivered to the sinks; the rest stay in the pool for
the chosen backbone. Apart from the timings of these first chunks, nothing in the probe loop
synchronises with the host.

:func:`auto_key` is what the choice is cached under: the model (module tree, settings,
train/eval flags, selected tensors), the batch's input signature and criterion, the probe
kind, the chunk size, the curvature and the active torch modes.
"""

from __future__ import annotations

import math

from torch import nn

from ...backbones.auto import (
    CHALLENGE_ABORT,
    CHALLENGE_FACTOR,
    CHALLENGE_MIN_SECONDS,
    AutoHVP,
    Stopwatch,
    Timing,
    agreement,
    agreement_tol,
    family_wide,
    forward_mode_initialised,
)
from ...backbones.base import HVPBackbone, backbone_family, is_batched, make_backbone
from ...core.errors import HVPUnsupportedError
from ...problem.blocks import BlockLayout
from .rows import _RowPool

__all__ = ["AutoTrials", "auto_key"]


def auto_key(runner, batch) -> tuple:
    """The key of ``runner``'s ``auto`` choice on ``batch`` in the backbone cache."""
    return _model_key(runner.model, runner.layout) + (batch.signature, _criterion_name(batch), runner.kind,
                                                      runner.max_rows, runner.curvature, _active_modes())


def _active_modes() -> tuple:
    """Types of the active torch function / dispatch modes. A mode can change which ops run
    (``hutchtrace.twice_differentiable`` swaps ops without a second derivative), so a backbone
    that failed, or was timed, outside it says nothing about a call inside it."""
    from torch.overrides import _get_current_function_mode_stack
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    return tuple(type(m).__qualname__ for m in (*_get_current_function_mode_stack(),
                                                 *_get_current_dispatch_mode_stack()))


def _model_key(model: nn.Module, layout: BlockLayout) -> tuple:
    """What ``auto``'s cache tells models apart by: the module tree with its settings (``repr``
    shows e.g. ``padding_idx``, dropout rates, BatchNorm flags), train/eval flags and the
    selected tensors."""
    return (
        type(model).__qualname__,
        hash(repr(model)),
        tuple(m.training for m in model.modules()),
        tuple((n, tuple(t.shape), str(t.dtype), str(t.device)) for n, t in zip(layout.names, layout.tensors)),
    )


def _criterion_name(batch) -> str:
    c = batch.criterion
    return "" if c is None else getattr(c, "__qualname__", type(c).__qualname__)


class AutoTrials:
    """One backbone decision of ``hvp="auto"`` on real rows of a batch of ``runner`` (a
    :class:`~hutchtrace.estimate.engine.runner.ProbeRunner`; rules: :mod:`hutchtrace.backbones.auto`).

    Every product it computes for a row of the call is delivered once, by a backbone of the
    reference family or one that agreed with it on the comparison probe; a backbone that
    fails puts its rows back into the pool. The comparison probe is not a row of the call
    and never reaches the sinks.
    """

    #: probe index of the comparison probe: far above any probe a call draws
    COMPARISON_PROBE = 1 << 40

    def __init__(self, runner, auto: AutoHVP, batch, m, group_of_tensor, sinks, prog,
                 pool: _RowPool):
        self.r = runner
        self.auto = auto
        self.batch = batch
        self.m = m
        self.group_of_tensor = group_of_tensor
        self.sinks = sinks
        self.prog = prog
        self.pool = pool
        self.n0 = len(pool)
        self.hvps = 0
        self.live: dict[str, HVPBackbone] = {}
        self.prep_s: dict[str, float] = {}
        self.meas: dict[str, list[float]] = {}
        self.warm: dict[str, float] = {}
        self._ref_product = None

    # ------------------------------------------------------------------ steps
    def prepare(self, name: str, share_from: str | None = None) -> HVPBackbone | None:
        """The prepared backbone ``name`` (sharing ``share_from``'s first-order graph when it
        can), or None when it failed (recorded)."""
        r = self.r
        src = self.live.get(share_from) if share_from is not None else None
        bb = None
        try:
            if src is not None and hasattr(src, "sibling"):
                bb = src.sibling(is_batched(name))
                self.prep_s[name] = self.prep_s[share_from]
            else:
                bb = make_backbone(name, r.model, r.layout.names, r.layout.tensors, r.rng)
                with Stopwatch(r.device) as sw:
                    bb.prepare(self.batch)
                self.prep_s[name] = sw.seconds
        except RuntimeError as exc:
            self._blockers(bb)
            self.fail(name, exc, bb)
            return None
        self._blockers(bb)
        self.live[name] = bb
        self.meas[name] = []
        return bb

    def _blockers(self, bb) -> None:
        """Rule out backbones the first-order graph shows cannot work (see GraphReport)."""
        rep = getattr(bb, "graph_report", None)
        if rep is None:
            return
        for name, why in rep.forward_blockers().items():
            if name in self.auto.candidates and self.auto.usable(name):
                self.auto.block(name, why)

    def fail(self, name: str, exc: Exception, bb=None) -> None:
        bb = self.live.pop(name, None) or bb
        if bb is not None:
            bb.release()
        self.auto.fail(name, exc)
        if family_wide(exc):  # e.g. a missing forward-mode derivative dooms forward and forward-vmap
            fam = backbone_family(name)
            for other in self.auto.candidates:
                if other != name and backbone_family(other) == fam and self.auto.usable(other):
                    self.fail(other, _same_cause(other, name, exc))

    def chunk(self, name: str) -> int:
        """Rows per timing chunk: about 1/24 of the batch's rows (three chunks per backbone, up
        to four backbones use half of them at most), capped by the run's chunk sizes."""
        n = max(1, self.n0 // 24)
        return max(2, min(self.r.max_rows, n)) if is_batched(name) else min(self.r.seq_rows, n)

    def run_chunk(self, name: str, n: int, group: int | None = None) -> float | None:
        """Evaluate and deliver up to ``n`` rows with ``name``: seconds per row, or None (no
        rows left, or the backbone failed and its rows went back)."""
        ks, gs = self.pool.take(n, group)
        if not ks:
            return None
        r = self.r
        try:
            with Stopwatch(r.device) as sw:
                rb = r._compute(self.live[name], ks, gs, self.group_of_tensor, self.m, self.batch.weight)
        except RuntimeError as exc:  # HVPUnsupportedError, vmap limits, OOM of a batched try
            self.pool.put_back(ks, gs)
            self.fail(name, exc)
            return None
        r._deliver(rb, self.sinks)
        self.hvps += len(ks) if not self.live[name].batched else 1
        self.prog.update(len(ks))
        return sw.seconds / len(ks)

    def warm_up(self, name: str) -> None:
        t = self.run_chunk(name, self.chunk(name))
        if t is not None:
            self.warm[name] = t

    def comparison_product(self, name: str):
        """``name``'s product with the comparison probe (a global probe outside the call's
        rows; not delivered), or None when it failed."""
        r = self.r
        n_t = len(r.layout.tensors)
        _, z = r._probe_rows([self.COMPARISON_PROBE], [0], [0] * n_t)
        try:
            w, _ = r._products(self.live[name], z)
        except RuntimeError as exc:
            self.fail(name, exc)
            return None
        self.hvps += 1
        return [x[0].detach().clone() for x in w]

    # ------------------------------------------------------------------ decision
    def choose(self, n_rows: int) -> HVPBackbone:
        auto = self.auto
        want = self._want_challenge() and not (auto.challenged or auto.entry["challenged"])
        if self.r.chosen is not None and auto.usable(self.r.chosen) and not want:
            if self.prepare(self.r.chosen) is not None:  # decided earlier in this call
                return self._keep(self.r.chosen)
        cached = auto.cached_choice(n_rows, want) if not auto.validated else None
        if cached is not None and self._revalidate(cached):
            auto.validated = auto.from_cache = True
            return self._keep(cached)
        return self._time_all(n_rows)

    def challengers(self, ref_family: list[str] | None = None) -> list[str]:
        """One batched member per family after the reference: a sequential forward-over-reverse
        product recomputes the forward and backward passes for every probe, and was 2-10x
        slower per row than reverse mode on every model measured, so it is never timed to win
        (only used when everything before it fails)."""
        auto = self.auto
        fams = auto.families()
        start = fams.index(ref_family) + 1 if ref_family is not None else 1
        out = []
        for f in fams[start:]:
            name = next((n for n in f if auto.usable(n) and is_batched(n)), None)
            if name is not None:
                out.append(name)
        return out

    def _want_challenge(self) -> bool:
        """Whether the rows left justify timing the other families (module docs of hvp): at
        least :data:`CHALLENGE_FACTOR` times the rows of its timing, and, until torch.func has
        been initialised in this process, a reverse-mode estimate of the rest of the batch of
        at least :data:`CHALLENGE_MIN_SECONDS`."""
        others = self.challengers()
        if not others or not self.auto.batched_ok:
            return False
        if len(self.pool) < CHALLENGE_FACTOR * (3 * self.chunk(others[0]) + 1):
            return False
        if forward_mode_initialised():
            return True
        per_row = self._reference_per_row()
        return per_row is not None and len(self.pool) * per_row >= CHALLENGE_MIN_SECONDS

    def _reference_per_row(self) -> float | None:
        """Seconds per row of the reference family: this call's warm-ups, else cached timings."""
        fam = backbone_family(self.auto.families()[0][0])
        warm = [t for n, t in self.warm.items() if backbone_family(n) == fam]
        if warm:
            return min(warm)
        timings = self.auto.entry["timings"]
        cached = [min(t.per_row_s) for n, t in timings.items() if backbone_family(n) == fam]
        return min(cached) if cached else None

    def _revalidate(self, name: str) -> bool:
        """Re-measure a cached choice on this call's first chunks (their products are used)."""
        cached = self.auto.entry["timings"][name]
        if self.prepare(name) is None:
            return False
        if len(self.pool) < CHALLENGE_FACTOR * cached.chunk:
            return True  # too few rows to measure: a short call keeps the cached choice
        ts = []
        for _ in range(2):
            t = self.run_chunk(name, cached.chunk)
            if t is None:
                break
            ts.append(t)
        if name not in self.live:
            return False
        if self.auto.still_valid(name, ts):
            return True
        self.auto.forget_timings()
        return False

    def _time_all(self, n_rows: int) -> HVPBackbone:
        auto = self.auto
        fams = auto.families()
        ref_family = None
        for fam in fams:  # the first family that works is the reference
            first = None
            for name in fam:
                if not auto.usable(name) or not len(self.pool):
                    continue
                if name not in self.live and self.prepare(name, share_from=first) is None:
                    continue
                first = first or name
                self.warm_up(name)
            if any(backbone_family(n) == backbone_family(fam[0]) for n in self.live):
                ref_family = fam
                break
        if ref_family is None:
            raise auto.error()
        ref = next(n for n in ref_family if n in self.live)
        challengers = self.challengers(ref_family) if auto.batched_ok else []
        challenged = not challengers
        if challengers and self._want_challenge():
            challenged = auto.challenged = True
            for name in challengers:
                self._challenge(ref, name, ref_family)
        for _ in range(2):  # two interleaved measurements on rows of one group
            g = self.pool.largest_group()
            for name in list(self.live):
                t = self.run_chunk(name, self.chunk(name), g)
                if t is not None:
                    self.meas[name].append(t)
        for name in list(self.live):
            per_row = self.meas[name] or ([self.warm[name]] if name in self.warm else [])
            if per_row:
                auto.record(name, Timing(self.prep_s[name], per_row, self.chunk(name)))
        if not auto.timings:
            if self.live:  # no rows were left to time it: keep what works
                return self._keep(next(iter(self.live)))
            raise auto.error()
        choice = auto.choose(n_rows)
        auto.store(challenged)
        auto.validated = True
        return self._keep(choice)

    def _challenge(self, ref: str, name: str, ref_family: list[str]) -> None:
        """Prepare ``name``, check it against the reference on the comparison probe, warm it up
        (and drop it when the warm-up shows it cannot win)."""
        if self.prepare(name) is None:
            return
        if self._ref_product is None:
            self._ref_product = self.comparison_product(ref)
        if self._ref_product is None:  # the reference failed on it: nothing to compare with
            self.live.pop(name).release()
            return
        w = self.comparison_product(name)
        if w is None:
            return
        rel, worst = agreement(self._ref_product, w, self.r.layout.names)
        tol = agreement_tol(self.r.columns.dtype)
        self.auto.compared[name] = rel
        if not math.isfinite(rel):  # non-finite products cannot be compared: keep the reference
            self.live.pop(name).release()
            return
        if rel > tol:
            self.auto.disagree(ref, name, rel, worst, tol)
            self.live.pop(name).release()
            return
        self.warm_up(name)
        ref_warm = [self.warm[n] for n in ref_family if n in self.warm]
        if name in self.warm and ref_warm and self.warm[name] > CHALLENGE_ABORT * min(ref_warm):
            self.live.pop(name).release()  # its rows are delivered; it is just not timed further

    def _keep(self, name: str) -> HVPBackbone:
        """Release every prepared backbone but ``name`` and return it."""
        bb = self.live.pop(name)
        for other in self.live.values():
            other.release()
        self.live.clear()
        return bb


def _same_cause(name: str, failed: str, exc: Exception) -> Exception:
    reason = getattr(exc, "reason", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    return HVPUnsupportedError(f"as {failed!r}: {reason}", backbone=name, reason=f"as {failed!r}: {reason}",
                               fix=getattr(exc, "fix", None))
