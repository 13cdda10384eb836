"""Compiled kernels vs the pure-PyTorch reference (per-tensor loops) and torch._foreach.

Each op gets one benchmark group per (device, size), holding every implementation, so
pytest-benchmark's table shows the ratios directly. Correctness is asserted once per case
before timing; timings are never asserted.

    pytest bench/ --benchmark-disable --bench-sizes=1e5 --bench-blocks=10   # smoke test
    pytest bench/ --bench-sizes=1e6 --benchmark-columns=min,median,rounds     # ratios at P=1e6
"""

from __future__ import annotations

import pytest
import torch

from hutchtrace.kernels import loader, ops, reference

pytestmark = pytest.mark.needs_ext


def rounds_for(P: int) -> int:
    return 10 if P <= 100_000 else (5 if P <= 1_000_000 else 3)


def layout(P, L, device, dtype=torch.float32, rows=None, seed=0):
    """P parameters in L tensors (one per block, near-equal sizes), an HVP-like w and a probe z."""
    g = torch.Generator().manual_seed(seed)
    sizes = [P // L + (1 if j < P % L else 0) for j in range(L)]
    lead = (rows,) if rows else ()
    w = [torch.randn(lead + (n,), generator=g, dtype=dtype).to(device) for n in sizes]
    z = [torch.randn(lead + (n,), generator=g, dtype=dtype).to(device) for n in sizes]
    offsets, off = [], 0
    for n in sizes:
        offsets.append(off)
        off += n
    return w, z, list(range(L)), offsets


def foreach_block_dot(w, z, idx_t, L):
    """A fair eager baseline: foreach products, one float64 sum per tensor, index_add."""
    prods = torch._foreach_mul(w, z)
    squares = torch._foreach_mul(w, w)
    d = torch.stack([p.sum(dtype=torch.float64) for p in prods])
    s = torch.stack([q.sum(dtype=torch.float64) for q in squares])
    zeros = torch.zeros(L, dtype=torch.float64, device=w[0].device)
    return zeros.index_add(0, idx_t, d), zeros.index_add(0, idx_t, s)


# ------------------------------------------------------------------------------ probes
@pytest.mark.parametrize("impl", ["compiled", "reference"])
@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def bench_probes(benchmark, run, impl, kind, P, device):
    """Fill a flat (P,) float32 probe buffer."""
    benchmark.group = f"probes-{kind}-{device}-P={P:.0e}"
    out = torch.empty(P, dtype=torch.float32, device=device)
    compiled = lambda: ops.fill_probes_(out, 1234, 7, 3, kind)  # noqa: E731
    ref_fill = lambda: reference.fill_probes_(out, 1234, 7, 3, kind)  # noqa: E731
    if impl == "compiled":
        got = compiled().clone()
        want = ref_fill().clone()
        if kind == "rademacher":
            assert torch.equal(got, want)
        else:  # float64 sqrt of the CPU reference may differ by 1 ulp (see docs/kernels.md)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    run(compiled if impl == "compiled" else ref_fill, device, rounds_for(P))
    benchmark.extra_info.update(
        P=P, kind=kind, impl=impl, backend=ops.backend_name(device) if impl == "compiled" else "reference"
    )


# --------------------------------------------------------------------------- block_dot
@pytest.mark.parametrize("impl", ["compiled", "reference", "foreach"])
def bench_block_dot(benchmark, run, impl, P, L, device):
    """Per-block <z, w> and ||w||^2 over L float32 tensors, float64 accumulation."""
    benchmark.group = f"block_dot-{device}-P={P:.0e}-L={L}"
    w, z, idx, _ = layout(P, L, device)
    idx_t = torch.tensor(idx, device=device)
    fns = {
        "compiled": lambda: ops.block_dot(w, z, idx, L),
        "reference": lambda: reference.block_dot(w, z, idx, L),
        "foreach": lambda: foreach_block_dot(w, z, idx_t, L),
    }
    if impl == "compiled":
        d, s = fns["compiled"]()
        d_ref, s_ref = fns["reference"]()
        torch.testing.assert_close(d, d_ref, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(s, s_ref, rtol=1e-9, atol=1e-9)
    run(fns[impl], device, rounds_for(P))
    benchmark.extra_info.update(P=P, L=L, impl=impl)


@pytest.mark.parametrize("impl", ["compiled-regen", "compiled-explicit", "reference"])
@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def bench_block_dot_regen(benchmark, run, impl, kind, P, L, device):
    """Probe + reduction: regenerated in the kernel vs generated into memory then reduced."""
    benchmark.group = f"block_dot_regen-{kind}-{device}-P={P:.0e}-L={L}"
    w, _, idx, offsets = layout(P, L, device)

    def explicit(probes):
        z = [
            probes(11, 0, off, t.numel(), kind=kind, dtype=t.dtype, device=device).reshape(t.shape)
            for t, off in zip(w, offsets)
        ]
        return z

    fns = {
        "compiled-regen": lambda: ops.block_dot_regen(w, offsets, idx, L, seed=11, probe=0, kind=kind),
        "compiled-explicit": lambda: ops.block_dot(w, explicit(ops.probes), idx, L),
        "reference": lambda: reference.block_dot(w, explicit(reference.probes), idx, L),
    }
    if impl == "compiled-regen":
        d, s = fns["compiled-regen"]()
        d_ref, s_ref = fns["reference"]()
        torch.testing.assert_close(d, d_ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(s, s_ref, rtol=1e-9, atol=1e-9)
    run(fns[impl], device, rounds_for(P))
    benchmark.extra_info.update(P=P, L=L, kind=kind, impl=impl)


# ----------------------------------------------------------------------------- welford
@pytest.mark.parametrize("impl", ["compiled", "reference"])
def bench_welford_update(benchmark, run, impl, L, device):
    """Eight probe rows of per-block results into the streaming statistics."""
    benchmark.group = f"welford_update-{device}-L={L}"
    x = torch.randn(8, L, dtype=torch.float64, device=device)
    state = (
        torch.zeros((), dtype=torch.int64, device=device),
        torch.zeros(L, dtype=torch.float64, device=device),
        torch.zeros(L, dtype=torch.float64, device=device),
    )
    fn = ops.welford_update_ if impl == "compiled" else reference.welford_update_
    if impl == "compiled":
        a = tuple(t.clone() for t in state)
        b = tuple(t.clone() for t in state)
        ops.welford_update_(*a, x)
        reference.welford_update_(*b, x)
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    run(lambda: fn(*state, x), device, 20)
    benchmark.extra_info.update(L=L, impl=impl)


# ------------------------------------------------------------------- GPU: bandwidth
@pytest.mark.needs_cuda
@pytest.mark.parametrize("what", ["copy", "block_dot", "block_dot_regen"])
def bench_cuda_bandwidth(benchmark, run, what):
    """Achieved bandwidth of the reductions vs a device-to-device copy (target >= 70%)."""
    P, L = 100_000_000, 100
    benchmark.group = "cuda-bandwidth-P=1e8-L=100"
    w, z, idx, offsets = layout(P, L, "cuda")
    src = torch.cat([t.reshape(-1) for t in w])
    dst = torch.empty_like(src)
    fns = {
        "copy": (lambda: dst.copy_(src), 2 * 4 * P),  # bytes read + written
        "block_dot": (lambda: ops.block_dot(w, z, idx, L), 2 * 4 * P),
        "block_dot_regen": (lambda: ops.block_dot_regen(w, offsets, idx, L, seed=1, probe=0), 4 * P),
    }
    fn, nbytes = fns[what]
    assert loader.cuda_compiled()
    run(fn, "cuda", 20)
    if benchmark.stats is not None:
        seconds = benchmark.stats.stats.min
        benchmark.extra_info.update(GBps=nbytes / seconds / 1e9, bytes=nbytes)
