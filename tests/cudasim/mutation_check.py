"""Mutation check: the emulated CUDA test suite must fail on kernels with planted defects.

    python tests/cudasim/mutation_check.py                    # every mutant; exit 1 if one survives
    python tests/cudasim/mutation_check.py --only barrier-removed --json out.json

For each mutant, a copy of csrc/ gets one planted defect, the emulated extension is built
from it (tests/cudasim/build.py; unchanged translation units come from the cache), and
the CUDA tests run against it (HUTCHTRACE_CUDASIM_LIB) until the first failure. A mutant
"survives" when its tests pass: then the emulator and the tests did not catch the defect.
Run it after the emulated suite has passed on the real sources (CI does), so that a
failure here is the defect's doing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))

from cudasim.build import DEFAULT_BUILD, build  # noqa: E402
from cudasim.suites import KERNEL_TESTS  # noqa: E402


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to csrc/
    old: str  # exact text, must occur once
    new: str
    what: str
    tests: tuple = tuple(KERNEL_TESTS)


MUTANTS = [
    Mutant(
        "barrier-removed",
        "cuda/cuda_utils.cuh",
        "    sb[warp] = b;\n  }\n  __syncthreads();\n",
        "    sb[warp] = b;\n  }\n",
        "block_sum2 without the barrier between writing the warp sums and reading them",
        ("tests/kernels/test_block_dot.py",),
    ),
    Mutant(
        "closing-barrier-removed",
        "cuda/cuda_utils.cuh",
        "    b = warp_sum(b);\n  }\n  __syncthreads();\n}",
        "    b = warp_sum(b);\n  }\n}",
        "block_sum2 without its closing barrier (unsafe when called twice in one kernel)",
        ("tests/kernels/test_cudasim.py",),
    ),
    Mutant(
        "off-by-one-chunk-tail",
        "cuda/block_dot_cuda.cu",
        "  for (; i < end; i += kThreads) {",
        "  for (; i < end - 1; i += kThreads) {",
        "block_dot's per-thread tail loop stops one element early (the last element of every chunk)",
        ("tests/kernels/test_block_dot.py",),
    ),
    Mutant(
        "off-by-one-probe-bound",
        "cuda/probes_cuda.cu",
        "        if (j >= 0 && j < n) row[j] = probe_cast<scalar_t>(v[l]);",
        "        if (j >= 0 && j < n - 1) row[j] = probe_cast<scalar_t>(v[l]);",
        "the probe kernel's element bound excludes the last element of a row (unaligned tails)",
        ("tests/kernels/test_probes.py",),
    ),
    Mutant(
        "off-by-one-welford-stride",
        "cuda/welford_cuda.cu",
        "threadIdx.x; l < L; l += stride) {\n    WelfordState s{n0, mean[l], m2[l]};",
        "threadIdx.x; l + 1 < L; l += stride) {\n    WelfordState s{n0, mean[l], m2[l]};",
        "the Welford update's grid-stride loop skips the last statistic",
        ("tests/kernels/test_welford.py",),
    ),
]


def plant(mutant: Mutant, workdir: Path) -> Path:
    """A copy of csrc/ (named csrc, so unchanged objects are reused) with the defect."""
    src = workdir / mutant.name / "csrc"
    if src.exists():
        shutil.rmtree(src)
    shutil.copytree(ROOT / "csrc", src)
    path = src / mutant.file
    text = path.read_text()
    if text.count(mutant.old) != 1:
        n = text.count(mutant.old)
        raise RuntimeError(f"{mutant.name}: the text to mutate occurs {n} times in {path}")
    path.write_text(text.replace(mutant.old, mutant.new))
    return src


def run_mutant(mutant: Mutant, workdir: Path, build_root: Path, jobs: int | None) -> dict:
    t0 = time.perf_counter()
    lib = build(plant(mutant, workdir), build_root, jobs)
    t1 = time.perf_counter()
    env = dict(os.environ, HUTCHTRACE_CUDASIM_LIB=str(lib), PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", *mutant.tests, "-x", "-q", "-p", "no:cacheprovider",
           "-k", "emu or schedule"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    t2 = time.perf_counter()
    out = res.stdout + res.stderr
    failed = re.findall(r"^FAILED (\S+)", out, re.M)
    lines = [ln.strip("= ") for ln in out.splitlines() if re.search(r"\d+ (passed|failed)", ln)]
    summary = lines[-1] if lines else ""
    caught = res.returncode == 1 and bool(failed)  # 1: tests failed (2-5: errors, no tests, ...)
    return {
        "mutant": mutant.name,
        "file": f"csrc/{mutant.file}",
        "defect": mutant.what,
        "caught": caught,
        "first_failure": failed[0] if failed else None,
        "pytest_rc": res.returncode,
        "summary": summary,
        "build_s": round(t1 - t0, 1),
        "tests_s": round(t2 - t1, 1),
        "output_tail": None if caught else out[-3000:],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", action="append", help="run only this mutant (repeatable)")
    ap.add_argument("--build-dir", default=str(DEFAULT_BUILD))
    ap.add_argument("-j", "--jobs", type=int, default=None)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    mutants = [m for m in MUTANTS if not args.only or m.name in args.only]
    if args.only and len(mutants) != len(set(args.only)):
        ap.error(f"unknown mutant; known: {[m.name for m in MUTANTS]}")
    results = []
    with tempfile.TemporaryDirectory(prefix="cudasim-mutants-") as tmp:
        for m in mutants:
            r = run_mutant(m, Path(tmp), Path(args.build_dir), args.jobs)
            results.append(r)
            verdict = "caught" if r["caught"] else "SURVIVED"
            print(f"{m.name:<28} {verdict:<9} build {r['build_s']:>6.1f} s  tests {r['tests_s']:>6.1f} s  "
                  f"{r['first_failure'] or r['summary']}", flush=True)
            if not r["caught"]:
                print(r["output_tail"], flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    survivors = [r["mutant"] for r in results if not r["caught"]]
    if survivors:
        print(f"mutants that survived: {survivors}")
        return 1
    print(f"all {len(results)} mutants caught")
    return 0


if __name__ == "__main__":
    sys.exit(main())
