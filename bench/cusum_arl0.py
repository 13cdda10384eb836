"""In-control average run length (ARL0) of ``CUSUMDetector`` in the configurations docs/monitor.md
discusses, by simulation (no timing: the results do not depend on the machine's load).

Every configuration targets ARL0 = 1000 (``arl0=1000``, ``k = 0.5``) and runs ``--paths``
independent in-control series until each has raised its first alarm, through the detector's
own vectorised update (``CUSUMDetector._advance``, the code ``update`` runs):

* fixed reference, known in-control model (``set_reference(0, 1)``), one- and two-sided;
* EWMA baseline (``halflife`` 20 or 50, ``freeze`` 0.5 or 0), known model;
* AR(1) series (``rho`` 0.3 / 0.6), one-sided, calibrated on a warm-up of ``n0 = 300``
  measurements per series, with ``autocorr`` = ``"ignore"``, ``"whiten"`` or ``"inflate"``.

Reported per configuration: the mean run length with its Monte-Carlo standard error, and the
median. A series without an alarm after 200,000 steps is censored there; the mean is then a
lower bound ("≥"), flagged with the number of censored series. Results:
``cpu_cusum_arl0.{json,md}`` (through :func:`models.write_results`).

    python bench/cusum_arl0.py                      # /tmp/hutchtrace-bench (a few minutes)
    HUTCHTRACE_BENCH_PUBLISH=1 python bench/cusum_arl0.py    # bench/results/ (run_cpu_suite.py --publish)
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]  # this checkout
import models as bm  # noqa: E402

from hutchtrace import CUSUMDetector  # noqa: E402

TARGET = 1000
N0 = 300
TMAX = 200_000


def run_lengths(det: CUSUMDetector, draw, n: int, tmax: int = TMAX) -> np.ndarray:
    """Steps to the first alarm of ``n`` independent series (``draw()`` gives one step of all);
    a series still silent after ``tmax`` steps is censored at ``tmax``."""
    rl = np.full(n, tmax)
    alive = np.ones(n, dtype=bool)
    ok, zero = np.ones(n, dtype=bool), np.zeros(n)
    t = 0
    while alive.any() and t < tmax:
        t += 1
        up, down, _, _ = det._advance(draw(), zero, ok)
        hit = alive & (up | down)
        rl[hit] = t
        alive &= ~hit
    return rl


def iid(rng, n):
    return lambda: rng.standard_normal(n)


def ar1(rng, n, rho, start):
    state = {"x": start}

    def draw():
        state["x"] = rho * state["x"] + math.sqrt(1 - rho**2) * rng.standard_normal(n)
        return state["x"]

    return draw, state


def configurations(paths: int, seed: int):
    """``label -> run lengths``."""
    out = {}
    rng = np.random.default_rng(seed)
    for direction in ("up", "both"):
        det = CUSUMDetector(k=0.5, arl0=TARGET, direction=direction, warmup=0).set_reference(
            np.zeros(paths), np.ones(paths))
        out[f"fixed reference, {'one' if direction == 'up' else 'two'}-sided"] = run_lengths(det, iid(rng, paths),
                                                                                              paths)
    for halflife, freeze in ((20.0, 0.5), (50.0, 0.5), (20.0, 0.0)):
        for direction in ("up", "both"):
            det = CUSUMDetector(k=0.5, arl0=TARGET, direction=direction, warmup=0, halflife=halflife,
                                freeze=freeze).set_reference(np.zeros(paths), np.ones(paths))
            label = (f"EWMA baseline, halflife {halflife:g}, freeze={freeze:g}, "
                     f"{'one' if direction == 'up' else 'two'}-sided")
            out[label] = run_lengths(det, iid(rng, paths), paths)
    for rho in (0.3, 0.6):
        for mode in ("ignore", "whiten", "inflate"):
            draw, state = ar1(rng, paths, rho, rng.standard_normal(paths))
            warm = np.stack([draw() for _ in range(N0)])
            det = CUSUMDetector(k=0.5, arl0=TARGET, direction="up", warmup=N0, autocorr=mode)
            det.calibrate(warm)
            out[f"AR(1) rho = {rho:g}, n0 = {N0}, autocorr={mode!r}, one-sided"] = run_lengths(det, draw, paths)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--paths", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    paths = 200 if bm.quick() else args.paths
    bm.begin_suite("cusum_arl0")
    rows, cases = [], {}
    for label, rl in configurations(paths, args.seed).items():
        mean, se = float(rl.mean()), float(rl.std(ddof=1) / math.sqrt(len(rl)))
        censored = int((rl >= TMAX).sum())
        cases[label] = {"paths": len(rl), "mean": mean, "se": se, "median": float(np.median(rl)),
                        "censored": censored, "tmax": TMAX}
        txt = f"{mean:.0f} ± {se:.0f}" if not censored else f">= {mean:.0f} ({censored} censored)"
        rows.append([label, len(rl), txt, f"{np.median(rl):.0f}"])
        print(f"{label}: ARL0 {txt} (median {np.median(rl):.0f})", flush=True)
    md = (f"### In-control ARL0 of CUSUMDetector (target {TARGET}, k = 0.5)\n\n"
          + bm.md_table(["configuration", "paths", "mean run length ± MC se", "median"], rows))
    bm.write_results("cusum_arl0", {"target": TARGET, "n0": N0, "seed": args.seed, "cases": cases}, md,
                     source="bench/cusum_arl0.py", timed=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
