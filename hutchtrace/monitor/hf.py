"""A HuggingFace ``transformers`` ``TrainerCallback`` running a :class:`~hutchtrace.monitor.monitor.Monitor`.

transformers is optional: this module imports it only when :class:`HutchtraceTrainerCallback`
is first accessed, and raises a clear ImportError if it is not installed.

HF callbacks are not given the training batch, so the callback measures on one **fixed batch**
for the whole run: ``batch=`` (a dict as the model takes it, with ``labels`` for the default
loss), or by default the first ``batch_size`` examples of the training set collated by the
trainer's own collator (read by index: no iterator is advanced, no random number drawn, so
training is unaffected). A fixed batch is what a curvature series wants anyway: its changes
then come from the model, not from batch noise.

The monitor measures in ``on_step_end`` (after the optimiser step; ``state.global_step``
labels the record), with the loss ``model(**batch).loss`` or ``loss(model, batch)``.
Records go to the monitor's sinks (JSONL / CSV / TensorBoard paths) and
``callback.monitor.history``; alarms to ``callback.monitor.alarms``. The same no-side-effect
guarantee as every hutchtrace call holds: parameters, buffers, ``.grad``, modes and the global
RNG are as before each measurement, so a run with the callback trains exactly as one without.

Example::

    from hutchtrace.monitor.hf import HutchtraceTrainerCallback
    cb = HutchtraceTrainerCallback(every=50, K=8, sinks=["curv.jsonl"])
    trainer = transformers.Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb])
    trainer.train()
    print(cb.monitor.history[-1]["blocks"])
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .callback_state import MonitorStateMixin, publish_class

__all__ = ["HutchtraceTrainerCallback", "trainer_callback_base"]  # noqa: F822 (module __getattr__, PEP 562)


def trainer_callback_base():
    """The installed ``transformers.TrainerCallback`` class."""
    try:
        from transformers import TrainerCallback
    except ImportError as exc:
        raise ImportError(
            "HutchtraceTrainerCallback needs HuggingFace transformers: pip install transformers. "
            "Without it, call hutchtrace.Monitor.step() from your training loop."
        ) from exc
    return TrainerCallback


def _to_device(obj, device):
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def first_examples(dataloader, n: int | None = None):
    """The first ``n`` examples of ``dataloader.dataset`` collated by its ``collate_fn`` (no iteration)."""
    if dataloader is None or not hasattr(dataloader, "dataset"):
        raise ValueError(
            "HutchtraceTrainerCallback needs a batch to measure on: pass batch={...} (a dict as the model "
            "takes it), or train with a map-style train_dataset"
        )
    ds = dataloader.dataset
    n = n or getattr(dataloader, "batch_size", None) or 8
    try:
        items = [ds[i] for i in range(min(n, len(ds)))]
    except TypeError as exc:  # an iterable dataset has neither len nor indexing
        raise ValueError(
            "the training set is not indexable (an IterableDataset): pass batch={...} to "
            "HutchtraceTrainerCallback"
        ) from exc
    collate = getattr(dataloader, "collate_fn", None)
    return collate(items) if collate is not None else torch.utils.data.default_collate(items)


_CLASS = None
_DOC = """HF ``TrainerCallback`` running a :class:`~hutchtrace.monitor.monitor.Monitor` (see the module docstring).

    ``HutchtraceTrainerCallback(loss=None, batch=None, batch_size=None, **monitor_kwargs)``:
    ``loss(model, batch) -> scalar`` (default ``model(**batch).loss``); ``batch`` the fixed
    measurement batch (default: the first ``batch_size`` training examples, ``batch_size``
    defaulting to the trainer's); ``monitor_kwargs`` go to the Monitor (``every``, ``K``,
    ``blocks``, ``probing``, ``overhead``, ``detector``, ``sinks``, ``warmup``, ``seed``...).
    The monitor is created at ``on_train_begin`` and available as ``callback.monitor``;
    ``state_dict()`` / ``load_state_dict()`` carry its state across a resumed run.
    """


def _make_class():
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    TrainerCallback = trainer_callback_base()

    class _HutchtraceTrainerCallback(MonitorStateMixin, TrainerCallback):
        def __init__(
            self,
            loss: Callable[[Any, Any], Any] | None = None,
            batch: Any = None,
            batch_size: int | None = None,
            **monitor_kwargs,
        ):
            self.loss = loss
            self.batch = batch
            self.batch_size = batch_size
            self.monitor_kwargs = monitor_kwargs
            self.monitor = None
            self._pending_state = None

        def _closure(self):
            batch, loss = self.batch, self.loss
            if loss is None:
                def closure(model):
                    out = model(**batch)
                    if getattr(out, "loss", None) is None:
                        raise ValueError(
                            "the model returned no loss for the measurement batch: include 'labels' in "
                            "batch=..., or pass loss=lambda model, batch: ..."
                        )
                    return out.loss
            else:
                def closure(model):
                    return loss(model, batch)
            return closure

        def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
            if self.monitor is not None:
                return
            if model is None:
                raise ValueError("the Trainer passed no model to the callback")
            if self.batch is None:  # the trainer's per-device batch size (accelerate's loader may not say)
                n = self.batch_size or getattr(args, "per_device_train_batch_size", None)
                self.batch = first_examples(train_dataloader, n)
            device = next(model.parameters()).device
            self.batch = _to_device(self.batch, device)
            from .monitor import Monitor

            self._attach_monitor(Monitor(model, self._closure(), **self.monitor_kwargs))

        def on_step_end(self, args, state, control, **kwargs):
            if self.monitor is not None:
                self.monitor.step(step=state.global_step)

        def on_train_end(self, args, state, control, **kwargs):
            if self.monitor is not None:
                self.monitor.close()

    # checkpointing (state_dict / load_state_dict) comes from MonitorStateMixin
    _CLASS = publish_class(_HutchtraceTrainerCallback, "HutchtraceTrainerCallback", __name__, _DOC)
    return _CLASS


def __getattr__(name: str):
    # PEP 562: the class is built (and transformers imported) on first access, so importing
    # hutchtrace.monitor.hf never needs transformers and the ImportError names the fix
    if name == "HutchtraceTrainerCallback":
        return _make_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
