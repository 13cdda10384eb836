"""What the framework callbacks (:mod:`hutchtrace.monitor.lightning`, :mod:`hutchtrace.monitor.hf`) share.

Both create their :class:`~hutchtrace.monitor.monitor.Monitor` late (once the trainer hands them the
model), yet a checkpoint may be restored before that; both build their class on first access
so that importing them never needs the framework.
"""

from __future__ import annotations


class MonitorStateMixin:
    """Checkpointing for a callback that owns ``self.monitor`` (``None`` until it is created).

    A state restored before the monitor exists is held and applied by :meth:`_attach_monitor`.
    """

    monitor = None
    _pending_state = None

    def _attach_monitor(self, monitor) -> None:
        self.monitor = monitor
        if self._pending_state is not None:
            monitor.load_state_dict(self._pending_state)
            self._pending_state = None

    def state_dict(self) -> dict:
        return {} if self.monitor is None else {"monitor": self.monitor.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        st = state_dict.get("monitor")
        if st is None:
            return
        if self.monitor is not None:
            self.monitor.load_state_dict(st)
        else:
            self._pending_state = st


def publish_class(cls: type, name: str, module: str, doc: str) -> type:
    """Give a class built inside a factory its public name, module and docstring."""
    cls.__name__ = name
    cls.__qualname__ = name
    cls.__module__ = module
    cls.__doc__ = doc
    return cls
