"""No side effects: everything hutchtrace touches is restored, and every probe sees the
same model.

:class:`PreservedState` is entered around every public call. On exit the model's
parameters, buffers (BatchNorm running statistics included), ``.grad`` fields,
train/eval flags and the global RNG states (CPU and every CUDA device in use) are exactly
as they were on entry.

While inside it also makes the model twice-differentiable without changing what it
computes:

* train-mode BatchNorm layers stop tracking running statistics. Outputs are unchanged
  (train mode normalises with batch statistics either way), but no in-place buffer update
  happens, which ``torch.func`` transforms would reject.
* scaled-dot-product attention runs its math kernel (the fused flash / efficient kernels
  have no double backward nor forward-mode AD).
* cuDNN is disabled for models holding RNN modules on CUDA (no cuDNN double backward).

:class:`ForwardRNG` replays the global RNG state before each forward of one batch, so
every probe of that batch sees the same dropout mask whatever the HVP backbone, and (with
:meth:`ForwardRNG.begin_pass`) every pass of a call over the data replays the first one: one
random function per call, one dropout mask per batch for every probe of every round.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["PreservedState", "ForwardRNG", "differentiable_mode"]


def _cuda_devices(devices) -> list[int]:
    out = []
    for d in devices:
        d = torch.device(d)
        if d.type == "cuda":
            out.append(d.index if d.index is not None else torch.cuda.current_device())
    return sorted(set(out))


def _get_rng(cuda_ids: list[int]):
    cpu = torch.get_rng_state()
    cuda = [torch.cuda.get_rng_state(i) for i in cuda_ids]
    return cpu, cuda


def _set_rng(state, cuda_ids: list[int]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    for i, s in zip(cuda_ids, cuda):
        torch.cuda.set_rng_state(s, i)


@dataclass
class PreservedState:
    """Context manager restoring a model's state and the global RNG on exit."""

    model: nn.Module
    devices: tuple = ()
    _training: list = field(default_factory=list)
    _buffers: list = field(default_factory=list)
    _grads: list = field(default_factory=list)
    _bn: list = field(default_factory=list)
    _rng: tuple | None = None
    _cuda_ids: list = field(default_factory=list)
    _stack: contextlib.ExitStack | None = None

    def __enter__(self) -> PreservedState:
        model = self.model
        devs = set(self.devices) | {p.device for p in model.parameters()} | {b.device for b in model.buffers()}
        self._cuda_ids = _cuda_devices(devs)
        self._rng = _get_rng(self._cuda_ids)
        self._training = [(m, m.training) for m in model.modules()]
        self._buffers = [(b, b.detach().clone()) for b in model.buffers()]
        self._grads = [(p, p.grad) for p in model.parameters()]
        self._bn = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
        for m in self._bn:
            m.track_running_stats = False
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(differentiable_mode(model))
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self._stack is not None:
                self._stack.close()
        finally:
            for m in self._bn:
                m.track_running_stats = True
            for m, flag in self._training:
                m.train(flag)
            with torch.no_grad():
                for b, saved in self._buffers:
                    if b.shape == saved.shape:
                        b.copy_(saved)
            for p, g in self._grads:
                p.grad = g
            if self._rng is not None:
                _set_rng(self._rng, self._cuda_ids)


@contextlib.contextmanager
def differentiable_mode(model: nn.Module):
    """Select kernels that have the second derivatives an HVP needs (see module docs)."""
    with contextlib.ExitStack() as stack:
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        except ImportError:  # torch < 2.3
            pass
        on_cuda = any(p.is_cuda for p in model.parameters())
        if on_cuda and any(isinstance(m, nn.RNNBase) for m in model.modules()):
            stack.enter_context(torch.backends.cudnn.flags(enabled=False))
        yield


class ForwardRNG:
    """Replays the global RNG so every forward of one batch draws the same random numbers.

    Usage per batch: :meth:`start_batch`, then each forward inside :meth:`forward`, then
    :meth:`end_batch`, which leaves the RNG where a single forward would have left it.

    One random function per call: a caller that passes over the batches several times (the
    pilot, adaptive rounds, a plan switch) calls :meth:`begin_pass` before each pass. The
    first records the RNG state, every later one restores it, so batch ``m`` of every pass
    starts from the same state and draws the same dropout mask (and a DataLoader shuffling
    with the global RNG yields the same batches). The caller's
    :class:`PreservedState` puts the global RNG back as it was on entry.

    Example:
        >>> rng = ForwardRNG()
        >>> rng.begin_pass(); a = torch.rand(3)
        >>> rng.begin_pass(); b = torch.rand(3)  # a later pass replays the first
        >>> torch.equal(a, b)
        True
    """

    def __init__(self, devices=()):
        self._cuda_ids = _cuda_devices(devices)
        self._start = None
        self._after = None
        self._pass = None

    def begin_pass(self) -> None:
        if self._pass is None:
            self._pass = _get_rng(self._cuda_ids)
        else:
            _set_rng(self._pass, self._cuda_ids)

    def start_batch(self) -> None:
        self._start = _get_rng(self._cuda_ids)
        self._after = None

    @contextlib.contextmanager
    def forward(self):
        if self._start is None:
            self.start_batch()
        _set_rng(self._start, self._cuda_ids)
        yield
        if self._after is None:
            self._after = _get_rng(self._cuda_ids)

    def end_batch(self) -> None:
        if self._after is not None:
            _set_rng(self._after, self._cuda_ids)
        self._start = None
        self._after = None
