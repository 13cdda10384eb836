"""Re-exports of the layer-wise Hessian study API (issue 5), for ``hutchtrace/__init__.py``::

    from ._local_api import *  # noqa: F401,F403
    __all__ += _local_api.__all__

Note: importing the function ``local_hessian`` into the package namespace shadows the
submodule attribute ``hutchtrace.local_hessian``; ``from hutchtrace.local_hessian import ...``
keeps working (it goes through ``sys.modules``).
"""

from __future__ import annotations

from .analysis import CCAResult, PCAResult, cca, snapshot_pca
from .local_hessian import (
    DegenerateLocalHessianWarning,
    LocalHessian,
    LocalHessianError,
    local_hessian,
    local_hessian_rows,
)
from .snapshots import SnapshotRecorder, load_arrays, load_run
from .spectrum import SpectrumSummary, VectorSummary, spectrum_summary, vector_summary

__all__ = [
    "CCAResult",
    "DegenerateLocalHessianWarning",
    "LocalHessian",
    "LocalHessianError",
    "PCAResult",
    # training snapshots and their analysis
    "SnapshotRecorder",
    "SpectrumSummary",
    "VectorSummary",
    "cca",
    "load_arrays",
    "load_run",
    # exact local Hessians of single layers (SPEC section 7)
    "local_hessian",
    "local_hessian_rows",
    "snapshot_pca",
    # spectral summaries (seed Appendix A)
    "spectrum_summary",
    "vector_summary",
]
