"""The CUSUM threshold for a false-alarm probability, by simulation (docs/maths.md section 9).

``alpha`` with ``horizon`` asks for the ``h`` whose false-alarm probability over ``horizon``
monitored measurements is ``alpha``:

* ``method="simulation"``: run *the detector's own update code*
  (:meth:`~hutchtrace.monitor.cusum_recursion.CUSUMRecursion._advance`) without a threshold on
  ``n_paths`` in-control N(0, 1) series drawn by a private generator, and take the
  ``1 - alpha`` quantile of ``M = max_{t <= horizon} max(S+_t, S-_t)`` (monitored sides).
  With ``account_warmup=True`` each simulated path first goes through the same warm-up
  estimation (mean/trend, sd, autocorrelation test, EWMA baseline;
  :mod:`hutchtrace.monitor.cusum_reference`), so the threshold controls the *unconditional*
  false-alarm rate including the estimation error of a short warm-up. Short warm-ups inflate
  false alarms far beyond what the ARL formula says (docs/maths.md section 9; *derivation
  check:* with ``n0 = 30`` the conditional ARL0 falls below half its target 38 % of the time).
* ``method="geometric"``: ``alpha = 1 - exp(-n/ARL0(h))`` with Siegmund's ARL0
  (:mod:`hutchtrace.monitor.cusum_arl`).

Before its first alarm a path does not depend on ``h``, except through the freeze limit
``freeze * h`` of a moving baseline. The quantile ``q(h)`` with the freeze limit at ``h``
decreases in ``h`` (a lower limit freezes more), so the threshold is the root of
``q(h) = h`` in ``[q(inf), q(0)]``, found by Brent's method on common random numbers.

Example:
    >>> from hutchtrace.monitor.cusum_simulation import threshold_for_alpha
    >>> h_geo = threshold_for_alpha(0.05, 1000, k=0.5, method="geometric")
    >>> h_sim = threshold_for_alpha(0.05, 1000, k=0.5, n_paths=4000)
    >>> round(h_geo, 2), round(h_sim, 2)       # the geometric approximation is close
    (8.02, 7.95)
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from .cusum_arl import threshold_for_arl
from .cusum_recursion import CUSUMRecursion, check_k

__all__ = ["check_alpha", "simulate_max_statistic", "simulated_threshold", "threshold_for_alpha"]


def threshold_for_alpha(
    alpha: float,
    horizon: int,
    k: float = 0.5,
    sides: int = 1,
    *,
    method: str = "simulation",
    n_paths: int = 50_000,
    seed: int = 0,
) -> float:
    """``h`` giving a false-alarm probability ``alpha`` over ``horizon`` steps (known mu0, sigma).

    ``method="simulation"``: the ``1 - alpha`` quantile of ``max_{t <= n} S_t`` over
    ``n_paths`` N(0,1) paths (private generator ``seed``). ``"geometric"``: solve
    ``alpha = 1 - exp(-n/ARL0(h))`` with Siegmund's ARL0. For a detector whose mean and scale
    are estimated from a warm-up, construct ``CUSUMDetector(alpha=..., horizon=...)`` instead,
    which simulates the estimation too.
    """
    check_alpha(alpha, horizon)
    if method == "geometric":
        return threshold_for_arl(-horizon / math.log1p(-alpha), k, sides)
    if method != "simulation":
        raise ValueError(f"method must be 'simulation' or 'geometric', got {method!r}")
    check_k(k)
    rec = CUSUMRecursion(k=k, h=math.inf, direction="both" if sides == 2 else "up", warmup=0)
    return simulated_threshold(rec, alpha, horizon, n_paths, seed, account_warmup=False)


def check_alpha(alpha: float, horizon: int) -> None:
    """Raise unless ``alpha`` is a probability in (0, 1) and ``horizon`` a positive int."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    if isinstance(horizon, bool) or not isinstance(horizon, (int, np.integer)) or horizon < 1:
        raise ValueError(
            f"horizon must be a positive int (number of monitored measurements), got {horizon!r}"
        )


def simulated_threshold(
    rec: CUSUMRecursion,
    alpha: float,
    horizon: int,
    n_paths: int,
    seed: int,
    account_warmup: bool,
    design: list[int] | None = None,
) -> float:
    """The ``1 - alpha`` quantile of the simulated maximum statistic of ``rec``'s configuration.

    With a moving baseline and ``freeze > 0``: the root of ``q(h) = h`` (module docstring).
    """

    def q(freeze_h: float) -> float:
        mx = simulate_max_statistic(
            rec,
            horizon,
            n_paths=n_paths,
            seed=seed,
            account_warmup=account_warmup,
            design=design,
            freeze_h=freeze_h,
        )
        return float(np.quantile(mx, 1.0 - alpha))

    if not (rec.lam > 0 and rec.freeze > 0):
        return q(math.inf)
    lo, hi = q(math.inf), q(0.0)
    if hi - lo <= 1e-9 * max(1.0, hi):
        return hi
    from scipy.optimize import brentq

    return float(brentq(lambda h: q(h) - h, lo, hi, xtol=1e-3 * lo, rtol=1e-6))


def simulate_max_statistic(
    rec: CUSUMRecursion,
    horizon: int,
    n_paths: int = 20_000,
    seed: int = 0,
    account_warmup: bool = True,
    design: list[int] | None = None,
    freeze_h: float | None = None,
    chunk: int = 20_000,
) -> np.ndarray:
    """``max_{t <= horizon} max(S+_t, S-_t)`` (monitored sides) on in-control N(0,1) paths.

    Runs ``rec``'s configuration (k, direction, baseline, autocorrelation rule) with no
    threshold. With ``account_warmup`` each path first calibrates on its own ``rec.warmup``
    N(0,1) measurements (or, with ``design=[n_1, ..., n_R]``, on R independent warm-up runs
    of those lengths, pooled); otherwise the in-control model is known exactly. A private
    ``numpy`` generator seeded with ``seed`` draws the paths. The baseline freeze limit is
    ``freeze * freeze_h`` (default: ``rec.h``; ``inf`` when that is not finite).
    """
    design = [rec.warmup] if design is None else [int(n) for n in design]
    rng = np.random.default_rng(seed)
    out = np.empty(n_paths)
    for start in range(0, n_paths, chunk):
        m = min(chunk, n_paths - start)
        d = rec._clone_config()
        d._freeze_h = rec.h if freeze_h is None else float(freeze_h)
        d.h = math.inf
        d.names = [str(i) for i in range(m)]
        if account_warmup and sum(design) >= 3:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                d._fit([rng.standard_normal((n, m)) for n in design], [np.zeros((n, m)) for n in design])
        else:
            _know_standard_model(d, m)
        zero = np.zeros(m)
        ok = np.ones(m, dtype=bool)
        best = np.zeros(m)
        for _ in range(horizon):
            d._advance(rng.standard_normal(m), zero, ok)
            if rec.direction != "down":
                np.maximum(best, d.s_pos, out=best)
            if rec.direction != "up":
                np.maximum(best, d.s_neg, out=best)
        out[start : start + m] = best
    return out


def _know_standard_model(d: CUSUMRecursion, m: int) -> None:
    """Give ``d`` m series with the exactly known in-control model N(0, 1)."""
    d.names = None
    d._ensure_names([str(i) for i in range(m)])
    d.sigma_proc2 = np.ones(m)
    d.inflation = np.full(m, 2.0 / (2.0 - d.lam) if d.lam > 0 else 1.0)
    d.phi, d.u_prev, d.follow = np.zeros(m), np.zeros(m), np.zeros(m, dtype=bool)
    d.calibrated = True
