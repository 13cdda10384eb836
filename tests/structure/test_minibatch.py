"""Probe vs mini-batch variance and the critical probe count K* (docs/maths.md section 3)."""

import math

import pytest
import torch
from torch import nn

from hutchtrace.estimate.variance import exact_variance
from hutchtrace.structure.minibatch import anova, variance_decomposition


@pytest.mark.slow
def test_anova_components_are_unbiased_in_a_two_level_simulation():
    """t_mk = tau_m + e_mk with Var tau = 4, Var e = 20: K* = 5 (docs/maths.md section 3)."""
    gen = torch.Generator().manual_seed(0)
    reps, M, K = 4000, 30, 4
    tau = torch.randn(reps, M, 1, generator=gen, dtype=torch.float64) * 2.0
    e = torch.randn(reps, M, K, generator=gen, dtype=torch.float64) * math.sqrt(20.0)
    sw, vb, ks = [], [], []
    for r in range(reps):
        a = anova((tau[r] + e[r]).unsqueeze(-1))
        sw.append(float(a["s_w2"][0]))
        vb.append(float(a["v_b"][0]))
        ks.append(float(a["k_star"][0]))
    sw, vb, ks = map(lambda x: torch.tensor(x, dtype=torch.float64), (sw, vb, ks))
    # unbiased numerator and denominator, within 4 Monte-Carlo standard errors
    assert abs(float(sw.mean()) - 20.0) < 4 * float(sw.std()) / math.sqrt(reps)
    assert abs(float(vb.mean()) - 4.0) < 4 * float(vb.std()) / math.sqrt(reps)
    # the ratio is consistent, not unbiased: its median sits near K* = 5 (docs/maths.md section 3: 5.2-5.3)
    med = float(ks[torch.isfinite(ks)].median())
    assert 4.0 < med < 6.5, med


class QuadraticBatches(nn.Module):
    """loss_B = 1/2 theta^T A_B theta: the batch Hessian is the batch's matrix, exactly."""

    def __init__(self, sizes=(5, 4)):
        super().__init__()
        self.a = nn.Parameter(torch.zeros(sizes[0], dtype=torch.float64))
        self.b = nn.Parameter(torch.zeros(sizes[1], dtype=torch.float64))

    def forward(self, A):  # A: (1, P, P)
        th = torch.cat([self.a, self.b])
        return 0.5 * th @ A[0] @ th


def _batches(M, sizes=(5, 4), s=0.5, seed=0):
    P = sum(sizes)
    gen = torch.Generator().manual_seed(seed)
    B0 = torch.randn(P, P, generator=gen, dtype=torch.float64)
    A0 = (B0 + B0.T) / 2 + torch.eye(P, dtype=torch.float64) * 2
    out = []
    for _ in range(M):
        G = torch.randn(P, P, generator=gen, dtype=torch.float64) * s
        D = torch.triu(G) + torch.triu(G, 1).T  # symmetric, every entry N(0, s^2)
        out.append(((A0 + D).unsqueeze(0), torch.zeros(1)))
    return A0, out


def test_variance_decomposition_recovers_known_components():
    sizes, s = (5, 4), 0.5
    A0, data = _batches(200, sizes, s)
    P = sum(sizes)
    model = QuadraticBatches(sizes)
    vd = variance_decomposition(model, lambda out, y: out, data, K=4, n_batches=200, seed=1, bootstrap=200,
                                probing="global", hvp="reverse-batched")
    # exact: tau_b = tr(A0 + D)_bb -> Var_B tau_b = n_b s^2; E sigma^2 = sigma^2(A0) + E[the D part]
    ex0 = exact_variance(A0, list(sizes), "global")
    for b, n in enumerate(sizes):
        var_tau = n * s**2
        # Rademacher: Var t_b = 2 sum_{i != j in b} A_ij^2 + sum_{i in b, j not in b} A_ij^2; each entry
        # of D adds s^2 in expectation
        e_sigma2 = float(ex0["variance"][b]) + s**2 * (2 * n * (n - 1) + n * (P - n))
        blk = vd.blocks[b]
        assert abs(blk.probe_variance - e_sigma2) < 4 * blk.probe_variance_se, (blk, e_sigma2)
        assert abs(blk.batch_variance - var_tau) < 4 * blk.batch_variance_se, (blk, var_tau)
        k_star = e_sigma2 / var_tau
        lo, hi = blk.k_star_ci
        assert lo * 0.8 <= k_star <= hi * 1.25, (k_star, blk.k_star_ci)
        assert blk.recommended_K == (math.ceil(blk.k_star), math.ceil(3 * blk.k_star))
    assert vd.samples.shape == (200, 4, 3)
    assert "K*" in vd.table()


def test_variance_decomposition_bad_input():
    model = QuadraticBatches()
    _, data = _batches(5)
    with pytest.raises(ValueError, match="K must be"):
        variance_decomposition(model, lambda o, y: o, data, K=1, n_batches=3)
    with pytest.raises(ValueError, match="n_batches"):
        variance_decomposition(model, lambda o, y: o, data, K=2, n_batches=1)
    with pytest.raises(Exception, match="fewer than n_batches"):
        variance_decomposition(model, lambda o, y: o, data, K=2, n_batches=10, bootstrap=0)
