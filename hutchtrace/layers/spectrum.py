"""Spectral summaries of local Hessians, weights and gradients (docs/maths.md section 7; seed Appendix A).

:func:`spectrum_summary` takes a symmetric matrix, its eigenvalues or an
:class:`EigenvalueSource` (a :class:`~hutchtrace.layers.local_hessian.LocalHessian`, whose
unit blocks are diagonalised separately) and returns (docs/maths.md section 7):

.. code-block:: text

    lambda = eigvalsh(M), ascending              (the union of unit blocks for a block-diagonal LH)
    trace  = sum lambda
    tol    = max|lambda| * P * eps(dtype)        (default; ``tol=`` overrides)
    rank   = #{ |lambda| > tol }
    det:       rank < P -> sign = 0, log|det| = -inf     (singular: reported as such)
               else        sign = prod sign(lambda), log|det| = sum log|lambda|
    pseudo-det: sign = prod_{|lambda|>tol} sign(lambda), log|pdet| = sum_{|lambda|>tol} log|lambda|
    cond   = max|lambda| / min_{|lambda|>tol} |lambda|   (on the non-zero spectrum; inf when rank 0)

``torch.linalg.slogdet`` is never used: on an exactly singular LH it returns rounding noise
(e.g. sign -1, log|det| = -905, a finite value where the truth is -inf). ``LH_i`` is singular
whenever the batch is smaller than the fan-in plus one (rank <= m min(N, n+1)); its
determinant is then 0 and the pseudo-determinant is what carries information, labelled as
such by :attr:`SpectrumSummary.det_kind`.

Both summaries also carry the seed's distribution statistics of the values (Appendix A):
mean, std (population, ``ddof=0``), min, max, a histogram (``numpy.histogram``), the Welch
power spectral density of the value sequence (``scipy.signal.welch`` with a Hann window of
256 and overlap 128, the seed's section 5.3; shortened to the sequence length when it is
shorter) and its top peaks (``scipy.signal.find_peaks`` on the PSD, highest first). The
sequence is the ascending eigenvalues for a spectrum and the row-major flattening for a
weight or gradient tensor (:func:`vector_summary`).

Example:
    >>> import numpy as np
    >>> s = spectrum_summary(np.diag([3.0, -2.0, 0.0]))
    >>> s.rank, s.singular, s.det_kind, s.pdet_sign, round(s.log_pdet, 6), s.condition
    (2, True, 'pseudo-determinant', -1, 1.791759, 1.5)
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..core.errors import NonFiniteWarning

__all__ = ["EigenvalueSource", "SpectrumSummary", "VectorSummary", "spectrum_summary", "vector_summary"]

WELCH_NPERSEG = 256
WELCH_NOVERLAP = 128
WINDOW = "hann"


class EigenvalueSource(ABC):
    """A symmetric ``P x P`` matrix that computes its own eigenvalues (e.g. from a block-diagonal form).

    :func:`spectrum_summary` takes such an object as it is, without forming the matrix: it
    reads :meth:`eigenvalues` (a tensor; ``eps`` is that tensor's dtype's) and ``P`` from
    :attr:`numel`. :class:`~hutchtrace.layers.local_hessian.LocalHessian` is one; the
    interface lives here so that the summaries need not know the types built on them.
    """

    numel: int  # P, the matrix's size

    @abstractmethod
    def eigenvalues(self):
        """All ``P`` eigenvalues, ascending, as a torch tensor."""


@dataclass
class VectorSummary:
    """Distribution and Welch statistics of a sequence of values (seed Appendix A).

    Attributes:
        numel, mean, std (ddof=0), min, max, norm (Euclidean): of all values.
        finite: False when some value is NaN/Inf (then the statistics are NaN, never a mean
            of the finite part, and histogram / Welch / peaks are empty).
        hist_counts, hist_edges: ``numpy.histogram(values, bins)``.
        welch_freqs, welch_psd: ``scipy.signal.welch`` (``fs = 1``).
        nperseg, noverlap, window: the Welch parameters actually used.
        peak_freqs, peak_heights: the ``top_peaks`` highest local maxima of the PSD
            (``scipy.signal.find_peaks``), highest first.
    """

    numel: int
    mean: float
    std: float
    min: float
    max: float
    norm: float
    finite: bool
    hist_counts: np.ndarray
    hist_edges: np.ndarray
    welch_freqs: np.ndarray
    welch_psd: np.ndarray
    nperseg: int
    noverlap: int
    window: str
    peak_freqs: np.ndarray
    peak_heights: np.ndarray

    @property
    def psd_max(self) -> float:
        return float(self.welch_psd.max()) if self.welch_psd.size else math.nan

    @property
    def psd_mean(self) -> float:
        return float(self.welch_psd.mean()) if self.welch_psd.size else math.nan

    def scalars(self) -> dict[str, Any]:
        """Flat scalar fields (JSON-ready): the statistics, PSD max/mean and the top peak."""
        return {
            "numel": self.numel,
            "mean": self.mean,
            "std": self.std,
            "min": self.min,
            "max": self.max,
            "norm": self.norm,
            "finite": self.finite,
            "psd_max": self.psd_max,
            "psd_mean": self.psd_mean,
            "n_peaks": int(self.peak_freqs.size),
            "peak_freq": float(self.peak_freqs[0]) if self.peak_freqs.size else math.nan,
            "peak_height": float(self.peak_heights[0]) if self.peak_heights.size else math.nan,
        }

    def arrays(self) -> dict[str, np.ndarray]:
        """The array fields: histogram, Welch PSD and peaks."""
        return {
            "hist_counts": self.hist_counts,
            "hist_edges": self.hist_edges,
            "welch_freqs": self.welch_freqs,
            "welch_psd": self.welch_psd,
            "peak_freqs": self.peak_freqs,
            "peak_heights": self.peak_heights,
        }


@dataclass
class SpectrumSummary:
    """Eigen-statistics of a symmetric matrix (docs/maths.md section 7) plus :class:`VectorSummary` of its spectrum.

    Attributes:
        eigenvalues: ascending float64 array; size: ``P``.
        trace: ``sum lambda``; tol: the rank tolerance used; eps: machine epsilon of the
            input dtype; rank: ``#{|lambda| > tol}``; singular: ``rank < P``.
        sign, logabsdet: of the determinant (``0, -inf`` when singular).
        pdet_sign, log_pdet: of the pseudo-determinant over the non-zero spectrum
            (equal to ``sign, logabsdet`` when non-singular; ``0, -inf`` when rank is 0).
        condition: ``max|lambda| / min_{|lambda|>tol}|lambda|`` (inf when rank is 0).
        stats: :class:`VectorSummary` of the ascending eigenvalues (mean, std, histogram,
            Welch PSD, peaks); also reachable as ``summary.mean`` etc.
    """

    eigenvalues: np.ndarray
    size: int
    trace: float
    tol: float
    eps: float
    rank: int
    singular: bool
    sign: int
    logabsdet: float
    pdet_sign: int
    log_pdet: float
    condition: float
    stats: VectorSummary = field(repr=False)

    @property
    def det_kind(self) -> str:
        """``"determinant"``, or ``"pseudo-determinant"`` when the matrix is numerically singular."""
        return "pseudo-determinant" if self.singular else "determinant"

    def __getattr__(self, name: str):
        # mean, std, min, max, hist_counts, welch_psd, peak_freqs, ... of the eigenvalues
        if name != "stats" and "stats" in self.__dict__ and hasattr(self.__dict__["stats"], name):
            return getattr(self.__dict__["stats"], name)
        raise AttributeError(name)

    def scalars(self) -> dict[str, Any]:
        """Flat scalar fields (JSON-ready); eigenvalue statistics are prefixed ``eig_``."""
        out = {
            "size": self.size,
            "trace": self.trace,
            "tol": self.tol,
            "rank": self.rank,
            "singular": self.singular,
            "det_kind": self.det_kind,
            "sign": self.sign,
            "logabsdet": self.logabsdet,
            "pdet_sign": self.pdet_sign,
            "log_pdet": self.log_pdet,
            "condition": self.condition,
        }
        out.update({f"eig_{k}": v for k, v in self.stats.scalars().items() if k != "numel"})
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        """``eigenvalues`` plus the histogram / Welch / peak arrays of the spectrum."""
        return {"eigenvalues": self.eigenvalues, **self.stats.arrays()}

    def __str__(self) -> str:
        det = (
            f"det: sign {self.sign:+d}, log|det| {self.logabsdet:.6g}"
            if not self.singular
            else f"singular (rank {self.rank} < {self.size}): det = 0; pseudo-determinant over the "
            f"{self.rank} non-zero eigenvalues: sign {self.pdet_sign:+d}, log|pdet| {self.log_pdet:.6g}"
        )
        return (
            f"spectrum of size {self.size}: trace {self.trace:.6g}, rank {self.rank} (tol {self.tol:.3g}), "
            f"cond {self.condition:.4g} on the non-zero spectrum; {det}; eigenvalues in "
            f"[{self.stats.min:.4g}, {self.stats.max:.4g}], mean {self.stats.mean:.4g}, "
            f"std {self.stats.std:.4g}"
        )


def _to_numpy(x) -> tuple[np.ndarray, Any]:
    """``(array, torch tensor or None)`` without copying more than needed."""
    try:
        import torch

        if isinstance(x, torch.Tensor):
            return None, x
    except ImportError:  # pragma: no cover
        pass
    arr = np.asarray(x)
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise TypeError(f"expected real numbers (a tensor, an array or a list), got dtype {arr.dtype}")
    return arr, None


def _check_welch(nperseg, noverlap, window) -> None:
    if isinstance(nperseg, bool) or not isinstance(nperseg, int) or nperseg < 1:
        raise ValueError(f"welch_nperseg must be a positive int, got {nperseg!r}")
    if isinstance(noverlap, bool) or not isinstance(noverlap, int) or not 0 <= noverlap < nperseg:
        raise ValueError(f"welch_noverlap must be an int in [0, welch_nperseg), got {noverlap!r}")


def vector_summary(
    values,
    *,
    bins=50,
    welch_nperseg: int = WELCH_NPERSEG,
    welch_noverlap: int = WELCH_NOVERLAP,
    window: str = WINDOW,
    top_peaks: int = 5,
) -> VectorSummary:
    """Mean, std, min, max, norm, histogram, Welch PSD and top PSD peaks of ``values``.

    ``values`` (a tensor, an array or a list; any shape) is flattened row-major and treated
    as a signal with ``fs = 1``. When it is shorter than ``welch_nperseg``, the segment is
    the whole sequence and the overlap ``min(welch_noverlap, n // 2)`` (recorded in the
    result), so short sequences need no special casing.

    Example:
        >>> v = vector_summary(np.arange(6.0))
        >>> v.mean, v.max, v.nperseg
        (2.5, 5.0, 6)
    """
    from scipy.signal import find_peaks, welch

    _check_welch(welch_nperseg, welch_noverlap, window)
    if isinstance(top_peaks, bool) or not isinstance(top_peaks, int) or top_peaks < 0:
        raise ValueError(f"top_peaks must be a non-negative int, got {top_peaks!r}")
    arr, t = _to_numpy(values)
    if t is not None:
        arr = t.detach().to("cpu").double().numpy()
    x = np.asarray(arr, dtype=np.float64).reshape(-1)
    n = int(x.size)
    if n == 0:
        raise ValueError("cannot summarise an empty sequence of values")
    nperseg = min(welch_nperseg, n)
    noverlap = min(welch_noverlap, nperseg // 2) if nperseg < welch_nperseg else welch_noverlap
    empty = np.zeros(0)
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).sum())
        warnings.warn(
            f"{bad} of {n} values are NaN/Inf; their statistics are reported as NaN (finite=False), "
            "not computed from the finite part",
            NonFiniteWarning,
            stacklevel=2,
        )
        nan = math.nan
        return VectorSummary(
            n,
            nan,
            nan,
            nan,
            nan,
            nan,
            False,
            empty.astype(np.int64),
            empty,
            empty,
            empty,
            nperseg,
            noverlap,
            window,
            empty,
            empty,
        )
    counts, edges = np.histogram(x, bins=bins)
    freqs, psd = welch(x, nperseg=nperseg, noverlap=noverlap, window=window)
    if psd.size >= 3 and top_peaks:
        idx, _ = find_peaks(psd)
        idx = idx[np.argsort(psd[idx], kind="stable")[::-1][:top_peaks]]
    else:
        idx = np.zeros(0, dtype=np.int64)
    return VectorSummary(
        numel=n,
        mean=float(x.mean()),
        std=float(x.std()),
        min=float(x.min()),
        max=float(x.max()),
        norm=float(np.linalg.norm(x)),
        finite=True,
        hist_counts=counts,
        hist_edges=edges,
        welch_freqs=freqs,
        welch_psd=psd,
        nperseg=nperseg,
        noverlap=noverlap,
        window=window,
        peak_freqs=freqs[idx],
        peak_heights=psd[idx],
    )


def _eigenvalues(obj) -> tuple[np.ndarray, int, float]:
    """``(ascending float64 eigenvalues, P, eps of the input dtype)``."""
    if isinstance(obj, EigenvalueSource):
        ev = obj.eigenvalues()
        import torch

        return ev.detach().cpu().double().numpy(), obj.numel, float(torch.finfo(ev.dtype).eps)
    arr, t = _to_numpy(obj)
    if t is not None:
        import torch

        eps = float(torch.finfo(t.dtype).eps) if t.is_floating_point() else float(np.finfo(np.float64).eps)
        if t.dim() == 2:
            _check_square(t.shape)
            _check_symmetric(
                float((t - t.T).abs().max()) if t.numel() else 0.0,
                float(t.abs().max()) if t.numel() else 0.0,
                eps,
            )
            m = t if t.is_floating_point() else t.double()
            if not bool(torch.isfinite(m).all()):
                raise ValueError("the matrix has NaN/Inf entries; its spectrum is undefined")
            ev = torch.linalg.eigvalsh(m).detach().cpu().double().numpy()
            return np.sort(ev), int(t.shape[0]), eps
        if t.dim() != 1:
            raise ValueError(
                f"expected a square matrix or a 1-D array of eigenvalues, got shape {tuple(t.shape)}"
            )
        return np.sort(t.detach().cpu().double().numpy()), int(t.numel()), eps
    eps = (
        float(np.finfo(arr.dtype).eps)
        if np.issubdtype(arr.dtype, np.floating)
        else float(np.finfo(float).eps)
    )
    if arr.ndim == 2:
        _check_square(arr.shape)
        _check_symmetric(
            float(np.abs(arr - arr.T).max()) if arr.size else 0.0,
            float(np.abs(arr).max()) if arr.size else 0.0,
            eps,
        )
        if not np.isfinite(arr).all():
            raise ValueError("the matrix has NaN/Inf entries; its spectrum is undefined")
        return np.sort(np.linalg.eigvalsh(arr).astype(np.float64)), int(arr.shape[0]), eps
    if arr.ndim != 1:
        raise ValueError(f"expected a square matrix or a 1-D array of eigenvalues, got shape {arr.shape}")
    return np.sort(arr.astype(np.float64)), int(arr.size), eps


def _check_square(shape) -> None:
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(f"expected a square matrix, got shape {tuple(shape)}")


def _check_symmetric(asym: float, scale: float, eps: float) -> None:
    # rounding in autograd Hessians leaves O(eps) asymmetry; sqrt(eps) flags a real one
    if asym > math.sqrt(eps) * max(scale, np.finfo(np.float64).tiny):
        raise ValueError(
            f"the matrix is not symmetric (max|M - M^T| = {asym:.3g} vs max|M| = {scale:.3g}); a Hessian is "
            "symmetric: pass (M + M.T) / 2 if the asymmetry is rounding, or the eigenvalues directly"
        )


def spectrum_summary(
    matrix_or_eigenvalues,
    *,
    tol: float | None = None,
    bins=50,
    welch_nperseg: int = WELCH_NPERSEG,
    welch_noverlap: int = WELCH_NOVERLAP,
    window: str = WINDOW,
    top_peaks: int = 5,
) -> SpectrumSummary:
    """Eigen-statistics of a symmetric matrix (see the module docs for every formula).

    Args:
        matrix_or_eigenvalues: a symmetric ``(P, P)`` tensor/array, a 1-D array of its
            eigenvalues, or an :class:`EigenvalueSource` such as a
            :class:`~hutchtrace.layers.local_hessian.LocalHessian` (its unit blocks are
            diagonalised separately when block-diagonal).
        tol: rank tolerance; default ``max|lambda| * P * eps`` with ``eps`` of the input dtype
            (``float64`` for lists).
        bins, welch_nperseg, welch_noverlap, window, top_peaks: as in :func:`vector_summary`.

    Raises:
        ValueError: a non-square or non-symmetric matrix, NaN/Inf entries, an empty input,
            a negative ``tol``.

    Example:
        >>> s = spectrum_summary([2.0, 0.5, 1e-20])
        >>> s.rank, s.singular, s.sign, s.log_pdet, s.condition
        (2, True, 0, 0.0, 4.0)
    """
    ev, P, eps = _eigenvalues(matrix_or_eigenvalues)
    if ev.size == 0:
        raise ValueError("cannot summarise an empty spectrum")
    if not np.isfinite(ev).all():
        raise ValueError(
            "some eigenvalues are NaN/Inf; the spectrum is undefined (check the matrix for overflow)"
        )
    amax = float(np.abs(ev).max())
    if tol is None:
        tol = amax * P * eps
    elif not (isinstance(tol, (int, float)) and not isinstance(tol, bool)) or tol < 0 or math.isnan(tol):
        raise ValueError(f"tol must be a non-negative number or None, got {tol!r}")
    tol = float(tol)
    nz = ev[np.abs(ev) > tol]
    rank = int(nz.size)
    singular = rank < P
    if rank:
        pdet_sign = int(np.prod(np.sign(nz)))
        log_pdet = float(np.log(np.abs(nz)).sum())
        condition = amax / float(np.abs(nz).min())
    else:
        pdet_sign, log_pdet, condition = 0, -math.inf, math.inf
    sign, logabsdet = (0, -math.inf) if singular else (pdet_sign, log_pdet)
    stats = vector_summary(
        ev,
        bins=bins,
        welch_nperseg=welch_nperseg,
        welch_noverlap=welch_noverlap,
        window=window,
        top_peaks=top_peaks,
    )
    return SpectrumSummary(
        eigenvalues=ev,
        size=P,
        trace=float(ev.sum()),
        tol=tol,
        eps=eps,
        rank=rank,
        singular=singular,
        sign=sign,
        logabsdet=logabsdet,
        pdet_sign=pdet_sign,
        log_pdet=log_pdet,
        condition=condition,
        stats=stats,
    )
