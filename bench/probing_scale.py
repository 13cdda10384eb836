"""Probing at a hundred blocks: HVP rows of ``auto`` against the exact cost of ``global`` and ``isolated``.

For each model (float64, random init, L >= 100 blocks, a few thousand parameters):

1. the exact Hessian (``exact_hessian``) and, from it, the exact per-probe variances of
   ``global`` and ``isolated`` (``exact_variance``, docs/maths.md Theorem 1.1), hence the exact HVP
   rows each needs to reach ``SE_b <= eps_b`` on every block, ``rows = G * max_b V_b /
   eps_b^2``, with ``eps_b = max(rtol |tr_b|, 0.01 rtol max_c |tr_c|)``: the target of
   ``block_traces``' adaptive stopping, with exact traces. For reference also the first-fit
   coloring on the exact couplings (``oracle colored``: what ``auto`` could reach with a
   free, perfect pilot);
2. ``block_traces(probing="auto", rtol=...)`` run for real over several seeds, counting its
   HVP rows (``meta["hvp_rows"]``, pilot included; ``meta["pilot_rows"]``), and checking the
   stopped estimates against the exact traces (``z_b = (mean_b - tr_b) / SE_b``).

The runs use :class:`hutchtrace.zoo.HessianQuadratic` on the model's dense Hessian: its
loss is ``theta^T H theta / 2``, so an HVP is one matrix product and a run of 10^5 rows
takes minutes instead of hours. Probes are counter-based, so the same seed gives the same
probes and the same samples as the network itself; step 0 checks that on a short run of
both (largest sample difference relative to the sample scale, and the same plan). HVP rows
do not depend on the machine or its load; wall time and load average are secondary.

    python bench/probing_scale.py                       # both models, rtol 0.1, 4 seeds (~1 h on one core)
    python bench/probing_scale.py --models deep_lm --seeds 2 --rtol 0.2
    python bench/probing_scale.py --quick               # smoke test: one model, rtol 0.3, 1 seed, /tmp
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import models as bm  # noqa: E402

import hutchtrace  # noqa: E402
from hutchtrace import zoo  # noqa: E402
from hutchtrace.backbones.exact import exact_hessian  # noqa: E402
from hutchtrace.estimate.coloring import _weights, candidate_partitions, predicted_cost  # noqa: E402
from hutchtrace.estimate.variance import exact_variance  # noqa: E402

MODELS = {
    "deep_resnet": ("residual CNN, 16 basic blocks of width 4, BatchNorm in train mode",
                    lambda: zoo.make_deep_resnet(dtype=torch.float64)),
    "deep_lm": ("causal transformer LM, 8 layers, d = 8, tied embeddings",
                lambda: zoo.make_deep_lm(dtype=torch.float64)),
}


def exact_costs(H, layout, rtol: float) -> dict:
    """Exact HVP rows to the target for global, isolated and the first fit on exact couplings."""
    g = exact_variance(H, layout, "global")
    i = exact_variance(H, layout, "isolated")
    tr = g["trace"]
    w = _weights(tr, rtol, None)  # 1 / eps_b^2 with exact traces (no standard error)
    L = layout.num_blocks
    best = min(((predicted_cost(g["F"], i["variance"], p, w), len(p)) for p in
                candidate_partitions(g["F"], i["variance"], w)), key=lambda t: t[0])
    return {"global_rows": float((w * g["variance"]).max()), "isolated_rows": L * float((w * i["variance"]).max()),
            "oracle_colored_rows": best[0], "oracle_colored_groups": best[1], "trace": tr}


def surrogate_check(name: str, H, seed: int = 0) -> dict:
    """A short fixed-K ``auto`` run on the network and on its dense-Hessian surrogate."""
    model, crit, data = MODELS[name][1]()
    real = hutchtrace.block_traces(model, crit, K=8, data=data, seed=seed, probing="auto", hvp="reverse",
                                   progress=False)
    q = zoo.HessianQuadratic(H, [b.numel for b in real_layout(model)])
    sur = hutchtrace.block_traces(q, lambda m: m(), K=8, seed=seed, probing="auto", hvp="reverse", progress=False)
    scale = float(real.samples.abs().max())
    return {"max_rel_sample_difference": float((real.samples - sur.samples).abs().max()) / scale,
            "same_plan": real.meta["segments"] == sur.meta["segments"], "rows": real.meta["hvp_rows"]}


def real_layout(model):
    return hutchtrace.problem.blocks.resolve_blocks(model).blocks


def run_auto(q, seed: int, rtol: float, tr: torch.Tensor, max_K: int) -> dict:
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = hutchtrace.block_traces(q, lambda m: m(), K=16, seed=seed, probing="auto", rtol=rtol, max_K=max_K,
                                      hvp="reverse-batched", progress=False)
    wall = time.perf_counter() - t0
    ses = res.ses
    live = ses > 1e-12 * float(ses.max())  # blocks with exact samples (SE 0) have no z
    z = ((res.means - tr) / ses.clamp_min(1e-300))[live]
    return {"seed": seed, "hvp_rows": int(res.meta["hvp_rows"]), "pilot_rows": int(res.meta["pilot_rows"]),
            "K": int(res.meta["K"]), "converged": bool(res.meta["converged"]), "final": res.meta["probing"],
            "groups": res.meta["groups"] if isinstance(res.meta["groups"], int) else len(res.meta["groups"]),
            "switches": int(res.meta["plan_switches"]), "segments": len(res.meta["segments"]),
            "max_abs_z": float(z.abs().max()), "within_2se": float((z.abs() <= 2).double().mean()),
            "within_3se": float((z.abs() <= 3).double().mean()), "wall_s": wall,
            "loadavg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def study(name: str, rtol: float, seeds: int, max_K: int) -> dict:
    model, crit, data = MODELS[name][1]()
    t0 = time.perf_counter()
    H, layout = exact_hessian(model, crit, data=data, method="autograd")
    t_exact = time.perf_counter() - t0
    ex = exact_costs(H, layout, rtol)
    check = surrogate_check(name, H)
    print(f"{name}: L={layout.num_blocks} P={H.shape[0]} exact {t_exact:.0f}s  global {ex['global_rows']:.4g}  "
          f"isolated {ex['isolated_rows']:.4g}  oracle colored {ex['oracle_colored_rows']:.4g} "
          f"(G={ex['oracle_colored_groups']})  surrogate {check}", flush=True)
    q = zoo.HessianQuadratic(H, [b.numel for b in layout.blocks])
    runs = []
    for seed in range(seeds):
        r = run_auto(q, seed, rtol, ex["trace"], max_K)
        runs.append(r)
        print(f"  seed {seed}: {r}", flush=True)
    rows = [r["hvp_rows"] for r in runs]
    return {"model": name, "description": MODELS[name][0], "L": layout.num_blocks, "P": int(H.shape[0]),
            "rtol": rtol, "exact_hessian_s": t_exact,
            **{k: v for k, v in ex.items() if k != "trace"},
            "surrogate_check": check, "runs": runs,
            "auto_rows_mean": statistics.mean(rows), "auto_rows_max": max(rows),
            "pilot_share_mean": statistics.mean(r["pilot_rows"] / r["hvp_rows"] for r in runs),
            "all_converged": all(r["converged"] for r in runs)}


def markdown(studies: list[dict]) -> str:
    out = ["### Probing at L >= 100 blocks: HVP rows to the target on every block", "",
           "`global` and `isolated`: exact rows from the exact per-probe variances; `auto`: measured, "
           "pilot included, mean and max over seeds (every run converged unless marked); oracle colored: "
           "first fit on the exact couplings (a lower reference, not a scheme one can run).", ""]
    head = ["model", "L", "P", "rtol", "global (exact)", "isolated (exact)", "auto mean", "auto max",
            "auto / best of global, isolated", "pilot rows", "pilot share", "oracle colored (exact)",
            "max abs z", "within 2 SE"]
    rows = []
    for s in studies:
        best = min(s["global_rows"], s["isolated_rows"])
        rows.append([s["model"], s["L"], s["P"], s["rtol"], round(s["global_rows"]), round(s["isolated_rows"]),
                     round(s["auto_rows_mean"]) if s["all_converged"] else f"{round(s['auto_rows_mean'])} (not all converged)",
                     s["auto_rows_max"], f"{s['auto_rows_mean'] / best:.3f}",
                     s["runs"][0]["pilot_rows"], f"{100 * s['pilot_share_mean']:.2f} %",
                     f"{round(s['oracle_colored_rows'])} (G={s['oracle_colored_groups']})",
                     f"{max(r['max_abs_z'] for r in s['runs']):.2f}",
                     f"{statistics.mean(r['within_2se'] for r in s['runs']):.3f}"])
    out.append(bm.md_table(head, rows))
    out.append("")
    for s in studies:
        c = s["surrogate_check"]
        out.append(f"**{s['model']}** ({s['description']}). Per seed (rows / final plan, groups / plan switches / "
                   f"wall s at load average): " + "; ".join(
                       f"{r['hvp_rows']} / {r['final']}, {r['groups']} / {r['switches']} / {r['wall_s']:.0f} s at "
                       f"{r['loadavg']:.1f}" for r in s["runs"]) +
                   f". Network vs dense-Hessian surrogate, 8-probe `auto` run: largest sample difference "
                   f"{c['max_rel_sample_difference']:.1e} of the sample scale, same plan: {c['same_plan']}.")
        out.append("")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--rtol", type=float, default=0.1)
    ap.add_argument("--max-K", type=int, default=200_000)
    ap.add_argument("--quick", action="store_true", help="one model, rtol 0.3, one seed; writes under /tmp")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.quick:
        args.models, args.seeds, args.rtol = "deep_lm", 1, 0.3
    studies = [study(n, args.rtol, args.seeds, args.max_K) for n in args.models.split(",")]
    out = Path(args.out) if args.out else (Path("/tmp/hutchtrace-bench") if args.quick else bm.RESULTS) / "probing_scale"
    out.parent.mkdir(parents=True, exist_ok=True)
    env = bm.environment()
    out.with_suffix(".json").write_text(json.dumps({"environment": env, "studies": studies}, indent=1,
                                                   default=str) + "\n")
    head = (f"<!-- generated by bench/probing_scale.py; commit {env['commit'][:12]}, torch {env['torch']}, "
            f"{env['cpu']}, {env['threads']} thread(s), load average {env['loadavg']} -->\n")
    text = markdown(studies)
    out.with_suffix(".md").write_text(head + text)
    print(text)
    return 0 if all(s["all_converged"] for s in studies) else 1


if __name__ == "__main__":
    raise SystemExit(main())
