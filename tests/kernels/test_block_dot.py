"""Fused per-block reductions: compiled kernels vs a float64 reference.

The kernels sum in a different (chunked, fixed) order from the reference, so sums are
compared with a tolerance scaled by the sum of absolute terms of each block; the probes
of the regenerating variant are bit-exact, so it is compared with the explicit path.
"""

from __future__ import annotations

import random

import cudasim
import pytest
import torch
from cuda_backends import cuda_kernels, get_kernels  # noqa: F401  (fixture)

from hutchtrace.kernels import ops, reference

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
ACCS = [torch.float64, torch.float32]
UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24}


def make_case(seed, dtype, batched, device="cpu", num_blocks=7, max_tensors=12):
    """Random tensors (incl. empty, 0-d and 1-element ones), random blocks, some left empty."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    B = rng.choice([1, 2, 3]) if batched else None
    shapes = [(), (1,), (0,), (5, 0), (3,), (4, 5), (17,), (2, 3, 7), (129,), (1000,), (33, 65)]
    w, z, idx = [], [], []
    for _ in range(rng.randint(1, max_tensors)):
        shape = rng.choice(shapes)
        if batched:
            shape = (B,) + shape
        w.append(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(device))
        z.append(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(device))
        idx.append(rng.randrange(num_blocks - 2))  # the last two blocks stay empty
    return w, z, idx, num_blocks


def exact(w, z, idx, L, batched):
    """float64 reference, plus per-block sums of |terms| for the tolerance."""
    w64 = [t.double().cpu() for t in w]
    z64 = [t.double().cpu() for t in z]
    d, s = reference.block_dot(w64, z64, idx, L, batched=batched, acc_dtype=torch.float64)
    ad, _ = reference.block_dot(
        [t.abs() for t in w64], [t.abs() for t in z64], idx, L, batched=batched, acc_dtype=torch.float64
    )
    return d, s, ad, s


def assert_close_sums(got, want, scale, acc, n_terms):
    """Rigorous bound: |error| <= gamma_m * sum|terms| with m the longest chain of additions.

    m <= n_terms always. For float32 sums the kernels' structure bounds it further: a
    chunk of at most 32768 elements split over >= 8 accumulators, a short tree, then one
    partial per chunk (CPU kernel; the CUDA kernel's chains are shorter). The float64
    reference adds its own error, hence the factor 2.
    """
    got = got.cpu().double()
    m = n_terms if acc == torch.float64 else min(n_terms, 4096 + 16 + n_terms // 16384 + 1)
    tol = 2 * (m + 2) * UNIT_ROUNDOFF[acc] * scale + 1e-300
    err = (got - want).abs()
    assert got.shape == want.shape
    assert bool((err <= tol).all()), f"max err {err.max().item()} vs tol {tol.max().item()}\n{got}\n{want}"


def row_numel(w, batched):
    return max(1, sum((t[0].numel() if batched else t.numel()) for t in w))


def check(w, z, idx, L, batched, acc, fn=None):
    """``fn(w, z, idx, L, batched, acc)`` (default: ``ops.block_dot``) against the float64 reference."""
    if fn is None:
        dots, sq = ops.block_dot(w, z, idx, L, batched=batched, acc_dtype=acc)
    else:
        dots, sq = fn(w, z, idx, L, batched, acc)
    assert dots.dtype == acc and sq.dtype == acc
    assert dots.device == w[0].device
    d, s, ad, asq = exact(w, z, idx, L, batched)
    n = row_numel(w, batched)
    assert_close_sums(dots, d, ad, acc, n)
    assert_close_sums(sq, s, asq, acc, n)
    return dots, sq


# ---------------------------------------------------------------------- compiled CPU
@pytest.mark.needs_ext
@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("acc", ACCS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_block_dot_random(dtype, acc, batched):
    for seed in range(12):
        w, z, idx, L = make_case(seed, dtype, batched)
        dots, sq = check(w, z, idx, L, batched, acc)
        assert bool((dots[..., L - 2 :] == 0).all()) and bool((sq[..., L - 2 :] == 0).all())


@pytest.mark.needs_ext
def test_cpu_block_dot_hand_computed():
    w = [
        torch.tensor([1.0, 2.0]),
        torch.tensor([3.0]),
        torch.tensor([], dtype=torch.float32),
        torch.tensor(4.0),
    ]
    z = [
        torch.tensor([1.0, -1.0]),
        torch.tensor([2.0]),
        torch.tensor([], dtype=torch.float32),
        torch.tensor(0.5),
    ]
    dots, sq = ops.block_dot(w, z, [2, 0, 1, 2], 4)
    assert dots.tolist() == [6.0, 0.0, 1.0, 0.0]
    assert sq.tolist() == [9.0, 0.0, 21.0, 0.0]


@pytest.mark.needs_ext
@pytest.mark.parametrize("acc", ACCS, ids=str)
def test_cpu_block_dot_ten_million(acc):
    g = torch.Generator().manual_seed(3)
    big_w = torch.randn(10_000_000, generator=g)
    big_z = torch.randn(10_000_000, generator=g)
    w = [torch.randn(3, generator=g), big_w, torch.randn(1, generator=g)]
    z = [torch.randn(3, generator=g), big_z, torch.randn(1, generator=g)]
    check(w, z, [1, 0, 1], 3, False, acc)


@pytest.mark.needs_ext
@pytest.mark.parametrize("batched", [False, True])
def test_cpu_block_dot_strided_and_mixed_inputs(batched):
    g = torch.Generator().manual_seed(5)
    lead = (3,) if batched else ()
    w = [
        torch.randn(lead + (6, 4), generator=g).transpose(-1, -2),  # not contiguous
        torch.randn(lead + (10,), generator=g)[..., ::2],  # strided
        torch.randn(lead + (5,), generator=g),
    ]
    z = [
        torch.randn(lead + (4, 6), generator=g),
        torch.randn(lead + (5,), generator=g, dtype=torch.float64),  # dtype differs from w
        torch.randn(lead + (5,), generator=g).to(torch.bfloat16).float(),
    ]
    check(w, z, [0, 1, 0], 2, batched, torch.float64)


@pytest.mark.needs_ext
def test_cpu_block_dot_batched_views_of_a_flat_buffer():
    """(B, P) flat buffers: per-tensor views have a row stride of P and are not copied."""
    g = torch.Generator().manual_seed(9)
    sizes = [5, 0, 40000, 1, 77]
    W = torch.randn(4, sum(sizes), generator=g)
    Z = torch.randn(4, sum(sizes), generator=g)
    dots, sq = ops.block_dot_flat(W, Z, sizes, [0, 1, 1, 2, 0], 3, batched=True)
    d, s, ad, asq = exact(
        list(torch.split(W, sizes, -1)), list(torch.split(Z, sizes, -1)), [0, 1, 1, 2, 0], 3, True
    )
    assert_close_sums(dots, d, ad, torch.float64, sum(sizes))
    assert_close_sums(sq, s, asq, torch.float64, sum(sizes))


@pytest.mark.needs_ext
def test_cpu_block_dot_is_deterministic():
    w, z, idx, L = make_case(1, torch.float32, True)
    a = ops.block_dot(w, z, idx, L, batched=True, acc_dtype=torch.float32)
    b = ops.block_dot(w, z, idx, L, batched=True, acc_dtype=torch.float32)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.needs_ext
def test_cpu_block_dot_accepts_index_tensor_and_rejects_bad_input():
    w, z, idx, L = make_case(2, torch.float32, False)
    a = ops.block_dot(w, z, idx, L)
    b = ops.block_dot(w, z, torch.tensor(idx), L)
    assert torch.equal(a[0], b[0])
    with pytest.raises(ValueError):
        ops.block_dot(w, z[:-1], idx, L)
    with pytest.raises(ValueError):
        torch.ops.hutchtrace.block_dot([torch.ones(3)], [torch.ones(4)], [0], 1)
    with pytest.raises(ValueError):
        torch.ops.hutchtrace.block_dot([torch.ones(3)], [torch.ones(3)], [1], 1)
    with pytest.raises(ValueError):
        torch.ops.hutchtrace.block_dot([torch.ones(3)], [torch.ones(3)], [0], 1, False, torch.float16)
    with pytest.raises(ValueError):
        torch.ops.hutchtrace.block_dot(
            [torch.ones(2, 3), torch.ones(3, 3)], [torch.ones(2, 3), torch.ones(3, 3)], [0, 0], 1, True
        )


def test_block_dot_empty_list_uses_reference():
    dots, sq = ops.block_dot([], [], [], 3)
    assert dots.tolist() == [0.0, 0.0, 0.0] and sq.tolist() == [0.0, 0.0, 0.0]


# --------------------------------------------------------------------------- regen
def explicit_probes(w, offsets, seed, probe, kind, batched, kernels=None):
    """The probes block_dot_regen regenerates, materialised (by ``kernels`` when given)."""
    rows = w[0].shape[0] if batched else 1
    z = []
    for wj, off in zip(w, offsets):
        n = wj[0].numel() if batched else wj.numel()
        if kernels is None:
            zj = ops.probes(seed, probe, off, n, num_probes=rows, kind=kind, dtype=wj.dtype, device=wj.device)
        else:
            zj = kernels.probes(seed, probe, off, n, rows, kind, wj.dtype)
        z.append(zj.reshape(wj.shape))
    return z


@pytest.mark.needs_ext
@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_cpu_regen_equals_explicit_probes(kind, dtype, batched):
    for seed in range(6):
        w, _, idx, L = make_case(100 + seed, dtype, batched)
        offsets, off = [], 2**32 + 3 * seed  # unaligned, beyond 2^32
        for wj in w:
            offsets.append(off)
            off += (wj[0].numel() if batched else wj.numel()) + 1
        z = explicit_probes(w, offsets, 2**40 + seed, 2**32 - 1, kind, batched)
        for acc in ACCS:
            d1, s1 = ops.block_dot_regen(
                w,
                offsets,
                idx,
                L,
                seed=2**40 + seed,
                probe=2**32 - 1,
                kind=kind,
                batched=batched,
                acc_dtype=acc,
            )
            d2, s2 = ops.block_dot(w, z, idx, L, batched=batched, acc_dtype=acc)
            d, s, ad, asq = exact(w, z, idx, L, batched)
            n = row_numel(w, batched)
            assert_close_sums(d1, d, ad, acc, n)
            assert_close_sums(s1, s, asq, acc, n)
            assert_close_sums(d2, d, ad, acc, n)
            if acc == torch.float64:  # sums of squares do not depend on the probe at all
                assert_close_sums(s1, s2.double(), asq, acc, n)


@pytest.mark.needs_ext
def test_cpu_regen_matches_reference_fallback_path():
    """The compiled regen op against the reference composition (reference probes + sums)."""
    w, _, idx, L = make_case(7, torch.float64, True)
    offsets = [11 * j for j in range(len(w))]
    for kind in ["rademacher", "gaussian"]:
        got = torch.ops.hutchtrace.block_dot_regen(
            w, offsets, idx, L, 3, 4, ops._KIND_CODES[kind], True, None
        )
        lead = w[0].shape[0]
        z = [
            reference.probes(3, 4, o, wj[0].numel(), num_probes=lead, kind=kind, dtype=wj.dtype).reshape(
                wj.shape
            )
            for wj, o in zip(w, offsets)
        ]
        d, s, ad, asq = exact(w, z, idx, L, True)
        assert_close_sums(got[0], d, ad, torch.float64, row_numel(w, True))
        assert_close_sums(got[1], s, asq, torch.float64, row_numel(w, True))


@pytest.mark.needs_ext
@pytest.mark.parametrize("batched", [False, True])
def test_cpu_regen_rejects_int64_overflow(batched):
    """Element offsets[j] + n and probe index probe + B must fit in int64, as for the probe ops."""
    lead = (2,) if batched else ()
    w = [torch.ones(lead + (3,)), torch.ones(lead + (5,))]
    regen = torch.ops.hutchtrace.block_dot_regen
    with pytest.raises(ValueError, match=r"offsets\[1\] \+ n .* overflows int64"):
        regen(w, [0, 2**63 - 5], [0, 0], 1, 1, 0, 0, batched, None)
    regen(w, [0, 2**63 - 6], [0, 0], 1, 1, 0, 0, batched, None)  # the last element index is 2**63 - 2
    rows = 2 if batched else 1
    with pytest.raises(ValueError, match=r"probe \+ B .* overflows int64"):
        regen(w, [0, 3], [0, 0], 1, 1, 2**63 - rows, 0, batched, None)
    regen(w, [0, 3], [0, 0], 1, 1, 2**63 - 1 - rows, 0, batched, None)


@pytest.mark.parametrize("batched", [False, True])
def test_wrapper_regen_rejects_int64_overflow(batched):
    """The ops wrapper checks the same ranges on every path (compiled or reference)."""
    lead = (2,) if batched else ()
    w = [torch.ones(lead + (3,)), torch.ones(lead + (5,))]
    with pytest.raises(ValueError, match=r"offsets\[1\] \+ n .* overflows int64"):
        ops.block_dot_regen(w, [0, 2**63 - 5], [0, 0], 1, seed=1, probe=0, batched=batched)
    with pytest.raises(ValueError, match=r"probe \+ B .* overflows int64"):
        probe = 2**63 - (2 if batched else 1)
        ops.block_dot_regen(w, [0, 3], [0, 0], 1, seed=1, probe=probe, batched=batched)


@pytest.mark.needs_ext
def test_cpu_regen_rejects_bad_input():
    w = [torch.ones(4)]
    with pytest.raises(ValueError):
        ops.block_dot_regen(w, [0], [0], 1, seed=-1, probe=0)
    with pytest.raises(ValueError):
        ops.block_dot_regen(w, [0], [0], 1, seed=1, probe=0, kind="cauchy")
    with pytest.raises(ValueError):
        torch.ops.hutchtrace.block_dot_regen(w, [-1], [0], 1, 0, 0, 0, False, None)
    with pytest.raises(ValueError):
        torch.ops.hutchtrace.block_dot_regen(w, [0], [0], 1, 0, 0, 2, False, None)


# ---------------------------------------------------------------------------- CUDA
# `cuda_kernels`: a real GPU, or the same .cu sources run by the cudasim emulator under
# several schedules (tests/cuda_backends.py). The CUDA kernel chunks differently from the
# CPU kernel (and a GPU fuses multiply-adds), so sums are compared within the rounding
# bound, never bit for bit; determinism is compared bit for bit.
def _on(K, tensors):
    return [t.to(K.device) for t in tensors]


def _partial_launches(K):
    return [launch for launch in K.launches() if launch["kernel"].startswith("block_dot_partial_kernel")]


@pytest.mark.needs_ext
@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("acc", ACCS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_block_dot_random(cuda_kernels, dtype, acc, batched):
    K = cuda_kernels
    for seed in range(12):
        w, z, idx, L = make_case(seed, dtype, batched, device=K.device)
        dots, sq = check(w, z, idx, L, batched, acc, fn=K.block_dot)
        assert bool((dots[..., L - 2 :] == 0).all()) and bool((sq[..., L - 2 :] == 0).all())


@pytest.mark.needs_ext
def test_cuda_block_dot_many_tensors_and_ten_million(cuda_kernels):
    """More tensors than one launch's parameter table (several pass-1 launches), and 10^7."""
    K = cuda_kernels
    g = torch.Generator().manual_seed(4)
    w = [torch.randn(int(n), generator=g) for n in torch.randint(0, 300, (1000,), generator=g)]
    z = [torch.randn(t.shape, generator=g) for t in w]
    idx = [j % 37 for j in range(len(w))]
    w.append(torch.randn(10_000_000, generator=g))
    z.append(torch.randn(10_000_000, generator=g))
    idx.append(5)
    for acc in ACCS:
        K.clear_launches()
        check(_on(K, w), _on(K, z), idx, 40, False, acc, fn=K.block_dot)
        if K.emulated:
            nonempty = sum(t.numel() > 0 for t in w)
            assert len(_partial_launches(K)) == -(-nonempty // 384)


@pytest.mark.needs_ext
@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_cuda_regen_and_determinism(cuda_kernels, kind):
    K = cuda_kernels
    for dtype in DTYPES:
        w, _, idx, L = make_case(50, dtype, True, device=K.device)
        offsets = [2**33 + 5 * j for j in range(len(w))]
        z = explicit_probes(w, offsets, 77, 2**32 + 1, kind, True, kernels=K)
        for acc in ACCS:
            d1, s1 = K.block_dot_regen(w, offsets, idx, L, 77, 2**32 + 1, kind, True, acc)
            d1b, s1b = K.block_dot_regen(w, offsets, idx, L, 77, 2**32 + 1, kind, True, acc)
            assert torch.equal(d1, d1b) and torch.equal(s1, s1b)
            d, s, ad, asq = exact(w, z, idx, L, True)
            n = row_numel(w, True)
            assert_close_sums(d1, d, ad, acc, n)
            assert_close_sums(s1, s, asq, acc, n)
            # CPU and CUDA kernels agree too (different chunking: tolerance, not equality)
            dc, _ = ops.block_dot_regen(
                [t.cpu() for t in w],
                offsets,
                idx,
                L,
                seed=77,
                probe=2**32 + 1,
                kind=kind,
                batched=True,
                acc_dtype=acc,
            )
            assert_close_sums(d1, dc.double(), ad, acc, n)


@pytest.mark.needs_ext
@pytest.mark.parametrize("regen", [False, True], ids=["explicit", "regen"])
def test_cuda_block_dot_rows_beyond_the_grid_limit(cuda_kernels, regen):
    """Probe rows sit on gridDim.y (at most 65535 on every GPU): more rows take several
    launches. A GPU gets 65537 rows; the emulator lowers the limit to 3 and gets 8 rows."""
    K = cuda_kernels
    # emulated: the middle tensor spans two chunks, so each launch is a 4 x rows grid
    rows, limit, sizes = (8, 3, [3, 20000, 1]) if K.emulated else (65537, 65535, [3, 200, 1])
    g = torch.Generator().manual_seed(11)
    w = [torch.randn(rows, n, generator=g) for n in sizes]
    offsets = [0, sizes[0], sizes[0] + sizes[1]]
    idx, L = [1, 0, 1], 2
    for acc in ACCS:
        K.clear_launches()
        if regen:
            z = explicit_probes(w, offsets, 5, 9, "gaussian", True)
            with K.grid_y_limit(limit):
                got = K.block_dot_regen(_on(K, w), offsets, idx, L, 5, 9, "gaussian", True, acc)
        else:
            z = [torch.randn(t.shape, generator=g) for t in w]
            with K.grid_y_limit(limit):
                got = K.block_dot(_on(K, w), _on(K, z), idx, L, True, acc)
        d, s, ad, asq = exact(w, z, idx, L, True)
        assert_close_sums(got[0], d, ad, acc, sum(sizes))
        assert_close_sums(got[1], s, asq, acc, sum(sizes))
        if K.emulated:
            grids = [launch["grid"] for launch in _partial_launches(K)]
            assert [gr[1] for gr in grids] == [3, 3, 2] and all(gr[0] == 4 for gr in grids), grids


@pytest.mark.needs_ext
def test_cuda_block_dot_all_empty_needs_no_launch(cuda_kernels):
    """Every tensor empty, more rows than one launch takes: zeros, and nothing launched."""
    K = cuda_kernels
    w = [torch.empty(70000, 0, device=K.device), torch.empty(70000, 2, 0, device=K.device)]
    for acc in ACCS:
        K.clear_launches()
        d, s = K.block_dot(w, w, [0, 2], 3, True, acc)
        d2, s2 = K.block_dot_regen(w, [0, 0], [0, 2], 3, 1, 2, "gaussian", True, acc)
        for t in (d, s, d2, s2):
            assert t.shape == (70000, 3) and t.dtype == acc and bool((t == 0).all())
        assert K.launches() == []


@pytest.mark.needs_ext
@pytest.mark.parametrize("batched", [False, True])
def test_cuda_regen_rejects_int64_overflow(cuda_kernels, batched):
    K = cuda_kernels
    lead = (2,) if batched else ()
    w = [torch.ones(lead + (3,), device=K.device), torch.ones(lead + (5,), device=K.device)]
    with pytest.raises(ValueError, match=r"offsets\[1\] \+ n .* overflows int64"):
        K.block_dot_regen(w, [0, 2**63 - 5], [0, 0], 1, 1, 0, "rademacher", batched)
    with pytest.raises(ValueError, match=r"probe \+ B .* overflows int64"):
        K.block_dot_regen(w, [0, 3], [0, 0], 1, 1, 2**63 - (2 if batched else 1), "rademacher", batched)


@pytest.mark.needs_ext
def test_emulated_block_dot_is_bit_identical_across_schedules():
    """The CUDA reductions are deterministic: one set of calls gives the same bits under every
    thread order, block order and SM count the emulator tries (float32 sums, which expose
    any change of summation order)."""
    if not cudasim.enabled():
        pytest.skip(f"emulated CUDA kernels: set {cudasim.ENV_ENABLE}=1 to build and run them")
    cases = []
    for seed in range(4):
        w, z, idx, L = make_case(200 + seed, torch.float32, True, max_tensors=20)
        g = torch.Generator().manual_seed(seed)
        w.append(torch.randn(w[0].shape[0], 40000, generator=g))  # several chunks per row
        z.append(torch.randn(w[0].shape[0], 40000, generator=g))
        cases.append((w, z, idx + [1], L))
    results = []
    for schedule in cudasim.SCHEDULES:
        K = get_kernels(schedule)
        out = []
        for w, z, idx, L in cases:
            out += K.block_dot(w, z, idx, L, True, torch.float32)
            offsets = [7 * j for j in range(len(w))]
            out += K.block_dot_regen(w, offsets, idx, L, 3, 1, "gaussian", True, torch.float32)
        results.append(out)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@pytest.mark.needs_ext
@pytest.mark.needs_cuda
def test_cuda_block_dot_graph_capture_and_no_sync():
    """One probe step (probes -> reduction -> statistics) captured in a CUDA graph."""
    get_kernels(None)  # skips unless the extension has CUDA kernels
    from torch.cuda import graphs

    w = [torch.randn(2, 300, device="cuda"), torch.randn(2, 7, 5, device="cuda")]
    offsets, idx, L = [0, 300], [0, 1], 2
    count = torch.zeros((), dtype=torch.int64, device="cuda")
    mean = torch.zeros(L, dtype=torch.float64, device="cuda")
    m2 = torch.zeros(L, dtype=torch.float64, device="cuda")
    z = torch.empty(2, 335, device="cuda")

    def step():
        ops.fill_probes_(z, 5, 0, 0, "rademacher")
        d, _ = ops.block_dot_regen(w, offsets, idx, L, seed=5, probe=0, batched=True)
        ops.welford_update_(count, mean, m2, d)
        return d

    torch.cuda.set_sync_debug_mode("error")
    try:
        eager = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up on a side stream, as torch.cuda.graphs recommends
    torch.cuda.current_stream().wait_stream(s)
    g = graphs.CUDAGraph()
    with torch.cuda.graph(g):
        captured = step()
    count.zero_()
    mean.zero_()
    m2.zero_()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)
    assert count.item() == 6
    want = eager.double()
    assert torch.allclose(mean, want.mean(0), rtol=1e-12, atol=0)
