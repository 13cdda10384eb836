"""Everything GPU in one command: build, CUDA tests, sanitizers, GPU benchmarks, results.

    python bench/gpu_suite.py                      # all steps (~10 min on an H100 node)
    python bench/gpu_suite.py --steps build,tests  # a subset (steps below)
    python bench/gpu_suite.py --out "$OUT"         # also copy the results there

Steps (each in its own subprocess with a time limit; a failing step is recorded, the
others still run):

``build``
    Finds a CUDA toolkit (``CUDA_HOME``, ``CUDA_PATH``, ``nvcc`` on ``PATH``,
    ``/usr/local/cuda``, the newest ``/usr/local/cuda-*``), exports ``CUDA_HOME`` and builds
    the extension in place for the visible GPU (``FORCE_CUDA=1``, ``MAX_JOBS`` = cores):
    ``pip install --no-build-isolation --no-deps -e .``, falling back to
    ``setup.py build_ext --inplace``. Then ``python -m hutchtrace.info``.
``tests``
    The kernel and CUDA-graph test files in full, then every ``needs_cuda`` test of the suite.
``sanitizer``
    ``compute-sanitizer --tool memcheck`` on the CUDA kernel tests and ``--tool racecheck`` on
    the reduction tests, when compute-sanitizer is found.
``kernels``
    Achieved bandwidth of the compiled ops at P = 1e8 (L = 100 tensors, float32): ``block_dot``
    (reads w and z), ``block_dot_regen`` (reads w), ``fill_probes_`` (writes z), against a
    measured device-to-device copy (bytes read + written). CUDA events, median of 20 after
    warm-up. Correctness is asserted first (float64 references). Target: >= 70 % of the copy.
``graphs``
    ``block_traces`` with vs without ``cuda_graph=True`` on a small MLP (the case launch
    overhead dominates), K = 256, both reverse backbones, interleaved rounds. The bare HVP
    loop is timed alongside for the overhead ratio.
``overhead``, ``memory``
    ``bench/bench_overhead.py`` and ``bench/bench_memory.py`` on ``cuda`` at the ``gpu`` model
    scale (they write ``bench/results/gpu_overhead.*`` and ``gpu_memory.*``).

Results: ``bench/results/gpu_suite.json`` and ``gpu_suite.md`` (device, driver, versions,
commit, each step's status and numbers), plus the per-suite files above.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
STEPS = ("build", "tests", "sanitizer", "kernels", "graphs", "overhead", "memory")
KERNEL_TESTS = ["tests/kernels/test_probes.py", "tests/kernels/test_block_dot.py", "tests/kernels/test_welford.py"]


# ------------------------------------------------------------------------------ helpers
def find_cuda_home() -> str | None:
    """A CUDA toolkit root holding ``bin/nvcc`` and ``include/cuda_runtime.h``.

    Candidates: ``CUDA_HOME``, ``CUDA_PATH``, the root of the ``nvcc`` on ``PATH`` (a wrapper
    script such as ``/usr/local/bin/nvcc`` has none), ``/usr/local/cuda`` and
    ``/usr/local/cuda-*`` (newest first). A toolkit whose major version matches torch's CUDA
    is preferred: ``setup.py`` builds no CUDA kernels across majors.
    """
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    which = shutil.which("nvcc")
    if which:
        cands.append(str(Path(os.path.realpath(which)).parent.parent))

    def version_key(p):
        return tuple(int(n) for n in re.findall(r"\d+", p)) or (0,)

    cands += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), key=version_key, reverse=True)
    ok = []
    for c in cands:
        if c and (Path(c) / "bin" / "nvcc").is_file() and (Path(c) / "include" / "cuda_runtime.h").is_file():
            root = str(Path(c).resolve())
            if root not in ok:
                ok.append(root)
    if not ok:
        return None
    try:
        import torch

        major = (torch.version.cuda or "").split(".")[0]
    except Exception:  # noqa: BLE001
        major = ""
    for root in ok:
        try:
            out = subprocess.run([str(Path(root) / "bin" / "nvcc"), "--version"], capture_output=True, text=True,
                                 timeout=30).stdout
            m = re.search(r"release (\d+)\.", out)
            if major and m and m.group(1) == major:
                return root
        except Exception:  # noqa: BLE001
            continue
    return ok[0]


def find_sanitizer(cuda_home: str | None) -> str | None:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    if cuda_home:
        for rel in ("bin/compute-sanitizer", "compute-sanitizer/compute-sanitizer"):
            p = Path(cuda_home) / rel
            if p.is_file():
                return str(p)
    return None


def sh(cmd, timeout, env=None, log=None) -> dict:
    """Run ``cmd`` (list) in the repository root; returns rc, seconds and the output tail."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        rc, out = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as exc:
        rc = 124
        out = ((exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or ""))
        out += f"\n[timed out after {timeout} s]"
    except FileNotFoundError as exc:
        rc, out = 127, str(exc)
    secs = time.perf_counter() - t0
    if log is not None:
        log.write(f"\n$ {' '.join(map(str, cmd))}\n[rc={rc}, {secs:.1f} s]\n{out}\n")
        log.flush()
    return {"cmd": " ".join(map(str, cmd)), "rc": rc, "seconds": round(secs, 1), "tail": out[-3000:]}


def pytest_summary(text: str) -> str:
    lines = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|error|skipped)", ln)]
    return lines[-1].strip("= ") if lines else "(no pytest summary)"


def environment(commit: str | None) -> dict:
    env = {"python": platform.python_version(), "platform": platform.platform(), "commit": commit or "unknown"}
    if commit is None:
        try:
            env["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                           timeout=10).stdout.strip() or "unknown"
        except Exception:  # noqa: BLE001 - a copy without .git
            pass
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        env["nvidia_smi"] = q.stdout.strip()
    except Exception as exc:  # noqa: BLE001
        env["nvidia_smi"] = f"unavailable: {exc}"
    try:
        import torch

        env["torch"] = torch.__version__
        env["torch_cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
            cap = torch.cuda.get_device_capability(0)
            env["capability"] = f"{cap[0]}.{cap[1]}"
    except Exception as exc:  # noqa: BLE001
        env["torch"] = f"import failed: {exc}"
    return env


# ------------------------------------------------------------------------------ in-process steps
def _events_median(fn, reps=20, warmup=3) -> float:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def kernels_step(quick: bool) -> dict:
    """Bandwidth of the compiled ops vs a device copy (module docs)."""
    import torch

    from hutchtrace.kernels import loader, ops, reference

    if not (torch.cuda.is_available() and loader.cuda_compiled()):
        return {"status": "skipped", "reason": f"CUDA kernels not available ({loader.LOAD_ERROR})"}
    P, L = (10_000_000 if quick else 100_000_000), 100
    g = torch.Generator(device="cuda").manual_seed(0)
    sizes = [P // L + (1 if j < P % L else 0) for j in range(L)]
    flat_w = torch.randn(P, device="cuda", generator=g)
    flat_z = torch.randn(P, device="cuda", generator=g)
    w, z = list(torch.split(flat_w, sizes)), list(torch.split(flat_z, sizes))
    offsets = [sum(sizes[:j]) for j in range(L)]
    idx = list(range(L))
    dst = torch.empty_like(flat_w)
    out = torch.empty_like(flat_z)
    # correctness first (float64 references on the device)
    d, s = ops.block_dot(w, z, idx, L)
    d_ref = torch.stack([(a.double() * b.double()).sum() for a, b in zip(w, z)])
    s_ref = torch.stack([(a.double() ** 2).sum() for a in w])
    assert torch.allclose(d, d_ref, rtol=1e-9, atol=1e-6) and torch.allclose(s, s_ref, rtol=1e-9), "block_dot"
    small = torch.empty(4099, device="cuda")
    ops.fill_probes_(small, 9, 3, 5)
    assert torch.equal(small, reference.probes(9, 3, 5, 4099, device="cuda")[0]), "rademacher probes"
    dr, sr = ops.block_dot_regen(w[:3], offsets[:3], idx[:3], 3, seed=1, probe=0)
    zr = [reference.probes(1, 0, o, t.numel(), device="cuda")[0] for t, o in zip(w[:3], offsets[:3])]
    assert torch.allclose(dr, torch.stack([(a.double() * b.double()).sum() for a, b in zip(w[:3], zr)]),
                          rtol=1e-9, atol=1e-6), "block_dot_regen"
    cases = {
        "copy (device to device)": (lambda: dst.copy_(flat_w), 8 * P),
        "block_dot": (lambda: ops.block_dot(w, z, idx, L), 8 * P),
        "block_dot_regen (rademacher)": (lambda: ops.block_dot_regen(w, offsets, idx, L, seed=1, probe=0), 4 * P),
        "fill_probes_ (rademacher)": (lambda: ops.fill_probes_(out, 1, 0, 0), 4 * P),
        "fill_probes_ (gaussian)": (lambda: ops.fill_probes_(out, 1, 0, 0, "gaussian"), 4 * P),
    }
    res = {}
    for name, (fn, nbytes) in cases.items():
        t = _events_median(fn)
        res[name] = {"seconds": t, "bytes": nbytes, "GBps": nbytes / t / 1e9}
    copy = res["copy (device to device)"]["GBps"]
    for v in res.values():
        v["fraction_of_copy"] = v["GBps"] / copy
    met = {k: v["fraction_of_copy"] >= 0.7 for k, v in res.items() if k.startswith("block_dot")}
    return {"status": "ok", "P": P, "L": L, "results": res, "target_70pct_met": met}


def graphs_step(quick: bool) -> dict:
    """block_traces with vs without CUDA graphs on a small MLP; bare HVP loop alongside."""
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    import models as bm

    import hutchtrace
    from hutchtrace import zoo

    if not torch.cuda.is_available():
        return {"status": "skipped", "reason": "no CUDA device"}
    model, crit, (x, y) = zoo.make_mlp(n=256, sizes=(64, 256, 256, 10))
    model, data = model.cuda(), (x.cuda(), y.cuda())
    K, rounds, rows = (64, 3, 8) if quick else (256, 7, 8)
    out = {"model": "MLP 64-256-256-10, batch 256", "P": bm.numel(model), "K": K, "probe_batch": rows}
    for backbone in ("reverse", "reverse-batched"):
        kw = dict(K=K, data=data, seed=5, hvp=backbone, probing="global", variance="sample", probe_batch=rows,
                  progress=False)
        eager = hutchtrace.block_traces(model, crit, **kw)
        graphed = hutchtrace.block_traces(model, crit, cuda_graph=True, **kw)
        replays = graphed.meta["hvp_timings"].get("cuda_graph_replays", 0)
        torch.testing.assert_close(graphed.samples, eager.samples, rtol=1e-6, atol=1e-9)
        fns = {
            "bare": bm.bare_probe_loop(model, crit, data, K, backbone, rows, "cuda"),
            "eager": lambda kw=kw: hutchtrace.block_traces(model, crit, **kw),
            "graph": lambda kw=kw: hutchtrace.block_traces(model, crit, cuda_graph=True, **kw),
        }
        times = bm.interleave(fns, rounds, "cuda")
        med = {k: statistics.median(v) for k, v in times.items()}
        out[backbone] = {
            "replays": replays, "median_s": med,
            "graph_speedup": med["eager"] / med["graph"],
            "eager_over_bare": med["eager"] / med["bare"], "graph_over_bare": med["graph"] / med["bare"],
        }
    out["status"] = "ok"
    return out


# ------------------------------------------------------------------------------ report
def markdown(report: dict) -> str:
    env = report["environment"]
    lines = ["## GPU suite", "",
             f"device: {env.get('gpu', '-')} ({env.get('nvidia_smi', '-')}); torch {env.get('torch')} "
             f"(CUDA {env.get('torch_cuda')}); Python {env.get('python')}; commit {env.get('commit')}; "
             f"nvcc {report.get('nvcc')}", "", "| step | status | seconds | summary |", "|---|---|---|---|"]
    for name, st in report["steps"].items():
        lines.append(f"| {name} | {st.get('status')} | {st.get('seconds', '-')} | {st.get('summary', '')} |")
    k = report["steps"].get("kernels", {})
    if k.get("status") == "ok":
        lines += ["", f"### Kernel bandwidth (P = {k['P']:.0e}, L = {k['L']}, float32)", "",
                  "| op | ms | GB/s | fraction of copy |", "|---|---|---|---|"]
        for n, v in k["results"].items():
            lines.append(f"| {n} | {1e3 * v['seconds']:.3f} | {v['GBps']:.0f} | {v['fraction_of_copy']:.2f} |")
        lines.append(f"\ntarget >= 0.70 of the copy: {k['target_70pct_met']}")
    g = report["steps"].get("graphs", {})
    if g.get("status") == "ok":
        lines += ["", f"### block_traces with vs without CUDA graphs ({g['model']}, P = {g['P']}, K = {g['K']})", "",
                  "| backbone | bare HVP loop s | eager s | graph s | graph speed-up | eager/bare | graph/bare |",
                  "|---|---|---|---|---|---|---|"]
        for bb in ("reverse", "reverse-batched"):
            v = g[bb]
            m = v["median_s"]
            lines.append(f"| {bb} | {m['bare']:.4f} | {m['eager']:.4f} | {m['graph']:.4f} | {v['graph_speedup']:.2f}x "
                         f"| {v['eager_over_bare']:.3f} | {v['graph_over_bare']:.3f} |")
    for suite in ("overhead", "memory"):
        p = RESULTS / f"gpu_{suite}.md"
        if p.exists() and report["steps"].get(suite, {}).get("status") == "ok":
            lines += ["", p.read_text().split("\n", 1)[1]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {STEPS}")
    ap.add_argument("--out", default=None, help="also copy the results (and the log) to this folder")
    ap.add_argument("--quick", action="store_true", help="small sizes: checks the machinery, numbers not meaningful")
    ap.add_argument("--commit", default=os.environ.get("HUTCHTRACE_COMMIT"), help="commit id (if .git is absent)")
    args = ap.parse_args(argv)
    steps = [s for s in args.steps.split(",") if s]
    unknown = set(steps) - set(STEPS)
    if unknown:
        ap.error(f"unknown steps {sorted(unknown)}; choose from {STEPS}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    log = open(RESULTS / "gpu_suite.log", "w")
    env = dict(os.environ)
    cuda_home = find_cuda_home()
    nvcc = str(Path(cuda_home) / "bin" / "nvcc") if cuda_home else None
    if cuda_home:
        env["CUDA_HOME"] = cuda_home
        env["PATH"] = str(Path(cuda_home) / "bin") + os.pathsep + env.get("PATH", "")
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    py = sys.executable
    report = {"nvcc": nvcc, "steps": {}, "quick": args.quick}
    json_path = RESULTS / "gpu_suite.json"

    def save():
        report["environment"] = environment(args.commit)
        json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
        (RESULTS / "gpu_suite.md").write_text(markdown(report))

    def record(name, st):
        report["steps"][name] = st
        print(f"[gpu_suite] {name}: {st.get('status')} ({st.get('seconds', '-')} s) {st.get('summary', '')}",
              flush=True)
        save()

    if "build" in steps:
        if nvcc is None:
            record("build", {"status": "failed", "summary": "no CUDA toolkit found (CUDA_HOME, PATH, /usr/local/cuda*)"})
        else:
            benv = dict(env, FORCE_CUDA="1")
            r = sh([py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."], 900, benv, log)
            if r["rc"] != 0:
                r = sh([py, "setup.py", "build_ext", "--inplace"], 900, benv, log)
            info = sh([py, "-m", "hutchtrace.info"], 120, env, log)
            ok = r["rc"] == 0 and "CUDA kernels          : compiled" in info["tail"]
            record("build", {"status": "ok" if ok else "failed", "seconds": r["seconds"],
                             "summary": ("; ".join(ln.strip() for ln in info["tail"].splitlines()
                                                   if ln.startswith(("CUDA kernels", "extension loaded", "built with")))),
                             "build": r, "info": info["tail"]})
    if "tests" in steps:
        r1 = sh([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *KERNEL_TESTS, "tests/kernels/test_opcheck.py",
                 "tests/estimate/test_cuda_graph.py"], 900, env, log)
        r2 = sh([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests", "-m", "needs_cuda"], 900, env, log)
        ok = r1["rc"] == 0 and r2["rc"] == 0
        record("tests", {"status": "ok" if ok else "failed", "seconds": r1["seconds"] + r2["seconds"],
                         "summary": f"kernel+graph files: {pytest_summary(r1['tail'])}; needs_cuda: "
                                    f"{pytest_summary(r2['tail'])}", "runs": [r1, r2]})
    if "sanitizer" in steps:
        san = find_sanitizer(env.get("CUDA_HOME"))
        if san is None:
            record("sanitizer", {"status": "skipped", "summary": "compute-sanitizer not found"})
        else:
            senv = dict(env, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
            mem = sh([san, "--tool", "memcheck", "--error-exitcode", "1", py, "-m", "pytest", "-q", "-x",
                      "-p", "no:cacheprovider", *KERNEL_TESTS, "-k", "cuda"], 1200, senv, log)
            race = sh([san, "--tool", "racecheck", "--error-exitcode", "1", py, "-m", "pytest", "-q", "-x",
                       "-p", "no:cacheprovider", "tests/kernels/test_block_dot.py", "-k",
                       "cuda and not ten_million"], 1200, env, log)

            def errs(t):
                m = re.findall(r"ERROR SUMMARY: (\d+) error", t)
                return m[-1] if m else "?"

            ok = mem["rc"] == 0 and race["rc"] == 0
            record("sanitizer", {"status": "ok" if ok else "failed", "seconds": mem["seconds"] + race["seconds"],
                                 "summary": f"memcheck: {errs(mem['tail'])} errors ({pytest_summary(mem['tail'])}); "
                                            f"racecheck: {errs(race['tail'])} errors "
                                            f"({pytest_summary(race['tail'])})", "runs": [mem, race]})
    for name, fn in (("kernels", kernels_step), ("graphs", graphs_step)):
        if name in steps:
            t0 = time.perf_counter()
            try:
                res = fn(args.quick)
            except Exception:  # noqa: BLE001 - recorded, the other steps still run
                import traceback

                res = {"status": "failed", "error": traceback.format_exc()[-2000:]}
                log.write(res["error"])
            res["seconds"] = round(time.perf_counter() - t0, 1)
            if name == "kernels" and res.get("status") == "ok":
                res["summary"] = ", ".join(f"{k} {v['fraction_of_copy']:.2f}" for k, v in res["results"].items()
                                           if not k.startswith("copy")) + " of copy bandwidth"
            if name == "graphs" and res.get("status") == "ok":
                res["summary"] = ", ".join(f"{bb} {res[bb]['graph_speedup']:.2f}x" for bb in ("reverse",
                                                                                              "reverse-batched"))
            res.setdefault("summary", res.get("reason") or (res.get("error", "").strip().splitlines() or [""])[-1])
            record(name, res)
    for suite in ("overhead", "memory"):
        if suite in steps:
            senv = dict(env, HUTCHTRACE_BENCH_DEVICE="cuda", HUTCHTRACE_BENCH_THREADS=str(os.cpu_count() or 1))
            senv["HUTCHTRACE_BENCH_OUT"] = str(RESULTS)  # they time themselves under --benchmark-disable
            if args.quick:
                senv["HUTCHTRACE_BENCH_QUICK"] = "1"
            r = sh([py, "-m", "pytest", f"bench/bench_{suite}.py", "-q", "-s", "-p", "no:cacheprovider",
                    "--benchmark-disable"], 1200, senv, log)
            record(suite, {"status": "ok" if r["rc"] == 0 else "failed", "seconds": r["seconds"],
                           "summary": pytest_summary(r["tail"]), "run": r})
    save()
    log.close()
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for p in RESULTS.glob("gpu_*"):
            shutil.copy(p, out / p.name)
    print((RESULTS / "gpu_suite.md").read_text())
    return 0 if all(s.get("status") in ("ok", "skipped") for s in report["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
