"""Which GPUs a build of the CUDA kernels runs on: chosen by setup.py, checked at run time.

A CUDA binary carries SASS (machine code) for some architectures and PTX (a virtual ISA the
driver compiles when the program loads) for others. The rules (CUDA C Programming Guide,
"Binary Compatibility" and "PTX Compatibility"):

* SASS ``sm_XY`` runs on compute capability ``X.Z`` for ``Z >= Y`` (same major only);
  arch-specific SASS (``sm_90a``) runs on exactly that capability;
* PTX ``compute_XY`` runs on any capability ``>= X.Y`` (JIT-compiled by the driver); PTX of
  an arch-specific target does not carry forward.

This module has no dependencies (setup.py loads it by path, before hutchtrace is importable).

Example:
    >>> kernel_image((8, 6), ["sm_80", "sm_90"], ["compute_90"])
    (True, 'sm_80 machine code')
    >>> kernel_image((8, 0), ["sm_90"], ["compute_90"])[0]   # an A100 and an H100-only build
    False
"""

from __future__ import annotations

import re

#: Architectures of a build that sees no GPU (a wheel): the GPUs people run PyTorch on.
#: 7.5 T4 / RTX 20xx; 8.0 A100 / A30; 8.6 A10 / A40 / RTX 30xx (also runs on 8.7); 8.9 L4 /
#: L40 / RTX 40xx; 9.0 H100 / H200; 10.0 B200 / GB200 (also 10.3); 12.0 RTX 50xx / RTX PRO
#: (also 12.1). SASS for each the toolkit supports, plus PTX of the newest, which the driver
#: compiles for GPUs newer than all of them. (sm_86 code would run on 8.9; it gets its own.)
WHEEL_ARCHS = ("7.5", "8.0", "8.6", "8.9", "9.0", "10.0", "12.0")


def default_arch_list(supported) -> str:
    """The ``TORCH_CUDA_ARCH_LIST`` of a GPU-less build: :data:`WHEEL_ARCHS` that the
    toolkit supports (``supported``: a set like ``{"8.0", "9.0"}``; ``None``: all), with
    ``+PTX`` on the newest.

    >>> default_arch_list({"7.5", "8.0", "8.6", "8.9", "9.0", "10.0", "12.0", "12.1"})
    '7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX'
    >>> default_arch_list({"8.0", "8.6", "8.9", "9.0"})   # an older toolkit
    '8.0;8.6;8.9;9.0+PTX'
    """
    keep = [a for a in WHEEL_ARCHS if supported is None or a in supported]
    if not keep:
        raise RuntimeError(
            f"none of the default CUDA architectures {WHEEL_ARCHS} is supported by this toolkit; "
            "set TORCH_CUDA_ARCH_LIST"
        )
    return ";".join(keep[:-1] + [keep[-1] + "+PTX"])


def _num(target: str) -> int:
    return int(re.sub(r"\D", "", target))


def arch_images(gencode_flags) -> tuple[list[str], list[str]]:
    """(SASS targets, PTX targets) of nvcc ``-gencode`` flags.

    >>> arch_images(["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_120,code=compute_120"])
    (['sm_80'], ['compute_120'])
    """
    sass, ptx = set(), set()
    for flag in gencode_flags:
        m = re.search(r"code=(sm|compute)_(\d+[a-z]?)", flag)
        if m:
            (sass if m.group(1) == "sm" else ptx).add(f"{m.group(1)}_{m.group(2)}")
    return sorted(sass, key=_num), sorted(ptx, key=_num)


def images_from_arch_list(arch_list: str) -> tuple[list[str], list[str]]:
    """(SASS, PTX) targets of a ``TORCH_CUDA_ARCH_LIST`` string such as ``"8.0;9.0+PTX"``.

    >>> images_from_arch_list("8.0;8.6 9.0a;12.0+PTX")
    (['sm_80', 'sm_86', 'sm_90a', 'sm_120'], ['compute_120'])
    """
    sass, ptx = [], []
    for entry in re.split(r"[;\s]+", arch_list.strip()):
        m = re.fullmatch(r"(\d+)\.(\d+)([a-z]?)(\+PTX)?", entry)
        if not m:
            continue
        num = f"{m.group(1)}{m.group(2)}{m.group(3)}"
        sass.append(f"sm_{num}")
        if m.group(4):
            ptx.append(f"compute_{num}")
    return sass, ptx


def kernel_image(capability, sass, ptx) -> tuple[bool, str]:
    """Whether a binary with these images runs on a GPU of ``capability`` ``(major, minor)``,
    and which image it uses (or why none fits).

    >>> kernel_image((8, 9), ["sm_80", "sm_86", "sm_90"], ["compute_90"])
    (True, 'sm_86 machine code')
    >>> kernel_image((13, 0), ["sm_90"], ["compute_120"])
    (True, 'compute_120 PTX, compiled by the driver at load time')
    """
    major, minor = int(capability[0]), int(capability[1])
    best = None
    for t in sass:
        m = re.fullmatch(r"sm_(\d+?)(\d)([a-z]?)", t)
        if not m:
            continue
        t_major, t_minor, suffix = int(m.group(1)), int(m.group(2)), m.group(3)
        fits = (t_major, t_minor) == (major, minor) if suffix else (t_major == major and t_minor <= minor)
        if fits and (best is None or _num(t) > _num(best)):
            best = t
    if best is not None:
        return True, f"{best} machine code"
    cc = major * 10 + minor
    usable = [t for t in ptx if not t[-1].isalpha() and _num(t) <= cc]
    if usable:
        return True, f"{max(usable, key=_num)} PTX, compiled by the driver at load time"
    have = ", ".join(list(sass) + [f"{t} (PTX)" for t in ptx]) or "none"
    return False, f"no kernel image for sm_{cc} (compute capability {major}.{minor}); the build has {have}"
