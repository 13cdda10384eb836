"""The three accepted forms of ``loss`` normalised to a stream of weighted batch closures.

Forms:

(a) a closure ``loss(model) -> scalar`` with ``data=None``: anything the closure does
    (dict inputs, HuggingFace-style outputs, custom/PINN losses) is allowed.
(b) a criterion ``loss(outputs, targets)`` with ``data=(inputs, targets)``: one batch;
    the model is called as ``model(inputs)``, ``model(*inputs)`` for a tuple/list, or
    ``model(**inputs)`` for a mapping.
(c) a criterion with ``data`` = any iterable of ``(inputs, targets)`` batches (a list, a
    DataLoader): the target is the Hessian of the *dataset-mean* loss

    .. math:: \\ell(\\theta) = \\sum_m \\frac{n_m}{N} \\ell_m(\\theta),\\qquad N = \\sum_m n_m,

    where ``l_m`` is the criterion's (mean-reduced) loss on batch ``m`` of ``n_m`` samples.
    A criterion with ``reduction="sum"`` is weighted ``1/N`` instead, which gives the same
    per-sample mean.

Each batch becomes a :class:`BatchClosure` with a weight ``n_m``; estimators sum
``n_m * (per-batch quantity)`` and divide by ``N`` at the end, so an iterable is consumed
once and never needs a length.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from ..core.errors import DataFormatError, LossError

__all__ = ["MeanSquared", "BatchClosure", "LossSpec", "make_loss_spec", "call_model", "check_loss_value"]


class MeanSquared(nn.Module):
    """``mean((out - y)^2)``: nn.MSELoss, but with a forward-over-reverse derivative that
    works on current torch (F.mse_loss hits a ZeroTensor bug under jvp of grad)."""

    def forward(self, out, target):
        return ((out - target) ** 2).mean()


def call_model(model: nn.Module, inputs: Any):
    """Call ``model`` on ``inputs``: a tensor, a tuple/list (unpacked) or a mapping (keywords)."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _batch_size(inputs: Any, targets: Any) -> int:
    for obj in (targets, inputs):
        n = _first_dim(obj)
        if n is not None:
            return n
    raise DataFormatError(
        "cannot infer the number of samples of a batch: neither the inputs nor the targets "
        "contain a tensor with a batch dimension; pass tensors whose first dimension is the batch"
    )


def _first_dim(obj: Any) -> int | None:
    if torch.is_tensor(obj):
        return int(obj.shape[0]) if obj.dim() > 0 else None
    if isinstance(obj, Mapping):
        for v in obj.values():
            n = _first_dim(v)
            if n is not None:
                return n
    if isinstance(obj, (tuple, list)):
        for v in obj:
            n = _first_dim(v)
            if n is not None:
                return n
    return None


@dataclass
class BatchClosure:
    """One batch: ``fn(model)`` evaluates its loss.

    Estimators accumulate ``weight * q_m`` over batches and divide by ``sum(count)``:
    a mean-reduced criterion has ``weight = count = n_m``, a sum-reduced one ``weight = 1,
    count = n_m``, a closure or a single batch ``weight = count = 1``. ``signature``
    summarises the input shapes (used to cache the HVP backbone choice).
    """

    fn: Callable[[nn.Module], torch.Tensor]
    weight: float
    count: float
    signature: tuple
    # criterion forms only (None for closures): what a GGN product needs, i.e. the split
    # loss = criterion(model(inputs), targets)
    criterion: Callable | None = None
    inputs: Any = None
    targets: Any = None


def _signature(obj: Any) -> tuple:
    if torch.is_tensor(obj):
        return ("T", tuple(obj.shape), str(obj.dtype))
    if isinstance(obj, Mapping):
        return ("M",) + tuple((k, _signature(v)) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0])))
    if isinstance(obj, (tuple, list)):
        return ("S",) + tuple(_signature(v) for v in obj)
    return (type(obj).__name__,)


def check_loss_value(value: Any) -> torch.Tensor:
    """Validate what a loss returned: a floating scalar tensor (shape () or (1,))."""
    if not torch.is_tensor(value):
        raise LossError(
            f"the loss returned {type(value).__name__}, not a tensor; return the scalar loss tensor "
            "(e.g. criterion(model(x), y)), not loss.item()"
        )
    if value.numel() != 1:
        raise LossError(
            f"the loss must be a scalar, got a tensor of shape {tuple(value.shape)}; reduce it "
            "(e.g. .mean()) or use a criterion with reduction='mean'"
        )
    if not value.is_floating_point():
        raise LossError(f"the loss must be a floating-point tensor, got dtype {value.dtype}")
    return value.reshape(())


class LossSpec:
    """A normalised loss: an iterable of :class:`BatchClosure` plus a description.

    Attributes:
        kind: ``"closure"``, ``"criterion"`` or ``"dataset"``.
        reiterable: whether :meth:`batches` may be called more than once.
    """

    def __init__(self, kind: str, batch_iter: Callable[[], Iterator[BatchClosure]], reiterable: bool):
        self.kind = kind
        self._batch_iter = batch_iter
        self.reiterable = reiterable
        self._used = False

    def batches(self) -> Iterator[BatchClosure]:
        if self._used and not self.reiterable:
            raise DataFormatError(
                "data is a one-shot iterator and was already consumed; pass a list or a DataLoader "
                "(re-iterable) to use adaptive stopping or several passes"
            )
        self._used = True
        return self._batch_iter()


def _criterion_closure(criterion: Callable, inputs: Any, targets: Any) -> Callable[[nn.Module], torch.Tensor]:
    def fn(model: nn.Module) -> torch.Tensor:
        return criterion(call_model(model, inputs), targets)

    return fn


def _is_single_batch(data: Any) -> bool:
    return isinstance(data, tuple) and len(data) == 2 and not isinstance(data[1], (tuple, list))


def _unpack_batch(batch: Any, position: int) -> tuple[Any, Any]:
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise DataFormatError(
        f"batch {position} of data has the wrong form ({type(batch).__name__}"
        f"{' of length ' + str(len(batch)) if isinstance(batch, (tuple, list)) else ''}); "
        "each batch must be an (inputs, targets) pair. For other batch layouts, use a closure "
        "loss(model) and call block_traces once per batch, or yield (inputs, targets) pairs"
    )


def _n_positional(fn: Callable) -> int | None:
    """Required positional arguments of ``fn`` (a module counts its ``forward``), or None."""
    if isinstance(fn, nn.Module):
        fn = fn.forward
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    n = 0
    for p in sig.parameters.values():
        if p.kind == p.VAR_POSITIONAL:
            return None
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty:
            n += 1
    return n


def make_loss_spec(loss: Callable, data: Any = None, allow_empty: bool = False) -> LossSpec:
    """Normalise ``(loss, data)`` into a :class:`LossSpec`; see the module docstring.

    ``allow_empty`` accepts an iterable without batches (a data-parallel rank whose shard is
    empty still takes part in the reductions).

    Example:
        >>> crit = nn.MSELoss()
        >>> make_loss_spec(crit, (torch.zeros(8, 3), torch.zeros(8, 1))).kind
        'criterion'
        >>> spec = make_loss_spec(crit, [(torch.zeros(8, 3), torch.zeros(8, 1))] * 2)
        >>> spec.kind, [b.weight for b in spec.batches()]
        ('dataset', [8.0, 8.0])
    """
    if not callable(loss):
        raise LossError(f"loss must be callable (a closure loss(model) or a criterion), got {type(loss).__name__}")
    if data is None:
        return _closure_spec(loss)
    _check_criterion(loss)
    sum_reduced = getattr(loss, "reduction", "mean") == "sum"
    _check_data_type(data)
    if _is_single_batch(data):
        inputs, targets = data
        return LossSpec("criterion", partial(_single_batch, loss, inputs, targets), reiterable=True)
    _check_dataset(data)
    return LossSpec("dataset", partial(_dataset_batches, loss, data, sum_reduced, allow_empty),
                    reiterable=not isinstance(data, Iterator))


def _closure_spec(loss: Callable) -> LossSpec:
    """Form (a): ``loss(model)`` without data; a criterion here is a mistake worth naming."""
    n = _n_positional(loss)
    if n is not None and n >= 2:
        raise DataFormatError(
            "loss looks like a criterion loss(outputs, targets) but no data was given; pass "
            "data=(inputs, targets) or a list/DataLoader of batches, or use a closure loss(model)"
        )
    return LossSpec("closure", partial(_closure_batch, loss), reiterable=True)


def _closure_batch(loss: Callable) -> Iterator[BatchClosure]:
    yield BatchClosure(fn=loss, weight=1.0, count=1.0, signature=("closure", id(loss)))


def _check_criterion(loss: Callable) -> None:
    """With data, ``loss`` must take ``(outputs, targets)``."""
    n = _n_positional(loss)
    if n is not None and n < 2:
        raise DataFormatError(
            "data was given, so loss must be a criterion loss(outputs, targets), but it takes "
            f"{n} required argument(s); use a closure loss(model) without data instead"
        )


def _check_data_type(data: Any) -> None:
    if isinstance(data, (str, bytes)) or torch.is_tensor(data) or isinstance(data, Mapping):
        raise DataFormatError(
            f"data of type {type(data).__name__} is not supported; pass data=(inputs, targets) for one "
            "batch, or a list / DataLoader of (inputs, targets) batches"
        )


def _check_dataset(data: Any) -> None:
    """Form (c) needs an iterable of batches (and a tuple that is not a pair is a likely slip)."""
    if isinstance(data, tuple) and len(data) != 2 and not all(isinstance(b, (tuple, list)) for b in data):
        raise DataFormatError(
            f"data is a tuple of length {len(data)}; pass data=(inputs, targets) for one batch "
            "(wrap several model inputs in a tuple: data=((x1, x2), y)) or a list of batches"
        )
    if not isinstance(data, Iterable):
        raise DataFormatError(
            f"data of type {type(data).__name__} is neither an (inputs, targets) pair nor an iterable of batches"
        )


def _single_batch(loss: Callable, inputs: Any, targets: Any) -> Iterator[BatchClosure]:
    """Form (b): one ``(inputs, targets)`` batch, weight and count 1."""
    yield BatchClosure(
        fn=_criterion_closure(loss, inputs, targets),
        weight=1.0,
        count=1.0,
        signature=_signature(inputs),
        criterion=loss,
        inputs=inputs,
        targets=targets,
    )


def _dataset_batches(loss: Callable, data: Any, sum_reduced: bool,
                     allow_empty: bool) -> Iterator[BatchClosure]:
    """Form (c): one closure per batch, weighted by its sample count (1 for a sum-reduced
    criterion); one pass over ``data``."""
    empty = True
    for i, batch in enumerate(data):
        inputs, targets = _unpack_batch(batch, i)
        n_m = _batch_size(inputs, targets)
        empty = False
        yield BatchClosure(
            fn=_criterion_closure(loss, inputs, targets),
            weight=1.0 if sum_reduced else float(n_m),
            count=float(n_m),
            signature=_signature(inputs),
            criterion=loss,
            inputs=inputs,
            targets=targets,
        )
    if empty and not allow_empty:
        raise DataFormatError("data is an empty iterable: it yielded no batch")
