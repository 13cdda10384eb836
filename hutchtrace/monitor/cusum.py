"""Page CUSUM change detection on per-block trace series (SPEC section 9).

Each monitored series ``x_t`` (one per block) is a trace estimate with standard error
``SE_t``. The detector standardises it against an in-control model and accumulates

.. math::

    y_t = (x_t - m_{t-1}) / \\sigma_t,\\qquad
    S^+_t = \\max(0, S^+_{t-1} + y_t - k),\\qquad
    S^-_t = \\max(0, S^-_{t-1} - y_t - k),

and raises an alarm at the first ``t`` with ``S^+_t > h`` ("up") or ``S^-_t > h``
("down"); both statistics of that series are then reset to 0. ``k = delta/2`` targets a
shift of ``delta`` standard deviations (default ``k = 0.5``: a 1-sigma shift).

**In-control variance.** ``sigma_t^2 = c^2 v (sigma_proc^2 + SE_t^2)`` where

* ``sigma_proc^2 = max(0, s_x^2 - mean(SE_t^2))`` over the warm-up: the between-batch
  variance ``Var_B tau`` (SPEC section 3) plus genuine step-to-step variation. Using the
  probe noise ``SE_t`` alone would ignore the batch floor and collapse the in-control ARL
  (SPEC section 9: target 1000, measured 395 / 100 / 44).
* ``v = 2/(2 - lambda)`` when the baseline is an EWMA with weight ``lambda``: the residual
  ``x_t - m_{t-1}`` also carries the baseline's own noise, ``Var m = sigma^2 lambda/(2-lambda)``.

**Autocorrelation.** Positive lag-1 autocorrelation makes CUSUM sums wander further than
independent increments do (SPEC: rho = 0.3 / 0.6 gives ARL0 206 / 87 for a target of
1000). The warm-up residuals' lag-1 autocorrelation ``rho`` is estimated; when it is
significant (``rho > 2/sqrt(n0)``, one-sided: negative correlation only makes CUSUM
conservative) the detector, by ``autocorr``:

* ``"whiten"`` (default): runs on the AR(1) prediction residuals of the standardised series,
  ``y_t = (u_t - rho u_{t-1}) / sqrt(1 - rho^2)``, ``u_t = (x_t - m_{t-1})/sigma_t``, which
  are independent with unit variance if the series is AR(1), so the ARL0 calibration holds.
  A sustained shift ``delta`` appears in ``y`` as ``delta sqrt((1 - rho)/(1 + rho))``.
* ``"inflate"``: multiplies the scale by ``c = sqrt((1 + rho)/(1 - rho))`` (the AR(1)
  long-run sd). Same sensitivity to a sustained shift, but *conservative*: measured ARL0
  for a target of 1000 was about 4100 at rho = 0.3 and 14000 at rho = 0.6 (mean over 2000
  paths, n0 = 300), because the in-control increments then have variance ``1/c^2 < 1``.
* ``"warn"``: warns and changes nothing; ``"ignore"``: only records ``rho``.

``rho`` is capped at 0.9.

**Detrending.** Training curves drift. With ``halflife`` set, the reference level
``m_t`` is a long-horizon EWMA, ``m_t = m_{t-1} + lambda (x_t - m_{t-1})``,
``lambda = 1 - 2^{-1/halflife}``, *frozen while the CUSUM statistic is up* so a developing
change is not absorbed into the baseline: frozen while ``max(S+, S-) > freeze * h``.
During the warm-up a straight line is fitted; its residuals give ``s_x^2`` and ``rho`` and
the baseline starts at the fitted end value. Without ``halflife`` the reference is the
warm-up mean ``mu0`` (classic CUSUM). A linear drift of slope ``beta`` per measurement
leaves a lag bias ``beta (1 - lambda)/lambda`` in the EWMA residuals: pick ``halflife``
short compared with the time over which the in-control curve bends.

``freeze=0`` is SPEC section 9's literal "frozen while S > 0"; the default ``freeze=0.5``
keeps tracking through ordinary in-control wiggles. Measured in-control ARL0 (known model,
target 1000, 1500 paths, MC se ~2.3 %): ``freeze=0``: 739 / 826 (one- / two-sided,
halflife 20), 841 / 950 (halflife 50); ``freeze=0.5``: 1037 / 1124 and 1009 / 1040. Under
a slow drift the rarely updated ``freeze=0`` baseline falls behind and alarms (drift 0.005
sigma per step, halflife 20, warm-up 100: every path alarmed within 600 steps, vs 83 % with
``freeze=0.5`` and 46 % without drift).

**Threshold ``h``.** Give ``h`` directly, or

* ``arl0=``: the in-control average run length (in measurements). Siegmund's approximation
  for ``N(mu, 1)`` increments, ``ARL(mu) = (e^{-2 D b} + 2 D b - 1)/(2 D^2)``,
  ``D = mu - k``, ``b = h + 1.166`` (``b^2`` when ``D = 0``), is inverted by bisection;
  two-sided: ``1/ARL = 1/ARL+ + 1/ARL-``. Reference values (k = 0.5): ARL0 500 -> h = 4.381,
  1000 -> h = 5.063; k = 0.25, 1000 -> 8.582. Accurate to about 6 % (SPEC section 9).
* ``alpha=`` with ``horizon=``: the false-alarm probability over ``horizon`` monitored
  measurements. ``method="simulation"`` (default) runs *this detector's own update code* on
  ``n_paths`` in-control Gaussian series with a private generator and takes the
  ``1 - alpha`` quantile of ``max_t max(S+_t, S-_t)``. With ``account_warmup=True`` each
  simulated path first goes through the same warm-up estimation (mean/trend, sd, rho test,
  EWMA baseline), so the threshold controls the *unconditional* false-alarm rate including
  the estimation error of a short warm-up (SPEC: with n0 = 30 the conditional ARL0 falls
  below half its target 38 % of the time). ``method="geometric"`` uses
  ``alpha = 1 - exp(-n/ARL0(h))`` with Siegmund's ARL0 instead.

Series with a non-finite value are never updated; the value raises an alarm with
``direction="nonfinite"``.

Example:
    >>> import numpy as np
    >>> from hutchtrace.monitor.cusum import CUSUMDetector, threshold_for_arl
    >>> round(threshold_for_arl(1000, k=0.5), 3)
    5.063
    >>> det = CUSUMDetector(k=0.5, arl0=1000, warmup=50, direction="up")
    >>> rng = np.random.default_rng(0)
    >>> x = np.r_[rng.normal(10, 1, 150), rng.normal(12, 1, 50)]     # +2 sigma at t = 150
    >>> alarms = [a for t, v in enumerate(x) for a in det.update({"fc1": v}, step=t)]
    >>> alarms[0].block, alarms[0].direction, 150 <= alarms[0].step < 160
    ('fc1', 'up', True)
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "Alarm",
    "CUSUMDetector",
    "siegmund_arl",
    "arl0",
    "threshold_for_arl",
    "threshold_for_alpha",
    "SIEGMUND_CORRECTION",
]

SIEGMUND_CORRECTION = 1.166  # Siegmund's overshoot correction for Gaussian increments
_DIRECTIONS = ("both", "up", "down")
_AUTOCORR = ("whiten", "inflate", "warn", "ignore")
_RHO_MAX = 0.9  # cap on the autocorrelation acted on


# --------------------------------------------------------------------------- ARL theory
def siegmund_arl(mu: float, k: float, h: float, sd: float = 1.0) -> float:
    """Siegmund's ARL of the one-sided upper CUSUM with increments ``N(mu, sd^2)``.

    ``ARL = (exp(-2 D b) + 2 D b - 1) / (2 D^2)`` with ``D = (mu - k)/sd`` and
    ``b = h/sd + 1.166``; ``b^2`` when ``D = 0``. (The lower CUSUM with increments of mean
    ``mu`` has the ARL of the upper one at ``-mu``.)
    """
    d = (mu - k) / sd
    b = h / sd + SIEGMUND_CORRECTION
    if abs(d) < 1e-9:
        return b * b
    x = -2.0 * d * b
    if x > 700:  # exp overflow: the ARL is astronomically large
        return math.inf
    if abs(x) < 1e-3:  # e^x - 1 - x cancels: Taylor series (error < x^8/8!)
        num = x * x * (1 / 2 + x * (1 / 6 + x * (1 / 24 + x * (1 / 120 + x * (1 / 720 + x / 5040)))))
    else:
        num = math.expm1(x) - x
    return num / (2.0 * d * d)


def arl0(k: float, h: float, sides: int = 1, sd: float = 1.0) -> float:
    """In-control ARL of a one-sided (``sides=1``) or two-sided (``sides=2``) CUSUM.

    Two-sided: ``1/ARL = 1/ARL+ + 1/ARL-`` (the two sides have the same ARL in control).
    """
    if sides not in (1, 2):
        raise ValueError(f"sides must be 1 or 2, got {sides!r}")
    return siegmund_arl(0.0, k, h, sd) / sides


def threshold_for_arl(target: float, k: float = 0.5, sides: int = 1, sd: float = 1.0) -> float:
    """The ``h`` with ``arl0(k, h, sides) = target``, by bisection (ARL0 is increasing in h).

    >>> round(threshold_for_arl(500, 0.5), 3), round(threshold_for_arl(1000, 0.25), 3)
    (4.381, 8.582)
    """
    if not target > 1:
        raise ValueError(f"the target in-control ARL must be > 1 measurement, got {target!r}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k!r}")
    lo, hi = 0.0, 1.0
    while arl0(k, hi, sides, sd) < target:
        hi *= 2.0
        if hi > 1e6:
            raise ValueError(f"no threshold reaches ARL0 = {target} with k = {k}")
    if arl0(k, lo, sides, sd) >= target:
        return 0.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if arl0(k, mid, sides, sd) < target:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


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
    are estimated from a warm-up, use :meth:`CUSUMDetector.threshold_for_alpha` instead,
    which simulates the estimation too.
    """
    _check_alpha(alpha, horizon)
    if method == "geometric":
        return threshold_for_arl(-horizon / math.log1p(-alpha), k, sides)
    if method != "simulation":
        raise ValueError(f"method must be 'simulation' or 'geometric', got {method!r}")
    det = CUSUMDetector(k=k, h=math.inf, direction="both" if sides == 2 else "up", warmup=0)
    return det._simulated_quantile(alpha, horizon, n_paths, seed, account_warmup=False)


def _check_alpha(alpha: float, horizon: int) -> None:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    if isinstance(horizon, bool) or not isinstance(horizon, (int, np.integer)) or horizon < 1:
        raise ValueError(
            f"horizon must be a positive int (number of monitored measurements), got {horizon!r}"
        )


# --------------------------------------------------------------------------- alarms
@dataclass(frozen=True)
class Alarm:
    """One CUSUM alarm.

    Attributes:
        block: series (block) name; step: the training step of the measurement;
        direction: ``"up"``, ``"down"`` or ``"nonfinite"``; statistic: the CUSUM value that
        crossed ``threshold`` (before the reset); value: the measured ``x_t``;
        baseline: the reference level ``m_{t-1}``; sigma: the in-control scale ``sigma_t``;
        index: the number of monitored (post-warm-up) measurements of this series so far.
    """

    block: str
    step: int
    direction: str
    statistic: float
    threshold: float
    value: float
    baseline: float
    sigma: float
    index: int

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return (
            f"CUSUM alarm: block {self.block!r} {self.direction} at step {self.step} "
            f"(S={self.statistic:.3g} > h={self.threshold:.3g}; x={self.value:.4g}, "
            f"baseline={self.baseline:.4g}, sigma={self.sigma:.3g})"
        )


# --------------------------------------------------------------------------- detector
class CUSUMDetector:
    """Calibrated Page CUSUM over one or more named series (see the module docstring).

    Args:
        k: reference value in sigma units (``k = delta/2`` for a target shift ``delta``).
        h: decision threshold in sigma units; or derive it from ``arl0`` or ``alpha``+``horizon``
            (default when none is given: ``arl0=1000`` measurements).
        arl0: target in-control average run length (measurements, per series).
        alpha, horizon: target false-alarm probability over ``horizon`` monitored measurements.
        method: ``"simulation"`` or ``"geometric"`` for the alpha threshold.
        direction: ``"both"`` (two-sided), ``"up"`` or ``"down"``.
        warmup: number of measurements of each series used for calibration (n0). SPEC
            recommends >= 300 for a reliable ARL0; shorter warm-ups are covered by the
            ``alpha`` threshold with ``account_warmup=True``. 0 means "call :meth:`calibrate`".
        halflife: baseline EWMA half-life in measurements (``None``: fixed warm-up mean).
        autocorr: ``"whiten"``, ``"inflate"``, ``"warn"`` or ``"ignore"`` (lag-1 autocorrelation).
        account_warmup: include the warm-up estimation error in the simulated alpha threshold.
        n_paths, seed: simulation size and private generator seed for the alpha threshold.
        rebaseline: after an alarm, also move the baseline to the alarmed value (the new level
            becomes the reference) instead of keeping the old reference (SPEC: plain reset).
        freeze: the moving baseline is frozen while ``max(S+, S-) > freeze * h`` (0 <= freeze < 1).
        blocks: restrict monitoring to these series names (others fed to :meth:`update` are
            ignored); ``None`` monitors every series seen in the first update.

    Example: see the module docstring.
    """

    def __init__(
        self,
        k: float = 0.5,
        h: float | None = None,
        *,
        arl0: float | None = None,
        alpha: float | None = None,
        horizon: int | None = None,
        method: str = "simulation",
        direction: str = "both",
        warmup: int = 50,
        halflife: float | None = None,
        autocorr: str = "whiten",
        account_warmup: bool = True,
        n_paths: int = 20_000,
        seed: int = 0,
        rebaseline: bool = False,
        freeze: float = 0.5,
        blocks: Sequence[str] | None = None,
    ):
        if not (isinstance(k, (int, float)) and math.isfinite(k) and k >= 0):
            raise ValueError(f"k must be a finite number >= 0, got {k!r}")
        if direction not in _DIRECTIONS:
            raise ValueError(f"direction must be one of {_DIRECTIONS}, got {direction!r}")
        if autocorr not in _AUTOCORR:
            raise ValueError(f"autocorr must be one of {_AUTOCORR}, got {autocorr!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, (int, np.integer)) or warmup < 0:
            raise ValueError(f"warmup must be an int >= 0 (measurements), got {warmup!r}")
        if warmup == 1 or (halflife is not None and 0 < warmup < 3):
            raise ValueError(f"warmup={warmup} cannot estimate a scale; use warmup >= 3 (>= 30 advised)")
        if halflife is not None and not (halflife > 0):
            raise ValueError(f"halflife must be > 0 measurements or None, got {halflife!r}")
        if sum(x is not None for x in (h, arl0, alpha)) > 1:
            raise ValueError("give at most one of h, arl0 and alpha (with horizon)")
        if (alpha is None) != (horizon is None):
            raise ValueError(
                "alpha and horizon go together: the false-alarm probability over horizon measurements"
            )
        if not (isinstance(freeze, (int, float)) and 0.0 <= freeze < 1.0):
            raise ValueError(f"freeze must be a fraction of h in [0, 1), got {freeze!r}")
        if method not in ("simulation", "geometric"):
            raise ValueError(f"method must be 'simulation' or 'geometric', got {method!r}")
        self.k = float(k)
        self.direction = direction
        self.warmup = int(warmup)
        self.halflife = None if halflife is None else float(halflife)
        self.lam = 0.0 if halflife is None else 1.0 - 2.0 ** (-1.0 / float(halflife))
        self.autocorr = autocorr
        self.rebaseline = bool(rebaseline)
        self.freeze = float(freeze)
        self.blocks = None if blocks is None else [str(b) for b in blocks]
        sides = 2 if direction == "both" else 1
        self.threshold_source: dict = {}
        if h is not None:
            if not h > 0:
                raise ValueError(f"h must be > 0, got {h!r}")
            self.h = float(h)
            self.threshold_source = {"kind": "given"}
        elif alpha is not None:
            _check_alpha(alpha, horizon)
            if method == "geometric":
                self.h = threshold_for_alpha(alpha, horizon, self.k, sides, method="geometric")
            else:
                self.h = math.inf  # placeholder: the simulation runs without a threshold
                self.h = self._simulated_quantile(alpha, int(horizon), n_paths, seed, account_warmup)
            self.threshold_source = {
                "kind": "alpha",
                "alpha": alpha,
                "horizon": int(horizon),
                "method": method,
                "account_warmup": bool(account_warmup and method == "simulation"),
                "n_paths": n_paths,
                "seed": seed,
                "design": [self.warmup],
            }
        else:
            target = 1000.0 if arl0 is None else float(arl0)
            self.h = threshold_for_arl(target, self.k, sides)
            self.threshold_source = {"kind": "arl0", "arl0": target, "method": "siegmund"}
        self._reset_state()

    # ------------------------------------------------------------------ state
    def _reset_state(self) -> None:
        self._freeze_h = None  # simulations run with h = inf but freeze relative to a finite h
        self.names: list[str] | None = None if self.blocks is None else list(self.blocks)
        n = 0 if self.names is None else len(self.names)
        self._warm_x: list[np.ndarray] = []
        self._warm_se2: list[np.ndarray] = []
        self.calibrated = False
        self.mu0 = np.zeros(n)
        self.baseline = np.zeros(n)
        self.sigma_proc2 = np.zeros(n)
        self.rho = np.zeros(n)
        self.inflation = np.ones(n)  # c^2 * v
        self.phi = np.zeros(n)  # whitening coefficient (rho acted on, or 0)
        self.follow = np.zeros(n, dtype=bool)  # one-sided: baseline follows an ignored-side move
        self.u_prev = np.zeros(n)  # previous standardised residual (for whitening)
        self.s_pos = np.zeros(n)
        self.s_neg = np.zeros(n)
        self.count = np.zeros(n, dtype=np.int64)  # monitored measurements per series
        self.n_alarms = 0

    def reset(self) -> None:
        """Forget the calibration and all statistics (start a new warm-up)."""
        self._reset_state()

    @property
    def sides(self) -> int:
        return 2 if self.direction == "both" else 1

    @property
    def in_warmup(self) -> bool:
        return not self.calibrated

    def _ensure_names(self, names: list[str]) -> None:
        if self.names is None:
            self.names = list(names)
            n = len(names)
            self.mu0, self.baseline = np.zeros(n), np.zeros(n)
            self.sigma_proc2, self.rho, self.inflation = np.zeros(n), np.zeros(n), np.ones(n)
            self.phi, self.u_prev, self.follow = np.zeros(n), np.zeros(n), np.zeros(n, dtype=bool)
            self.s_pos, self.s_neg = np.zeros(n), np.zeros(n)
            self.count = np.zeros(n, dtype=np.int64)

    def _vectors(self, values, ses) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(values, Mapping):
            self._ensure_names([str(n) for n in values] if self.blocks is None else self.blocks)
            missing = [n for n in self.names if n not in values]
            if missing:
                raise KeyError(
                    f"update() got no value for monitored series {missing}; it monitors {self.names}"
                )
            x = np.array([float(values[n]) for n in self.names], dtype=np.float64)
            if ses is None:
                se = np.zeros(len(self.names))
            elif isinstance(ses, Mapping):
                se = np.array([float(ses.get(n, 0.0)) for n in self.names], dtype=np.float64)
            else:
                raise TypeError("with a mapping of values, ses must be a mapping (name -> SE) or None")
        else:
            x = np.atleast_1d(np.asarray(values, dtype=np.float64))
            self._ensure_names([str(i) for i in range(x.size)])
            if x.shape != (len(self.names),):
                raise ValueError(
                    f"update() got {x.shape[0]} values for {len(self.names)} series {self.names}"
                )
            se = np.zeros_like(x) if ses is None else np.atleast_1d(np.asarray(ses, dtype=np.float64))
            if se.shape != x.shape:
                raise ValueError(f"ses has shape {se.shape}, values {x.shape}")
        se2 = se * se
        se2 = np.where(np.isfinite(se2), se2, 0.0)
        return x, se2

    # ------------------------------------------------------------------ calibration
    def calibrate(self, values, ses=None, names: Sequence[str] | None = None) -> CUSUMDetector:
        """Calibrate from warm-up data and start monitoring (resets the statistics).

        Args:
            values: ``(n0, J)`` array (n0 measurements of J series), a ``(n0,)`` array for one
                series, or a *list* of such arrays, one per run, to calibrate once on several
                runs: the trend (with ``halflife``) or the mean is then fitted within each run
                for the autocorrelation only, while the level ``mu0`` and ``s_x^2`` pool all
                runs around the pooled mean/trend so between-run variation counts as in-control.
            ses: matching standard errors (same shapes) or None (zero probe noise term).
            names: series names (default: existing names or ``"0".."J-1"``).

        Sets ``mu0``, ``sigma_proc2 = max(0, s_x^2 - mean SE^2)``, the lag-1 autocorrelation
        ``rho`` and the scale inflation (see the module docstring). If ``h`` came from
        ``alpha`` with ``account_warmup=True`` and this calibration's design (number of runs,
        measurements per run) differs from the one simulated, ``h`` is re-simulated for it.
        """
        runs = values if isinstance(values, list) else [values]
        se_runs = ses if isinstance(ses, list) else [ses] * len(runs)
        if len(se_runs) != len(runs):
            raise ValueError("ses must have one entry per run")
        xs, s2s = [], []
        for x, s in zip(runs, se_runs):
            x = np.asarray(x, dtype=np.float64)
            x = x[:, None] if x.ndim == 1 else x
            s2 = np.zeros_like(x) if s is None else np.asarray(s, dtype=np.float64).reshape(x.shape) ** 2
            xs.append(x)
            s2s.append(s2)
        J = xs[0].shape[1]
        if any(x.shape[1] != J for x in xs):
            raise ValueError("every run must have the same number of series")
        if names is not None:
            self.names = None
            self._ensure_names([str(n) for n in names])
        elif self.names is None or len(self.names) != J:
            self.names = None
            self._ensure_names([str(i) for i in range(J)])
        self._fit(xs, s2s)
        src = self.threshold_source
        design = [int(x.shape[0]) for x in xs]
        if src.get("kind") == "alpha" and src.get("account_warmup") and src.get("design") != design:
            self.h = self._simulated_quantile(
                src["alpha"], src["horizon"], src["n_paths"], src["seed"], True, design=design
            )
            self.threshold_source = dict(src, design=design)
        return self

    def _fit(self, xs: list[np.ndarray], s2s: list[np.ndarray]) -> None:
        detrend = self.lam > 0
        resid, lag_num, lag_den = [], 0.0, 0.0
        n_total = sum(x.shape[0] for x in xs)
        min_n = 3 if detrend else 2
        if any(x.shape[0] < min_n for x in xs):
            raise ValueError(
                f"each warm-up run needs >= {min_n} measurements, got {[x.shape[0] for x in xs]}"
            )
        bad = [not np.isfinite(x).all() for x in xs]
        if any(bad):
            raise ValueError("warm-up data contain NaN/Inf; calibrate on finite measurements only")
        if detrend:
            # pooled straight line over the common time axis of each run (t = 0..n-1)
            t = np.concatenate([np.arange(x.shape[0], dtype=np.float64) for x in xs])
            X = np.concatenate(xs, 0)
            tm = t.mean()
            slope = ((t - tm)[:, None] * (X - X.mean(0))).sum(0) / ((t - tm) ** 2).sum()
            icpt = X.mean(0) - slope * tm
            resid_all = X - (icpt + slope * t[:, None])
            dof = n_total - 2
            t_end = max(x.shape[0] for x in xs) - 1
            mu0 = icpt + slope * t_end
            off = 0
            for x in xs:
                r = resid_all[off : off + x.shape[0]]
                off += x.shape[0]
                resid.append(r)
        else:
            X = np.concatenate(xs, 0)
            mu0 = X.mean(0)
            resid_all = X - mu0
            dof = n_total - 1
            for x in xs:
                resid.append(x - mu0)
        # lag-1 autocorrelation within runs, of residuals centred per run (between-run level
        # differences are variance, not autocorrelation)
        for r in resid:
            rc = r - r.mean(0)
            lag_num = lag_num + (rc[1:] * rc[:-1]).sum(0)
            lag_den = lag_den + (rc * rc).sum(0)
        sx2 = (resid_all**2).sum(0) / max(dof, 1)
        se2_mean = np.concatenate(s2s, 0).mean(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            rho = np.where(lag_den > 0, lag_num / lag_den, 0.0)
        crit = 2.0 / math.sqrt(n_total)
        significant = rho > crit
        if significant.any() and self.autocorr != "ignore":
            names = [self.names[i] for i in np.flatnonzero(significant)]
            if self.autocorr == "warn":
                warnings.warn(
                    f"CUSUM warm-up: lag-1 autocorrelation {np.round(rho[significant], 2).tolist()} of "
                    "series "
                    f"{names} exceeds 2/sqrt(n0) = {crit:.2f}; the in-control ARL will be shorter than its "
                    "target. "
                    "Use autocorr='whiten', a detrending halflife, or a sparser measurement interval.",
                    stacklevel=3,
                )
        acted = np.where(significant, np.clip(rho, 0.0, _RHO_MAX), 0.0)
        c2 = (1.0 + acted) / (1.0 - acted) if self.autocorr == "inflate" else np.ones_like(acted)
        v = 2.0 / (2.0 - self.lam) if detrend else 1.0
        self.mu0 = np.asarray(mu0, dtype=np.float64).copy()
        self.baseline = self.mu0.copy()
        self.follow = np.zeros(self.mu0.shape, dtype=bool)
        self.sigma_proc2 = np.maximum(0.0, sx2 - se2_mean)
        self.rho = rho
        self.inflation = c2 * v
        self.phi = acted if self.autocorr == "whiten" else np.zeros_like(acted)
        # the last warm-up residual seeds the whitening recursion
        last = resid[-1][-1]
        scale = np.sqrt(self.inflation * (self.sigma_proc2 + s2s[-1][-1]))
        with np.errstate(divide="ignore", invalid="ignore"):
            self.u_prev = np.where(scale > 0, last / np.where(scale > 0, scale, 1.0), 0.0)
        self.s_pos = np.zeros_like(self.mu0)
        self.s_neg = np.zeros_like(self.mu0)
        self.count = np.zeros(self.mu0.shape, dtype=np.int64)
        self._warm_x, self._warm_se2 = [], []
        self.calibrated = True

    def set_reference(self, mu0, sigma, names: Sequence[str] | None = None, rho=0.0) -> CUSUMDetector:
        """Use a known in-control model instead of a warm-up: level ``mu0`` and process sd ``sigma``.

        ``sigma`` is the sd of ``x_t`` *without* the probe noise (``sigma_proc``); the probe
        ``SE_t`` passed to :meth:`update` is added per step. ``rho`` (lag-1 autocorrelation)
        is acted on as the ``autocorr`` setting says (``"whiten"`` / ``"inflate"``).
        """
        mu0 = np.atleast_1d(np.asarray(mu0, dtype=np.float64))
        sigma = np.broadcast_to(np.asarray(sigma, dtype=np.float64), mu0.shape)
        rho = np.broadcast_to(np.asarray(rho, dtype=np.float64), mu0.shape)
        if (sigma < 0).any() or not np.isfinite(sigma).all() or not np.isfinite(mu0).all():
            raise ValueError("mu0 must be finite and sigma finite and >= 0")
        self.names = None
        self._ensure_names(
            [str(n) for n in names] if names is not None else [str(i) for i in range(mu0.size)]
        )
        if len(self.names) != mu0.size:
            raise ValueError(f"{len(self.names)} names for {mu0.size} series")
        r = np.clip(rho, 0.0, _RHO_MAX)
        self.mu0, self.baseline = mu0.copy(), mu0.copy()
        self.follow = np.zeros(mu0.shape, dtype=bool)
        self.sigma_proc2 = sigma * sigma
        self.rho = rho.copy()
        c2 = (1.0 + r) / (1.0 - r) if self.autocorr == "inflate" else np.ones_like(r)
        self.inflation = c2 * (2.0 / (2.0 - self.lam) if self.lam > 0 else 1.0)
        self.phi = r.copy() if self.autocorr == "whiten" else np.zeros_like(r)
        self.u_prev = np.zeros_like(r)
        self.s_pos, self.s_neg = np.zeros_like(r), np.zeros_like(r)
        self.count = np.zeros(r.shape, dtype=np.int64)
        self._warm_x, self._warm_se2 = [], []
        self.calibrated = True
        return self

    def restart(self) -> CUSUMDetector:
        """Keep the calibration, reset the statistics and the baseline to ``mu0``.

        Use it to apply a detector calibrated once (e.g. on reference runs) to a new run.
        """
        if not self.calibrated:
            raise RuntimeError("restart() needs a calibrated detector; it would only drop the warm-up data")
        self.baseline = self.mu0.copy()
        self.s_pos, self.s_neg = np.zeros_like(self.mu0), np.zeros_like(self.mu0)
        self.u_prev = np.zeros_like(self.mu0)
        self.follow = np.zeros(self.mu0.shape, dtype=bool)
        self.count = np.zeros(self.mu0.shape, dtype=np.int64)
        self.n_alarms = 0
        return self

    def copy(self) -> CUSUMDetector:
        """An independent detector with the same configuration and state."""
        d = CUSUMDetector(h=1.0)
        d.load_state_dict(self.state_dict())
        return d

    # ------------------------------------------------------------------ update
    def update(self, values, ses=None, step: int | None = None) -> list[Alarm]:
        """Feed one measurement of every series; returns the alarms it raised (maybe none).

        Args:
            values: mapping ``name -> x_t`` (a :class:`~hutchtrace.estimate.result.BlockTraces`'s
                ``{b.name: b.mean}``) or a sequence in ``names`` order.
            ses: mapping/sequence of standard errors ``SE_t`` (None: 0).
            step: the training step to stamp on alarms (default: the update count).
        """
        x, se2 = self._vectors(values, ses)
        if step is None:
            step = int(self.count.max(initial=0)) + len(self._warm_x)
        alarms: list[Alarm] = []
        finite = np.isfinite(x)
        for i in np.flatnonzero(~finite):
            alarms.append(
                Alarm(
                    self.names[i],
                    int(step),
                    "nonfinite",
                    math.nan,
                    self.h,
                    float(x[i]),
                    float(self.baseline[i]),
                    math.nan,
                    int(self.count[i]),
                )
            )
        if not self.calibrated:
            if self.warmup == 0:
                raise RuntimeError(
                    "this CUSUMDetector has warmup=0 and no calibration: call calibrate(...) or "
                    "set_reference(...) first, or construct it with warmup=n0"
                )
            if finite.all():
                self._warm_x.append(x)
                self._warm_se2.append(se2)
            if self.warmup > 0 and len(self._warm_x) >= self.warmup:
                self._fit([np.stack(self._warm_x)], [np.stack(self._warm_se2)])
            self.n_alarms += len(alarms)
            return alarms
        up, down, y, sig = self._advance(x, se2, finite)
        for i in np.flatnonzero(up | down):
            d = "up" if up[i] else "down"
            stat = self._last_pos[i] if up[i] else self._last_neg[i]
            alarms.append(
                Alarm(
                    self.names[i],
                    int(step),
                    d,
                    float(stat),
                    self.h,
                    float(x[i]),
                    float(self._last_base[i]),
                    float(sig[i]),
                    int(self.count[i]),
                )
            )
        self.n_alarms += len(alarms)
        return alarms

    def _advance(self, x: np.ndarray, se2: np.ndarray, finite: np.ndarray):
        """One vectorised CUSUM step over all series (also used by the simulations).

        Both sides are always accumulated. A moving baseline is updated only at steps where
        both statistics are ``<= freeze * h`` after this step. The rule must be symmetric:
        updating whenever the *monitored* side alone is low would update only after low values
        and bias a one-sided baseline low (measured: one-sided ARL0 122 instead of 1000 at
        halflife 50, freeze 0). For a one-sided detector the ignored side is reset silently
        when it crosses ``h``; the baseline then *follows* (updates whenever the monitored side
        is low) until both sides are low again, so a lasting move in the ignored direction is
        absorbed at the EWMA rate instead of freezing the baseline for good.
        """
        base = self.baseline
        sig = np.sqrt(self.inflation * (self.sigma_proc2 + se2))
        r = np.where(finite, x - base, 0.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            u = np.where(sig > 0, r / np.where(sig > 0, sig, 1.0), np.sign(r) * np.inf)
        u = np.where(r == 0, 0.0, u)
        phi = self.phi
        with np.errstate(invalid="ignore"):
            y = np.where(phi > 0, (u - phi * self.u_prev) / np.sqrt(1.0 - phi * phi), u)
        y = np.where(np.isnan(y), 0.0, y)  # inf - inf: a degenerate (zero-variance) series
        s_pos = np.where(finite, np.maximum(0.0, self.s_pos + y - self.k), self.s_pos)
        s_neg = np.where(finite, np.maximum(0.0, self.s_neg - y - self.k), self.s_neg)
        cross_pos, cross_neg = s_pos > self.h, s_neg > self.h
        up = finite & (self.direction != "down") & cross_pos
        down = finite & (self.direction != "up") & cross_neg
        alarm = up | down
        silent = finite & ~alarm & (cross_pos | cross_neg)  # the ignored side crossed
        restart = alarm | silent
        self._last_pos, self._last_neg, self._last_base = s_pos, s_neg, base
        if self.lam > 0:
            mon = (
                s_pos
                if self.direction == "up"
                else s_neg
                if self.direction == "down"
                else np.maximum(s_pos, s_neg)
            )
            ref_h = self.h if self._freeze_h is None else self._freeze_h
            lim = self.freeze * ref_h if self.freeze > 0 else 0.0  # (0 * inf is nan)
            both_zero = np.maximum(s_pos, s_neg) <= lim
            move = finite & ~alarm & (mon <= lim) & (both_zero | self.follow | silent)
            base = np.where(move, base + self.lam * (x - base), base)
            self.follow = np.where(finite, (self.follow | silent) & ~both_zero, self.follow)
        if self.rebaseline:
            base = np.where(alarm, x, base)
        self.u_prev = np.where(finite, np.where(alarm & self.rebaseline, 0.0, u), self.u_prev)
        self.baseline = base
        self.s_pos = np.where(restart, 0.0, s_pos)
        self.s_neg = np.where(restart, 0.0, s_neg)
        self.count = self.count + finite
        return up, down, y, sig

    # ------------------------------------------------------------------ inspection
    def statistics(self) -> dict[str, dict[str, float]]:
        """``{name: {"up": S+, "down": S-, "baseline": m, "sigma_proc": ..., "rho": ...}}``."""
        if self.names is None:
            return {}
        out = {}
        for i, n in enumerate(self.names):
            out[n] = {
                "up": float(self.s_pos[i]) if self.calibrated else math.nan,
                "down": float(self.s_neg[i]) if self.calibrated else math.nan,
                "baseline": float(self.baseline[i]) if self.calibrated else math.nan,
                "sigma_proc": math.sqrt(self.sigma_proc2[i]) if self.calibrated else math.nan,
                "rho": float(self.rho[i]) if self.calibrated else math.nan,
            }
        return out

    def scale(self, se: Iterable[float] | float = 0.0) -> np.ndarray:
        """The in-control ``sigma_t`` for a given probe SE (per series)."""
        se = np.broadcast_to(np.asarray(se, dtype=np.float64), self.sigma_proc2.shape)
        return np.sqrt(self.inflation * (self.sigma_proc2 + se * se))

    def __repr__(self) -> str:
        src = self.threshold_source
        return (
            f"CUSUMDetector(k={self.k}, h={self.h:.4g} [{src.get('kind')}], direction={self.direction!r}, "
            f"warmup={self.warmup}, halflife={self.halflife}, calibrated={self.calibrated}, "
            f"series={self.names})"
        )

    # ------------------------------------------------------------------ simulation
    def _clone_config(self) -> CUSUMDetector:
        d = CUSUMDetector.__new__(CUSUMDetector)
        for key in (
            "k",
            "direction",
            "warmup",
            "halflife",
            "lam",
            "autocorr",
            "rebaseline",
            "freeze",
            "h",
            "threshold_source",
        ):
            setattr(d, key, getattr(self, key))
        d.blocks = None
        d._reset_state()
        return d

    def _simulated_quantile(
        self,
        alpha: float,
        horizon: int,
        n_paths: int,
        seed: int,
        account_warmup: bool,
        design: list[int] | None = None,
    ) -> float:
        """The ``1 - alpha`` quantile of the simulated maximum statistic.

        Before its first alarm a path does not depend on ``h``, except through the baseline
        freeze limit ``freeze * h`` of a moving baseline. Then ``q(h)``, the quantile with the
        freeze limit at ``h``, decreases in ``h`` (a lower limit freezes more), and the
        threshold is the root of ``q(h) = h`` in ``[q(inf), q(0)]``, found by Brent's method
        on common random numbers.
        """

        def q(freeze_h: float) -> float:
            mx = self.simulate_max_statistic(
                horizon,
                n_paths=n_paths,
                seed=seed,
                account_warmup=account_warmup,
                design=design,
                freeze_h=freeze_h,
            )
            return float(np.quantile(mx, 1.0 - alpha))

        if not (self.lam > 0 and self.freeze > 0):
            return q(math.inf)
        lo, hi = q(math.inf), q(0.0)
        if hi - lo <= 1e-9 * max(1.0, hi):
            return hi
        from scipy.optimize import brentq

        return float(brentq(lambda h: q(h) - h, lo, hi, xtol=1e-3 * lo, rtol=1e-6))

    def simulate_max_statistic(
        self,
        horizon: int,
        n_paths: int = 20_000,
        seed: int = 0,
        account_warmup: bool = True,
        design: list[int] | None = None,
        freeze_h: float | None = None,
        chunk: int = 20_000,
    ) -> np.ndarray:
        """``max_{t <= horizon} max(S+_t, S-_t)`` (monitored sides) on in-control N(0,1) paths.

        Runs this detector's configuration (k, direction, baseline, autocorrelation rule) with
        no threshold. With ``account_warmup`` each path first calibrates on its own
        ``warmup`` N(0,1) measurements (or, with ``design=[n_1, ..., n_R]``, on R independent
        warm-up runs of those lengths pooled as :meth:`calibrate` pools them); otherwise the
        in-control model is known exactly. A private ``numpy`` generator seeded with ``seed``
        draws the paths. The baseline freeze limit is ``freeze * freeze_h`` (default: this
        detector's ``h``; ``inf`` when that is not finite).
        """
        design = [self.warmup] if design is None else [int(n) for n in design]
        rng = np.random.default_rng(seed)
        out = np.empty(n_paths)
        for start in range(0, n_paths, chunk):
            m = min(chunk, n_paths - start)
            d = self._clone_config()
            d._freeze_h = self.h if freeze_h is None else float(freeze_h)
            d.h = math.inf
            d.names = [str(i) for i in range(m)]
            if account_warmup and sum(design) >= 3:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    d._fit([rng.standard_normal((n, m)) for n in design], [np.zeros((n, m)) for n in design])
            else:
                d.names = None
                d._ensure_names([str(i) for i in range(m)])
                d.sigma_proc2 = np.ones(m)
                d.inflation = np.full(m, 2.0 / (2.0 - d.lam) if d.lam > 0 else 1.0)
                d.phi, d.u_prev, d.follow = np.zeros(m), np.zeros(m), np.zeros(m, dtype=bool)
                d.calibrated = True
            zero = np.zeros(m)
            ok = np.ones(m, dtype=bool)
            best = np.zeros(m)
            for _ in range(horizon):
                d._advance(rng.standard_normal(m), zero, ok)
                if self.direction != "down":
                    np.maximum(best, d.s_pos, out=best)
                if self.direction != "up":
                    np.maximum(best, d.s_neg, out=best)
            out[start : start + m] = best
        return out

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        """Everything needed to continue exactly (plain Python types; JSON- and torch.save-able)."""
        arr = lambda a: [float(v) for v in np.asarray(a, dtype=np.float64)]  # noqa: E731
        return {
            "version": 1,
            "config": {
                "k": self.k,
                "h": self.h,
                "direction": self.direction,
                "warmup": self.warmup,
                "halflife": self.halflife,
                "autocorr": self.autocorr,
                "rebaseline": self.rebaseline,
                "freeze": self.freeze,
                "blocks": self.blocks,
                "threshold_source": dict(self.threshold_source),
            },
            "names": None if self.names is None else list(self.names),
            "calibrated": self.calibrated,
            "warm_x": [arr(v) for v in self._warm_x],
            "warm_se2": [arr(v) for v in self._warm_se2],
            "mu0": arr(self.mu0),
            "baseline": arr(self.baseline),
            "sigma_proc2": arr(self.sigma_proc2),
            "rho": arr(self.rho),
            "inflation": arr(self.inflation),
            "phi": arr(self.phi),
            "u_prev": arr(self.u_prev),
            "follow": [bool(v) for v in self.follow],
            "s_pos": arr(self.s_pos),
            "s_neg": arr(self.s_neg),
            "count": [int(c) for c in self.count],
            "n_alarms": int(self.n_alarms),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output (configuration included)."""
        if not isinstance(state, Mapping) or state.get("version") != 1:
            raise ValueError("not a CUSUMDetector state_dict (version 1)")
        c = state["config"]
        self.k, self.h, self.direction, self.warmup = (
            float(c["k"]),
            float(c["h"]),
            c["direction"],
            int(c["warmup"]),
        )
        self.halflife = c["halflife"]
        self.lam = 0.0 if self.halflife is None else 1.0 - 2.0 ** (-1.0 / float(self.halflife))
        self.autocorr, self.rebaseline, self.blocks = c["autocorr"], bool(c["rebaseline"]), c["blocks"]
        self.freeze = float(c.get("freeze", 0.0))
        self.threshold_source = dict(c.get("threshold_source", {}))
        self.names = None if state["names"] is None else list(state["names"])
        self.calibrated = bool(state["calibrated"])
        f = lambda key: np.asarray(state[key], dtype=np.float64)  # noqa: E731
        self._warm_x = [np.asarray(v, dtype=np.float64) for v in state["warm_x"]]
        self._warm_se2 = [np.asarray(v, dtype=np.float64) for v in state["warm_se2"]]
        self.mu0, self.baseline, self.sigma_proc2 = f("mu0"), f("baseline"), f("sigma_proc2")
        self.rho, self.inflation, self.s_pos, self.s_neg = f("rho"), f("inflation"), f("s_pos"), f("s_neg")
        self.phi, self.u_prev = f("phi"), f("u_prev")
        self.follow = np.asarray(state["follow"], dtype=bool)
        self.count = np.asarray(state["count"], dtype=np.int64)
        self.n_alarms = int(state["n_alarms"])
