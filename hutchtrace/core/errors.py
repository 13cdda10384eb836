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
    """An operation in the model has no second derivative for the chosen HVP backbone.

    ``backbone``, ``reason`` (what failed, without advice) and ``fix`` (what to change in the
    model, without naming another backbone) let ``hvp="auto"`` list every candidate it tried
    in one message without advising a backbone that already failed.
    """

    def __init__(self, message: str, *, backbone: str | None = None, reason: str | None = None,
                 fix: str | None = None):
        super().__init__(message)
        self.backbone = backbone
        self.reason = reason if reason is not None else message
        self.fix = fix


class NonFiniteWarning(UserWarning):
    """Some blocks produced NaN or Inf Hessian-vector products; they are flagged, not averaged."""


#: the fix for ``torch.utils.checkpoint(use_reentrant=True)``, which ``autograd.grad`` cannot run through
CHECKPOINT_FIX = (
    "use non-reentrant checkpointing: torch.utils.checkpoint.checkpoint(..., use_reentrant=False), or for a "
    "Hugging Face model "
    "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False}) "
    "(or disable gradient checkpointing for the call)"
)

_FUNCTION_FIX = (
    "give the custom autograd.Function a setup_context staticmethod (forward without ctx) and a jvp "
    "staticmethod (and vmap or generate_vmap_rule=True for batched probes); see PyTorch's "
    "'Extending torch.func with autograd.Function'"
)

#: (pattern, reason, fix, whether other backbones may work): failures with a known cause
_KNOWN_CAUSES = (
    (re.compile(r"use_reentrant=True.*incompatible with \.grad\(\)"
                r"|Checkpointing is not compatible with \.grad\(\)", re.S),
     "torch.utils.checkpoint with use_reentrant=True cannot run under torch.autograd.grad, which every "
     "HVP needs",
     CHECKPOINT_FIX, False),
    (re.compile(r"don't yet support saved tensor hooks"),
     "torch.func transforms cannot run through saved-tensor hooks (torch.utils.checkpoint with "
     "use_reentrant=False, torch.autograd.graph.saved_tensors_hooks, save_on_cpu)",
     "disable gradient checkpointing / the saved-tensor hooks for the call", True),
    (re.compile(r"must override the setup_context staticmethod"),
     "a custom autograd.Function in the legacy style (ctx as forward's first argument; e.g. "
     "torch.utils.checkpoint with use_reentrant=True) cannot run under torch.func transforms",
     _FUNCTION_FIX, True),
    (re.compile(r"must implement the jvp function for custom autograd\.Function"),
     "a custom autograd.Function without a jvp staticmethod has no forward-mode derivative",
     _FUNCTION_FIX, True),
    (re.compile(r"support calling random operations inside of vmap"),
     "a random op (e.g. dropout recomputed by gradient checkpointing inside the backward) runs inside a "
     "vmapped backward, which cannot batch random ops",
     "remove the random op from the recomputed region, or use one probe per backward", True),
    (re.compile(r"does not have vmap support"),
     "a custom autograd.Function without a vmap rule cannot process a batch of probes",
     "set generate_vmap_rule=True on the Function (or implement its vmap staticmethod)", True),
)

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


def known_cause(message: str):
    """``(reason, fix, others may work)`` for failures with a known cause, else None."""
    for pat, reason, fix, others in _KNOWN_CAUSES:
        if pat.search(message):
            return reason, fix, others
    return None


def is_second_order_failure(message: str) -> bool:
    """Whether an error message says some op lacks the derivative an HVP needs."""
    return (
        failing_op(message) is not None
        or known_cause(message) is not None
        or "not implemented" in message
        # torch bug: some backward formulas (e.g. mse_loss) write into the zero tangent of a
        # constant target under forward-over-reverse.
        or "ZeroTensors are immutable" in message
    )


def first_line(message: str) -> str:
    lines = message.strip().splitlines()
    return lines[0] if lines else ""


def unsupported_hvp(backbone: str, message: str, alternatives: list[str]) -> HVPUnsupportedError:
    """Build the error for an op a backbone cannot differentiate twice."""
    original = first_line(message)
    cause = known_cause(message)
    if cause is not None:
        reason, fix, others = cause
        alt = " or ".join(f"hvp={a!r}" for a in alternatives) if (others and alternatives) else ""
        return HVPUnsupportedError(
            f"The {backbone!r} HVP backbone cannot run: {reason}. Fix: {fix}"
            + (f"; or try {alt}" if alt else "") + f". Original error: {original}",
            backbone=backbone, reason=f"{reason} ({original})", fix=fix,
        )
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
        f"Original error: {original}",
        backbone=backbone,
        reason=f"cannot differentiate through {op} twice ({original})",
        fix="replace the op with a twice-differentiable one",
    )


def no_backbone_works(errors: dict) -> Exception:
    """The error of ``hvp="auto"`` when every candidate failed: ALL of them, each with its
    reason, and only the fixes that change the model (every backbone has been tried)."""
    lines = []
    fixes: list[str] = []
    for name, exc in errors.items():
        if isinstance(exc, HVPUnsupportedError):
            lines.append(f"  {name!r}: {exc.reason}")
            if exc.fix and exc.fix not in fixes:
                fixes.append(exc.fix)
        else:
            lines.append(f"  {name!r}: {type(exc).__name__}: {first_line(str(exc))}")
    tried = "\n".join(lines)
    if not any(isinstance(e, HVPUnsupportedError) for e in errors.values()):
        # errors of unknown cause (e.g. the model's own code raising) are not rephrased
        first = next(iter(errors.values()))
        first.add_note(f"hvp='auto' tried every HVP backbone and each failed:\n{tried}")
        return first
    fix = "; or ".join(fixes) if fixes else "replace the failing op with a twice-differentiable one"
    return HVPUnsupportedError(
        f"no HVP backbone works for this model: hvp='auto' tried {len(errors)} and each failed:\n{tried}\n"
        f"Fix: {fix}.",
        reason="every HVP backbone failed", fix=fix,
    )
