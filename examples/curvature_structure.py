"""Curvature structure of an MLP and a tiny ResNet: H = G + T per block, block coupling, spectra.

Writes PNGs (needs matplotlib) and prints the tables::

    python examples/curvature_structure.py --out curvature_pngs [--threads 1]

For each model:

1. ``decompose``: tr H_bb, tr G_bb, tr T_bb per block from the same probes, and the GN-gaps
   (``<name>_decomposition.png``: bars with 95 % intervals);
2. ``block_coupling`` on the GGN (resonance in [0, 1]) per layer (``<name>_coupling.png``);
3. ``stable_rank`` and ``spectral_density`` (SLQ) of a few blocks (``<name>_spectra.png``).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch import nn

from hutchtrace import block_coupling, decompose, spectral_density, stable_rank, zoo


def run(name, model, crit, data, out_dir, K, blocks_for_coupling, spectra_blocks):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hutchtrace.monitor.plots import plot_coupling, plot_decomposition, plot_spectral_density

    t0 = time.perf_counter()
    dec = decompose(model, crit, K=K, data=data, seed=0)
    print(f"\n=== {name}: decompose (K={K})\n{dec.table()}")
    ax = plot_decomposition(dec)
    ax.figure.tight_layout()
    ax.figure.savefig(os.path.join(out_dir, f"{name}_decomposition.png"), dpi=120)
    plt.close(ax.figure)

    cp = block_coupling(model, crit, K=4, data=data, blocks=blocks_for_coupling, curvature="ggn", seed=0)
    print(f"\n=== {name}: block coupling of G ({blocks_for_coupling} blocks)\n{cp.table()}")
    ax = plot_coupling(cp, "R")
    ax.figure.tight_layout()
    ax.figure.savefig(os.path.join(out_dir, f"{name}_coupling.png"), dpi=120)
    plt.close(ax.figure)

    sr = stable_rank(model, crit, K=8, m=20, data=data, select=spectra_blocks, seed=0)
    print(f"\n=== {name}: stable rank\n{sr.table()}")
    sd = spectral_density(model, crit, n_v=6, m=30, data=data, select=spectra_blocks, seed=0)
    ax = plot_spectral_density(sd)
    ax.set_title(f"{name}: SLQ spectral density of H_bb")
    ax.figure.tight_layout()
    ax.figure.savefig(os.path.join(out_dir, f"{name}_spectra.png"), dpi=120)
    plt.close(ax.figure)
    print(f"[{name}] {time.perf_counter() - t0:.1f} s")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="curvature_pngs", help="output directory for the PNGs")
    parser.add_argument("--K", type=int, default=64, help="probes for decompose")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, crit, data = zoo.make_mlp(n=128, act=nn.ReLU, dtype=torch.float64)
    run("mlp_relu", model, crit, data, args.out, args.K, "module", ["0.weight", "2.weight", "4.weight"])

    model, crit, data = zoo.make_resnet(n=8, size=8, width=4, dtype=torch.float64)
    run("resnet_tiny", model, crit, data, args.out, args.K, "module",
        ["stem.0.weight", "stages.1.0.c1.weight", "fc.weight"])
    print(f"\nPNGs in {os.path.abspath(args.out)}")


if __name__ == "__main__":
    main()
