"""CUDA graphs for the probe loop (``cuda_graph=True``; reverse backbones on CUDA).

Per batch, after the first-order graph is built on a side stream and two chunks have run
eagerly (warm-up), the HVPs and the reduction of one chunk are captured in a CUDA graph and
replayed for every later chunk of the same shape. The probe fill stays an eager launch (one
per chunk): the compiled probe kernel takes the probe index as a kernel parameter, which a
replay would freeze. The sinks run eagerly on the graph's static outputs, which they copy
before the next replay.

Both functions work on a :class:`~hutchtrace.estimate.engine.runner.ProbeRunner`'s state
(its buffers, products, reduction and delivery); they live here because only CUDA runs need
them.
"""

from __future__ import annotations

import warnings
from collections import Counter

import torch

from ...backbones.base import HVPBackbone
from .rows import RowBatch, _Flat

__all__ = ["MAX_GRAPHS", "capture", "run_graphed"]

#: most distinct chunk shapes (row count, group) captured per batch; others run eagerly.
#: The graphs of a batch share one memory pool (they are replayed one after another).
MAX_GRAPHS = 64


def run_graphed(runner, bb: HVPBackbone, batch, todo, group_of_tensor, plan, m, sinks, prog) -> int:
    """One batch of ``runner`` with the chunk step (HVPs + reduction) captured once per chunk
    shape and replayed; returns the HVPs done.

    Everything runs on a side stream (the first-order graph too: autograd runs each
    backward op on the stream of its forward op, and the capture stream must see them).
    The first two chunks run eagerly (warm-up; their products are used). A chunk shape
    (its row count and groups) met at least twice more is captured (up to
    :data:`MAX_GRAPHS` shapes); the capture itself runs no kernel, so the captured chunk is
    replayed like every later chunk of its shape. Other chunks run eagerly.
    """
    device = runner.device
    main = torch.cuda.current_stream(device)
    if runner._side_stream is None:
        # one side stream per runner: the reused scratch buffers stay on one stream
        runner._side_stream = torch.cuda.Stream(device)
    side = runner._side_stream
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
                if entry is None and i >= 2 and not failed and left[key] >= 2 and len(graphs) < MAX_GRAPHS:
                    try:
                        if pool is None:
                            pool = torch.cuda.graph_pool_handle()
                        entry = graphs[key] = capture(runner, bb, ks, gs, group_of_tensor, pool)
                    except RuntimeError as exc:  # an op that cannot be captured
                        failed = True
                        warnings.warn(
                            f"CUDA graph capture failed ({str(exc).splitlines()[0]}); the probes of this "
                            "batch run without graphs. Use cuda_graph=False to silence this.",
                            RuntimeWarning, stacklevel=4,
                        )
                left[key] -= 1
                if entry is None:
                    rows, h = runner._evaluate(bb, ks, gs, group_of_tensor, plan, m, batch.weight, sinks)
                else:
                    rows, h = _replay(runner, bb, entry, ks, gs, group_of_tensor, m, batch.weight, sinks)
                hvps += h
                prog.update(rows)
            bb.release()
        main.wait_stream(side)
    finally:
        graphs.clear()
    return hvps


def _replay(runner, bb: HVPBackbone, entry, ks, gs, group_of_tensor, m, weight, sinks) -> tuple[int, int]:
    """Fill the captured chunk's probes, replay its graph, deliver: ``(rows, HVPs)``."""
    graph, (zfl, z, w, wf, dots, sq) = entry
    zf = zfl.buf if zfl is not None else None
    # eager: the probe index is a kernel argument, a replay would freeze it
    if zfl is not None:
        runner._probe_rows(ks, gs, group_of_tensor, out=zfl)
    else:
        torch._foreach_copy_(z, runner._probe_rows(ks, gs, group_of_tensor)[1])
    graph.replay()
    runner.graph_replays += 1
    rb = RowBatch(m, weight, list(ks), list(gs), z, w, dots, sq, zf, wf)
    runner._deliver(rb, sinks)
    return len(ks), (len(ks) if not bb.batched else 1)


def capture(runner, bb: HVPBackbone, ks, gs, group_of_tensor, pool=None):
    """Capture ``z -> (w, dots, sq)`` for rows shaped like ``(ks, gs)`` into a CUDA graph:
    ``(graph, (z flat buffer or None, z, w, w flat or None, dots, sq))``, the static tensors
    a replay reads and writes."""
    cols = runner.columns
    R = len(ks)
    if cols.uniform:
        zfl = _Flat(torch.zeros((R, cols.P), dtype=cols.dtype, device=cols.device), cols)
        z, z_rows = zfl.views, zfl.rows
    else:
        zfl, z_rows = None, None
        z = [torch.zeros((R,) + tuple(t.shape), dtype=t.dtype, device=t.device)
             for t in runner.layout.tensors]
    w_out = None
    if not bb.batched and R > 1 and cols.uniform:
        w_out = _Flat(torch.empty((R, cols.P), dtype=cols.dtype, device=cols.device), cols)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, stream=torch.cuda.current_stream(runner.device)):
        w, wf = runner._products(bb, z, w_out, z_rows, runner._supports(gs, group_of_tensor))
        dots, sq = runner._reduce(w, z)
    return graph, (zfl, z, w, wf, dots, sq)
