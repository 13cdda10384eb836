"""Data-parallel collectives the estimator needs: process groups, seed and plan broadcast, the
all-reduce of per-probe samples (``K*L + 1`` numbers per call, independent of ``P``) and of
streaming statistics.

The dataset-mean loss over ranks ``l = sum_r (n_r / N) l_r`` has Hessian ``H = sum_r (n_r/N) H_r``,
so ``z_b^T (H z)_b = (1/N) sum_r n_r z_b^T (H_r z)_b``: a sum over ranks of ``L`` local numbers per
probe (:func:`sample_sink_reducer`). Per-rank streaming statistics are combined with the K-way
merge of docs/maths.md section 4 (:func:`all_reduce_welford`). The sharded-parameter estimators
built on these live in :mod:`hutchtrace.distributed`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..core.errors import HutchtraceError
from .probing import ProbePlan
from .stats import WelfordState


class DistributedError(HutchtraceError, RuntimeError):
    """Ranks disagree (different K, blocks, models or batch counts) or a group is unusable."""


# ---------------------------------------------------------------------------------- groups
def torch_dist():
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
    dist = torch_dist()
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


def comm_device(group) -> torch.device:
    """Where collectives of ``group`` want their tensors (NCCL: the current CUDA device)."""
    backend = str(torch_dist().get_backend(group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _src_rank(group) -> int:
    dist = torch_dist()
    return dist.get_global_rank(group, 0)


def broadcast_seed(seed: int, group) -> int:
    """Rank 0's seed on every rank (each rank may have drawn its own). One int64 sent."""
    dist = torch_dist()
    t = torch.tensor([seed], dtype=torch.int64, device=comm_device(group))
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
    dist = torch_dist()
    v = torch.tensor([int(x) for x in values], dtype=torch.int64, device=comm_device(group))
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
    dist = torch_dist()
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
    return torch_dist().get_world_size(group)


def broadcast_plan(plan, group):
    """Rank 0's :class:`~hutchtrace.estimate.probing.ProbePlan` on every rank (plans chosen from
    rank-local pilot couplings may differ)."""
    dist = torch_dist()
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
    dist = torch_dist()

    def reduce(sink, total_count: float) -> float:
        K, L = sink.samples.shape
        check_consistent([K, L, getattr(sink, "G", 1)], group,
                         "the probe count K, the blocks L and the groups G")
        dev = sink.samples.device
        count = torch.tensor([total_count], dtype=torch.float64, device=dev)
        buf = torch.cat([sink.samples.reshape(-1), count])
        cdev = comm_device(group)
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
    """The K-way merge of per-rank Welford states (``docs/maths.md`` section 4), in place and returned.

    .. math:: n = \\sum_d n_d,\\quad \\bar x = \\sum_d n_d \\bar x_d / n,\\quad
              M_2 = \\sum_d \\big[M_{2,d} + n_d (\\bar x_d - \\bar x)^2\\big]

    Two all-reduces of ``columns + 1`` and ``columns`` numbers; never ``sum x^2 - n mean^2``
    (catastrophic cancellation). Ranks with no samples (``n_d = 0``) contribute nothing.

    Example:
        >>> # each rank: st = WelfordState.zeros(L + 1); st.update(my_samples)
        >>> # all_reduce_welford(st, dist.group.WORLD)  ->  the statistics of all samples
    """
    dist = torch_dist()
    dev = state.mean.device
    cdev = comm_device(group)
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


