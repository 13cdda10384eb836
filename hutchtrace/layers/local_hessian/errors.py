"""What the local-Hessian paths raise and warn (docs/maths.md section 7).

:class:`LocalHessianError` is the refusal of a layer / activation / ``phi`` combination that a
requested path does not cover (``method="closed_form"`` on a coupling activation, a layer that
ran zero or several times, a non-tensor block output); :class:`DegenerateLocalHessianWarning`
marks a correct but identically zero ``LH_i`` (piecewise-linear ``A``: ``LH_i = 0`` almost
everywhere).
"""

from __future__ import annotations

from ...core.errors import HutchtraceError

__all__ = ["DegenerateLocalHessianWarning", "LocalHessianError"]


class LocalHessianError(HutchtraceError, ValueError):
    """The layer / activation / ``phi`` combination does not fit the requested local-Hessian path."""


class DegenerateLocalHessianWarning(UserWarning):
    """The local Hessian is identically zero (piecewise-linear activation or a linear block)."""
