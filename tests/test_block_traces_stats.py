"""The estimator as a statistic: convergence to the exact trace and CI coverage."""

import numpy as np
import pytest
import torch
from scipy import stats

import hutchtrace
from hutchtrace.exact import exact_block_traces, exact_hessian
from helpers import make_case


@pytest.fixture(scope="module")
def mlp_exact():
    model, crit, data = make_case("mlp")
    H, layout = exact_hessian(model, crit, data=data)
    return model, crit, data, exact_block_traces(H, layout)


def test_convergence_K4000_within_4_standard_errors(mlp_exact):
    model, crit, data, exact = mlp_exact
    res = hutchtrace.block_traces(model, crit, K=4000, data=data, seed=12345, hvp="reverse-batched")
    z = (res.means - exact) / res.ses
    assert (z.abs() < 4).all(), f"z-scores {z.tolist()}"
    tot = sum(exact)
    assert abs(res.total.mean - float(tot)) < 4 * res.total.se


def test_error_shrinks_at_the_root_K_rate(mlp_exact):
    """Mean squared error over seeds at K and 16K: the ratio must be ~16 (1/sqrt(K) rate)."""
    model, crit, data, exact = mlp_exact
    res = hutchtrace.block_traces(model, crit, K=3200, data=data, seed=99, hvp="reverse-batched")
    s = res.samples
    for K in (10, 160):
        m = s[: (3200 // K) * K].reshape(-1, K, s.shape[1]).mean(1)  # independent means
        mse = ((m - exact) ** 2).mean(0)
        if K == 10:
            mse10 = mse
        else:
            ratio = mse10 / mse
    # each MSE estimate has relative sd sqrt(2/n) (chi-square); with n=320 and n=20 means the
    # log-ratio has sd ~ sqrt(2/320 + 2/20) = 0.33; accept 16 x exp(+-3 sd)
    lo, hi = 16 * np.exp(-3 * 0.33), 16 * np.exp(3 * 0.33)
    assert ((ratio > lo) & (ratio < hi)).all(), f"MSE ratios {ratio.tolist()}"


def test_ci_coverage_over_200_seeds(mlp_exact):
    model, crit, data, exact = mlp_exact
    covered = torch.zeros(len(exact))
    for seed in range(200):
        res = hutchtrace.block_traces(model, crit, K=10, data=data, seed=seed, hvp="reverse-batched")
        lo = torch.tensor([b.ci[0] for b in res.blocks])
        hi = torch.tensor([b.ci[1] for b in res.blocks])
        covered += ((lo <= exact) & (exact <= hi)).double()
    rate = covered / 200
    assert ((rate >= 0.90) & (rate <= 0.99)).all(), f"coverage {rate.tolist()}"
    # and jointly consistent with a nominal 95 % (binomial, all blocks pooled; t-intervals
    # undercover slightly for non-normal samples: SPEC section 4 measured 94.2-95.4 %)
    pooled = int(covered.sum())
    p = stats.binomtest(pooled, 200 * len(exact), 0.95).pvalue
    assert p > 1e-4 or pooled / (200 * len(exact)) > 0.92


def test_total_standard_error_uses_per_probe_totals(mlp_exact):
    model, crit, data, _ = mlp_exact
    res = hutchtrace.block_traces(model, crit, K=50, data=data, seed=3, hvp="reverse-batched", variance="sample")
    tot = res.samples.sum(1)
    assert abs(res.total.se - float(tot.std() / np.sqrt(50))) < 1e-10
    independent = float(torch.sqrt((res.ses**2).sum()))
    # Cov(t_b, t_c) = ||H_bc||_F^2 >= 0, so assuming independence understates the SE
    assert res.total.se > independent


def test_standard_error_matches_sample_statistics(mlp_exact):
    model, crit, data, _ = mlp_exact
    res = hutchtrace.block_traces(model, crit, K=12, data=data, seed=4, hvp="reverse", variance="sample")
    s = res.samples
    assert torch.allclose(res.means, s.mean(0), rtol=1e-12)
    assert torch.allclose(res.ses, s.std(0) / np.sqrt(12), rtol=1e-10)
    q = stats.t.ppf(0.975, 11)
    b = res.blocks[0]
    assert b.ci[0] == pytest.approx(b.mean - q * b.se) and b.ci[1] == pytest.approx(b.mean + q * b.se)
