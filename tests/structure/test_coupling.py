"""block_coupling: ||M_bc||_F^2, resonance and coupling fraction against dense H and G."""

import math
from types import SimpleNamespace

import pytest
import torch
from curvature_helpers import DeepMLP, block_frobenius2, exact_ggn, rademacher_var_of_sq, var_and_se
from helpers import assert_same_snapshot, make_case, probe_matrix, snapshot
from torch import nn

from hutchtrace.backbones.exact import block_slices, exact_hessian
from hutchtrace.core.errors import LossError
from hutchtrace.core.state import PreservedState
from hutchtrace.estimate.engine import ProbeRunner
from hutchtrace.estimate.probing import global_plan
from hutchtrace.problem.blocks import resolve_blocks
from hutchtrace.problem.loss import make_loss_spec
from hutchtrace.structure.coupling import (
    Coupling,
    GramSink,
    block_coupling,
    coupling_fraction,
    estimate_coupling_matrix,
    resonance,
    ustat_from_gram,
)
from hutchtrace.zoo import MeanSquared

SIZES = dict(n=16, sizes=(6, 10, 10, 4))


@pytest.fixture(scope="module")
def mlp():
    model, crit, data = make_case("mlp", **SIZES)
    H, layout = exact_hessian(model, crit, data=data)
    G, _ = exact_ggn(model, crit, data)
    return SimpleNamespace(model=model, crit=crit, data=data, H=H, G=G, layout=layout, sl=block_slices(layout),
                           FH=block_frobenius2(H, layout), FG=block_frobenius2(G, layout))


# ---------------------------------------------------------------------------- block mode
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_block_mode_samples_are_exact(mlp, curvature):
    """Sample k of F_bc is (||(M z^(k,c))_b||^2 + ||(M z^(k,b))_c||^2) / 2 with z^(k,c) the probe
    z^(k) restricted to block c."""
    M = mlp.H if curvature == "hessian" else mlp.G
    K = 3
    cp = block_coupling(mlp.model, mlp.crit, K=K, data=mlp.data, curvature=curvature, seed=8)
    Z = probe_matrix(mlp.layout, 8, K)
    L = len(mlp.sl)
    raw = torch.zeros(K, L, L, dtype=torch.float64)
    for c, sc in enumerate(mlp.sl):
        Zc = torch.zeros_like(Z)
        Zc[:, sc] = Z[:, sc]
        W = Zc @ M
        for b, sb in enumerate(mlp.sl):
            raw[:, b, c] = (W[:, sb] ** 2).sum(1)
    expected = 0.5 * (raw + raw.transpose(1, 2))
    assert float((cp.samples - expected).abs().max()) <= 1e-10 * float(expected.abs().max())
    assert cp.meta["products"] == K * L and cp.mode == "block" and cp.curvature == curvature


@pytest.fixture(scope="module")
def block_run(mlp):
    return block_coupling(mlp.model, mlp.crit, K=400, data=mlp.data, seed=21)


def test_block_mode_converges_for_all_pairs(mlp, block_run):
    cp = block_run
    z = (cp.F - mlp.FH) / cp.F_se
    assert float(z.abs().max()) < 4, z
    assert torch.allclose(cp.F, cp.F.T)
    rho = mlp.FH.sum(1)
    assert ((cp.rho - rho).abs() < 4 * cp.rho_se).all()
    C = coupling_fraction(mlp.FH)
    assert ((cp.C - C).abs() < 4 * cp.C_se).all()
    R = resonance(mlp.FH)
    off = ~torch.eye(len(mlp.sl), dtype=torch.bool)
    assert ((cp.R - R).abs()[off] < 4 * cp.R_se[off]).all()
    assert torch.allclose(torch.diagonal(cp.R), torch.ones(len(mlp.sl), dtype=torch.float64))
    assert torch.allclose(cp.X, cp.rho - torch.diagonal(cp.F))


def test_block_mode_variance_is_the_Q2_formula(mlp, block_run):
    """Var of the symmetrised sample = (Var||H_bc z_c||^2 + Var||H_cb z_b||^2) / 4 (the two come from
    disjoint probe supports, so they are independent); Var||Az||^2 = 2||A^T A||_F^2 - 2 sum (A^T A)_jj^2."""
    for b in range(len(mlp.sl)):
        for c in range(len(mlp.sl)):
            A = mlp.H[mlp.sl[b]][:, mlp.sl[c]]
            if b == c:
                pred = rademacher_var_of_sq(A)
            else:
                pred = (rademacher_var_of_sq(A) + rademacher_var_of_sq(A.T)) / 4
            meas, mc = var_and_se(block_run.samples[:, b, c])
            assert abs(meas - pred) <= 4 * mc + 1e-14, (b, c, meas, pred, mc)


def test_block_mode_error_shrinks_at_the_root_K_rate(mlp, block_run):
    """MSE of F^ (all pairs pooled per pair) at K = 5 vs 40: ratio 8; 80 and 10 groups give a
    log-ratio sd of sqrt(2/80 + 2/10) = 0.47, so the 3-sd band is 8 x exp(+-1.42)."""
    s = block_run.samples
    mse = {}
    for K in (5, 40):
        m = s[: (400 // K) * K].reshape(-1, K, *s.shape[1:]).mean(1)
        mse[K] = ((m - mlp.FH) ** 2).mean(0)
    ratio = mse[5] / mse[40]
    sd = math.sqrt(2 / 80 + 2 / 10)
    assert ((ratio > 8 * math.exp(-3 * sd)) & (ratio < 8 * math.exp(3 * sd))).all(), ratio


def test_resonance_on_ggn_is_at_most_one_and_estimated(mlp):
    RG = resonance(mlp.FG)
    assert float(RG.max()) <= 1 + 1e-12  # G is PSD
    cp = block_coupling(mlp.model, mlp.crit, K=200, data=mlp.data, curvature="ggn", seed=3)
    off = ~torch.eye(len(mlp.sl), dtype=torch.bool)
    assert ((cp.R - RG).abs()[off] < 4 * cp.R_se[off]).all()
    assert ((cp.F - mlp.FG).abs() < 4 * cp.F_se).all()


def test_resonance_of_an_indefinite_hessian_exceeds_one_and_is_not_clipped():
    """Two-layer linear net near its saddle at 0 (docs/maths.md section 6b): R_(W1,W2) >> 1 for H."""
    g = torch.Generator().manual_seed(3)
    net = nn.Sequential(nn.Linear(6, 5, bias=False), nn.Linear(5, 4, bias=False)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.01 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.randn(64, 6, generator=g, dtype=torch.float64)
    y = x @ torch.randn(6, 4, generator=g, dtype=torch.float64)
    crit = MeanSquared()
    H, layout = exact_hessian(net, crit, data=(x, y))
    R_exact = float(resonance(block_frobenius2(H, layout))[0, 1])
    assert R_exact > 100
    cp = block_coupling(net, crit, K=20, data=(x, y), seed=0)
    assert cp.R[0, 1] > 100 and abs(float(cp.R[0, 1]) - R_exact) < 4 * float(cp.R_se[0, 1])


# ---------------------------------------------------------------------------- row sums and U-statistic
def test_rowsum_mode(mlp):
    K = 300
    cp = block_coupling(mlp.model, mlp.crit, K=K, data=mlp.data, mode="rowsum", seed=13)
    Z = probe_matrix(mlp.layout, 13, K)
    W = Z @ mlp.H
    per_probe = torch.stack([(W[:, s] ** 2).sum(1) for s in mlp.sl], 1)
    assert float((cp.samples - per_probe).abs().max()) <= 1e-10 * float(per_probe.abs().max())
    rho = mlp.FH.sum(1)
    assert ((cp.rho - rho).abs() < 4 * cp.rho_se).all()
    off = ~torch.eye(len(mlp.sl), dtype=torch.bool)
    assert torch.isnan(cp.F[off]).all() and torch.isnan(cp.R[off]).all()
    d = torch.diagonal(mlp.FH)
    assert ((torch.diagonal(cp.F) - d).abs() < 4 * torch.diagonal(cp.F_se)).all()
    assert cp.meta["products"] == K


def test_ustat_mode_equals_the_formula_on_the_same_probes(mlp):
    K = 12
    cp = block_coupling(mlp.model, mlp.crit, K=K, data=mlp.data, mode="ustat", seed=17)
    Z = probe_matrix(mlp.layout, 17, K)
    W = Z @ mlp.H
    L = len(mlp.sl)
    Mg = [W[:, s] @ Z[:, s].T for s in mlp.sl]  # Mg_b[k, l] = w_b^(k) . z_b^(l)
    S = torch.zeros(L, L, dtype=torch.float64)
    for b in range(L):
        for c in range(L):
            S[b, c] = ((Mg[b] * Mg[c].T).sum() - (torch.diagonal(Mg[b]) * torch.diagonal(Mg[c])).sum()) / (K * (K - 1))
    assert torch.allclose(cp.F, S, rtol=0, atol=1e-10 * float(S.abs().max()))
    assert cp.meta["products"] == K


def test_ustat_is_unbiased_and_its_variance_estimate_too(mlp):
    """Over 500 independent replicates of K = 8 global probes (dense products; the per-probe
    products are exact by the test above): mean of S within 4 SE of ||H_bc||_F^2, and the mean
    of the unbiased variance estimate within 4 combined MC SEs of the empirical variance."""
    K, reps = 8, 500
    Z = probe_matrix(mlp.layout, 99, K * reps)
    W = Z @ mlp.H
    S, V = [], []
    for r in range(reps):
        z, w = Z[r * K:(r + 1) * K], W[r * K:(r + 1) * K]
        u = ustat_from_gram(torch.stack([w[:, s] @ z[:, s].T for s in mlp.sl]), jackknife=False)
        S.append(u.estimate)
        V.append(u.variance)
        assert torch.equal(u.se, u.variance.clamp_min(0).sqrt())
    S, V = torch.stack(S), torch.stack(V)
    z = (S.mean(0) - mlp.FH) / (S.std(0) / math.sqrt(reps))
    assert float(z.abs().max()) < 4
    L = len(mlp.sl)
    for b in range(L):
        for c in range(L):
            emp, emp_mc = var_and_se(S[:, b, c])
            mc = math.sqrt(emp_mc**2 + float(V[:, b, c].var()) / reps)
            assert abs(float(V[:, b, c].mean()) - emp) <= 4 * mc, (b, c)


def test_ustat_variance_formula_brute_force():
    """variance = S^2 - mean over ordered distinct quadruples of phi_ij phi_kl (K = 5, brute force)."""
    g = torch.Generator().manual_seed(1)
    K = 5
    G = torch.randn(2, K, K, generator=g, dtype=torch.float64)
    u = ustat_from_gram(G)
    for b in range(2):
        for c in range(2):
            a = G[b] * G[c].T  # a_kl = G_b[k,l] G_c[l,k]
            phi = 0.5 * (a + a.T)
            pairs = [(i, j) for i in range(K) for j in range(K) if i != j]
            S = sum(float(phi[i, j]) for i, j in pairs) / len(pairs)
            quads = [float(phi[i, j] * phi[k, m]) for i, j in pairs for k, m in pairs if len({i, j, k, m}) == 4]
            assert math.isclose(float(u.estimate[b, c]), S, rel_tol=1e-12)
            assert math.isclose(float(u.variance[b, c]), S * S - sum(quads) / len(quads), rel_tol=1e-10, abs_tol=1e-12)


def test_distinct_quadruple_identity_brute_force():
    g = torch.Generator().manual_seed(0)
    K = 6
    phi = torch.randn(K, K, generator=g, dtype=torch.float64)
    phi = phi + phi.T
    phi.fill_diagonal_(0)
    brute = sum(float(phi[i, j] * phi[k, m]) for i in range(K) for j in range(K) for k in range(K) for m in range(K)
                if len({i, j, k, m}) == 4)
    r = phi.sum(1)
    ident = float(phi.sum() ** 2 - 4 * (r**2).sum() + 2 * (phi**2).sum())
    assert math.isclose(brute, ident, rel_tol=1e-12)


def test_gram_sink_gives_the_ustat_for_free_inside_a_probe_runner(mlp):
    """The zero-extra-HVP path: GramSink on a global-plan ProbeRunner run (what block_traces
    runs) reproduces mode='ustat' on the same probes."""
    K = 10
    layout = resolve_blocks(mlp.model)
    spec = make_loss_spec(mlp.crit, mlp.data)
    with PreservedState(mlp.model):
        runner = ProbeRunner(mlp.model, layout, spec, seed=5, hvp="reverse-batched", probe_batch=4)
        sink = GramSink(layout, 5, "rademacher", K, chunk=3)
        runner.run(global_plan(layout.num_blocks), range(K), [sink])
    u = sink.estimate()
    cp = block_coupling(mlp.model, mlp.crit, K=K, data=mlp.data, mode="ustat", seed=5)
    assert torch.allclose(u.estimate, cp.F, rtol=0, atol=1e-10 * float(u.estimate.abs().max()))
    assert torch.allclose(u.se, cp.F_se, rtol=1e-8, atol=1e-12 * float(u.estimate.abs().max()))


def test_dataset_mode_matches_the_dense_dataset_mean():
    model, crit, (x, y) = make_case("mlp", **SIZES)
    batches = [(x[:7], y[:7]), (x[7:], y[7:])]
    H, layout = exact_hessian(model, crit, data=batches)
    K = 6
    cp = block_coupling(model, crit, K=K, data=batches, mode="ustat", seed=2)
    Z = probe_matrix(layout, 2, K)
    W = Z @ H
    sl = block_slices(layout)
    S = ustat_from_gram(torch.stack([W[:, s] @ Z[:, s].T for s in sl])).estimate
    assert torch.allclose(cp.F, S, rtol=0, atol=1e-10 * float(S.abs().max()))
    rho = torch.stack([(W[:, s] ** 2).sum(1) for s in sl], 1)
    assert torch.allclose(cp.samples, rho, rtol=0, atol=1e-10 * float(rho.max()))


# ---------------------------------------------------------------------------- seed claim: depth
def _depth_rows(skip, seeds=(0, 1, 2, 3)):
    rows = []
    for seed in seeds:
        model = DeepMLP(depth=12, skip=skip, seed=seed)
        g = torch.Generator().manual_seed(100 + seed)
        x = torch.randn(32, 8, generator=g, dtype=torch.float64)
        y = torch.randn(32, 4, generator=g, dtype=torch.float64)
        cp = block_coupling(model, MeanSquared(), K=6, data=(x, y), blocks="module", curvature="ggn", seed=seed)
        i = cp.names.index("hid.0")
        rows.append(cp.R[i, i:i + 12])  # R on G between hidden layer 1 and hidden layer l = 1..12
    return torch.stack(rows).mean(0), cp, model, (x, y)


def test_resonance_decays_with_depth_without_skips_and_persists_with_them():
    """Seed claim (ii) at small scale: 12 hidden ReLU layers (width 16), MSE, R on the GGN
    between layer 1 and layer l, averaged over 4 initialisations. The estimator is checked
    against the dense GGN on one of the nets."""
    plain, *_ = _depth_rows(0.0)
    skip, cp, model, data = _depth_rows(0.5)
    # plain: decays steadily; the far layer keeps less than half of the near layer's resonance
    assert plain[1:4].mean() > plain[4:8].mean() > plain[8:12].mean()
    assert plain[11] < 0.5 * plain[1]
    # skip connections: resonance persists across the whole depth
    assert skip[11] > 0.65 and skip[11] > 0.75 * skip[1]
    assert skip[8:12].mean() > plain[8:12].mean() + 0.25
    # the estimates are unbiased for the dense quantities (last net built above)
    G, layout = exact_ggn(model, MeanSquared(), data, blocks="module")
    R = resonance(block_frobenius2(G, layout))
    assert float(R.max()) <= 1 + 1e-12
    F = block_frobenius2(G, layout)
    assert ((cp.F - F).abs() <= 5 * cp.F_se + 1e-12 * F.max()).all()  # t_5 quantiles: 4 SE is too tight at K=6


# ---------------------------------------------------------------------------- contract
def test_estimate_coupling_matrix_is_the_block_mode_pilot(mlp):
    F, se = estimate_coupling_matrix(mlp.model, mlp.crit, data=mlp.data, seed=4)
    cp = block_coupling(mlp.model, mlp.crit, K=2, data=mlp.data, seed=4)
    assert torch.equal(F, cp.F) and torch.equal(se, cp.F_se)
    assert F.dtype == torch.float64 and F.shape == (len(mlp.sl),) * 2 and torch.allclose(F, F.T)


def test_result_api(mlp):
    cp = block_coupling(mlp.model, mlp.crit, K=3, data=mlp.data, seed=1)
    assert isinstance(cp, Coupling) and cp.K == 3
    assert cp.resonance("0.weight", "2.weight") == float(cp.R[0, 2])
    text = cp.table()
    assert "2.bias" in text and "mode=block" in text
    df = cp.to_dataframe()
    assert len(df) == len(mlp.sl) ** 2
    assert float(df[(df.block == "0.weight") & (df.other == "2.weight")].F.iloc[0]) == float(cp.F[0, 2])


def test_bad_arguments(mlp):
    with pytest.raises(ValueError, match="mode"):
        block_coupling(mlp.model, mlp.crit, K=2, data=mlp.data, mode="masked")
    with pytest.raises(ValueError, match="curvature"):
        block_coupling(mlp.model, mlp.crit, K=2, data=mlp.data, curvature="fisher")
    with pytest.raises(ValueError, match="K >= 2"):
        block_coupling(mlp.model, mlp.crit, K=1, data=mlp.data, mode="ustat")
    x, y = mlp.data
    with pytest.raises(LossError, match="curvature='ggn' needs a criterion"):
        block_coupling(mlp.model, lambda m: mlp.crit(m(x), y), K=2, curvature="ggn")


@pytest.mark.parametrize("mode", ["block", "ustat"])
def test_no_side_effects(mode):
    model, crit, data = make_case("cnn_bn")
    crit(model(data[0]), data[1]).backward()
    torch.manual_seed(11)
    before = snapshot(model)
    block_coupling(model, crit, K=3, data=data, mode=mode, seed=0)
    assert_same_snapshot(before, snapshot(model))


def test_plot_coupling_heat_map(mlp):
    mpl = pytest.importorskip("matplotlib")
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    from hutchtrace.monitor.plots import plot_coupling

    cp = block_coupling(mlp.model, mlp.crit, K=2, data=mlp.data, seed=0)
    for quantity, expected in [("R", cp.R), ("F", torch.log10(cp.F)), ("share", cp.F / cp.rho[:, None])]:
        ax = plot_coupling(cp, quantity)
        img = ax.get_images()[0].get_array()
        assert torch.allclose(torch.as_tensor(img.data, dtype=torch.float64), expected)
        assert [t.get_text() for t in ax.get_yticklabels()] == cp.names
        plt.close(ax.figure)
    with pytest.raises(ValueError, match="quantity"):
        plot_coupling(cp, "C")
