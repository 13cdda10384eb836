"""The inputs of one ``block_traces`` call, checked and resolved once: :class:`Call`.

:func:`resolve_call` validates the options (:func:`check_arguments`; ``hvp`` is checked by
the probe runner, ``groups`` once the pilot has run), draws the seed when none is given,
unwraps the model, resolves
the blocks (:func:`hutchtrace.problem.blocks.resolve_blocks`) and the loss
(:func:`hutchtrace.problem.loss.make_loss_spec`), detects the process group of a
data-parallel call (rank 0's seed then holds on every rank) and fixes the plan of the
explicit probing schemes (:func:`hutchtrace.estimate.plan_choice.fixed_plan`). The rest of
the call reads the :class:`Call` and never the raw arguments.

Example:
    >>> check_arguments(10, "rademacher", 0.95, "auto", "blocks", rtol=0.05, atol=None, max_K=None, pilot_K=8)
    (10, 10000, True)
    >>> check_arguments(10, "rademacher", 0.95, "exact", "blocks", None, None, None, 8)
    Traceback (most recent call last):
    ...
    ValueError: variance must be one of ('auto', 'pairwise', 'sample'), got 'exact'
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core.validate import check_level, check_model, check_probe_kind, resolve_seed
from ..problem.blocks import BlockLayout, resolve_blocks, unwrap_model
from ..problem.loss import LossSpec, make_loss_spec
from . import comm
from .engine import check_probe_count
from .plan_choice import fixed_plan
from .probing import ProbePlan

__all__ = ["VARIANCES", "Call", "resolve_call"]

VARIANCES = ("auto", "pairwise", "sample")


@dataclass
class Call:
    """One call's resolved inputs (the arguments of :func:`~hutchtrace.estimate.estimator.block_traces`
    after :func:`resolve_call`).

    ``model`` is the unwrapped module; ``plan`` the plan of an explicit scheme (None for
    ``colored`` / ``auto``, which choose it after a pilot); ``probing`` the scheme as given;
    ``group`` the process group (None: one process) and ``reducer`` its sample reducer;
    ``single`` whether every probe's samples are complete after one pass of one batch
    (a closure or one batch in one process); ``adaptive`` whether ``rtol`` / ``atol`` set a
    target.
    """

    model: nn.Module
    layout: BlockLayout
    spec: LossSpec
    K: int
    seed: int
    probe: str
    hvp: str
    probing: object
    plan: ProbePlan | None
    groups: int | None
    variance: str
    rtol: float | None
    atol: float | None
    adaptive: bool
    max_K: int
    stop_on: str
    level: float
    curvature: str
    pilot_K: int
    probe_batch: int | None
    max_memory: int | None
    progress: bool | None
    cuda_graph: bool
    group: object
    reducer: object
    single: bool
    device: torch.device

    @property
    def L(self) -> int:
        """Number of blocks."""
        return self.layout.num_blocks


def check_arguments(K, probe, level, variance, stop_on, rtol, atol, max_K, pilot_K) -> tuple[int, int, bool]:
    """Validate the numeric and named options: ``(K, max_K, adaptive)``, ``max_K`` defaulted
    (10000 with a target, else ``K``)."""
    K = check_probe_count(K)
    check_probe_kind(probe)
    check_level(level)
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
    if stop_on not in ("blocks", "total"):
        raise ValueError(f"stop_on must be 'blocks' or 'total', got {stop_on!r}")
    adaptive = rtol is not None or atol is not None
    for nm, v in (("rtol", rtol), ("atol", atol)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0):
            raise ValueError(f"{nm} must be a positive number or None, got {v!r}")
    if max_K is None:
        max_K = 10_000 if adaptive else K
    elif isinstance(max_K, bool) or not isinstance(max_K, int) or max_K < K:
        raise ValueError(f"max_K must be an int >= K ({K}), got {max_K!r}")
    if isinstance(pilot_K, bool) or not isinstance(pilot_K, int) or pilot_K < 2:
        raise ValueError(f"pilot_K must be an int >= 2, got {pilot_K!r}")
    return K, max_K, adaptive


def rank_data(data, group):
    """``data`` as this rank's dataset: under data parallelism one ``(inputs, targets)`` shard
    per rank becomes a one-batch dataset, weighted by its sample count like any batch."""
    if group is not None and data is not None and isinstance(data, tuple) and len(data) == 2 \
            and not isinstance(data[1], (tuple, list)):
        return [data]
    return data


def resolve_call(model, loss, K, *, data, blocks, probe, seed, hvp, probing, groups, variance, rtol, atol,
                 max_K, stop_on, level, curvature, pilot_K, probe_batch, max_memory, progress, process_group,
                 cuda_graph) -> Call:
    """Check every argument of ``block_traces`` and resolve model, blocks, loss, seed and
    process group (module docs)."""
    K, max_K, adaptive = check_arguments(K, probe, level, variance, stop_on, rtol, atol, max_K, pilot_K)
    seed = resolve_seed(seed)
    check_model(model)
    inner = unwrap_model(model)
    layout = resolve_blocks(inner, blocks)
    group = comm.resolve_group(process_group)
    spec = make_loss_spec(loss, rank_data(data, group), allow_empty=group is not None)
    if adaptive and not spec.reiterable:
        raise ValueError("adaptive stopping (rtol/atol) needs re-iterable data (a list or a DataLoader), "
                         "not a one-shot iterator")
    plan = fixed_plan(probing, layout.num_blocks)
    reducer = comm.sample_sink_reducer(group) if group is not None else None
    if group is not None and progress is None and not comm.is_main_process(group):
        progress = False  # one progress display per job, on rank 0
    if group is not None:
        seed = comm.broadcast_seed(seed, group)
    return Call(
        model=inner, layout=layout, spec=spec, K=K, seed=seed, probe=probe, hvp=hvp, probing=probing,
        plan=plan, groups=groups, variance=variance, rtol=rtol, atol=atol, adaptive=adaptive, max_K=max_K,
        stop_on=stop_on, level=level, curvature=curvature, pilot_K=pilot_K, probe_batch=probe_batch,
        max_memory=max_memory, progress=progress, cuda_graph=cuda_graph, group=group, reducer=reducer,
        single=spec.kind != "dataset" and group is None, device=layout.device(),
    )
