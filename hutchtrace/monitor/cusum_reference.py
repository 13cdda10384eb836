"""The in-control model of a CUSUM: level, scale and autocorrelation from a warm-up (docs/maths.md section 9).

A monitored series ``x_t`` (one per block) is a trace estimate with standard error
``SE_t``. Its in-control model is a level ``mu0`` and a scale

.. math::

    \\sigma_t^2 = c^2 v (\\sigma_{proc}^2 + SE_t^2),

fitted on a warm-up of ``n0`` measurements (pooled over one or more runs):

* **Level.** Without a moving baseline (``lam = 0``) ``mu0`` is the warm-up mean. With one,
  a straight line is fitted by least squares over each run's time axis ``t = 0..n-1``
  (pooled across runs); its residuals give the spread and the autocorrelation, and ``mu0``
  is the fitted value at the end of the longest run, where the EWMA baseline starts.
* **Process variance.** ``sigma_proc^2 = max(0, s_x^2 - mean(SE_t^2))``, ``s_x^2`` the residual
  variance (``n0 - 1`` or ``n0 - 2`` degrees of freedom): the between-batch variance
  ``Var_B tau`` (docs/maths.md section 3) plus genuine step-to-step variation. The probe noise
  ``SE_t`` alone would ignore the batch floor and collapse the in-control ARL (docs/maths.md
  section 9: target 1000, measured 395 / 100 / 44).
* **Baseline noise.** ``v = 2/(2 - lambda)`` with an EWMA baseline of weight ``lambda``: the
  residual ``x_t - m_{t-1}`` also carries the baseline's own noise,
  ``Var m = sigma^2 lambda/(2 - lambda)``; ``v = 1`` for a fixed level.
* **Autocorrelation.** Positive lag-1 autocorrelation makes CUSUM sums wander further than
  independent increments do (docs/maths.md section 9: AR(1) increments with ``rho = 0.6`` cut
  ARL0 from 1000 to about 87; docs/monitor.md tabulates the simulated ARL0 of each remedy).
  ``rho`` is the lag-1 autocorrelation of the warm-up residuals, centred within each run
  (between-run level differences are variance, not autocorrelation). When it is significant
  (``rho > 2/sqrt(n0)``, one-sided: negative correlation only makes CUSUM conservative) it
  is acted on, capped at 0.9, as ``autocorr`` says:

  - ``"whiten"``: the recursion runs on the AR(1) prediction residuals with coefficient
    ``phi = rho`` (:mod:`hutchtrace.monitor.cusum_recursion`); ``c = 1``. The last warm-up
    residual, standardised, seeds that recursion.
  - ``"inflate"``: ``c^2 = (1 + rho)/(1 - rho)`` (the AR(1) long-run variance). Same
    sensitivity to a sustained shift, but *conservative*: measured ARL0 for a target of
    1000 was about 4100 at ``rho = 0.3`` and 14000 at ``rho = 0.6`` (mean over 2000 paths,
    ``n0 = 300``), because the in-control increments then have variance ``1/c^2 < 1``.
  - ``"warn"``: warns and changes nothing; ``"ignore"``: only records ``rho``.

Example:
    >>> import numpy as np
    >>> from hutchtrace.monitor.cusum_reference import fit_in_control
    >>> x = np.random.default_rng(0).normal(10.0, 2.0, size=(400, 1))
    >>> m = fit_in_control([x], [np.zeros_like(x)], lam=0.0, autocorr="whiten", names=["fc1"])
    >>> bool(abs(m.mu0[0] - 10) < 0.3), bool(abs(np.sqrt(m.sigma_proc2[0]) - 2) < 0.2)
    (True, True)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["RHO_MAX", "InControlModel", "fit_in_control", "known_in_control"]

RHO_MAX = 0.9  # cap on the autocorrelation acted on


@dataclass
class InControlModel:
    """Per-series in-control model (arrays of length J, one entry per series).

    Attributes:
        mu0: level (the fixed reference, or the EWMA baseline's starting value).
        sigma_proc2: process variance ``sigma_proc^2`` (probe noise excluded).
        rho: estimated (or given) lag-1 autocorrelation.
        inflation: ``c^2 v``, the factor on ``sigma_proc^2 + SE_t^2``.
        phi: whitening coefficient (the ``rho`` acted on, or 0).
        u_prev: the standardised residual that seeds the whitening recursion.
    """

    mu0: np.ndarray
    sigma_proc2: np.ndarray
    rho: np.ndarray
    inflation: np.ndarray
    phi: np.ndarray
    u_prev: np.ndarray


def fit_in_control(
    xs: list[np.ndarray],
    s2s: list[np.ndarray],
    lam: float,
    autocorr: str,
    names: Sequence[str],
) -> InControlModel:
    """Fit the in-control model on warm-up runs (see the module docstring).

    Args:
        xs: one ``(n_r, J)`` array of measurements per run.
        s2s: the matching squared standard errors.
        lam: the EWMA baseline weight (0: fixed level, no trend fitted).
        autocorr: ``"whiten"``, ``"inflate"``, ``"warn"`` or ``"ignore"``.
        names: the J series names (for the ``"warn"`` message).
    """
    detrend = lam > 0
    _check_runs(xs, min_n=3 if detrend else 2)
    n_total = sum(x.shape[0] for x in xs)
    mu0, resid, resid_all, dof = _trend_residuals(xs) if detrend else _mean_residuals(xs)
    sx2 = (resid_all**2).sum(0) / max(dof, 1)
    se2_mean = np.concatenate(s2s, 0).mean(0)
    rho = _lag1_autocorrelation(resid)
    crit = 2.0 / math.sqrt(n_total)
    significant = rho > crit
    if significant.any() and autocorr == "warn":
        warnings.warn(
            f"CUSUM warm-up: lag-1 autocorrelation {np.round(rho[significant], 2).tolist()} of "
            "series "
            f"{[names[i] for i in np.flatnonzero(significant)]} exceeds 2/sqrt(n0) = {crit:.2f}; "
            "the in-control ARL will be shorter than its target. "
            "Use autocorr='whiten', a detrending halflife, or a sparser measurement interval.",
            stacklevel=4,  # the user's calibrate()/update() call
        )
    acted = np.where(significant, np.clip(rho, 0.0, RHO_MAX), 0.0)
    inflation, phi = _scale_and_whitening(acted, autocorr, lam)
    sigma_proc2 = np.maximum(0.0, sx2 - se2_mean)
    # the last warm-up residual seeds the whitening recursion
    last = resid[-1][-1]
    scale = np.sqrt(inflation * (sigma_proc2 + s2s[-1][-1]))
    with np.errstate(divide="ignore", invalid="ignore"):
        u_prev = np.where(scale > 0, last / np.where(scale > 0, scale, 1.0), 0.0)
    mu0 = np.asarray(mu0, dtype=np.float64).copy()
    return InControlModel(mu0, sigma_proc2, rho, inflation, phi, u_prev)


def known_in_control(
    mu0: np.ndarray, sigma: np.ndarray, rho: np.ndarray, lam: float, autocorr: str
) -> InControlModel:
    """The in-control model of a known level ``mu0``, process sd ``sigma`` and lag-1 ``rho``.

    ``rho`` (capped at 0.9, negative values treated as 0) is acted on as ``autocorr`` says,
    without a significance test; the whitening recursion starts from ``u = 0``.
    """
    r = np.clip(rho, 0.0, RHO_MAX)
    inflation, phi = _scale_and_whitening(r, autocorr, lam)
    return InControlModel(mu0.copy(), sigma * sigma, rho.copy(), inflation, phi, np.zeros_like(r))


def _scale_and_whitening(acted: np.ndarray, autocorr: str, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """``(c^2 v, phi)`` for the autocorrelation ``acted`` on and the EWMA weight ``lam``."""
    c2 = (1.0 + acted) / (1.0 - acted) if autocorr == "inflate" else np.ones_like(acted)
    v = 2.0 / (2.0 - lam) if lam > 0 else 1.0
    phi = acted.copy() if autocorr == "whiten" else np.zeros_like(acted)
    return c2 * v, phi


def _check_runs(xs: list[np.ndarray], min_n: int) -> None:
    if any(x.shape[0] < min_n for x in xs):
        raise ValueError(f"each warm-up run needs >= {min_n} measurements, got {[x.shape[0] for x in xs]}")
    if not all(np.isfinite(x).all() for x in xs):
        raise ValueError("warm-up data contain NaN/Inf; calibrate on finite measurements only")


def _trend_residuals(xs: list[np.ndarray]):
    """Pooled least-squares line over each run's time axis ``t = 0..n-1``.

    Returns ``(mu0, residuals per run, all residuals, degrees of freedom)``; ``mu0`` is the
    line at the end of the longest run.
    """
    t = np.concatenate([np.arange(x.shape[0], dtype=np.float64) for x in xs])
    X = np.concatenate(xs, 0)
    tm = t.mean()
    slope = ((t - tm)[:, None] * (X - X.mean(0))).sum(0) / ((t - tm) ** 2).sum()
    icpt = X.mean(0) - slope * tm
    resid_all = X - (icpt + slope * t[:, None])
    mu0 = icpt + slope * (max(x.shape[0] for x in xs) - 1)
    bounds = np.cumsum([x.shape[0] for x in xs])[:-1]
    return mu0, np.split(resid_all, bounds), resid_all, X.shape[0] - 2


def _mean_residuals(xs: list[np.ndarray]):
    """Pooled mean: ``(mu0, residuals per run, all residuals, degrees of freedom)``."""
    X = np.concatenate(xs, 0)
    mu0 = X.mean(0)
    return mu0, [x - mu0 for x in xs], X - mu0, X.shape[0] - 1


def _lag1_autocorrelation(resid: list[np.ndarray]) -> np.ndarray:
    """Lag-1 autocorrelation within runs, of residuals centred per run (0 where undefined)."""
    lag_num, lag_den = 0.0, 0.0
    for r in resid:
        rc = r - r.mean(0)
        lag_num = lag_num + (rc[1:] * rc[:-1]).sum(0)
        lag_den = lag_den + (rc * rc).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(lag_den > 0, lag_num / lag_den, 0.0)
