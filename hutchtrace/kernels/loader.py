"""Loading of the compiled extension ``hutchtrace._C``.

Importing ``hutchtrace._C`` runs the static ``TORCH_LIBRARY`` initialisers that register
the ``torch.ops.hutchtrace.*`` operators. A failed load is never fatal: the pure-PyTorch
reference in :mod:`hutchtrace.kernels.reference` takes over, the reason is kept in
:data:`LOAD_ERROR` and reported once by ``python -m hutchtrace.info``.

CUDA kernels run only on GPUs the build has a kernel image for (SASS of the same major
architecture, or PTX the driver can compile; see :mod:`hutchtrace.kernels.cuda_arch`). On any
other GPU the reference kernels run instead, with one warning per device, decided the
first time a tensor on that device reaches an op (CUDA is never queried at import).

Environment:
    HUTCHTRACE_DISABLE_EXT=1   never load the extension (forces the reference path).
    HUTCHTRACE_MORE_DETAILS=1  keep the full traceback of a failed load.
"""

from __future__ import annotations

import importlib
import json
import os
import traceback
import warnings

from . import cuda_arch

#: the hutchtrace package directory, where setup.py puts _C and _build_info.json
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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

        # registers torch.ops.hutchtrace; by name, because hutchtrace._C is the compiled
        # library (its wheel name), not a Python module of a layer above this one
        importlib.import_module("hutchtrace._C")

        HAS_EXT = True
    except Exception as exc:  # ImportError, OSError (undefined symbol), ...
        LOAD_ERROR = f"{type(exc).__name__}: {exc}"
        try:
            import importlib.util

            if importlib.util.find_spec("hutchtrace._C") is None:
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
        from . import fake

        fake.register_fakes()
    except Exception as exc:  # an old torch without register_fake: eager still works
        FAKE_ERROR = f"{type(exc).__name__}: {exc}"

# device type ("cpu") or CUDA device index -> whether a compiled kernel runs there (asked
# once per device: it sits in hot loops)
_HAS_KERNEL: dict = {}
_CUDA_COMPILED: bool | None = None


def has_kernel(device) -> bool:
    """Whether a compiled kernel runs for tensors on ``device``."""
    if not HAS_EXT:
        return False
    dev_type = device.type if hasattr(device, "type") else _device_type(device)
    if dev_type != "cuda":
        return dev_type == "cpu"
    index = getattr(device, "index", None)
    if index is None:
        import torch

        index = torch.device(device).index
        if index is None:
            index = torch.cuda.current_device()
    found = _HAS_KERNEL.get(index)
    if found is None:
        found, _ = cuda_kernel_status(index, warn=True)
        _HAS_KERNEL[index] = found
    return found


def _device_type(device) -> str:
    import torch

    return torch.device(device).type


def cuda_images() -> tuple[list[str], list[str]] | None:
    """(SASS, PTX) targets compiled into the extension, from its build record; None if unknown."""
    build = build_info() or {}
    if build.get("cuda_sass") is not None:
        return list(build["cuda_sass"]), list(build.get("cuda_ptx") or [])
    if build.get("arch_list"):
        return cuda_arch.images_from_arch_list(build["arch_list"])
    return None


_WARNED: set = set()


def cuda_kernel_status(index: int, warn: bool = False) -> tuple[bool, str]:
    """Whether the compiled CUDA kernels run on GPU ``index``, and why (or why not).

    ``warn=True`` issues the one warning per device when they do not and the reference
    kernels take over.
    """
    if not cuda_compiled():
        return False, "the extension was built without CUDA kernels"
    import torch

    images = cuda_images()
    if images is None:  # a build without a record: assume it was built for this machine
        return True, "kernel images unknown (no build record); assumed to match"
    capability = torch.cuda.get_device_capability(index)
    ok, why = cuda_arch.kernel_image(capability, *images)
    if not ok and warn and index not in _WARNED:
        _WARNED.add(index)
        name = torch.cuda.get_device_name(index)
        warnings.warn(
            f"hutchtrace: the compiled CUDA kernels cannot run on cuda:{index} ({name}): {why}. "
            "The pure-PyTorch reference kernels run on this GPU instead (slower; the same probes "
            "and statistics, sums equal to rounding). "
            "To compile for it, rebuild from source with "
            f'TORCH_CUDA_ARCH_LIST="{capability[0]}.{capability[1]}" (pip install --no-build-isolation .).',
            RuntimeWarning,
            stacklevel=3,
        )
    return ok, why


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
    path = os.path.join(PACKAGE_DIR, "_build_info.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
