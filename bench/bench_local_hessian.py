"""Closed-form vs generic exact local Hessian (docs/maths.md section 7).

Main case: ``Linear(256 -> 256) + tanh``, ``N = 32`` block inputs, float32, ``p = 65,792``.

* ``closed_form``: :func:`~hutchtrace.layers.local_hessian.local_hessian` (``m = 256`` unit blocks of
  ``257 x 257``: 16.9 M numbers, 68 MB).
* ``generic``: every row of the same matrix by the generic ``torch.func`` path
  (vmapped ``jvp(grad S)`` against basis chunks), streamed through
  :func:`~hutchtrace.layers.local_hessian.local_hessian_rows`. Its ``p^2`` = 4.3 G entries (17 GB in
  float32) cannot be stored on a CPU box, so the rows are reduced to their diagonal entries
  as they arrive: the timing is the generic path's arithmetic, without the storage it would
  need on top.

Second case, small enough to run end to end on every path: ``Linear(64 -> 64) + tanh``,
``N = 16``, float64: the local Hessian *and* its full spectrum (closed form: 64
eigendecompositions of 65 x 65; dense paths: one of 4160 x 4160).

Timing: the methods of a case run in interleaved rounds (the order rotating); the ratio
``generic / closed form`` is taken per round and reported as a median with its range. The
256 generic path takes minutes, so it runs once, between closed-form rounds, and its ratio
is taken against each of them. Correctness is asserted once per case before any timing.
Results: ``bench/results/cpu_local_hessian.{json,md}`` (through :func:`models.write_results`).

    pytest bench/bench_local_hessian.py -s --benchmark-disable                       # full run (~3 min)
    HUTCHTRACE_BENCH_QUICK=1 pytest bench/bench_local_hessian.py --benchmark-disable  # smoke (1024 rows)
"""

from __future__ import annotations

import models as bm
import pytest
import torch
from torch import nn

from hutchtrace.layers.local_hessian import local_hessian, local_hessian_rows

_RESULTS: dict[str, dict] = {}


@pytest.fixture(scope="module", autouse=True)
def _write():
    bm.begin_suite("local_hessian")
    yield
    if not _RESULTS:
        return
    rows = []
    for key, r in _RESULTS.items():
        for m, sp in r["ratio_over_closed_form"].items():
            rows.append([r["case"], m, f"{r['seconds'][m]['median']:.4g}", r["seconds"][m]["n"],
                         f"{r['seconds']['closed_form']['median']:.4g}",
                         f"{sp['median']:.0f}x [{sp['min']:.0f}-{sp['max']:.0f}]"])
    md = ("### Exact local Hessian: closed form vs the dense paths\n\n"
          + bm.md_table(["case", "path", "seconds (median)", "rounds", "closed form seconds (median)",
                         "path / closed form, per round: median [range]"], rows) + "\n")
    bm.write_results("local_hessian", {"cases": _RESULTS}, md)


def _layer(n, m, N, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(n, m).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(m, n, generator=g, dtype=dtype) / n**0.5)
        layer.bias.copy_(torch.randn(m, generator=g, dtype=dtype) * 0.5)
    return layer, torch.randn(N, n, generator=g, dtype=dtype)


def _closed_form_rows(lh, rows: torch.Tensor) -> torch.Tensor:
    """Rows of the dense matrix assembled from the unit blocks (without forming it)."""
    P = lh.numel
    coords = lh.unit_coords
    unit_of = torch.empty(P, dtype=torch.long)
    pos_of = torch.empty(P, dtype=torch.long)
    unit_of[coords.reshape(-1)] = torch.arange(coords.shape[0]).repeat_interleave(coords.shape[1])
    pos_of[coords.reshape(-1)] = torch.arange(coords.shape[1]).repeat(coords.shape[0])
    out = torch.zeros(len(rows), P, dtype=lh.blocks.dtype)
    for i, r in enumerate(rows.tolist()):
        k, j = int(unit_of[r]), int(pos_of[r])
        out[i, coords[k]] = lh.blocks[k, j]
    return out


@pytest.fixture(scope="module")
def case256():
    """The 256 x 256 layer. First asserts (float64) that the generic path reproduces the closed
    form on 1024 rows: all 257 rows of units 0-2 (weights) and all 256 bias rows."""
    layer, z = _layer(256, 256, 32, torch.float64)
    lh = local_hessian(layer, z, layer, activation="tanh", method="closed_form")
    P = lh.numel
    want = torch.cat([torch.arange(0, 768), torch.arange(P - 256, P)])
    gen = torch.cat(
        [b for _, b in local_hessian_rows(layer, z, layer, activation="tanh", rows=want, chunk=256)]
    )
    ref = _closed_form_rows(lh, want)
    scale = ref.abs().max()
    assert scale > 1
    assert (gen - ref).abs().max() <= 1e-12 * scale
    return _layer(256, 256, 32, torch.float32)


def bench_local_hessian_256(benchmark, case256):
    """Closed form (5 rounds) around one streamed generic run; ratio per closed-form round."""
    bm.set_threads()
    layer, z = case256
    # a smoke run streams 1024 rows instead of all 65,792 (its ratio is not the full one)
    pick = torch.arange(1024) if bm.quick() else None

    def closed():
        lh = local_hessian(layer, z, layer, activation="tanh", method="closed_form")
        assert lh.blocks.shape == (256, 257, 257)

    def generic():
        diag = []
        for idx, rows in local_hessian_rows(layer, z, layer, activation="tanh", rows=pick, chunk=512,
                                            progress=False):
            diag.append(rows[torch.arange(len(idx)), idx])
        d = torch.cat(diag)
        ref = local_hessian(layer, z, layer, activation="tanh").diagonal()
        ref = ref if pick is None else ref[pick]
        assert torch.allclose(d, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))

    closed()  # warm-up
    cf = [bm.timed(closed) for _ in range(2)]
    gen = bm.timed(generic)
    cf += [bm.timed(closed) for _ in range(3)]
    _RESULTS["256"] = {
        "case": "Linear(256->256)+tanh, N = 32, float32: the local Hessian" + (" (smoke: 1024 rows)" if pick is not None
                                                                              else ""),
        "p": 65792, "rows_streamed": 1024 if pick is not None else 65792,
        "seconds": {"closed_form": bm.spread(cf), "generic": bm.spread([gen])},
        "ratio_over_closed_form": {"generic": bm.spread([gen / c for c in cf])},
    }
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    print(f"\n256: closed form {bm.spread(cf)['median']:.3g} s, generic {gen:.3g} s")


@pytest.fixture(scope="module")
def case64():
    layer, z = _layer(64, 64, 16, torch.float64)
    cf = local_hessian(layer, z, layer, activation="tanh").dense()
    for method in ("generic", "rows"):
        other = local_hessian(layer, z, layer, activation="tanh", method=method).matrix
        assert (other - cf).abs().max() <= 1e-12 * cf.abs().max()
    return layer, z


def bench_local_hessian_64_with_spectrum(benchmark, case64):
    """The three paths with the full spectrum, 3 interleaved rounds; ratios per round."""
    bm.set_threads()
    layer, z = case64

    def run(method):
        def f():
            ev = local_hessian(layer, z, layer, activation="tanh", method=method, progress=False).eigenvalues()
            assert ev.shape == (64 * 65,)
        return f

    fns = {m: run(m) for m in ("closed_form", "generic", "rows")}
    for f in fns.values():  # warm-up
        f()
    times = bm.interleave(fns, 1 if bm.quick() else 3)
    _RESULTS["64"] = {
        "case": "Linear(64->64)+tanh, N = 16, float64: the local Hessian and all 4160 eigenvalues",
        "p": 4160, "seconds": {m: bm.spread(t) for m, t in times.items()},
        "ratio_over_closed_form": {m: bm.spread(bm.paired_ratios(times[m], times["closed_form"]))
                                   for m in ("generic", "rows")},
    }
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
