"""Peak memory of ``block_traces`` vs one HVP (issue 9 (e)).

Measured quantity: the peak of live tensor bytes allocated during the call, above what was
live before it.

* CPU: replayed from the allocation events of ``torch.profiler`` (``profile_memory=True``).
  It counts every tensor the c10 allocator hands out: autograd graphs, saved activations,
  products, buffers. It does not count malloc fragmentation or Python objects.
* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.

The reference is **one HVP**: build the batch (forward + first-order graph with
``create_graph=True``) and one reverse-mode HVP of a given vector.

Each row of the table measures one of these:

* ``sequential, sample``: ``block_traces(K=16, hvp="reverse", probe_batch=1,
  variance="sample")`` (one probe row at a time). ``variance="auto"``, the default, is the
  sample variance in this mode, so this is also the sequential mode's default.
* ``sequential, pairwise``: the same with ``variance="pairwise"``. It keeps a round of 16
  products and probes for the U-statistic.
* ``default``: ``block_traces(K=16)`` with every default (``hvp="auto"``, batched probe rows
  up to the memory budget, pairwise variance). This row is for information only.

Target (issue 9): at most 1.2x the memory of one HVP in sequential mode. No timings are
taken. Before measuring, one correctness check runs: the sequential run's samples equal a
batched run's samples.

    pytest bench/bench_memory.py -s
"""

from __future__ import annotations

import models as bm
import pytest
import torch

import hutchtrace
from hutchtrace.problem.blocks import resolve_blocks

K = 16
_RESULTS: dict[str, dict] = {}


def peak_bytes(fn, dev: str) -> int:
    """Peak live tensor bytes allocated by ``fn()`` above the state before it."""
    if dev.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    cur = peak = 0
    for _, n in events:
        cur += n
        peak = max(peak, cur)
    return peak


def one_hvp(model, crit, data, dev):
    fn = bm.bare_probe_loop(model, crit, data, 1, "reverse", 1, dev)
    return fn


@pytest.fixture(scope="module", autouse=True)
def _write():
    bm.begin_suite("memory")
    yield
    if _RESULTS:
        rows = []
        for name, r in _RESULTS.items():
            for mode in ("sequential, sample", "sequential, pairwise", "default"):
                rows.append([name, r["P"], mode, r["hvp_bytes"] / 2**20, r["bytes"][mode] / 2**20, r["ratio"][mode],
                             ("met" if r["ratio"][mode] <= 1.2 else "not met") if mode.startswith("seq") else "-"])
        md = ("### Peak memory: block_traces vs one HVP\n\n"
              + bm.md_table(["model", "P", "block_traces mode", "one HVP (MiB)", "block_traces (MiB)", "ratio",
                             "target <= 1.2"], rows)
              + f"\n\nPeak live tensor bytes during the call (K = {K}); see bench/bench_memory.py.\n")
        bm.write_results("memory", {"K": K, "cases": _RESULTS}, md)


@pytest.mark.parametrize("name", bm.MODELS)
def bench_memory(benchmark, name):
    bm.set_threads()
    dev = bm.device()
    model, crit, data = bm.make(name, bm.scale("gpu" if dev.startswith("cuda") else "bench"), device=dev)
    seq = dict(hvp="reverse", probe_batch=1, probing="global", progress=False, seed=3)
    a = hutchtrace.block_traces(model, crit, K=4, data=data, variance="sample", **seq)
    b = hutchtrace.block_traces(model, crit, K=4, data=data, seed=3, hvp="reverse-batched", probe_batch=4,
                                probing="global", variance="sample", progress=False)
    torch.testing.assert_close(a.samples, b.samples, rtol=1e-4, atol=1e-5 * float(a.samples.abs().max()))
    fns = {
        "sequential, sample": lambda: hutchtrace.block_traces(model, crit, K=K, data=data, variance="sample", **seq),
        "sequential, pairwise": lambda: hutchtrace.block_traces(model, crit, K=K, data=data, variance="pairwise",
                                                                **seq),
        "default": lambda: hutchtrace.block_traces(model, crit, K=K, data=data, seed=3, progress=False),
    }
    hvp = one_hvp(model, crit, data, dev)
    hvp()
    for f in fns.values():  # warm-up: lazy initialisation and the auto-backbone cache
        f()
    hvp_bytes = min(peak_bytes(hvp, dev) for _ in range(2))
    got = {m: min(peak_bytes(f, dev) for _ in range(2)) for m, f in fns.items()}
    result = {"P": bm.numel(model), "L": resolve_blocks(model).num_blocks, "device": dev, "hvp_bytes": hvp_bytes,
              "bytes": got, "ratio": {m: v / hvp_bytes for m, v in got.items()},
              "param_bytes": bm.numel(model) * 4}
    _RESULTS[name] = result
    benchmark.group = "memory"
    benchmark.extra_info.update({k: v for k, v in result.items()})
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    print(f"\n{name}: one HVP {hvp_bytes / 2**20:.2f} MiB; "
          + ", ".join(f"{m} {v / 2**20:.2f} MiB ({v / hvp_bytes:.2f}x)" for m, v in got.items()))
