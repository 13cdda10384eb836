"""What each CUDA architecture adds to the build: nvcc time per .cu file and per arch.

    CUDA_HOME=/usr/local/cuda python bench/cuda_build_times.py   # -> bench/results/cuda_build_times.json
    python bench/cuda_build_times.py --archs 8.0,9.0 --out /tmp/t.json   # a subset

An extension build compiles each ``csrc/cuda/*.cu`` once for the host and once per target
architecture (SASS), plus once more for the PTX. This script times those parts
separately, with the flags setup.py passes (torch's include paths and nvcc defines):

* ``device``: ``nvcc -cubin`` for one ``sm_XY`` (the device front end and ptxas), per arch;
* ``ptx``: ``nvcc -ptx`` for the newest arch (what ``+PTX`` adds);
* ``host``: ``nvcc -c`` for one arch minus that arch's ``device`` time (cudafe + g++).

CPU time (user + system of nvcc and its children) is the number to use: wall time on a
shared machine depends on the load, which is recorded at the start and the end. ptxas
reports (``-Xptxas=-v``) give each file's largest stack frame and spill per arch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hutchtrace.kernels.cuda_arch import WHEEL_ARCHS  # noqa: E402


def nvcc_flags(cuda_home: str) -> list[str]:
    from torch.utils import cpp_extension

    inc = [str(ROOT / "csrc" / "include")] + cpp_extension.include_paths() + [
        os.path.join(cuda_home, "include"),
        sysconfig.get_paths()["include"],
    ]
    return (
        ["-DWITH_CUDA"]
        + [f"-I{p}" for p in inc]
        + list(cpp_extension.COMMON_NVCC_FLAGS)
        + ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "-Xcompiler", "-ffp-contract=off"]
        + ["-Xcompiler", "-fPIC", "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C"]
        + ["-std=c++20"]
    )


def timed(cmd: list[str]) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}\n{res.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    out = {"cpu_s": round(cpu, 2), "wall_s": round(wall, 2)}
    frames = [int(v) for v in re.findall(r"(\d+) bytes stack frame", res.stderr)]
    spill_re = r"(\d+) bytes spill stores, (\d+) bytes spill loads"
    spills = [int(a) + int(b) for a, b in re.findall(spill_re, res.stderr)]
    if frames:  # ptxas -v: the worst kernel of the file
        out.update(max_stack_frame_bytes=max(frames), max_spill_bytes=max(spills or [0]))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default=",".join(WHEEL_ARCHS), help="comma-separated, e.g. 8.0,9.0")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "cuda_build_times.json"))
    args = ap.parse_args(argv)
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    nums = [a.replace(".", "") for a in archs]
    flags = nvcc_flags(cuda_home)
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip()
    version = version.splitlines()[-1]
    load_start = os.getloadavg()
    files = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    per_file = {}
    with tempfile.TemporaryDirectory() as tmp:
        for f in files:
            row = {"device": {}}
            for num in nums:
                gencode = f"-gencode=arch=compute_{num},code=sm_{num}"
                cubin = os.path.join(tmp, f"{f.stem}.cubin")
                t = timed([nvcc, *flags, "-Xptxas=-v", "-cubin", gencode, str(f), "-o", cubin])
                row["device"][f"sm_{num}"] = t
                print(f"{f.name:<20} sm_{num:<4} {row['device'][f'sm_{num}']}", flush=True)
            last = nums[-1]
            row["ptx"] = timed([nvcc, *flags, "-ptx", f"-gencode=arch=compute_{last},code=compute_{last}",
                                str(f), "-o", os.path.join(tmp, f"{f.stem}.ptx")])
            full = timed([nvcc, *flags, "-c", f"-gencode=arch=compute_{last},code=sm_{last}", str(f),
                          "-o", os.path.join(tmp, f"{f.stem}.o")])
            dev_last = row["device"][f"sm_{nums[-1]}"]
            row["host"] = {k: round(max(0.0, full[k] - dev_last[k]), 2) for k in full}
            row["full_one_arch"] = full
            print(f"{f.name:<20} ptx {row['ptx']}  host {row['host']}", flush=True)
            per_file[f.name] = row
    per_arch = {
        f"sm_{n}": round(sum(r["device"][f"sm_{n}"]["cpu_s"] for r in per_file.values()), 1) for n in nums
    }
    host = round(sum(r["host"]["cpu_s"] for r in per_file.values()), 1)
    ptx = round(sum(r["ptx"]["cpu_s"] for r in per_file.values()), 1)
    result = {
        "what": "nvcc CPU seconds per part of the CUDA build, summed over csrc/cuda/*.cu",
        "nvcc": version,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_average_start": [round(x, 2) for x in load_start],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "archs": archs,
        "cpu_s_per_arch": per_arch,
        "cpu_s_host": host,
        "cpu_s_ptx": ptx,
        "cpu_s_total_estimate": round(host + ptx + sum(per_arch.values()), 1),
        # the old GPU-less default, 9.0+PTX: host, sm_90, one PTX
        "cpu_s_9.0+PTX_estimate": round(host + per_arch.get("sm_90", float("nan")) + ptx, 1),
        "per_file": per_file,
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "per_file"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
