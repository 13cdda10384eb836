"""Probing that scales with the number of blocks: the random-partition pilot, the coupling
model fitted to group energies, re-planning and the pilot kept out of the estimate (hutchtrace.estimate.coloring,
hutchtrace.estimate.accumulate)."""

import math
import warnings

import pytest
import torch
from helpers import make_case

import hutchtrace
from hutchtrace import zoo
from hutchtrace.backbones.exact import exact_hessian
from hutchtrace.core.state import PreservedState
from hutchtrace.estimate.accumulate import SampleSink, Segment
from hutchtrace.estimate.coloring import PILOT_GROUPS, CouplingModel, GroupEnergySink, _weights, pilot_plans
from hutchtrace.estimate.engine import ProbeRunner
from hutchtrace.estimate.probing import ProbePlan
from hutchtrace.estimate.variance import PairwiseSink, block_energies, exact_variance
from hutchtrace.problem.blocks import resolve_blocks
from hutchtrace.problem.loss import make_loss_spec


def _run_plan(model, crit, data, plan, K, seed, first=0, pairwise=False):
    """One segment of K probes under ``plan``: ``(segment, group-energy sink)``."""
    layout = resolve_blocks(model)
    spec = make_loss_spec(crit, data)
    pair = PairwiseSink(layout, plan, seed, "rademacher", 16, first_k=first) if pairwise else None
    seg = Segment(plan, layout.num_blocks, torch.device("cpu"), pair, first)
    sink = SampleSink(K, layout, plan, single_batch=spec.kind != "dataset", first_k=first)
    energy = GroupEnergySink(plan, layout.num_blocks)
    with PreservedState(model):  # math attention, BatchNorm handling: as block_traces runs it
        runner = ProbeRunner(model, layout, spec, seed=seed, kind="rademacher", hvp="reverse-batched",
                             progress=False)
        runner.run(plan, range(first, first + K), [sink, energy] + ([pair] if pair is not None else []))
    seg.add(sink)
    return seg, energy


def _group_sums(F, groups):
    """Exact ``S[g, b] = sum_{c in g} F_bc`` (F with its diagonal)."""
    return torch.stack([F[:, list(g)].sum(1) for g in groups])


def test_pilot_partitions_are_balanced_reproducible_and_cover_every_block():
    L = 50
    plans = pilot_plans(L, 8, seed=123)
    assert [k for _, k in plans] == [2, 2, 2, 2]
    for p, _ in plans:
        assert p.num_groups == PILOT_GROUPS and sorted(b for g in p.groups for b in g) == list(range(L))
        assert max(map(len, p.groups)) - min(map(len, p.groups)) <= 1
    assert [p for p, _ in plans] == [p for p, _ in pilot_plans(L, 8, seed=123)]
    assert len({p.groups for p, _ in plans}) == 4  # a new partition every two probes
    assert pilot_plans(L, 8, seed=124)[0][0] != plans[0][0]
    assert pilot_plans(PILOT_GROUPS, 8, seed=1)[0][0].name == "isolated"  # few blocks: block-supported
    state = torch.random.get_rng_state()
    pilot_plans(L, 8, seed=5)
    assert torch.equal(state, torch.random.get_rng_state())


def test_random_group_energies_are_unbiased_for_the_coupling_sums():
    """``E ||(H z_g)_b||^2 = sum_{c in g} F_bc`` for every block b and every group g of a
    random partition (docs/maths.md Q2): the measurement the coupling model is fitted to."""
    model, crit, data = make_case("lm_tied")  # 16 blocks
    H, layout = exact_hessian(model, crit, data=data)
    F, _, _ = block_energies(H, layout)
    plan = ProbePlan("random", ((0, 5, 9, 12), (1, 6, 10, 13), (2, 7, 14), (3, 8, 11, 15), (4,)))
    K = 400
    _, sink = _run_plan(model, crit, data, plan, K, seed=3)
    s, sq, n = sink.sums()
    assert n == K
    mean = s / n
    se = torch.sqrt((sq / n - mean**2).clamp_min(0) / (n - 1))
    exact = _group_sums(F, plan.groups)
    z = (mean - exact) / se.clamp_min(1e-300)
    assert (exact > 0).all()
    assert (z.abs() < 4.5).all(), z.abs().max()  # 80 entries at 4.5 SE: a false alarm has odds ~5e-4


def test_group_energies_in_dataset_mode_bound_the_couplings_from_above():
    """Several batches: the sink reports ``sum_m (n_m/N) ||(H_m z_g)_b||^2`` (Jensen: at least
    the coupling of the dataset-mean Hessian), not ``sum_m (n_m/N)^2 ...`` (which shrinks with
    the number of batches and made couplings look small)."""
    model, crit, (x, y) = make_case("mlp", n=24)
    batches = [(x[:8], y[:8]), (x[8:16], y[8:16]), (x[16:], y[16:])]
    plan = ProbePlan("random", ((0, 3), (1, 4), (2, 5)))
    K = 300
    _, sink = _run_plan(model, crit, batches, plan, K, seed=1)
    s, sq, n = sink.sums()
    assert sq is None and n == K  # squares only for one batch
    expected = torch.zeros(3, 6, dtype=torch.float64)
    per_batch = []
    for xb, yb in batches:
        Hm, layout = exact_hessian(model, crit, data=(xb, yb))
        per_batch.append(Hm)
        expected += (len(xb) / len(x)) * _group_sums(block_energies(Hm, layout)[0], plan.groups)
    H = sum(Hm * len(b[0]) for Hm, b in zip(per_batch, batches)) / len(x)
    of_mean = _group_sums(block_energies(H, layout)[0], plan.groups)
    assert (expected >= of_mean - 1e-12).all() and float((expected / of_mean).max()) > 1.05
    rel = (s / n - expected).abs() / expected
    assert float(rel.max()) < 0.25, rel  # K = 300 probes: each energy within a few % (sd < 8 %)


def test_fit_of_block_supported_rows_is_the_direct_estimate():
    """Singleton groups measure each ``F_bc`` directly (docs/maths.md section 6a): the fit returns the
    symmetrised mean + z SE of ``||(H z_c)_b||^2``, as the block-supported pilot always did."""
    model, crit, data = make_case("mlp")
    L = 6
    plan = hutchtrace.estimate.probing.isolated_plan(L)
    _, sink = _run_plan(model, crit, data, plan, 8, seed=0)
    s, sq, n = sink.sums()
    mean = s / n  # mean[c, b] = F_bc
    se = torch.sqrt((sq / n - mean**2).clamp_min(0) * n / (n - 1) / n)
    direct = (mean + 2.0 * se).T
    direct = 0.5 * (direct + direct.T)
    direct.fill_diagonal_(0)
    model_ = CouplingModel(L)
    model_.observe(sink)
    assert torch.allclose(model_.couplings(), direct, rtol=1e-9, atol=1e-15)


def test_fit_reproduces_exact_group_sums_of_every_partition_it_saw():
    """Noise-free group sums of several random partitions: the fitted ``F`` (non-negative,
    symmetric) has those group sums, and predicts the within-group coupling of a partition it
    never saw better than the flat prior does."""
    model, crit, data = make_case("lm_tied")
    H, layout = exact_hessian(model, crit, data=data)
    F, _, _ = block_energies(H, layout)
    L = F.shape[0]
    plans = [ProbePlan("random", tuple(tuple(sorted(g)) for g in _split(L, 4, seed=s))) for s in range(6)]

    class Exact(GroupEnergySink):
        def __init__(self, plan):
            super().__init__(plan, L)
            self._sum, self._sq, self._rows, self.batches = _group_sums(F, plan.groups), None, [1] * plan.num_groups, 2

    cm = CouplingModel(L, z=0.0)
    for p in plans:
        cm.observe(Exact(p))
    Fh = cm.couplings(iterations=400)
    assert (Fh >= 0).all() and torch.allclose(Fh, Fh.T)
    Fo = F.clone()
    Fo.fill_diagonal_(0)
    for p in plans:  # off-diagonal part of each group sum (the fit leaves F_bb to the U-statistics)
        got, want = _group_sums(Fh, p.groups), _group_sums(Fo, p.groups)
        gob = torch.tensor(p.group_of_block(L))
        own = torch.zeros_like(want, dtype=torch.bool)
        own[gob, torch.arange(L)] = True
        assert torch.allclose(got[~own], want[~own], rtol=0.05), float(((got - want) / want)[~own].abs().max())
    unseen = ProbePlan("colored", tuple(tuple(sorted(g)) for g in _split(L, 4, seed=99)))
    W_true = exact_variance(H, layout, unseen)["cross"]
    flat = Fo.sum(1, keepdim=True).expand(L, L) / (L - 1)
    W_flat = (flat * _same(unseen, L)).sum(1)
    err_fit = float((cm.within(unseen.groups, z=0.0) - W_true).abs().sum())
    err_flat = float((W_flat - W_true).abs().sum())
    assert err_fit < 0.8 * err_flat, (err_fit, err_flat)


def _split(L, G, seed):
    perm = torch.randperm(L, generator=torch.Generator().manual_seed(seed)).tolist()
    return [perm[g::G] for g in range(G)]


def _same(plan, L):
    gob = torch.tensor(plan.group_of_block(L))
    return (gob[:, None] == gob[None, :]) & ~torch.eye(L, dtype=torch.bool)


def test_v0_from_random_partitions_is_unbiased():
    """Under any plan, the pairwise U-statistics of b's own-group rows are unbiased for
    ``F_bb`` and ``d_b``, so ``V0_b = 2 F_bb - 2 d_b`` (Rademacher) comes out right although
    every sample carries within-group couplings: ten independent segments, mean within 4 SE."""
    model, crit, data = make_case("lm_tied")
    H, layout = exact_hessian(model, crit, data=data)
    v0_exact = exact_variance(H, layout, "isolated")["variance"]
    L = layout.num_blocks
    plan = ProbePlan("random", tuple(tuple(sorted(g)) for g in _split(L, 4, seed=1)))
    assert (exact_variance(H, layout, plan)["cross"] > 3 * v0_exact).any()  # the couplings dominate somewhere
    est = []
    for r in range(10):
        seg, sink = _run_plan(model, crit, data, plan, 48, seed=11, first=48 * r, pairwise=True)
        cm = CouplingModel(L)
        cm.observe(sink)
        est.append(cm.update_v0([seg]))
    est = torch.stack(est)
    se = est.std(0) / math.sqrt(len(est))
    z = (est.mean(0) - v0_exact) / se
    assert (z.abs() < 4).all(), z


def test_pilot_rows_do_not_grow_with_the_number_of_blocks():
    """``auto``'s pilot: ``min(L, 16) * pilot_K`` rows (block-supported up to 16 blocks,
    random partitions into 16 groups beyond): 128 rows whether L is 20 or 400 (it was
    ``L * pilot_K``, 3200 rows at L = 400)."""
    rows = {}
    for L in (10, 20, 100, 400):
        gen = torch.Generator().manual_seed(L)
        P = 3 * L
        B = torch.randn(P, P, generator=gen, dtype=torch.float64) / math.sqrt(P)
        q = zoo.HessianQuadratic(B @ B.T + torch.eye(P, dtype=torch.float64), [3] * L)
        res = hutchtrace.block_traces(q, lambda m: m(), K=4, seed=0, probing="auto", progress=False)
        rows[L] = res.meta["pilot_rows"]
        assert res.meta["hvp_rows"] == rows[L] + 4 * res.meta["segments"][-1]["groups"]
    assert rows == {10: 80, 20: 128, 100: 128, 400: 128}, rows


def test_a_random_partition_pilot_chooses_the_plan_but_stays_out_of_the_estimate():
    """Beyond 16 blocks the pilot's samples (noisy: ~L/16 blocks share a probe) only choose the
    plan. The estimate is the count-weighted mean of the later segments' rows, which are the
    rows of ``samples`` (segments flagged ``in_estimate``); the pilot rows are still counted."""
    model, crit, data = zoo.make_deep_lm(d=4, vocab=8, ctx=4, layers=2, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = hutchtrace.block_traces(model, crit, K=8, data=data, seed=3, probing="auto", rtol=0.2, max_K=64,
                                      hvp="reverse", progress=False)
    L = res.samples.shape[1]
    assert L > PILOT_GROUPS
    segs = res.meta["segments"]
    pilot = [s for s in segs if s["probing"] == "random"]
    assert pilot and not any(s["in_estimate"] for s in pilot)
    used = [s for s in segs if s["in_estimate"]]
    assert used and all(s["probing"] != "random" for s in used)
    assert res.samples.shape[0] == res.meta["K"] == sum(s["K"] for s in used)
    assert res.meta["pilot_rows"] == PILOT_GROUPS * 8
    assert torch.allclose(res.means, res.samples.mean(0), rtol=1e-12, atol=1e-15)
    if len(used) == 1:
        assert torch.allclose(res.ses, res.samples.std(0) / res.samples.shape[0] ** 0.5, rtol=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_auto_converges_on_the_cnn(seed):
    """Regression: a re-planned run on the BatchNorm CNN stalled at max_K (seed 2) when the
    pooling weights trusted a wrong ``V0``; rows stay below what isolated probing needs."""
    model, crit, data = make_case("cnn_bn")
    H, layout = exact_hessian(model, crit, data=data)
    ex = exact_variance(H, layout, "isolated")
    w = _weights(ex["trace"], 0.05, None)
    iso_rows = layout.num_blocks * float((w * ex["variance"]).max())
    res = hutchtrace.block_traces(model, crit, K=16, data=data, seed=seed, probing="auto", rtol=0.05, max_K=20000,
                                  hvp="reverse-batched", progress=False)
    assert res.meta["converged"] and res.meta["hvp_rows"] < iso_rows, (res.meta["hvp_rows"], iso_rows)
    live = res.ses > 1e-12
    assert ((res.means - ex["trace"]).abs()[live] < 4 * res.ses[live]).all()


def test_auto_at_a_hundred_blocks_beats_global_and_isolated():
    """L = 100 blocks (an 8-layer transformer), random-partition pilot: ``auto`` reaches
    ``rtol`` on every block in fewer HVP rows than the exact cost of both ``global`` and
    ``isolated``, the pilot is a small share, and the estimates agree with the exact traces.
    The runs use the dense-Hessian surrogate (same probes, same samples: checked first)."""
    model, crit, data = zoo.make_deep_lm(d=4, vocab=8, ctx=4, layers=8, dtype=torch.float64)
    H, layout = exact_hessian(model, crit, data=data, method="autograd")
    L = layout.num_blocks
    assert L == 100
    q = zoo.HessianQuadratic(H, [b.numel for b in layout.blocks])
    a = hutchtrace.block_traces(model, crit, K=2, data=data, seed=5, hvp="reverse", progress=False)
    b = hutchtrace.block_traces(q, lambda m: m(), K=2, seed=5, hvp="reverse", progress=False)
    assert torch.allclose(a.samples, b.samples, rtol=1e-9, atol=1e-12 * float(a.samples.abs().max()))
    rtol = 0.3
    g, i = exact_variance(H, layout, "global"), exact_variance(H, layout, "isolated")
    tr = g["trace"]
    w = _weights(tr, rtol, None)
    global_rows, iso_rows = float((w * g["variance"]).max()), L * float((w * i["variance"]).max())
    zs = []
    for seed in (0, 1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            res = hutchtrace.block_traces(q, lambda m: m(), K=16, seed=seed, probing="auto", rtol=rtol, max_K=50000,
                                          hvp="reverse-batched", progress=False)
        rows = res.meta["hvp_rows"]
        assert res.meta["converged"]
        assert rows < 0.5 * min(global_rows, iso_rows), (rows, global_rows, iso_rows)
        assert res.meta["pilot_rows"] == PILOT_GROUPS * 8 and res.meta["pilot_rows"] < 0.1 * rows
        zs.append((res.means - tr) / res.ses)
    z = torch.cat(zs)
    assert float(z.abs().max()) < 4.5 and float((z.abs() < 2).double().mean()) > 0.9, z.abs().max()
