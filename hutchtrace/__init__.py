"""hutchtrace: block-wise Hessian traces with honest error bars.

The core call is :func:`block_traces`; see the README for the full public API.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import _ext  # noqa: F401  (loads the compiled kernels when available)
from .blocks import Block, BlockLayout, resolve_blocks
from .errors import (
    BlockSpecError,
    DataFormatError,
    DeviceMismatchError,
    HutchtraceError,
    HVPUnsupportedError,
    LossError,
    MemoryBudgetError,
    NonFiniteWarning,
)
from .estimator import block_traces
from .probing import ProbePlan
from .result import BlockEstimate, BlockTraces

__all__ = [
    "__version__",
    # core estimator
    "block_traces",
    "BlockTraces",
    "BlockEstimate",
    # blocks and probing
    "Block",
    "BlockLayout",
    "resolve_blocks",
    "ProbePlan",
    # errors and warnings
    "HutchtraceError",
    "LossError",
    "BlockSpecError",
    "DataFormatError",
    "DeviceMismatchError",
    "HVPUnsupportedError",
    "MemoryBudgetError",
    "NonFiniteWarning",
]
