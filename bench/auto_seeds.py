"""Seed dependence of ``probing="auto"`` and the pilot length (companion of bench_probing).

bench_probing reports medians over two seeds, which hides the heavy tail of an adaptive
run's cost. This script counts HVP rows (pilot included; machine-independent, no timing)
to ``rtol=0.05`` on every block over more seeds, for ``isolated`` and for ``auto`` with
pilots of 8 (the default) and 16 probes, and writes
``bench/results/cpu_auto_seeds.{json,md}``.

    python bench/auto_seeds.py                     # cnn and mlp 8 seeds, lm 4 seeds (~5 min; /tmp)
    HUTCHTRACE_BENCH_PUBLISH=1 python bench/auto_seeds.py   # into bench/results/ (run_cpu_suite.py --publish)
    python bench/auto_seeds.py --models cnn --seeds 16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from pathlib import Path


sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]  # this checkout
import models as bm  # noqa: E402

import hutchtrace  # noqa: E402

VARIANTS = {
    "isolated": {"probing": "isolated"},
    "auto, pilot_K=8": {"probing": "auto", "pilot_K": 8},
    "auto, pilot_K=16": {"probing": "auto", "pilot_K": 16},
}
DEFAULT_SEEDS = {"cnn": 8, "mlp": 8, "lm": 4}


def rows_to_target(name: str, seeds: int) -> dict[str, list[int]]:
    model, crit, data = bm.make(name, "small")
    out = {}
    for label, kw in VARIANTS.items():
        rows = []
        for seed in range(11, 11 + seeds):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                res = hutchtrace.block_traces(model, crit, K=16, data=data, seed=seed, rtol=0.05, max_K=20000,
                                              progress=False, **kw)
            if not res.meta["converged"]:
                raise RuntimeError(f"{name} {label} seed {seed} hit max_K; raise it")
            rows.append(int(res.meta["hvp_rows"]))
        out[label] = rows
        print(f"{name} {label}: {rows}", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="cnn,mlp,lm")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per model (default: cnn/mlp 8, lm 4)")
    args = ap.parse_args(argv)
    bm.set_threads()
    bm.begin_suite("auto_seeds")
    cases = {}
    for name in args.models.split(","):
        seeds = 1 if bm.quick() else (args.seeds or DEFAULT_SEEDS[name])  # a smoke run: one seed
        cases[name] = rows_to_target(name, seeds)
    table = []
    for name, per in cases.items():
        for label, rows in per.items():
            table.append([name, label, len(rows), statistics.median(rows), round(statistics.mean(rows)),
                          max(rows), " ".join(map(str, rows))])
    md = ("### HVP rows to 5 % relative SE on every block, per seed (seeds from 11)\n\n"
          + bm.md_table(["model", "variant", "seeds", "median", "mean", "max", "per seed"], table))
    # HVP rows do not depend on the machine's load: recorded, not enforced
    bm.write_results("auto_seeds", {"cases": cases}, md, source="bench/auto_seeds.py", timed=False)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
