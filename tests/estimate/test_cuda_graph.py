"""``block_traces(..., cuda_graph=True)``: same samples as without graphs; clear errors elsewhere."""

from __future__ import annotations

import pytest
import torch

import hutchtrace
from hutchtrace import zoo


def test_cuda_graph_on_cpu_is_a_clear_error():
    model, crit, data = zoo.make_mlp(n=8)
    with pytest.raises(ValueError, match="cuda_graph=True.*cpu.*model.cuda"):
        hutchtrace.block_traces(model, crit, K=4, data=data, seed=0, cuda_graph=True, progress=False)


def test_cuda_graph_flag_must_be_a_bool():
    model, crit, data = zoo.make_mlp(n=8)
    with pytest.raises(TypeError, match="cuda_graph must be True or False"):
        hutchtrace.block_traces(model, crit, K=4, data=data, seed=0, cuda_graph="yes", progress=False)


def test_cpu_error_leaves_the_model_untouched():
    model, crit, data = zoo.make_cnn(n=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError):
        hutchtrace.block_traces(model, crit, K=4, data=data, seed=0, cuda_graph=True, progress=False)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training


def _cuda(make, **kw):
    model, crit, (x, y) = make(**kw)
    return model.cuda(), crit, (x.cuda(), y.cuda())


@pytest.mark.needs_cuda
@pytest.mark.parametrize("hvp", ["reverse", "reverse-batched"])
@pytest.mark.parametrize("probing", ["global", "isolated"])
@pytest.mark.parametrize("make", [zoo.make_mlp, zoo.make_cnn], ids=["mlp", "cnn-bn"])
def test_cuda_graph_gives_the_same_samples(make, probing, hvp):
    model, crit, data = _cuda(make)
    # 4 rows per chunk: two eager warm-up chunks, replays, and a shorter last chunk (eager)
    kw = dict(K=23, data=data, seed=11, hvp=hvp, probing=probing, probe_batch=4, progress=False)
    eager = hutchtrace.block_traces(model, crit, **kw)
    graphed = hutchtrace.block_traces(model, crit, cuda_graph=True, **kw)
    assert graphed.meta["hvp_timings"].get("cuda_graph_replays", 0) > 0, "nothing was replayed from a graph"
    # identical kernels on identical inputs: the same bits up to cuBLAS algorithm choice
    torch.testing.assert_close(graphed.samples, eager.samples, rtol=1e-6, atol=1e-9)
    for a, b in zip(graphed.blocks, eager.blocks):
        assert a.mean == pytest.approx(b.mean, rel=1e-6, abs=1e-9)
        assert a.variance == pytest.approx(b.variance, rel=1e-5, abs=1e-9)


@pytest.mark.needs_cuda
def test_cuda_graph_auto_means_reverse_and_state_is_preserved():
    model, crit, data = _cuda(zoo.make_cnn)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.cuda.get_rng_state()
    res = hutchtrace.block_traces(model, crit, K=16, data=data, seed=2, probe_batch=2, cuda_graph=True,
                                  progress=False)
    assert res.meta["hvp"] == "reverse"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(torch.cuda.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.needs_cuda
def test_cuda_graph_rejects_forward_mode_backbones():
    model, crit, data = _cuda(zoo.make_mlp)
    with pytest.raises(ValueError, match="reverse-mode backbones"):
        hutchtrace.block_traces(model, crit, K=4, data=data, hvp="forward", cuda_graph=True, progress=False)


class _Recorded:
    """CPU stand-in for a captured graph: ``replay`` recomputes the chunk into the static outputs."""

    def __init__(self, runner, bb, z, w, wf, w_out, dots, sq, supports):
        self.args = (runner, bb, z, w, wf, w_out, dots, sq, supports)

    def replay(self):
        runner, bb, z, w, wf, w_out, dots, sq, supports = self.args
        w_new, _ = runner._products(bb, z, w_out, None, supports)
        d_new, s_new = runner._reduce(w_new, z)
        if w_out is None:
            torch._foreach_copy_(w, w_new)
        dots.copy_(d_new)
        sq.copy_(s_new)


@pytest.mark.parametrize("hvp", ["reverse", "reverse-batched"])
@pytest.mark.parametrize("probing", ["global", "isolated"])
def test_graph_replay_logic_with_a_cpu_stand_in(monkeypatch, hvp, probing):
    """The replay loop (eager warm-up chunks, static buffers refilled per chunk, a shorter
    last chunk run eagerly) gives the eager samples; the capture itself is replaced by a
    recording stand-in, since no GPU is needed for this part."""
    import contextlib

    from hutchtrace.core.state import PreservedState
    from hutchtrace.estimate.engine import ProbeRunner, Sink
    from hutchtrace.estimate.probing import global_plan, isolated_plan
    from hutchtrace.problem.blocks import resolve_blocks
    from hutchtrace.problem.loss import make_loss_spec

    model, crit, data = zoo.make_mlp(n=16)
    layout = resolve_blocks(model)
    spec = make_loss_spec(crit, data)
    plan = global_plan(layout.num_blocks) if probing == "global" else isolated_plan(layout.num_blocks)

    class Collect(Sink):
        def __init__(self):
            self.rows = {}

        def on_rows(self, rb):
            for r, (k, g) in enumerate(zip(rb.ks, rb.gs)):
                self.rows[(k, g)] = (rb.dots[r].clone(), rb.w_flat[r].clone() if rb.w_flat is not None else None)

    def capture(self, bb, ks, gs, gtt, pool=None):
        from hutchtrace.estimate.engine.rows import _Flat

        cols = self.columns
        R = len(ks)
        zfl = _Flat(torch.full((R, cols.P), float("nan")), cols)
        z = zfl.views
        w_out = _Flat(torch.empty((R, cols.P)), cols) if (not bb.batched and R > 1) else None
        sup = self._supports(gs, gtt)
        w, wf = self._products(bb, [torch.zeros_like(t) for t in z], w_out, None, sup)  # static outputs
        dots, sq = self._reduce(w, z)
        return _Recorded(self, bb, z, w, wf, w_out, dots, sq, sup), (zfl, z, w, wf, dots, sq)

    eager, graphed = Collect(), Collect()
    with PreservedState(model):
        ProbeRunner(model, layout, spec, seed=4, hvp=hvp, probe_batch=3, progress=False).run(plan, range(20), [eager])
        runner = ProbeRunner(model, layout, spec, seed=4, hvp=hvp, probe_batch=3, progress=False)
        runner.cuda_graph = True
        monkeypatch.setattr("hutchtrace.estimate.engine.graphs.capture", capture)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: type("S", (), {"wait_stream": lambda s, o: None})())
        monkeypatch.setattr(torch.cuda, "Stream", lambda *a: type("S", (), {"wait_stream": lambda s, o: None})())
        monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: object())
        info = runner.run(plan, range(20), [graphed])
    assert runner.graph_replays > 0
    assert info.timings["cuda_graph_replays"] == runner.graph_replays
    assert set(graphed.rows) == set(eager.rows)
    for key, (d, _) in eager.rows.items():
        torch.testing.assert_close(graphed.rows[key][0], d, rtol=0, atol=0)
