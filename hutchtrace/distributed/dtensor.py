"""Block traces of DTensor / FSDP2 models: shards read off the model, batches split over the mesh.

See :mod:`hutchtrace.distributed` for the maths.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Mapping

import torch
from torch import nn

from ..core.errors import BlockSpecError, DataFormatError, HutchtraceError, HVPUnsupportedError
from ..core.validate import check_model
from ..estimate.result import BlockTraces
from ..problem.blocks import BlockLayout, resolve_blocks, unwrap_model
from ..problem.loss import BatchClosure, call_model, check_loss_value, make_loss_spec


# ------------------------------------------------------------------------- DTensor models
def _dtensor_cls():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - very old torch
        return None
    return DTensor
from ..estimate.comm import DistributedError, broadcast_seed, comm_device, torch_dist
from .sharded import ParamShard, _check_common, _fingerprint, _finish, _meta, _ShardedRun


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
    from ..problem.loss import _batch_size

    if batch.criterion is None:
        return batch.count
    return float(_batch_size(batch.inputs, batch.targets))


def _synced_batches(spec, group):
    """This rank's batches, each with every rank's local batch size; ranks step together.

    Every forward of a DTensor model runs collectives, so every rank must take part in
    every batch: one all-gather of ``(has_batch, n_local)`` per step checks that.
    """
    dist = torch_dist()
    world = dist.get_world_size(group)
    cdev = comm_device(group)
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
    group = mesh.get_group() if mesh.ndim == 1 else torch_dist().group.WORLD
    spec = make_loss_spec(loss, data)
    sum_reduced = getattr(loss, "reduction", "mean") == "sum"
    seed = broadcast_seed(seed, group)
    run = _ShardedRun(layout, shards, which, K, seed, probe, group, progress, "dtensor_block_traces")
    from ..core.state import PreservedState

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

