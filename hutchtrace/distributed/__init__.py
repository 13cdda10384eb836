"""torch.distributed support: data-parallel and sharded-parameter block traces.

Why only ``O(L)`` numbers per probe cross the network
-----------------------------------------------------
Probes are counter-based: entry ``i`` of probe ``k`` is a pure function of ``(seed, k, i)``
with ``i`` the GLOBAL element index (:func:`hutchtrace.kernels.ops.probes`). Every rank can draw
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
merge of docs/maths.md section 4 (:func:`all_reduce_welford`).

Example (run with ``torchrun --nproc_per_node 2 script.py``)::

    import torch, torch.distributed as dist, hutchtrace
    dist.init_process_group("gloo")
    model = torch.nn.parallel.DistributedDataParallel(net)
    res = hutchtrace.block_traces(model, criterion, K=20, data=my_shard_loader, seed=0)
    if dist.get_rank() == 0:
        print(res.table())
"""

from ..estimate.comm import (
    DistributedError,
    agree_int,
    all_reduce_welford,
    broadcast_seed,
    check_consistent,
    is_main_process,
    resolve_group,
    sample_sink_reducer,
)
from .dtensor import dtensor_block_traces, shards_of
from .sharded import ParamShard, sharded_block_traces

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
