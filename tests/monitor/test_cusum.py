"""CUSUMDetector: thresholds against docs/maths.md section 9, ARLs against simulation, calibration, resume.

Tolerances: Monte-Carlo quantities are compared with ``approx_err + z * MC_se`` where the MC
standard error is computed from the simulated sample itself and ``approx_err`` is the
documented accuracy of the approximation under test (Siegmund: 6 %, docs/maths.md section 9); exact
quantities are compared at rounding level.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from hutchtrace.monitor.cusum import CUSUMDetector
from hutchtrace.monitor.cusum_arl import arl0, siegmund_arl, threshold_for_arl
from hutchtrace.monitor.cusum_simulation import threshold_for_alpha

SIEGMUND_REL = 0.06  # docs/maths.md section 9: Siegmund vs simulation, |rel. err| <= 6.4 % over 16 cases


def first_alarm_times(det: CUSUMDetector, draw, n: int, tmax: int = 60_000) -> np.ndarray:
    """Run ``n`` independent copies (the detector's series) until each has alarmed once."""
    rl = np.full(n, tmax)
    alive = np.ones(n, dtype=bool)
    ok = np.ones(n, dtype=bool)
    zero = np.zeros(n)
    t = 0
    while alive.any() and t < tmax:
        t += 1
        up, down, _, _ = det._advance(draw(), zero, ok)
        hit = alive & (up | down)
        rl[hit] = t
        alive &= ~hit
    assert not alive.any(), "some paths never alarmed: raise tmax"
    return rl


def known(det: CUSUMDetector, n: int) -> CUSUMDetector:
    return det.set_reference(np.zeros(n), np.ones(n))


# ----------------------------------------------------------------------------- thresholds
@pytest.mark.parametrize("target,k,h_spec", [(500, 0.5, 4.381), (1000, 0.5, 5.063), (1000, 0.25, 8.582)])
def test_threshold_for_arl_matches_spec(target, k, h_spec):
    h = threshold_for_arl(target, k)
    assert abs(h - h_spec) < 5e-4  # docs/maths.md gives 3 decimals
    assert abs(arl0(k, h) - target) < 1e-6 * target


def test_siegmund_formula_limits_and_two_sided():
    # D = 0: ARL = b^2
    assert siegmund_arl(0.5, 0.5, 4.0) == pytest.approx((4.0 + 1.166) ** 2)
    # continuity across D = 0
    assert siegmund_arl(0.5 + 1e-7, 0.5, 4.0) == pytest.approx((4.0 + 1.166) ** 2, rel=1e-5)
    h1 = threshold_for_arl(1000, 0.5, sides=1)
    h2 = threshold_for_arl(500, 0.5, sides=2)
    assert h1 == pytest.approx(h2, rel=1e-9)  # two-sided halves the ARL of equal sides
    with pytest.raises(ValueError, match="target"):
        threshold_for_arl(0.5)


@pytest.mark.parametrize("direction", ["up", "both"])
@pytest.mark.slow
def test_simulated_arl0_matches_target(direction):
    rng = np.random.default_rng(1)
    n = 1500
    det = known(CUSUMDetector(k=0.5, arl0=1000, direction=direction, warmup=0), n)
    target = 1000.0
    rl = first_alarm_times(det, lambda: rng.standard_normal(n), n)
    se = rl.std(ddof=1) / math.sqrt(n)
    assert abs(rl.mean() - target) <= SIEGMUND_REL * target + 3 * se, (rl.mean(), se)


@pytest.mark.parametrize("mu", [0.5, 1.0, 2.0])
@pytest.mark.slow
def test_out_of_control_arl_matches_siegmund(mu):
    rng = np.random.default_rng(2)
    n = 3000
    det = known(CUSUMDetector(k=0.5, h=4.0, direction="up", warmup=0), n)
    rl = first_alarm_times(det, lambda: mu + rng.standard_normal(n), n)
    pred = siegmund_arl(mu, 0.5, 4.0)
    se = rl.std(ddof=1) / math.sqrt(n)
    assert abs(rl.mean() - pred) <= SIEGMUND_REL * pred + 3 * se, (rl.mean(), pred, se)


def _false_alarm_fraction(det_state: dict, n_paths: int, horizon: int, seed: int, warmup: int = 0) -> float:
    """Fraction of fresh in-control paths (own warm-up if ``warmup``) alarming within ``horizon``."""
    rng = np.random.default_rng(seed)
    det = CUSUMDetector(h=1.0)
    det.load_state_dict(det_state)
    det.names = None
    det._ensure_names([str(i) for i in range(n_paths)])
    if warmup:
        det.calibrate(rng.standard_normal((warmup, n_paths)))
    else:
        det.set_reference(np.zeros(n_paths), np.ones(n_paths))
    hit = np.zeros(n_paths, dtype=bool)
    ok, zero = np.ones(n_paths, dtype=bool), np.zeros(n_paths)
    for _ in range(horizon):
        up, down, _, _ = det._advance(rng.standard_normal(n_paths), zero, ok)
        hit |= up | down
    return float(hit.mean())


@pytest.mark.slow
def test_alpha_threshold_known_model_and_geometric():
    alpha, n, N = 0.05, 300, 20_000
    h_sim = threshold_for_alpha(alpha, n, 0.5, sides=1, n_paths=N, seed=0)
    det = CUSUMDetector(k=0.5, h=h_sim, direction="up", warmup=0)
    p = _false_alarm_fraction(det.state_dict(), N, n, seed=1)
    # h is a quantile from N paths, p a fresh estimate from N paths: two binomial errors
    se = math.sqrt(alpha * (1 - alpha) * (2.0 / N))
    assert abs(p - alpha) <= 4 * se, (p, se)
    # geometric approximation alpha = 1 - exp(-n / ARL0(h)): docs/maths.md section 9: 0.0494 vs 0.05
    h_geo = threshold_for_alpha(alpha, n, 0.5, sides=1, method="geometric")
    p_geo = 1 - math.exp(-n / arl0(0.5, h_geo))
    assert p_geo == pytest.approx(alpha, rel=1e-9)
    det_geo = CUSUMDetector(k=0.5, h=h_geo, direction="up", warmup=0)
    p2 = _false_alarm_fraction(det_geo.state_dict(), N, n, seed=2)
    se2 = math.sqrt(alpha * (1 - alpha) / N)
    assert abs(p2 - alpha) <= SIEGMUND_REL * alpha * 2 + 4 * se2, (
        p2
    )  # 6 % on the ARL ~ 6 % on alpha, x2 margin


@pytest.mark.parametrize("halflife", [None, 40.0])
@pytest.mark.slow
def test_alpha_threshold_with_short_warmup_controls_unconditional_rate(halflife):
    """h simulated *with* the warm-up estimation (n0 = 20) gives the nominal unconditional rate,
    while the naive known-model h does not."""
    alpha, n0, horizon, N = 0.05, 20, 150, 8000
    det = CUSUMDetector(
        k=0.5, alpha=alpha, horizon=horizon, direction="both", warmup=n0, halflife=halflife, n_paths=N, seed=3
    )
    p = _false_alarm_fraction(det.state_dict(), N, horizon, seed=4, warmup=n0)
    se = math.sqrt(alpha * (1 - alpha) * 2.0 / N)
    assert abs(p - alpha) <= 4 * se, (p, se)
    naive = CUSUMDetector(
        k=0.5,
        alpha=alpha,
        horizon=horizon,
        direction="both",
        warmup=n0,
        halflife=halflife,
        n_paths=N,
        seed=3,
        account_warmup=False,
    )
    assert naive.h < det.h
    p_naive = _false_alarm_fraction(naive.state_dict(), N, horizon, seed=4, warmup=n0)
    assert p_naive > alpha + 4 * se, p_naive


def test_calibrate_on_several_runs_resimulates_threshold_for_the_design():
    det = CUSUMDetector(k=0.5, alpha=0.05, horizon=100, direction="up", warmup=10, n_paths=4000, seed=0)
    h_single = det.h
    rng = np.random.default_rng(0)
    det.calibrate([rng.standard_normal(10) for _ in range(8)])
    assert det.threshold_source["design"] == [10] * 8
    # 80 pooled points estimate (mu0, sigma) far better than 10: a lower threshold suffices
    assert det.h < h_single
    ref = CUSUMDetector(
        k=0.5, alpha=0.05, horizon=100, direction="up", warmup=0, n_paths=4000, seed=0, account_warmup=False
    )
    assert det.h > ref.h  # but still above the known-model threshold


# ----------------------------------------------------------------------------- detection
def test_planted_change_detected_with_siegmund_delay():
    rng = np.random.default_rng(5)
    n, n0, pre, shift = 400, 300, 200, 2.0
    det = CUSUMDetector(k=0.5, arl0=1000, direction="both", warmup=n0)
    names = [f"b{i}" for i in range(n)]
    det.calibrate(rng.normal(10.0, 3.0, (n0, n)), names=names)
    first_up, pre_alarms = np.full(n, -1), 0
    for t in range(pre + 100):
        x = rng.normal(10.0, 3.0, n) + (shift * 3.0 if t >= pre else 0.0)
        for a in det.update(dict(zip(names, x)), step=t):
            if t < pre:
                pre_alarms += 1
            elif a.direction == "up" and first_up[names.index(a.block)] < 0:
                first_up[names.index(a.block)] = t
            assert a.block in names and a.step == t and a.statistic > det.h
    assert (first_up >= 0).all(), "every planted +2 sigma change must be detected within 100 steps"
    delay = first_up - pre + 1
    pred = siegmund_arl(shift, 0.5, det.h)  # ~3.9 steps
    se = delay.std(ddof=1) / math.sqrt(n)
    # estimated (mu0, sigma) from n0 = 300 add ~ 1/sqrt(n0) relative error to the shift
    assert abs(delay.mean() - pred) <= SIEGMUND_REL * pred + 3 * se + pred * 2 / math.sqrt(n0), (
        delay.mean(),
        pred,
    )
    # in-control part: alarms per series-step ~ 2/ARL0 -> expected n * pre / 1000 * ... (two-sided ARL 500)
    expected = n * pre / 500.0
    assert pre_alarms <= expected + 4 * math.sqrt(expected) + 0.5 * expected, pre_alarms


def test_down_direction_and_no_alarm_without_change():
    rng = np.random.default_rng(6)
    det = CUSUMDetector(k=0.5, h=5.0, direction="down", warmup=0).set_reference([0.0], [1.0], names=["w"])
    alarms = [a for t in range(50) for a in det.update({"w": rng.normal(3.0)}, step=t)]
    assert alarms == []  # an upward move is ignored by a "down" detector
    alarms = [a for t in range(50) for a in det.update({"w": rng.normal(-3.0)}, step=t)]
    assert alarms and alarms[0].direction == "down"


def test_reset_after_alarm_and_nonfinite_flagged():
    det = CUSUMDetector(k=0.5, h=3.0, direction="up", warmup=0).set_reference(
        [0.0, 0.0], [1.0, 1.0], names=["a", "b"]
    )
    a1 = det.update({"a": 5.0, "b": 0.0}, step=1)
    assert [(a.block, a.direction) for a in a1] == [("a", "up")]
    assert a1[0].statistic == pytest.approx(4.5)
    assert det.s_pos[0] == 0.0 and det.s_neg[0] == 0.0  # reset
    a2 = det.update({"a": float("nan"), "b": 0.0}, step=2)
    assert [(a.block, a.direction) for a in a2] == [("a", "nonfinite")]
    assert det.count.tolist() == [1, 2]  # the NaN was not fed to the statistic


def test_probe_noise_alone_is_not_the_scale():
    """docs/maths.md section 9: sigma_proc^2 = max(0, s_x^2 - mean SE^2) keeps the batch floor."""
    rng = np.random.default_rng(7)
    n0 = 4000
    se = np.where(np.arange(n0) % 2 == 0, 3.0, 1.0)  # K alternating: SE^2 = 9 / 1
    x = 5.0 + rng.standard_normal(n0) * 2.0 + rng.standard_normal(n0) * se  # batch sd 2
    det = CUSUMDetector(warmup=0, autocorr="ignore").calibrate(x, se)
    s2 = x.var(ddof=1)
    assert det.sigma_proc2[0] == pytest.approx(s2 - np.mean(se**2), rel=1e-12)
    # and it estimates the true batch variance 4: Var(s^2) ~ 2 s^4 / n0
    assert abs(det.sigma_proc2[0] - 4.0) <= 4 * math.sqrt(2 * 9.0**2 / n0)
    assert det.scale(3.0)[0] == pytest.approx(math.sqrt(det.sigma_proc2[0] + 9.0))


def test_autocorrelation_detected_and_whitened():
    """AR(1) with rho = 0.5: rho-hat within its sampling error, whitening restores the ARL0
    (ignoring it leaves the much shorter ARL0 of docs/maths.md section 9)."""
    rho, n0, n = 0.5, 400, 1200
    rng = np.random.default_rng(8)

    def ar_paths(T, prev):
        out = np.empty((T, n))
        for t in range(T):
            prev = rho * prev + math.sqrt(1 - rho**2) * rng.standard_normal(n)
            out[t] = prev
        return out, prev

    warm, prev = ar_paths(n0, rng.standard_normal(n))
    res = {}
    for mode in ("whiten", "ignore"):
        det = CUSUMDetector(k=0.5, arl0=500, direction="up", warmup=n0, autocorr=mode)
        det.calibrate(warm)
        # lag-1 sample autocorrelation of an AR(1) with estimated mean: E ~ rho - (1 + 4 rho)/n0,
        # sd ~ sqrt((1 - rho^2)/n0); the median of n of them has sd ~ 1.2533 sd / sqrt(n)
        expected = rho - (1 + 4 * rho) / n0
        sd_median = 1.2533 * math.sqrt((1 - rho**2) / n0) / math.sqrt(n)
        assert abs(np.median(det.rho) - expected) <= 4 * sd_median, (np.median(det.rho), expected)
        st = {"p": prev.copy()}

        def draw(st=st):
            st["p"] = rho * st["p"] + math.sqrt(1 - rho**2) * rng.standard_normal(n)
            return st["p"]

        res[mode] = first_alarm_times(det, draw, n)
    se = res["whiten"].std(ddof=1) / math.sqrt(n)
    # whitening: iid residuals -> Siegmund holds up to the rho-hat / mu0 estimation error
    assert abs(res["whiten"].mean() - 500) <= 0.25 * 500 + 3 * se, res["whiten"].mean()
    assert res["ignore"].mean() < 0.4 * 500  # docs/maths.md section 9: rho = 0.6 gives 87 / 1000


def test_detrending_absorbs_slow_drift():
    """A slow in-control drift (0.002 sigma per step: 1.2 sigma over the horizon) makes a
    fixed-reference CUSUM alarm on every path; the EWMA baseline (halflife 10, lag bias
    0.002 (1 - lam)/lam = 0.03 sigma) keeps the false-alarm fraction at its no-drift level."""
    rng = np.random.default_rng(9)
    n, n0, T = 1000, 100, 600
    frac = {}
    for slope in (0.0, 0.002):
        for hl in (None, 10.0):
            det = CUSUMDetector(k=0.5, arl0=1000, direction="both", warmup=n0, halflife=hl)
            det.calibrate(rng.standard_normal((n0, n)) + slope * np.arange(n0)[:, None])
            hits = np.zeros(n, dtype=bool)
            ok, zero = np.ones(n, dtype=bool), np.zeros(n)
            for t in range(n0, n0 + T):
                up, down, _, _ = det._advance(rng.standard_normal(n) + slope * t, zero, ok)
                hits |= up | down
            frac[slope, hl] = hits.mean()
    assert frac[0.002, None] > 0.99
    p0 = frac[0.0, 10.0]
    se = math.sqrt(2 * p0 * (1 - p0) / n)
    assert frac[0.002, 10.0] <= p0 + 4 * se, frac


def test_baseline_frozen_while_statistic_positive():
    # freeze=0: the literal rule of docs/maths.md section 9, frozen while S+ > 0 or S- > 0
    det = CUSUMDetector(k=0.5, h=50.0, direction="both", warmup=0, halflife=5.0, freeze=0.0)
    det.set_reference([0.0], [1.0])
    lam = 1 - 2 ** (-1 / 5.0)
    s = det.scale()[0]
    assert s == pytest.approx(math.sqrt(2 / (2 - lam)))  # the EWMA's own noise is in the scale
    det.update([3.0 * s])  # S+ = 2.5 > 0: frozen
    assert det.baseline[0] == 0.0
    det.update([-3.0 * s])  # S+ = max(0, 2.5 - 3.5) = 0, S- = 2.5 > 0: still frozen
    assert det.baseline[0] == 0.0
    det.update([0.4 * s])  # S- = max(0, 2.5 - 0.4 - 0.5) = 1.6 > 0
    det.update([-0.4 * s])  # S- = 1.6 + 0.4 - 0.5 = 1.5
    assert det.baseline[0] == 0.0 and det.s_neg[0] == pytest.approx(1.5)
    det.update([1.2 * s])  # S- = max(0, 1.5 - 1.2 - 0.5) = 0, S+ = 0.7: frozen
    det.update([-0.6 * s])  # S+ = 0, S- = 0.1: frozen
    det.update([0.3 * s])  # S- = 0, S+ = 0: the baseline moves
    assert det.s_pos[0] == 0.0 and det.s_neg[0] == 0.0
    assert det.baseline[0] == pytest.approx(lam * 0.3 * s)
    # freeze=0.5: tracks while both statistics stay <= h/2
    det = CUSUMDetector(k=0.5, h=2.0, direction="both", warmup=0, halflife=5.0, freeze=0.5)
    det.set_reference([0.0], [1.0])
    det.update([1.4 * s])  # S+ = 0.9 <= 1: moves
    assert det.baseline[0] == pytest.approx(lam * 1.4 * s)
    b = det.baseline[0]
    det.update([b + 0.7 * s])  # S+ = 0.9 + 0.2 = 1.1 > 1: frozen
    assert det.baseline[0] == b


# ----------------------------------------------------------------------------- persistence
@pytest.mark.parametrize("halflife,direction", [(None, "both"), (10.0, "up")])
def test_state_dict_resume_is_bit_identical(halflife, direction):
    rng = np.random.default_rng(11)
    T, L = 400, 3
    x = rng.standard_normal((T, L)) + np.where(np.arange(T)[:, None] > 250, 1.5, 0.0)
    se = np.abs(rng.standard_normal((T, L))) * 0.3
    names = ["a", "b", "c"]

    def feed(det, lo, hi, log):
        for t in range(lo, hi):
            al = det.update(dict(zip(names, x[t])), dict(zip(names, se[t])), step=t)
            log.append((tuple(a.to_dict().items() for a in al), json.dumps(det.statistics())))

    make = lambda: CUSUMDetector(k=0.5, arl0=200, direction=direction, warmup=30, halflife=halflife)  # noqa: E731
    full, log_full = make(), []
    feed(full, 0, T, log_full)
    for cut in (10, 30, 31, 200):  # inside the warm-up, at its end, after
        part, log_part = make(), []
        feed(part, 0, cut, log_part)
        state = json.loads(json.dumps(part.state_dict()))  # through JSON: plain types only
        resumed = CUSUMDetector()
        resumed.load_state_dict(state)
        feed(resumed, cut, T, log_part)
        assert log_part == log_full
    assert any(entry[0] for entry in log_full)  # the planted shift did alarm


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="direction"):
        CUSUMDetector(direction="sideways")
    with pytest.raises(ValueError, match="at most one"):
        CUSUMDetector(h=4.0, arl0=100)
    with pytest.raises(ValueError, match="alpha and horizon"):
        CUSUMDetector(alpha=0.05)
    with pytest.raises(ValueError, match="warmup"):
        CUSUMDetector(warmup=1)
    det = CUSUMDetector(warmup=0)
    with pytest.raises(RuntimeError, match="calibrate"):
        det.update({"a": 1.0})
    with pytest.raises(ValueError, match="NaN"):
        CUSUMDetector(warmup=0).calibrate(np.array([1.0, np.nan, 2.0]))
    with pytest.raises(KeyError, match="no value"):
        d = CUSUMDetector(warmup=0).set_reference([0.0, 0.0], [1.0, 1.0], names=["a", "b"])
        d.update({"a": 0.0})
