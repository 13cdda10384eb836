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
the tanh MLP 16-32-32-8 of docs/maths.md on 256 samples, and ``zoo.make_resnet`` (ResNet-18 layout,
width 8, 8 images of 16x16, BatchNorm in train mode). The ratios are printed at the end and
written to ``bench/results/curvature_ratios.json``. Run (one thread, as in the report)::

    OMP_NUM_THREADS=1 pytest bench/bench_curvature.py -s --benchmark-columns=median,rounds
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import hutchtrace
from hutchtrace import zoo
from hutchtrace.coupling import block_coupling
from hutchtrace.curvature_op import CurvatureProducts, probe_rows
from hutchtrace.decompose import decompose
from hutchtrace.loss import make_loss_spec
from hutchtrace.state import PreservedState

K = 16
K_BLOCK = 2
ROWS = 16
CASES = ("mlp", "resnet")
_PER_PROBE: dict[tuple[str, str], float] = {}
_EXTRA: dict[str, dict] = {}


def _make(case):
    if case == "mlp":
        return zoo.make_mlp(n=256, dtype=torch.float32)
    return zoo.make_resnet(n=8, size=16, width=8, dtype=torch.float32)


@pytest.fixture(scope="module", params=CASES)
def case(request):
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model, crit, data = _make(request.param)
    L = len(hutchtrace.resolve_blocks(model).blocks)
    _EXTRA[request.param] = {"L": L, "P": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    return request.param, model, crit, data, L


ROUNDS = 11


def _time(benchmark, case_name, name, fn, probes):
    benchmark.pedantic(fn, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    if benchmark.stats is None:  # --benchmark-disable: a smoke run, nothing timed
        return
    per_probe = benchmark.stats.stats.median / probes
    _PER_PROBE[(case_name, name)] = per_probe
    benchmark.extra_info["per_probe_s"] = per_probe
    base = _PER_PROBE.get((case_name, "block_traces"))
    if base:
        benchmark.extra_info["ratio_vs_block_traces"] = per_probe / base


def bench_block_traces(benchmark, case):
    name, model, crit, data, _ = case
    _time(benchmark, name, "block_traces", lambda: hutchtrace.block_traces(
        model, crit, K=K, data=data, seed=0, hvp="reverse-batched", probe_batch=ROWS, progress=False), K)


def _loop(model, crit, data, curvature, hvp):
    layout = hutchtrace.resolve_blocks(model)
    spec = make_loss_spec(crit, data)

    def run():
        with PreservedState(model):
            op = CurvatureProducts(model, layout, spec, (curvature,), hvp=hvp, max_rows=ROWS)
            for s in range(0, K, ROWS):
                op.apply(probe_rows(layout, 0, "rademacher", list(range(s, min(K, s + ROWS)))))
            op.close()

    return run


def bench_hvp_loop(benchmark, case):
    name, model, crit, data, _ = case
    _time(benchmark, name, "hvp_loop", _loop(model, crit, data, "hessian", "reverse-batched"), K)


def bench_ggn_loop(benchmark, case):
    name, model, crit, data, _ = case
    _time(benchmark, name, "ggn_loop", _loop(model, crit, data, "ggn", "ggn-vmap"), K)


def bench_block_traces_ggn(benchmark, case):
    name, model, crit, data, _ = case
    _time(benchmark, name, "block_traces_ggn", lambda: hutchtrace.block_traces(
        model, crit, K=K, data=data, seed=0, curvature="ggn", hvp="ggn-vmap", probe_batch=ROWS, progress=False), K)


def bench_decompose(benchmark, case):
    name, model, crit, data, _ = case
    _time(benchmark, name, "decompose", lambda: decompose(
        model, crit, K=K, data=data, seed=0, hvp="reverse-batched", ggn="ggn-vmap", probe_batch=ROWS,
        progress=False), K)


def bench_coupling_block(benchmark, case):
    name, model, crit, data, L = case
    _time(benchmark, name, "coupling_block", lambda: block_coupling(
        model, crit, K=K_BLOCK, data=data, seed=0, mode="block", hvp="reverse-batched", probe_batch=ROWS,
        progress=False), K_BLOCK)
    if (name, "coupling_block") in _PER_PROBE:
        _PER_PROBE[(name, "coupling_block_per_product")] = _PER_PROBE[(name, "coupling_block")] / L


def bench_coupling_rowsum(benchmark, case):
    name, model, crit, data, _ = case
    _time(benchmark, name, "coupling_rowsum", lambda: block_coupling(
        model, crit, K=K, data=data, seed=0, mode="rowsum", hvp="reverse-batched", probe_batch=ROWS,
        progress=False), K)


def bench_coupling_ustat(benchmark, case):
    name, model, crit, data, _ = case
    _time(benchmark, name, "coupling_ustat", lambda: block_coupling(
        model, crit, K=K, data=data, seed=0, mode="ustat", hvp="reverse-batched", probe_batch=ROWS,
        progress=False), K)


def bench_zz_report(case):
    """Not timed: prints and saves the ratios of the runs above (same process, same machine)."""
    name = case[0]
    if (name, "block_traces") not in _PER_PROBE:
        pytest.skip("no timings (benchmarks disabled or the timed runs were deselected)")
    base = _PER_PROBE[(name, "block_traces")]
    loop = _PER_PROBE[(name, "hvp_loop")]
    ratios = {k[1]: v / base for k, v in _PER_PROBE.items() if k[0] == name}
    vs_loop = {k[1]: v / loop for k, v in _PER_PROBE.items() if k[0] == name}
    _EXTRA[name]["per_probe_s_block_traces"] = base
    _EXTRA[name]["per_probe_s_hvp_loop"] = loop
    _EXTRA[name]["ratios_vs_block_traces"] = ratios
    _EXTRA[name]["ratios_vs_hvp_loop"] = vs_loop
    print(f"\n[{name}] L={_EXTRA[name]['L']} P={_EXTRA[name]['P']}  block_traces {base * 1e3:.3f} ms/probe, "
          f"HVP loop {loop * 1e3:.3f} ms/probe")
    print(f"  {'':<28} {'vs block_traces':>16} {'vs HVP loop':>12}")
    for k, v in ratios.items():
        print(f"  {k:<28} {v:15.2f}x {vs_loop[k]:11.2f}x")
    out = Path(__file__).parent / "results" / "curvature_ratios.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"K": K, "K_block": K_BLOCK, "probe_batch": ROWS, "threads": torch.get_num_threads(),
                               "cases": _EXTRA}, indent=2))
