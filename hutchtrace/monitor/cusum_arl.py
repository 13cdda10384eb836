"""Average run lengths of a Page CUSUM and the threshold for a target ARL0 (docs/maths.md section 9).

For the one-sided upper CUSUM ``S_t = max(0, S_{t-1} + y_t - k)`` with independent
increments ``y_t ~ N(mu, sd^2)``, Siegmund's approximation of the average run length to the
first ``S_t > h`` is

.. math::

    ARL(\\mu) = \\frac{e^{-2 D b} + 2 D b - 1}{2 D^2},\\qquad
    D = (\\mu - k)/sd,\\quad b = h/sd + 1.166

(``ARL = b^2`` when ``D = 0``; 1.166 is the overshoot correction for Gaussian increments).
The lower CUSUM with increments of mean ``mu`` has the ARL of the upper one at ``-mu``; a
two-sided CUSUM stops at the first of the two, ``1/ARL = 1/ARL+ + 1/ARL-``. In control
(``mu = 0``) ``ARL0(h)`` increases in ``h``, so the threshold for a target ARL0 is found by
bisection. Reference values (``k = 0.5``): ARL0 500 -> ``h = 4.381``, 1000 -> ``h = 5.063``;
``k = 0.25``, 1000 -> ``h = 8.582``. The approximation is accurate to about 6 % against
simulation (docs/maths.md section 9).

The threshold for a false-alarm *probability* over a horizon is in
:mod:`hutchtrace.monitor.cusum_simulation`.

Example:
    >>> from hutchtrace.monitor.cusum_arl import arl0, threshold_for_arl
    >>> h = threshold_for_arl(1000, k=0.5)
    >>> round(h, 3), round(arl0(0.5, h))
    (5.063, 1000)
"""

from __future__ import annotations

import math

__all__ = ["SIEGMUND_CORRECTION", "arl0", "siegmund_arl", "threshold_for_arl"]

SIEGMUND_CORRECTION = 1.166  # Siegmund's overshoot correction for Gaussian increments


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
