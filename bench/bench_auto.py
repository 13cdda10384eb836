"""``hvp="auto"`` vs ``hvp="reverse"``: what the backbone choice costs (issue 13 C).

For each model of :mod:`models` (``bench`` scale) and two call sizes (``K=16``, a one-off
call; ``K=256``, a long one) every variant runs in a FRESH process, because the choice is
cached per process and torch.func pays a one-off initialisation on its first use:

1. warm-up: one ``block_traces(hvp="reverse")`` call on an unrelated tiny model (the lazy
   initialisation every first call pays, whatever the backbone);
2. ``first``: the first ``block_traces`` call on the model: ``auto`` times its candidates
   here (forward mode only on a call with enough rows to repay it);
3. ``repeat``: the median of ``REPEATS`` more calls (``auto``'s cached, re-checked choice).

Variants: ``auto`` and ``reverse`` (``probing="global"``, ``variance="sample"``), and
``plain``: the bare HVP loop of :func:`models.bare_probe_loop` with ``reverse`` (what a
hand-written double-backward loop costs). The processes of one case run interleaved over
``ROUNDS`` rounds (the machine is shared); reported: medians and the ratios
``first auto / first reverse``, ``repeat auto / repeat reverse``, ``repeat auto / plain`` and
the backbone ``auto`` chose. One intra-op thread. Timings are never asserted.

    pytest bench/bench_auto.py -s                          # ~5 min on one core
    HUTCHTRACE_BENCH_QUICK=1 pytest bench/bench_auto.py    # smoke test
    python bench/bench_auto.py --worker mlp 16 auto        # one process (prints JSON)

The worker imports the ``hutchtrace`` that ``PYTHONPATH`` (else the repository) provides, so
the same script measures another checkout. Results: ``bench/results/<prefix>_auto.{json,md}``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

VARIANTS = ("auto", "reverse", "plain")
REPEATS = 5


def _sizes() -> tuple[tuple[int, ...], int]:
    import models as bm

    return ((16,), 1) if bm.quick() else ((16, 256), 3)


def worker(name: str, K: int, variant: str) -> dict:
    """One fresh process: warm-up, first call, repeated calls."""
    if not os.environ.get("PYTHONPATH"):
        sys.path.insert(1, str(HERE.parent))  # this repository (PYTHONPATH, when set, decides)
    import torch

    import hutchtrace
    import models as bm

    bm.set_threads()
    tiny = torch.nn.Linear(3, 1)
    hutchtrace.block_traces(tiny, lambda m: m(torch.ones(2, 3)).pow(2).sum(), K=2, seed=0, hvp="reverse",
                            progress=False)
    model, crit, data = bm.make(name, "bench")
    if variant == "plain":
        fn = bm.bare_probe_loop(model, crit, data, K, "reverse", 1)
        chosen = "reverse"
    else:
        out = {}

        def fn():
            out["res"] = hutchtrace.block_traces(model, crit, K=K, data=data, seed=1, hvp=variant,
                                                 probing="global", variance="sample", progress=False)
    first = bm.timed(fn)
    repeat = [bm.timed(fn) for _ in range(REPEATS)]
    if variant != "plain":
        chosen = out["res"].meta["hvp"]
    return {"first_s": first, "repeat_s": statistics.median(repeat), "chosen": chosen,
            "hutchtrace": str(Path(hutchtrace.__file__).parent)}


def run_worker(name: str, K: int, variant: str) -> dict:
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", name, str(K), variant],
                          capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {name} K={K} {variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(name: str, K: int, rounds: int) -> dict:
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for r in range(rounds):
        order = VARIANTS[r % 3:] + VARIANTS[: r % 3]
        for v in order:
            runs[v].append(run_worker(name, K, v))
    med = {v: {k: statistics.median(x[k] for x in runs[v]) for k in ("first_s", "repeat_s")}
           for v in VARIANTS}
    return {
        "model": name, "K": K, "rounds": rounds, "repeats": REPEATS,
        "median_s": med,
        "first_ratio_auto_over_reverse": med["auto"]["first_s"] / med["reverse"]["first_s"],
        "repeat_ratio_auto_over_reverse": med["auto"]["repeat_s"] / med["reverse"]["repeat_s"],
        "repeat_ratio_auto_over_plain": med["auto"]["repeat_s"] / med["plain"]["repeat_s"],
        "repeat_ratio_reverse_over_plain": med["reverse"]["repeat_s"] / med["plain"]["repeat_s"],
        "auto_chose": sorted({x["chosen"] for x in runs["auto"]}),
        "hutchtrace": runs["auto"][0]["hutchtrace"],
        "runs": runs,
    }


_RESULTS: dict[str, dict] = {}


def _write():
    import models as bm

    rows = [[r["model"], r["K"], 1e3 * r["median_s"]["reverse"]["first_s"],
             1e3 * r["median_s"]["auto"]["first_s"],
             r["first_ratio_auto_over_reverse"], r["repeat_ratio_auto_over_reverse"],
             r["repeat_ratio_auto_over_plain"], ", ".join(r["auto_chose"])] for r in _RESULTS.values()]
    md = ("### hvp='auto' vs hvp='reverse': first call (fresh process) and repeated calls\n\n"
          + bm.md_table(["model", "K", "first reverse ms", "first auto ms", "first auto/reverse",
                         "repeat auto/reverse", "repeat auto/plain loop", "auto chose"], rows)
          + f"\n\nmedians over interleaved fresh processes; repeat = median of {REPEATS} later calls in the "
            "process; plain loop = prepare once + K bare double-backward HVPs.\n")
    return bm.write_results("auto", {"cases": _RESULTS}, md)


def bench_auto(benchmark):
    import models as bm

    bm.set_threads()  # what the workers use (recorded in the results header)
    sizes, rounds = _sizes()
    for name in (("mlp",) if bm.quick() else bm.MODELS):
        for K in sizes:
            r = measure(name, K, rounds)
            _RESULTS[f"{name}/K={K}"] = r
            print(f"\n{name} K={K}: first auto/reverse {r['first_ratio_auto_over_reverse']:.2f}, repeat "
                  f"auto/reverse {r['repeat_ratio_auto_over_reverse']:.2f}, auto/plain "
                  f"{r['repeat_ratio_auto_over_plain']:.2f}; auto chose {r['auto_chose']}", flush=True)
    path = _write()
    benchmark.extra_info.update({"results": str(path)})
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        t0 = time.perf_counter()
        res = worker(sys.argv[2], int(sys.argv[3]), sys.argv[4])
        res["process_s"] = time.perf_counter() - t0
        print(json.dumps(res))
    else:
        raise SystemExit(__doc__)
