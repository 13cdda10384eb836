"""Build script for the compiled extension ``hutchtrace._C`` (metadata is in pyproject.toml).

Install from a checkout with ``pip install --no-build-isolation -e .`` (torch must already
be installed; the extension is compiled against it).

Environment switches:
    HUTCHTRACE_SKIP_EXT=1   build no extension at all (also HUTCHTRACE_NO_EXT=1); the
                            pure-PyTorch reference kernels are used at run time.
    HUTCHTRACE_NO_CUDA=1    build the C++ (CPU) kernels only.
    FORCE_CUDA=1            build the CUDA kernels or fail (no silent CPU-only build).
    CUDA_HOME / CUDA_PATH   CUDA toolkit root; default: the first toolkit found
                            (nvcc on PATH, /usr/local/cuda, /usr/local/cuda-*).
    TORCH_CUDA_ARCH_LIST    GPU architectures, e.g. "8.0;9.0". Default: the visible GPUs; when
                            no GPU is visible (how wheels are built), WHEEL_ARCHS of
                            hutchtrace/kernels/cuda_arch.py (7.5 to 12.0) as far as nvcc supports
                            them, with PTX of the newest for later GPUs.
    NVCC_FLAGS              extra nvcc flags (split like a shell would).
    DEBUG=1                 -O0 -g instead of -O3.
    MAX_JOBS                parallel compile jobs (ninja).

The CUDA kernels are built whenever torch is a CUDA build and a toolkit is found; a GPU
is not needed at build time.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_cuda_arch():
    """hutchtrace/kernels/cuda_arch.py, loaded by path (the package is not importable yet)."""
    import importlib.util

    path = os.path.join(ROOT, "hutchtrace", "kernels", "cuda_arch.py")
    spec = importlib.util.spec_from_file_location("_hutchtrace_cuda_arch", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


cuda_arch = _load_cuda_arch()


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no", "off")


SKIP_EXT = _env_flag("HUTCHTRACE_SKIP_EXT") or _env_flag("HUTCHTRACE_NO_EXT")
NO_CUDA = _env_flag("HUTCHTRACE_NO_CUDA")
FORCE_CUDA = _env_flag("FORCE_CUDA")
DEBUG = _env_flag("DEBUG")


def _is_toolkit(path: str | None) -> bool:
    return (
        bool(path)
        and os.path.isfile(os.path.join(path, "bin", "nvcc"))
        and os.path.isfile(os.path.join(path, "include", "cuda_runtime.h"))
    )


def _find_cuda_home() -> str | None:
    """A CUDA toolkit root with both nvcc and the runtime headers.

    torch's own search takes the parent of the first ``nvcc`` on PATH, which is wrong when
    that nvcc is a wrapper script (e.g. /usr/local/bin/nvcc), so candidates are checked.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for path in candidates:
        if _is_toolkit(path):
            return os.path.abspath(path)
    return None


def _nvcc_version(cuda_home: str) -> str | None:
    try:
        out = subprocess.check_output([os.path.join(cuda_home, "bin", "nvcc"), "--version"], text=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def _nvcc_archs(cuda_home: str) -> set[str] | None:
    """Compute capabilities ("8.6", ...) this nvcc compiles for, or None if it cannot say."""
    try:
        out = subprocess.check_output([os.path.join(cuda_home, "bin", "nvcc"), "--list-gpu-arch"], text=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    archs = set()
    for num in re.findall(r"compute_(\d+)\b", out):
        archs.add(f"{num[:-1]}.{num[-1]}")
    return archs or None


def _sources(pattern: str) -> list[str]:
    # Relative paths keep the build independent of where the checkout lives.
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _torch_accepts(cpp_extension, arch: str) -> bool:
    """Whether torch's build helper knows ``arch`` (it raises ValueError for the others)."""
    saved = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    try:
        cpp_extension._get_cuda_arch_flags()
        return True
    except ValueError:
        return False
    except Exception:  # a private helper that changed: let nvcc decide
        return True
    finally:
        if saved is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = saved


def get_extensions():
    """The extension list (empty with HUTCHTRACE_SKIP_EXT) and the build-info dict."""
    if SKIP_EXT:
        print("hutchtrace setup: HUTCHTRACE_SKIP_EXT set, building no extension (reference kernels only)")
        return [], {}, None

    cuda_home = None if NO_CUDA else _find_cuda_home()
    if cuda_home:
        # torch.utils.cpp_extension resolves CUDA_HOME when first imported.
        os.environ["CUDA_HOME"] = cuda_home

    import torch
    from torch.utils import cpp_extension

    if cuda_home and cpp_extension.CUDA_HOME != cuda_home:
        cpp_extension.CUDA_HOME = cuda_home

    nvcc_version = _nvcc_version(cuda_home) if cuda_home else None
    torch_cuda = torch.version.cuda
    reason = ""
    if NO_CUDA:
        with_cuda, reason = False, "HUTCHTRACE_NO_CUDA set"
    elif torch_cuda is None:
        with_cuda, reason = False, "torch is a CPU-only build"
    elif cuda_home is None:
        with_cuda, reason = False, "no CUDA toolkit found (set CUDA_HOME)"
    elif nvcc_version and nvcc_version.split(".")[0] != torch_cuda.split(".")[0]:
        with_cuda, reason = False, f"nvcc {nvcc_version} does not match torch's CUDA {torch_cuda}"
    else:
        with_cuda = True
    if FORCE_CUDA and not with_cuda:
        raise RuntimeError(f"FORCE_CUDA=1 but the CUDA kernels cannot be built: {reason}")

    arch_list = None
    sass, ptx = [], []
    if with_cuda:
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
        if not arch_list:
            visible = torch.cuda.is_available() and torch.cuda.device_count() > 0
            if visible:
                caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
                arch_list = ";".join(f"{a}.{b}" for a, b in caps) + "+PTX"
            else:
                nvcc_archs = _nvcc_archs(cuda_home)
                arch_list = cuda_arch.default_arch_list(
                    {a for a in cuda_arch.WHEEL_ARCHS
                     if (nvcc_archs is None or a in nvcc_archs) and _torch_accepts(cpp_extension, a)}
                )
            os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
        try:  # the -gencode flags torch will pass: what the binary will carry
            sass, ptx = cuda_arch.arch_images(cpp_extension._get_cuda_arch_flags())
        except Exception as exc:  # a private helper: report, never fail the build on it
            print(f"hutchtrace setup: could not resolve the arch flags ({exc}); "
                  "hutchtrace.info will not know them")

    # -ffp-contract=off: no FMA contraction, so the probe math is bit-exact on every host.
    opt = ["-O0", "-g"] if DEBUG else ["-O3"]
    cxx_flags = opt + ["-ffp-contract=off"]
    link_flags: list[str] = []
    if torch.backends.openmp.is_available():
        # at::parallel_for is inline OpenMP in the headers: without -fopenmp it runs serially.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    nvcc_flags = (
        opt
        + [
            "--expt-relaxed-constexpr",
            "-lineinfo",
            "-Xcompiler",
            "-ffp-contract=off",
        ]
        + shlex.split(os.environ.get("NVCC_FLAGS", ""))
    )

    sources = ["csrc/hutchtrace.cpp"] + _sources("csrc/cpu/*.cpp")
    define_macros = []
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    # One abi3 wheel per platform: the module uses no Python API beyond PyInit__C (ops are
    # reached through torch.ops). torch adds -DPy_LIMITED_API=<its minimum CPython>.
    limited_hex = getattr(cpp_extension, "min_supported_cpython", None)
    py_limited_api = limited_hex is not None
    abi_tag = None
    if py_limited_api:
        version = int(limited_hex, 16)
        abi_tag = f"cp{version >> 24}{(version >> 16) & 0xFF}"
    kwargs = dict(
        name="hutchtrace._C",
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_link_args=link_flags,
        py_limited_api=py_limited_api,
    )
    if with_cuda:
        define_macros.append(("WITH_CUDA", None))
        ext = cpp_extension.CUDAExtension(
            sources=sources + _sources("csrc/cuda/*.cu"),
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            **kwargs,
        )
    else:
        ext = cpp_extension.CppExtension(
            sources=sources,
            extra_compile_args={"cxx": cxx_flags},
            **kwargs,
        )

    info = {
        "hutchtrace_build": "debug" if DEBUG else "release",
        "torch": torch.__version__,
        "torch_cuda": torch_cuda,
        "cuda_compiled": with_cuda,
        "cuda_skipped_reason": reason or None,
        "cuda_home": cuda_home if with_cuda else None,
        "nvcc": nvcc_version if with_cuda else None,
        "arch_list": arch_list,
        "cuda_sass": sass if with_cuda else None,
        "cuda_ptx": ptx if with_cuda else None,
        "python": sys.version.split()[0],
        "py_limited_api": abi_tag,
        "cxx_flags": cxx_flags,
        "nvcc_flags": nvcc_flags if with_cuda else None,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print("hutchtrace setup: resolved build configuration")
    for key in (
        "torch",
        "torch_cuda",
        "cuda_compiled",
        "cuda_skipped_reason",
        "cuda_home",
        "nvcc",
        "arch_list",
        "cuda_sass",
        "cuda_ptx",
        "py_limited_api",
        "cxx_flags",
        "nvcc_flags",
    ):
        print(f"  {key:<20} = {info[key]}")
    print(f"  {'DEBUG':<20} = {DEBUG}")
    print(f"  {'FORCE_CUDA':<20} = {FORCE_CUDA}")
    print(f"  {'MAX_JOBS':<20} = {os.environ.get('MAX_JOBS')}")
    print(f"  {'sources':<20} = {ext.sources}")
    return [ext], info, cpp_extension.BuildExtension


EXTENSIONS, BUILD_INFO, BUILD_EXT = get_extensions()
cmdclass = {}
options = {}

if BUILD_EXT is not None:

    class BuildExt(BUILD_EXT):
        """torch's BuildExtension, plus a build-info JSON next to the compiled module."""

        def run(self):
            super().run()
            for ext in self.extensions:
                out_dir = os.path.dirname(self.get_ext_fullpath(ext.name))
                os.makedirs(out_dir, exist_ok=True)
                with open(os.path.join(out_dir, "_build_info.json"), "w") as f:
                    json.dump(BUILD_INFO, f, indent=2, sort_keys=True)
                    f.write("\n")

    cmdclass["build_ext"] = BuildExt
    if BUILD_INFO.get("py_limited_api"):
        options["bdist_wheel"] = {"py_limited_api": BUILD_INFO["py_limited_api"]}

setup(ext_modules=EXTENSIONS, cmdclass=cmdclass, options=options)
