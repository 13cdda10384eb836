"""Calibrated Page CUSUM change detection on per-block trace series (docs/maths.md section 9).

Each monitored series ``x_t`` (one per block) is a trace estimate with standard error
``SE_t``. :class:`CUSUMDetector` standardises it against an in-control model and accumulates

.. math::

    y_t = (x_t - m_{t-1}) / \\sigma_t,\\qquad
    S^+_t = \\max(0, S^+_{t-1} + y_t - k),\\qquad
    S^-_t = \\max(0, S^-_{t-1} - y_t - k),

and raises an :class:`Alarm` at the first ``t`` with ``S^+_t > h`` ("up") or ``S^-_t > h``
("down"); both statistics of that series are then reset to 0. A non-finite value is never
fed to the statistics; it raises an alarm with ``direction="nonfinite"``.

The pieces, one module each:

* :mod:`~hutchtrace.monitor.cusum_reference`: the in-control model fitted on the warm-up:
  level (mean, or a straight line with a moving baseline), process variance
  ``sigma_proc^2 = max(0, s_x^2 - mean SE_t^2)`` so the between-batch floor counts, the
  lag-1 autocorrelation and what is done about it (``autocorr``: whiten / inflate / warn).
* :mod:`~hutchtrace.monitor.cusum_recursion`: the vectorised recursion, the whitening step
  and the EWMA baseline frozen while the statistic is up (``halflife``, ``freeze``).
* :mod:`~hutchtrace.monitor.cusum_arl`: Siegmund's ARL and the threshold ``h`` for a target
  in-control ARL (``arl0=``; ``k = 0.5``, ARL0 1000 -> ``h = 5.063``).
* :mod:`~hutchtrace.monitor.cusum_simulation`: the threshold for a false-alarm probability
  ``alpha`` over ``horizon`` measurements, simulated with this detector's own update code
  and, with ``account_warmup=True``, its own warm-up estimation.

This module is the user-facing detector: the checked configuration, the threshold choice,
calibration from a warm-up, several runs or a known model, alarms, inspection and
persistence (``state_dict``).

Example:
    >>> import numpy as np
    >>> from hutchtrace import CUSUMDetector
    >>> det = CUSUMDetector(k=0.5, arl0=1000, warmup=50, direction="up")
    >>> round(det.h, 3)
    5.063
    >>> rng = np.random.default_rng(0)
    >>> x = np.r_[rng.normal(10, 1, 150), rng.normal(12, 1, 50)]     # +2 sigma at t = 150
    >>> alarms = [a for t, v in enumerate(x) for a in det.update({"fc1": v}, step=t)]
    >>> alarms[0].block, alarms[0].direction, 150 <= alarms[0].step < 160
    ('fc1', 'up', True)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from .cusum_arl import threshold_for_arl
from .cusum_recursion import CUSUMRecursion, check_k
from .cusum_reference import known_in_control
from .cusum_simulation import check_alpha, simulate_max_statistic, simulated_threshold, threshold_for_alpha

__all__ = ["Alarm", "CUSUMDetector"]

_DIRECTIONS = ("both", "up", "down")
_AUTOCORR = ("whiten", "inflate", "warn", "ignore")


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
class CUSUMDetector(CUSUMRecursion):
    """Calibrated Page CUSUM over one or more named series (see the module docstring).

    Args:
        k: reference value in sigma units (``k = delta/2`` for a target shift ``delta``).
        h: decision threshold in sigma units; or derive it from ``arl0`` or ``alpha``+``horizon``
            (default when none is given: ``arl0=1000`` measurements).
        arl0: target in-control average run length (measurements, per series).
        alpha, horizon: target false-alarm probability over ``horizon`` monitored measurements.
        method: ``"simulation"`` or ``"geometric"`` for the alpha threshold.
        direction: ``"both"`` (two-sided), ``"up"`` or ``"down"``.
        warmup: number of measurements of each series used for calibration (n0). >= 300 is
            advised for a reliable ARL0 (short warm-ups inflate false alarms, docs/maths.md
            section 9); shorter warm-ups are covered by the ``alpha`` threshold with
            ``account_warmup=True``. 0 means "call :meth:`calibrate`".
        halflife: baseline EWMA half-life in measurements (``None``: fixed warm-up mean).
        autocorr: ``"whiten"``, ``"inflate"``, ``"warn"`` or ``"ignore"`` (lag-1 autocorrelation).
        account_warmup: include the warm-up estimation error in the simulated alpha threshold.
        n_paths, seed: simulation size and private generator seed for the alpha threshold.
        rebaseline: after an alarm, also move the baseline to the alarmed value (the new level
            becomes the reference) instead of keeping the old reference (docs/maths.md section 9:
            plain reset).
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
        _check_arguments(k, h, arl0, alpha, horizon, method, direction, warmup, halflife, autocorr, freeze)
        super().__init__(
            k,
            math.inf,  # placeholder: the threshold simulation runs without one
            direction,
            warmup=warmup,
            halflife=halflife,
            autocorr=autocorr,
            rebaseline=rebaseline,
            freeze=freeze,
            blocks=blocks,
        )
        self.h, self.threshold_source = self._choose_threshold(
            h, arl0, alpha, horizon, method, account_warmup, n_paths, seed
        )

    def _choose_threshold(
        self, h, arl0, alpha, horizon, method, account_warmup, n_paths, seed
    ) -> tuple[float, dict]:
        """``(h, threshold_source)`` from ``h``, ``alpha`` + ``horizon`` or ``arl0`` (default 1000)."""
        if h is not None:
            if not h > 0:
                raise ValueError(f"h must be > 0, got {h!r}")
            return float(h), {"kind": "given"}
        if alpha is not None:
            check_alpha(alpha, horizon)
            if method == "geometric":
                h = threshold_for_alpha(alpha, horizon, self.k, self.sides, method="geometric")
            else:
                h = simulated_threshold(self, alpha, int(horizon), n_paths, seed, account_warmup)
            return h, {
                "kind": "alpha",
                "alpha": alpha,
                "horizon": int(horizon),
                "method": method,
                "account_warmup": bool(account_warmup and method == "simulation"),
                "n_paths": n_paths,
                "seed": seed,
                "design": [self.warmup],
            }
        target = 1000.0 if arl0 is None else float(arl0)
        return threshold_for_arl(target, self.k, self.sides), {
            "kind": "arl0",
            "arl0": target,
            "method": "siegmund",
        }

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget the calibration and all statistics (start a new warm-up)."""
        self._reset_state()

    @property
    def in_warmup(self) -> bool:
        return not self.calibrated

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
            self.h = simulated_threshold(
                self, src["alpha"], src["horizon"], src["n_paths"], src["seed"], True, design=design
            )
            self.threshold_source = dict(src, design=design)
        return self

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
        self._start(known_in_control(mu0, sigma, rho, self.lam, self.autocorr))
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
        return simulate_max_statistic(self, horizon, n_paths, seed, account_warmup, design, freeze_h, chunk)

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


def _check_arguments(
    k, h, arl0, alpha, horizon, method, direction, warmup, halflife, autocorr, freeze
) -> None:
    """The checks of :class:`CUSUMDetector`'s arguments, each error naming the fix."""
    check_k(k)
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
