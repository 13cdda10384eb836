"""How many probes, and which probing? Exact numbers on the reference models.

For each model (float64, exact Hessian by double backward) this prints, per block, the trace,
the per-probe variance under global and isolated probing (docs/maths.md Theorem 1.1), the variance
inflation ``X_b / V0_b + 1`` that global probing pays, and the probes each scheme needs for a
5 % relative standard error. It then runs ``block_traces`` with ``rtol=0.05`` for every scheme
and reports the HVP rows and wall time actually spent, and finally the critical probe count
K* of the MLP from ``variance_decomposition`` over mini-batches.

    python examples/probing_study.py [--out bench/results/probing_study.md] [--quick]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import hutchtrace
from hutchtrace import ProbePlan, exact_hessian, exact_variance, zoo

RTOL = 0.05


def needed(V, tr):
    big = float(tr.abs().max())
    eps = torch.maximum(RTOL * tr.abs(), torch.full_like(tr, 0.01 * RTOL * big))
    return V / eps**2


def study_model(name, make, quick):
    model, crit, data = make(dtype=torch.float64)
    H, layout = exact_hessian(model, crit, data=data)
    g = exact_variance(H, layout, "global")
    i = exact_variance(H, layout, "isolated")
    tr = g["trace"]
    rows = []
    vmax = float(g["variance"].max())
    for b, blk in enumerate(layout.blocks):
        vi = float(i["variance"][b])
        rows.append({
            "block": blk.name, "numel": blk.numel, "trace": float(tr[b]),
            "var_global": float(g["variance"][b]), "var_isolated": vi,
            # a structurally zero block (a conv bias before BatchNorm) has no meaningful ratio
            "inflation": float(g["variance"][b]) / vi if vi > 1e-12 * vmax else None,
            "K_global": float(needed(g["variance"], tr)[b]), "K_isolated": float(needed(i["variance"], tr)[b]),
        })
    runs = {}
    schemes = ["isolated", "auto"] if quick else ["global", "isolated", "auto"]
    for scheme in schemes:
        t0 = time.perf_counter()
        res = hutchtrace.block_traces(model, crit, K=16, data=data, seed=0, probing=scheme, rtol=RTOL,
                                      max_K=100_000, hvp="reverse-batched", progress=False)
        plan = res.meta["probing"]
        if plan == "colored":
            plan = ProbePlan("colored", tuple(tuple(gr) for gr in res.meta["groups"]))
        true_se = torch.sqrt(exact_variance(H, layout, plan)["variance"] / res.K)
        eps = torch.maximum(RTOL * tr.abs(), torch.full_like(tr, 0.01 * RTOL * float(tr.abs().max())))
        runs[scheme] = {"K": res.K, "hvp_rows": res.meta["hvp_rows"], "seconds": time.perf_counter() - t0,
                        "final": res.meta["probing"], "converged": res.meta["converged"],
                        "target_met_exactly": bool((true_se <= eps * 1.0001).all())}
    # the exact requirement for global (it may hit max_K in the run above)
    runs["global_exact_rows"] = float(needed(g["variance"], tr).max())
    runs["isolated_exact_rows"] = float(needed(i["variance"], tr).max()) * layout.num_blocks
    return {"model": name, "P": H.shape[0], "L": layout.num_blocks, "blocks": rows, "runs": runs}


def kstar_study(quick):
    model, crit, (x, y) = zoo.make_mlp(n=16 * (40 if quick else 200), dtype=torch.float64)
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, len(x), 16)]
    vd = hutchtrace.variance_decomposition(model, crit, batches, K=4, n_batches=len(batches), seed=0,
                                           bootstrap=200, hvp="reverse-batched", progress=False)
    return [{"block": b.name, "k_star": b.k_star, "ci": b.k_star_ci, "probe_var": b.probe_variance,
             "batch_var": b.batch_variance} for b in vd.blocks + [vd.total]]


def markdown(studies, kstar) -> str:
    out = ["## How many probes, and which probing? (measured)", ""]
    for s in studies:
        out.append(f"### {s['model']} (P = {s['P']}, L = {s['L']} blocks)")
        out.append("")
        out.append("| block | numel | tr H_bb | Var t_b global | Var t_b isolated | inflation | K for 5 % (global) | K for 5 % (isolated) |")
        out.append("|---|---|---|---|---|---|---|---|")
        for r in s["blocks"]:
            infl = f"{r['inflation']:.1f}x" if r["inflation"] is not None else "(zero block)"
            out.append(f"| {r['block']} | {r['numel']} | {r['trace']:.4g} | {r['var_global']:.3g} | "
                       f"{r['var_isolated']:.3g} | {infl} | {r['K_global']:.0f} | {r['K_isolated']:.0f} |")
        ru = s["runs"]
        out.append("")
        out.append(f"Exact HVP rows to 5 % on every block: global {ru['global_exact_rows']:.0f}, "
                   f"isolated {ru['isolated_exact_rows']:.0f}.")
        out.append("")
        out.append("| scheme | probes | HVP rows (incl. pilot) | seconds | final plan | converged | target met (exact SE) |")
        out.append("|---|---|---|---|---|---|---|")
        for k, v in ru.items():
            if isinstance(v, dict):
                out.append(f"| {k} | {v['K']} | {v['hvp_rows']} | {v['seconds']:.2f} | {v['final']} | "
                           f"{v['converged']} | {v['target_met_exactly']} |")
        out.append("")
    out.append("### Critical probe count K* (MLP, batches of 16, global probing)")
    out.append("")
    out.append("| block | K* | 90 % bootstrap CI | E_B sigma^2 | Var_B tau |")
    out.append("|---|---|---|---|---|")
    for r in kstar:
        out.append(f"| {r['block']} | {r['k_star']:.3g} | [{r['ci'][0]:.3g}, {r['ci'][1]:.3g}] | "
                   f"{r['probe_var']:.3g} | {r['batch_var']:.3g} |")
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/probing_study.md")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    models = [("MLP 16-32-32-8 (tanh)", zoo.make_mlp), ("CNN with BatchNorm (train mode)", zoo.make_cnn),
              ("Tiny LM (tied embeddings)", zoo.make_lm)]
    if args.quick:
        models = models[:1]
    studies = [study_model(n, m, args.quick) for n, m in models]
    kstar = kstar_study(args.quick)
    text = markdown(studies, kstar)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"studies": studies, "kstar": kstar}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
