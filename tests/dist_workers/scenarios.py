"""What each rank of a :class:`dist_workers.pool.Pool` runs. ``scenario(rank, world, **kw)``.

Every scenario rebuilds the same deterministic model and data on each rank (the
:mod:`hutchtrace.zoo` factories are seeded), takes its shard, runs the distributed call and
returns plain Python / numpy values; the test process compares them with a single-process
computation on the full data.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import hutchtrace
from hutchtrace import distributed as hd
from hutchtrace import zoo


# ----------------------------------------------------------------------------- shared
def make(case: str):
    """``(model, criterion, (x, y))`` in float64; the same on every rank and in the test."""
    if case == "mlp":
        return zoo.make_mlp(n=24, sizes=(6, 10, 10, 4), dtype=torch.float64)
    if case == "mse":  # Linear/Tanh/mean-squared: what DTensor differentiates twice
        model = zoo.make_mlp(sizes=(5, 7, 3), dtype=torch.float64)[0]
        g = torch.Generator().manual_seed(11)
        x = torch.randn(12, 5, generator=g, dtype=torch.float64)
        y = torch.randn(12, 3, generator=g, dtype=torch.float64)
        return model, zoo.MeanSquared(), (x, y)
    if case == "wide":  # P = 4868 parameters, L = 6 blocks: comm volume must not scale with P
        return zoo.make_mlp(n=24, sizes=(6, 64, 64, 4), dtype=torch.float64)
    if case == "cnn_bn":
        return zoo.make_cnn(n=12, dtype=torch.float64)
    raise ValueError(case)


def shard_sizes(n: int, world: int, sizes=None) -> list[int]:
    return list(sizes) if sizes is not None else [len(c) for c in torch.arange(n).chunk(world)]


def shard(t: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
    return t.split(sizes)[rank]


def bt_kwargs() -> dict:
    """Options shared with the single-process references: the sample variance where the
    estimator has a choice (pairwise variances need the P-vectors), and a fixed backbone
    (no timing trials on a loaded 2-core machine)."""
    params = inspect.signature(hutchtrace.block_traces).parameters
    return {"hvp": "reverse", **({"variance": "sample"} if "variance" in params else {})}


def summary(res) -> dict:
    return {
        "samples": res.samples.numpy().copy(),
        "mean": np.array([b.mean for b in res.blocks]),
        "se": np.array([b.se for b in res.blocks]),
        "total": res.total.mean,
        "total_se": res.total.se,
        "row_energy": [b.row_energy for b in res.blocks],
        "names": res.names,
        "seed": res.meta["seed"],
        "meta": {k: res.meta.get(k) for k in ("n_samples", "n_batches", "hvp", "distributed", "world_size")},
    }


def state_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()] + [b.detach().clone() for b in model.buffers()]


def same_state(before, model) -> bool:
    after = state_of(model)
    return len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after))


class CommCounter:
    """Counts elements passed to the torch.distributed collectives (Python API)."""

    NAMES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter",
             "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "reduce", "gather", "scatter")

    def __init__(self):
        self.elements = 0
        self.calls: list[tuple[str, int]] = []
        self._saved = {}

    def _wrap(self, name, fn):
        def counted(*args, **kwargs):
            n = 0
            for a in list(args) + list(kwargs.values()):
                if torch.is_tensor(a):
                    n += a.numel()
                elif isinstance(a, (list, tuple)):
                    n += sum(t.numel() for t in a if torch.is_tensor(t))
            self.elements += n
            self.calls.append((name, n))
            return fn(*args, **kwargs)

        return counted

    def __enter__(self):
        for name in self.NAMES:
            if hasattr(dist, name):
                self._saved[name] = getattr(dist, name)
                setattr(dist, name, self._wrap(name, self._saved[name]))
        return self

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(dist, name, fn)


# ------------------------------------------------------------------------ data parallel
def dp(rank, world, case="mlp", sizes=None, form="single", batch=5, K=6, seed=3, blocks="param"):
    """Data-parallel block_traces on this rank's shard (``form``: single / list / loader)."""
    model, crit, (x, y) = make(case)
    sizes = shard_sizes(len(x), world, sizes)
    xr, yr = shard(x, sizes, rank), shard(y, sizes, rank)
    if form == "single":
        data = (xr, yr)
    elif form == "list":
        data = [(xr, yr)]
    elif form == "loader":
        data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xr, yr), batch_size=batch)
    else:
        raise ValueError(form)
    before = state_of(model)
    rng = torch.get_rng_state()
    res = hutchtrace.block_traces(model, crit, K=K, data=data, seed=seed, blocks=blocks, **bt_kwargs())
    out = summary(res)
    out["untouched"] = same_state(before, model) and torch.equal(rng, torch.get_rng_state())
    return out


def dp_comm(rank, world, Ks=(4, 8), batch=5):
    """Elements sent through collectives by data-parallel block_traces, for several K."""
    model, crit, (x, y) = make("wide")
    sizes = shard_sizes(len(x), world)
    xr, yr = shard(x, sizes, rank), shard(y, sizes, rank)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xr, yr), batch_size=batch)
    out = {"P": sum(p.numel() for p in model.parameters()), "L": len(list(model.parameters())), "runs": []}
    for K in Ks:
        with CommCounter() as cc:
            hutchtrace.block_traces(model, crit, K=K, data=loader, seed=1, **bt_kwargs())
        out["runs"].append({"K": K, "elements": cc.elements, "calls": cc.calls, "batches": len(loader)})
    return out


def seed_none(rank, world, K=4):
    """seed=None: every rank draws its own seed; rank 0's must win everywhere."""
    model, crit, (x, y) = make("mlp")
    sizes = shard_sizes(len(x), world)
    res = hutchtrace.block_traces(model, crit, K=K, data=[(shard(x, sizes, rank), shard(y, sizes, rank))],
                                  **bt_kwargs())
    return summary(res)


def ddp(rank, world, K=5, seed=2):
    """A DistributedDataParallel-wrapped model: unwrapped, so no gradient all-reduce fires."""
    model, crit, (x, y) = make("mlp")
    sizes = shard_sizes(len(x), world)
    xr, yr = shard(x, sizes, rank), shard(y, sizes, rank)
    wrapped = nn.parallel.DistributedDataParallel(model)
    hooked = {"calls": 0}

    def counting_hook(state, bucket):
        hooked["calls"] += 1
        fut = torch.futures.Future()
        fut.set_result(bucket.buffer())
        return fut

    wrapped.register_comm_hook(None, counting_hook)
    before = state_of(model)
    res = hutchtrace.block_traces(wrapped, crit, K=K, data=[(xr, yr)], seed=seed, **bt_kwargs())
    out = summary(res)
    out["hook_calls_during"] = hooked["calls"]
    out["grads_none"] = all(p.grad is None for p in model.parameters())
    out["untouched"] = same_state(before, model)
    # the instrument works: an ordinary DDP step does fire the hook
    crit(wrapped(xr), yr).backward()
    out["hook_calls_after_step"] = hooked["calls"]
    return out


def mismatch(rank, world):
    """Ranks passing different K: every rank must raise DistributedError (none hangs)."""
    model, crit, (x, y) = make("mlp")
    try:
        hutchtrace.block_traces(model, crit, K=3 + rank, data=[(x, y)], seed=0, **bt_kwargs())
    except hd.DistributedError as exc:
        return str(exc)
    return None


def welford(rank, world):
    """all_reduce_welford of uneven per-rank chunks vs. one Welford pass over everything."""
    from hutchtrace.estimate.stats import WelfordState

    g = torch.Generator().manual_seed(5)
    data = 1e6 + torch.randn(37, 3, generator=g, dtype=torch.float64)
    sizes = [5, 0, 20, 12][:world] if world == 4 else [30, 7]
    mine = shard(data, sizes, rank)
    st = WelfordState.zeros(3)
    if mine.shape[0]:
        st.update(mine)
    hd.all_reduce_welford(st, dist.group.WORLD)
    return {"n": int(st.count), "mean": st.mean.numpy().copy(), "var": st.variance().numpy().copy()}


# ----------------------------------------------------------------------- sharded params
def _mesh(world):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (world,))


def _distribute(model, mesh, placement_of=None):
    from torch.distributed.tensor import Shard, distribute_tensor

    for mod in model.modules():
        for n, p in list(mod.named_parameters(recurse=False)):
            pl = placement_of(n, p) if placement_of else [Shard(0)]
            mod.register_parameter(n, nn.Parameter(distribute_tensor(p.detach(), mesh, pl), p.requires_grad))
    return model


def dtensor(rank, world, K=4, seed=4, form="single", placements="shard0", blocks="param"):
    """dtensor_block_traces on DTensor parameters with a Shard(0) batch."""
    from torch.distributed.tensor import Replicate, Shard

    model, crit, (x, y) = make("mse")
    mesh = _mesh(world)
    if placements == "mixed":  # weights split by columns, biases replicated
        def placement_of(n, p):
            return [Shard(1)] if p.dim() == 2 else [Replicate()]
    else:
        placement_of = None
    _distribute(model, mesh, placement_of)
    sizes = shard_sizes(len(x), world)
    xr, yr = shard(x, sizes, rank), shard(y, sizes, rank)
    data = (xr, yr) if form == "single" else [(xr[:3], yr[:3]), (xr[3:], yr[3:])]
    before = [p.to_local().clone() for p in model.parameters()]
    with CommCounter() as cc:
        res = hd.dtensor_block_traces(model, crit, K=K, data=data, seed=seed, blocks=blocks)
    out = summary(res)
    out["untouched"] = all(torch.equal(a, p.to_local()) for a, p in zip(before, model.parameters()))
    out["explicit_elements"] = cc.elements
    return out


def fsdp(rank, world, K=4, seed=6):
    """An FSDP2 (fully_shard) model: its all-gather hooks are bypassed for the HVP."""
    from torch.distributed.fsdp import fully_shard

    model, crit, (x, y) = make("mse")
    mesh = _mesh(world)
    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    sizes = shard_sizes(len(x), world)
    xr, yr = shard(x, sizes, rank), shard(y, sizes, rank)
    before = [p.to_local().clone() for p in model.parameters()]
    res = hd.dtensor_block_traces(model, crit, K=K, data=(xr, yr), seed=seed)
    out = summary(res)
    out["untouched"] = all(torch.equal(a, p.to_local()) for a, p in zip(before, model.parameters()))
    # FSDP still trains afterwards (its hooks were restored): grads are sharded DTensors
    crit(model(xr), yr).backward()
    out["trains_after"] = all(p.grad is not None for p in model.parameters())
    return out


def tensor_parallel(rank, world, K=5, seed=8):
    """sharded_block_traces with a user HVP of a Megatron-style tensor-parallel MLP.

    Layer 1 is column parallel (W1, b1 split by output rows: Shard(0)), layer 2 row
    parallel (W2 split by input columns: Shard(1), non-contiguous in the flat vector),
    b2 replicated and owned by rank 0. The objective is sum_r loss_r with loss_r = loss/W,
    so differentiable all-reduces (backward = all-reduce) give exact gradients of the
    sharded weights; the replicated bias's product is summed over ranks.
    """
    import torch.distributed.nn.functional as dnf

    model, crit, (x, y) = make("mse")
    W1, b1 = model[0].weight.detach(), model[0].bias.detach()
    W2, b2 = model[2].weight.detach(), model[2].bias.detach()
    rows = [len(c) for c in torch.arange(W1.shape[0]).chunk(world)]
    lo = sum(rows[:rank])
    hi = lo + rows[rank]
    local = [W1[lo:hi].clone().requires_grad_(), b1[lo:hi].clone().requires_grad_(),
             W2[:, lo:hi].clone().requires_grad_(), b2.clone().requires_grad_()]
    shards = [
        hd.ParamShard("0.weight", local[0], tuple(W1.shape), (lo, 0)),
        hd.ParamShard("0.bias", local[1], tuple(b1.shape), (lo,)),
        hd.ParamShard("2.weight", local[2], tuple(W2.shape), (0, lo)),
        hd.ParamShard("2.bias", local[3], tuple(b2.shape), (0,), owner=rank == 0),
    ]
    h = torch.tanh(x @ local[0].T + local[1])
    out = dnf.all_reduce(h @ local[2].T) + local[3]
    loss_r = crit(out, y) / world
    grads = torch.autograd.grad(loss_r, local, create_graph=True)

    inside = {"elements": 0}

    def hvp(vs):
        before = cc.elements
        hv = list(torch.autograd.grad(grads, local, grad_outputs=vs, retain_graph=True))
        dist.all_reduce(hv[3])  # replicated parameter: sum the ranks' contributions
        inside["elements"] += cc.elements - before
        return hv

    with CommCounter() as cc:
        res = hd.sharded_block_traces(hvp, shards, K=K, seed=seed)
    out = summary(res)
    out["explicit_elements"] = cc.elements - inside["elements"]
    return out


def monitor_ddp(rank, world, path, steps=6, every=2, K=3):
    """A Monitor around a DDP model in an ordinary training loop, logging to one shared path."""
    from hutchtrace.monitor.monitor import Monitor

    model, crit, (x, y) = make("mlp")
    sizes = shard_sizes(len(x), world)
    xr, yr = shard(x, sizes, rank), shard(y, sizes, rank)
    wrapped = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.05)
    mon = Monitor(wrapped, crit, every=every, K=K, overhead=None, detector=None, sinks=[path], seed=0,
                  hvp="reverse")
    for _ in range(steps):
        opt.zero_grad()
        crit(wrapped(xr), yr).backward()
        opt.step()
        mon.step(data=(xr, yr))
    mon.close()
    return {"history": [{"step": r["step"], "blocks": r["blocks"], "total": r["total"]} for r in mon.history]}


def agree(rank, world):
    """agree_int: rank 0's value everywhere."""
    return hd.agree_int(100 + rank)


def dtensor_errors(rank, world):
    """Unsupported DTensor cases fail with clear errors on every rank (none hangs)."""
    from torch.distributed.tensor import Shard

    out = {}
    model, crit, (x, y) = make("cnn_bn")
    _distribute(model, _mesh(world))
    sizes = shard_sizes(len(x), world)
    try:
        hd.dtensor_block_traces(model, crit, K=2, data=(shard(x, sizes, rank), shard(y, sizes, rank)), seed=0)
    except hutchtrace.HVPUnsupportedError as exc:
        out["cnn"] = str(exc)
    model, crit, (x, y) = make("mse")
    _distribute(model, _mesh(world), lambda n, p: [Shard(0)])
    sizes = [9, 3] if world == 2 else None  # not torch.chunk shards of 12 (6, 6)
    try:
        hd.dtensor_block_traces(model, crit, K=2, data=(shard(x, sizes, rank), shard(y, sizes, rank)), seed=0)
    except hutchtrace.DataFormatError as exc:
        out["uneven"] = str(exc)
    return out
