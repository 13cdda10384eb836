"""decompose: H = G + T per block from common probes, against dense H, G, T = H - G.

Variances are exact for Rademacher probes: for t = z^T A z with symmetric A,
Var t = 2||A||_F^2 - 2 sum_i A_ii^2 and Cov(z^T A z, z^T B z) = 2<A, B>_F - 2 sum_i A_ii B_ii.
The per-block sample z_b^T (Mz)_b is z^T A_b z with A_b = (P_b M + M P_b)/2 (P_b: block mask).
"""

import math
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from curvature_helpers import InputAsParameter, exact_ggn, var_and_se
from helpers import assert_same_snapshot, make_case, probe_matrix, snapshot
from torch import nn

import hutchtrace
from hutchtrace.backbones.exact import block_slices, exact_hessian
from hutchtrace.core.errors import LossError, NonFiniteWarning
from hutchtrace.structure.decompose import Decomposition, decompose, ratio_of_means

SIZES = dict(n=16, sizes=(6, 10, 10, 4))


def sym_block(M, idx):
    P = torch.zeros(M.shape[0], dtype=M.dtype)
    P[idx] = 1
    return 0.5 * (P[:, None] * M + M * P[None, :])


def rad_cov(A, B):
    return float(2 * (A * B).sum() - 2 * (torch.diagonal(A) * torch.diagonal(B)).sum())


def exact_case(act=nn.Tanh, blocks="param"):
    model, crit, data = make_case("mlp", act=act, **SIZES)
    H, layout = exact_hessian(model, crit, data=data, blocks=blocks)
    G, _ = exact_ggn(model, crit, data, blocks=blocks)
    return model, crit, data, H, G, layout


@pytest.fixture(scope="module")
def tanh():
    model, crit, data, H, G, layout = exact_case()
    dec = decompose(model, crit, K=1280, data=data, seed=2024)
    T = H - G
    sl = block_slices(layout)
    # blocks whose T row vanishes structurally (the output bias: df/db_L = I is constant)
    zero_row = [float(T[s].norm()) <= 1e-12 * float(H.norm()) for s in sl]
    return SimpleNamespace(model=model, crit=crit, data=data, H=H, G=G, T=T, layout=layout, dec=dec, sl=sl,
                           zero_row=zero_row)


# ---------------------------------------------------------------------------- exact per probe
def test_per_probe_samples_and_row_energies_are_exact(tanh):
    d = decompose(tanh.model, tanh.crit, K=5, data=tanh.data, seed=9)
    Z = probe_matrix(tanh.layout, 9, 5)
    for M, res, en in [(tanh.H, d.hessian, d.energy["hessian"]), (tanh.G, d.ggn, d.energy["ggn"]),
                       (tanh.T, d.tensor, d.energy["tensor"])]:
        W = Z @ M
        dots = torch.stack([(Z[:, s] * W[:, s]).sum(1) for s in tanh.sl], 1)
        sq = torch.stack([(W[:, s] ** 2).sum(1) for s in tanh.sl], 1)
        assert float((res.samples - dots).abs().max()) <= 1e-10 * float(dots.abs().max())
        assert float((en - sq).abs().max()) <= 1e-10 * float(sq.abs().max())
    assert torch.equal(d.tensor.samples, d.tensor.samples)  # no NaN
    assert d.meta["products"] == {"hessian": 5, "ggn": 5}


def test_hessian_part_uses_the_probes_of_block_traces(tanh):
    d = decompose(tanh.model, tanh.crit, K=4, data=tanh.data, seed=31)
    bt = hutchtrace.block_traces(tanh.model, tanh.crit, K=4, data=tanh.data, seed=31, hvp="reverse")
    assert torch.allclose(d.hessian.samples, bt.samples, rtol=0, atol=1e-12 * float(bt.samples.abs().max()))


def test_dataset_mode_matches_the_dense_dataset_mean():
    model, crit, (x, y) = make_case("mlp", **SIZES)
    batches = [(x[:6], y[:6]), (x[6:], y[6:])]
    H, layout = exact_hessian(model, crit, data=batches)
    G, _ = exact_ggn(model, crit, batches)
    d = decompose(model, crit, K=3, data=batches, seed=4)
    Z = probe_matrix(layout, 4, 3)
    sl = block_slices(layout)
    for M, res, en in [(H, d.hessian, d.energy["hessian"]), (G, d.ggn, d.energy["ggn"])]:
        W = Z @ M
        dots = torch.stack([(Z[:, s] * W[:, s]).sum(1) for s in sl], 1)
        sq = torch.stack([(W[:, s] ** 2).sum(1) for s in sl], 1)  # norms of the SUMMED products
        assert float((res.samples - dots).abs().max()) <= 1e-10 * float(dots.abs().max())
        assert float((en - sq).abs().max()) <= 1e-10 * float(sq.abs().max())
    assert d.meta["n_batches"] == 2


# ---------------------------------------------------------------------------- statistics
def test_traces_converge_within_4_standard_errors(tanh):
    assert tanh.zero_row == [False] * 5 + [True]  # only the output bias
    for M, res in [(tanh.H, tanh.dec.hessian), (tanh.G, tanh.dec.ggn), (tanh.T, tanh.dec.tensor)]:
        exact = torch.stack([torch.diagonal(M)[s].sum() for s in tanh.sl])
        for b in range(len(tanh.sl)):
            if M is tanh.T and tanh.zero_row[b]:
                assert abs(float(res.means[b])) <= 1e-12 * float(tanh.H.abs().max())
                continue
            z = (float(res.means[b]) - float(exact[b])) / float(res.ses[b])
            assert abs(z) < 4, (b, z)


def test_paired_difference_variance_is_theorem_1_1_on_T(tanh):
    """Var(h_b - g_b) = Var of the block-Hutchinson sample of T (common random numbers), and the
    reported SE of tr T_bb is the SE of the paired differences."""
    K = tanh.dec.K
    for b, s in enumerate(tanh.sl):
        if tanh.zero_row[b]:
            continue
        A_T = sym_block(tanh.T, s)
        pred = rad_cov(A_T, A_T)
        meas, mc_se = var_and_se(tanh.dec.tensor.samples[:, b])
        assert abs(meas - pred) <= 4 * mc_se, (b, meas, pred, mc_se)
        t = tanh.dec.tensor.blocks[b]
        assert math.isclose(t.se, float(tanh.dec.tensor.samples[:, b].std()) / math.sqrt(K), rel_tol=1e-10)
    # the shared probe pays off: Var(h - g) < Var h + Var g for every block of this tanh MLP
    for b, s in enumerate(tanh.sl):
        if tanh.zero_row[b]:
            continue
        vT = rad_cov(sym_block(tanh.T, s), sym_block(tanh.T, s))
        vH = rad_cov(sym_block(tanh.H, s), sym_block(tanh.H, s))
        vG = rad_cov(sym_block(tanh.G, s), sym_block(tanh.G, s))
        assert vT < vH + vG
        assert tanh.dec.tensor.blocks[b].se < math.hypot(tanh.dec.hessian.blocks[b].se, tanh.dec.ggn.blocks[b].se)


@pytest.mark.slow
def test_tensor_trace_error_shrinks_at_the_root_K_rate(tanh):
    """MSE of the mean of K samples at K = 10 and 80 (independent groups): ratio 8. Each MSE
    has relative sd sqrt(2/n_groups); with 128 and 16 groups the log-ratio sd is 0.375, so the
    3-sd band is 8 x exp(+-1.13)."""
    keep = [b for b in range(len(tanh.sl)) if not tanh.zero_row[b]]
    s = tanh.dec.tensor.samples[:, keep]
    exact = torch.stack([torch.diagonal(tanh.T)[tanh.sl[b]].sum() for b in keep])
    mse = {}
    for K in (10, 80):
        m = s[: (s.shape[0] // K) * K].reshape(-1, K, s.shape[1]).mean(1)
        mse[K] = ((m - exact) ** 2).mean(0)
    ratio = mse[10] / mse[80]
    sd = math.sqrt(2 / 128 + 2 / 16)
    assert ((ratio > 8 * math.exp(-3 * sd)) & (ratio < 8 * math.exp(3 * sd))).all(), ratio.tolist()


def test_row_gap_converges_to_the_exact_row_gap(tanh):
    for b, s in enumerate(tanh.sl):
        exact = math.sqrt(float((tanh.T[s] ** 2).sum() / (tanh.H[s] ** 2).sum()))
        est, se = float(tanh.dec.gap_row[b]), float(tanh.dec.gap_row_se[b])
        if tanh.zero_row[b]:
            assert est <= 1e-8
            continue
        assert abs(est - exact) <= 4 * se, (b, est, exact, se)
        assert se > 0


def test_ratio_of_means_is_the_delta_method_formula():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 3, generator=g, dtype=torch.float64), torch.randn(12, 3, generator=g, dtype=torch.float64) + 3
    R, se = ratio_of_means(x, y)
    xn, yn = x.numpy(), y.numpy()
    for j in range(3):
        Rj = xn[:, j].mean() / yn[:, j].mean()
        C = np.cov(xn[:, j], yn[:, j])
        sej = math.sqrt((C[0, 0] - 2 * Rj * C[0, 1] + Rj**2 * C[1, 1]) / 12) / abs(yn[:, j].mean())
        assert math.isclose(float(R[j]), Rj, rel_tol=1e-12) and math.isclose(float(se[j]), sej, rel_tol=1e-10)


@pytest.mark.slow
def test_trace_gap_delta_method_se_is_calibrated():
    """The SE that decompose reports for gamma^tr = tr T / |tr H| (ratio of means, delta method)
    matches the spread of the estimate over 1000 replicates of K = 20 probes.

    The per-probe samples (h, h - g) are exactly z^T A z (test_per_probe_samples_...), so the
    replicates are drawn from the dense matrices. A regression MLP's whole-parameter block has a
    well-determined denominator (CV = SE(h_bar)/|tr H| ~ 0.1 at K = 20), where the delta method
    is accurate to O(CV^2). Tolerance: 4 MC SEs of an sd from 1000 replicates (4/sqrt(2000)) plus
    3 CV^2. Dropping the covariance term would be off by 20 % here."""
    from hutchtrace.zoo import MeanSquared

    model, _, (x, _) = make_case("mlp", n=32, sizes=(8, 32, 4))
    y = torch.randn(32, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    crit = MeanSquared()
    H, layout = exact_hessian(model, crit, data=(x, y), blocks="all")
    G, _ = exact_ggn(model, crit, (x, y), blocks="all")
    T = H - G
    K, n_rep = 20, 1000
    vx, vy, cxy = rad_cov(T, T), rad_cov(H, H), rad_cov(T, H)
    mx, my = float(torch.trace(T)), float(torch.trace(H))
    R = mx / my
    se_exact = math.sqrt((vx - 2 * R * cxy + R * R * vy) / K) / abs(my)
    cv = math.sqrt(vy / K) / abs(my)
    assert cv < 0.15 and abs(R) > 0.1
    Z = probe_matrix(layout, 123, K * n_rep)
    h = (Z * (Z @ H)).sum(1).reshape(n_rep, K, 1)
    t = (Z * (Z @ T)).sum(1).reshape(n_rep, K, 1)
    out = [ratio_of_means(t[r], h[r]) for r in range(n_rep)]
    gam = torch.tensor([float(a) for a, _ in out]) * (1 if my > 0 else -1)
    ses = torch.tensor([float(e) for _, e in out])
    tol = 4 / math.sqrt(2 * n_rep) + 3 * cv**2
    assert abs(float(gam.std()) / se_exact - 1) <= tol
    assert abs(float(ses.mean()) / se_exact - 1) <= tol + 1 / (4 * K)  # E s ~ sigma (1 - 1/(4K))
    assert abs(float(gam.mean()) - mx / abs(my)) <= 4 * float(gam.std()) / math.sqrt(n_rep) + cv**2 * abs(R)


def test_trace_gap_of_decompose(tanh):
    checked = 0
    for b, s in enumerate(tanh.sl):
        my = float(torch.diagonal(tanh.H)[s].sum())
        exact = float(torch.diagonal(tanh.T)[s].sum()) / abs(my)
        est, se = float(tanh.dec.gap_trace[b]), float(tanh.dec.gap_trace_se[b])
        cv = float(tanh.dec.hessian.ses[b]) / abs(my)
        if tanh.zero_row[b]:
            assert abs(est) <= 1e-10
        elif cv < 0.2:  # the delta method needs a denominator far from 0
            assert abs(est - exact) <= 4 * se + 2 * cv**2 * abs(exact), (b, est, exact, se)
            checked += 1
    assert checked >= 2


# ---------------------------------------------------------------------------- ReLU claims (seed, docs/maths.md sections 5 and 10)
def test_relu_parameter_hessian_keeps_a_cross_layer_tensor_part():
    """ReLU MLP: every layer-diagonal block of T is 0 (so tr T_bb = 0 for every block and
    tr H = tr G), but T couples layers: gamma^row > 0 for the hidden layers."""
    model, crit, data, H, G, layout = exact_case(nn.ReLU, blocks="module")
    T = H - G
    sl = block_slices(layout)
    scale = float(H.abs().max())
    assert float(torch.diagonal(T).abs().max()) <= 1e-12 * scale
    for s in sl:
        assert float(T[s][:, s].abs().max()) <= 1e-12 * scale
    assert float(T[sl[0]][:, sl[1]].norm()) > 0.01 * float(H.norm())

    K = 600
    d = decompose(model, crit, K=K, data=data, blocks="module", seed=77)
    z = d.tensor.means / d.tensor.ses
    assert (z.abs() < 4).all(), z.tolist()
    for b, s in enumerate(sl):
        # T_bb = 0, so Var(h_b - g_b) = X_b(T) = sum_{c != b} ||T_bc||_F^2 exactly
        X = float((T[s] ** 2).sum())
        meas, mc_se = var_and_se(d.tensor.samples[:, b])
        assert abs(meas - X) <= 4 * mc_se
        exact_row = math.sqrt(X / float((H[s] ** 2).sum()))
        assert abs(float(d.gap_row[b]) - exact_row) <= 4 * float(d.gap_row_se[b])
    hidden = [0, 1]
    assert (d.gap_row[hidden] > 4 * d.gap_row_se[hidden]).all()


def test_relu_output_bias_has_an_exactly_zero_tensor_row():
    model, crit, data = make_case("mlp", act=nn.ReLU, **SIZES)
    d = decompose(model, crit, K=8, data=data, seed=3)
    b = d.names.index("4.bias")
    assert float(d.energy["tensor"][:, b].max()) <= 1e-24 * float(d.energy["hessian"][:, b].max())
    assert float(d.gap_row[b]) <= 1e-10


@pytest.mark.parametrize("act, vanishes", [(nn.ReLU, True), (nn.Tanh, False)])
def test_input_hessian_tensor_part_vanishes_for_relu(act, vanishes):
    """d^2 loss / dx^2 = J_x^T Lambda J_x + sum_k r_k d^2 f_k/dx^2 and d^2 f/dx^2 = 0 a.e. for ReLU:
    the input Hessian IS its Gauss-Newton part (T_x = 0), while tanh keeps T_x != 0."""
    net, crit, (x, y) = make_case("mlp", act=act, **SIZES)
    wrapped = InputAsParameter(net, x)
    data = (torch.zeros(x.shape[0], 1, dtype=x.dtype), y)
    Hx, _ = exact_hessian(wrapped, crit, data=data)
    Gx, _ = exact_ggn(wrapped, crit, data)
    rel = float((Hx - Gx).norm() / Hx.norm())
    d = decompose(wrapped, crit, K=40, data=data, seed=5)
    assert d.names == ["x"]
    if vanishes:
        assert rel <= 1e-12
        assert float(d.tensor.samples.abs().max()) <= 1e-12 * float(d.hessian.samples.abs().max())
        assert float(d.gap_row[0]) <= 1e-6
    else:
        assert rel > 0.05
        assert float(d.gap_row[0]) > 4 * float(d.gap_row_se[0])
        assert abs(float(d.gap_row[0]) - rel) <= 4 * float(d.gap_row_se[0])


# ---------------------------------------------------------------------------- contract
def test_result_api(tanh):
    d = decompose(tanh.model, tanh.crit, K=6, data=tanh.data, seed=1)
    assert isinstance(d, Decomposition)
    row = d["2.weight"]
    assert row["tr_H"] == d.hessian["2.weight"].mean
    assert math.isclose(row["tr_T"], row["tr_H"] - row["tr_G"], rel_tol=1e-9, abs_tol=1e-12)
    assert torch.equal(d.gap(), d.gap_row) and torch.equal(d.gap("trace"), d.gap_trace)
    with pytest.raises(ValueError, match="row"):
        d.gap("frobenius")
    text = d.table()
    assert "0.weight" in text and "gap_row" in text
    df = d.to_dataframe()
    assert list(df.index) == d.names and np.isclose(df.loc["0.bias", "tr_G"], d.ggn["0.bias"].mean)
    assert d.to_dict()["meta"]["K"] == 6
    assert math.isclose(d.hessian.total.mean, d.ggn.total.mean + d.tensor.total.mean, rel_tol=1e-9, abs_tol=1e-12)


def test_closure_loss_is_rejected(tanh):
    x, y = tanh.data
    with pytest.raises(LossError, match="curvature='ggn' needs a criterion"):
        decompose(tanh.model, lambda m: tanh.crit(m(x), y), K=2)


def test_bad_arguments(tanh):
    with pytest.raises(ValueError, match="probe"):
        decompose(tanh.model, tanh.crit, K=2, data=tanh.data, probe="uniform")
    with pytest.raises(ValueError, match="K"):
        decompose(tanh.model, tanh.crit, K=0, data=tanh.data)
    with pytest.raises(ValueError, match="ggn"):
        decompose(tanh.model, tanh.crit, K=2, data=tanh.data, ggn="reverse")


def test_no_side_effects_batchnorm_and_dropout():
    for case in ("cnn_bn", "dropout"):
        model, crit, data = make_case(case)
        if case == "dropout":
            crit = nn.MSELoss()
        crit(model(data[0]), data[1]).backward()
        torch.manual_seed(3)
        before = snapshot(model)
        decompose(model, crit, K=3, data=data, seed=0)
        assert_same_snapshot(before, snapshot(model))


def test_non_finite_products_are_flagged_not_averaged():
    model, crit, (x, y) = make_case("mlp", **SIZES)
    x = x.clone()
    x[0, 0] = math.inf
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        d = decompose(model, crit, K=2, data=(x, y), seed=0)
    assert any(issubclass(w.category, NonFiniteWarning) for w in rec)
    assert not d.hessian.blocks[0].finite and math.isnan(d.hessian.blocks[0].mean)


# ---------------------------------------------------------------------------- plots
def test_plot_decomposition_bars_and_error_bars(tanh):
    mpl = pytest.importorskip("matplotlib")
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    from hutchtrace.monitor.plots import plot_decomposition

    d = decompose(tanh.model, tanh.crit, K=6, data=tanh.data, seed=1)
    ax = plot_decomposition(d)
    bars = ax.containers
    heights = [[r.get_height() for r in c.patches] for c in bars if hasattr(c, "patches")]
    assert heights == [[b.mean for b in res.blocks] for res in (d.hessian, d.ggn, d.tensor)]
    lines = [c for c in bars if getattr(c, "has_yerr", False)]
    assert len(lines) == 3
    plt.close(ax.figure)
    with pytest.raises(ValueError, match="errors"):
        plot_decomposition(d, errors="sd")


def test_plots_need_matplotlib(monkeypatch, tanh):
    import sys

    from hutchtrace.monitor import plots

    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    d = decompose(tanh.model, tanh.crit, K=2, data=tanh.data, seed=1)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plots.plot_decomposition(d)
