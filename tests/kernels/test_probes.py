"""Counter-based probes: compiled CPU / CUDA kernels vs the reference, bit for bit.

Three oracles are used:
* ``hutchtrace.kernels.reference`` (the documented contract, run by PyTorch);
* a pure-Python transcription below (Python ints for Philox, Python floats -- IEEE-754
  doubles, one rounding per operation, no FMA -- for the Gaussian transform);
* the compiled CPU kernel, once it is shown equal to both, for the CUDA kernel.
"""

from __future__ import annotations

import math
import pathlib
import random
import re

import pytest
import torch
from cuda_backends import cuda_kernels  # noqa: F401  (fixture)

from hutchtrace.kernels import ops, reference

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
KINDS = ["rademacher", "gaussian"]
ROOT = pathlib.Path(__file__).resolve().parents[2]

SEEDS = [0, 1, 12345, 2**31 - 1, 2**32 - 1, 2**32, 2**40 + 5, 2**63 - 1]
PROBES = [0, 1, 7, 2**31, 2**32 - 1, 2**32 + 3, 2**50 + 11]
# 2**34 - 130: a 32-group Philox tile of the CPU kernel straddles the 32-bit counter wrap (g = 2**32)
OFFSETS = [0, 1, 2, 3, 5, 6, 1023, 2**32 - 2, 2**32 + 1, 2**34 - 130, 2**35 + 6, 2**40 + 3]
SIZES = [0, 1, 2, 3, 4, 5, 7, 8, 13, 64, 255, 1000, 4097]


# --------------------------------------------------------------------- pure-Python oracle
M32 = 0xFFFFFFFF


def py_philox(c0, c1, c2, c3, k0, k1):
    for r in range(10):
        if r:
            k0 = (k0 + reference.PHILOX_W0) & M32
            k1 = (k1 + reference.PHILOX_W1) & M32
        p0 = reference.PHILOX_M0 * c0
        p1 = reference.PHILOX_M1 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & M32, p1 & M32, ((p0 >> 32) ^ c3 ^ k1) & M32, p0 & M32
    return c0, c1, c2, c3


def py_group_words(seed, k, g):
    return py_philox(g & M32, g >> 32, k & M32, k >> 32, seed & M32, seed >> 32)


def py_log(a):
    m, e = math.frexp(a)
    e = float(e)
    if m < reference.SQRT_HALF:
        m = m * 2.0
        e = e - 1.0
    s = (m - 1.0) / (m + 1.0)
    s2 = s * s
    acc = reference.LOG_COEFFS[-1]
    for c in reversed(reference.LOG_COEFFS[:-1]):
        acc = acc * s2
        acc = acc + c
    return e * reference.LN2 + (s * 2.0) * acc


def py_sincos_turn(b):
    v = b * 4.0
    q = math.floor(v)
    f = v - q
    upper = f >= 0.5
    g = 1.0 - f if upper else f
    phi = g * reference.HALF_PI
    p2 = phi * phi
    s = reference.SIN_COEFFS[-1]
    for c in reversed(reference.SIN_COEFFS[:-1]):
        s = s * p2
        s = s + c
    s = s * phi
    co = reference.COS_COEFFS[-1]
    for c in reversed(reference.COS_COEFFS[:-1]):
        co = co * p2
        co = co + c
    sin_f, cos_f = (co, s) if upper else (s, co)
    return [(cos_f, sin_f), (-sin_f, cos_f), (-cos_f, -sin_f), (sin_f, -cos_f)][int(q)]


def py_values4(words, kind):
    if kind == "rademacher":
        return [-1.0 if w >> 31 else 1.0 for w in words]
    out = []
    for j in range(2):
        a = (words[2 * j] + 1.0) * reference.TWO_POW_M32
        b = words[2 * j + 1] * reference.TWO_POW_M32
        r = math.sqrt(py_log(a) * -2.0)  # math.sqrt is the correctly rounded IEEE sqrt
        c, s = py_sincos_turn(b)
        out += [r * c, r * s]
    return out


def py_probes(seed, probe, offset, numel, num_probes, kind, dtype):
    rows = []
    for r in range(num_probes):
        row = []
        for i in range(offset, offset + numel):
            row.append(py_values4(py_group_words(seed, probe + r, i >> 2), kind)[i & 3])
        rows.append(row)
    t = torch.tensor(rows, dtype=torch.float64).reshape(num_probes, numel)
    return t if dtype == torch.float64 else t.to(torch.float32).to(dtype)


# ----------------------------------------------------------------------------- helpers
def reference_probes(seed, probe, offset, numel, num_probes, kind, dtype, device="cpu"):
    return reference.probes(
        seed, probe, offset, numel, num_probes=num_probes, kind=kind, dtype=dtype, device=device
    )


def compiled(out, seed, probe, offset, kind):
    op = torch.ops.hutchtrace.rademacher_ if kind == "rademacher" else torch.ops.hutchtrace.gaussian_
    op(out, seed, probe, offset)
    return out


def cases(n_random, seed=0):
    """Edge cases (each seed, probe, offset and size at least once) plus random combinations."""
    rng = random.Random(seed)
    out = []
    for i in range(max(len(SEEDS), len(PROBES), len(OFFSETS), len(SIZES))):
        out.append(
            (
                SEEDS[i % len(SEEDS)],
                PROBES[i % len(PROBES)],
                OFFSETS[i % len(OFFSETS)],
                SIZES[i % len(SIZES)],
                1 + i % 3,
            )
        )
    for _ in range(n_random):
        out.append(
            (
                rng.choice(SEEDS),
                rng.choice(PROBES),
                rng.choice(OFFSETS),
                rng.choice(SIZES),
                rng.choice([1, 1, 2, 5]),
            )
        )
    return out


# ------------------------------------------------------------------ always-run checks
def test_header_constants_match_reference():
    """The hex literals in the shared headers are the reference's constants, bit for bit."""
    text = (ROOT / "csrc/include/hutchtrace/probe_math.h").read_text()

    def block(name):
        body = re.search(rf"#define {name}\s*\\?\s*\{{(.*?)\}}", text, re.S).group(1)
        return tuple(float.fromhex(v) for v in re.findall(r"-?0x[0-9a-f.]+p[+-]\d+", body))

    assert block("HT_LOG_COEFFS") == reference.LOG_COEFFS
    assert block("HT_SIN_COEFFS") == reference.SIN_COEFFS
    assert block("HT_COS_COEFFS") == reference.COS_COEFFS
    for name, value in [
        ("kLn2", reference.LN2),
        ("kHalfPi", reference.HALF_PI),
        ("kSqrtHalf", reference.SQRT_HALF),
        ("kTwoPowM32", reference.TWO_POW_M32),
    ]:
        lit = re.search(rf"{name} = (-?0x[0-9a-f.]+p[+-]\d+)", text).group(1)
        assert float.fromhex(lit) == value, name
    philox = (ROOT / "csrc/include/hutchtrace/philox.h").read_text()
    for name in ["M0", "M1", "W0", "W1"]:
        lit = re.search(rf"kPhilox{name} = (0x[0-9A-F]+)u", philox).group(1)
        assert int(lit, 16) == getattr(reference, f"PHILOX_{name}"), name


def test_python_oracle_matches_known_philox_vector():
    # Random123's published known-answer test for philox4x32-10 (counter and key all ones).
    assert py_philox(M32, M32, M32, M32, M32, M32) == (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)
    assert py_philox(0, 0, 0, 0, 0, 0) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)


@pytest.mark.parametrize("kind", KINDS)
def test_reference_matches_python_oracle(kind):
    """The reference itself against the transcription (float64, no extension needed)."""
    for seed, probe, offset, numel, rows in cases(6)[:18]:
        got = reference.probes(seed, probe, offset, numel, num_probes=rows, kind=kind, dtype=torch.float64)
        want = py_probes(seed, probe, offset, numel, rows, kind, torch.float64)
        assert torch.equal(got, want), (seed, probe, offset, numel, rows)


# ----------------------------------------------------------------- compiled CPU kernel
@pytest.mark.needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_cpu_kernel_equals_reference(kind, dtype):
    for seed, probe, offset, numel, rows in cases(40):
        out = torch.full((rows, numel), 7.0, dtype=dtype)  # 7 catches unwritten entries
        compiled(out, seed, probe, offset, kind)
        want = reference_probes(seed, probe, offset, numel, rows, kind, dtype)
        assert torch.equal(out, want), (seed, probe, offset, numel, rows)


@pytest.mark.needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("offset", [0, 3, 2**34 - 130, 2**34 + 2])
def test_cpu_kernel_tiles_equal_reference(kind, dtype, offset):
    """Rows long enough for the 32-group Philox tiles, with ragged heads and tails, a tile
    across the 32-bit counter wrap, and probe indices across a 32-bit boundary."""
    for numel, rows, probe in [(128, 1, 0), (129, 2, 2**32 - 1), (4096 + 7, 3, 5)]:
        out = torch.full((rows, numel), 7.0, dtype=dtype)
        compiled(out, 99, probe, offset, kind)
        assert torch.equal(out, reference_probes(99, probe, offset, numel, rows, kind, dtype)), (numel, rows)


@pytest.mark.needs_ext
@pytest.mark.parametrize("kind", KINDS)
def test_cpu_kernel_equals_python_oracle(kind):
    for seed, probe, offset, numel, rows in cases(10, seed=1):
        numel = min(numel, 300)
        out = torch.empty((rows, numel), dtype=torch.float64)
        compiled(out, seed, probe, offset, kind)
        assert torch.equal(out, py_probes(seed, probe, offset, numel, rows, kind, torch.float64))


@pytest.mark.needs_ext
@pytest.mark.parametrize("kind", KINDS)
def test_cpu_kernel_one_dimensional_and_large(kind):
    n = 200_003
    out = torch.empty(n, dtype=torch.float32)
    compiled(out, 99, 3, 2**33 + 1, kind)
    assert torch.equal(out, reference_probes(99, 3, 2**33 + 1, n, 1, kind, torch.float32)[0])


@pytest.mark.needs_ext
@pytest.mark.parametrize("kind", KINDS)
def test_offsets_and_batches_are_consistent(kind):
    """Any split of the element range, and any batching of probe rows, gives the same entries."""
    full = torch.empty(4, 101, dtype=torch.float64)
    compiled(full, 5, 10, 3, kind)
    for start in [0, 1, 2, 3, 4, 50, 97]:
        part = torch.empty(2, 101 - start, dtype=torch.float64)
        compiled(part, 5, 11, 3 + start, kind)
        assert torch.equal(part, full[1:3, start:])
    row = torch.empty(101, dtype=torch.float64)
    compiled(row, 5, 13, 3, kind)
    assert torch.equal(row, full[3])


@pytest.mark.needs_ext
@pytest.mark.parametrize("kind", KINDS)
def test_ops_wrapper_dispatches_and_handles_strided_out(kind):
    assert ops.backend_name("cpu") == "compiled-cpu"
    base = torch.zeros(3, 40, dtype=torch.float32)
    view = base[:, ::2]  # not contiguous
    ops.fill_probes_(view, 7, 2, 9, kind)
    assert torch.equal(view, reference_probes(7, 2, 9, 20, 3, kind, torch.float32))
    assert torch.equal(base[:, 1::2], torch.zeros(3, 20))
    z = ops.probes(7, 2, 9, 20, num_probes=3, kind=kind, dtype=torch.float32)
    assert torch.equal(z, view)


@pytest.mark.needs_ext
def test_compiled_op_rejects_bad_arguments():
    out = torch.empty(8)
    with pytest.raises(ValueError):
        torch.ops.hutchtrace.rademacher_(out, -1, 0, 0)
    with pytest.raises(ValueError):
        torch.ops.hutchtrace.gaussian_(out, 0, -1, 0)
    with pytest.raises(ValueError):
        torch.ops.hutchtrace.rademacher_(out, 0, 0, -4)
    with pytest.raises(ValueError):
        torch.ops.hutchtrace.rademacher_(torch.empty(2, 3, 4), 0, 0, 0)
    with pytest.raises(ValueError):
        torch.ops.hutchtrace.rademacher_(torch.empty(4, 2).t(), 0, 0, 0)
    with pytest.raises(TypeError):
        torch.ops.hutchtrace.rademacher_(torch.empty(4, dtype=torch.int32), 0, 0, 0)


def test_wrapper_rejects_bad_arguments():
    out = torch.empty(8)
    for bad in [dict(seed=-1), dict(seed=2**63), dict(probe=-1), dict(offset=-1), dict(kind="uniform")]:
        args = dict(seed=1, probe=0, offset=0, kind="rademacher") | bad
        with pytest.raises(ValueError):
            ops.fill_probes_(out, args["seed"], args["probe"], args["offset"], args["kind"])


def test_probe_distribution_is_sane():
    """Cheap statistical sanity on whichever path is active (exact equality is tested above)."""
    n = 1 << 18
    z = ops.probes(2024, 0, 0, n, kind="rademacher", dtype=torch.float64)
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    g = ops.probes(2024, 0, 0, n, kind="gaussian", dtype=torch.float64)
    assert abs(g.mean().item()) < 5 / math.sqrt(n)
    assert abs(g.var().item() - 1.0) < 5 * math.sqrt(2 / n)
    assert abs(((g**4).mean() - 3.0).item()) < 0.1


# ---------------------------------------------------------------------------- CUDA
# `cuda_kernels`: a real GPU, or the same .cu sources run by the cudasim emulator under
# several schedules (tests/cuda_backends.py).
@pytest.mark.needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_kernel_equals_cpu_kernel_and_reference(cuda_kernels, kind, dtype):
    K = cuda_kernels
    for seed, probe, offset, numel, rows in cases(40):
        dev = torch.full((rows, numel), 7.0, dtype=dtype, device=K.device)  # 7 catches unwritten entries
        K.fill_probes(dev, seed, probe, offset, kind)
        cpu = torch.empty((rows, numel), dtype=dtype)
        compiled(cpu, seed, probe, offset, kind)
        assert torch.equal(dev.cpu(), cpu), (seed, probe, offset, numel, rows)
        ref = reference_probes(seed, probe, offset, numel, rows, kind, dtype, device=K.device)
        assert torch.equal(dev, ref), (seed, probe, offset, numel, rows)


@pytest.mark.needs_ext
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_kernel_large_unaligned(cuda_kernels, kind):
    """3 million elements per row, an unaligned offset beyond 2^32, probe indices across a
    32-bit boundary: a grid-stride loop over many groups per thread (emulated with one SM:
    8 blocks of 256 threads for 1.5 million groups)."""
    K = cuda_kernels
    n = 3_000_001
    dev = torch.empty(2, n, dtype=torch.float32, device=K.device)
    K.clear_launches()
    K.fill_probes(dev, 2**40 + 1, 2**32 + 1, 2**33 + 3, kind)
    cpu = torch.empty(2, n, dtype=torch.float32)
    compiled(cpu, 2**40 + 1, 2**32 + 1, 2**33 + 3, kind)
    assert torch.equal(dev.cpu(), cpu)
    if K.emulated:
        (launch,) = K.launches()
        off = 2**33 + 3
        work = 2 * (((off + n - 1) >> 2) - (off >> 2) + 1)  # rows x Philox groups
        assert launch["grid"][0] == min(8 * K.schedule.sm_count, -(-work // 256))
    else:
        assert ops.backend_name("cuda") == "compiled-cuda"
