"""Exact local Hessians of single layers (docs/maths.md section 7)."""

from .compute import (
    DegenerateLocalHessianWarning,
    LocalHessian,
    LocalHessianError,
    local_hessian,
    local_hessian_rows,
)

__all__ = [
    "DegenerateLocalHessianWarning",
    "LocalHessian",
    "LocalHessianError",
    "local_hessian",
    "local_hessian_rows",
]
