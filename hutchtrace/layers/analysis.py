"""Analyses of training snapshots: CCA and PCA (seed paper 003, sections 4.3, 5.2-5.7).

Input is a snapshot table such as :func:`hutchtrace.layers.snapshots.load_run` returns (one row per
snapshot). Two column groups are compared:

* group A, the *quality metrics*: ``train_loss`` and the ``scores/...`` columns;
* group B, the *parameter statistics*: numeric ``layers/...`` columns (weight / gradient /
  bias statistics, local-Hessian trace, rank, condition number, eigenvalue statistics, ...).

:func:`cca` standardises both groups (z-scores, ``ddof=0``) and fits
``sklearn.cross_decomposition.CCA`` with ``X`` = group A and ``Y`` = group B (the seed's
orientation: its Table 3 has X-weights over 5 metrics). The canonical correlations are
``corr(X c_k, Y d_k)`` of the fitted score pairs. With ``n`` snapshots, CCA is only
meaningful when ``n`` clearly exceeds ``p_A + p_B``: otherwise perfect (=1) canonical
correlations exist for any data, and a warning says so.

:func:`snapshot_pca` projects standardised snapshot features on their principal axes
(an SVD; no scikit-learn needed), as in the seed's section 5.7.

Columns that are not finite everywhere (e.g. ``condition = inf`` of a zero Hessian) or are
constant carry no information for either method and are dropped; the result lists them.

Example:
    >>> import numpy as np, pandas as pd
    >>> rng = np.random.default_rng(0)
    >>> t = rng.normal(size=200)
    >>> frame = pd.DataFrame({"scores/accuracy": t + 0.1 * rng.normal(size=200),
    ...                       "train_loss": rng.normal(size=200),
    ...                       "layers/0/weights/std": -t + 0.1 * rng.normal(size=200),
    ...                       "layers/0/hessian/trace": rng.normal(size=200)})
    >>> res = cca(frame, n_components=1)
    >>> bool(res.correlations[0] > 0.95)
    True
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np

__all__ = ["CCAResult", "PCAResult", "cca", "parameter_columns", "quality_columns", "snapshot_pca"]

_BOOKKEEPING = (
    "/numel",
    "/size",
    "/tol",
    "/K",
    "/n_peaks",
    "/eig_n_peaks",
    "/pdet_sign",
    "/sign",
    "/rank_bound",
)


def quality_columns(frame) -> list[str]:
    """Group A: ``train_loss`` and every ``scores/...`` column present."""
    return [c for c in frame.columns if c == "train_loss" or str(c).startswith("scores/")]


def parameter_columns(frame) -> list[str]:
    """Group B: numeric ``layers/...`` statistics (bookkeeping such as sizes and flags left out)."""
    out = []
    for c in frame.columns:
        c = str(c)
        if not c.startswith("layers/") or c.endswith(_BOOKKEEPING):
            continue
        kind = frame[c].dtype.kind
        if kind in "fiu":  # not bool flags, not strings
            out.append(c)
    return out


def _clean(frame, cols, what: str):
    import pandas as pd

    if not cols:
        raise ValueError(f"no {what} columns selected; pass them explicitly")
    missing = [c for c in cols if c not in frame.columns]
    if missing:
        raise KeyError(f"{what} columns not in the frame: {missing[:5]}")
    data = frame[cols].apply(pd.to_numeric, errors="coerce").astype(float)
    data = data.replace([np.inf, -np.inf], np.nan)
    dropped = [c for c in cols if data[c].isna().any() or not data[c].std(ddof=0) > 0]
    kept = [c for c in cols if c not in dropped]
    if not kept:
        raise ValueError(
            f"every {what} column is constant or non-finite ({dropped[:5]}...); nothing to analyse"
        )
    return data[kept], dropped


def _standardize(a: np.ndarray) -> np.ndarray:
    return (a - a.mean(0)) / a.std(0)


@dataclass
class CCAResult:
    """Canonical correlation analysis of quality metrics (X) vs parameter statistics (Y).

    Attributes:
        correlations: ``(k,)`` canonical correlations ``corr(x_scores[:, j], y_scores[:, j])``.
        x_columns, y_columns: the columns used; dropped: the constant / non-finite ones left out.
        x_weights, y_weights: ``DataFrame`` of canonical weights (rows: columns, cols: ``cc1..``).
        x_loadings, y_loadings: ``DataFrame`` of loadings (correlations of each standardised
            column with its group's canonical scores).
        x_scores, y_scores: ``(n, k)`` canonical scores; n_samples: snapshots used.
    """

    correlations: np.ndarray
    x_columns: list[str]
    y_columns: list[str]
    x_weights: object
    y_weights: object
    x_loadings: object
    y_loadings: object
    x_scores: np.ndarray
    y_scores: np.ndarray
    n_samples: int
    dropped: list[str] = field(default_factory=list)

    def stats(self) -> dict[str, float]:
        """max / mean / median / min / std of the canonical correlations (the seed's Table 1 rows)."""
        r = self.correlations
        return {
            "max": float(r.max()),
            "avg": float(r.mean()),
            "median": float(np.median(r)),
            "min": float(r.min()),
            "std": float(r.std()),
        }


def cca(frame, quality=None, params=None, *, n_components: int = 2, max_iter: int = 500) -> CCAResult:
    """CCA between the quality-metric group and the parameter-statistic group (standardised).

    Args:
        frame: a snapshot table (``load_run``), or several concatenated.
        quality: group A columns (default :func:`quality_columns`).
        params: group B columns (default :func:`parameter_columns`).
        n_components: canonical pairs (at most ``min(n, p_A, p_B)``; clipped with a warning).
        max_iter: passed to ``sklearn.cross_decomposition.CCA``.

    Raises:
        ImportError: scikit-learn missing. ValueError: nothing left to analyse.
    """
    try:
        from sklearn.cross_decomposition import CCA
    except ImportError as e:  # pragma: no cover
        raise ImportError("cca needs scikit-learn: pip install scikit-learn") from e
    import pandas as pd

    X, dx = _clean(frame, list(quality) if quality is not None else quality_columns(frame), "quality")
    Y, dy = _clean(frame, list(params) if params is not None else parameter_columns(frame), "parameter")
    n = len(frame)
    k = min(n_components, X.shape[1], Y.shape[1], n - 1)
    if k < 1:
        raise ValueError(f"CCA needs at least 2 snapshots and one column per group (have n={n})")
    if k < n_components:
        warnings.warn(
            f"n_components reduced from {n_components} to {k} (min of snapshots - 1 and group sizes)",
            RuntimeWarning,
            stacklevel=2,
        )
    if n <= X.shape[1] + Y.shape[1]:
        warnings.warn(
            f"only {n} snapshots for {X.shape[1]} + {Y.shape[1]} columns: canonical correlations of 1 "
            "exist for any data in this regime, so they carry no evidence; select fewer columns or "
            "record more snapshots",
            RuntimeWarning,
            stacklevel=2,
        )
    Xs, Ys = _standardize(X.to_numpy()), _standardize(Y.to_numpy())
    model = CCA(n_components=k, scale=False, max_iter=max_iter)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Maximum number of iterations.*")
        model.fit(Xs, Ys)
    xs, ys = model.transform(Xs, Ys)
    corr = np.array([_corr(xs[:, j], ys[:, j]) for j in range(k)])
    names = [f"cc{j + 1}" for j in range(k)]

    def loadings(Z, S):
        return np.array([[_corr(Z[:, i], S[:, j]) for j in range(k)] for i in range(Z.shape[1])])

    return CCAResult(
        correlations=corr,
        x_columns=list(X.columns),
        y_columns=list(Y.columns),
        x_weights=pd.DataFrame(model.x_weights_, index=X.columns, columns=names),
        y_weights=pd.DataFrame(model.y_weights_, index=Y.columns, columns=names),
        x_loadings=pd.DataFrame(loadings(Xs, xs), index=X.columns, columns=names),
        y_loadings=pd.DataFrame(loadings(Ys, ys), index=Y.columns, columns=names),
        x_scores=xs,
        y_scores=ys,
        n_samples=n,
        dropped=dx + dy,
    )


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    sa, sb = a.std(), b.std()
    if sa == 0 or sb == 0:
        return math.nan
    return float(((a - a.mean()) * (b - b.mean())).mean() / (sa * sb))


@dataclass
class PCAResult:
    """Principal components of standardised snapshot features.

    Attributes:
        scores: ``DataFrame`` ``(n, k)`` of projections (``pc1..``), indexed like the input.
        components: ``DataFrame`` ``(k, p)``: unit principal axes over ``columns``.
        explained_variance_ratio: ``(k,)`` share of the total variance per component.
        columns: the features used; dropped: constant / non-finite ones left out.
    """

    scores: object
    components: object
    explained_variance_ratio: np.ndarray
    columns: list[str]
    dropped: list[str] = field(default_factory=list)


def snapshot_pca(frame, columns=None, *, n_components: int = 2, standardize: bool = True) -> PCAResult:
    """PCA of snapshots: ``Xs = U S V^T`` (SVD of the centred, optionally z-scored features).

    Scores are ``U S`` (= ``Xs V``), axes the rows of ``V^T`` with each axis' sign fixed so
    its largest-magnitude entry is positive; the explained variance ratio is
    ``S_j^2 / sum S^2``. ``columns`` default: :func:`parameter_columns`.
    """
    import pandas as pd

    cols = list(columns) if columns is not None else parameter_columns(frame)
    X, dropped = _clean(frame, cols, "feature")
    A = X.to_numpy()
    A = _standardize(A) if standardize else A - A.mean(0)
    k = min(n_components, A.shape[0], A.shape[1])
    U, S, Vt = np.linalg.svd(A, full_matrices=False)
    sign = np.sign(Vt[np.arange(len(Vt)), np.abs(Vt).argmax(1)])
    sign[sign == 0] = 1
    Vt = Vt * sign[:, None]
    U = U * sign[None, :]
    names = [f"pc{j + 1}" for j in range(k)]
    total = float((S**2).sum())
    return PCAResult(
        scores=pd.DataFrame(U[:, :k] * S[:k], index=frame.index, columns=names),
        components=pd.DataFrame(Vt[:k], index=names, columns=X.columns),
        explained_variance_ratio=(S[:k] ** 2) / total if total > 0 else np.zeros(k),
        columns=list(X.columns),
        dropped=dropped,
    )
