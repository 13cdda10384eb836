"""Streaming per-block statistics: reference vs numpy (always), compiled vs reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hutchtrace import _ext, _reference, ops


def needs_compiled_cuda():
    if not _ext.cuda_compiled():
        pytest.skip("extension built without CUDA kernels")


def fresh(L, device="cpu"):
    return (
        torch.zeros((), dtype=torch.int64, device=device),
        torch.zeros(L, dtype=torch.float64, device=device),
        torch.zeros(L, dtype=torch.float64, device=device),
    )


def stream(update, x_chunks, L, device="cpu"):
    state = fresh(L, device)
    for x in x_chunks:
        update(*state, x.to(device))
    return state


def chunks_of(data, sizes, dtype=torch.float64):
    out, start = [], 0
    for n in sizes:
        part = data[start : start + n]
        out.append(torch.from_numpy(part).to(dtype) if n != 1 else torch.from_numpy(part[0]).to(dtype))
        start += n
    return out


def assert_matches_numpy(state, data):
    count, mean, m2 = state
    n = data.shape[0]
    assert int(count) == n
    np.testing.assert_allclose(mean.cpu().numpy(), data.mean(0), rtol=1e-12, atol=1e-12)
    if n > 1:
        np.testing.assert_allclose((m2 / (n - 1)).cpu().numpy(), data.var(0, ddof=1), rtol=1e-10, atol=1e-12)


DATA_SIZES = [1, 3, 1, 7, 2, 11, 1]  # uneven chunks; 1 -> a 1-D (L,) sample


# ------------------------------------------------------------------ reference (always)
def test_reference_update_matches_numpy():
    rng = np.random.default_rng(0)
    data = rng.normal(3.0, 2.0, size=(sum(DATA_SIZES), 5))
    assert_matches_numpy(stream(_reference.welford_update_, chunks_of(data, DATA_SIZES), 5), data)


def test_reference_merge_of_uneven_chunks_matches_numpy():
    rng = np.random.default_rng(1)
    data = rng.normal(-1.0, 0.5, size=(40, 4)) + 1e6  # large offset: the naive formula would lose digits
    parts = [data[:1], data[1:4], data[4:4], data[4:30], data[30:]]  # incl. an empty chunk
    total = fresh(4)
    for part in parts:
        piece = fresh(4)
        if len(part):
            _reference.welford_update_(*piece, torch.from_numpy(part))
        _reference.welford_merge_(*total, *piece)
    assert_matches_numpy(total, data)


# ----------------------------------------------------------------------- compiled CPU
@pytest.mark.needs_ext
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float64], ids=str)
def test_cpu_update_matches_reference_and_numpy(x_dtype):
    rng = np.random.default_rng(2)
    L = 9
    data = rng.normal(0.5, 3.0, size=(sum(DATA_SIZES), L))
    xs = chunks_of(data, DATA_SIZES, x_dtype)
    got = stream(torch.ops.hutchtrace.welford_update_, xs, L)
    want = stream(_reference.welford_update_, xs, L)
    assert int(got[0]) == int(want[0])
    for g, w in zip(got[1:], want[1:]):  # same IEEE operations in the same order: same bits
        assert torch.equal(g, w)
    assert_matches_numpy(got, np.concatenate([x.double().reshape(-1, L).numpy() for x in xs]))


@pytest.mark.needs_ext
def test_cpu_merge_matches_reference_and_numpy():
    rng = np.random.default_rng(3)
    L = 6
    data = rng.normal(1e3, 1.0, size=(57, L))
    bounds = [0, 1, 1, 5, 6, 33, 57]  # uneven, with an empty chunk
    total_c, total_r = fresh(L), fresh(L)
    for a, b in zip(bounds[:-1], bounds[1:]):
        part_c, part_r = fresh(L), fresh(L)
        if b > a:
            x = torch.from_numpy(data[a:b])
            torch.ops.hutchtrace.welford_update_(*part_c, x)
            _reference.welford_update_(*part_r, x)
        torch.ops.hutchtrace.welford_merge_(*total_c, *part_c)
        _reference.welford_merge_(*total_r, *part_r)
    assert int(total_c[0]) == int(total_r[0]) == 57
    for g, w in zip(total_c[1:], total_r[1:]):
        assert torch.equal(g, w)
    assert_matches_numpy(total_c, data)


@pytest.mark.needs_ext
def test_cpu_merge_with_empty_sides():
    L = 3
    a = fresh(L)
    b = fresh(L)
    torch.ops.hutchtrace.welford_update_(*b, torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]))
    torch.ops.hutchtrace.welford_merge_(*a, *b)  # empty <- full
    assert int(a[0]) == 2 and a[1].tolist() == [2.0, 2.0, 2.0] and a[2].tolist() == [2.0, 0.0, 2.0]
    e = fresh(L)
    torch.ops.hutchtrace.welford_merge_(*a, *e)  # full <- empty
    assert int(a[0]) == 2 and a[1].tolist() == [2.0, 2.0, 2.0]
    z1, z2 = fresh(L), fresh(L)
    torch.ops.hutchtrace.welford_merge_(*z1, *z2)  # empty <- empty: no 0/0
    assert int(z1[0]) == 0 and z1[1].tolist() == [0.0] * 3 and z1[2].tolist() == [0.0] * 3


@pytest.mark.needs_ext
def test_cpu_wrappers_dispatch_and_fall_back():
    count, mean, m2 = fresh(4)
    ops.welford_update_(count, mean, m2, torch.arange(8.0).reshape(2, 4))
    assert int(count) == 2 and mean.tolist() == [2.0, 3.0, 4.0, 5.0]
    # a float32 state is not a compiled-kernel layout: the wrapper uses the reference
    c32, m32, s32 = torch.zeros((), dtype=torch.int64), torch.zeros(4), torch.zeros(4)
    ops.welford_update_(c32, m32, s32, torch.arange(4.0))
    assert int(c32) == 1 and m32.tolist() == [0.0, 1.0, 2.0, 3.0]


@pytest.mark.needs_ext
def test_cpu_rejects_bad_state():
    count, mean, m2 = fresh(4)
    with pytest.raises(ValueError):
        torch.ops.hutchtrace.welford_update_(count, mean, m2, torch.ones(5))
    with pytest.raises(ValueError):
        torch.ops.hutchtrace.welford_update_(count.double(), mean, m2, torch.ones(4))
    with pytest.raises(ValueError):
        torch.ops.hutchtrace.welford_update_(count, mean.float(), m2, torch.ones(4))
    with pytest.raises(ValueError):
        torch.ops.hutchtrace.welford_merge_(count, mean, m2, count, torch.ones(3, dtype=torch.float64), m2)


# ---------------------------------------------------------------------------- CUDA
@pytest.mark.needs_ext
@pytest.mark.needs_cuda
def test_cuda_matches_cpu_kernel_without_syncs():
    needs_compiled_cuda()
    rng = np.random.default_rng(4)
    L = 1000
    data = rng.normal(2.0, 1.0, size=(sum(DATA_SIZES), L))
    xs = chunks_of(data, DATA_SIZES)
    cpu = stream(torch.ops.hutchtrace.welford_update_, xs, L)
    gpu = fresh(L, "cuda")
    xs_gpu = [x.cuda() for x in xs]
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation raises
    try:
        for x in xs_gpu:
            torch.ops.hutchtrace.welford_update_(*gpu, x)
        other = fresh(L, "cuda")
        torch.ops.hutchtrace.welford_update_(*other, xs_gpu[3])
        torch.ops.hutchtrace.welford_merge_(*gpu, *other)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.ops.hutchtrace.welford_update_(*cpu, xs[3])
    assert int(gpu[0]) == int(cpu[0])
    for g, c in zip(gpu[1:], cpu[1:]):  # _rn intrinsics on the device: no FMA, same bits
        assert torch.equal(g.cpu(), c)
