"""torch.distributed support (data-parallel block traces).

Every rank draws the same counter-based probes (no communication), evaluates HVPs on its
own shard of the data, and only the per-block sums are all-reduced.
"""

from __future__ import annotations

import torch

__all__ = ["resolve_group", "sample_sink_reducer", "broadcast_seed"]


def resolve_group(process_group):
    """The process group to reduce over, or None for single-process estimation.

    ``None`` auto-detects an initialised default group with world size > 1; ``False``
    disables; a group object is used as given.
    """
    if process_group is False:
        return None
    import torch.distributed as dist

    if process_group is None:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return dist.group.WORLD
        return None
    return process_group


def broadcast_seed(seed: int, group) -> int:
    """Rank 0's seed on every rank (each rank may have drawn its own)."""
    import torch.distributed as dist

    t = torch.tensor([seed], dtype=torch.int64)
    dist.broadcast(t, src=dist.get_global_rank(group, 0) if group is not dist.group.WORLD else 0, group=group)
    return int(t.item())


def sample_sink_reducer(group):
    """A ``reducer(sink, total_count) -> global_count`` summing weighted samples over ranks."""
    import torch.distributed as dist

    def reduce(sink, total_count: float) -> float:
        buf = torch.cat([sink.samples.reshape(-1), torch.tensor([total_count], dtype=torch.float64,
                                                                  device=sink.samples.device)])
        dist.all_reduce(buf, group=group)
        sink.samples.copy_(buf[:-1].reshape(sink.samples.shape))
        sink.energy_valid = False  # ||sum_r w_r||^2 needs the P-vectors, not their norms
        return float(buf[-1])

    return reduce
