"""spectrum_summary / vector_summary against numpy and scipy, and the docs/maths.md section 7 rules
(rank tolerance, determinant vs pseudo-determinant of a singular local Hessian, condition number)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.signal import find_peaks, welch

from hutchtrace.core.errors import NonFiniteWarning
from hutchtrace.layers.local_hessian import local_hessian
from hutchtrace.layers.spectrum import spectrum_summary, vector_summary


def _sym(n, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, n))
    return (a + a.T) / 2


def test_matches_numpy_on_a_symmetric_matrix():
    M = _sym(300)
    s = spectrum_summary(M, bins=17, top_peaks=4)
    ev = np.linalg.eigvalsh(M)
    np.testing.assert_allclose(s.eigenvalues, ev, rtol=0, atol=1e-12)
    assert s.trace == pytest.approx(np.trace(M), abs=1e-10)
    assert s.size == 300 and s.rank == 300 and not s.singular and s.det_kind == "determinant"
    sign, logdet = np.linalg.slogdet(M)
    assert s.sign == int(sign) and s.logabsdet == pytest.approx(logdet, rel=1e-12)
    assert (s.pdet_sign, s.log_pdet) == (s.sign, s.logabsdet)
    assert s.condition == pytest.approx(np.abs(ev).max() / np.abs(ev).min(), rel=1e-12)
    assert s.tol == pytest.approx(np.abs(ev).max() * 300 * np.finfo(np.float64).eps)
    # distribution statistics of the eigenvalues
    assert (s.mean, s.std, s.min, s.max) == pytest.approx(
        (ev.mean(), ev.std(), ev.min(), ev.max()), rel=1e-12
    )
    counts, edges = np.histogram(ev, bins=17)
    np.testing.assert_array_equal(s.hist_counts, counts)
    np.testing.assert_allclose(s.hist_edges, edges)
    # Welch with the seed's parameters (Hann, 256, overlap 128)
    f, p = welch(ev, nperseg=256, noverlap=128, window="hann")
    assert (s.stats.nperseg, s.stats.noverlap, s.stats.window) == (256, 128, "hann")
    np.testing.assert_allclose(s.welch_freqs, f)
    np.testing.assert_allclose(s.welch_psd, p, rtol=1e-12)
    idx, _ = find_peaks(p)
    top = idx[np.argsort(p[idx])[::-1][:4]]
    np.testing.assert_allclose(s.peak_freqs, f[top])
    np.testing.assert_allclose(s.peak_heights, p[top])
    assert s.scalars()["eig_psd_max"] == pytest.approx(p.max())


def test_torch_input_and_eigenvalue_input_agree():
    M = _sym(40, seed=1)
    a = spectrum_summary(M)
    b = spectrum_summary(torch.from_numpy(M))
    c = spectrum_summary(np.linalg.eigvalsh(M)[::-1].copy())  # any order
    for s in (b, c):
        np.testing.assert_allclose(s.eigenvalues, a.eigenvalues, atol=1e-12)
        assert s.rank == a.rank and s.sign == a.sign
        assert s.logabsdet == pytest.approx(a.logabsdet, rel=1e-12)


def _singular_lh(N, m=6, n=8, act="tanh", seed=0):
    g = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(n, m).double()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(m, n, generator=g, dtype=torch.float64) * 0.7)
        layer.bias.copy_(torch.randn(m, generator=g, dtype=torch.float64) * 0.7)
    Z = torch.randn(N, n, generator=g, dtype=torch.float64)
    return layer, Z, local_hessian(layer, Z, layer, activation=act)


def test_singular_local_hessian_reports_the_pseudo_determinant():
    """N = 1: rank m; det = 0; pseudo-det = prod_k A''(u_k)(||z||^2 + 1) (docs/maths.md section 7)."""
    layer, z, lh = _singular_lh(1)
    s = spectrum_summary(lh)
    assert s.rank == 6 and s.size == 54 and s.singular and s.det_kind == "pseudo-determinant"
    assert s.sign == 0 and s.logabsdet == -math.inf
    u = (z @ layer.weight.detach().T + layer.bias.detach())[0]
    lam = (-2 * torch.tanh(u) * (1 - torch.tanh(u) ** 2) * (z.pow(2).sum() + 1)).numpy()
    assert s.pdet_sign == int(np.prod(np.sign(lam)))
    assert s.log_pdet == pytest.approx(float(np.log(np.abs(lam)).sum()), rel=1e-12)
    assert s.condition == pytest.approx(np.abs(lam).max() / np.abs(lam).min(), rel=1e-10)
    assert "pseudo-determinant" in str(s)
    # the same numbers from the dense matrix (not the unit blocks)
    d = spectrum_summary(lh.dense())
    assert (d.rank, d.sign, d.pdet_sign) == (s.rank, s.sign, s.pdet_sign)
    assert d.log_pdet == pytest.approx(s.log_pdet, rel=1e-10)


@pytest.mark.parametrize("N", [3, 5, 12])
def test_rank_and_determinant_kind_follow_the_batch_size(N):
    _, _, lh = _singular_lh(N, act="softplus", seed=N)
    s = lh.summary()
    assert s.rank == 6 * min(N, 9)
    assert s.singular == (N < 9)
    if not s.singular:
        sign, logdet = np.linalg.slogdet(lh.dense().numpy())
        assert s.sign == int(sign) == 1  # softplus'' > 0: positive definite once full rank
        assert s.logabsdet == pytest.approx(logdet, rel=1e-10)


def test_tolerance_default_dtype_and_override():
    ev = np.array([1.0, 1e-9, 1e-17, 0.0])
    s = spectrum_summary(ev)
    assert s.tol == pytest.approx(1.0 * 4 * np.finfo(np.float64).eps)
    assert s.rank == 2 and s.condition == pytest.approx(1e9)
    assert spectrum_summary(ev, tol=1e-8).rank == 1
    # the tolerance uses the input's dtype: 1e-7 is below 3 * eps32 but far above 3 * eps64
    s32 = spectrum_summary(torch.tensor([1.0, 1e-7, 0.0], dtype=torch.float32))
    assert s32.eps == pytest.approx(float(torch.finfo(torch.float32).eps))
    assert s32.rank == 1
    assert spectrum_summary(torch.tensor([1.0, 1e-7, 0.0], dtype=torch.float64)).rank == 2


def test_zero_matrix():
    s = spectrum_summary(np.zeros((5, 5)))
    assert s.rank == 0 and s.singular and s.sign == 0 and s.pdet_sign == 0
    assert s.logabsdet == -math.inf and s.log_pdet == -math.inf and s.condition == math.inf
    assert s.trace == 0.0 and s.std == 0.0


def test_never_uses_slogdet_noise():
    """An exactly singular LH: torch.linalg.slogdet returns rounding noise, the summary says det = 0."""
    _, _, lh = _singular_lh(1, m=8, n=10)
    s = spectrum_summary(lh.dense())
    assert s.sign == 0 and s.logabsdet == -math.inf
    assert s.rank == 8


def test_short_sequences_shrink_the_welch_segment():
    x = np.sin(np.arange(40) * 0.9) + 0.01 * np.arange(40)
    v = vector_summary(x, welch_nperseg=256, welch_noverlap=128)
    assert (v.nperseg, v.noverlap) == (40, 20)
    _f, p = welch(x, nperseg=40, noverlap=20, window="hann")
    np.testing.assert_allclose(v.welch_psd, p, rtol=1e-12)
    one = vector_summary([3.0])
    assert (one.mean, one.std, one.numel, one.peak_freqs.size) == (3.0, 0.0, 1, 0)


def test_vector_summary_of_a_weight_tensor():
    w = torch.randn(32, 20, generator=torch.Generator().manual_seed(3))
    v = vector_summary(w, bins=10, top_peaks=3)
    x = w.double().numpy().reshape(-1)
    assert v.numel == 640
    assert (v.mean, v.std, v.min, v.max) == pytest.approx((x.mean(), x.std(), x.min(), x.max()), rel=1e-12)
    assert v.norm == pytest.approx(np.linalg.norm(x), rel=1e-12)
    np.testing.assert_array_equal(v.hist_counts, np.histogram(x, bins=10)[0])
    _f, p = welch(x, nperseg=256, noverlap=128, window="hann")
    np.testing.assert_allclose(v.welch_psd, p, rtol=1e-12)
    idx, _ = find_peaks(p)
    np.testing.assert_allclose(v.peak_heights, np.sort(p[idx])[::-1][:3])
    assert set(v.scalars()) >= {"mean", "std", "min", "max", "psd_max", "peak_freq"}
    assert set(v.arrays()) == {
        "hist_counts",
        "hist_edges",
        "welch_freqs",
        "welch_psd",
        "peak_freqs",
        "peak_heights",
    }


def test_nan_is_flagged_not_averaged():
    with pytest.warns(NonFiniteWarning, match="1 of 4"):
        v = vector_summary([1.0, float("nan"), 2.0, 3.0])
    assert v.finite is False and math.isnan(v.mean) and math.isnan(v.max) and v.welch_psd.size == 0


def test_bad_inputs_give_clear_errors():
    with pytest.raises(ValueError, match="not symmetric"):
        spectrum_summary(np.array([[1.0, 2.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="square"):
        spectrum_summary(np.ones((2, 3)))
    with pytest.raises(ValueError, match="NaN/Inf"):
        spectrum_summary(np.array([[1.0, np.nan], [np.nan, 1.0]]))
    with pytest.raises(ValueError, match="empty"):
        spectrum_summary(np.zeros(0))
    with pytest.raises(ValueError, match="tol"):
        spectrum_summary([1.0, 2.0], tol=-1.0)
    with pytest.raises(ValueError, match="welch_noverlap"):
        vector_summary([1.0, 2.0], welch_nperseg=16, welch_noverlap=16)
    with pytest.raises(TypeError, match="real numbers"):
        vector_summary(["a", "b"])
