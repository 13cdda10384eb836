"""Which GPUs the compiled CUDA kernels run on, and the fallback on all others.

No GPU is needed: the device's compute capability and the build record are mocked.
"""

from __future__ import annotations

import shutil
import subprocess
import warnings

import pytest
import torch

from hutchtrace import info
from hutchtrace.kernels import cuda_arch, loader, ops

WHEEL = cuda_arch.images_from_arch_list("7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX")
OLD_DEFAULT = cuda_arch.images_from_arch_list("9.0+PTX")  # before: H100/H200 only

# (compute capability, GPU) -> image expected from the wheel's list
GPUS = [
    ((7, 5), "T4", "sm_75"),
    ((8, 0), "A100", "sm_80"),
    ((8, 6), "A10 / RTX 3090", "sm_86"),
    ((8, 7), "Jetson Orin", "sm_86"),
    ((8, 9), "L4 / RTX 4090", "sm_89"),
    ((9, 0), "H100", "sm_90"),
    ((10, 0), "B200", "sm_100"),
    ((10, 3), "B300", "sm_100"),
    ((12, 0), "RTX 5090", "sm_120"),
    ((12, 1), "DGX Spark", "sm_120"),
    ((13, 0), "a future GPU", "compute_120"),
]


@pytest.mark.parametrize("capability,gpu,image", GPUS, ids=[g[1] for g in GPUS])
def test_the_wheel_has_an_image_for_every_common_gpu(capability, gpu, image):
    ok, why = cuda_arch.kernel_image(capability, *WHEEL)
    assert ok and why.startswith(image), (gpu, why)


def test_what_the_old_default_missed():
    """A build for 9.0+PTX (the old GPU-less default) has no image for an A100, an A10, an
    L4 or a T4: every op failed there with "no kernel image"."""
    for capability in [(7, 5), (8, 0), (8, 6), (8, 9)]:
        ok, why = cuda_arch.kernel_image(capability, *OLD_DEFAULT)
        assert not ok and f"sm_{capability[0]}{capability[1]}" in why and "sm_90" in why
    assert cuda_arch.kernel_image((9, 0), *OLD_DEFAULT)[0]
    ok, why = cuda_arch.kernel_image((12, 0), *OLD_DEFAULT)
    assert ok and why == "compute_90 PTX, compiled by the driver at load time"


def test_binary_compatibility_rules():
    kernel_image = cuda_arch.kernel_image
    assert kernel_image((8, 6), ["sm_89"], [])[0] is False  # SASS never runs on a lower minor
    assert kernel_image((9, 0), ["sm_86"], [])[0] is False  # nor across majors
    assert kernel_image((8, 0), [], ["compute_86"])[0] is False  # PTX only forward
    assert kernel_image((9, 0), ["sm_90a"], [])[0] is True  # arch-specific: that capability only
    assert kernel_image((10, 0), ["sm_90a"], ["compute_90a"])[0] is False
    assert kernel_image((8, 9), ["sm_80", "sm_86"], []) == (True, "sm_86 machine code")  # newest that fits


def test_arch_list_parsing():
    sass, ptx = cuda_arch.images_from_arch_list("8.0;8.6+PTX 9.0a")
    assert sass == ["sm_80", "sm_86", "sm_90a"] and ptx == ["compute_86"]
    flags = [
        "-gencode=arch=compute_75,code=sm_75",
        "-gencode=arch=compute_120,code=sm_120",
        "-gencode=arch=compute_120,code=compute_120",
        "-gencode=arch=compute_89,code=sm_89",
    ]
    assert cuda_arch.arch_images(flags) == (["sm_75", "sm_89", "sm_120"], ["compute_120"])


def test_default_arch_list_follows_the_toolkit():
    nvcc13 = {"7.5", "8.0", "8.6", "8.7", "8.8", "8.9", "9.0", "10.0", "11.0", "10.3", "12.0", "12.1"}
    assert cuda_arch.default_arch_list(nvcc13) == "7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX"
    cuda12 = {"8.0", "8.6", "8.9", "9.0"}  # CUDA 12.0 to 12.7
    assert cuda_arch.default_arch_list(cuda12) == "8.0;8.6;8.9;9.0+PTX"
    with pytest.raises(RuntimeError, match="TORCH_CUDA_ARCH_LIST"):
        cuda_arch.default_arch_list({"5.0"})


def test_default_arch_list_of_the_installed_nvcc():
    """The list setup.py picks when no GPU is visible covers sm_80, 86, 89 and 90 here."""
    nvcc = shutil.which("nvcc", path="/usr/local/cuda/bin")
    if nvcc is None:
        pytest.skip("no CUDA toolkit in /usr/local/cuda")
    out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True).stdout
    supported = {f"{n[:-1]}.{n[-1]}" for n in __import__("re").findall(r"compute_(\d+)", out)}
    sass, ptx = cuda_arch.images_from_arch_list(cuda_arch.default_arch_list(supported))
    assert {"sm_80", "sm_86", "sm_89", "sm_90"} <= set(sass) and len(ptx) == 1


@pytest.fixture
def fake_gpu(monkeypatch):
    """A visible GPU of a chosen capability, an extension with CUDA kernels for 9.0+PTX."""
    state = {"capability": (8, 0), "name": "NVIDIA A100-SXM4-80GB"}
    monkeypatch.setattr(loader, "HAS_EXT", True)
    monkeypatch.setattr(loader, "cuda_compiled", lambda: True)
    monkeypatch.setattr(loader, "build_info", lambda: {"arch_list": "9.0+PTX", "cuda_sass": ["sm_90"],
                                                     "cuda_ptx": ["compute_90"], "cuda_compiled": True})
    monkeypatch.setattr(loader, "_HAS_KERNEL", {})
    monkeypatch.setattr(loader, "_WARNED", set())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: state["capability"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: state["name"])
    return state


def test_no_kernel_image_falls_back_with_one_warning(fake_gpu):
    with pytest.warns(RuntimeWarning, match=r"cannot run on cuda:0 \(NVIDIA A100.*no kernel image for sm_80"):
        assert not loader.has_kernel(torch.device("cuda", 0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # decided once per device: no second warning
        assert not loader.has_kernel(torch.device("cuda"))
        assert ops.backend_name("cuda:0") == "fallback"
    assert loader.has_kernel("cpu")


def test_a_matching_gpu_uses_the_compiled_kernels(fake_gpu):
    fake_gpu.update(capability=(9, 0), name="NVIDIA H100 80GB HBM3")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert loader.has_kernel(torch.device("cuda", 0))
    assert ops.backend_name("cuda") == "compiled-cuda"


def test_info_reports_the_fallback_and_the_images(fake_gpu, capsys):
    d = info.info_dict()
    assert d["backends"]["cuda"] == "fallback"
    assert "no kernel image for sm_80" in d["cuda_fallback_reason"]
    assert (d["cuda_sass"], d["cuda_ptx"], d["cuda_arch_list"]) == (["sm_90"], ["compute_90"], "9.0+PTX")
    assert d["cuda_device_kernels"][0]["compiled_kernels"] is False
    info.main([])
    out = capsys.readouterr().out
    assert "CUDA kernels          : fallback" in out and "sm_90, compute_90 (PTX)" in out
    assert "CUDA fallback because : cuda:0: no kernel image for sm_80" in out


def test_info_says_how_the_cuda_kernels_were_verified(capsys):
    v = info.CUDA_VERIFICATION
    assert v["method"] in ("emulated", "hardware") and len(v["date"]) == 10
    line = info.cuda_verification_line()
    if v["hardware"] is None:
        assert line == f"emulated (cudasim) on {v['date']}; never run on hardware"
    assert info.info_dict()["cuda_verification"] == v
    info.main([])
    assert f"CUDA kernels verified : {line}" in capsys.readouterr().out
