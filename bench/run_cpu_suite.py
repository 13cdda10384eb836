"""Run the CPU benchmark suites, summarise them against the targets, and (with --publish)
regenerate every published number in one command.

    python bench/run_cpu_suite.py --publish          # the full regeneration (quiet machine; about 45 min, one core)
    python bench/run_cpu_suite.py                    # the same suites, results under /tmp/hutchtrace-bench
    python bench/run_cpu_suite.py --quick            # smoke run (minutes; numbers not meaningful; /tmp)
    python bench/run_cpu_suite.py --suites overhead,memory --publish
    python bench/run_cpu_suite.py --list             # the suites and what each writes
    python bench/run_cpu_suite.py --suites probing_scale,foreign_models --publish   # opt-in suites (long)
    python bench/run_cpu_suite.py --all --publish    # every published number (hours)

Each suite runs in a subprocess (one intra-op thread unless ``HUTCHTRACE_BENCH_THREADS`` is
set) and writes ``<out>/cpu_<suite>.{json,md}``; this script writes ``cpu_summary.{json,md}``
(the targets table of ``bench/render_tables.py``: every target, the measured value, met / not
met / inside the noise) and the load average before and after every suite.

``--publish`` writes into ``bench/results/`` and then re-renders the README and docs tables
(``bench/render_tables.py``). It refuses to start when the machine's load average is above
its core count, and every suite refuses to overwrite its committed results when the load
at its start or end was (:func:`models.write_results`); ``--allow-load`` overrides both and
labels the results "measured under load". Superseded legacy result files are removed when
the suite that replaces them is published.

The opt-in suites (``auto_first_call``, ``probing_scale``, ``foreign_models``,
``second_order_survey``, ``cuda_build_times``) take from 5 minutes to an hour each and run only
when named or with ``--all``. Those that write their own result files (all but
``auto_first_call``) run into a staging directory under /tmp and are copied into
``bench/results/`` only when the load at the start and end of the run stayed at or below the
core count (or with ``--allow-load``).

The kernel suite (``bench/bench_kernels.py``, pytest-benchmark) and the GPU suite
(``bench/gpu_suite.py``) have their own commands, see docs/kernels.md and docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]  # this checkout's hutchtrace, not an installed one
import models as bm  # noqa: E402

# name -> (command after the python executable, minutes on one quiet core (estimate), what it writes)
SUITES = {
    "overhead": (["-m", "pytest", "bench/bench_overhead.py"], 4, "cpu_overhead: block_traces vs the bare HVP"),
    "memory": (["-m", "pytest", "bench/bench_memory.py"], 2, "cpu_memory: peak memory vs one HVP"),
    "probing": (["-m", "pytest", "bench/bench_probing.py"], 10, "cpu_probing: time to 5 % SE per scheme"),
    "peers": (["-m", "pytest", "bench/bench_peers.py"], 12, "cpu_peers: against PyHessian, curvlinops, ..."),
    "curvature": (["-m", "pytest", "bench/bench_curvature.py"], 2, "cpu_curvature: decompose / coupling costs"),
    "local_hessian": (["-m", "pytest", "bench/bench_local_hessian.py"], 4,
                      "cpu_local_hessian: closed form vs generic"),
    "auto_seeds": (["bench/auto_seeds.py"], 5, "cpu_auto_seeds: auto's HVP rows over seeds (no timing)"),
    "cusum_arl0": (["bench/cusum_arl0.py"], 3, "cpu_cusum_arl0: simulated in-control ARL0 of CUSUMDetector (no timing)"),
    "probing_study": (["examples/probing_study.py", "--out", "{out}/probing_study.md", "{quick}"], 3,
                      "probing_study: exact per-block variances, HVP rows per scheme, K* (float64)"),
    # the long ones: run only when named in --suites (or with --all)
    "auto_first_call": (["-m", "pytest", "bench/bench_auto.py"], 5,
                        "cpu_auto: hvp='auto' first-call cost against a fixed backbone"),
    "probing_scale": (["bench/probing_scale.py", "--out", "{out}/probing_scale", "{quick}"], 60,
                      "probing_scale: auto / colored vs global / isolated at L >= 100 blocks (HVP rows)"),
    "foreign_models": (["bench/foreign_models.py", "--out", "{out}/foreign_models"], 30,
                       "foreign_models: exactness, speed and auto on HF / torchvision / timm / PEFT models"),
    "second_order_survey": (["bench/second_order_survey.py", "--out", "{out}/second_order_survey"], 45,
                            "second_order_survey: which ops and models lack a second derivative"),
    "cuda_build_times": (["bench/cuda_build_times.py", "--out", "{out}/cuda_build_times.json"], 15,
                         "cuda_build_times: nvcc seconds per CUDA architecture of the wheel"),
}
#: not part of a plain run (each takes long, or, for the build times, measures nvcc, not hutchtrace)
OPT_IN = ("auto_first_call", "probing_scale", "foreign_models", "second_order_survey", "cuda_build_times")
#: opt-in suites that write their own result files (not through models.write_results): they run
#: into a staging directory, and are copied into bench/results only when the load at the start and
#: the end of the run stayed at or below the core count (or with --allow-load)
STAGED = ("probing_scale", "foreign_models", "second_order_survey", "cuda_build_times")
PYTEST_ARGS = ["-q", "-s", "-p", "no:cacheprovider", "-c", "bench/pytest.ini", "--benchmark-disable"]
# result files a suite's new results replace (removed when that suite is published)
LEGACY = {"curvature": ["curvature_ratios.json"], "overhead": ["cpu_overhead_run1.json", "cpu_overhead_run1.md"]}


def out_dir(args) -> Path:
    return RESULTS if args.publish and not args.quick else bm.SCRATCH


def run_suite(suite: str, args) -> dict:
    cmd, _, _ = SUITES[suite]
    env = dict(os.environ)
    env.setdefault("HUTCHTRACE_BENCH_THREADS", "1")
    env.setdefault("OMP_NUM_THREADS", env["HUTCHTRACE_BENCH_THREADS"])
    # the scripts (auto_seeds, examples/probing_study) must import this checkout's hutchtrace
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["HUTCHTRACE_BENCH_OUT"] = str(out_dir(args))
    env["HUTCHTRACE_BENCH_QUICK"] = "1" if args.quick else "0"
    env["HUTCHTRACE_BENCH_PUBLISH"] = "1" if args.publish else "0"
    if args.allow_load:
        env["HUTCHTRACE_BENCH_ALLOW_LOAD"] = "1"
    staging = staging_dir(suite) if suite in STAGED and out_dir(args) == RESULTS else None
    target = staging or out_dir(args)
    fill = {"{out}": str(target), "{quick}": "--quick" if args.quick else ""}
    cmd = [x for x in (fill.get(c, c.replace("{out}", fill["{out}"])) for c in cmd) if x]
    argv = [sys.executable, *cmd] + (PYTEST_ARGS if cmd[0] == "-m" else [])
    load_start, t0 = bm.load_average(), time.perf_counter()
    p = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    out = p.stdout + p.stderr
    load_end = bm.load_average()
    d = out_dir(args)
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{suite if suite == 'probing_study' else 'cpu_' + suite}.log").write_text(out)
    refused = "LoadTooHigh" in out
    if staging is not None and p.returncode == 0:
        refused = not publish_staged(staging, d, {"start": load_start, "end": load_end, "cores": bm.cores()},
                                     args.allow_load)
    return {"rc": p.returncode, "seconds": round(time.perf_counter() - t0, 1), "load_start": load_start,
            "load_end": load_end, "refused_for_load": refused}


def staging_dir(suite: str) -> Path:
    d = bm.SCRATCH / "staging" / suite
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    return d


def publish_staged(staging: Path, results: Path, load: dict, allow_load: bool) -> bool:
    """Copy a staged run's files into ``results`` unless the run was loaded (start or end load
    above the core count, :func:`models.load_over`) and ``allow_load`` is off. True if copied."""
    if bm.load_over(load) and not allow_load:
        print(f"[cpu suite] not publishing {staging.name}: load {load['start']} -> {load['end']} on "
              f"{load['cores']} cores; its results stay in {staging}", file=sys.stderr, flush=True)
        return False
    for f in sorted(staging.rglob("*")):
        if f.is_file():
            dst = results / f.relative_to(staging)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dst)
    return True


def load(suite: str, d: Path):
    p = d / f"cpu_{suite}.json"
    return json.loads(p.read_text()) if p.exists() else None


def targets_markdown(d: Path) -> str:
    """The targets table, rendered by bench/render_tables.py from the results in ``d`` (one
    source: README, docs/performance.md and cpu_summary.md show the same table)."""
    import render_tables as rt

    saved, rt.RESULTS = rt.RESULTS, d
    try:
        return rt.s_targets()
    except rt.MissingResults as exc:
        return f"(no targets: {exc} is missing from {d})"
    finally:
        rt.RESULTS = saved


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suites", default=",".join(s for s in SUITES if s not in OPT_IN),
                    help="comma-separated subset of: " + ", ".join(SUITES) + f" (default: all but {', '.join(OPT_IN)})")
    ap.add_argument("--all", action="store_true", help="every suite, the long opt-in ones included (hours)")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, results under /tmp")
    ap.add_argument("--publish", action="store_true", help="write bench/results/ and re-render the tables")
    ap.add_argument("--allow-load", action="store_true",
                    help="publish even when the load average exceeds the core count (results labelled)")
    ap.add_argument("--summary-only", action="store_true",
                    help="rebuild cpu_summary.* from existing results (no measurement, so no load check)")
    ap.add_argument("--list", action="store_true", help="list the suites and exit")
    args = ap.parse_args(argv)
    if args.list:
        for name, (_, minutes, what) in SUITES.items():
            print(f"{name:<20} ~{minutes:>2} min  {what}" + ("  [opt-in]" if name in OPT_IN else ""))
        return 0
    suites = list(SUITES) if args.all else [x for x in args.suites.split(",") if x]
    unknown = [x for x in suites if x not in SUITES]
    if unknown:
        ap.error(f"unknown suites {unknown}; choose from {', '.join(SUITES)}")
    d = out_dir(args)
    d.mkdir(parents=True, exist_ok=True)
    now, n = bm.load_average(), bm.cores()
    if args.publish and not args.quick and not args.summary_only and now is not None and now > n and not args.allow_load:
        print(f"[cpu suite] refusing to publish: the load average is {now:.2f} on {n} cores, so timings would not be "
              "comparable with a quiet run. Wait for a quiet machine, or pass --allow-load to publish results "
              "labelled as measured under load.", file=sys.stderr)
        return 2
    runs = {}
    if not args.summary_only:
        est = sum(SUITES[s][1] for s in suites)
        print(f"[cpu suite] {', '.join(suites)} -> {d} (about {est} min on one quiet core; load now {now})", flush=True)
        for s in suites:
            print(f"[cpu suite] {s} ...", flush=True)
            runs[s] = run_suite(s, args)
            r = runs[s]
            print(f"[cpu suite] {s}: rc={r['rc']} in {r['seconds']} s (load {r['load_start']} -> {r['load_end']})"
                  + (" REFUSED: the load was above the core count, see the log" if r["refused_for_load"] else ""),
                  flush=True)
            if args.publish and not args.quick and r["rc"] == 0:
                for legacy in LEGACY.get(s, []):
                    (RESULTS / legacy).unlink(missing_ok=True)
    md = "### Targets, CPU\n\n" + targets_markdown(d) + "\n"
    (d / "cpu_summary.json").write_text(json.dumps({"environment": bm.environment(), "runs": runs, "targets": md},
                                                   indent=2, default=str) + "\n")
    (d / "cpu_summary.md").write_text(md)
    print(md)
    ok = all(r["rc"] == 0 for r in runs.values())
    if args.publish and not args.quick and ok:
        p = subprocess.run([sys.executable, "bench/render_tables.py"], cwd=ROOT)
        ok = p.returncode == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
