"""What the probe loop hands out and how it keeps track of rows.

A *row* is a pair ``(k, g)``: probe index ``k`` restricted to group ``g`` of a
:class:`~hutchtrace.estimate.probing.ProbePlan`. The runner
(:class:`~hutchtrace.estimate.engine.runner.ProbeRunner`) evaluates rows in chunks and hands
every chunk's products to the :class:`Sink` s as one :class:`RowBatch`; :class:`RunInfo` says
what a run did.

Probes and products of a chunk live in ONE flat ``(R, P)`` buffer per quantity
(:class:`_Flat`), ``P`` the number of selected coordinates; :class:`Columns` says where each
selected tensor sits in it and which tensors form runs of contiguous *global* offsets (the
probe entries depend only on the seed, the probe index and the global offset, so one probe
kernel call fills a whole run).

Bookkeeping: :class:`_Ledger` checks that every row of a batch reached the sinks exactly
once; :class:`_RowPool` holds the rows of a batch not evaluated yet (the ``auto`` backbone
trials take rows from it and hand back those of a backbone that failed); :func:`_row_runs`,
:func:`_regroup` and :func:`_rechunk` cut rows into chunks of consecutive probe indices of
one group.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...problem.blocks import BlockLayout

__all__ = ["Columns", "RowBatch", "RunInfo", "Sink"]


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

    __slots__ = ("buf", "rows", "views")

    def __init__(self, buf: torch.Tensor, cols: Columns):
        self.buf = buf
        self.views = cols.views(buf)
        self.rows = [[v[r] for v in self.views] for r in range(buf.shape[0])]


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
