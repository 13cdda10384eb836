"""Run the CPU throughput suites and summarise them against the issue-9 targets.

    python bench/run_cpu_suite.py                          # overhead, memory, probing, peers
    python bench/run_cpu_suite.py --suites overhead,memory
    python bench/run_cpu_suite.py --quick                  # smoke test (minutes; numbers not meaningful)

Each suite is ``pytest bench/bench_<suite>.py`` in a subprocess (one intra-op thread unless
``HUTCHTRACE_BENCH_THREADS`` is set) and writes ``bench/results/cpu_<suite>.{json,md}``.
This script then writes ``bench/results/cpu_summary.{json,md}``: every target, the measured
ratio, met or not. The kernel suite (``bench/bench_kernels.py``) has its own command, see
docs/kernels.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SUITES = ("overhead", "memory", "probing", "peers")


def run_suite(suite: str, quick: bool) -> dict:
    env = dict(os.environ)
    env.setdefault("HUTCHTRACE_BENCH_THREADS", "1")
    env.setdefault("OMP_NUM_THREADS", env["HUTCHTRACE_BENCH_THREADS"])
    if quick:
        env["HUTCHTRACE_BENCH_QUICK"] = "1"
    else:  # these suites time themselves under --benchmark-disable: results do belong in bench/results
        env["HUTCHTRACE_BENCH_OUT"] = str(RESULTS)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "pytest", f"bench/bench_{suite}.py", "-q", "-s", "-p",
                        "no:cacheprovider", "--benchmark-disable"], cwd=ROOT, env=env, capture_output=True,
                       text=True)
    out = p.stdout + p.stderr
    (RESULTS / f"cpu_{suite}.log").write_text(out)
    return {"rc": p.returncode, "seconds": round(time.perf_counter() - t0, 1)}


def load(suite: str, quick: bool):
    base = Path("/tmp/hutchtrace-bench") if quick else RESULTS
    p = base / f"cpu_{suite}.json"
    return json.loads(p.read_text()) if p.exists() else None


def targets(quick: bool) -> list[list]:
    rows = []
    ov = load("overhead", quick)
    if ov:
        for key, r in ov["cases"].items():
            for v in ("sample", "pairwise"):
                x = r["per_probe_ratio"][v]
                rows.append(["overhead <= 1.05 (CPU)", f"{key}, variance={v}", f"{x:.3f}", "met" if x <= 1.05 else "not met"])
    mem = load("memory", quick)
    if mem:
        for name, r in mem["cases"].items():
            for m in ("sequential, sample", "sequential, pairwise"):
                x = r["ratio"][m]
                rows.append(["memory <= 1.2x one HVP (sequential)", f"{name}, {m}", f"{x:.2f}",
                             "met" if x <= 1.2 else "not met"])
    pr = load("probing", quick)
    if pr:
        for name, r in pr["cases"].items():
            t = r["targets"]
            if r["coupled"]:
                rows.append(["auto >= 10x faster than global (coupled)", name, f"{t['auto_vs_global']:.3g}x",
                             "met" if t["auto_ge_10x_global"] else "not met"])
            rows.append(["auto <= 1.2x the best scheme", f"{name} (best: {t['best']})", f"{t['auto_over_best']:.3g}",
                         "met" if t["auto_within_20pct"] else "not met"])
    pe = load("peers", quick)
    if pe:
        for name, r in pe["cases"].items():
            t = r["target"]
            if t["fastest_peer"]:
                rows.append([">= 3x faster than the fastest peer", f"{name} (vs {t['fastest_peer']})",
                             f"{t['speedup']:.3g}x", "met" if t["met"] else "not met"])
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suites", default=",".join(SUITES))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--summary-only", action="store_true", help="rebuild the summary from existing results")
    args = ap.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    runs = {}
    if not args.summary_only:
        for s in [x for x in args.suites.split(",") if x]:
            print(f"[cpu suite] {s} ...", flush=True)
            runs[s] = run_suite(s, args.quick)
            print(f"[cpu suite] {s}: rc={runs[s]['rc']} in {runs[s]['seconds']} s", flush=True)
    rows = targets(args.quick)
    sys.path.insert(0, str(ROOT / "bench"))
    import models as bm

    md = "### Targets (issue 9), CPU\n\n" + bm.md_table(["target", "case", "measured", "status"], rows) + "\n"
    out = RESULTS if not args.quick else Path("/tmp/hutchtrace-bench")
    out.mkdir(parents=True, exist_ok=True)
    (out / "cpu_summary.json").write_text(json.dumps({"environment": bm.environment(), "runs": runs,
                                                      "targets": rows}, indent=2, default=str) + "\n")
    (out / "cpu_summary.md").write_text(md)
    print(md)
    return 0 if all(r["rc"] == 0 for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
