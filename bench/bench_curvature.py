"""Cost of the curvature-structure diagnostics per probe, relative to ``block_traces``.

For each model, in one run: seconds per probe (median of 5 rounds / K) of

* ``block_traces``: one HVP per probe (the baseline, ratio 1);
* ``block_traces(curvature="ggn")``: one GGN-vector product per probe;
* ``decompose``: one HVP + one GGN-vector product per probe (+ three block reductions);
* ``block_coupling(mode="block")``: ``L`` products per probe index (reported per probe index
  and per product);
* ``block_coupling(mode="rowsum")`` and ``mode="ustat"``: one HVP per probe (+ the ``O(K^2 P)``
  Gram matrices of the U-statistic, which ``rowsum`` also builds for its diagonal);
* ``hvp_loop`` / ``ggn_loop``: the bare products (probe generation + batched products of the
  same backbones, nothing else). ``block_traces`` itself does more than its HVPs (its
  per-probe statistics, e.g. the pairwise variance), so every ratio is also given relative to
  ``hvp_loop``.

All calls use the same backbones (``reverse-batched`` Hessian, ``ggn-vmap`` GGN) and the same
probe batch, so the ratios compare the algorithms, not backbone choices. Models (float32):
the tanh MLP 16-32-32-8 of docs/maths.md on 256 samples, and ``zoo.make_resnet`` (ResNet-18
layout, width 8, 8 images of 16x16, BatchNorm in train mode).

**What "per probe" means here.** Each call runs ``K = 16`` probes (2 probe indices for
``mode="block"``) from scratch, and its wall time is divided by that count: the per-call
set-up (forward pass, first-order graph, block layout) is spread over 16 probes, and
``block_traces`` uses its default error bars (the pairwise variance). This is a different
quantity from ``bench_overhead.py``'s per-probe ratio, the *marginal* cost of one more
probe ``(T(64) - T(8)) / 56``, which leaves the set-up out.

Every variant runs once per round, in an order that rotates from round to round; ratios
are taken per round and reported as a median with the interquartile range. Results:
``bench/results/cpu_curvature.{json,md}`` (through :func:`models.write_results`).

    pytest bench/bench_curvature.py -s --benchmark-disable                          # full run
    HUTCHTRACE_BENCH_QUICK=1 pytest bench/bench_curvature.py --benchmark-disable    # smoke
"""

from __future__ import annotations

import models as bm
import pytest
import torch

import hutchtrace
from hutchtrace import zoo
from hutchtrace.backbones.curvature_op import CurvatureProducts, probe_rows
from hutchtrace.core.state import PreservedState
from hutchtrace.problem.loss import make_loss_spec
from hutchtrace.structure.coupling import block_coupling
from hutchtrace.structure.decompose import decompose

K = 16
K_BLOCK = 2
ROWS = 16
CASES = ("mlp", "resnet")
_RESULTS: dict[str, dict] = {}


def _make(case):
    if case == "mlp":
        return zoo.make_mlp(n=256, dtype=torch.float32)
    return zoo.make_resnet(n=8, size=16, width=8, dtype=torch.float32)


def _loop(model, crit, data, curvature, hvp):
    """The bare products: probe generation + batched products of one backbone, nothing else."""
    layout = hutchtrace.resolve_blocks(model)
    spec = make_loss_spec(crit, data)

    def run():
        with PreservedState(model):
            op = CurvatureProducts(model, layout, spec, (curvature,), hvp=hvp, max_rows=ROWS)
            for s in range(0, K, ROWS):
                op.apply(probe_rows(layout, 0, "rademacher", list(range(s, min(K, s + ROWS)))))
            op.close()

    return run


def _variants(model, crit, data):
    """``name -> (callable, probes per call)``."""
    kw = dict(data=data, seed=0, probe_batch=ROWS, progress=False)
    return {
        "block_traces": (lambda: hutchtrace.block_traces(model, crit, K=K, hvp="reverse-batched", **kw), K),
        "hvp_loop": (_loop(model, crit, data, "hessian", "reverse-batched"), K),
        "ggn_loop": (_loop(model, crit, data, "ggn", "ggn-vmap"), K),
        "block_traces_ggn": (lambda: hutchtrace.block_traces(model, crit, K=K, curvature="ggn", hvp="ggn-vmap", **kw),
                             K),
        "decompose": (lambda: decompose(model, crit, K=K, hvp="reverse-batched", ggn="ggn-vmap", **kw), K),
        "coupling_block": (lambda: block_coupling(model, crit, K=K_BLOCK, mode="block", hvp="reverse-batched", **kw),
                           K_BLOCK),
        "coupling_rowsum": (lambda: block_coupling(model, crit, K=K, mode="rowsum", hvp="reverse-batched", **kw), K),
        "coupling_ustat": (lambda: block_coupling(model, crit, K=K, mode="ustat", hvp="reverse-batched", **kw), K),
    }


@pytest.fixture(scope="module", autouse=True)
def _write():
    bm.begin_suite("curvature")
    yield
    if not _RESULTS:
        return
    rows = []
    for case, r in _RESULTS.items():
        for v, sp in r["ratio_vs_block_traces"].items():
            lp = r["ratio_vs_hvp_loop"][v]
            rows.append([case, v, f"{1e3 * r['per_probe_s'][v]['median']:.3g}",
                         f"{sp['median']:.2f} [{sp['q1']:.2f}-{sp['q3']:.2f}]",
                         f"{lp['median']:.2f} [{lp['q1']:.2f}-{lp['q3']:.2f}]"])
    md = ("### Curvature diagnostics: cost per probe (whole call / probes)\n\n"
          + bm.md_table(["model", "call", "ms per probe (median)", "vs block_traces, median [IQR]",
                         "vs bare HVP loop, median [IQR]"], rows)
          + f"\n\nK = {K} probes per call ({K_BLOCK} probe indices of L products for coupling_block), "
            f"probe batch {ROWS}; ratios per round over {r['rounds']} interleaved rounds.\n")
    bm.write_results("curvature", {"K": K, "K_block": K_BLOCK, "probe_batch": ROWS, "cases": _RESULTS}, md)


@pytest.mark.parametrize("case", CASES)
def bench_curvature_costs(benchmark, case):
    bm.set_threads()
    model, crit, data = _make(case)
    L = hutchtrace.resolve_blocks(model).num_blocks
    variants = _variants(model, crit, data)
    fns = {n: f for n, (f, _) in variants.items()}
    for f in fns.values():  # warm-up (lazy initialisation, caches)
        f()
    rounds = 1 if bm.quick() else 7
    times = bm.interleave(fns, rounds)
    per_probe = {n: [t / variants[n][1] for t in ts] for n, ts in times.items()}
    per_probe["coupling_block_per_product"] = [t / L for t in per_probe["coupling_block"]]
    _RESULTS[case] = {
        "L": L, "P": bm.numel(model), "rounds": rounds,
        "per_probe_s": {n: bm.spread(v) for n, v in per_probe.items()},
        "ratio_vs_block_traces": {n: bm.spread(bm.paired_ratios(v, per_probe["block_traces"]))
                                  for n, v in per_probe.items()},
        "ratio_vs_hvp_loop": {n: bm.spread(bm.paired_ratios(v, per_probe["hvp_loop"])) for n, v in per_probe.items()},
    }
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    print(f"\n[{case}] L={L}: " + ", ".join(
        f"{n} {_RESULTS[case]['ratio_vs_hvp_loop'][n]['median']:.2f}x" for n in per_probe) + " (vs the HVP loop)")
