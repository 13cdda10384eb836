"""Build and backend report: ``python -m hutchtrace.info``.

Shows which kernels run where (compiled CPU / compiled CUDA / pure-PyTorch fallback),
why the compiled extension is unavailable when it is, and how it was built.
"""

from __future__ import annotations

import json
import sys

__all__ = ["CUDA_VERIFICATION", "info_dict", "main"]

#: What the correctness of the CUDA kernels rests on. Update it when they run on a GPU
#: (``python bench/gpu_suite.py`` writes bench/results/gpu_suite.json).
CUDA_VERIFICATION = {
    "method": "emulated",
    "detail": (
        "csrc/cuda/*.cu executed on the CPU by the cudasim emulator (tests/cudasim): every CUDA "
        "kernel test under 3 schedules (thread and block order forward/reverse/random, 1/3/132 SMs); "
        "probes and Welford bit-identical to the CPU kernels, block_dot within its rounding bound"
    ),
    "date": "2026-12-03",
    "hardware": None,  # e.g. "NVIDIA H100 80GB HBM3 (sm_90), driver 580.65, 2027-01-15"
}


def cuda_verification_line() -> str:
    """One line: how the CUDA kernels were verified, when, and on what."""
    v = CUDA_VERIFICATION
    if v["hardware"]:
        return f"on hardware: {v['hardware']}"
    return f"{v['method']} (cudasim) on {v['date']}; never run on hardware"


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

    from hutchtrace.kernels import loader

    cuda_available = torch.cuda.is_available()
    cuda_compiled = loader.cuda_compiled()
    devices = []
    if cuda_available:
        for i in range(torch.cuda.device_count()):
            ok, why = loader.cuda_kernel_status(i) if loader.HAS_EXT else (False, "compiled extension not loaded")
            major, minor = torch.cuda.get_device_capability(i)
            devices.append(
                {"index": i, "name": torch.cuda.get_device_name(i), "capability": f"{major}.{minor}",
                 "compiled_kernels": ok, "kernel_image": why}
            )
    cuda_backend = "compiled" if devices and all(d["compiled_kernels"] for d in devices) else "fallback"
    if devices and cuda_backend == "fallback" and any(d["compiled_kernels"] for d in devices):
        cuda_backend = "compiled on some devices"
    if loader.HAS_EXT:
        cuda_reason = None
        if not cuda_compiled:
            build = loader.build_info() or {}
            cuda_reason = build.get("cuda_skipped_reason") or "extension built without CUDA sources"
        elif not cuda_available:
            cuda_reason = "no CUDA device visible"
        elif cuda_backend != "compiled":
            cuda_reason = "; ".join(
                f"cuda:{d['index']}: {d['kernel_image']}" for d in devices if not d["compiled_kernels"]
            )
    else:
        cuda_reason = "compiled extension not loaded"
    images = loader.cuda_images() if cuda_compiled else None
    return {
        "hutchtrace": _version(),
        "package": loader.PACKAGE_DIR,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": cuda_available,
        "cuda_devices": [d["name"] for d in devices],
        "cuda_device_kernels": devices,
        "extension_loaded": loader.HAS_EXT,
        "extension_disabled": loader.DISABLED,
        "load_error": loader.LOAD_ERROR,
        "fake_kernels_error": loader.FAKE_ERROR,
        "cuda_compiled": cuda_compiled,
        "cuda_arch_list": (loader.build_info() or {}).get("arch_list") if cuda_compiled else None,
        "cuda_sass": images[0] if images else None,
        "cuda_ptx": images[1] if images else None,
        "cuda_verification": dict(CUDA_VERIFICATION),
        "backends": {
            "cpu": "compiled" if loader.has_kernel("cpu") else "fallback",
            "cuda": cuda_backend if cuda_compiled else "fallback",
        },
        "cuda_fallback_reason": cuda_reason,
        "build": loader.build_info(),
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
        ("imported from", info["package"]),
        ("python", info["python"]),
        ("torch", f"{info['torch']} (CUDA {info['torch_cuda'] or 'none'})"),
        (
            "CUDA available",
            yes[info["cuda_available"]]
            + (f" ({', '.join(info['cuda_devices'])})" if info["cuda_devices"] else ""),
        ),
        ("extension loaded", yes[info["extension_loaded"]]),
        ("CUDA compiled", yes[info["cuda_compiled"]]),
    ]
    if info["cuda_sass"] is not None:
        images = ", ".join(info["cuda_sass"] + [f"{t} (PTX)" for t in info["cuda_ptx"]])
        rows.append(("CUDA kernel images", f"{images}  [TORCH_CUDA_ARCH_LIST={info['cuda_arch_list']}]"))
    rows += [
        ("CPU kernels", info["backends"]["cpu"]),
        ("CUDA kernels", info["backends"]["cuda"]),
    ]
    for d in info["cuda_device_kernels"]:
        rows.append((f"  cuda:{d['index']}", f"{d['name']} (sm {d['capability']}): {d['kernel_image']}"))
    rows.append(("CUDA kernels verified", cuda_verification_line()))
    if info["load_error"]:
        rows.append(("load error", info["load_error"]))
    if info["cuda_fallback_reason"] and info["backends"]["cuda"] != "compiled":
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
