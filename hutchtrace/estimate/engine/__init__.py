"""The probe loop: Hessian-vector products of probe rows over every batch, handed to sinks.

* :mod:`.runner`: :class:`ProbeRunner` (probes, HVPs, per-block reductions, delivery; the
  loop's order and guarantees are in its module docs), the memory budget, probe-count checks;
* :mod:`.rows`: what it hands out (:class:`RowBatch`, :class:`RunInfo`), the :class:`Sink`
  interface, the flat ``(R, P)`` row buffers (:class:`Columns`) and the row bookkeeping;
* :mod:`.auto`: ``hvp="auto"``, the backbone choice on the first batch's rows;
* :mod:`.graphs`: ``cuda_graph=True``, chunks replayed from captured CUDA graphs.

Imports: ``backbones``, ``problem``, ``kernels``, ``core`` and :mod:`hutchtrace.estimate.probing`.
"""

from .rows import Columns, RowBatch, RunInfo, Sink
from .runner import ProbeRunner, check_probe_count, default_memory_budget

__all__ = [
    "Columns",
    "ProbeRunner",
    "RowBatch",
    "RunInfo",
    "Sink",
    "check_probe_count",
    "default_memory_budget",
]
