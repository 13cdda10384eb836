"""Probing schemes and adaptive stopping: the least time to trustworthy error bars."""

import math
import warnings

import pytest
import torch
from torch import nn

import hutchtrace
from hutchtrace.coloring import color_blocks, predicted_variance
from hutchtrace.exact import exact_hessian
from hutchtrace.probing import ProbePlan
from hutchtrace.variance import block_energies, exact_variance
from helpers import make_case

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
    assert pilot == {"probing": "isolated", "groups": 6, "K": 8, "first_probe": 0}
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


def test_isolated_single_element_blocks_are_exact():
    model, crit, data = make_case("mlp")
    H, layout = exact_hessian(model, crit, data=data, blocks={"one": [model[4].bias]})
    # a 1-element block probed alone: z^2 H_ii = H_ii exactly for Rademacher
    res = hutchtrace.block_traces(model, crit, K=3, data=data, seed=0, probing="isolated",
                                  blocks={"a": [model[0]], "b": [model[2]], "c": [model[4].weight]})
    assert res.meta["probing"] == "isolated" and res.meta["groups"] == 3
    assert float(H.trace()) > 0
