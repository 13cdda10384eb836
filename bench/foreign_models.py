"""hutchtrace on models nobody here wrote: exactness, side effects, auto's cost, precision.

The models are the foreign-model test suite's (``tests/foreign_models.py``: tiny random-init
HF GPT-2 / BERT / BART / T5 / ViT, a PEFT LoRA GPT-2, torchvision resnet18 (train / eval) and
mobilenet_v3_small, timm convnext_atto and a vit_tiny layout). Per model:

* **exact per probe**: ``block_traces(K, hvp="reverse", probing="global")`` against a plain
  double backward on the same probes (re-derived from the Philox definition), as the largest
  ``|t - t_ref| / (sum_b |(Hz)_i| + 1e-3 sum_all |(Hz)_i|)`` in units of the dtype's eps, in
  float64 and float32;
* **side effects**: parameters, buffers, ``.grad``, modes, ``requires_grad`` and the RNG
  compared bit for bit before and after;
* **speed**: ``block_traces`` per probe against a plain loop (one first-order graph, then one
  ``torch.autograd.grad`` per probe), float32, same K;
* **auto**: ``probing="auto", rtol=0.1`` (eval mode, float32): HVP rows (pilot included),
  probes, converged or not within ``--max-k`` (``--max-k-slow`` on the million-parameter
  CNNs), wall time. Skipped where the pilot alone (``min(L, 16) x pilot_K`` rows) exceeds
  ``--auto-budget`` seconds;
* **float16 / bfloat16** (GPT-2, resnet18 eval at 16x16 and 32x32 inputs): finite blocks,
  whether two identical calls agree bit for bit, and the per-probe samples against float32.

HVP rows are machine-independent; wall times are from whatever machine ran it (the load is
recorded).

    python bench/foreign_models.py                    # all models (~15-30 min on 2 loaded cores)
    python bench/foreign_models.py --models gpt2,bert --max-k 500

Writes ``bench/results/foreign_models.{json,md}``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import foreign_models as fm  # noqa: E402
import torch  # noqa: E402
from helpers import snapshot  # noqa: E402

import hutchtrace  # noqa: E402
from hutchtrace.estimate.coloring import PILOT_GROUPS  # noqa: E402

RESULTS = ROOT / "bench" / "results"
#: seconds per HVP row above which an auto run is capped at --max-k-slow probes
SLOW_ROW_S = 0.05


def _swap(case):
    return hutchtrace.twice_differentiable() if case.needs_swap else contextlib.nullcontext()


def _same(a: dict, b: dict) -> bool:
    def eq(x, y):
        return (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))

    return (all(eq(x, y) for x, y in zip(a["params"], b["params"]))
            and all(eq(x, y) for x, y in zip(a["buffers"], b["buffers"]))
            and all(eq(x, y) for x, y in zip(a["grads"], b["grads"]))
            and a["grad_ids"] == b["grad_ids"] and a["param_ids"] == b["param_ids"]
            and a["training"] == b["training"] and a["bn_track"] == b["bn_track"]
            and a["requires_grad"] == b["requires_grad"] and torch.equal(a["rng"], b["rng"]))


def exactness(name: str, dtype: torch.dtype, K: int) -> dict:
    case = fm.build(name, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    for i, p in enumerate(case.model.parameters()):  # .grad set on half the parameters
        p.grad = torch.randn(p.shape, generator=g).to(dtype) if i % 2 == 0 else None
    before = snapshot(case.model)
    rng = torch.get_rng_state()
    with _swap(case):
        res = hutchtrace.block_traces(case.model, case.loss, K=K, seed=11, hvp="reverse", probing="global",
                                      variance="sample", progress=False, **case.kwargs())
    clean = _same(before, snapshot(case.model))
    for p in case.model.parameters():
        p.grad = None
    ref_model = fm.swapped_copy(case.model) if case.needs_swap else None
    names, want, scale = fm.reference_samples(case, 11, K, rng_state=rng, model=ref_model)
    # scale of a sample's rounding: sum|(Hz)_i| over the block, floored at 1e-3 of the probe's
    # total (blocks whose product cancels carry rounding from the whole product)
    rel = ((res.samples - want).abs() / (scale + 1e-3 * scale.sum(1, keepdim=True)).clamp_min(1e-300)).max()
    aliases = {b.name: list(b.aliases) for b in res.blocks if b.aliases}
    return {"max_err_eps": float(rel) / torch.finfo(dtype).eps, "no_side_effects": clean,
            "names_match": names == res.names, "L": len(names), "aliases": aliases,
            "P": sum(b.numel for b in res.blocks)}


def speed(name: str, K: int) -> dict:
    case = fm.build(name, dtype=torch.float32)
    with _swap(case):
        hutchtrace.block_traces(case.model, case.loss, K=1, seed=0, hvp="reverse", progress=False, **case.kwargs())
        t0 = time.perf_counter()
        hutchtrace.block_traces(case.model, case.loss, K=K, seed=0, hvp="reverse", variance="sample", progress=False,
                                **case.kwargs())
        t_ht = time.perf_counter() - t0
    model = fm.swapped_copy(case.model) if case.needs_swap else case.model
    names, params = fm.trainable(model)
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    with fm._math_attention():
        loss = case.objective(model)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        for _ in range(K):
            z = [(torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(p.dtype) for p in params]
            hz = torch.autograd.grad(grads, params, z, retain_graph=True)
            [float((a * b).sum()) for a, b in zip(z, hz)]
    t_loop = time.perf_counter() - t0
    return {"hutchtrace_s_per_probe": t_ht / K, "plain_loop_s_per_probe": t_loop / K,
            "ratio_loop_over_hutchtrace": t_loop / t_ht}


def auto(name: str, max_k: int, budget_s: float, row_s: float, max_k_slow: int) -> dict:
    case = fm.build(name, dtype=torch.float32, train=False)
    L = sum(1 for p in case.model.parameters() if p.requires_grad)
    pilot_rows = min(L, PILOT_GROUPS) * 8  # block-supported up to 16 blocks, random partitions beyond
    if pilot_rows * row_s > budget_s:
        return {"run": False, "pilot_rows_alone": pilot_rows,
                "pilot_s_estimate": pilot_rows * row_s, "reason": "pilot over budget"}
    if row_s > SLOW_ROW_S:  # the million-parameter CNNs: a capped run, reported as such
        max_k = min(max_k, max_k_slow)
    t0 = time.perf_counter()
    with _swap(case), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = hutchtrace.block_traces(case.model, case.loss, K=8, seed=5, probing="auto", rtol=0.1, max_K=max_k,
                                      hvp="reverse", progress=False, **case.kwargs())
    wall = time.perf_counter() - t0
    floor = res.meta["atol"] if res.meta["atol"] is not None else 0.01 * 0.1 * max(abs(b.mean) for b in res.blocks)
    met = sum(1 for b in res.blocks if b.se <= max(0.1 * abs(b.mean), floor))
    return {"run": True, "hvp_rows": res.meta["hvp_rows"], "pilot_rows": res.meta["pilot_rows"],
            "K": res.meta["K"], "converged": res.meta["converged"], "probing": res.meta["probing"],
            "segments": res.meta["segments"], "blocks_at_target": met, "L": len(res.blocks), "wall_s": wall,
            "max_k": max_k}


def precision(name: str, size: int | None = None) -> dict:
    """float32 / bfloat16 / float16 on one model: finite blocks, repeatability, per-probe totals.

    ``size``: square image inputs of that size instead of the case's (image models only).
    """
    out = {}
    ref = None
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        case = fm.build(name, dtype=dt, train=False)
        if size is not None:
            x, y = fm._images(2, size, 9)
            case.data = (x.to(dt), y)
        runs = []
        for _ in range(2):  # the same call twice: kernels must be deterministic
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                runs.append(hutchtrace.block_traces(case.model, case.loss, K=4, seed=11, hvp="reverse",
                                                    progress=False, **case.kwargs()))
        res = runs[0]
        row = {"finite_blocks": sum(b.finite for b in res.blocks), "L": len(res.blocks),
               "repeatable": bool(torch.equal(runs[0].samples.nan_to_num(7.0), runs[1].samples.nan_to_num(7.0)))}
        if ref is None:
            ref = res.samples
        elif bool(torch.isfinite(res.samples).all()):  # all (K, L) per-probe samples at once
            row["rel_diff_vs_float32"] = float((res.samples - ref).norm() / ref.norm())
        out[str(dt).replace("torch.", "")] = row
    return out


def _f(x, fmt="{:.3g}"):
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else fmt.format(x)


def _rel(x) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:.2%}" if x < 10 else f"{x:.1e} times (garbage)"


def write_md(res: dict, path: Path) -> None:
    env = res["environment"]
    lines = [
        "# hutchtrace on foreign models",
        "",
        f"`python bench/foreign_models.py` on {env['machine']} ({env['threads']} intra-op thread; load average "
        f"{env['load_before']} before, {env['load_after']} after), torch {env['torch']}, transformers "
        f"{env.get('transformers')}, torchvision {env.get('torchvision')}, timm {env.get('timm')}, peft "
        f"{env.get('peft')}. Tiny random-init configs from `tests/foreign_models.py`.",
        "",
        "* exact: largest per-probe `|t_b - t_ref,b| / (sum_b|(Hz)_i| + 0.001 sum|(Hz)_i|)` over blocks and "
        "probes, in units of the dtype's eps, against a plain double backward on the same (independently "
        "re-derived) probes;",
        "* side effects: parameters, buffers, `.grad` (set and unset), modes, `requires_grad`, RNG bit for bit;",
        f"* speed: seconds per probe over {res['speed_K']} probes, `block_traces(hvp=\"reverse\")` (set-up included) "
        "and a plain loop (one graph, one `autograd.grad` per probe), float32 (wall time, loaded machine: secondary);",
        f"* auto: `probing=\"auto\", rtol=0.1, max_K={res['max_k']}`, eval mode, float32; HVP rows include the pilot.",
        "",
        "| model | P | blocks | exact f64 (eps) | exact f32 (eps) | side effects | s/probe hutchtrace / loop | "
        "auto: HVP rows (pilot) | probes | converged | blocks at target | auto wall |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in res["models"].items():
        e64, e32, sp, au = r["exact_float64"], r["exact_float32"], r["speed"], r["auto"]
        side = "none" if e64["no_side_effects"] and e32["no_side_effects"] else "CHANGED"
        if au.get("run"):
            cap = f" (max_K={au['max_k']})" if au.get("max_k", res["max_k"]) != res["max_k"] else ""
            a = (f"{au['hvp_rows']} ({au['pilot_rows']}) | {au['K']}{cap} | {'yes' if au['converged'] else 'no'} | "
                 f"{au['blocks_at_target']}/{au['L']} | {au['wall_s']:.1f} s")
        else:
            a = (f"not run: pilot alone {au['pilot_rows_alone']} rows (~{au['pilot_s_estimate']:.0f} s) | | | | "
                 f"({au['reason']})")
        lines.append(
            f"| {name} | {e64['P']} | {e64['L']} | {_f(e64['max_err_eps'], '{:.2f}')} | {_f(e32['max_err_eps'], '{:.2f}')} "
            f"| {side} | {_f(sp['hutchtrace_s_per_probe'])} / {_f(sp['plain_loop_s_per_probe'])} | {a} |")
    lines += ["", "Tied weights (one block, the other names as aliases):", ""]
    for name, r in res["models"].items():
        for b, al in r["exact_float64"]["aliases"].items():
            lines.append(f"* {name}: `{b}` with aliases {', '.join(f'`{a}`' for a in al)}")
    if res.get("precision"):
        lines += ["", "## float16 / bfloat16", "",
                  "`K=4`, `hvp=\"reverse\"`, eval mode; each call run twice (repeatable: bit-identical samples). "
                  "`name@32`: 32x32 image inputs instead of 16x16.", "",
                  "| model | dtype | finite blocks | repeatable | per-probe samples vs float32, `‖t - t_f32‖ / ‖t_f32‖` |",
                  "|---|---|---|---|---|"]
        for name, rows in res["precision"].items():
            for dt, row in rows.items():
                lines.append(f"| {name} | {dt} | {row['finite_blocks']}/{row['L']} | "
                             f"{'yes' if row['repeatable'] else 'NO'} | "
                             f"{_rel(row.get('rel_diff_vs_float32'))} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(fm.MODELS))
    ap.add_argument("--K", type=int, default=4, help="probes of the exactness checks")
    ap.add_argument("--speed-K", type=int, default=16, help="probes of the speed check (amortises the per-call set-up)")
    ap.add_argument("--max-k", type=int, default=2000, help="probe cap of the auto runs")
    ap.add_argument("--auto-budget", type=float, default=60.0,
                    help="skip auto where its pilot alone (min(L, 16) x pilot_K rows) is predicted to take longer (s)")
    ap.add_argument("--max-k-slow", type=int, default=64,
                    help=f"probe cap of the auto runs on models slower than {SLOW_ROW_S} s per HVP row")
    ap.add_argument("--precision", default="gpt2,resnet18_eval,resnet18_eval@32",
                    help="models for the float16 / bfloat16 check; name@size: image inputs of that size")
    ap.add_argument("--out", default=str(RESULTS / "foreign_models"))
    ap.add_argument("--md-only", action="store_true", help="rewrite the .md from the existing .json")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.md_only:
        write_md(json.loads(out.with_suffix(".json").read_text()), out.with_suffix(".md"))
        return 0
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", FutureWarning)
    warnings.simplefilter("ignore", DeprecationWarning)
    env = {"machine": f"{platform.machine()} {os.cpu_count()} CPUs", "threads": torch.get_num_threads(),
           "torch": torch.__version__, "load_before": [round(x, 2) for x in os.getloadavg()]}
    for mod in ("transformers", "torchvision", "timm", "peft"):
        with contextlib.suppress(ImportError):
            env[mod] = __import__(mod).__version__
    with contextlib.suppress(ImportError):
        __import__("transformers").logging.set_verbosity_error()
    res = {"environment": env, "max_k": args.max_k, "speed_K": args.speed_K, "models": {}, "precision": {}}
    for name in args.models.split(","):
        r = {"exact_float64": exactness(name, torch.float64, args.K),
             "exact_float32": exactness(name, torch.float32, args.K),
             "speed": speed(name, args.speed_K)}
        r["auto"] = auto(name, args.max_k, args.auto_budget, r["speed"]["hutchtrace_s_per_probe"], args.max_k_slow)
        res["models"][name] = r
        print(name, json.dumps(r, default=str), flush=True)
    for spec in filter(None, args.precision.split(",")):
        name, _, size = spec.partition("@")
        res["precision"][spec] = precision(name, int(size) if size else None)
        print(spec, res["precision"][spec], flush=True)
    env["load_after"] = [round(x, 2) for x in os.getloadavg()]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str))
    write_md(res, out.with_suffix(".md"))
    print(f"wrote {out}.json / .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
