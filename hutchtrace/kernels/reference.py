"""Pure-PyTorch reference kernels: the fallback on every device and the test oracle.

Everything the compiled extension (``hutchtrace._C``) computes is defined here first, and
the C++/CUDA kernels must reproduce these functions bit for bit (probes) or to float64
rounding (reductions). Nothing here depends on the extension.

Counter-based probes
--------------------
A probe entry is a pure function of ``(seed, probe index k, global element index i)``:

* Philox-4x32-10 (Salmon et al., SC'11; the engine of ``at::philox_engine``) with
  ``key = (seed mod 2^32, seed >> 32)`` and
  ``counter = (g mod 2^32, g >> 32, k mod 2^32, k >> 32)`` where ``g = i >> 2``.
  One call yields four 32-bit words ``u[0..3]``; element ``i`` uses lane ``i & 3``.
* Rademacher: ``z_i = +1`` if the top bit of ``u[i & 3]`` is 0, else ``-1``.
* Gaussian (Box-Muller on lane pairs (0,1) and (2,3)), in float64::

      a = (u[2j] + 1) * 2^-32            in (0, 1]
      b = u[2j+1] * 2^-32                in [0, 1)
      r = sqrt(-2 log a)
      z_{4g+2j} = r cos(2 pi b),   z_{4g+2j+1} = r sin(2 pi b)

  ``log``, ``cos`` and ``sin`` are evaluated by the fixed polynomial schemes below using
  only IEEE-754 correctly rounded operations (+, -, *, /, sqrt, frexp), never a libm
  call and never a fused multiply-add, so the same bits come out of PyTorch, C++ and
  CUDA. The float64 value is rounded to float32 and then to the parameter dtype.

Because probes are keyed by the *global* element index, a probe is the same whatever the
order of evaluation, the batching of probes, the device or the sharding of parameters.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = [
    "PHILOX_M0",
    "PHILOX_M1",
    "PHILOX_W0",
    "PHILOX_W1",
    "philox4x32_10",
    "probe_words",
    "fill_probes_",
    "probes",
    "block_dot",
    "welford_update_",
    "welford_merge_",
]

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
_MASK32 = 0xFFFFFFFF
_MASK16 = 0xFFFF

PROBE_KINDS = ("rademacher", "gaussian")

# Polynomial coefficients shared with csrc/include/hutchtrace/probe_math.h.
# log: 2*atanh(s) = 2*sum_j s^(2j+1)/(2j+1), |s| <= 0.1716, 12 terms -> < 1e-17 relative.
LOG_COEFFS = tuple(1.0 / (2 * j + 1) for j in range(12))
# sin/cos on [0, pi/4]: Taylor with 9 terms each -> < 1e-17 absolute.
SIN_COEFFS = tuple(((-1) ** n) / math.factorial(2 * n + 1) for n in range(9))
COS_COEFFS = tuple(((-1) ** n) / math.factorial(2 * n) for n in range(9))
LN2 = 0.6931471805599453
HALF_PI = 1.5707963267948966
SQRT_HALF = 0.7071067811865476
TWO_POW_M32 = 2.0**-32


def _check_seed(seed: int) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of a * m for int64 tensors holding uint32 values.

    The 64-bit product overflows int64, so ``m`` is split in 16-bit halves; every
    intermediate stays below 2^49.
    """
    p_lo = a * (m & _MASK16)
    p_hi = a * (m >> 16)
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & _MASK16) << 16) + p_lo) & _MASK32
    return hi, lo


def philox4x32_10(
    c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox-4x32-10 on int64 tensors holding uint32 counter words (broadcastable).

    Returns the four output words as int64 tensors in [0, 2^32).
    """
    _check_seed(seed)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for r in range(10):
        if r:
            k0 = (k0 + PHILOX_W0) & _MASK32
            k1 = (k1 + PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def probe_words(
    seed: int, probe: int, offset: int, numel: int, num_probes: int = 1, device=None
) -> torch.Tensor:
    """Raw Philox words for elements ``offset .. offset+numel-1`` of probes ``probe ..``.

    Returns an int64 tensor of shape ``(num_probes, numel)`` with values in [0, 2^32).
    """
    if offset < 0 or numel < 0 or probe < 0 or num_probes < 0:
        raise ValueError("offset, numel, probe and num_probes must be non-negative")
    first_group = offset >> 2
    last_group = (offset + numel + 3) >> 2
    groups = torch.arange(first_group, max(last_group, first_group + 1), dtype=torch.int64, device=device)
    ks = torch.arange(probe, probe + num_probes, dtype=torch.int64, device=device).unsqueeze(1)
    c0 = (groups & _MASK32).unsqueeze(0)
    c1 = (groups >> 32).unsqueeze(0)
    c2 = ks & _MASK32
    c3 = ks >> 32
    words = philox4x32_10(c0, c1, c2, c3, seed)
    words = torch.stack(torch.broadcast_tensors(*words), dim=-1)  # (B, G, 4)
    words = words.reshape(num_probes, -1)
    start = offset & 3
    return words[:, start : start + numel]


def _frexp(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m, e = torch.frexp(x)
    return m, e.to(torch.float64)


def _log_poly(a: torch.Tensor) -> torch.Tensor:
    """log(a) for float64 a in (0, 1], by frexp and an odd atanh series (no libm)."""
    m, e = _frexp(a)
    small = m < SQRT_HALF
    m = torch.where(small, m * 2.0, m)
    e = torch.where(small, e - 1.0, e)
    s = (m - 1.0) / (m + 1.0)
    s2 = s * s
    acc = torch.full_like(s, LOG_COEFFS[-1])
    for c in reversed(LOG_COEFFS[:-1]):
        acc = acc * s2
        acc = acc + c
    poly = (s * 2.0) * acc
    return e * LN2 + poly


def _sincos_turn(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos(2 pi b), sin(2 pi b)) for float64 b in [0, 1), without libm.

    Quadrant ``q = floor(4b)`` and fraction ``f = 4b - q`` are exact; the fraction is
    folded to ``g = min(f, 1-f)`` in [0, 1/2] so the Taylor series runs on [0, pi/4].
    """
    v = b * 4.0
    q = torch.floor(v)
    f = v - q
    upper = f >= 0.5
    g = torch.where(upper, 1.0 - f, f)
    phi = g * HALF_PI
    p2 = phi * phi
    s = torch.full_like(phi, SIN_COEFFS[-1])
    for c in reversed(SIN_COEFFS[:-1]):
        s = s * p2
        s = s + c
    s = s * phi
    c_ = torch.full_like(phi, COS_COEFFS[-1])
    for c in reversed(COS_COEFFS[:-1]):
        c_ = c_ * p2
        c_ = c_ + c
    sin_f = torch.where(upper, c_, s)
    cos_f = torch.where(upper, s, c_)
    qi = q.to(torch.int64)
    cos_t = torch.where(qi == 0, cos_f, torch.where(qi == 1, -sin_f, torch.where(qi == 2, -cos_f, sin_f)))
    sin_t = torch.where(qi == 0, sin_f, torch.where(qi == 1, cos_f, torch.where(qi == 2, -sin_f, -cos_f)))
    return cos_t, sin_t


def _sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float64 square root.

    ``torch.sqrt`` on CPU may go through MKL's ``vdSqrt``, which is not always correctly
    rounded; numpy's ``sqrt`` is the IEEE hardware instruction. CUDA's double ``sqrt`` is
    IEEE round-to-nearest.
    """
    if x.device.type == "cpu":
        import numpy as np

        return torch.from_numpy(np.sqrt(x.contiguous().numpy())).reshape(x.shape)
    return torch.sqrt(x)


def _gaussian_from_words(words4: torch.Tensor) -> torch.Tensor:
    """Box-Muller on a (..., 4) int64 tensor of Philox words -> (..., 4) float64."""
    u = words4.to(torch.float64)
    a = (u[..., 0::2] + 1.0) * TWO_POW_M32
    b = u[..., 1::2] * TWO_POW_M32
    r = _sqrt_rn(_log_poly(a) * -2.0)
    cos_t, sin_t = _sincos_turn(b)
    out = torch.stack((r * cos_t, r * sin_t), dim=-1)  # (..., 2 pairs, 2)
    return out.reshape(words4.shape)


def probes(
    seed: int,
    probe: int,
    offset: int,
    numel: int,
    *,
    num_probes: int = 1,
    kind: str = "rademacher",
    dtype: torch.dtype = torch.float32,
    device=None,
) -> torch.Tensor:
    """Probe entries for global elements ``offset .. offset+numel-1``.

    Returns shape ``(num_probes, numel)``; row ``j`` is probe index ``probe + j``.

    Example:
        >>> z = probes(7, 0, 0, 6)
        >>> bool(((z == 1) | (z == -1)).all())
        True
        >>> torch.equal(probes(7, 0, 2, 4), z[:, 2:])   # any offset gives the same entries
        True
    """
    if kind not in PROBE_KINDS:
        raise ValueError(f"probe kind must be one of {PROBE_KINDS}, got {kind!r}")
    if kind == "rademacher":
        words = probe_words(seed, probe, offset, numel, num_probes, device)
        signs = 1.0 - 2.0 * (words >> 31).to(torch.float64)
        return signs.to(dtype)
    # Gaussian lanes come in pairs, so generate whole groups of four and slice.
    first = offset & ~3
    span = ((offset + numel + 3) & ~3) - first
    words = probe_words(seed, probe, first, span, num_probes, device)
    g = _gaussian_from_words(words.reshape(num_probes, -1, 4)).reshape(num_probes, -1)
    start = offset - first
    g = g[:, start : start + numel]
    if dtype == torch.float64:
        return g.contiguous()
    return g.to(torch.float32).to(dtype)


def fill_probes_(
    out: torch.Tensor, seed: int, probe: int, offset: int, kind: str = "rademacher"
) -> torch.Tensor:
    """Fill ``out`` (shape ``(n,)`` or ``(B, n)``) with probes; row ``j`` is probe ``probe+j``."""
    if out.dim() not in (1, 2):
        raise ValueError(f"out must be 1-D or 2-D, got shape {tuple(out.shape)}")
    rows = 1 if out.dim() == 1 else out.shape[0]
    n = out.shape[-1]
    z = probes(seed, probe, offset, n, num_probes=rows, kind=kind, dtype=out.dtype, device=out.device)
    out.copy_(z.reshape(out.shape))
    return out


def block_dot(
    w: Sequence[torch.Tensor],
    z: Sequence[torch.Tensor],
    block_index: Sequence[int] | torch.Tensor,
    num_blocks: int,
    *,
    batched: bool = False,
    acc_dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block ``sum z*w`` and ``sum w*w`` over a list of tensors.

    Tensor ``j`` belongs to block ``block_index[j]``. With ``batched=True`` every tensor
    has a leading probe dimension ``B`` and the outputs have shape ``(B, num_blocks)``;
    otherwise ``(num_blocks,)``. Empty blocks give 0. Sums are taken in ``acc_dtype``.

    .. math:: t_b = \\sum_{j: \\beta(j)=b} \\langle z_j, w_j \\rangle,\\qquad
              r_b = \\sum_{j: \\beta(j)=b} \\lVert w_j \\rVert^2
    """
    if len(w) != len(z) or len(w) != len(block_index):
        raise ValueError("w, z and block_index must have the same length")
    idx = [int(b) for b in (block_index.tolist() if torch.is_tensor(block_index) else block_index)]
    lead = (w[0].shape[0],) if (batched and len(w)) else ()
    device = w[0].device if len(w) else None
    dots = torch.zeros(lead + (num_blocks,), dtype=acc_dtype, device=device)
    sq = torch.zeros_like(dots)
    for wj, zj, b in zip(w, z, idx):
        if wj.shape != zj.shape:
            raise ValueError(f"shape mismatch in block_dot: {tuple(wj.shape)} vs {tuple(zj.shape)}")
        wf = wj.reshape(lead + (-1,)).to(acc_dtype)
        zf = zj.reshape(lead + (-1,)).to(acc_dtype)
        dots[..., b] += (wf * zf).sum(-1)
        sq[..., b] += (wf * wf).sum(-1)
    return dots, sq


def welford_update_(
    count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor, x: torch.Tensor
) -> None:
    """Welford update of per-block streaming statistics, in place.

    ``count`` is an int64 scalar tensor, ``mean``/``m2`` float64 of shape ``(L,)``, ``x``
    of shape ``(L,)`` or ``(B, L)`` (rows applied in order)::

        n += 1; d = x - mean; mean += d / n; m2 += d * (x - mean)
    """
    rows = x.reshape(-1, mean.shape[-1]).to(mean.dtype)
    for row in rows:
        count += 1
        d = row - mean
        mean += d / count.to(mean.dtype)
        m2 += d * (row - mean)


def welford_merge_(
    count: torch.Tensor,
    mean: torch.Tensor,
    m2: torch.Tensor,
    count_b: torch.Tensor,
    mean_b: torch.Tensor,
    m2_b: torch.Tensor,
) -> None:
    """Chan et al. merge of state B into state A, in place::

    n = nA + nB; d = meanB - meanA; mean = meanA + d nB / n; M2 = M2A + M2B + d^2 nA nB / n
    """
    na = count.to(mean.dtype)
    nb = count_b.to(mean.dtype)
    n = na + nb
    # An empty side contributes nothing; the guard keeps 0/0 out without a host sync.
    safe_n = torch.where(n > 0, n, torch.ones_like(n))
    d = mean_b - mean
    mean += d * (nb / safe_n)
    m2 += m2_b + d * d * (na * nb / safe_n)
    count += count_b
