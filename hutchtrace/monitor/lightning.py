"""A PyTorch Lightning callback running a :class:`~hutchtrace.monitor.monitor.Monitor`.

Lightning is optional: this module imports ``lightning.pytorch`` or ``pytorch_lightning``
only when :class:`HutchtraceCallback` is instantiated, and raises a clear ImportError if
neither is installed.

The callback steps the monitor in ``on_train_batch_end`` (after the optimiser step) with
the batch Lightning passed to ``training_step`` and the loss it returned. The batch must
be an ``(inputs, targets)`` pair for a criterion ``loss`` (a ``[x, y]`` list from a
DataLoader is accepted), or give ``batch_to_data=`` to convert it. Each record's scalars
(per-block traces, SEs, loss, gradient norm, CUSUM statistics) are also sent to the
trainer's loggers under ``hutchtrace/...``; alarms are kept in ``callback.monitor.alarms``.
Its state (counters, interval, detector) is saved in and restored from checkpoints.

Example::

    from hutchtrace.monitor.lightning import HutchtraceCallback
    cb = HutchtraceCallback(torch.nn.CrossEntropyLoss(), every=50, K=8, sinks=["curv.jsonl"])
    trainer = pl.Trainer(max_epochs=10, callbacks=[cb])
    trainer.fit(module, loader)
    print(cb.monitor.alarms)
"""

from __future__ import annotations

import math
from typing import Any, Callable

from .callback_state import MonitorStateMixin, publish_class

__all__ = ["HutchtraceCallback", "lightning_callback_base"]  # noqa: F822 (module __getattr__, PEP 562)


def lightning_callback_base():
    """The installed Lightning ``Callback`` class (``lightning.pytorch`` first)."""
    try:
        from lightning.pytorch.callbacks import Callback

        return Callback
    except ImportError:
        pass
    try:
        from pytorch_lightning.callbacks import Callback

        return Callback
    except ImportError as exc:
        raise ImportError(
            "HutchtraceCallback needs PyTorch Lightning: pip install lightning (or pytorch-lightning). "
            "Without Lightning, call hutchtrace.Monitor.step() from your training loop."
        ) from exc


_CLASS = None
_DOC = """Lightning callback running a :class:`~hutchtrace.monitor.monitor.Monitor` (see the module docstring).

    ``HutchtraceCallback(loss, batch_to_data=None, log_to_trainer=True, **monitor_kwargs)``:
    ``monitor_kwargs`` go to the Monitor (``every``, ``K``, ``blocks``, ``probing``,
    ``overhead``, ``detector``, ``sinks``, ``warmup``, ``seed``...); the monitor is created in
    ``setup`` and available as ``callback.monitor``.
    """


def _make_class():
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    Callback = lightning_callback_base()

    class _HutchtraceCallback(MonitorStateMixin, Callback):
        def __init__(
            self,
            loss: Callable,
            batch_to_data: Callable[[Any], Any] | None = None,
            log_to_trainer: bool = True,
            **monitor_kwargs,
        ):
            super().__init__()
            self.loss = loss
            self.batch_to_data = batch_to_data
            self.log_to_trainer = log_to_trainer
            self.monitor_kwargs = monitor_kwargs
            self.monitor = None
            self._pending_state = None

        # -- lifecycle
        def setup(self, trainer, pl_module, stage=None):
            if self.monitor is None:
                from .monitor import Monitor

                self._attach_monitor(Monitor(pl_module, self.loss, **self.monitor_kwargs))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            data = self.batch_to_data(batch) if self.batch_to_data is not None else batch
            if isinstance(data, list) and len(data) == 2:
                data = tuple(data)
            loss_value = None
            if isinstance(outputs, dict):
                loss_value = outputs.get("loss")
            elif outputs is not None and hasattr(outputs, "detach"):
                loss_value = outputs
            rec = self.monitor.step(step=trainer.global_step, data=data, loss_value=loss_value)
            if rec is not None and self.log_to_trainer and trainer.loggers:
                from .sinks import flatten_record

                metrics = {
                    f"hutchtrace/{k}": float(v)
                    for k, v in flatten_record(rec).items()
                    if k not in ("step", "time", "measurement")
                    and isinstance(v, (int, float))
                    and not isinstance(v, bool)
                    and v is not None
                    and math.isfinite(v)
                }
                for lg in trainer.loggers:
                    lg.log_metrics(metrics, step=trainer.global_step)

        def teardown(self, trainer, pl_module, stage=None):
            if self.monitor is not None:
                self.monitor.close()

    # checkpointing (state_dict / load_state_dict) comes from MonitorStateMixin
    _CLASS = publish_class(_HutchtraceCallback, "HutchtraceCallback", __name__, _DOC)
    return _CLASS


def __getattr__(name: str):
    # PEP 562: the class is built (and Lightning imported) on first access, so importing
    # hutchtrace.monitor.lightning never needs Lightning and the ImportError names the fix
    if name == "HutchtraceCallback":
        return _make_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
