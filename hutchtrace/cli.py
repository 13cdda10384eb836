"""Command line: ``hutchtrace demo [--quick] [--out DIR] [--seed N]``.

``hutchtrace demo`` trains a small MLP on scikit-learn's digits with clean labels and with
40 % random labels, monitors per-layer Hessian traces with a calibrated CUSUM, prints a
summary table and writes a report folder (see :mod:`hutchtrace.demo`).
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hutchtrace", description="Block-wise Hessian traces with honest error bars."
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    d = sub.add_parser(
        "demo",
        help="monitor curvature while a small network memorises random labels",
        description="Train a digits MLP with clean and with noisy labels, monitor per-layer Hessian "
        "traces with CUSUM alarms, and write a report folder (PNG, JSON, markdown).",
    )
    d.add_argument("--quick", action="store_true", help="a short run (well under a minute)")
    d.add_argument("--out", default="hutchtrace-demo", help="report folder (default: ./hutchtrace-demo)")
    d.add_argument("--seed", type=int, default=0, help="seed of data split, label noise, init and probes")
    d.add_argument(
        "--noise", type=float, default=0.4, help="fraction of random labels in the noisy run (default 0.4)"
    )
    d.add_argument("--no-progress", action="store_true", help="do not show the progress bar")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.version:
        from . import __version__

        print(f"hutchtrace {__version__}")
        return 0
    if args.command == "demo":
        if not 0.0 < args.noise <= 1.0:
            print("hutchtrace demo: --noise must be in (0, 1]", file=sys.stderr)
            return 2
        if args.seed < 0:
            print("hutchtrace demo: --seed must be >= 0", file=sys.stderr)
            return 2
        from .demo import run_demo

        run_demo(
            out=args.out, quick=args.quick, seed=args.seed, noise=args.noise, progress=not args.no_progress
        )
        return 0
    _parser().print_help()
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
