"""torch.distributed support: data-parallel and sharded-parameter block traces.

Why only ``O(L)`` numbers per probe cross the network
-----------------------------------------------------
Probes are counter-based: entry ``i`` of probe ``k`` is a pure function of ``(seed, k, i)``
with ``i`` the GLOBAL element index (:func:`hutchtrace.ops.probes`). Every rank can draw
its part of the same probe without communication (never all-reduce probes: a sum of
Rademacher vectors is not Rademacher, USER-NEEDS J3).

*Data parallel* (every rank holds the whole model and a shard ``D_r`` of the data, ``n_r``
samples). The dataset-mean loss ``l = sum_r (n_r / N) l_r`` with ``N = sum_r n_r`` has Hessian
``H = sum_r (n_r / N) H_r``, so for every block ``b``

.. math:: z_b^\\top (H z)_b = \\frac1N \\sum_r n_r\\, z_b^\\top (H_r z)_b ,

a sum over ranks of ``L`` local numbers per probe. :func:`sample_sink_reducer` all-reduces
the ``K x L`` weighted sums ``sum_m n_m z_b.(H_m z)_b`` and the counts once per call:
``K*L + 1`` numbers, independent of the parameter count ``P``. (The row energies
``||(Hz)_b||^2 = ||sum_r (n_r/N) (H_r z)_b||^2`` need the P-vectors, so they are not
reported under data parallelism.)

*Sharded parameters* (rank ``r`` owns a slice ``S_r`` of every parameter, the slices
partition the elements). Both per-block quantities are sums over elements, hence over
slices:

.. math:: z_b^\\top w_b = \\sum_r \\sum_{i \\in b \\cap S_r} z_i w_i,\\qquad
          \\|w_b\\|^2 = \\sum_r \\sum_{i \\in b \\cap S_r} w_i^2 ,

so each rank draws its slice of ``z`` from the global offsets, receives its slice of
``w = Hz`` from a sharded HVP, and ``2 K L`` partial sums are all-reduced
(:func:`sharded_block_traces`, :func:`dtensor_block_traces`). Replicated elements are
counted on one replica only.

Per-rank streaming statistics (e.g. probes split over ranks) are combined with the K-way
merge of SPEC section 4 (:func:`all_reduce_welford`).

Example (run with ``torchrun --nproc_per_node 2 script.py``)::

    import torch, torch.distributed as dist, hutchtrace
    dist.init_process_group("gloo")
    model = torch.nn.parallel.DistributedDataParallel(net)
    res = hutchtrace.block_traces(model, criterion, K=20, data=my_shard_loader, seed=0)
    if dist.get_rank() == 0:
        print(res.table())
"""

from __future__ import annotations

import contextlib
import math
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from . import ops
from ._validate import check_level, check_model, check_probe_kind, resolve_seed
from .blocks import BlockLayout, resolve_blocks, unwrap_model
from .errors import BlockSpecError, DataFormatError, HutchtraceError, HVPUnsupportedError, NonFiniteWarning
from .loss import BatchClosure, call_model, check_loss_value, make_loss_spec
from .result import BlockEstimate, BlockTraces
from .stats import WelfordState, mean_se_ci

__all__ = [
    "DistributedError",
    "resolve_group",
    "broadcast_seed",
    "sample_sink_reducer",
    "check_consistent",
    "agree_int",
    "all_reduce_welford",
    "is_main_process",
    "ParamShard",
    "shards_of",
    "sharded_block_traces",
    "dtensor_block_traces",
]


class DistributedError(HutchtraceError, RuntimeError):
    """Ranks disagree (different K, blocks, models or batch counts) or a group is unusable."""


# ---------------------------------------------------------------------------------- groups
def _dist():
    import torch.distributed as dist

    return dist


def resolve_group(process_group):
    """The process group to reduce over, or None for single-process estimation.

    ``None`` auto-detects an initialised default group with world size > 1; ``False``
    disables; a group object is used as given (a group of one rank needs no reduction
    and gives None).
    """
    if process_group is False:
        return None
    dist = _dist()
    if process_group is None:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return dist.group.WORLD
        return None
    if not (dist.is_available() and dist.is_initialized()):
        raise DistributedError(
            "process_group was given but torch.distributed is not initialised; call "
            "torch.distributed.init_process_group(...) first (torchrun sets the environment), "
            "or pass process_group=None/False for a single-process estimate"
        )
    try:
        size = dist.get_world_size(process_group)
    except (RuntimeError, ValueError, TypeError, AttributeError) as exc:
        raise DistributedError(
            f"process_group={process_group!r} is not a torch.distributed process group ({exc}); pass a "
            "group from torch.distributed.new_group(...), dist.group.WORLD, None (auto) or False"
        ) from exc
    if size < 0:
        raise DistributedError(
            "this rank is not a member of process_group; call block_traces only on its members"
        )
    return process_group if size > 1 else None


def _comm_device(group) -> torch.device:
    """Where collectives of ``group`` want their tensors (NCCL: the current CUDA device)."""
    backend = str(_dist().get_backend(group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _src_rank(group) -> int:
    dist = _dist()
    return dist.get_global_rank(group, 0)


def broadcast_seed(seed: int, group) -> int:
    """Rank 0's seed on every rank (each rank may have drawn its own). One int64 sent."""
    dist = _dist()
    t = torch.tensor([seed], dtype=torch.int64, device=_comm_device(group))
    dist.broadcast(t, src=_src_rank(group), group=group)
    return int(t.item())


def agree_int(value: int, group=None) -> int:
    """Rank 0's ``value`` on every rank of ``group`` (the default group when initialised with
    more than one rank); ``value`` itself in a single process. For decisions that must be
    identical everywhere, e.g. a monitor's next measurement step computed from local timings."""
    group = resolve_group(group)
    if group is None:
        return int(value)
    return broadcast_seed(int(value), group)


def check_consistent(values: Sequence[int], group, what: str) -> None:
    """Raise :class:`DistributedError` on EVERY rank unless all ranks passed equal ``values``.

    One all-reduce (MAX) of ``2 len(values)`` numbers: the max of ``v`` and of ``-v``
    agree exactly when every rank holds the same ``v``. All ranks see the same verdict,
    so none is left waiting in a later collective.
    """
    dist = _dist()
    v = torch.tensor([int(x) for x in values], dtype=torch.int64, device=_comm_device(group))
    both = torch.cat([v, -v])
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    n = v.numel()
    hi, lo = both[:n], -both[n:]
    if not torch.equal(hi, lo):
        raise DistributedError(
            f"ranks disagree on {what}: this rank has {v.tolist()}, the ranks span "
            f"{lo.tolist()} .. {hi.tolist()}; call with the same arguments (K, blocks, probing, "
            "model structure) on every rank"
        )


def is_main_process(group=None) -> bool:
    """True on the rank that should write logs: rank 0 of ``group`` (or of the default
    group), and always when torch.distributed is not initialised."""
    dist = _dist()
    if not (dist.is_available() and dist.is_initialized()):
        return True
    if group is None:
        return dist.get_rank() == 0
    return dist.get_rank(group) == 0


# ---------------------------------------------------------------------- data parallel
def world_size(group) -> int:
    """Ranks in ``group`` (1 without a group)."""
    if group is None:
        return 1
    return _dist().get_world_size(group)


def broadcast_plan(plan, group):
    """Rank 0's :class:`~hutchtrace.probing.ProbePlan` on every rank (plans chosen from
    rank-local pilot couplings may differ)."""
    from .probing import ProbePlan

    dist = _dist()
    box = [(plan.name, [list(g) for g in plan.groups])]
    dist.broadcast_object_list(box, src=_src_rank(group), group=group)
    name, groups = box[0]
    return ProbePlan(name, tuple(tuple(g) for g in groups))


def sample_sink_reducer(group):
    """A ``reducer(sink, total_count) -> global_count`` summing weighted samples over ranks.

    The sink holds ``sum_m n_m z_b.(H_m z)_b`` over this rank's batches (``K x L``); the
    reducer first checks that every rank has the same ``(K, L)`` (one tiny all-reduce) and
    then all-reduces the samples together with the sample count: ``K*L + 1`` numbers.
    Sets ``sink.global_count`` and ``sink.world_size`` for the caller's metadata.
    """
    dist = _dist()

    def reduce(sink, total_count: float) -> float:
        K, L = sink.samples.shape
        check_consistent([K, L, getattr(sink, "G", 1)], group,
                         "the probe count K, the blocks L and the groups G")
        dev = sink.samples.device
        count = torch.tensor([total_count], dtype=torch.float64, device=dev)
        buf = torch.cat([sink.samples.reshape(-1), count])
        cdev = _comm_device(group)
        moved = buf.to(cdev)
        dist.all_reduce(moved, group=group)
        buf = moved.to(dev)
        sink.samples.copy_(buf[:-1].reshape(sink.samples.shape))
        sink.energy_valid = False  # ||sum_r w_r||^2 needs the P-vectors, not their norms
        sink.global_count = float(buf[-1])
        sink.world_size = dist.get_world_size(group)
        return float(buf[-1])

    return reduce


def all_reduce_welford(state: WelfordState, group) -> WelfordState:
    """The K-way merge of per-rank Welford states (SPEC section 4), in place and returned.

    .. math:: n = \\sum_d n_d,\\quad \\bar x = \\sum_d n_d \\bar x_d / n,\\quad
              M_2 = \\sum_d \\big[M_{2,d} + n_d (\\bar x_d - \\bar x)^2\\big]

    Two all-reduces of ``columns + 1`` and ``columns`` numbers; never ``sum x^2 - n mean^2``
    (catastrophic cancellation). Ranks with no samples (``n_d = 0``) contribute nothing.

    Example:
        >>> # each rank: st = WelfordState.zeros(L + 1); st.update(my_samples)
        >>> # all_reduce_welford(st, dist.group.WORLD)  ->  the statistics of all samples
    """
    dist = _dist()
    dev = state.mean.device
    cdev = _comm_device(group)
    n_d = state.count.to(torch.float64).reshape(1)
    first = torch.cat([n_d, state.mean * n_d]).to(cdev)
    dist.all_reduce(first, group=group)
    first = first.to(dev)
    n = first[0]
    mean = torch.where(n > 0, first[1:] / n.clamp_min(1), torch.zeros_like(state.mean))
    second = (state.m2 + n_d * (state.mean - mean) ** 2).to(cdev)
    dist.all_reduce(second, group=group)
    state.count.copy_(n.round().to(state.count.dtype))
    state.mean.copy_(mean)
    state.m2.copy_(second.to(dev))
    return state


# ------------------------------------------------------------------- sharded parameters
@dataclass(frozen=True)
class ParamShard:
    """This rank's slice of one parameter tensor.

    Attributes:
        name: the parameter's name (identical on every rank; names order the global vector).
        local: the rank's slice (any tensor with the slice's shape, dtype and device).
        global_shape: the full tensor's shape.
        start: index of ``local[0, ..., 0]`` in the full tensor, one entry per dimension;
            the slice is the box ``start[d] .. start[d] + local.shape[d]``.
        owner: whether this rank's elements are counted. Set False on all but one replica
            of a replicated slice (otherwise it would be counted once per replica).
    """

    name: str
    local: torch.Tensor
    global_shape: tuple[int, ...]
    start: tuple[int, ...]
    owner: bool = True

    def __post_init__(self) -> None:
        shape = tuple(self.local.shape)
        gs = tuple(int(s) for s in self.global_shape)
        st = tuple(int(s) for s in self.start)
        object.__setattr__(self, "global_shape", gs)
        object.__setattr__(self, "start", st)
        if len(gs) != len(shape) or len(st) != len(shape):
            raise BlockSpecError(
                f"shard {self.name!r}: local shape {shape}, global_shape {gs} and start {st} must have "
                "the same number of dimensions"
            )
        if any(s < 0 or s + n > g for s, n, g in zip(st, shape, gs)):
            raise BlockSpecError(
                f"shard {self.name!r}: the box start={st} + local shape {shape} does not fit in "
                f"global_shape {gs}"
            )

    def runs(self, base: int) -> tuple[list[int], int]:
        """Global flat starts of the contiguous runs of this slice (row-major), and the run length.

        The slice's elements, read in local row-major order, are ``len(starts)`` runs of
        ``run`` consecutive global elements; ``base`` is the tensor's own global offset.
        """
        gs, st, ls = self.global_shape, self.start, tuple(self.local.shape)
        if len(gs) == 0:
            return [base], 1
        if math.prod(ls) == 0:
            return [], 0
        stride = [math.prod(gs[d + 1 :]) for d in range(len(gs))]
        j = len(gs) - 1
        while j > 0 and ls[j] == gs[j]:  # trailing full dimensions join the run
            j -= 1
        run = ls[j] * stride[j]
        starts = torch.tensor([base + st[j] * stride[j]], dtype=torch.int64)
        for d in range(j - 1, -1, -1):
            idx = (torch.arange(ls[d], dtype=torch.int64) + st[d]) * stride[d]
            starts = (idx[:, None] + starts[None, :]).reshape(-1)
        return starts.tolist(), run


class _Skeleton(nn.Module):
    """Meta-device stand-in holding global-shape parameters under the shards' names."""


def _skeleton(shards: Sequence[ParamShard]) -> nn.Module:
    root = _Skeleton()
    for sh in shards:
        *path, leaf = sh.name.split(".")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, _Skeleton())
            mod = getattr(mod, part)
            if not isinstance(mod, nn.Module):
                raise BlockSpecError(f"shard name {sh.name!r} clashes with another shard's name")
        if leaf in mod._parameters or leaf in mod._modules:
            raise BlockSpecError(f"two shards are called {sh.name!r}; names must be unique")
        stand_in = torch.empty(sh.global_shape, dtype=sh.local.dtype, device="meta")
        mod.register_parameter(leaf, nn.Parameter(stand_in))
    return root


def _layout_for_shards(shards: Sequence[ParamShard], blocks) -> tuple[BlockLayout, list[int]]:
    """Block layout over the GLOBAL parameter vector; ``tensors`` are the local slices.

    Returns the layout and, per layout tensor, its position in ``shards``.
    """
    if not shards:
        raise BlockSpecError("shards is empty; give one ParamShard per parameter tensor")
    meta = resolve_blocks(_skeleton(shards), blocks)
    pos = {sh.name: i for i, sh in enumerate(shards)}
    which = [pos[n] for n in meta.names]
    layout = BlockLayout(
        blocks=meta.blocks,
        names=meta.names,
        tensors=[shards[i].local for i in which],
        offsets=meta.offsets,
        block_index=meta.block_index,
        total_numel=meta.total_numel,
    )
    return layout, which


def _fingerprint(layout: BlockLayout, extra=()) -> int:
    text = repr((layout.block_names, layout.names, layout.offsets, layout.total_numel, tuple(extra)))
    return zlib.crc32(text.encode())


class _LocalProbes:
    """Draws this rank's slices of probes ``k..k+R-1`` for every selected shard."""

    def __init__(self, layout: BlockLayout, shards: Sequence[ParamShard], which: Sequence[int], seed: int,
                 kind: str):
        self.seed, self.kind = seed, kind
        self.items = []
        for j, i in enumerate(which):
            sh = shards[i]
            starts, run = sh.runs(layout.offsets[j])
            self.items.append((sh, starts, run))

    def draw(self, k: int, R: int) -> list[torch.Tensor]:
        out = []
        for sh, starts, run in self.items:
            t = sh.local
            buf = torch.empty((R, len(starts), run), dtype=t.dtype, device=t.device)
            for r, s in enumerate(starts):
                ops.fill_probes_(buf[:, r, :], self.seed, k, s, self.kind)
            out.append(buf.view((R,) + tuple(t.shape)))
        return out


def _estimates_from_samples(layout: BlockLayout, samples: torch.Tensor, energy: torch.Tensor | None,
                            level: float) -> tuple[list[BlockEstimate], BlockEstimate]:
    """Mean, sample-variance SE and t-interval per block and for the per-probe total."""
    K = samples.shape[0]
    state = WelfordState.zeros(layout.num_blocks + 1, device=samples.device)
    state.update(torch.cat([samples, samples.sum(1, keepdim=True)], 1))
    mean, var = state.mean.cpu(), state.variance().cpu()
    se, lo, hi = mean_se_ci(mean, var, K, level)
    finite = torch.isfinite(samples).all(0).cpu()
    row = energy.mean(0).cpu() if energy is not None else None

    def est(name, params, aliases, numel, c, ok, row_energy=None):
        nan = math.nan
        return BlockEstimate(
            name=name, params=params, aliases=aliases, numel=numel,
            mean=float(mean[c]) if ok else nan, se=float(se[c]) if ok else nan,
            ci=(float(lo[c]), float(hi[c])) if ok else (nan, nan),
            variance=float(var[c]) if ok else nan, sample_variance=float(var[c]) if ok else nan,
            row_energy=row_energy, finite=ok,
        )

    blocks = [
        est(b.name, b.params, b.aliases, b.numel, i, bool(finite[i]),
            float(row[i]) if (row is not None and bool(finite[i])) else None)
        for i, b in enumerate(layout.blocks)
    ]
    all_ok = bool(finite.all())
    total = est("total", tuple(p for b in layout.blocks for p in b.params), (), layout.numel, -1, all_ok)
    return blocks, total


def _check_common(K, probe, seed, level):
    from .engine import check_probe_count

    K = check_probe_count(K)
    check_probe_kind(probe)
    check_level(level)
    seed = resolve_seed(seed)
    return K, seed


class _ShardedRun:
    """Accumulates ``weight * (z.w, ||w||^2)`` of this rank's owned slices, then reduces."""

    def __init__(self, layout, shards, which, K, seed, probe, group, progress, desc):
        from .progress import Progress

        self.layout, self.K, self.group = layout, K, group
        self.probes = _LocalProbes(layout, shards, which, seed, probe)
        self.owned = [j for j, i in enumerate(which) if shards[i].owner]
        self.bidx = [layout.block_index[j] for j in self.owned]
        L = layout.num_blocks
        dev = layout.device()
        self.samples = torch.zeros((K, L), dtype=torch.float64, device=dev)
        self.energy = torch.zeros((K, L), dtype=torch.float64, device=dev)
        self.hvps = 0
        self.prog = Progress(K, desc, progress if is_main_process(group) else False)

    def batch(self, hvp: Callable[[list[torch.Tensor]], list[torch.Tensor]], weight: float) -> None:
        L = self.layout.num_blocks
        for k in range(self.K):
            z = [zj[0] for zj in self.probes.draw(k, 1)]
            w = list(hvp(z))
            if len(w) != len(z):
                raise HVPUnsupportedError(f"the hvp returned {len(w)} tensors for {len(z)} tangents")
            for j, (wj, zj) in enumerate(zip(w, z)):
                if tuple(wj.shape) != tuple(zj.shape):
                    raise HVPUnsupportedError(
                        f"the hvp returned shape {tuple(wj.shape)} for {self.layout.names[j]!r}, whose local "
                        f"slice has shape {tuple(zj.shape)}; return this rank's slice of H v"
                    )
            self.hvps += 1
            if self.owned:
                dots, sq = ops.block_dot([w[j] for j in self.owned], [z[j] for j in self.owned], self.bidx, L)
                self.samples[k].add_(dots.reshape(L), alpha=weight)
                self.energy[k].add_(sq.reshape(L), alpha=weight * weight)
            self.prog.update(1)

    def reduce(self, total_count: float, fingerprint: int) -> float:
        self.prog.close()
        if self.group is None:
            return total_count
        dist = _dist()
        check_consistent([self.K, self.layout.num_blocks, fingerprint], self.group,
                         "K, the blocks and the parameter layout")
        dev = self.samples.device
        buf = torch.cat([self.samples.reshape(-1), self.energy.reshape(-1)]).to(_comm_device(self.group))
        dist.all_reduce(buf, group=self.group)
        buf = buf.to(dev)
        n = self.samples.numel()
        self.samples.copy_(buf[:n].reshape(self.samples.shape))
        self.energy.copy_(buf[n:].reshape(self.energy.shape))
        return total_count


def _finish(run: _ShardedRun, layout, total_count, energy_valid, level, meta) -> BlockTraces:
    import warnings

    run.samples /= total_count
    run.energy /= total_count**2
    blocks, total = _estimates_from_samples(layout, run.samples, run.energy if energy_valid else None, level)
    bad = [b.name for b in blocks if not b.finite]
    if bad:
        warnings.warn(
            f"non-finite Hessian-vector products in blocks {bad}: they are reported as NaN (finite=False), "
            "not averaged", NonFiniteWarning, stacklevel=3,
        )
    return BlockTraces(blocks=blocks, total=total, samples=run.samples.cpu(), level=level, meta=meta)


def sharded_block_traces(
    hvp: Callable[[list[torch.Tensor]], list[torch.Tensor]],
    shards: Sequence[ParamShard],
    K: int = 10,
    *,
    blocks="param",
    probe: str = "rademacher",
    seed: int | None = None,
    level: float = 0.95,
    process_group=None,
    progress: bool | None = None,
) -> BlockTraces:
    """Block traces when every rank holds a slice of each parameter (FSDP / tensor parallel).

    Each rank draws its slices of probe ``z^(k)`` from the global element offsets (the
    global vector lists the full tensors in the ``named_parameters()`` order of a module
    holding these names, which is the order given when the shards follow the model's
    ``named_parameters()``: then the probes are those :func:`hutchtrace.block_traces`
    draws for the unsharded model with the same seed), calls ``hvp`` with them
    and gets back its slices of ``w = H z``; the partial sums ``z_b.w_b`` and ``||w_b||^2``
    over owned slices are all-reduced once per call (``2 K L`` numbers; SPEC section 1,
    module docs). Row energies are reported (they sum over slices).

    Args:
        hvp: ``hvp(tangents) -> products``: lists with one tensor per shard, each of the
            shard's local shape; the products must be this rank's slices of the true
            ``H v`` (the function does whatever communication the model needs; it is
            called once per probe, in the same order on every rank).
        shards: one :class:`ParamShard` per parameter tensor, the same names and order
            on every rank.
        K, probe, seed, level, progress: as in :func:`hutchtrace.block_traces`.
        blocks: ``"param"``, ``"module"`` (by name prefix), ``"all"``, a dict
            ``block -> names`` or a callable, resolved on the shards' global shapes as in
            :func:`hutchtrace.resolve_blocks`.
        process_group: the ranks holding the slices (``None``: the default group if
            initialised with > 1 rank; ``False``: no reduction).

    Returns:
        :class:`~hutchtrace.result.BlockTraces` with ``meta["distributed"] == "sharded"``
        (standard errors from the sample variance).

    Example:
        >>> import torch
        >>> from hutchtrace.distributed import ParamShard, sharded_block_traces
        >>> H = torch.diag(torch.arange(1.0, 7.0, dtype=torch.float64))   # one rank owning everything
        >>> sh = [ParamShard("w", torch.zeros(6, dtype=torch.float64), (6,), (0,))]
        >>> res = sharded_block_traces(lambda v: [H @ v[0]], sh, K=4, seed=0, process_group=False)
        >>> res["w"].mean     # diagonal H: every Rademacher sample is exactly tr H = 21
        21.0
    """
    t0 = time.perf_counter()
    K, seed = _check_common(K, probe, seed, level)
    shards = list(shards)
    for sh in shards:
        if not isinstance(sh, ParamShard):
            raise TypeError(f"shards must be ParamShard objects, got {type(sh).__name__}")
    layout, which = _layout_for_shards(shards, blocks)
    group = resolve_group(process_group)
    if group is not None:
        seed = broadcast_seed(seed, group)
    run = _ShardedRun(layout, shards, which, K, seed, probe, group, progress, "sharded_block_traces")
    pos = {i: j for j, i in enumerate(which)}

    def hvp_selected(z_sel: list[torch.Tensor]) -> list[torch.Tensor]:
        full = [z_sel[pos[i]] if i in pos else torch.zeros_like(sh.local) for i, sh in enumerate(shards)]
        out = list(hvp(full))
        if len(out) != len(shards):
            raise HVPUnsupportedError(f"the hvp returned {len(out)} tensors for {len(shards)} shards")
        return [out[i] for i in which]

    run.batch(hvp_selected, 1.0)
    run.reduce(1.0, _fingerprint(layout, (K, probe)))
    meta = _meta(K, seed, probe, "user", layout, run, 1, None, "closure", group, t0)
    return _finish(run, layout, 1.0, True, level, meta)


def _meta(K, seed, probe, hvp_name, layout, run, n_batches, n_samples, form, group, t0) -> dict:
    return {
        "K": K, "seed": seed, "probe": probe, "probing": "global", "curvature": "hessian", "groups": 1,
        "hvp": hvp_name, "backend": ops.backend_name(layout.device()), "n_batches": n_batches,
        "n_samples": n_samples, "hvps": run.hvps, "loss_form": form, "device": str(layout.device()),
        "dtype": str(layout.tensors[0].dtype), "distributed": "sharded",
        "world_size": _dist().get_world_size(group) if group is not None else 1,
        "wall_time_s": time.perf_counter() - t0,
    }


# ------------------------------------------------------------------------- DTensor models
def _dtensor_cls():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - very old torch
        return None
    return DTensor


def shards_of(model: nn.Module) -> list[ParamShard]:
    """:class:`ParamShard` of every unique trainable DTensor parameter of ``model``
    (``named_parameters`` order, as :func:`hutchtrace.resolve_blocks` numbers them).

    ``Shard(d)`` and ``Replicate()`` placements on any device mesh are supported; on a
    replicated mesh dimension only coordinate 0 owns the slice.
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    DTensor = _dtensor_cls()
    out, seen = [], set()
    for name, p in unwrap_model(model).named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if not isinstance(p, DTensor):
            raise BlockSpecError(
                f"parameter {name!r} is a plain tensor, not a DTensor; shard every trainable parameter "
                "(distribute_tensor / fully_shard), freeze it, or use block_traces(process_group=...) for "
                "replicated models"
            )
        mesh, placements = p.device_mesh, tuple(p.placements)
        for pl in placements:
            if type(pl) not in (Shard, Replicate):
                raise HVPUnsupportedError(
                    f"parameter {name!r} has placement {pl!r}; only Shard(d) and Replicate() are supported "
                    "(no Partial / strided shards, e.g. FSDP2 composed with tensor parallelism)"
                )
        shape, start = compute_local_shape_and_global_offset(p.shape, mesh, placements)
        coord = mesh.get_coordinate()
        owner = all(coord[d] == 0 for d, pl in enumerate(placements) if isinstance(pl, Replicate))
        local = p.to_local()
        if tuple(local.shape) != tuple(shape):
            raise HVPUnsupportedError(
                f"parameter {name!r}: local shape {tuple(local.shape)} differs from the expected "
                f"{tuple(shape)}; uneven custom shardings are not supported"
            )
        out.append(ParamShard(name, local, tuple(p.shape), tuple(start), owner))
    if not out:
        raise BlockSpecError("the model has no trainable parameters")
    return out


@contextlib.contextmanager
def _fsdp_hooks_off(model: nn.Module):
    """Run FSDP2 (``fully_shard``) modules on their sharded DTensor parameters.

    FSDP2's forward hooks all-gather plain unsharded tensors, so the sharded parameters
    never enter the graph and second-order ``autograd.grad`` fails (pytorch#172543).
    Without the hooks the forward runs in DTensor semantics on the sharded parameters.
    """
    saved = []
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        FSDPModule = ()
    for m in model.modules():
        if FSDPModule and isinstance(m, FSDPModule):
            saved.append((m, dict(m._forward_pre_hooks), dict(m._forward_hooks),
                          dict(m._forward_pre_hooks_with_kwargs), dict(m._forward_hooks_with_kwargs)))
            m._forward_pre_hooks.clear()
            m._forward_hooks.clear()
    try:
        yield
    finally:
        for m, pre, post, prekw, postkw in saved:
            m._forward_pre_hooks.clear()
            m._forward_pre_hooks.update(pre)
            m._forward_hooks.clear()
            m._forward_hooks.update(post)
            m._forward_pre_hooks_with_kwargs.clear()
            m._forward_pre_hooks_with_kwargs.update(prekw)
            m._forward_hooks_with_kwargs.clear()
            m._forward_hooks_with_kwargs.update(postkw)


def _chunk_sizes(n: int, world: int) -> list[int]:
    cs = -(-n // world) if world else 0
    return [max(0, min(cs, n - r * cs)) for r in range(world)]


def _shard_batch(obj, mesh, n_global: int):
    """Wrap plain tensors (batch dimension first) as ``Shard(0)`` DTensors of ``n_global`` rows."""
    from torch.distributed.tensor import Shard

    DTensor = _dtensor_cls()
    if isinstance(obj, DTensor):
        return obj
    if torch.is_tensor(obj):
        if obj.dim() == 0:
            return obj
        shape = (n_global,) + tuple(obj.shape[1:])
        stride = tuple(math.prod(shape[d + 1 :]) for d in range(len(shape)))
        return DTensor.from_local(obj.contiguous(), mesh, [Shard(0)], run_check=False,
                                  shape=torch.Size(shape), stride=stride)
    if isinstance(obj, Mapping):
        return type(obj)((k, _shard_batch(v, mesh, n_global)) for k, v in obj.items())
    if isinstance(obj, (tuple, list)):
        return type(obj)(_shard_batch(v, mesh, n_global) for v in obj)
    return obj


def _local_size(batch: BatchClosure) -> float:
    from .loss import _batch_size

    if batch.criterion is None:
        return batch.count
    return float(_batch_size(batch.inputs, batch.targets))


def _synced_batches(spec, group):
    """This rank's batches, each with every rank's local batch size; ranks step together.

    Every forward of a DTensor model runs collectives, so every rank must take part in
    every batch: one all-gather of ``(has_batch, n_local)`` per step checks that.
    """
    dist = _dist()
    world = dist.get_world_size(group)
    cdev = _comm_device(group)
    it = iter(spec.batches())
    step = 0
    while True:
        batch = next(it, None)
        mine = torch.tensor([0.0 if batch is None else 1.0, 0.0 if batch is None else _local_size(batch)],
                            dtype=torch.float64, device=cdev)
        got = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(got, mine, group=group)
        has = [int(g[0]) for g in got]
        if not any(has):
            return
        if not all(has):
            raise DistributedError(
                f"ranks {[r for r, h in enumerate(has) if not h]} ran out of batches at step {step} while "
                "others did not; with sharded parameters every rank must see the same number of batches"
            )
        counts = [int(g[1]) for g in got]
        yield step, batch, counts
        step += 1


def _dtensor_batch(run: _ShardedRun, model: nn.Module, fn, params: list, weight: float) -> None:
    """One batch: the first-order graph once, then one double backward per probe."""
    DTensor = _dtensor_cls()
    with torch.enable_grad():
        value = check_loss_value(fn(model))
        if not value.requires_grad:
            raise HutchtraceError("the loss does not depend on the selected parameters")
        grads = torch.autograd.grad(value, params, create_graph=True, allow_unused=True)
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    metas = [(p.device_mesh, tuple(p.placements), p.shape, p.stride()) for p in params]

    def hvp(z: list[torch.Tensor]) -> list[torch.Tensor]:
        if not live:
            return [torch.zeros_like(zi) for zi in z]
        tangents = [DTensor.from_local(z[i], metas[i][0], metas[i][1], run_check=False,
                                       shape=metas[i][2], stride=metas[i][3]) for i in live]
        with torch.enable_grad():
            out = torch.autograd.grad([grads[i] for i in live], params, grad_outputs=tangents,
                                      retain_graph=True, allow_unused=True)
        # products come back Partial (summed over ranks) or replicated: bring each to its
        # parameter's placements so this rank holds exactly its slice
        return [torch.zeros_like(zi) if o is None else o.redistribute(m[0], m[1]).to_local().reshape(zi.shape)
                for o, zi, m in zip(out, z, metas)]

    run.batch(hvp, weight)


def _dtensor_failure(exc: RuntimeError) -> HVPUnsupportedError:
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    hint = ""
    if "mixed torch.Tensor and DTensor" in msg:
        hint = (" A module computes with plain tensors (buffers such as BatchNorm statistics, constants, "
                "tensors created in forward); DTensor needs every operand distributed. Do not work around "
                "it with implicit_replication: it gave wrong products in our tests.")
    return HVPUnsupportedError(
        f"DTensor could not evaluate or differentiate this model twice ({msg}).{hint} See "
        "docs/distributed.md for what works; otherwise gather the parameters and use "
        "block_traces(process_group=...), or supply your own sharded HVP to sharded_block_traces"
    )


def dtensor_block_traces(
    model: nn.Module,
    loss,
    K: int = 10,
    *,
    data=None,
    blocks="param",
    probe: str = "rademacher",
    seed: int | None = None,
    level: float = 0.95,
    progress: bool | None = None,
) -> BlockTraces:
    """Block traces of a model whose parameters are DTensors (``distribute_tensor``,
    ``distribute_module``, FSDP2 ``fully_shard``).

    The Hessian-vector product is a double backward in DTensor semantics on the sharded
    parameters (FSDP2's all-gather hooks are bypassed for the call); each product is
    redistributed to its parameter's placements, so every rank gets its slice and
    :func:`sharded_block_traces` does the rest. The result equals
    :func:`hutchtrace.block_traces` on the unsharded model with the full batch and the same
    seed (same probes: both number elements by the unsharded ``named_parameters``).

    Args:
        model: the module (DDP/DataParallel wrappers are unwrapped); every trainable
            parameter a DTensor with ``Shard``/``Replicate`` placements on one mesh.
        loss, data: a closure ``loss(model)`` (build DTensor inputs yourself), or a
            criterion with ``data=(inputs, targets)`` / an iterable of batches. Plain
            tensors in ``data`` are this rank's shard of the global batch along dimension 0
            and are wrapped as ``Shard(0)`` DTensors (1-D meshes); the shard sizes must
            follow ``torch.chunk`` of the global batch. Every rank must yield the same
            number of batches; batch ``m`` is weighted by its GLOBAL sample count.
        K, blocks, probe, seed, level, progress: as in :func:`hutchtrace.block_traces`.

    Supported: what DTensor can differentiate twice. On torch 2.14 CPU that holds for
    Linear / elementwise activations / MSE-type losses; BatchNorm, convolutions with
    sharded weights, attention and RNN cells fail (or, with implicit replication of
    internal plain tensors, give wrong products), see docs/distributed.md.
    """
    t0 = time.perf_counter()
    K, seed = _check_common(K, probe, seed, level)
    check_model(model)
    inner = unwrap_model(model)
    shards = shards_of(inner)
    layout_model = resolve_blocks(inner, blocks)
    by_name = {sh.name: i for i, sh in enumerate(shards)}
    which = [by_name[n] for n in layout_model.names]
    layout = BlockLayout(blocks=layout_model.blocks, names=layout_model.names,
                         tensors=[shards[i].local for i in which], offsets=layout_model.offsets,
                         block_index=layout_model.block_index, total_numel=layout_model.total_numel)
    params = list(layout_model.tensors)  # the DTensor parameters, in layout order
    mesh = params[0].device_mesh
    if any(p.device_mesh != mesh for p in params):
        raise HVPUnsupportedError("the DTensor parameters live on different device meshes; use one mesh")
    group = mesh.get_group() if mesh.ndim == 1 else _dist().group.WORLD
    spec = make_loss_spec(loss, data)
    sum_reduced = getattr(loss, "reduction", "mean") == "sum"
    seed = broadcast_seed(seed, group)
    run = _ShardedRun(layout, shards, which, K, seed, probe, group, progress, "dtensor_block_traces")
    from .state import PreservedState

    total_count, n_batches = 0.0, 0
    with PreservedState(inner), _fsdp_hooks_off(inner):
        for _step, batch, counts in _synced_batches(spec, group):
            n_batches += 1
            n_global = float(sum(counts))
            if batch.criterion is not None:
                if mesh.ndim != 1:
                    raise DataFormatError(
                        "automatic batch sharding needs a 1-D device mesh; use a closure loss(model) that "
                        "builds DTensor inputs for multi-dimensional meshes"
                    )
                expect = _chunk_sizes(int(n_global), len(counts))
                if counts != expect:
                    raise DataFormatError(
                        f"the ranks' batch sizes {counts} are not torch.chunk shards of the global batch "
                        f"({expect} for {int(n_global)} samples), which DTensor requires; make the shards "
                        "chunk-sized or use block_traces(process_group=...) with replicated parameters"
                    )
                inputs = _shard_batch(batch.inputs, mesh, int(n_global))
                targets = _shard_batch(batch.targets, mesh, int(n_global))
                crit = batch.criterion

                def fn(m, crit=crit, inputs=inputs, targets=targets):
                    return crit(call_model(m, inputs), targets)
            else:
                fn = batch.fn
            if spec.kind == "dataset":
                weight, count = (1.0 if sum_reduced else n_global), n_global
            else:
                weight, count = 1.0, 1.0
            total_count += count
            try:
                _dtensor_batch(run, inner, fn, params, weight)
            except RuntimeError as exc:
                if isinstance(exc, HutchtraceError):
                    raise
                raise _dtensor_failure(exc) from exc
    run.reduce(total_count, _fingerprint(layout, (K, probe)))
    meta = _meta(K, seed, probe, "dtensor-reverse", layout, run, n_batches,
                 total_count if spec.kind == "dataset" else None, spec.kind, group, t0)
    return _finish(run, layout, total_count, n_batches == 1, level, meta)
