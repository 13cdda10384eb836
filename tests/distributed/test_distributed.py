"""Distributed block traces (issue 7): gloo on CPU, 2 and 4 ranks, against single-process results.

Each world size gets one persistent pool of ranks (starting a rank costs seconds); the
ranks run the scenarios of ``tests/dist_workers/scenarios.py`` and the assertions compare
their results with single-process computations done here on the full data with the same
seed. "Equal" means equal up to float64 summation order: 1e-12 relative.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from dist_workers import scenarios
from dist_workers.pool import Pool
from helpers import assert_close_rel, exact_samples, probe_matrix

import hutchtrace
from hutchtrace import distributed as hd
from hutchtrace.backbones.exact import exact_hessian

RTOL = 1e-12


@pytest.fixture(scope="module")
def pools():
    started: dict[int, Pool] = {}

    def get(world: int) -> Pool:
        if world not in started or started[world].broken:
            started[world] = Pool(world)
        return started[world]

    yield get
    for p in started.values():
        p.close()


def reference(case="mlp", K=6, seed=3, data=None, **kw):
    """Single-process block_traces on the full data."""
    model, crit, (x, y) = scenarios.make(case)
    return hutchtrace.block_traces(model, crit, K=K, data=(x, y) if data is None else data, seed=seed,
                                   **scenarios.bt_kwargs(), **kw)


def assert_matches(rank_out: dict, ref, *, se=True, energy=False) -> None:
    assert rank_out["names"] == ref.names
    assert rank_out["seed"] == ref.meta["seed"]
    assert_close_rel(torch.as_tensor(rank_out["samples"]), ref.samples, RTOL)
    ref_mean = torch.tensor([b.mean for b in ref.blocks], dtype=torch.float64)
    assert_close_rel(torch.as_tensor(rank_out["mean"])[None], ref_mean[None], RTOL)
    assert math.isclose(rank_out["total"], ref.total.mean, rel_tol=RTOL, abs_tol=RTOL * abs(ref.total.mean))
    if se:  # structurally-zero blocks (a conv bias before BatchNorm) hold rounding noise only
        ref_se = np.array([b.se for b in ref.blocks])
        np.testing.assert_allclose(rank_out["se"], ref_se, rtol=1e-9, atol=1e-9 * ref_se.max())
        assert math.isclose(rank_out["total_se"], ref.total.se, rel_tol=1e-9)
    if energy:
        np.testing.assert_allclose(rank_out["row_energy"], [b.row_energy for b in ref.blocks], rtol=1e-10)


def all_ranks_agree(outs: list[dict]) -> None:
    for o in outs[1:]:
        assert np.array_equal(o["samples"], outs[0]["samples"]), "ranks hold different results"


# ------------------------------------------------------------------------ data parallel
def test_dp_equal_shards_equal_full_batch(pools):
    outs = pools(2).run("dp", form="single")
    ref = reference()
    all_ranks_agree(outs)
    for o in outs:
        assert_matches(o, ref)
        assert o["untouched"]
        # ||sum_r w_r||^2 is not a sum of per-rank norms: not reported rather than wrong
        assert o["row_energy"] == [None] * len(ref.names)


@pytest.mark.parametrize(
    "world,sizes,form",
    [(2, [17, 7], "list"), (2, [17, 7], "loader"), (4, [11, 6, 5, 2], "loader")],
)
def test_dp_unequal_shards_weight_by_sample_count(pools, world, sizes, form):
    """Each rank iterates its own shard; batches are weighted by sample count, N = sum of counts."""
    outs = pools(world).run("dp", sizes=sizes, form=form, batch=5)
    ref = reference()  # mean-reduced loss on all 24 samples = count-weighted dataset mean
    all_ranks_agree(outs)
    for o in outs:
        assert_matches(o, ref)
    # the equal-weight mean of per-rank Hessians would be a different matrix: make sure the
    # test can tell (per-rank references weighted 1/world instead of n_r/N)
    model, crit, (x, y) = scenarios.make("mlp")
    parts = [reference(data=(xs, ys)) for xs, ys in zip(x.split(sizes), y.split(sizes))]
    unweighted = sum(p.samples for p in parts) / world
    assert (unweighted - ref.samples).abs().max() > 1e-6 * ref.samples.abs().max()


def test_dp_unequal_single_batch_shards(pools):
    outs = pools(2).run("dp", sizes=[17, 7], form="single")
    assert_matches(outs[0], reference())


def test_dp_seed_none_uses_rank0_seed(pools):
    outs = pools(2).run("seed_none")
    assert len({o["seed"] for o in outs}) == 1
    all_ranks_agree(outs)
    model, crit, (x, y) = scenarios.make("mlp")
    assert_matches(outs[0], reference(K=4, seed=outs[0]["seed"]))


def test_dp_batchnorm_estimates_the_shard_mean_hessian(pools):
    """BatchNorm in train mode normalises with each rank's batch statistics, as DDP training
    does: the estimate is that of the count-weighted mean of the per-shard Hessians."""
    sizes = [8, 4]
    outs = pools(2).run("dp", case="cnn_bn", sizes=sizes, form="list", K=4)
    model, crit, (x, y) = scenarios.make("cnn_bn")
    shard_mean = reference("cnn_bn", K=4, data=list(zip(x.split(sizes), y.split(sizes))))
    full = reference("cnn_bn", K=4)
    for o in outs:
        assert_matches(o, shard_mean)
        assert o["untouched"]  # running statistics untouched
    assert (shard_mean.samples - full.samples).abs().max() > 1e-6 * full.samples.abs().max()


def test_ddp_wrapped_model_fires_no_gradient_sync(pools):
    outs = pools(2).run("ddp", K=5, seed=2)
    ref = reference(K=5, seed=2)
    for o in outs:
        assert_matches(o, ref)
        assert o["hook_calls_during"] == 0  # no DDP bucket all-reduce during block_traces
        assert o["grads_none"] and o["untouched"]
        assert o["hook_calls_after_step"] > 0  # the instrument does see an ordinary DDP step


def test_comm_volume_is_O_KL_not_O_P(pools):
    """Elements through torch.distributed per call: K*L + O(1), independent of P and of the batches."""
    outs = pools(2).run("dp_comm", Ks=(4, 8), batch=5)
    for o in outs:
        P, L = o["P"], o["L"]
        (a, b) = o["runs"]
        assert a["batches"] >= 2  # several batches, still one reduction
        assert b["elements"] - a["elements"] == (b["K"] - a["K"]) * L  # exactly L numbers per probe
        overhead = a["elements"] - a["K"] * L
        assert 0 <= overhead <= 16  # seed, a (K, L) agreement check and the sample count
        assert len(a["calls"]) == len(b["calls"]) <= 4  # a constant number of collectives
        assert b["elements"] < P / 50


def test_mismatched_K_raises_on_every_rank(pools):
    msgs = pools(2).run("mismatch")
    assert all(m is not None and "disagree" in m and "K" in m for m in msgs)


@pytest.mark.parametrize("world", [2, 4])
def test_all_reduce_welford_equals_one_pass(pools, world):
    from hutchtrace.estimate.stats import WelfordState

    outs = pools(world).run("welford")
    g = torch.Generator().manual_seed(5)
    data = 1e6 + torch.randn(37, 3, generator=g, dtype=torch.float64)
    ref = WelfordState.zeros(3)
    ref.update(data)
    for o in outs:
        assert o["n"] == 37
        np.testing.assert_allclose(o["mean"], ref.mean.numpy(), rtol=1e-15)
        # data 1e6 + N(0,1): a sum-of-squares merge would lose ~all digits here
        np.testing.assert_allclose(o["var"], ref.variance().numpy(), rtol=1e-9)


def test_agree_int_takes_rank0_value(pools):
    assert pools(2).run("agree") == [100, 100]


def _monitor_run(pools, tmp_path):
    path = tmp_path / "monitor.jsonl"
    outs = pools(2).run("monitor_ddp", path=str(path), steps=6, every=2, K=3)
    return path, outs


def test_monitor_under_ddp_measures_the_global_traces(pools, tmp_path):
    """A Monitor around a DDP model: every rank takes part in each measurement (block_traces
    auto-detects the group), so all ranks hold the same data-parallel estimates."""
    _, outs = _monitor_run(pools, tmp_path)
    assert len(outs[0]["history"]) == 3
    assert outs[0]["history"] == outs[1]["history"]


def test_monitor_under_ddp_only_rank0_writes(pools, tmp_path):
    from hutchtrace.monitor.sinks import read_log

    path, outs = _monitor_run(pools, tmp_path)
    rows = read_log(path, as_dataframe=False, flat=False)
    assert len(rows) == len(outs[0]["history"]) == 3
    assert [r["total"] for r in rows] == [h["total"] for h in outs[0]["history"]]


# ----------------------------------------------------------------------- sharded params
@pytest.mark.parametrize("world,placements", [(2, "shard0"), (2, "mixed"), (4, "shard0")])
def test_dtensor_params_equal_single_process(pools, world, placements):
    """DTensor parameters (Shard(0) rows, or Shard(1) columns + replicated biases) and a
    Shard(0) batch: the same probes and the same estimate as the unsharded model."""
    outs = pools(world).run("dtensor", placements=placements, K=4, seed=4)
    ref = reference("mse", K=4, seed=4)
    all_ranks_agree(outs)
    K, L = ref.samples.shape
    for o in outs:
        assert_matches(o, ref, energy=True)  # row energies sum over slices: reported
        assert o["untouched"]
        assert o["meta"]["distributed"] == "sharded"
        # explicit reductions: seed, one (has, n) exchange per batch, the agreement check and
        # the 2*K*L partial sums; the HVP's own DTensor traffic is not counted here
        assert 2 * K * L <= o["explicit_elements"] <= 2 * K * L + 6 * world + 16


def test_dtensor_dataset_form(pools):
    outs = pools(2).run("dtensor", form="list", K=4, seed=4)
    ref = reference("mse", K=4, seed=4)
    for o in outs:
        assert_matches(o, ref)
        assert o["meta"]["n_samples"] == 12 and o["meta"]["n_batches"] == 2


def test_fsdp2_fully_shard_equals_single_process(pools):
    outs = pools(2).run("fsdp", K=4, seed=6)
    ref = reference("mse", K=4, seed=6)
    for o in outs:
        assert_matches(o, ref, energy=True)
        assert o["untouched"]
        assert o["trains_after"]  # FSDP's hooks are back: an ordinary step still works


def test_dtensor_unsupported_cases_fail_clearly_on_every_rank(pools):
    outs = pools(2).run("dtensor_errors")
    for o in outs:
        assert "DTensor could not" in o["cnn"] and "docs/distributed.md" in o["cnn"]
        assert "torch.chunk" in o["uneven"] and "[9, 3]" in o["uneven"]


def test_tensor_parallel_adapter_equals_exact(pools):
    """sharded_block_traces with a user HVP of a tensor-parallel MLP (column slices of W2 are
    not contiguous in the flat vector; the replicated bias is counted once)."""
    outs = pools(2).run("tensor_parallel", K=5, seed=8)
    model, crit, (x, y) = scenarios.make("mse")
    ref = reference("mse", K=5, seed=8)
    H, layout = exact_hessian(model, crit, data=(x, y))
    exact = exact_samples(H, layout, probe_matrix(layout, 8, 5))
    for o in outs:
        assert_matches(o, ref, energy=True)
        assert_close_rel(torch.as_tensor(o["samples"]), exact, 1e-10)
        # hutchtrace's own reductions (the HVP's model-parallel traffic excluded): O(K L)
        assert 2 * 5 * 4 <= o["explicit_elements"] <= 2 * 5 * 4 + 16


# --------------------------------------------------------------- single-process units
@pytest.mark.parametrize(
    "gshape,start,lshape",
    [((7, 5), (2, 0), (3, 5)), ((7, 5), (0, 1), (7, 3)), ((4, 3, 5), (1, 0, 2), (2, 3, 2)),
     ((4, 3, 5), (1, 1, 0), (2, 2, 5)), ((6,), (4,), (2,)), ((), (), ()), ((5, 4), (5, 0), (0, 4))],
)
def test_param_shard_runs_cover_the_box(gshape, start, lshape):
    sh = hd.ParamShard("w", torch.zeros(lshape), gshape, start)
    base = 100
    starts, run = sh.runs(base)
    flat = torch.arange(base, base + max(1, math.prod(gshape))).reshape(gshape)
    box = flat[tuple(slice(s, s + n) for s, n in zip(start, lshape))].reshape(-1)
    got = torch.tensor([s + i for s in starts for i in range(run)], dtype=torch.int64)
    assert torch.equal(got, box)


def test_sharded_block_traces_single_rank_equals_block_traces():
    """One 'rank' owning everything with an exact-Hessian HVP: the probes, samples and
    errors of block_traces (same global numbering, same seed)."""
    model, crit, (x, y) = scenarios.make("mse")
    H, layout = exact_hessian(model, crit, data=(x, y))
    sizes = [t.numel() for t in layout.tensors]
    shards = [hd.ParamShard(n, torch.zeros_like(t), tuple(t.shape), (0,) * t.dim())
              for n, t in zip(layout.names, layout.tensors)]

    def hvp(vs):
        w = H @ torch.cat([v.reshape(-1) for v in vs])
        return [p.reshape(v.shape) for p, v in zip(w.split(sizes), vs)]

    for blocks in ("param", "module", {"first": ["0.weight", "0.bias"]}):
        res = hd.sharded_block_traces(hvp, shards, K=6, seed=13, blocks=blocks, process_group=False)
        ref = hutchtrace.block_traces(model, crit, K=6, data=(x, y), seed=13, blocks=blocks,
                                      **scenarios.bt_kwargs())
        assert res.names == ref.names
        assert_close_rel(res.samples, ref.samples, 1e-12)
        np.testing.assert_allclose([b.se for b in res.blocks], [b.se for b in ref.blocks], rtol=1e-9)
        np.testing.assert_allclose([b.row_energy for b in res.blocks], [b.row_energy for b in ref.blocks],
                                   rtol=1e-10)


def test_sharded_errors_are_clear():
    with pytest.raises(hutchtrace.BlockSpecError, match="does not fit"):
        hd.ParamShard("w", torch.zeros(3, 2), (4, 2), (2, 0))
    with pytest.raises(hutchtrace.BlockSpecError, match="same number of dimensions"):
        hd.ParamShard("w", torch.zeros(3, 2), (6,), (0,))
    sh = [hd.ParamShard("w", torch.zeros(4), (4,), (0,))]
    with pytest.raises(hutchtrace.HVPUnsupportedError, match="local slice has shape"):
        hd.sharded_block_traces(lambda v: [torch.zeros(3)], sh, K=2, seed=0, process_group=False)
    with pytest.raises(hutchtrace.BlockSpecError, match="unique"):
        hd.sharded_block_traces(lambda v: v, sh + sh, K=2, seed=0, process_group=False)
    with pytest.raises(hutchtrace.BlockSpecError, match="DTensor"):
        hd.shards_of(torch.nn.Linear(2, 2))


def test_group_helpers_without_torch_distributed():
    assert hd.resolve_group(None) is None  # not initialised: single process
    assert hd.resolve_group(False) is None
    with pytest.raises(hd.DistributedError, match="not initialised"):
        hd.resolve_group(object())
    assert hd.is_main_process()
    with pytest.raises(hd.DistributedError, match="init_process_group"):
        model, crit, (x, y) = scenarios.make("mlp")
        hutchtrace.block_traces(model, crit, K=2, data=(x, y), seed=0, process_group=object())



def test_dp_empty_shard_and_global_metadata(pools):
    """A rank whose DataLoader shard is empty still takes part; the metadata reports the
    global sample count and the world size."""
    outs = pools(2).run("dp", sizes=[24, 0], form="loader")
    ref = reference()
    for o in outs:
        assert_matches(o, ref)
        assert o["meta"]["n_samples"] == 24 and o["meta"]["world_size"] == 2
