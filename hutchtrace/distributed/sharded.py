"""Sharded-parameter block traces: each rank holds a slice of every parameter (:class:`ParamShard`).

See :mod:`hutchtrace.distributed` for the maths.
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..core.errors import BlockSpecError, HVPUnsupportedError, NonFiniteWarning
from ..core.validate import check_level, check_probe_kind, resolve_seed
from ..estimate.result import BlockEstimate, BlockTraces
from ..estimate.stats import WelfordState, mean_se_ci
from ..kernels import ops
from ..problem.blocks import BlockLayout, resolve_blocks


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
from ..estimate.comm import (
    broadcast_seed,
    check_consistent,
    comm_device,
    is_main_process,
    resolve_group,
    torch_dist,
)


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
    from ..estimate.engine import check_probe_count

    K = check_probe_count(K)
    check_probe_kind(probe)
    check_level(level)
    seed = resolve_seed(seed)
    return K, seed


class _ShardedRun:
    """Accumulates ``weight * (z.w, ||w||^2)`` of this rank's owned slices, then reduces."""

    def __init__(self, layout, shards, which, K, seed, probe, group, progress, desc):
        from ..core.progress import Progress

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
        dist = torch_dist()
        check_consistent([self.K, self.layout.num_blocks, fingerprint], self.group,
                         "K, the blocks and the parameter layout")
        dev = self.samples.device
        buf = torch.cat([self.samples.reshape(-1), self.energy.reshape(-1)]).to(comm_device(self.group))
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
    over owned slices are all-reduced once per call (``2 K L`` numbers; docs/maths.md section 1,
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
        :class:`~hutchtrace.estimate.result.BlockTraces` with ``meta["distributed"] == "sharded"``
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
        "world_size": torch_dist().get_world_size(group) if group is not None else 1,
        "wall_time_s": time.perf_counter() - t0,
    }


