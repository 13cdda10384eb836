"""hutchtrace: block-wise Hessian traces with honest error bars.

The core call is :func:`block_traces`; the README documents every public name.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .backbones.exact import exact_block_traces, exact_hessian
from .core.errors import (
    BlockSpecError,
    DataFormatError,
    DeviceMismatchError,
    HutchtraceError,
    HVPUnsupportedError,
    LossError,
    MemoryBudgetError,
    NonFiniteWarning,
)
from .core.twice import twice_differentiable
from .estimate.estimator import block_traces
from .estimate.probing import ProbePlan
from .estimate.result import BlockEstimate, BlockTraces
from .estimate.variance import exact_variance
from .kernels import loader  # noqa: F401  (loads the compiled kernels when available)
from .layers.analysis import CCAResult, PCAResult, cca, snapshot_pca
from .layers.local_hessian import (
    DegenerateLocalHessianWarning,
    LocalHessian,
    LocalHessianError,
    local_hessian,
    local_hessian_rows,
)
from .layers.snapshot_store import load_arrays, load_run
from .layers.snapshots import SnapshotRecorder
from .layers.spectrum import SpectrumSummary, VectorSummary, spectrum_summary, vector_summary
from .monitor.cusum import Alarm, CUSUMDetector
from .monitor.monitor import Monitor
from .monitor.sinks import CallbackSink, CSVSink, JSONLSink, TensorBoardSink, plot_monitor, read_log
from .problem.blocks import Block, BlockLayout, resolve_blocks
from .structure.coupling import Coupling, block_coupling, estimate_coupling_matrix
from .structure.decompose import Decomposition, decompose
from .structure.minibatch import VarianceDecomposition, variance_decomposition
from .structure.sharing import SharedTrace, unrolled_traces
from .structure.spectra import block_eigenvalues, hutchpp, spectral_density, stable_rank

__all__ = [
    "__version__",
    # core estimator
    "block_traces",
    "BlockTraces",
    "BlockEstimate",
    "Block",
    "BlockLayout",
    "resolve_blocks",
    "ProbePlan",
    "twice_differentiable",
    # statistics
    "exact_variance",
    "variance_decomposition",
    "VarianceDecomposition",
    "unrolled_traces",
    "SharedTrace",
    # exact references for small models
    "exact_hessian",
    "exact_block_traces",
    # curvature structure
    "decompose",
    "Decomposition",
    "block_coupling",
    "Coupling",
    "estimate_coupling_matrix",
    "block_eigenvalues",
    "stable_rank",
    "spectral_density",
    "hutchpp",
    # local Hessians of single layers and training snapshots
    "local_hessian",
    "local_hessian_rows",
    "LocalHessian",
    "spectrum_summary",
    "vector_summary",
    "SpectrumSummary",
    "VectorSummary",
    "SnapshotRecorder",
    "load_run",
    "load_arrays",
    "cca",
    "snapshot_pca",
    "CCAResult",
    "PCAResult",
    # monitoring
    "Monitor",
    "CUSUMDetector",
    "Alarm",
    "JSONLSink",
    "CSVSink",
    "TensorBoardSink",
    "CallbackSink",
    "read_log",
    "plot_monitor",
    # errors and warnings
    "HutchtraceError",
    "LossError",
    "BlockSpecError",
    "DataFormatError",
    "DeviceMismatchError",
    "HVPUnsupportedError",
    "MemoryBudgetError",
    "NonFiniteWarning",
    "LocalHessianError",
    "DegenerateLocalHessianWarning",
]
