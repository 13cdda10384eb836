"""The probe loop shared by every estimator: :class:`ProbeRunner`.

:class:`ProbeRunner` evaluates ``w = H z`` for a set of probe *rows* on every batch of a
loss and hands each result to *sinks* (:mod:`hutchtrace.estimate.engine.rows`). A row is a
pair ``(k, g)``: probe index ``k`` restricted to group ``g`` of a
:class:`~hutchtrace.estimate.probing.ProbePlan`. Loop order:

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
  choice on the first chunks (:mod:`hutchtrace.estimate.engine.auto`; its rules are in
  :mod:`hutchtrace.backbones.auto`).
* every row of a run is delivered to the sinks exactly once per batch: a backbone that fails
  hands its rows back, and a ledger checks the count at the end of every batch (a
  violation is a hutchtrace bug and raises).
* one random function per call: every pass over the batches (each run: the pilot, every
  adaptive round, a plan switch) replays the RNG state of the runner's first pass, and every
  forward of a batch replays that batch's state (:class:`~hutchtrace.core.state.ForwardRNG`). So
  dropout draws ONE mask per batch for the whole call, the same for every probe, backbone
  and round, and a DataLoader that shuffles with the global RNG yields the same batches in
  every pass.
* ``cuda_graph=True`` (reverse backbones on CUDA): the HVPs and the reduction of a chunk are
  replayed from a captured CUDA graph (:mod:`hutchtrace.estimate.engine.graphs`).

Memory: a batched HVP row holds about eight P-sized tensors, so a chunk has at most
``max_memory / (8 * parameter bytes)`` rows (32 at most; :func:`default_memory_budget`
when no budget is given).

Sinks accumulate ``weight_m * quantity`` over batches; :meth:`Sink.finish` receives the
normaliser ``N = sum_m count_m`` (see :mod:`hutchtrace.problem.loss`).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from ...backbones.auto import AutoHVP
from ...backbones.base import HVPBackbone, backbones_for, make_backbone
from ...core.progress import Progress
from ...core.state import ForwardRNG
from ...kernels import ops
from ...problem.blocks import BlockLayout
from ...problem.loss import LossSpec
from ..probing import ProbePlan
from . import graphs
from .auto import AutoTrials, auto_key
from .rows import Columns, RowBatch, RunInfo, Sink, _Flat, _Ledger, _rechunk, _regroup, _row_runs, _RowPool

__all__ = ["ProbeRunner", "check_probe_count", "default_memory_budget"]


def default_memory_budget(device: torch.device) -> int:
    """Bytes the probe loop may use for batched probes: half the free GPU memory, or 2 GiB."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    return 2 << 30


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
            graph and replay it (reverse backbones, CUDA tensors, static shapes; see
            :mod:`hutchtrace.estimate.engine.graphs`). ``hvp="auto"`` then means ``"reverse"``.
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
                    hvps += graphs.run_graphed(self, bb, batch, todo, group_of_tensor, plan, m, sinks, prog)
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

    def _auto_first_batch(self, batch, m, rows, group_of_tensor, sinks, prog):
        """``hvp="auto"`` on the first batch of a run: ``(prepared backbone, rows left, HVPs done)``.

        Uses the choice made earlier in this call, or a cached choice checked on this call's
        first chunks, or times the candidates (:class:`~hutchtrace.estimate.engine.auto.AutoTrials`).
        Rows evaluated while choosing are delivered; the rest are left in the returned pool.
        """
        auto = self._auto
        if auto is None:
            auto = self._auto = AutoHVP(auto_key(self, batch), self.candidates, batched_ok=self.max_rows > 1)
        trials = AutoTrials(self, auto, batch, m, group_of_tensor, sinks, prog, _RowPool(rows))
        bb = trials.choose(len(rows))
        self.chosen = bb.name
        return bb, trials.pool, trials.hvps


def check_probe_count(K) -> int:
    """Validate a probe count (a positive int)."""
    if isinstance(K, bool) or not isinstance(K, int):
        raise TypeError(f"K (the number of probes) must be an int >= 1, got {K!r} of type {type(K).__name__}")
    if K < 1:
        raise ValueError(f"K (the number of probes) must be >= 1, got {K}")
    return K
