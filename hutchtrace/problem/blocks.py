"""Partition of a model's trainable parameters into named blocks.

A *block* is a set of parameter tensors; its Hessian block is
``H_bb = d^2 loss / d theta_b^2`` with ``theta_b`` the concatenation of its tensors.

Weight sharing is handled at this level (``docs/maths.md`` section 2): a tensor reachable under several
names (tied embeddings, a module reused in a loop) is ONE coordinate set. Blocks are built
from de-duplicated tensors, never from module calls, so the HVP differentiates the true
function of the shared tensor and the block trace includes every cross-use term.

Element ordering: every unique trainable tensor has a *global offset* in the flat
parameter vector, in ``model.named_parameters()`` order (first occurrence). Probes are
keyed by these global offsets, so a probe entry does not depend on how blocks are chosen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.errors import BlockSpecError, DeviceMismatchError

__all__ = ["Block", "BlockLayout", "resolve_blocks", "unwrap_model"]


@dataclass(frozen=True)
class Block:
    """One diagonal block of the Hessian.

    Attributes:
        name: the block's name (a parameter name, a module name, or a user's key).
        params: canonical names of the parameter tensors in the block.
        aliases: other names under which those tensors are reachable (tied weights).
        numel: number of scalar coordinates ``n_b``.
    """

    name: str
    params: tuple[str, ...]
    aliases: tuple[str, ...]
    numel: int


@dataclass
class BlockLayout:
    """The selected tensors, their global offsets and their blocks.

    ``tensors[j]`` (canonical name ``names[j]``) holds global elements
    ``offsets[j] .. offsets[j] + tensors[j].numel()`` and belongs to block
    ``block_index[j]``. Tensors are listed in global order.
    """

    blocks: list[Block]
    names: list[str]
    tensors: list[torch.Tensor]
    offsets: list[int]
    block_index: list[int]
    total_numel: int  # of ALL unique trainable tensors (the global probe length)
    _tensors_of_block: list[list[int]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self._tensors_of_block = [[] for _ in self.blocks]
        for j, b in enumerate(self.block_index):
            self._tensors_of_block[b].append(j)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def numel(self) -> int:
        """Number of coordinates in the selected blocks."""
        return sum(b.numel for b in self.blocks)

    @property
    def block_names(self) -> list[str]:
        return [b.name for b in self.blocks]

    def tensors_of(self, block: int) -> list[int]:
        """Indices (into :attr:`tensors`) of the tensors of block ``block``."""
        return self._tensors_of_block[block]

    def device(self) -> torch.device:
        return self.tensors[0].device

    def index(self, name: str) -> int:
        """Position of the block called ``name``."""
        for i, b in enumerate(self.blocks):
            if b.name == name:
                return i
        raise KeyError(f"no block named {name!r}; blocks are {self.block_names}")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DDP / DataParallel wrappers (their forward syncs gradients)."""
    inner = model
    while isinstance(inner, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        inner = inner.module
    return inner


@dataclass
class _ParamTable:
    """The unique trainable tensors of a model, keyed by ``id``, in global order.

    ``names_of[key]`` lists every name the tensor is reachable under (the first is its
    canonical name), ``offsets[key]`` its global offset, ``total`` the global probe length;
    ``frozen`` holds the names of parameters with ``requires_grad=False``.
    """

    order: list[int]
    names_of: dict[int, list[str]]
    tensor_of: dict[int, torch.Tensor]
    frozen: set[str]
    canonical: dict[int, str]
    key_of_name: dict[str, int]
    offsets: dict[int, int]
    total: int


def _param_table(model: nn.Module) -> _ParamTable:
    """Unique trainable tensors in order, with every name they are reachable under."""
    names_of: dict[int, list[str]] = {}
    tensor_of: dict[int, torch.Tensor] = {}
    order: list[int] = []
    frozen: set[str] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if not p.requires_grad:
            frozen.add(name)
            continue
        key = id(p)
        if key not in names_of:
            names_of[key] = []
            tensor_of[key] = p
            order.append(key)
        names_of[key].append(name)
    if not order:
        raise BlockSpecError(
            "the model has no trainable parameters (every parameter has requires_grad=False); "
            "unfreeze the parameters whose curvature you want, e.g. p.requires_grad_(True)"
        )
    offsets: dict[int, int] = {}
    total = 0
    for key in order:
        offsets[key] = total
        total += tensor_of[key].numel()
    return _ParamTable(
        order=order, names_of=names_of, tensor_of=tensor_of, frozen=frozen,
        canonical={key: names_of[key][0] for key in order},
        key_of_name={n: key for key in order for n in names_of[key]},
        offsets=offsets, total=total,
    )


class _Assignment:
    """Block name -> tensor keys (insertion ordered); every tensor in at most one block."""

    def __init__(self, table: _ParamTable):
        self.table = table
        self.groups: dict[str, list[int]] = {}
        self.owner: dict[int, str] = {}

    def assign(self, group: str, key: int) -> None:
        if key in self.owner and self.owner[key] != group:
            raise BlockSpecError(
                f"blocks overlap: parameter {self.table.canonical[key]!r} is in both {self.owner[key]!r} and "
                f"{group!r}; every parameter may belong to at most one block"
            )
        if key in self.owner:
            return
        self.owner[key] = group
        self.groups.setdefault(group, []).append(key)

    def size(self, group: str) -> int:
        return len(self.groups.get(group, []))


def _module_of(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def resolve_blocks(model: nn.Module, blocks="param") -> BlockLayout:
    """Resolve a block specification into a :class:`BlockLayout`.

    Args:
        model: the model (DDP/DataParallel wrappers are unwrapped).
        blocks: one of

            * ``"param"`` (default): one block per unique trainable tensor, named by its
              first name; tied tensors are one block and list their other names as aliases.
            * ``"module"``: one block per module that directly owns trainable tensors
              (a tied tensor goes to the module of its first name).
            * ``"all"``: a single block holding every trainable tensor.
            * a mapping ``block name -> spec`` where spec is a parameter name, a module
              name, a tensor, a module, or a list of those. Parameters not mentioned are
              treated as constants (not probed, not differentiated).
            * a callable ``f(param_name) -> block name or None`` (None excludes it).

    Frozen parameters (``requires_grad=False``) are never included.

    Raises:
        BlockSpecError: no trainable parameters, unknown or frozen entries, overlaps,
            or an empty block.
        DeviceMismatchError: selected tensors live on different devices.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> resolve_blocks(net).block_names
        ['0.weight', '0.bias', '2.weight', '2.bias']
        >>> resolve_blocks(net, "module").block_names
        ['0', '2']
    """
    model = unwrap_model(model)
    table = _param_table(model)
    asg = _Assignment(table)
    if isinstance(blocks, str):
        _assign_by_keyword(blocks, table, asg)
    elif isinstance(blocks, Mapping):
        _assign_by_mapping(blocks, model, table, asg)
    elif callable(blocks):
        _assign_by_function(blocks, table, asg)
    else:
        raise BlockSpecError(
            f"blocks must be 'param', 'module', 'all', a dict or a callable, got {type(blocks).__name__}"
        )
    return _layout(table, asg)


def _assign_by_keyword(blocks: str, table: _ParamTable, asg: _Assignment) -> None:
    """``"param"``, ``"module"`` or ``"all"``."""
    if blocks == "param":
        for key in table.order:
            asg.assign(table.canonical[key], key)
    elif blocks == "module":
        for key in table.order:
            mod = _module_of(table.canonical[key])
            asg.assign(mod if mod else "(root)", key)
    elif blocks == "all":
        for key in table.order:
            asg.assign("all", key)
    else:
        raise BlockSpecError(
            f"unknown block specification {blocks!r}; use 'param', 'module', 'all', "
            "a dict of block name -> parameters/modules, or a callable name -> group"
        )


def _assign_by_mapping(blocks: Mapping, model: nn.Module, table: _ParamTable, asg: _Assignment) -> None:
    """A mapping ``block name -> parameter/module name, tensor, module, or a list of those``."""
    modules = dict(model.named_modules(remove_duplicate=False))
    for group, spec in blocks.items():
        if not isinstance(group, str):
            raise BlockSpecError(f"block names must be strings, got {group!r}")
        items = spec if isinstance(spec, (list, tuple, set)) else [spec]
        if not items:
            raise BlockSpecError(f"block {group!r} is empty; give it at least one parameter or module")
        before = asg.size(group)
        for item in items:
            for key in _keys_for(item, table.key_of_name, modules, table.frozen, group, table.tensor_of):
                asg.assign(group, key)
        if asg.size(group) == before:
            raise BlockSpecError(f"block {group!r} selects no trainable parameter")
    # Keep global order within each block.
    for g in asg.groups:
        asg.groups[g].sort(key=table.order.index)


def _assign_by_function(fn: Callable[[str], object], table: _ParamTable, asg: _Assignment) -> None:
    """A callable ``f(param_name) -> block name or None`` (None excludes the tensor)."""
    for key in table.order:
        g = fn(table.canonical[key])
        if g is None:
            continue
        asg.assign(str(g), key)
    if not asg.groups:
        raise BlockSpecError("the block function excluded every parameter (returned None for all)")


def _layout(table: _ParamTable, asg: _Assignment) -> BlockLayout:
    """The :class:`BlockLayout` of an assignment: selected tensors in global order, one
    :class:`Block` per group; all on one device."""
    canonical, tensor_of = table.canonical, table.tensor_of
    selected = sorted(asg.owner, key=table.order.index)
    gidx = {g: i for i, g in enumerate(asg.groups)}
    block_list = [
        Block(
            name=g,
            params=tuple(canonical[k] for k in keys),
            aliases=tuple(n for k in keys for n in table.names_of[k][1:]),
            numel=sum(tensor_of[k].numel() for k in keys),
        )
        for g, keys in asg.groups.items()
    ]
    tensors = [tensor_of[k] for k in selected]
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        where = ", ".join(f"{canonical[k]} on {tensor_of[k].device}" for k in selected[:6])
        raise DeviceMismatchError(
            f"the selected parameters are on different devices ({where}, ...); "
            "move the model to one device with model.to(device), or select blocks on one device"
        )
    return BlockLayout(
        blocks=block_list,
        names=[canonical[k] for k in selected],
        tensors=tensors,
        offsets=[table.offsets[k] for k in selected],
        block_index=[gidx[asg.owner[k]] for k in selected],
        total_numel=table.total,
    )


def _keys_for(item, key_of_name, modules, frozen, group, tensor_of) -> Iterable[int]:
    if isinstance(item, str):
        if item in key_of_name:
            return [key_of_name[item]]
        if item in frozen:
            raise BlockSpecError(
                f"block {group!r}: parameter {item!r} is frozen (requires_grad=False); "
                "unfreeze it or leave it out"
            )
        if item in modules:
            return _module_keys(modules[item], tensor_of, group, item)
        raise BlockSpecError(
            f"block {group!r}: {item!r} is neither a trainable parameter name nor a module name of the model"
        )
    if isinstance(item, nn.Module):
        return _module_keys(item, tensor_of, group, type(item).__name__)
    if isinstance(item, torch.Tensor):
        if id(item) in tensor_of:
            return [id(item)]
        raise BlockSpecError(
            f"block {group!r}: a tensor of shape {tuple(item.shape)} is not a trainable parameter of the model"
        )
    raise BlockSpecError(
        f"block {group!r}: entries must be parameter names, module names, tensors or modules, "
        f"got {type(item).__name__}"
    )


def _module_keys(module: nn.Module, tensor_of, group: str, label: str) -> list[int]:
    keys = [id(p) for p in module.parameters() if id(p) in tensor_of]
    if not keys:
        raise BlockSpecError(f"block {group!r}: module {label!r} has no trainable parameter")
    return keys
