"""The emulated-CUDA step of CI: build, every CUDA test under every schedule, mutation check.

    python tests/cudasim/ci.py                                  # what .ci/run runs
    python tests/cudasim/ci.py --fresh --record bench/results/cudasim_ci.json

Each step is timed (wall and CPU seconds of its processes); ``--record`` writes the times,
the test summary and the mutation results as JSON, with the machine's load average at the
start and the end (timings on a shared machine depend on it). ``--fresh`` empties the
build cache first, as on a fresh CI clone. Exit status 1 if any step fails.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))

from cudasim import SCHEDULES  # noqa: E402
from cudasim.build import DEFAULT_BUILD, build  # noqa: E402
from cudasim.suites import CUDA_TESTS  # noqa: E402


def _cpu() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def step(record: dict, name: str, fn):
    print(f"-- {name}", flush=True)
    w0, c0 = time.perf_counter(), _cpu()
    ok, detail = fn()
    record["steps"][name] = {
        "ok": ok,
        "wall_s": round(time.perf_counter() - w0, 1),
        "cpu_s": round(_cpu() - c0, 1),
        **detail,
    }
    print(f"-- {name}: {'ok' if ok else 'FAILED'} in {record['steps'][name]['wall_s']} s", flush=True)
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fresh", action="store_true", help="empty the build cache first")
    ap.add_argument("--record", help="write the timings and results here (JSON)")
    ap.add_argument("--build-dir", default=str(DEFAULT_BUILD))
    args = ap.parse_args(argv)
    if args.fresh and Path(args.build_dir).exists():
        shutil.rmtree(args.build_dir)
    record = {
        "what": "CI step: emulated CUDA kernels (tests/cudasim)",
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "cpus": os.cpu_count(),
        "max_jobs": os.environ.get("MAX_JOBS"),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "schedules": [s.id for s in SCHEDULES],
        "fresh_build": args.fresh,
        "steps": {},
    }

    def do_build():
        lib = build(ROOT / "csrc", args.build_dir, verbose=False)
        return True, {"library": str(lib.relative_to(ROOT)) if lib.is_relative_to(ROOT) else str(lib)}

    def do_tests():
        env = dict(os.environ, HUTCHTRACE_CUDASIM="1", PYTHONDONTWRITEBYTECODE="1")
        cmd = [sys.executable, "-m", "pytest", *CUDA_TESTS, "-k", "emu or schedule", "-q",
               "-p", "no:cacheprovider"]
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        out = res.stdout + res.stderr
        print(out[-2000:] if res.returncode else out.strip().splitlines()[-1], flush=True)
        lines = [ln.strip("= ") for ln in out.splitlines() if re.search(r"\d+ passed", ln)]
        summary = lines[-1] if lines else ""
        return res.returncode == 0, {"command": " ".join(cmd[1:]), "summary": summary}

    def do_mutants():
        from cudasim import mutation_check

        with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
            rc = mutation_check.main(["--build-dir", args.build_dir, "--json", tmp.name])
            results = json.loads(Path(tmp.name).read_text())
        for r in results:
            r.pop("output_tail", None)
        return rc == 0, {"mutants": results}

    ok = step(record, "build", do_build)
    ok = ok and step(record, "tests", do_tests)
    ok = ok and step(record, "mutation_check", do_mutants)
    record["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    record["total_wall_s"] = round(sum(s["wall_s"] for s in record["steps"].values()), 1)
    record["ok"] = ok
    print(f"emulated CUDA step: {'ok' if ok else 'FAILED'}, {record['total_wall_s']} s", flush=True)
    if args.record:
        Path(args.record).write_text(json.dumps(record, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
