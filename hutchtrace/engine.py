"""The probe loop shared by every estimator.

:class:`ProbeRunner` evaluates ``w = H z`` for a set of probe *rows* on every batch of a
loss and hands each result to *sinks*. A row is a pair ``(k, g)``: probe index ``k``
restricted to group ``g`` of a :class:`~hutchtrace.probing.ProbePlan`. Loop order:

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
  choice on the first chunks.
* ``cuda_graph=True`` (reverse backbones on CUDA): per batch, after the first-order graph
  is built on a side stream and two chunks have run eagerly (warm-up), the HVPs and the
  reduction of one chunk are captured in a CUDA graph and replayed for every later chunk of
  the same shape. The probe fill stays an eager launch (one per chunk): the compiled probe
  kernel takes the probe index as a kernel parameter, which a replay would freeze. The
  sinks run eagerly on the graph's static outputs, which they copy before the next replay.

Sinks accumulate ``weight_m * quantity`` over batches; :meth:`Sink.finish` receives the
normaliser ``N = sum_m count_m`` (see :mod:`hutchtrace.loss`).
"""

from __future__ import annotations

import time
import warnings
from collections import Counter
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


def _model_key(model: nn.Module, layout: BlockLayout) -> tuple:
    return (
        type(model).__qualname__,
        tuple((n, tuple(t.shape), str(t.dtype), str(t.device)) for n, t in zip(layout.names, layout.tensors)),
    )


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
        self.chosen: str | None = None
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

    def _evaluate(self, bb: HVPBackbone, ks, gs, group_of_tensor, plan: ProbePlan, batch_index, weight, sinks):
        R = len(ks)
        zbuf = self._buffer("z", R) if self.columns.uniform else None
        zf, z = self._probe_rows(ks, gs, group_of_tensor, out=zbuf)
        wbuf = self._buffer("w", R) if (self.columns.uniform and not bb.batched and R > 1) else None
        w, wf = self._products(bb, z, wbuf, zbuf.rows if zbuf is not None else None,
                               self._supports(gs, group_of_tensor))
        # z is in memory already: reading it is cheaper than regenerating it (Philox is
        # the bottleneck of the CPU kernels); both see the same probe bits, their sums agree to rounding
        dots, sq = self._reduce(w, z)
        rb = RowBatch(batch_index, weight, list(ks), list(gs), z, w, dots, sq, zf, wf)
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
                seq_chunks = [c for (ks, gs) in chunks for c in _rechunk(ks, gs, self.seq_rows)]
                if self.hvp == "auto" and self.chosen is None:
                    seq_chunks, chunks, done_h = self._auto_first_batch(
                        batch, m, chunks, plan, group_of_tensor, sinks, prog, timings
                    )
                    hvps += done_h
                    chosen_name = self.chosen
                elif self.hvp != "auto":
                    self.chosen = self.hvp
                bb = make_backbone(self.chosen, self.model, names, tensors, self.rng)
                todo = chunks if bb.batched else seq_chunks
                if self.cuda_graph:
                    hvps += self._run_graphed(bb, batch, todo, group_of_tensor, plan, m, sinks, prog)
                else:
                    bb.prepare(batch)
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
        if self.cuda_graph:
            timings["cuda_graph_replays"] = self.graph_replays
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
                        for s in sinks:
                            s.on_rows(rb)
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
        seq = [c for (ks, gs) in pending for c in _rechunk(ks, gs, self.seq_rows)]
        rechunked = [c for (ks, gs) in pending for c in _rechunk(ks, gs, self.max_rows)]
        return seq, rechunked, hvps


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

