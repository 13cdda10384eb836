"""Exceptions and warnings raised by hutchtrace.

Every error names the problem and the fix. They subclass the built-in type a user would
naturally catch (``ValueError``, ``TypeError``, ``RuntimeError``) so generic handlers
keep working.
"""

from __future__ import annotations

import re

__all__ = [
    "HutchtraceError",
    "LossError",
    "BlockSpecError",
    "DataFormatError",
    "HVPUnsupportedError",
    "DeviceMismatchError",
    "MemoryBudgetError",
    "NonFiniteWarning",
]


class HutchtraceError(Exception):
    """Base class of every hutchtrace error."""


class LossError(HutchtraceError, ValueError):
    """The loss is not a scalar, or does not depend on the trainable parameters."""


class BlockSpecError(HutchtraceError, ValueError):
    """A block specification names unknown parameters, overlaps, or selects nothing."""


class DataFormatError(HutchtraceError, TypeError):
    """``data`` does not have a supported form."""


class DeviceMismatchError(HutchtraceError, ValueError):
    """The selected parameters live on more than one device."""


class MemoryBudgetError(HutchtraceError, MemoryError):
    """A requested exact computation would exceed the memory budget."""


class HVPUnsupportedError(HutchtraceError, RuntimeError):
    """An operation in the model has no second derivative for the chosen HVP backbone."""


class NonFiniteWarning(UserWarning):
    """Some blocks produced NaN or Inf Hessian-vector products; they are flagged, not averaged."""


_OP_PATTERNS = (
    re.compile(r"derivative for (aten::[\w.]+|[\w.:]+) is not implemented"),
    re.compile(r"forward AD with ([\w.:]+) that does not support it"),
    re.compile(r"[Bb]atching rule not implemented for ([\w.:]+)"),
    re.compile(r"vmap: We do not (?:yet )?support calling random operations inside of vmap"),
    re.compile(r"(once_differentiable)"),
    re.compile(r"does not support double backward"),
    re.compile(r"double backwards on ([\w.:]+) not supported"),  # torchvision's roi_align, deform_conv2d...
)


def failing_op(message: str) -> str | None:
    """Extract the offending operator's name from an autograd / functorch error message."""
    for pat in _OP_PATTERNS:
        m = pat.search(message)
        if m:
            return m.group(1) if m.groups() else m.group(0)
    return None


def is_second_order_failure(message: str) -> bool:
    """Whether an error message says some op lacks the derivative an HVP needs."""
    return (
        failing_op(message) is not None
        or "not implemented" in message
        # torch bug: some backward formulas (e.g. mse_loss) write into the zero tangent of a
        # constant target under forward-over-reverse.
        or "ZeroTensors are immutable" in message
    )


def unsupported_hvp(backbone: str, message: str, alternatives: list[str]) -> HVPUnsupportedError:
    """Build the error for an op a backbone cannot differentiate twice."""
    op = failing_op(message) or "an operation in the model"
    if "ZeroTensors are immutable" in message:
        op = ("an op whose backward formula has no usable forward-mode derivative for a constant "
              "input (a PyTorch bug hit by F.mse_loss / nn.MSELoss; ((out - y) ** 2).mean() works)")
    if op == "once_differentiable":
        op = "a custom autograd.Function whose backward is @once_differentiable"
    from .twice import swap_for_failing_op

    swap = swap_for_failing_op(message)
    if swap is not None:  # no backbone can help: every autograd mode lacks this derivative
        return HVPUnsupportedError(
            f"The {backbone!r} HVP backbone cannot differentiate through {op}: PyTorch has no second "
            f"derivative for {swap.name} in any mode. Wrap the call in `with hutchtrace.twice_differentiable():`, "
            f"which computes {swap.name}(x) as {swap.formula} (the same function, twice differentiable) and "
            f"leaves the model unchanged. Original error: {message.strip().splitlines()[0]}"
        )
    alt = " or ".join(f"hvp={a!r}" for a in alternatives) if alternatives else "another model formulation"
    return HVPUnsupportedError(
        f"The {backbone!r} HVP backbone cannot differentiate through {op}: it has no second "
        f"derivative in that mode. Try {alt}, or replace the op with a twice-differentiable one. "
        f"Original error: {message.strip().splitlines()[0]}"
    )
