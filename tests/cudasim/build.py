"""Build the emulated CUDA kernels: the real ``csrc/cuda/*.cu``, compiled by g++ against cudasim.

    python tests/cudasim/build.py                 # build (cached) and print the library path
    python tests/cudasim/build.py --src DIR       # build from another copy of csrc/ (mutants)

What happens:

1. Each ``.cu`` source is copied into the build directory with one change: every launch
   ``kernel<<<grid, block, shmem, stream>>>(args)`` becomes
   ``::cudasim::launch("kernel", grid, block, shmem, stream)(kernel, args)``. Lines are
   kept (``#line`` points at the original file), so compiler and emulator messages name
   the real file and line.
2. ``include/cudasim/prelude.h`` is force-included (precompiled once): it includes the
   PyTorch headers as host code, then defines ``__CUDACC__``/``__CUDA_ARCH__`` and the CUDA
   keywords, so the shared headers compile their device branches. ``shadow/`` stands in
   for ``cuda_runtime.h`` and ``c10/cuda/*``.
3. ``csrc/hutchtrace.cpp`` (the op schemas), the ``.cu`` files, ``selftest.cu`` and
   ``control.cpp`` are compiled with ``-Dhutchtrace=hutchtrace_emu`` (ops
   ``torch.ops.hutchtrace_emu.*``, registered for CPU tensors) and linked into one shared
   library, loaded with ``torch.ops.load_library``.

A build is keyed by a hash of every input (sources, headers, flags, torch version): an
unchanged tree reuses the library. Object files are compiled in parallel (``MAX_JOBS``,
default: the CPU count).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shlex
import subprocess
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DEFAULT_BUILD = ROOT / "build" / "cudasim"
NAMESPACE = "hutchtrace_emu"

_IDENT = re.compile(r"[A-Za-z0-9_:]")


def _kernel_name_start(text: str, end: int) -> int:
    """Start of the kernel expression that ends at ``end`` (``name`` or ``name<T, k>``)."""
    i = end
    while i > 0 and text[i - 1].isspace():
        i -= 1
    if i > 0 and text[i - 1] == ">":  # template arguments: walk back to the matching '<'
        depth = 0
        while i > 0:
            i -= 1
            c = text[i]
            if c == ">":
                depth += 1
            elif c == "<":
                depth -= 1
                if depth == 0:
                    break
        while i > 0 and text[i - 1].isspace():
            i -= 1
    while i > 0 and _IDENT.match(text[i - 1]):
        i -= 1
    return i


def rewrite_launches(text: str, path: str = "<source>") -> tuple[str, int]:
    """Rewrite every ``kernel<<<cfg>>>(args)``; returns the new text and the launch count."""
    out, pos, count = [], 0, 0
    while True:
        open_ = text.find("<<<", pos)
        if open_ < 0:
            break
        close = text.find(">>>", open_)
        if close < 0:
            raise ValueError(f"{path}: unterminated <<< at offset {open_}")
        start = _kernel_name_start(text, open_)
        kernel = text[start:open_].strip()
        if not kernel:
            raise ValueError(f"{path}: no kernel name before <<< at offset {open_}")
        cfg = text[open_ + 3 : close]
        j = close + 3
        while j < len(text) and text[j].isspace():
            j += 1
        if j >= len(text) or text[j] != "(":
            raise ValueError(f"{path}: expected '(' after >>> at offset {close}")
        k = j + 1
        while k < len(text) and text[k].isspace():
            k += 1
        empty = k < len(text) and text[k] == ")"
        span = text[start : j + 1]
        newlines = "\n" * span.count("\n")  # keep every later line where it was
        name = " ".join(kernel.split()).replace('"', "")
        call = f'::cudasim::launch("{name}", {" ".join(cfg.split())})({" ".join(kernel.split())}'
        out.append(text[pos:start])
        out.append(call + ("" if empty else ", ") + newlines)
        pos = j + 1
        count += 1
    out.append(text[pos:])
    return "".join(out), count


_SHARED = re.compile(r"__shared__\s+([^;{}]*?);")
_SHARED_DECL = re.compile(
    r"^(?P<type>[^=,\[\]]+?)\s*\b(?P<name>[A-Za-z_]\w*)\s*(?P<dims>(?:\[[^\]]+\]\s*)*)$", re.S
)


def rewrite_shared(text: str, path: str = "<source>") -> tuple[str, int]:
    """Rewrite every ``__shared__ T name[dims];`` into a static that registers itself with
    the emulator (which poisons it before each block); returns the new text and the count."""
    count = 0

    def one(m: re.Match) -> str:
        nonlocal count
        decl = m.group(1)
        d = _SHARED_DECL.match(decl.strip())
        extern = "extern" in m.string[max(0, m.start() - 8) : m.start()]
        if d is None or extern:
            line = m.string.count("\n", 0, m.start()) + 1
            raise ValueError(
                f"{path}:{line}: cudasim handles `__shared__ T name[dims];` only (one variable, no "
                f"initialiser, no extern/dynamic shared memory), got `__shared__ {decl};`"
            )
        count += 1
        name = d.group("name")
        typ = " ".join(d.group("type").split())
        dims = " ".join(d.group("dims").split())
        newlines = "\n" * decl.count("\n")
        return (
            f"static {typ} {name}{dims}; [[maybe_unused]] static const bool cudasim_shared_{name}_ = "
            f"::cudasim::detail::register_shared(&{name}, sizeof({name}));{newlines}"
        )

    return _SHARED.sub(one, text), count


def rewrite(text: str, path: str = "<source>") -> tuple[str, int, int]:
    """Both rewrites; returns the text, the number of launches and of shared declarations."""
    text, launches = rewrite_launches(text, path)
    text, shared = rewrite_shared(text, path)
    return text, launches, shared


def _torch_flags() -> tuple[list[str], list[str]]:
    import torch
    from torch.utils import cpp_extension

    inc = []
    for path in cpp_extension.include_paths():
        inc += ["-isystem", path]
    inc += ["-isystem", sysconfig.get_paths()["include"]]
    libdir = cpp_extension.library_paths()[0]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cflags = [f"-D_GLIBCXX_USE_CXX11_ABI={abi}"] + inc
    ldflags = [f"-L{libdir}", "-lc10", "-ltorch_cpu", "-ltorch", f"-Wl,-rpath,{libdir}"]
    return cflags, ldflags


def _digest(parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else str(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _tree(*dirs: Path) -> list[bytes]:
    """Names and contents of every file under ``dirs`` (for cache keys)."""
    out = []
    for d in dirs:
        for p in sorted(d.rglob("*")):
            if p.is_file():
                out += [str(p.relative_to(d)).encode(), p.read_bytes()]
    return out


def _run(cmd: list[str], verbose: bool) -> None:
    if verbose:
        print("+", shlex.join(cmd), flush=True)
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"cudasim build failed:\n{shlex.join(cmd)}\n{res.stdout}{res.stderr}")


def build(
    src_root: Path | str = ROOT / "csrc",
    build_root: Path | str = DEFAULT_BUILD,
    jobs: int | None = None,
    verbose: bool = False,
    opt: str = "-O2",
) -> Path:
    """Compile the emulated extension from ``src_root`` (a csrc/ tree); returns the .so path.

    Three caches under ``build_root``, each keyed by a hash of its inputs: the precompiled
    prelude (``pch/``, shared by every variant), one object per translation unit (``obj/``),
    and the linked library (``lib/``). A planted defect in one ``.cu`` file recompiles that
    file only.
    """
    import torch

    src_root, build_root = Path(src_root).resolve(), Path(build_root).resolve()
    torch_cflags, ldflags = _torch_flags()
    flags = [
        "-std=c++20",
        opt,
        "-fPIC",
        "-ffp-contract=off",  # the intrinsics are single IEEE operations, never fused
        "-fvisibility-inlines-hidden",
        "-Wno-unknown-pragmas",
        f"-Dhutchtrace={NAMESPACE}",
        "-DWITH_CUDA",
        "-I", str(HERE / "shadow"),
        "-I", str(HERE / "include"),
    ] + torch_cflags
    # Cache keys hash file contents, never the path of src_root: a mutant in a temporary
    # copy of csrc/ reuses the prelude and every object it does not change.
    common = [" ".join(flags), torch.__version__, Path(__file__).read_bytes()]
    pch_flags = list(flags)
    flags += ["-I", str(src_root / "include")]
    jobs = jobs or int(os.environ.get("MAX_JOBS", "0") or 0) or os.cpu_count() or 1
    t0 = time.perf_counter()

    # 1. rewritten copies of csrc/cuda/ (the .cu files and the headers they include with
    #    quotes, found next to the including file) and of selftest.cu
    rewritten: dict[str, str] = {}
    launches = 0
    for path in sorted(p for p in (src_root / "cuda").iterdir() if p.is_file()):
        text, n, _ = rewrite(path.read_text(), str(path))
        # a path relative to the checkout: a mutant copied elsewhere reuses unchanged objects
        rewritten[path.name] = f'#line 1 "{src_root.name}/cuda/{path.name}"\n' + text
        launches += n
    if launches == 0:
        raise RuntimeError(f"no kernel launch found under {src_root / 'cuda'}")
    selftest, _, _ = rewrite((HERE / "selftest.cu").read_text(), str(HERE / "selftest.cu"))
    selftest = '#line 1 "tests/cudasim/selftest.cu"\n' + selftest

    # 2. the precompiled prelude (PyTorch headers + emulator), shared by every variant
    pch_key = _digest(common + _tree(HERE / "include", HERE / "shadow"))
    prelude = build_root / "pch" / pch_key / "prelude.h"
    cuda_headers = {k: v for k, v in rewritten.items() if not k.endswith(".cu")}
    host_key = _digest([pch_key] + _tree(src_root / "include"))  # what every unit may include
    headers_key = _digest([host_key] + sorted(f"{k}\0{v}" for k, v in cuda_headers.items()))
    cuda_dir = build_root / "src" / headers_key
    units = {  # name -> (text, extra include dirs, key of the headers it may include)
        "hutchtrace.cpp": ((src_root / "hutchtrace.cpp").read_text(), [], host_key),
        "control.cpp": ((HERE / "control.cpp").read_text(), [], host_key),
        "selftest.cu": (selftest, [cuda_dir], headers_key),
    }
    units.update({k: (v, [cuda_dir], headers_key) for k, v in rewritten.items() if k.endswith(".cu")})
    obj_keys = {name: _digest([key, name, text]) for name, (text, _, key) in units.items()}
    lib = build_root / "lib" / _digest(sorted(obj_keys.values()) + ldflags) / f"lib{NAMESPACE}.so"
    if lib.is_file():
        return lib
    if not cuda_dir.is_dir():
        tmp = cuda_dir.with_name(cuda_dir.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        for name, text in cuda_headers.items():
            (tmp / name).write_text(text)
        tmp.rename(cuda_dir)
    if not Path(str(prelude) + ".gch").is_file():
        prelude.parent.mkdir(parents=True, exist_ok=True)
        prelude.write_text("#include <cudasim/prelude.h>\n")
        gch = Path(str(prelude) + f".gch.tmp{os.getpid()}")
        _run(["g++", *pch_flags, "-x", "c++-header", str(prelude), "-o", str(gch)], verbose)
        gch.rename(str(prelude) + ".gch")

    # 3. compile what is not cached, in parallel; link
    obj_dir = build_root / "obj"
    obj_dir.mkdir(parents=True, exist_ok=True)

    def compile_one(name: str) -> Path:
        obj = obj_dir / f"{Path(name).stem}-{obj_keys[name]}.o"
        if obj.is_file():
            return obj
        text, includes, _ = units[name]
        src = obj_dir / f"{Path(name).stem}-{obj_keys[name]}.cpp"
        src.write_text(text)
        inc = [a for d in includes for a in ("-I", str(d))]
        partial = obj.with_suffix(f".o.tmp{os.getpid()}")
        _run(["g++", *flags, *inc, "-Werror=invalid-pch", "-include", str(prelude), "-c", str(src),
              "-o", str(partial)], verbose)
        partial.rename(obj)
        return obj

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        objs = list(pool.map(compile_one, sorted(units)))
    lib.parent.mkdir(parents=True, exist_ok=True)
    partial = lib.with_suffix(f".so.tmp{os.getpid()}")
    _run(["g++", "-shared", *map(str, objs), "-o", str(partial), *ldflags], verbose)
    partial.rename(lib)
    if verbose:
        print(f"cudasim: built {lib} in {time.perf_counter() - t0:.1f} s ({jobs} jobs)", flush=True)
    return lib


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default=str(ROOT / "csrc"), help="the csrc/ tree to compile (default: this one)")
    ap.add_argument("--build-dir", default=str(DEFAULT_BUILD))
    ap.add_argument("-j", "--jobs", type=int, default=None)
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    print(build(args.src, args.build_dir, args.jobs, args.verbose))
    return 0


if __name__ == "__main__":
    sys.exit(main())
