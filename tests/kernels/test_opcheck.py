"""``torch.library.opcheck`` on every compiled op (schema, fake kernel, autograd
registration, AOT dispatch), on CPU, on CUDA when present and on the emulated CUDA kernels
(tests/cuda_backends.py), plus a compile smoke test."""

from __future__ import annotations

import pytest
import torch
from cuda_backends import Kernels, cuda_params, get_kernels

from hutchtrace.kernels import loader, ops

pytestmark = pytest.mark.needs_ext

OPS = ["rademacher_", "gaussian_", "block_dot", "block_dot_regen", "welford_update_", "welford_merge_"]


@pytest.fixture(params=[pytest.param("cpu", id="cpu")] + cuda_params())
def kernels(request) -> Kernels:
    """The compiled CPU kernels, or any of the CUDA ones (real or emulated)."""
    if request.param == "cpu":
        return Kernels("cpu", torch.device("cpu"), torch.ops.hutchtrace)
    return get_kernels(request.param)


def _samples(device, hut):
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, dtype=torch.float32):
        return torch.randn(shape, generator=g).to(dtype).to(device)

    w = [rnd(3, 5), rnd(3, 1), rnd(3, 7, 2, dtype=torch.float64)]
    z = [rnd(3, 5), rnd(3, 1), rnd(3, 7, 2, dtype=torch.float64)]
    count = torch.tensor(3, dtype=torch.int64, device=device)
    L = 4
    state = (count, rnd(L, dtype=torch.float64), rnd(L, dtype=torch.float64).abs())
    other = (
        torch.tensor(2, dtype=torch.int64, device=device),
        rnd(L, dtype=torch.float64),
        rnd(L, dtype=torch.float64).abs(),
    )
    return [
        ("rademacher_1d", hut.rademacher_.default, (rnd(37), 5, 2**32 + 1, 3)),
        ("rademacher_2d", hut.rademacher_.default, (rnd(2, 9, dtype=torch.bfloat16), 2**40, 0, 2**33)),
        ("gaussian_2d", hut.gaussian_.default, (rnd(3, 10, dtype=torch.float64), 7, 1, 5)),
        ("gaussian_half", hut.gaussian_.default, (rnd(11, dtype=torch.float16), 7, 1, 0)),
        ("block_dot", hut.block_dot.default, ([t[0] for t in w], [t[0] for t in z], [0, 2, 0], 3)),
        ("block_dot_batched_f32", hut.block_dot.default, (w, z, [1, 1, 0], 3, True, torch.float32)),
        (
            "block_dot_regen",
            hut.block_dot_regen.default,
            ([t[0] for t in w], [0, 5, 6], [0, 1, 1], 2, 9, 4, 1),
        ),
        ("block_dot_regen_batched", hut.block_dot_regen.default, (w, [1, 6, 9], [0, 0, 1], 2, 9, 4, 0, True)),
        ("welford_update_", hut.welford_update_.default, (*[t.clone() for t in state], rnd(2, L))),
        (
            "welford_update_1d",
            hut.welford_update_.default,
            (*[t.clone() for t in state], rnd(L, dtype=torch.float64)),
        ),
        ("welford_merge_", hut.welford_merge_.default, (*[t.clone() for t in state], *other)),
    ]


def test_opcheck_every_op(kernels):
    names = set()
    for name, op, args in _samples(kernels.device, kernels.ops):
        torch.library.opcheck(op, args)
        names.add(op._schema.name)
    assert {f"{kernels.ops.name}::{n}" for n in OPS} <= names


def test_cuda_compiled_matches_the_build_and_the_dispatcher():
    """``_cuda_compiled()`` tells the truth: it agrees with the build record written by
    setup.py and with the dispatcher's table of registered CUDA kernels."""
    compiled = torch.ops.hutchtrace._cuda_compiled()
    assert isinstance(compiled, bool)
    assert loader.cuda_compiled() is compiled
    build = loader.build_info()
    if build is not None:
        assert build["cuda_compiled"] is compiled
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"hutchtrace::{op}", "CPU")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"hutchtrace::{op}", "CUDA") is compiled


def test_torch_compile_traces_the_ops(kernels):
    """fullgraph compile through the fake kernels (aot_eager: no C++ codegen needed)."""
    dev, hut = kernels.device, kernels.ops
    w = [torch.randn(2, 6, device=dev), torch.randn(2, 3, device=dev)]

    def step(w, count, mean, m2):
        z = torch.empty(2, 9, device=dev)
        hut.rademacher_(z, 3, 0, 0)
        d, s = hut.block_dot(w, [z[:, :6], z[:, 6:]], [0, 1], 2, True, None)
        d2, _ = hut.block_dot_regen(w, [0, 6], [0, 1], 2, 3, 0, 0, True, None)
        hut.welford_update_(count, mean, m2, d)
        return d, d2, s

    def state():
        return (
            torch.zeros((), dtype=torch.int64, device=dev),
            torch.zeros(2, dtype=torch.float64, device=dev),
            torch.zeros(2, dtype=torch.float64, device=dev),
        )

    torch._dynamo.reset()
    eager_state, compiled_state = state(), state()
    want = step(w, *eager_state)
    got = torch.compile(step, backend="aot_eager", fullgraph=True)(w, *compiled_state)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    for a, b in zip(compiled_state, eager_state):
        assert torch.equal(a, b)
    torch.testing.assert_close(want[0], want[1])  # regen == explicit probe path
    if not kernels.emulated:
        assert ops.backend_name(dev) == f"compiled-{dev.type}"
