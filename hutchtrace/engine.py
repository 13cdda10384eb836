"""The probe loop shared by every estimator.

:class:`ProbeRunner` evaluates ``w = H z`` for a set of probe *rows* on every batch of a
loss and hands each result to *sinks*. A row is a pair ``(k, g)``: probe index ``k``
restricted to group ``g`` of a :class:`~hutchtrace.probing.ProbePlan`. Loop order:

* batches outer (a DataLoader is consumed once; reverse-mode graphs are built once per
  batch and reused for every probe), rows inner;
* rows in chunks of consecutive probe indices, ordered group-major inside a chunk so each
  tensor's probe entries come from one kernel call;
* per chunk: generate ``z`` in place from (seed, k, global offset), one HVP (single or
  batched over rows), one fused reduction giving ``z_b . w_b`` and ``||w_b||^2`` for every
  block, then the sinks. Nothing in the loop synchronises with the host, except the
  timing of the ``auto`` backbone choice on the first chunks.

Sinks accumulate ``weight_m * quantity`` over batches; :meth:`Sink.finish` receives the
normaliser ``N = sum_m count_m`` (see :mod:`hutchtrace.loss`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from . import ops
from .blocks import BlockLayout
from .hvp import AutoHVP, HVPBackbone, Stopwatch, backbones_for, make_backbone
from .loss import LossSpec
from .probing import ProbePlan
from .progress import Progress
from .state import ForwardRNG

__all__ = ["RowBatch", "Sink", "ProbeRunner", "RunInfo", "default_memory_budget"]


@dataclass
class RowBatch:
    """One HVP evaluation: rows ``(ks[r], gs[r])`` on batch ``batch_index``.

    ``z[j]`` and ``w[j]`` have shape ``(R, *tensor_j.shape)``; ``dots`` and ``sq`` are
    ``(R, L)`` float64 with ``dots[r, b] = z_b . w_b`` and ``sq[r, b] = ||w_b||^2`` for
    EVERY block b (blocks outside the row's group have ``z_b = 0``).
    """

    batch_index: int
    weight: float
    ks: list[int]
    gs: list[int]
    z: list[torch.Tensor]
    w: list[torch.Tensor]
    dots: torch.Tensor
    sq: torch.Tensor


class Sink:
    """Receives every :class:`RowBatch`; override what you need."""

    def on_rows(self, rb: RowBatch) -> None:  # pragma: no cover - interface
        pass

    def on_batch_end(self, batch_index: int, weight: float) -> None:
        pass

    def finish(self, total_count: float) -> None:
        pass


@dataclass
class RunInfo:
    """What a :meth:`ProbeRunner.run` did."""

    backbone: str
    backend: str
    n_batches: int
    total_count: float
    rows: int
    hvps: int
    seconds: float
    timings: dict = field(default_factory=dict)


def default_memory_budget(device: torch.device) -> int:
    """Bytes the probe loop may use for batched probes: half the free GPU memory, or 2 GiB."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    return 2 << 30


def _model_key(model: nn.Module, layout: BlockLayout) -> tuple:
    return (
        type(model).__qualname__,
        tuple((n, tuple(t.shape), str(t.dtype), str(t.device)) for n, t in zip(layout.names, layout.tensors)),
    )


class ProbeRunner:
    """Runs probe rows through an HVP backbone over all batches of a loss.

    Args:
        model: the (unwrapped) model.
        layout: the block layout (selected tensors and offsets).
        loss_spec: the normalised loss.
        seed, kind: probe seed and distribution (``"rademacher"``/``"gaussian"``).
        hvp: a backbone name or ``"auto"``.
        curvature: ``"hessian"`` or ``"ggn"`` (the matrix ``auto`` chooses backbones for).
        probe_batch: rows per batched HVP (``None``: from ``max_memory``).
        max_memory: byte budget for batched probes (``None``: :func:`default_memory_budget`).
        progress: ``None`` (auto), ``True`` or ``False``.
        desc: label of the progress display.
    """

    def __init__(
        self,
        model: nn.Module,
        layout: BlockLayout,
        loss_spec: LossSpec,
        *,
        seed: int,
        kind: str = "rademacher",
        hvp: str = "auto",
        curvature: str = "hessian",
        probe_batch: int | None = None,
        max_memory: int | None = None,
        progress: bool | None = None,
        desc: str = "hutchtrace",
        acc_dtype: torch.dtype = torch.float64,
    ):
        self.candidates = backbones_for(curvature)
        if hvp != "auto" and hvp not in self.candidates:
            raise ValueError(f"hvp must be 'auto' or one of {self.candidates} for curvature={curvature!r}, got {hvp!r}")
        self.curvature = curvature
        if probe_batch is not None and (not isinstance(probe_batch, int) or probe_batch < 1):
            raise ValueError(f"probe_batch must be a positive int or None, got {probe_batch!r}")
        self.model = model
        self.layout = layout
        self.loss_spec = loss_spec
        self.seed = seed
        self.kind = kind
        self.hvp = hvp
        self.device = layout.device()
        self.rng = ForwardRNG([self.device])
        self.progress = progress
        self.desc = desc
        self.acc_dtype = acc_dtype
        self.block_index_t = list(layout.block_index)
        param_bytes = sum(t.numel() * t.element_size() for t in layout.tensors)
        budget = max_memory if max_memory is not None else default_memory_budget(self.device)
        # A batched HVP row holds the probe, the product and about six more P-sized
        # intermediates of the double-backward / forward-mode pass.
        self.max_rows = probe_batch or int(max(1, min(32, budget // max(1, 8 * param_bytes))))
        self.chosen: str | None = None
        self.last_hvp_seconds: float | None = None

    # ------------------------------------------------------------------ probes
    def make_probes(self, ks: list[int], gs: list[int], group_of_tensor: list[int]) -> list[torch.Tensor]:
        """Per-tensor probe rows ``(R, *shape)``: z^(k) on the row's group, 0 elsewhere."""
        R = len(ks)
        out = []
        for j, t in enumerate(self.layout.tensors):
            gj = group_of_tensor[j]
            n = t.numel()
            off = self.layout.offsets[j]
            sel = [r for r in range(R) if gs[r] == gj]
            if len(sel) == R:
                buf = torch.empty((R, n), dtype=t.dtype, device=t.device)
            else:
                buf = torch.zeros((R, n), dtype=t.dtype, device=t.device)
            # runs of adjacent rows with consecutive probe indices -> one kernel call each
            i = 0
            while i < len(sel):
                r0 = sel[i]
                e = i
                while e + 1 < len(sel) and sel[e + 1] == sel[e] + 1 and ks[sel[e + 1]] == ks[sel[e]] + 1:
                    e += 1
                rows = sel[e] - r0 + 1
                ops.fill_probes_(buf[r0 : r0 + rows], self.seed, ks[r0], off, self.kind)
                i = e + 1
            out.append(buf.view((R,) + tuple(t.shape)))
        return out

    # ------------------------------------------------------------------ chunks
    def _row_chunks(self, probe_indices: list[int], plan: ProbePlan, max_rows: int):
        """Yield (ks, gs) chunks: consecutive probe indices x all groups, group-major."""
        G = plan.num_groups
        if G <= max_rows:
            per = max(1, max_rows // G)
            for s in range(0, len(probe_indices), per):
                kc = probe_indices[s : s + per]
                yield [k for _ in range(G) for k in kc], [g for g in range(G) for _ in kc]
        else:
            for k in probe_indices:
                for s in range(0, G, max_rows):
                    gsub = list(range(s, min(G, s + max_rows)))
                    yield [k] * len(gsub), gsub

    # ------------------------------------------------------------------ one chunk
    def _evaluate(self, bb: HVPBackbone, ks, gs, group_of_tensor, plan: ProbePlan, batch_index, weight, sinks):
        z = self.make_probes(ks, gs, group_of_tensor)
        if bb.batched:
            w = bb.hvp(z)
        else:
            w_rows = [bb.hvp([zj[r] for zj in z]) for r in range(len(ks))]
            w = [torch.stack([wr[j] for wr in w_rows]) for j in range(len(z))]
        L = self.layout.num_blocks
        if plan.num_groups == 1:
            dots, sq = ops.block_dot_regen(
                w, self.layout.offsets, self.block_index_t, L,
                seed=self.seed, probe=ks[0], kind=self.kind, batched=True, acc_dtype=self.acc_dtype,
            ) if _consecutive(ks) else ops.block_dot(w, z, self.block_index_t, L, batched=True, acc_dtype=self.acc_dtype)
        else:
            dots, sq = ops.block_dot(w, z, self.block_index_t, L, batched=True, acc_dtype=self.acc_dtype)
        rb = RowBatch(batch_index, weight, list(ks), list(gs), z, w, dots, sq)
        for s in sinks:
            s.on_rows(rb)
        return len(ks), (len(ks) if not bb.batched else 1)

    # ------------------------------------------------------------------ main loop
    def run(self, plan: ProbePlan, probe_indices, sinks: list[Sink]) -> RunInfo:
        """Evaluate all rows ``(k, g)``, ``k`` in ``probe_indices``, on every batch."""
        t_start = time.perf_counter()
        probe_indices = list(probe_indices)
        L = self.layout.num_blocks
        gob = plan.group_of_block(L)
        group_of_tensor = [gob[b] for b in self.layout.block_index]
        n_rows = len(probe_indices) * plan.num_groups
        total_count = 0.0
        n_batches = 0
        hvps = 0
        timings: dict = {}
        prog = Progress(None, self.desc, self.progress)
        names, tensors = self.layout.names, self.layout.tensors
        chosen_name = self.hvp
        try:
            for m, batch in enumerate(self.loss_spec.batches()):
                n_batches += 1
                total_count += batch.count
                self.rng.start_batch()
                chunks = list(self._row_chunks(probe_indices, plan, self.max_rows))
                seq_chunks = [c for (ks, gs) in chunks for c in _split_rows(ks, gs)]
                if self.hvp == "auto" and self.chosen is None:
                    seq_chunks, chunks, done_h = self._auto_first_batch(
                        batch, m, chunks, plan, group_of_tensor, sinks, prog, timings
                    )
                    hvps += done_h
                    chosen_name = self.chosen
                elif self.hvp != "auto":
                    self.chosen = self.hvp
                bb = make_backbone(self.chosen, self.model, names, tensors, self.rng)
                bb.prepare(batch)
                todo = chunks if bb.batched else seq_chunks
                for ks, gs in todo:
                    rows, h = self._evaluate(bb, ks, gs, group_of_tensor, plan, m, batch.weight, sinks)
                    hvps += h
                    prog.update(rows)
                bb.release()
                self.rng.end_batch()
                for s in sinks:
                    s.on_batch_end(m, batch.weight)
        finally:
            prog.close()
        for s in sinks:
            s.finish(total_count)
        return RunInfo(
            backbone=chosen_name if chosen_name != "auto" else str(self.chosen),
            backend=ops.backend_name(self.device),
            n_batches=n_batches,
            total_count=total_count,
            rows=n_rows,
            hvps=hvps,
            seconds=time.perf_counter() - t_start,
            timings=timings,
        )

    def _auto_first_batch(self, batch, m, chunks, plan, group_of_tensor, sinks, prog, timings):
        """Time each untimed backbone on real rows of the first batch; keep the fastest.

        Each candidate evaluates up to two small chunks (the first absorbs one-off warm-up
        costs; the faster of the two is recorded). Those products are kept, not wasted.
        Returns the row chunks still to do (sequential and batched forms) and the HVP count.
        """
        key = _model_key(self.model, self.layout) + (batch.signature, self.kind, self.max_rows, self.curvature)
        auto = AutoHVP(key, self.candidates)
        names, tensors = self.layout.names, self.layout.tensors
        rows_left = [(k, g) for ks, gs in chunks for k, g in zip(ks, gs)]
        hvps = 0
        untimed = auto.untimed()
        per_batched = max(2, min(self.max_rows, len(rows_left) // (4 * max(1, len(untimed)))))
        for cand in untimed:
            if not rows_left:
                break
            bb = make_backbone(cand, self.model, names, tensors, self.rng)
            try:
                with Stopwatch(self.device) as sw_prep:
                    bb.prepare(batch)
                best = None
                for _ in range(2):
                    if not rows_left:
                        break
                    take = per_batched if bb.batched else 1
                    chunk, rows_left = rows_left[:take], rows_left[take:]
                    ks, gs = [k for k, _ in chunk], [g for _, g in chunk]
                    with Stopwatch(self.device) as sw:
                        rows, h = self._evaluate(bb, ks, gs, group_of_tensor, plan, m, batch.weight, sinks)
                    hvps += h
                    prog.update(rows)
                    per_row = sw.seconds / rows
                    best = per_row if best is None else min(best, per_row)
                auto.record(cand, sw_prep.seconds, best, per_batched if bb.batched else 1)
            except RuntimeError as exc:  # HVPUnsupportedError, vmap limits, OOM of a batched try
                auto.fail(cand, exc)
            finally:
                bb.release()
        self.chosen = auto.choose(max(1, len(rows_left)))
        timings.update({k: {"prepare_s": v[0], "per_hvp_s": v[1]} for k, v in auto.timings.items()})
        timings["failed"] = {k: str(e).splitlines()[0] for k, e in auto.errors.items()}
        timings["chosen"] = self.chosen
        # regroup what is left: consecutive probe indices of one group stay together
        pending = _regroup(rows_left)
        seq = [([k], [g]) for k, g in rows_left]
        rechunked = [c for (ks, gs) in pending for c in _rechunk(ks, gs, self.max_rows)]
        return seq, rechunked, hvps


def _regroup(rows):
    out = []
    for k, g in rows:
        if out and out[-1][1][-1] == g and out[-1][0][-1] + 1 == k:
            out[-1][0].append(k)
            out[-1][1].append(g)
        else:
            out.append(([k], [g]))
    return out


def _consecutive(ks: list[int]) -> bool:
    return all(b == a + 1 for a, b in zip(ks, ks[1:]))


def _split_rows(ks, gs):
    return [([k], [g]) for k, g in zip(ks, gs)]


def _rechunk(ks, gs, max_rows):
    return [(ks[i : i + max_rows], gs[i : i + max_rows]) for i in range(0, len(ks), max_rows)]


def check_probe_count(K) -> int:
    """Validate a probe count (a positive int)."""
    if isinstance(K, bool) or not isinstance(K, int):
        raise TypeError(f"K (the number of probes) must be an int >= 1, got {K!r} of type {type(K).__name__}")
    if K < 1:
        raise ValueError(f"K (the number of probes) must be >= 1, got {K}")
    return K

