"""The cudasim emulator itself: CUDA semantics of warps, barriers, shared memory and grids,
errors instead of hangs, and schedules that really change the order of execution.

The kernels are in tests/cudasim/selftest.cu (plain CUDA, compiled like csrc/cuda/*.cu).
The source rewriting runs always; everything that executes kernels needs
``HUTCHTRACE_CUDASIM=1`` (CI sets it).
"""

from __future__ import annotations

import math
import re

import cudasim
import pytest
import torch
from cuda_backends import ROOT, emulated_params, get_kernels
from cudasim.build import rewrite_launches, rewrite_shared


# ------------------------------------------------------------------ source rewriting
def test_rewrite_launches_keeps_lines_and_arguments():
    src = (
        "a<<<g, 256, 0, s>>>(x, y);\n"
        "  ns::kern<float, kMode>\n"
        "      <<<dim3(c, r), kThreads, 0, stream>>>(tab,\n"
        "        p);\n"
        "k<T, B<2>><<<1, 32>>>();\n"
    )
    out, n = rewrite_launches(src)
    assert n == 3
    assert out.count("\n") == src.count("\n")
    lines = out.splitlines()
    assert lines[0] == '::cudasim::launch("a", g, 256, 0, s)(a, x, y);'
    assert lines[1].strip() == (
        '::cudasim::launch("ns::kern<float, kMode>", dim3(c, r), kThreads, 0, stream)(ns::kern<float, kMode>,'
    )
    assert lines[2].strip() == "tab," and lines[3].strip() == "p);"  # the arguments keep their lines
    assert '::cudasim::launch("k<T, B<2>>", 1, 32)(k<T, B<2>>);' in out


def test_rewrite_finds_every_launch_of_the_real_sources():
    for path in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        text = path.read_text()
        out, n = rewrite_launches(text, str(path))
        assert n == text.count("<<<") and "<<<" not in out and out.count("\n") == text.count("\n"), path


def test_rewrite_shared_registers_each_variable_and_rejects_what_it_cannot_model():
    out, n = rewrite_shared("  __shared__ T sa[kThreads / kWarp];\n  __shared__ double s[4][8];\n")
    assert n == 2 and out.count("\n") == 2
    assert "static T sa[kThreads / kWarp];" in out and "register_shared(&sa, sizeof(sa))" in out
    assert "static double s[4][8];" in out
    for bad in ["extern __shared__ float dyn[];", "__shared__ float a[2], b[3];", "__shared__ int x = 3;"]:
        with pytest.raises(ValueError, match="cudasim handles"):
            rewrite_shared(bad)


# --------------------------------------------------------------------- running kernels
@pytest.fixture(params=emulated_params())
def emu(request):
    return get_kernels(request.param)


def run(K, name, out, threads, blocks=1):
    K.ops._cudasim_selftest(name, out, threads, blocks)
    return out


def test_shuffles_follow_cuda_semantics(emu):
    out = run(emu, "shuffles", torch.zeros(64, 6), 64).tolist()
    for t in range(64):
        w, lane = divmod(t, 32)
        down = lane + 1 if lane + 1 < 32 else lane
        up = lane - 2 if lane >= 2 else lane
        seg8 = lane + 3 if lane % 8 + 3 < 8 else lane
        src = [down, up, lane ^ 5, 3, seg8]
        want = [32 * w + s for s in src] + [32 * w + (lane ^ 1) + 0.5]
        assert out[t] == want, t


def test_votes_and_counting_barrier(emu):
    out = run(emu, "votes", torch.zeros(64, 4), 64)
    ballot = sum(1 << lane for lane in range(32) if lane % 3 == 0)
    want = torch.tensor([float(ballot), 1.0, 0.0, 22.0], dtype=torch.float32)
    assert torch.equal(out, want.expand(64, 4))


def test_block_sum2_can_be_called_twice(emu):
    """hutchtrace's block reduction twice in one kernel: without its closing barrier, the
    second call overwrites the warp sums before warp 0 read them (reverse and random
    schedules let the other warps run ahead)."""
    out = torch.zeros(4, 4 + 256, dtype=torch.float64)
    x = torch.arange(256, dtype=torch.float64)
    out[0, 4:] = x
    run(emu, "block_sum2_twice", out, 256, 4)
    want = torch.tensor([x.sum(), 2 * x.sum(), (x * x).sum(), 3 * 256], dtype=torch.float64)
    assert torch.equal(out[:, :4], want.expand(4, 4))


def test_shared_memory_is_poisoned_before_every_block(emu):
    out = run(emu, "uninitialised_shared", torch.zeros(3, dtype=torch.float64), 32, 3)
    assert bool(out.isnan().all())  # the first read of each block, before any write


def test_block_order_is_what_the_schedule_says():
    """Each block adds one to its predecessor's slot: the result shows the order of blocks."""
    if not cudasim.enabled():
        pytest.skip(f"set {cudasim.ENV_ENABLE}=1")
    seen = {}
    for schedule in cudasim.SCHEDULES:
        K = get_kernels(schedule)
        seen[schedule.block_order] = run(K, "block_order_race", torch.zeros(8), 1, 8).tolist()
    assert seen["forward"] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert seen["reverse"] == [1] * 8
    assert seen["random"] not in (seen["forward"], seen["reverse"])


def test_grid_sizing_sees_the_sm_count(emu):
    n = 10_000
    out = run(emu, "grid_stride", torch.zeros(n), 256)
    blocks = min(8 * emu.schedule.sm_count, math.ceil(n / 256))
    assert bool((out == blocks).all())  # every element written: the grid-stride loop covered n
    (launch,) = emu.launches()
    assert launch["grid"] == (blocks, 1, 1) and launch["block"] == (256, 1, 1)


def test_atomics(emu):
    out = run(emu, "atomics", torch.zeros(1, dtype=torch.float64), 128, 4)
    assert out.item() == 512 * 1000 + 512 * 0.5


def test_launch_configuration_is_checked_like_hardware(emu):
    with pytest.raises(RuntimeError, match=r"invalid configuration argument.*grid \(1, 3, 1\) exceeds"):
        with cudasim.grid_y_limit(2):
            run(emu, "grid_2d", torch.zeros(1, dtype=torch.float64), 32, 3)
    run(emu, "grid_2d", torch.zeros(1, dtype=torch.float64), 32, 3)  # within the hardware limit
    with pytest.raises(RuntimeError, match=r"block \(2048, 1, 1\) is not a valid block shape"):
        run(emu, "atomics", torch.zeros(1, dtype=torch.float64), 2048, 1)


ERRORS = [
    ("barrier_in_branch", 256, "a barrier must be reached by every thread of the block"),
    ("barrier_after_exit", 256, "a barrier must be reached by every thread of the block"),
    ("two_barriers", 256, r"divergent barriers"),
    ("shuffle_in_branch", 64, r"exited"),
    ("shuffle_exited_lane", 64, r"exited"),
    ("shuffle_absent_lane", 48, r"naming lane 16, which does not exist \(the block has 48 threads\)"),
    ("shuffle_outside_mask", 32, r"reads lane \d+, which the mask 0xffff does not name"),
    ("shuffle_then_barrier", 64, r"__syncthreads"),
]


@pytest.mark.parametrize("name,threads,message", ERRORS, ids=[e[0] for e in ERRORS])
def test_defects_raise_naming_block_and_thread(emu, name, threads, message):
    """What would hang or be undefined on a GPU is an error naming the kernel, the block,
    the thread and the call site, under every schedule."""
    with pytest.raises(RuntimeError) as info:
        run(emu, name, torch.zeros(threads), threads, 2)
    text = str(info.value)
    assert re.search(rf"cudasim: kernel {name}, block \(\d+, 0, 0\), .*thread \(\d+, 0, 0\)", text), text
    assert re.search(message, text), text
    assert re.search(r"selftest\.cu:\d+", text), text
    run(emu, "votes", torch.zeros(64, 4), 64)  # the emulator is usable again afterwards
