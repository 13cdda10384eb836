"""Closed-form vs generic exact local Hessian (docs/maths.md section 7).

Main case: ``Linear(256 -> 256) + tanh``, ``N = 32`` block inputs, float32, ``p = 65,792``.

* ``closed_form``: :func:`~hutchtrace.local_hessian.local_hessian` (``m = 256`` unit blocks of
  ``257 x 257``: 16.9 M numbers, 68 MB).
* ``generic``: every row of the same matrix by the generic ``torch.func`` path
  (vmapped ``jvp(grad S)`` against basis chunks), streamed through
  :func:`~hutchtrace.local_hessian.local_hessian_rows`. Its ``p^2`` = 4.3 G entries (17 GB in
  float32) cannot be stored on a CPU box, so the rows are reduced to their diagonal entries
  as they arrive: the timing is the generic path's arithmetic, without the storage it would
  need on top.

Second case, small enough to run end to end on both paths: ``Linear(64 -> 64) + tanh``,
``N = 16``, float64 (the case docs/maths.md section 7 discusses): the local Hessian *and* its full spectrum
(closed form: 64 eigendecompositions of 65 x 65; dense paths: one of 4160 x 4160).

Correctness is asserted once per case before any timing. With ``--benchmark-disable`` (smoke
runs) the 256 generic case streams 1024 rows only. Run (one thread, as in the report):

    OMP_NUM_THREADS=1 pytest bench/bench_local_hessian.py --benchmark-columns=mean,stddev,rounds
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hutchtrace.local_hessian import local_hessian, local_hessian_rows


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


def bench_local_hessian_256_closed_form(benchmark, case256):
    layer, z = case256
    lh = benchmark.pedantic(
        lambda: local_hessian(layer, z, layer, activation="tanh", method="closed_form"),
        rounds=5,
        iterations=1,
        warmup_rounds=1,
    )
    assert lh.blocks.shape == (256, 257, 257)
    benchmark.extra_info.update(numel=lh.numel, stored_entries=lh.blocks.numel())


def bench_local_hessian_256_generic(benchmark, case256):
    layer, z = case256
    # --benchmark-disable (a smoke run): exercise the path on 1024 rows instead of all 65,792
    pick = torch.arange(1024) if benchmark.disabled else None

    def run():
        diag = []
        for idx, rows in local_hessian_rows(
            layer, z, layer, activation="tanh", rows=pick, chunk=512, progress=False
        ):
            diag.append(rows[torch.arange(len(idx)), idx])
        return torch.cat(diag)

    d = benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    ref = local_hessian(layer, z, layer, activation="tanh").diagonal()
    ref = ref if pick is None else ref[pick]
    assert torch.allclose(d, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    benchmark.extra_info.update(numel=d.numel(), dense_entries=d.numel() ** 2)


@pytest.fixture(scope="module")
def case64():
    layer, z = _layer(64, 64, 16, torch.float64)
    cf = local_hessian(layer, z, layer, activation="tanh").dense()
    for method in ("generic", "rows"):
        other = local_hessian(layer, z, layer, activation="tanh", method=method).matrix
        assert (other - cf).abs().max() <= 1e-12 * cf.abs().max()
    return layer, z


@pytest.mark.parametrize("method", ["closed_form", "generic", "rows"])
def bench_local_hessian_64_with_spectrum(benchmark, case64, method):
    layer, z = case64

    def run():
        lh = local_hessian(layer, z, layer, activation="tanh", method=method, progress=False)
        return lh.eigenvalues()

    ev = benchmark.pedantic(run, rounds=3 if method == "closed_form" else 1, iterations=1, warmup_rounds=1)
    assert ev.shape == (64 * 65,)
