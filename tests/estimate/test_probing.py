"""Probing schemes and adaptive stopping: the least time to trustworthy error bars."""

import math
import warnings

import pytest
import torch
from helpers import make_case
from torch import nn

import hutchtrace
from hutchtrace.backbones.exact import exact_hessian
from hutchtrace.estimate.coloring import color_blocks, predicted_variance
from hutchtrace.estimate.probing import ProbePlan
from hutchtrace.estimate.variance import block_energies, exact_variance

RTOL = 0.1


def _required_probes(V, tr, rtol, atol=None):
    big = float(tr.abs().max())
    a = atol if atol is not None else 0.01 * rtol * big
    eps = torch.maximum(rtol * tr.abs(), torch.full_like(tr, a))
    return float((V / eps**2).max()), eps


@pytest.mark.parametrize("case", ["mlp", "cnn_bn", "lm_tied"])
def test_auto_reaches_rtol_with_fewer_hvps_than_global(case):
    model, crit, data = make_case(case)
    H, layout = exact_hessian(model, crit, data=data)
    ex_g = exact_variance(H, layout, "global")
    K_global, eps = _required_probes(ex_g["variance"], ex_g["trace"], RTOL)
    res = hutchtrace.block_traces(model, crit, K=16, data=data, seed=11, probing="auto", rtol=RTOL,
                                  hvp="reverse-batched", progress=False)
    assert res.meta["converged"]
    plan = ProbePlan(res.meta["probing"], tuple(tuple(g) for g in res.meta["groups"])) \
        if res.meta["probing"] == "colored" else res.meta["probing"]
    ex_a = exact_variance(H, layout, plan)
    # the true standard error of the auto run meets the target (up to the noise of a
    # stopping rule driven by estimated variances)
    true_se = torch.sqrt(ex_a["variance"] / res.K)
    assert (true_se <= 1.25 * eps).all(), (true_se / eps).tolist()
    # and it cost fewer HVPs (pilot included) than global probing needs
    assert res.meta["hvp_rows"] < K_global, (res.meta["hvp_rows"], K_global)
    # unbiased: every block within 4 (true) standard errors of the exact trace
    z = (res.means - ex_a["trace"]).abs() / true_se.clamp_min(1e-300)
    assert ((z < 4) | (true_se < 1e-12)).all()


def test_colored_plan_separates_coupled_blocks():
    model, crit, data = make_case("mlp")
    H, layout = exact_hessian(model, crit, data=data)
    F, d, tr = block_energies(H, layout)
    v0 = exact_variance(H, layout, "isolated")["variance"]
    w = 1 / (tr.abs().clamp_min(0.01 * tr.abs().max())) ** 2
    for G in (2, 3):
        groups = color_blocks(F, v0, w, G)
        assert len(groups) <= G and sorted(b for g in groups for b in g) == list(range(len(tr)))
        V = predicted_variance(F, v0, groups)
        Vg = predicted_variance(F, v0, [list(range(len(tr)))])
        # the bottleneck (max normalised variance) drops below global's
        assert float((w * V).max()) < float((w * Vg).max())
        assert torch.allclose(V, exact_variance(H, layout, groups)["variance"], rtol=1e-12)
    res = hutchtrace.block_traces(model, crit, K=8, data=data, seed=2, probing="colored", groups=2,
                                  hvp="reverse-batched", progress=False)
    assert res.meta["probing"] == "colored" and len(res.meta["groups"]) <= 2
    pilot, main = res.meta["segments"]
    assert pilot == {"probing": "isolated", "groups": 6, "K": 8, "first_probe": 0, "in_estimate": True}
    assert main["first_probe"] == 8 and main["K"] == 8 and res.K == 16  # pilot samples are kept


class Quadratic(nn.Module):
    """loss = 1/2 theta^T A theta with blocks of chosen signs: an exactly known Hessian."""

    def __init__(self, A, sizes):
        super().__init__()
        self.A = A
        self.sizes = sizes
        gen = torch.Generator().manual_seed(1)
        self.parts = nn.ParameterList([nn.Parameter(torch.randn(n, generator=gen, dtype=torch.float64))
                                       for n in sizes])

    def forward(self):
        th = torch.cat(list(self.parts))
        return 0.5 * th @ self.A @ th


def _quadratic(seed=0):
    gen = torch.Generator().manual_seed(seed)
    sizes = (6, 6, 4, 3)
    P = sum(sizes)
    B = torch.randn(P, P, generator=gen, dtype=torch.float64) * 0.15
    A = (B + B.T) / 2
    A.fill_diagonal_(0)  # block traces are then exactly the sums of d
    d = torch.zeros(P, dtype=torch.float64)
    d[:6] = 2.0          # block 0: positive trace
    d[6:12] = -1.5       # block 1: NEGATIVE trace
    d[12:16] = 0.001     # block 2: near-zero trace (below 1 % of the largest: held to atol)
    d[16:] = 0.5
    A = A + torch.diag(d)
    return Quadratic(A, sizes), A


@pytest.mark.slow
def test_adaptive_stopping_meets_its_target_with_negative_and_near_zero_traces():
    model, A = _quadratic()
    ex = exact_variance(A, list(model.sizes), "global")
    tr = ex["trace"]
    assert tr[1] < 0 and abs(float(tr[2])) < 0.01 * float(tr.abs().max())
    K_req, eps = _required_probes(ex["variance"], tr, RTOL)
    met, Ks = 0, []
    runs = 40
    for seed in range(runs):
        res = hutchtrace.block_traces(model, lambda m: m(), K=10, seed=seed, rtol=RTOL, hvp="reverse-batched",
                                      progress=False)
        assert res.meta["converged"]
        Ks.append(res.K)
        true_se = torch.sqrt(ex["variance"] / res.K)
        met += bool((true_se <= eps).all())
    assert met >= 0.9 * runs, f"target met in {met}/{runs} runs; K_final {Ks}, K required {K_req:.0f}"
    # never the peer bug: a negative running mean must not end the loop early
    assert min(Ks) > 0.5 * K_req


def test_adaptive_on_the_total_and_budget_exhaustion():
    model, A = _quadratic()
    ex = exact_variance(A, list(model.sizes), "global")
    res = hutchtrace.block_traces(model, lambda m: m(), K=10, seed=0, rtol=RTOL, stop_on="total",
                                  hvp="reverse-batched", progress=False)
    tot = float(ex["trace"].sum())
    assert res.meta["converged"] and math.sqrt(ex["total"] / res.K) <= 1.25 * RTOL * abs(tot)
    with pytest.warns(RuntimeWarning, match="did not reach"):
        res = hutchtrace.block_traces(model, lambda m: m(), K=10, seed=0, rtol=1e-4, max_K=40,
                                      hvp="reverse-batched", progress=False)
    assert res.K == 40 and res.meta["converged"] is False


def test_adaptive_needs_reiterable_data_and_valid_targets():
    model, crit, (x, y) = make_case("mlp")
    gen = ((x[i:i + 8], y[i:i + 8]) for i in range(0, 32, 8))
    with pytest.raises(ValueError, match="re-iterable"):
        hutchtrace.block_traces(model, crit, K=4, data=gen, rtol=0.1)
    with pytest.raises(ValueError, match="rtol"):
        hutchtrace.block_traces(model, crit, K=4, data=(x, y), rtol=-1)
    with pytest.raises(ValueError, match="max_K"):
        hutchtrace.block_traces(model, crit, K=4, data=(x, y), rtol=0.1, max_K=2)


def test_adaptive_in_dataset_mode_reiterates_the_data():
    model, crit, (x, y) = make_case("mlp", n=24)
    batches = [(x[:10], y[:10]), (x[10:], y[10:])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = hutchtrace.block_traces(model, crit, K=8, data=batches, seed=1, rtol=0.3, max_K=64,
                                      probing="isolated", hvp="reverse-batched", progress=False)
    full = hutchtrace.block_traces(model, crit, K=res.K, data=(x, y), seed=1, probing="isolated",
                                   hvp="reverse-batched", progress=False)
    assert torch.allclose(res.samples, full.samples, rtol=1e-9, atol=1e-12)


class _ScalarBlocks(nn.Module):
    """A tanh MLP 4-6-1 times a learned scalar temperature: two 1-element blocks (the
    output bias ``net.2.bias`` and the 0-dim ``temperature``) among larger ones."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1))
        self.temperature = nn.Parameter(torch.tensor(0.7))

    def forward(self, x):
        return self.net(x) * self.temperature


def _scalar_blocks_case():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = _ScalarBlocks().double()
        x, y = torch.randn(12, 4, dtype=torch.float64), torch.randn(12, 1, dtype=torch.float64)
    return model, lambda out, t: ((out - t) ** 2).mean(), (x, y)


@pytest.mark.parametrize("variance", ["sample", "pairwise"])
def test_isolated_single_element_blocks_are_exact(variance):
    """A 1-element block probed alone is read exactly: its Rademacher sample is
    ``z_i (H z)_i = z_i^2 H_ii = H_ii`` for every probe, so the mean is the exact trace and the
    standard error is 0 (docs/maths.md section 1: ``Var t_b = V0_b = 2(F_bb - d_b) = 0`` for
    ``n_b = 1``)."""
    from hutchtrace.backbones.exact import exact_block_traces

    model, crit, data = _scalar_blocks_case()
    H, layout = exact_hessian(model, crit, data=data)
    exact = exact_block_traces(H, layout)
    K = 6
    res = hutchtrace.block_traces(model, crit, K=K, data=data, seed=0, probing="isolated", variance=variance,
                                  hvp="reverse-batched", progress=False)
    assert res.meta["probing"] == "isolated" and res.meta["groups"] == layout.num_blocks
    one = [b for b, blk in enumerate(res.blocks) if blk.numel == 1]
    assert sorted(res.blocks[b].name for b in one) == ["net.2.bias", "temperature"]
    for b in one:
        h = float(exact[b])
        assert abs(h) > 1e-3  # a non-trivial diagonal entry
        # every per-probe sample equals the exact diagonal entry (not only on average)
        torch.testing.assert_close(res.samples[:, b], torch.full((K,), h, dtype=torch.float64), rtol=1e-12, atol=0)
        assert res.blocks[b].mean == pytest.approx(h, rel=1e-12, abs=0)
        # SE 0, up to the rounding of the variance estimate (the pairwise one is a difference
        # of O(H_ii^2) terms, so it rounds to ~eps H_ii^2, an SE of ~sqrt(eps/K) |H_ii|)
        assert res.blocks[b].sample_variance <= 1e-13 * h * h
        assert res.blocks[b].variance <= 1e-13 * h * h
        assert res.blocks[b].se <= 1e-6 * abs(h)
        lo, hi = res.blocks[b].ci
        assert lo <= h <= hi and hi - lo <= 1e-5 * abs(h)
    # the multi-element blocks stay random (the check above is not vacuous for them) ...
    assert all(float(res.samples[:, b].std()) > 0 for b in range(layout.num_blocks) if b not in one)
    # ... and so do the 1-element blocks under global probing, which adds the cross terms
    # z_b H_bc z_c: exactness comes from probing the block alone
    glob = hutchtrace.block_traces(model, crit, K=K, data=data, seed=0, probing="global", variance=variance,
                                   hvp="reverse-batched", progress=False)
    for b in one:
        assert float(glob.samples[:, b].std()) > 1e-3 * abs(float(exact[b]))
        assert glob.blocks[b].se > 1e-3 * abs(float(exact[b]))


@pytest.mark.parametrize("groups", ["isolated", [[0, 2, 4], [1, 3, 5]]])
def test_cross_energy_measures_the_couplings_a_global_probe_adds(groups):
    """``Segment.cross_energy`` is unbiased for ``X_b = sum_{c not in g(b)} ||H_bc||_F^2``,
    so ``V_plan + X`` is the global scheme's exact per-probe variance (docs/maths.md section 1, cross energy)."""
    from hutchtrace.estimate.accumulate import SampleSink, Segment
    from hutchtrace.estimate.engine import ProbeRunner
    from hutchtrace.estimate.probing import isolated_plan
    from hutchtrace.problem.blocks import resolve_blocks
    from hutchtrace.problem.loss import make_loss_spec

    model, crit, data = make_case("mlp")
    H, layout = exact_hessian(model, crit, data=data)
    L = layout.num_blocks
    plan = isolated_plan(L) if groups == "isolated" else ProbePlan("colored", tuple(map(tuple, groups)))
    F, _, _ = block_energies(H, layout)
    same = torch.zeros(L, L, dtype=torch.bool)
    for g in plan.groups:
        for b in g:
            same[b, list(g)] = True
    X = (F * ~same).sum(1)
    assert (X > 0).all()  # every block is coupled to another group: the test has teeth

    K = 300
    runner = ProbeRunner(model, resolve_blocks(model), make_loss_spec(crit, data), seed=4, kind="rademacher",
                         hvp="reverse", progress=False)
    seg = Segment(plan, L, torch.device("cpu"), None, 0)
    sink = SampleSink(K, resolve_blocks(model), plan, single_batch=True)
    runner.run(plan, range(K), [sink])
    seg.add(sink)
    per_probe = sink.energy - sink.own
    se = per_probe.std(0) / math.sqrt(K)
    assert torch.allclose(seg.cross_energy(), per_probe.mean(0))
    z = (seg.cross_energy() - X).abs() / se
    assert (z < 4.5).all(), z.tolist()  # 4.5 SE: a false alarm over 6 blocks has odds ~4e-5
    # and V_plan + X reproduces the exact global variance
    Vp = exact_variance(H, layout, plan)["variance"]
    Vg = exact_variance(H, layout, "global")["variance"]
    assert torch.allclose(Vp + X, Vg, rtol=1e-10)


class _Seg:
    """A stand-in segment with given measured per-probe variances and cross energies."""

    def __init__(self, plan, V, X):
        self.plan, self._V, self._X = plan, V, X

    def variances(self):
        v = torch.cat([self._V, self._V.sum().reshape(1)])
        return v, v, None

    def cross_energy(self):
        return self._X


def test_auto_revalidation_leaves_a_plan_for_one_measured_to_be_cheaper():
    from types import SimpleNamespace

    from hutchtrace.estimate.plan_choice import SWITCH_MARGIN
    from hutchtrace.estimate.plan_choice import revalidate as _revalidate

    L = 4
    colored = ProbePlan("colored", ((0, 1), (2, 3)))
    mean = torch.tensor([1.0, -1.0, 2.0, 0.5, 2.5], dtype=torch.float64)
    comb = {"mean": mean, "var_mean": torch.full((5,), 1e-6, dtype=torch.float64)}
    pilot = SimpleNamespace(v0=torch.full((L,), 1.0, dtype=torch.float64))
    V = torch.full((L,), 1.0, dtype=torch.float64)
    # weakly coupled across groups: global costs ~1/2 of the colored plan (G = 2)
    weak = _Seg(colored, V, torch.full((L,), 0.01, dtype=torch.float64))
    plan, costs = _revalidate(weak, comb, pilot, 0.05, None, L, {"colored"})
    assert plan is not None and plan.name == "global"
    assert costs["measured_global"] < SWITCH_MARGIN * costs["measured_plan"]
    # strongly coupled: stay (isolated costs 4/2 of colored, global 101x per probe)
    strong = _Seg(colored, V, torch.full((L,), 100.0, dtype=torch.float64))
    plan, costs = _revalidate(strong, comb, pilot, 0.05, None, L, {"colored"})
    assert plan is None and costs["measured_global"] > costs["measured_plan"]
    # each scheme at most once, and no global candidate without valid row energies
    assert _revalidate(weak, comb, pilot, 0.05, None, L, {"colored", "global"})[0] is None
    assert _revalidate(weak, comb, pilot, 0.05, None, L, {"colored"}, energy_ok=False)[0] is None
    # from isolated, a global switch needs the cross energies to be small against L x V
    iso = _Seg(hutchtrace.estimate.probing.isolated_plan(L), V, torch.full((L,), 0.5, dtype=torch.float64))
    assert _revalidate(iso, comb, pilot, 0.05, None, L, {"isolated"})[0].name == "global"
    # a tie does not switch (a switch restarts the plan's variance estimate); cheaper does
    tie = _Seg(colored, V, torch.full((L,), 1.0, dtype=torch.float64))
    plan, costs = _revalidate(tie, comb, pilot, 0.05, None, L, {"colored"})
    assert plan is None and costs["measured_global"] == costs["measured_plan"]
    near = _Seg(colored, V, torch.full((L,), 0.8, dtype=torch.float64))
    assert _revalidate(near, comb, pilot, 0.05, None, L, {"colored"})[0].name == "global"


def test_auto_switches_to_global_on_decoupled_blocks():
    """Independent blocks: a global probe has the isolated variance at 1/L of the cost."""
    gen = torch.Generator().manual_seed(3)
    sizes = (5, 5, 5)
    blocks = []
    for n in sizes:
        B = torch.randn(n, n, generator=gen, dtype=torch.float64)
        blocks.append(B @ B.T / n + torch.eye(n, dtype=torch.float64))
    A = torch.block_diag(*blocks)
    model = Quadratic(A, sizes)
    res = hutchtrace.block_traces(model, lambda m: m(), K=16, seed=1, probing="auto", rtol=0.05,
                                  progress=False)
    assert res.meta["converged"] and res.meta["probing"] == "global", res.meta["segments"]
    exact = torch.stack([torch.diagonal(b).sum() for b in blocks])
    assert ((res.means - exact).abs() <= 4 * res.ses).all()
