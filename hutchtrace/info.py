"""Build and backend report: ``python -m hutchtrace.info``.

Shows which kernels run where (compiled CPU / compiled CUDA / pure-PyTorch fallback),
why the compiled extension is unavailable when it is, and how it was built.
"""

from __future__ import annotations

import json
import sys

__all__ = ["info_dict", "main"]


def _version() -> str:
    try:
        from hutchtrace import __version__

        return str(__version__)
    except Exception:  # the package may be half-written or broken: still report
        try:
            from importlib.metadata import version

            return version("hutchtrace")
        except Exception:
            return "unknown"


def info_dict() -> dict:
    """Everything ``python -m hutchtrace.info`` prints, as a dict."""
    import torch

    from hutchtrace import _ext

    cuda_available = torch.cuda.is_available()
    cuda_compiled = _ext.cuda_compiled()
    if _ext.HAS_EXT:
        cuda_reason = None
        if not cuda_compiled:
            build = _ext.build_info() or {}
            cuda_reason = build.get("cuda_skipped_reason") or "extension built without CUDA sources"
        elif not cuda_available:
            cuda_reason = "no CUDA device visible"
    else:
        cuda_reason = "compiled extension not loaded"
    return {
        "hutchtrace": _version(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": cuda_available,
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if cuda_available
        else [],
        "extension_loaded": _ext.HAS_EXT,
        "extension_disabled": _ext.DISABLED,
        "load_error": _ext.LOAD_ERROR,
        "fake_kernels_error": _ext.FAKE_ERROR,
        "cuda_compiled": cuda_compiled,
        "backends": {
            "cpu": "compiled" if _ext.has_kernel("cpu") else "fallback",
            "cuda": "compiled" if (cuda_compiled and cuda_available) else "fallback",
        },
        "cuda_fallback_reason": cuda_reason,
        "build": _ext.build_info(),
    }


def main(argv: list[str] | None = None) -> int:
    """Print the report (``--json`` for machine-readable output)."""
    argv = sys.argv[1:] if argv is None else argv
    info = info_dict()
    if "--json" in argv:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    yes = {True: "yes", False: "no"}
    rows = [
        ("hutchtrace", info["hutchtrace"]),
        ("python", info["python"]),
        ("torch", f"{info['torch']} (CUDA {info['torch_cuda'] or 'none'})"),
        (
            "CUDA available",
            yes[info["cuda_available"]]
            + (f" ({', '.join(info['cuda_devices'])})" if info["cuda_devices"] else ""),
        ),
        ("extension loaded", yes[info["extension_loaded"]]),
        ("CUDA compiled", yes[info["cuda_compiled"]]),
        ("CPU kernels", info["backends"]["cpu"]),
        ("CUDA kernels", info["backends"]["cuda"]),
    ]
    if info["load_error"]:
        rows.append(("load error", info["load_error"]))
    if info["cuda_fallback_reason"] and info["backends"]["cuda"] == "fallback":
        rows.append(("CUDA fallback because", info["cuda_fallback_reason"]))
    if info["fake_kernels_error"]:
        rows.append(("fake kernels", f"not registered: {info['fake_kernels_error']}"))
    build = info["build"]
    if build:
        rows.append(
            (
                "built with",
                f"torch {build.get('torch')}, nvcc {build.get('nvcc') or '-'}, "
                f"arch {build.get('arch_list') or '-'}, {build.get('hutchtrace_build')}"
                f", abi {build.get('py_limited_api') or 'cpython'}",
            )
        )
        if build.get("torch") and build.get("torch") != info["torch"]:
            rows.append(("WARNING", f"built against torch {build['torch']}, running {info['torch']}"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}} : {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
