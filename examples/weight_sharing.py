"""Weight sharing done right: the true block trace vs the "unrolled" per-use view.

A tensor used at several places (tied input/output embeddings, an RNN cell applied at every
step) has the Hessian ``sum_ij H_ij`` over its uses. Tools that attach statistics per module
call see only ``sum_i tr H_ii`` and miss the cross-use terms. This script measures both on
the tied-embedding LM (a copy task, where input and output roles of the same rows interact)
and on a tanh RNN unrolled over 5 steps, and checks them against the exact unrolled Hessian.

    python examples/weight_sharing.py          # also writes bench/results/weight_sharing.json
    python examples/weight_sharing.py --out /tmp/ws.json

The README's weight-sharing table is rendered from that file (``bench/render_tables.py``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import hutchtrace
from hutchtrace import zoo
from hutchtrace.structure.sharing import unrolled_hessian

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results" / "weight_sharing.json"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=RESULTS, help="results file (JSON)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    cases = [("tied-embedding LM, copy task", zoo.make_lm(dtype=torch.float64, copy_task=True)),
             ("tanh RNN unrolled 5 steps", zoo.make_rnn(dtype=torch.float64))]
    print(f"{'model':<30} {'tensor':<12} {'uses':>4} {'true tr (est)':>16} {'unrolled (est)':>16} "
          f"{'cross-use (est)':>16} {'true (exact)':>12} {'unrolled (exact)':>16}")
    for label, (model, crit, data) in cases:
        for s in hutchtrace.unrolled_traces(model, crit, K=400, data=data, seed=0):
            Hu = unrolled_hessian(model, crit, s.name, data=data)
            m = Hu.shape[0]
            true = float(torch.diagonal(Hu.sum((0, 2))).sum())
            within = float(sum(torch.diagonal(Hu[i, :, i, :]).sum() for i in range(m)))
            print(f"{label:<30} {s.name:<12} {s.uses:>4} {s.true[0]:>9.4f}±{s.true[1]:<6.3f} "
                  f"{s.unrolled[0]:>9.4f}±{s.unrolled[1]:<6.3f} {s.cross[0]:>9.4f}±{s.cross[1]:<6.3f} "
                  f"{true:>12.4f} {within:>16.4f}")
            rows.append({"model": label, "tensor": s.name, "uses": s.uses, "K": 400, "seed": 0,
                         "true_est": list(s.true), "unrolled_est": list(s.unrolled), "cross_est": list(s.cross),
                         "true_exact": true, "unrolled_exact": within, "cross_exact": true - within})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"script": "examples/weight_sharing.py", "torch": torch.__version__,
                                    "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")
    print("\nblock_traces differentiates the de-duplicated tensor, so it estimates the 'true' column;")
    print("the unrolled view misses the cross-use terms (and flips the sign for the copy task).")


if __name__ == "__main__":
    main()
