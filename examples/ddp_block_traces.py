"""Data-parallel block traces of a DDP model, launched with torchrun.

    torchrun --nproc_per_node 2 examples/ddp_block_traces.py     # 2 ranks (gloo on CPU, NCCL on GPUs)
    python examples/ddp_block_traces.py                          # 1 process: the same traces

Every rank holds the model and iterates its own shard of the data. ``block_traces`` sees
that torch.distributed is initialised, draws the same counter-based probes on every rank,
evaluates the Hessian-vector products on the local batches and all-reduces only the K x L
per-block sums (plus the sample count): the result is the single-process estimate on the
whole dataset with the same seed, on every rank. The shards here are deliberately unequal
(rank r takes samples r, r + W, r + 2W, ...): batches are weighted by their sample counts.

The standard errors come from the sample variance of the K per-probe samples; a single
process may use pairwise variances instead (they need the P-vectors, which data
parallelism never gathers), so pass ``variance="sample"`` there to compare them too.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset, TensorDataset

import hutchtrace
from hutchtrace import zoo


def main() -> None:
    launched = "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = torch.device("cpu")
    if launched:
        use_cuda = torch.cuda.is_available()
        dist.init_process_group("nccl" if use_cuda else "gloo")
        if use_cuda:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        else:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
    rank = dist.get_rank() if launched else 0
    world = dist.get_world_size() if launched else 1

    model, criterion, (x, y) = zoo.make_mlp(n=250, dtype=torch.float64)  # same weights and data on every rank
    model = model.to(device)
    dataset = TensorDataset(x.to(device), y.to(device))
    # Not DistributedSampler: it pads the shards to equal length by repeating samples,
    # which would change the dataset being measured. Unequal shards are fine.
    shard = Subset(dataset, range(rank, len(dataset), world))
    loader = DataLoader(shard, batch_size=32)

    if launched:
        ddp_kwargs = {"device_ids": [device.index]} if device.type == "cuda" else {}
        model = torch.nn.parallel.DistributedDataParallel(model, **ddp_kwargs)

    # Identical arguments on every rank; the seed may be None (rank 0's is broadcast).
    res = hutchtrace.block_traces(model, criterion, K=32, data=loader, blocks="module", seed=0,
                                  progress=False)

    if rank == 0:  # every rank holds the same result; one prints it
        print(f"{world} rank(s), {len(shard)} of {len(dataset)} samples on rank 0")
        print(res.table())

    if launched:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
