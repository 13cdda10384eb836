"""The probe loop shared by every estimator.

:class:`ProbeRunner` evaluates ``w = H z`` for a set of probe *rows* on every batch of a
loss and hands each result to *sinks*. A row is a pair ``(k, g)``: probe index ``k``
restricted to group ``g`` of a :class:`~hutchtrace.estimate.probing.ProbePlan`. Loop order:

* batches outer (a DataLoader is consumed once; reverse-mode graphs are built once per
  batch and reused for every probe), rows inner;
* rows in chunks of consecutive probe indices of one group: each tensor's probe entries
  come from one kernel call, and a reverse backbone seeds its double backward with the
  group's gradients only;
* per chunk: generate ``z`` in place from (seed, k, global offset) into ONE flat ``(R, P)``
  buffer (one kernel call per run of contiguous tensors of a group; per-tensor probes are
  views), the HVPs (one batched call, or one call per row for the sequential backbones,
  whose rows are written into a flat ``(R, P)`` product buffer), one fused reduction giving
  ``z_b . w_b`` and ``||w_b||^2`` for every block, then the sinks, once per chunk. Nothing
  in the loop synchronises with the host, except the timing of the ``auto`` backbone
  choice on the first chunks (:class:`_AutoTrials`; its rules are in :mod:`hutchtrace.backbones.auto`).
* every row of a run is delivered to the sinks exactly once per batch: a backbone that fails
  hands its rows back, and :class:`_Ledger` checks the count at the end of every batch (a
  violation is a hutchtrace bug and raises).
* one random function per call: every pass over the batches (each run: the pilot, every
  adaptive round, a plan switch) replays the RNG state of the runner's first pass, and every
  forward of a batch replays that batch's state (:class:`~hutchtrace.core.state.ForwardRNG`). So
  dropout draws ONE mask per batch for the whole call, the same for every probe, backbone
  and round, and a DataLoader that shuffles with the global RNG yields the same batches in
  every pass.
* ``cuda_graph=True`` (reverse backbones on CUDA): per batch, after the first-order graph
  is built on a side stream and two chunks have run eagerly (warm-up), the HVPs and the
  reduction of one chunk are captured in a CUDA graph and replayed for every later chunk of
  the same shape. The probe fill stays an eager launch (one per chunk): the compiled probe
  kernel takes the probe index as a kernel parameter, which a replay would freeze. The
  sinks run eagerly on the graph's static outputs, which they copy before the next replay.

Sinks accumulate ``weight_m * quantity`` over batches; :meth:`Sink.finish` receives the
normaliser ``N = sum_m count_m`` (see :mod:`hutchtrace.problem.loss`).
"""

from __future__ import annotations

import math
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from ..backbones.auto import (
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
from ..backbones.base import HVPBackbone, backbone_family, backbones_for, is_batched, make_backbone
from ..core.errors import HVPUnsupportedError
from ..core.progress import Progress
from ..core.state import ForwardRNG
from ..kernels import ops
from ..problem.blocks import BlockLayout
from ..problem.loss import LossSpec
from .probing import ProbePlan

__all__ = ["RowBatch", "Sink", "ProbeRunner", "RunInfo", "Columns", "default_memory_budget"]


@dataclass
class RowBatch:
    """One HVP evaluation: rows ``(ks[r], gs[r])`` on batch ``batch_index``.

    ``z[j]`` and ``w[j]`` have shape ``(R, *tensor_j.shape)``; ``dots`` and ``sq`` are
    ``(R, L)`` float64 with ``dots[r, b] = z_b . w_b`` and ``sq[r, b] = ||w_b||^2`` for
    EVERY block b (blocks outside the row's group have ``z_b = 0``).

    ``z_flat`` / ``w_flat`` (or None) are ``(R, P)`` buffers of which ``z`` / ``w`` are
    column views (tensor ``j`` at columns ``cols[j] .. cols[j] + numel_j``, tensors in
    layout order): sinks can copy a whole row in one operation. They are only valid
    during :meth:`Sink.on_rows` (a CUDA-graph replay overwrites them): copy, never keep.
    """

    batch_index: int
    weight: float
    ks: list[int]
    gs: list[int]
    z: list[torch.Tensor]
    w: list[torch.Tensor]
    dots: torch.Tensor
    sq: torch.Tensor
    z_flat: torch.Tensor | None = None
    w_flat: torch.Tensor | None = None


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


class _Ledger:
    """How often each row ``(k, g)`` of one batch reached the sinks: exactly once, or a bug."""

    def __init__(self, probe_indices: list[int], G: int):
        self.pos = {k: i for i, k in enumerate(probe_indices)}
        self.G = G
        self.count = bytearray(len(probe_indices) * G)

    def add(self, ks, gs) -> None:
        pos, G, count = self.pos, self.G, self.count
        for k, g in zip(ks, gs):
            i = pos[k] * G + g
            if count[i]:
                raise RuntimeError(f"hutchtrace internal error: probe row (k={k}, group={g}) evaluated "
                                   "twice; please report this")
            count[i] = 1

    def check(self, batch_index: int) -> None:
        if self.count.count(1) != len(self.count):
            G = self.G
            lost = [(k, g) for k, i in self.pos.items() for g in range(G) if not self.count[i * G + g]]
            raise RuntimeError(f"hutchtrace internal error: {len(lost)} probe row(s) of batch {batch_index} "
                               f"were never evaluated (first: {lost[:4]}); please report this")


class _RowPool:
    """The rows of one batch not evaluated yet, per group in probe order."""

    def __init__(self, rows):
        self.by_group: dict[int, list[int]] = {}
        for k, g in rows:
            self.by_group.setdefault(g, []).append(k)

    def __len__(self) -> int:
        return sum(len(v) for v in self.by_group.values())

    def largest_group(self) -> int | None:
        live = [(len(v), -g, g) for g, v in self.by_group.items() if v]
        return max(live)[2] if live else None

    def take(self, n: int, g: int | None = None):
        """Up to ``n`` rows of group ``g`` (default: the largest), as ``(ks, gs)``."""
        if g is None or not self.by_group.get(g):
            g = self.largest_group()
        if g is None:
            return [], []
        ks = self.by_group[g][:n]
        del self.by_group[g][:n]
        return ks, [g] * len(ks)

    def put_back(self, ks, gs) -> None:
        for k, g in zip(ks, gs):
            self.by_group.setdefault(g, []).append(k)
        for g in set(gs):
            self.by_group[g].sort()

    def rest(self, order) -> list[tuple[int, int]]:
        rows = [(k, g) for g, ks in self.by_group.items() for k in ks]
        rows.sort(key=order)
        return rows


class Columns:
    """Where each selected tensor sits in a flat ``(R, P)`` row buffer.

    Tensor ``j`` occupies columns ``cols[j] .. cols[j] + numel[j]`` (layout order, no gaps).
    :meth:`runs` merges tensors whose *global* offsets are contiguous too, so one probe
    kernel call fills a whole run; for the default blocks every tensor is selected and a
    global probe is ONE call.
    """

    def __init__(self, layout: BlockLayout):
        self.layout = layout
        self.numel = [t.numel() for t in layout.tensors]
        self.shapes = [tuple(t.shape) for t in layout.tensors]
        self.cols = []
        c = 0
        for n in self.numel:
            self.cols.append(c)
            c += n
        self.P = c
        self.dtype = layout.tensors[0].dtype
        self.device = layout.tensors[0].device
        # one dtype for every tensor: a flat buffer can hold them all
        self.uniform = all(t.dtype == self.dtype for t in layout.tensors)
        self._runs: dict[tuple, list[tuple[int, int, int]]] = {}

    def runs(self, members) -> list[tuple[int, int, int]]:
        """``(col_start, col_end, global_offset)`` runs covering tensors ``members`` (sorted)."""
        key = tuple(members)
        hit = self._runs.get(key)
        if hit is not None:
            return hit
        offs = self.layout.offsets
        out: list[list[int]] = []
        prev = None
        for j in key:
            n = self.numel[j]
            if out and prev == j - 1 and offs[j] == offs[prev] + self.numel[prev]:
                out[-1][1] = self.cols[j] + n
            else:
                out.append([self.cols[j], self.cols[j] + n, offs[j]])
            prev = j
        res = [tuple(r) for r in out if r[1] > r[0]]
        self._runs[key] = res
        return res

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Per-tensor ``(R, *shape)`` views of a flat ``(R, P)`` buffer (nothing copied)."""
        R = flat.shape[0]
        return [flat[:, c : c + n].view((R,) + s) for c, n, s in zip(self.cols, self.numel, self.shapes)]


class _Flat:
    """A flat ``(R, P)`` buffer with its per-tensor views and per-row views, made once
    (building L views per row and chunk costs more than copying a small model's rows)."""

    __slots__ = ("buf", "views", "rows")

    def __init__(self, buf: torch.Tensor, cols: Columns):
        self.buf = buf
        self.views = cols.views(buf)
        self.rows = [[v[r] for v in self.views] for r in range(buf.shape[0])]


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
        cuda_graph: capture the HVPs and the reduction of one chunk of probe rows in a CUDA
            graph and replay it (reverse backbones, CUDA tensors, static shapes; see the
            module docs). ``hvp="auto"`` then means ``"reverse"``.
    """

    #: rows per chunk of a sequential (one HVP per row) backbone: amortises the per-chunk
    #: work (probe kernel calls, reduction, sinks) without holding many rows in memory
    SEQUENTIAL_ROWS = 8
    GRAPH_BACKBONES = ("reverse", "reverse-batched")

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
        cuda_graph: bool = False,
    ):
        self.candidates = backbones_for(curvature)
        if hvp != "auto" and hvp not in self.candidates:
            raise ValueError(f"hvp must be 'auto' or one of {self.candidates} for curvature={curvature!r}, got {hvp!r}")
        self.curvature = curvature
        if probe_batch is not None and (isinstance(probe_batch, bool) or not isinstance(probe_batch, int)
                                        or probe_batch < 1):
            raise ValueError(f"probe_batch must be a positive int or None, got {probe_batch!r}")
        self.model = model
        self.layout = layout
        self.loss_spec = loss_spec
        self.seed = seed
        self.kind = kind
        self.device = layout.device()
        if not isinstance(cuda_graph, bool):
            raise TypeError(f"cuda_graph must be True or False, got {cuda_graph!r}")
        if cuda_graph:
            if self.device.type != "cuda":
                raise ValueError(
                    f"cuda_graph=True captures CUDA kernels, but the parameters are on {self.device}; "
                    "move the model and data to a GPU (model.cuda()) or drop cuda_graph"
                )
            if hvp == "auto":
                hvp = "reverse"
            if hvp not in self.GRAPH_BACKBONES:
                raise ValueError(
                    f"cuda_graph=True works with the reverse-mode backbones {self.GRAPH_BACKBONES} (their "
                    f"first-order graph is built once per batch and replayed), not hvp={hvp!r}; "
                    "use hvp='reverse' or drop cuda_graph"
                )
        self.cuda_graph = cuda_graph
        self.hvp = hvp
        self.rng = ForwardRNG([self.device])
        self.progress = progress
        self.desc = desc
        self.acc_dtype = acc_dtype
        self.block_index_t = list(layout.block_index)
        self.columns = Columns(layout)
        param_bytes = sum(t.numel() * t.element_size() for t in layout.tensors)
        budget = max_memory if max_memory is not None else default_memory_budget(self.device)
        # A batched HVP row holds the probe, the product and about six more P-sized
        # intermediates of the double-backward / forward-mode pass.
        self.max_rows = probe_batch or int(max(1, min(32, budget // max(1, 8 * param_bytes))))
        self.seq_rows = min(self.max_rows, self.SEQUENTIAL_ROWS)
        self.chosen: str | None = None if hvp == "auto" else hvp
        self._auto: AutoHVP | None = None
        self._ledger: _Ledger | None = None
        self.last_hvp_seconds: float | None = None
        self.graph_replays = 0
        # flat (R, P) probe / product buffers reused chunk after chunk: a fresh multi-MB CPU
        # allocation per chunk costs page faults comparable to a small model's HVP
        self._scratch: dict[tuple[str, int], _Flat] = {}
        self._side_stream = None
        self._support_cache: dict[tuple, list] = {}

    def _buffer(self, what: str, R: int) -> _Flat:
        buf = self._scratch.get((what, R))
        if buf is None:
            cols = self.columns
            buf = _Flat(torch.empty((R, cols.P), dtype=cols.dtype, device=cols.device), cols)
            self._scratch[(what, R)] = buf
        return buf

    # ------------------------------------------------------------------ probes
    def make_probes(self, ks: list[int], gs: list[int], group_of_tensor: list[int]) -> list[torch.Tensor]:
        """Per-tensor probe rows ``(R, *shape)``: z^(k) on the row's group, 0 elsewhere."""
        return self._probe_rows(ks, gs, group_of_tensor)[1]

    def _probe_rows(self, ks, gs, group_of_tensor, out: _Flat | None = None):
        """``(flat or None, per-tensor views)``; fills the buffer ``out`` when given."""
        cols = self.columns
        if not cols.uniform:
            return None, self._probe_rows_per_tensor(ks, gs, group_of_tensor)
        R = len(ks)
        groups = sorted(set(gs))
        members = {g: [j for j, gj in enumerate(group_of_tensor) if gj == g] for g in groups}
        full = len(groups) == 1 and len(members[groups[0]]) == len(group_of_tensor)
        if out is None:
            alloc = torch.empty if full else torch.zeros
            buf = alloc((R, cols.P), dtype=cols.dtype, device=cols.device)
        else:
            buf = out.buf
            if not full:
                buf.zero_()
        for g in groups:
            runs = cols.runs(members[g])
            for r0, rows, k0 in _row_runs(ks, gs, g):
                for c0, c1, off in runs:
                    ops.fill_probes_(buf[r0 : r0 + rows, c0:c1], self.seed, k0, off, self.kind)
        return buf, (cols.views(buf) if out is None else out.views)

    def _probe_rows_per_tensor(self, ks, gs, group_of_tensor) -> list[torch.Tensor]:
        """Mixed parameter dtypes: one buffer per tensor."""
        R = len(ks)
        out = []
        for j, t in enumerate(self.layout.tensors):
            gj = group_of_tensor[j]
            n = t.numel()
            off = self.layout.offsets[j]
            alloc = torch.empty if all(g == gj for g in gs) else torch.zeros
            buf = alloc((R, n), dtype=t.dtype, device=t.device)
            for r0, rows, k0 in _row_runs(ks, gs, gj):
                ops.fill_probes_(buf[r0 : r0 + rows], self.seed, k0, off, self.kind)
            out.append(buf.view((R,) + tuple(t.shape)))
        return out

    # ------------------------------------------------------------------ chunks
    def _row_chunks(self, probe_indices: list[int], plan: ProbePlan, max_rows: int):
        """Yield (ks, gs) chunks of at most ``max_rows`` consecutive probe indices of ONE group.

        One group per chunk lets the reverse backbones seed the double backward with that
        group's gradients only (:meth:`ReverseHVP.hvp` ``support``), which halves the cost of
        block-supported rows on typical nets; mixing groups in a chunk would seed them all.
        """
        G = plan.num_groups
        for s in range(0, len(probe_indices), max_rows):
            kc = list(probe_indices[s : s + max_rows])
            for g in range(G):
                yield list(kc), [g] * len(kc)

    # ------------------------------------------------------------------ one chunk
    def _products(self, bb: HVPBackbone, z: list[torch.Tensor], w_out: _Flat | None = None, z_rows=None,
                  supports=None):
        """``(w per tensor (R, *shape), w_flat or None)`` for probe rows ``z`` (``z_rows[r]``:
        row ``r`` of every tensor, when the caller has them cached). ``supports[r]``: the
        tensors where row ``r``'s probe is nonzero (None: all), passed to backbones that
        prune the HVP with it."""
        def hvp(vs, sup):
            if sup is not None and bb.accepts_support:
                return bb.hvp(vs, support=sup)
            return bb.hvp(vs)

        R = z[0].shape[0]
        if supports is None:
            supports = [None] * R
        if bb.batched:
            union = None
            if all(sp is not None for sp in supports):
                union = sorted(set().union(*supports))
            return hvp(z, union), None
        row = (lambda r: z_rows[r]) if z_rows is not None else (lambda r: [zj[r] for zj in z])
        if R == 1:
            return [h.unsqueeze(0) for h in hvp(row(0), supports[0])], None
        cols = self.columns
        if cols.uniform:
            wo = w_out if w_out is not None else _Flat(
                torch.empty((R, cols.P), dtype=cols.dtype, device=cols.device), cols)
            for r in range(R):
                torch._foreach_copy_(wo.rows[r], hvp(row(r), supports[r]))
            return wo.views, wo.buf
        w_rows = [hvp(row(r), supports[r]) for r in range(R)]
        return [torch.stack([wr[j] for wr in w_rows]) for j in range(len(z))], None

    def _supports(self, gs, group_of_tensor):
        """Per row: the tensors of the row's group, or None when the group holds every tensor."""
        key = (tuple(gs), tuple(group_of_tensor))
        hit = self._support_cache.get(key)
        if hit is None:
            members = {}
            for g in set(gs):
                m = [j for j, gj in enumerate(group_of_tensor) if gj == g]
                members[g] = None if len(m) == len(group_of_tensor) else m
            hit = self._support_cache[key] = [members[g] for g in gs]
        return hit

    def _reduce(self, w, z):
        L = self.layout.num_blocks
        return ops.block_dot(w, z, self.block_index_t, L, batched=True, acc_dtype=self.acc_dtype)

    def _compute(self, bb: HVPBackbone, ks, gs, group_of_tensor, batch_index, weight) -> RowBatch:
        """The products and per-block reductions of rows ``(ks, gs)``; nothing delivered yet
        (a backbone failure leaves the sinks untouched and the rows to another backbone)."""
        R = len(ks)
        zbuf = self._buffer("z", R) if self.columns.uniform else None
        zf, z = self._probe_rows(ks, gs, group_of_tensor, out=zbuf)
        wbuf = self._buffer("w", R) if (self.columns.uniform and not bb.batched and R > 1) else None
        w, wf = self._products(bb, z, wbuf, zbuf.rows if zbuf is not None else None,
                               self._supports(gs, group_of_tensor))
        # z is in memory already: reading it is cheaper than regenerating it (Philox is
        # the bottleneck of the CPU kernels); both see the same probe bits, their sums agree to rounding
        dots, sq = self._reduce(w, z)
        return RowBatch(batch_index, weight, list(ks), list(gs), z, w, dots, sq, zf, wf)

    def _deliver(self, rb: RowBatch, sinks) -> None:
        if self._ledger is not None:
            self._ledger.add(rb.ks, rb.gs)
        for s in sinks:
            s.on_rows(rb)

    def _evaluate(self, bb: HVPBackbone, ks, gs, group_of_tensor, plan: ProbePlan, batch_index, weight, sinks):
        self._deliver(self._compute(bb, ks, gs, group_of_tensor, batch_index, weight), sinks)
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
        pos = {k: i for i, k in enumerate(probe_indices)}

        def canonical(row):  # the order of _row_chunks: probe windows, groups, probes
            return pos[row[0]] // self.max_rows, row[1], pos[row[0]]

        self.rng.begin_pass()  # one random function per call: every run replays the first pass
        try:
            for m, batch in enumerate(self.loss_spec.batches()):
                n_batches += 1
                total_count += batch.count
                self.rng.start_batch()
                self._ledger = _Ledger(probe_indices, plan.num_groups)
                chunks = list(self._row_chunks(probe_indices, plan, self.max_rows))
                bb = None
                if self.hvp == "auto" and m == 0:
                    rows = [(k, g) for ks, gs in chunks for k, g in zip(ks, gs)]
                    bb, pool, done_h = self._auto_first_batch(batch, m, rows, group_of_tensor, sinks, prog)
                    hvps += done_h
                    timings.update(self._auto.report())
                    timings["chosen"] = self.chosen
                    # regroup what is left: consecutive probe indices of one group stay together
                    chunks = _regroup(pool.rest(canonical))
                    chunks = [c for (ks, gs) in chunks for c in _rechunk(ks, gs, self.max_rows)]
                else:
                    bb = make_backbone(self.chosen, self.model, names, tensors, self.rng)
                if not bb.batched:
                    chunks = [c for (ks, gs) in chunks for c in _rechunk(ks, gs, self.seq_rows)]
                todo = chunks
                if self.cuda_graph:
                    hvps += self._run_graphed(bb, batch, todo, group_of_tensor, plan, m, sinks, prog)
                else:
                    if bb.batch is not batch:
                        bb.prepare(batch)
                    for ks, gs in todo:
                        rows, h = self._evaluate(bb, ks, gs, group_of_tensor, plan, m, batch.weight, sinks)
                        hvps += h
                        prog.update(rows)
                    bb.release()
                self._ledger.check(m)
                self.rng.end_batch()
                for s in sinks:
                    s.on_batch_end(m, batch.weight)
        finally:
            self._ledger = None
            prog.close()
        for s in sinks:
            s.finish(total_count)
        if self.cuda_graph:
            timings["cuda_graph_replays"] = self.graph_replays
        return RunInfo(
            backbone=str(self.chosen),
            backend=ops.backend_name(self.device),
            n_batches=n_batches,
            total_count=total_count,
            rows=n_rows,
            hvps=hvps,
            seconds=time.perf_counter() - t_start,
            timings=timings,
        )

    # ------------------------------------------------------------------ CUDA graphs
    #: most distinct chunk shapes (row count, group) captured per batch; others run eagerly.
    #: The graphs of a batch share one memory pool (they are replayed one after another).
    MAX_GRAPHS = 64

    def _run_graphed(self, bb: HVPBackbone, batch, todo, group_of_tensor, plan, m, sinks, prog) -> int:
        """One batch with the chunk step (HVPs + reduction) captured once per chunk shape and replayed.

        Everything runs on a side stream (the first-order graph too: autograd runs each
        backward op on the stream of its forward op, and the capture stream must see them).
        The first two chunks run eagerly (warm-up; their products are used). A chunk shape
        (its row count and groups) met at least twice more is captured (up to
        :attr:`MAX_GRAPHS` shapes); the capture itself runs no kernel, so the captured chunk is
        replayed like every later chunk of its shape. Other chunks run eagerly.
        """
        device = self.device
        main = torch.cuda.current_stream(device)
        if self._side_stream is None:
            # one side stream per runner: the reused scratch buffers stay on one stream
            self._side_stream = torch.cuda.Stream(device)
        side = self._side_stream
        side.wait_stream(main)
        hvps = 0
        graphs: dict[tuple, tuple] = {}
        pool = None
        left = Counter((len(ks), tuple(gs)) for ks, gs in todo[2:])
        failed = False
        try:
            with torch.cuda.stream(side):
                bb.prepare(batch)
                for i, (ks, gs) in enumerate(todo):
                    key = (len(ks), tuple(gs))
                    entry = graphs.get(key)
                    if entry is None and i >= 2 and not failed and left[key] >= 2 and len(graphs) < self.MAX_GRAPHS:
                        try:
                            if pool is None:
                                pool = torch.cuda.graph_pool_handle()
                            entry = graphs[key] = self._capture(bb, ks, gs, group_of_tensor, pool)
                        except RuntimeError as exc:  # an op that cannot be captured
                            failed = True
                            warnings.warn(
                                f"CUDA graph capture failed ({str(exc).splitlines()[0]}); the probes of this "
                                "batch run without graphs. Use cuda_graph=False to silence this.",
                                RuntimeWarning, stacklevel=4,
                            )
                    left[key] -= 1
                    if entry is None:
                        rows, h = self._evaluate(bb, ks, gs, group_of_tensor, plan, m, batch.weight, sinks)
                    else:
                        graph, (zfl, z, w, wf, dots, sq) = entry
                        zf = zfl.buf if zfl is not None else None
                        # eager: the probe index is a kernel argument, a replay would freeze it
                        if zfl is not None:
                            self._probe_rows(ks, gs, group_of_tensor, out=zfl)
                        else:
                            torch._foreach_copy_(z, self._probe_rows(ks, gs, group_of_tensor)[1])
                        graph.replay()
                        self.graph_replays += 1
                        rb = RowBatch(m, batch.weight, list(ks), list(gs), z, w, dots, sq, zf, wf)
                        self._deliver(rb, sinks)
                        rows, h = len(ks), (len(ks) if not bb.batched else 1)
                    hvps += h
                    prog.update(rows)
                bb.release()
            main.wait_stream(side)
        finally:
            graphs.clear()
        return hvps

    def _capture(self, bb: HVPBackbone, ks, gs, group_of_tensor, pool=None):
        """Capture ``z -> (w, dots, sq)`` for rows shaped like ``(ks, gs)`` into a CUDA graph."""
        cols = self.columns
        R = len(ks)
        if cols.uniform:
            zfl = _Flat(torch.zeros((R, cols.P), dtype=cols.dtype, device=cols.device), cols)
            z, z_rows = zfl.views, zfl.rows
        else:
            zfl, z_rows = None, None
            z = [torch.zeros((R,) + tuple(t.shape), dtype=t.dtype, device=t.device) for t in self.layout.tensors]
        w_out = None
        if not bb.batched and R > 1 and cols.uniform:
            w_out = _Flat(torch.empty((R, cols.P), dtype=cols.dtype, device=cols.device), cols)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=torch.cuda.current_stream(self.device)):
            w, wf = self._products(bb, z, w_out, z_rows, self._supports(gs, group_of_tensor))
            dots, sq = self._reduce(w, z)
        return graph, (zfl, z, w, wf, dots, sq)

    def _auto_first_batch(self, batch, m, rows, group_of_tensor, sinks, prog):
        """``hvp="auto"`` on the first batch of a run: ``(prepared backbone, rows left, HVPs done)``.

        Uses the choice made earlier in this call, or a cached choice checked on this call's
        first chunks, or times the candidates (:class:`_AutoTrials`). Rows evaluated while
        choosing are delivered; the rest are left in the returned pool.
        """
        auto = self._auto
        if auto is None:
            key = _model_key(self.model, self.layout) + (batch.signature, _criterion_name(batch), self.kind,
                                                         self.max_rows, self.curvature, _active_modes())
            auto = self._auto = AutoHVP(key, self.candidates, batched_ok=self.max_rows > 1)
        trials = _AutoTrials(self, auto, batch, m, group_of_tensor, sinks, prog, _RowPool(rows))
        bb = trials.choose(len(rows))
        self.chosen = bb.name
        return bb, trials.pool, trials.hvps


class _AutoTrials:
    """One backbone decision of ``hvp="auto"`` on real rows of a batch (rules: :mod:`hutchtrace.backbones.auto`).

    Every product it computes for a row of the call is delivered once, by a backbone of the
    reference family or one that agreed with it on the comparison probe; a backbone that
    fails puts its rows back into the pool. The comparison probe is not a row of the call
    and never reaches the sinks.
    """

    #: probe index of the comparison probe: far above any probe a call draws
    COMPARISON_PROBE = 1 << 40

    def __init__(self, runner: ProbeRunner, auto: AutoHVP, batch, m, group_of_tensor, sinks, prog,
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


def _row_runs(ks, gs, g):
    """``(first row, rows, first probe)`` for runs of adjacent rows of group ``g`` whose
    probe indices are consecutive: each run is one probe kernel call per column run."""
    out = []
    r, R = 0, len(ks)
    while r < R:
        if gs[r] != g:
            r += 1
            continue
        e = r
        while e + 1 < R and gs[e + 1] == g and ks[e + 1] == ks[e] + 1:
            e += 1
        out.append((r, e - r + 1, ks[r]))
        r = e + 1
    return out


def _regroup(rows):
    out = []
    for k, g in rows:
        if out and out[-1][1][-1] == g and out[-1][0][-1] + 1 == k:
            out[-1][0].append(k)
            out[-1][1].append(g)
        else:
            out.append(([k], [g]))
    return out


def _rechunk(ks, gs, max_rows):
    return [(ks[i : i + max_rows], gs[i : i + max_rows]) for i in range(0, len(ks), max_rows)]


def check_probe_count(K) -> int:
    """Validate a probe count (a positive int)."""
    if isinstance(K, bool) or not isinstance(K, int):
        raise TypeError(f"K (the number of probes) must be an int >= 1, got {K!r} of type {type(K).__name__}")
    if K < 1:
        raise ValueError(f"K (the number of probes) must be >= 1, got {K}")
    return K

