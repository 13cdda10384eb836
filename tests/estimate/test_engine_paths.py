"""The probe loop's fast paths compute exactly what the plain definitions say.

* flat probe buffers (one kernel call per contiguous run) == per-tensor counter-based probes,
  also with gaps in the global offsets and for group-restricted rows;
* seed-pruned reverse HVPs (``support``) == the full double backward;
* sequential chunks of several rows == one row at a time;
* the single-batch pairwise sink (kept float32 rows) == the dataset path (float64 rows,
  regenerated probes).
"""

from __future__ import annotations

import pytest
import torch

import hutchtrace
from hutchtrace import zoo
from hutchtrace.backbones.reverse import ReverseHVP
from hutchtrace.core.state import ForwardRNG, PreservedState
from hutchtrace.estimate.engine import ProbeRunner
from hutchtrace.kernels import ops
from hutchtrace.problem.blocks import resolve_blocks
from hutchtrace.problem.loss import make_loss_spec


@pytest.mark.parametrize("blocks", ["param", "gappy"])
def test_flat_probe_rows_equal_per_tensor_probes(blocks):
    model, crit, data = zoo.make_mlp(n=8)
    spec_blocks = blocks if blocks == "param" else {"a": ["0.weight"], "b": ["4.weight", "4.bias"]}  # offsets gap
    layout = resolve_blocks(model, spec_blocks)
    runner = ProbeRunner(model, layout, make_loss_spec(crit, data), seed=99, hvp="reverse")
    L = layout.num_blocks
    group_of_tensor = [b for b in layout.block_index]  # isolated: group = block
    ks, gs = [3, 4, 3, 4, 7][: 2 * L], [0, 0, L - 1, L - 1, 0][: 2 * L]
    z = runner.make_probes(ks, gs, group_of_tensor)
    for j, t in enumerate(layout.tensors):
        for r, (k, g) in enumerate(zip(ks, gs)):
            want = ops.probes(99, k, layout.offsets[j], t.numel(), dtype=t.dtype)[0].view(t.shape)
            if group_of_tensor[j] != g:
                want = torch.zeros_like(want)
            assert torch.equal(z[j][r], want), (j, r)


def test_support_pruned_hvp_equals_the_full_hvp():
    model, crit, data = zoo.make_lm(dtype=torch.float64)
    layout = resolve_blocks(model)
    batch = next(iter(make_loss_spec(crit, data).batches()))
    g = torch.Generator().manual_seed(0)
    with PreservedState(model):
        rng = ForwardRNG([torch.device("cpu")])
        bb = ReverseHVP(model, layout.names, layout.tensors, rng)
        bb.prepare(batch)
        for support in ([0], [2, 3], list(range(len(layout.tensors)))[-3:]):
            v = [torch.randn(t.shape, generator=g, dtype=t.dtype) if j in support else torch.zeros_like(t)
                 for j, t in enumerate(layout.tensors)]
            full = bb.hvp(v)
            pruned = bb.hvp(v, support=support)
            for a, b in zip(full, pruned):
                torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
        bb.release()


@pytest.mark.parametrize("probing", ["global", "isolated"])
def test_sequential_chunks_equal_single_rows(probing):
    model, crit, data = zoo.make_cnn(n=8)
    kw = dict(K=10, data=data, seed=4, hvp="reverse", probing=probing, variance="sample", progress=False)
    one = hutchtrace.block_traces(model, crit, probe_batch=1, **kw)
    chunked = hutchtrace.block_traces(model, crit, probe_batch=5, **kw)
    torch.testing.assert_close(chunked.samples, one.samples, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
@pytest.mark.parametrize("probing", ["global", "isolated"])
def test_kept_row_pairwise_equals_the_regenerated_path(probe, probing):
    """Single batch (kept rows) vs the same batch given as a one-batch dataset (accumulated
    float64 rows, probes regenerated): the same U-statistic."""
    model, crit, (x, y) = zoo.make_mlp(n=16, dtype=torch.float64)
    kw = dict(K=12, seed=8, hvp="reverse-batched", probing=probing, probe=probe, variance="pairwise", progress=False)
    single = hutchtrace.block_traces(model, crit, data=(x, y), **kw)
    dataset = hutchtrace.block_traces(model, crit, data=[(x, y)], **kw)
    assert single.meta["variance"] == dataset.meta["variance"] == "pairwise"
    for a, b in zip(single.blocks, dataset.blocks):
        assert a.pairwise_variance == pytest.approx(b.pairwise_variance, rel=1e-9, abs=1e-12)
    assert single.total.pairwise_variance == pytest.approx(dataset.total.pairwise_variance, rel=1e-9, abs=1e-12)


def test_kept_row_pairwise_float32_is_close_to_float64():
    """float32 models form the per-tensor products in float32: far below the estimator's spread."""
    m64, crit, (x, y) = zoo.make_mlp(n=32, dtype=torch.float64)
    m32, _, _ = zoo.make_mlp(n=32, dtype=torch.float32)
    kw = dict(K=16, seed=3, hvp="reverse", variance="pairwise", progress=False)
    r64 = hutchtrace.block_traces(m64, crit, data=(x, y), **kw)
    r32 = hutchtrace.block_traces(m32, crit, data=(x.float(), y), **kw)
    for a, b in zip(r32.blocks, r64.blocks):
        assert a.pairwise_variance == pytest.approx(b.pairwise_variance, rel=1e-4, abs=1e-6 * abs(b.variance))


@pytest.mark.parametrize("hvp", ["reverse", "reverse-batched", "forward"])
def test_products_carry_no_autograd_graph_when_some_parameters_are_outside_the_blocks(hvp):
    """Parameters left out of the blocks still require grad; products built through them must
    not record a graph, or every accumulated sample would keep one alive."""
    from hutchtrace.estimate.engine import ProbeRunner, Sink
    from hutchtrace.estimate.probing import isolated_plan
    from hutchtrace.problem.blocks import resolve_blocks
    from hutchtrace.problem.loss import make_loss_spec

    model, crit, data = zoo.make_mlp(dtype=torch.float64)
    layout = resolve_blocks(model, {"a": [model[0]], "b": [model[2]], "c": [model[4].weight]})
    seen = []

    class Record(Sink):
        def on_rows(self, rb):
            seen.append((rb.dots.requires_grad, rb.sq.requires_grad, any(w.requires_grad for w in rb.w)))

    runner = ProbeRunner(model, layout, make_loss_spec(crit, data), seed=0, kind="rademacher", hvp=hvp,
                         progress=False)
    runner.run(isolated_plan(3), range(2), [Record()])
    assert seen and not any(any(x) for x in seen)
