"""Loading of the compiled extension ``hutchtrace._C``.

Importing ``hutchtrace._C`` runs the static ``TORCH_LIBRARY`` initialisers that register
the ``torch.ops.hutchtrace.*`` operators. A failed load is never fatal: the pure-PyTorch
reference in :mod:`hutchtrace._reference` takes over, the reason is kept in
:data:`LOAD_ERROR` and reported once by ``python -m hutchtrace.info``.

Environment:
    HUTCHTRACE_DISABLE_EXT=1   never load the extension (forces the reference path).
    HUTCHTRACE_MORE_DETAILS=1  keep the full traceback of a failed load.
"""

from __future__ import annotations

import json
import os
import traceback

HAS_EXT: bool = False
DISABLED: bool = os.environ.get("HUTCHTRACE_DISABLE_EXT", "0") not in ("", "0", "false", "False")
LOAD_ERROR: str | None = None
#: Why the fake (meta) kernels could not be registered, if they could not.
FAKE_ERROR: str | None = None

if DISABLED:
    LOAD_ERROR = "disabled by HUTCHTRACE_DISABLE_EXT"
else:
    try:
        import torch  # noqa: F401  (loads libc10/libtorch, which _C links against)

        from . import _C  # noqa: F401  (registers torch.ops.hutchtrace)

        HAS_EXT = True
    except Exception as exc:  # ImportError, OSError (undefined symbol), ...
        LOAD_ERROR = f"{type(exc).__name__}: {exc}"
        try:
            import importlib.util

            if importlib.util.find_spec(f"{__package__}._C") is None:
                LOAD_ERROR = (
                    "hutchtrace._C is not built (installed with HUTCHTRACE_SKIP_EXT=1, or the build "
                    "was skipped); reinstall with `pip install --no-build-isolation .` to compile it"
                )
        except Exception:  # keep the original message
            pass
        if os.environ.get("HUTCHTRACE_MORE_DETAILS"):
            LOAD_ERROR += "\n" + traceback.format_exc()

if HAS_EXT:
    try:
        from . import _fake

        _fake.register_fakes()
    except Exception as exc:  # an old torch without register_fake: eager still works
        FAKE_ERROR = f"{type(exc).__name__}: {exc}"

# device type -> whether a compiled kernel exists (asked once per type: it sits in hot loops)
_HAS_KERNEL: dict[str, bool] = {}
_CUDA_COMPILED: bool | None = None


def has_kernel(device) -> bool:
    """Whether a compiled kernel is registered for tensors on ``device``."""
    if not HAS_EXT:
        return False
    dev_type = device.type if hasattr(device, "type") else _device_type(device)
    found = _HAS_KERNEL.get(dev_type)
    if found is None:
        found = dev_type == "cpu" or (dev_type == "cuda" and cuda_compiled())
        _HAS_KERNEL[dev_type] = found
    return found


def _device_type(device) -> str:
    import torch

    return torch.device(device).type


def cuda_compiled() -> bool:
    """Whether the extension was built with its CUDA sources."""
    global _CUDA_COMPILED
    if not HAS_EXT:
        return False
    if _CUDA_COMPILED is None:
        import torch

        try:
            _CUDA_COMPILED = bool(torch.ops.hutchtrace._cuda_compiled())
        except (AttributeError, RuntimeError):
            _CUDA_COMPILED = False
    return _CUDA_COMPILED


def build_info() -> dict | None:
    """The build configuration recorded by setup.py next to the compiled module, if any."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_build_info.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
