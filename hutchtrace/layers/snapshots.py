"""Training snapshots of the layer-wise Hessian study (seed paper 003, section 4.2 and Appendix A).

:class:`SnapshotRecorder` records, at chosen training steps and for each layer:

* ``weights``, ``bias``, ``gradient``, ``bias_gradient`` (the arrays) and their statistics
  (:func:`~hutchtrace.layers.spectrum.vector_summary`: mean, std, min, max, norm, histogram, Welch
  PSD, top peaks), plus the numerical rank of the weight matrix;
* the local Hessian ``LH_i`` (:func:`~hutchtrace.layers.local_hessian.local_hessian`,
  docs/maths.md section 7) when it fits ``local_hessian_budget``: its eigenvalues and their
  statistics, trace, rank, condition number, determinant / pseudo-determinant
  (:func:`~hutchtrace.layers.spectrum.spectrum_summary`);
* when it does not fit: Hutchinson estimates of ``tr LH_i`` per parameter tensor, with
  standard errors, from :func:`hutchtrace.block_traces` applied to the closure
  ``model -> phi(A_i(layer(z_i)))`` (the same object, so the trace series is continuous
  across the size threshold; the exact eigen statistics are then absent);
* the model metrics: accuracy, precision, recall, F1 (macro averages) and ROC AUC
  (one-vs-rest for several classes) for ``task="classification"``; R^2, MAE, RMSE for
  ``"regression"`` (``sklearn.metrics``, an optional dependency), and the train loss.

Appendix A field -> where it is stored (``<l>`` is the layer name; ``load_run`` columns are
the index fields flattened with ``/``, arrays come from ``load_arrays``):

.. code-block:: text

    iteration                         step
    weights / bias / gradient / bias_gradient   arrays  layers/<l>/weights, .../bias, .../gradient, ...
    *_spectral (mean, std, min, max)  columns layers/<l>/weights/mean, ..., .../psd_max, .../peak_freq
      histogram, welch, top_peaks     arrays  layers/<l>/weights_hist_counts, ..._welch_psd, ..._peak_freqs
    hessian                           arrays  layers/<l>/hessian_blocks or .../hessian (store_hessian=True)
    hessian_eigens                    arrays  layers/<l>/hessian_eigens
    hessian_eigens_spectral           columns layers/<l>/hessian/eig_mean, eig_std, ..., eig_psd_max
    hessian_rank, hessian_condition   columns layers/<l>/hessian/rank, .../condition (+ trace, det, ...)
    scores, train_loss                columns scores/accuracy, ..., train_loss

Everything is evaluated in eval mode on the ``inputs`` given to :meth:`record` (a fixed
evaluation batch makes snapshots comparable: ``LH_i`` depends on the batch, and its rank is
at most ``m min(N, n+1)``); the model's state, modes, gradients and RNG are left as they were.

Storage: a run directory written so that a killed process loses at most the snapshot in
flight (``run.json``, an fsynced append-only ``index.jsonl``, one atomically written ``.npz``
per snapshot), read back by :func:`~hutchtrace.layers.snapshot_store.load_run` and
:func:`~hutchtrace.layers.snapshot_store.load_arrays`; see :mod:`hutchtrace.layers.snapshot_store`.

Example:
    >>> import tempfile, torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    >>> rec = SnapshotRecorder(tempfile.mkdtemp(), net, task="classification")
    >>> loss = torch.nn.functional.cross_entropy(net(x), y); loss.backward()
    >>> rec.record(0, x, y, train_loss=loss.item())["layers"]["0"]["hessian"]["rank"]   # 8 * min(32, 4 + 1)
    40
    >>> frame = hutchtrace.load_run(rec.run_dir)           # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.errors import MemoryBudgetError
from ..core.state import PreservedState
from ..estimate.estimator import block_traces
from ..problem.blocks import unwrap_model
from ..problem.loss import call_model
from .local_hessian.activation import resolve_activation
from .local_hessian.capture import capture_forward, layer_and_name, trainable_parameters
from .local_hessian.compute import local_hessian_at
from .local_hessian.errors import DegenerateLocalHessianWarning
from .local_hessian.prepare import apply_phi, phi_label
from .snapshot_store import (
    INDEX,
    META,
    append_line,
    count_lines,
    jsonable,
    read_meta,
    repair_tail,
    write_arrays_atomic,
    write_json_atomic,
)
from .spectrum import spectrum_summary, vector_summary

__all__ = ["SnapshotRecorder"]

TASKS = ("classification", "regression", None)
_FIELD = {"weight": ("weights", "gradient"), "bias": ("bias", "bias_gradient")}


def _require_sklearn():
    try:
        import sklearn.metrics as skm
    except ImportError as e:  # pragma: no cover - exercised only without scikit-learn
        raise ImportError(
            "the model metrics of SnapshotRecorder (accuracy/precision/recall/F1/AUC, R^2/MAE/RMSE) need "
            "scikit-learn: pip install scikit-learn (or pass task=None to record no metrics)"
        ) from e
    return skm


def _matrix_rank(w: torch.Tensor) -> int:
    """Numerical rank of a weight reshaped to ``(out, -1)``: ``#{s > max(s) max(shape) eps}``."""
    m = w.detach().reshape(w.shape[0], -1).double().cpu()
    s = torch.linalg.svdvals(m)
    if s.numel() == 0 or float(s.max()) == 0.0:
        return 0
    tol = float(s.max()) * max(m.shape) * torch.finfo(torch.float64).eps
    return int((s > tol).sum())


def _resolve_layers(model: nn.Module, layers, activations):
    """``(names, modules by name, activations by name)`` of the recorded layers, validated."""
    if layers is None:
        layers = [
            n for n, m in model.named_modules() if any(p.requires_grad for p in m.parameters(recurse=False))
        ]
        if not layers:
            raise ValueError("the model has no module with trainable parameters to record")
    resolved = [layer_and_name(model, layer) for layer in layers]
    activations = dict(activations or {})
    unknown = set(activations) - {n for _, n in resolved}
    if unknown:
        raise ValueError(f"activations names layers that are not recorded: {sorted(unknown)}")
    names: list[str] = []
    mods: dict[str, nn.Module] = {}
    acts = {}
    for mod, name in resolved:
        trainable_parameters(mod, name)
        names.append(name)
        mods[name] = mod
        acts[name] = resolve_activation(activations.get(name, "auto"), model, name)
        if acts[name].kind == "nondiff":
            raise ValueError(
                f"layer {name!r}: activation {acts[name].name!r} is non-differentiable; "
                "its local Hessian is undefined. Pass a differentiable one in activations="
            )
    return names, mods, acts


class SnapshotRecorder:
    """Record the seed's Appendix-A snapshot of chosen layers at chosen training steps.

    Args:
        run_dir: the run directory (created; an existing run is resumed: new snapshots are
            appended after a torn last line, if any, is truncated).
        model: the model being trained.
        layers: layer names or modules; default: every module that directly owns a trainable
            parameter, in ``named_modules`` order.
        task: ``"classification"`` (outputs are logits: ``(N, C)`` with softmax, or ``(N,)`` /
            ``(N, 1)`` binary with sigmoid), ``"regression"`` or ``None`` (no metrics).
        activations: ``{layer name: activation}`` overrides of the ``activation="auto"`` rule
            of :func:`~hutchtrace.layers.local_hessian.local_hessian`.
        phi: the aggregation of ``S_i`` (``"sum"``, the seed's).
        local_hessian_budget: bytes for one exact local Hessian (blocks for the closed form,
            ``p_i^2`` entries otherwise, in ``hessian_dtype``); larger layers get trace estimates.
        K: probes per trace estimate for layers over the budget.
        seed: base probe seed (the estimate at step ``s`` uses ``seed + s``).
        every, steps: the schedule of :meth:`maybe_record` (every ``every`` steps, or exactly
            the steps in ``steps``).
        store_weights: save the weight / bias / gradient arrays (default True).
        store_hessian: also save the local Hessian itself (unit blocks or dense); eigenvalues
            are always saved. Off by default: ``p_i^2`` numbers per snapshot.
        hessian_dtype: dtype of the local-Hessian computation (float64 for clean spectra).
        criterion: ``criterion(outputs, targets)`` computing the train loss when
            :meth:`record` gets no ``train_loss``.
        bins, welch_nperseg, welch_noverlap, window, top_peaks: passed to the summaries.
    """

    def __init__(
        self,
        run_dir,
        model: nn.Module,
        layers: Iterable | None = None,
        *,
        task: str | None = "classification",
        activations: dict | None = None,
        phi="sum",
        local_hessian_budget: int = 128 << 20,
        K: int = 16,
        seed: int = 0,
        every: int = 1,
        steps: Iterable[int] | None = None,
        store_weights: bool = True,
        store_hessian: bool = False,
        hessian_dtype: torch.dtype = torch.float64,
        criterion=None,
        bins=50,
        welch_nperseg: int = 256,
        welch_noverlap: int = 128,
        window: str = "hann",
        top_peaks: int = 5,
    ):
        if task not in TASKS:
            raise ValueError(f"task must be 'classification', 'regression' or None, got {task!r}")
        if task is not None:
            _require_sklearn()
        if isinstance(K, bool) or not isinstance(K, int) or K < 2:
            raise ValueError(f"K must be an int >= 2 (standard errors need two probes), got {K!r}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        if not isinstance(local_hessian_budget, int) or local_hessian_budget <= 0:
            raise ValueError(
                f"local_hessian_budget must be a positive number of bytes, got {local_hessian_budget!r}"
            )
        self.model = unwrap_model(model)
        self.layers, self._mods, self._acts = _resolve_layers(self.model, layers, activations)
        self.phi = phi
        self._phi_name = phi_label(phi)
        self.task = task
        self.budget = local_hessian_budget
        self.K = K
        self.seed = seed
        self.every = every
        self.steps = None if steps is None else {int(s) for s in steps}
        self.store_weights = store_weights
        self.store_hessian = store_hessian
        self.hessian_dtype = hessian_dtype
        self.criterion = criterion
        self._summ = {
            "bins": bins,
            "welch_nperseg": welch_nperseg,
            "welch_noverlap": welch_noverlap,
            "window": window,
            "top_peaks": top_peaks,
        }
        self.run_dir = os.fspath(run_dir)
        self._open_run()

    def _open_run(self) -> None:
        """Create or resume the run directory: repair a torn index tail, write or check ``run.json``."""
        os.makedirs(self.run_dir, exist_ok=True)
        self.index_path = os.path.join(self.run_dir, INDEX)
        removed = repair_tail(self.index_path)
        if removed:
            warnings.warn(
                f"{self.index_path}: truncated a torn last line ({removed} bytes) left by an interrupted "
                "run; that snapshot was lost",
                RuntimeWarning,
                stacklevel=3,
            )
        self._seq = count_lines(self.index_path)
        meta = {
            "layers": self.layers,
            "task": self.task,
            "phi": self._phi_name,
            "activations": {n: a.name for n, a in self._acts.items()},
            "local_hessian_budget": self.budget,
            "K": self.K,
            "seed": self.seed,
            "hessian_dtype": str(self.hessian_dtype),
            "summary": self._summ,
            "model": type(self.model).__name__,
            "num_parameters": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
        }
        old = read_meta(self.run_dir)
        if old is None:
            write_json_atomic(os.path.join(self.run_dir, META), meta)
        elif old.get("layers") != self.layers:
            raise ValueError(
                f"{self.run_dir} holds a run recording layers {old.get('layers')}, not "
                f"{self.layers}; use a new run directory"
            )

    # ---------------------------------------------------------------------------------------

    def due(self, step: int) -> bool:
        """Whether :meth:`maybe_record` records at ``step``."""
        return step in self.steps if self.steps is not None else step % self.every == 0

    def maybe_record(self, step: int, inputs, targets=None, **kwargs) -> dict | None:
        """:meth:`record` when :meth:`due` (``step`` is scheduled), else ``None``."""
        return self.record(step, inputs, targets, **kwargs) if self.due(step) else None

    def record(
        self,
        step: int,
        inputs,
        targets=None,
        *,
        train_loss: float | None = None,
        metrics_data=None,
        extra: dict | None = None,
    ) -> dict:
        """Record one snapshot at ``step`` and return its index record.

        Call it after ``loss.backward()`` and before ``optimizer.zero_grad()`` so the
        gradients are the step's. ``inputs`` are the block inputs' source for the local
        Hessians; the metrics use ``(inputs, targets)`` unless ``metrics_data=(x, y)`` (e.g. a
        held-out set) is given; ``train_loss`` defaults to ``criterion(model(inputs), targets)``
        when a criterion was given. ``extra`` holds user scalars stored as ``extra/...``.
        """
        t0 = time.time()
        model = self.model
        arrays: dict[str, np.ndarray] = {}
        record: dict[str, Any] = {"step": int(step), "time": t0}
        with PreservedState(model):
            model.eval()
            caps, output = capture_forward(model, inputs, [self._mods[n] for n in self.layers])
            if train_loss is None and self.criterion is not None and targets is not None:
                with torch.no_grad():
                    train_loss = float(self.criterion(output, targets))
            record["train_loss"] = float(train_loss) if train_loss is not None else math.nan
            if self.task is not None and metrics_data is not None:
                mx, my = metrics_data
                with torch.no_grad():
                    record["scores"] = _scores(self.task, call_model(model, mx), my)
            elif self.task is not None and targets is not None:
                record["scores"] = _scores(self.task, output, targets)
            layers = {}
            for name in self.layers:
                layers[name] = self._layer(step, name, caps[name], arrays)
        record["layers"] = layers
        if extra:
            record["extra"] = dict(extra)
        record["seconds"] = time.time() - t0
        fname = f"snap_{int(step):08d}_{self._seq:05d}.npz"
        record["file"] = fname
        write_arrays_atomic(os.path.join(self.run_dir, fname), arrays)
        append_line(self.index_path, json.dumps(jsonable(record)))
        self._seq += 1
        return record

    # ---------------------------------------------------------------------------------------

    def _layer(self, step: int, name: str, cap, arrays: dict) -> dict:
        mod = self._mods[name]
        out: dict[str, Any] = {}
        for pname, p in mod.named_parameters(recurse=False):
            field, gfield = _FIELD.get(pname, (pname, pname + "_gradient"))
            for key, t in ((field, p), (gfield, p.grad)):
                if t is None:
                    out[key] = None
                    continue
                s = vector_summary(t, **self._summ)
                stats = s.scalars()
                if pname == "weight" and key == field and t.dim() >= 2:
                    stats["rank"] = _matrix_rank(t)
                out[key] = stats
                for k, v in s.arrays().items():
                    arrays[f"layers/{name}/{key}_{k}"] = v
                if self.store_weights:
                    arrays[f"layers/{name}/{key}"] = t.detach().cpu().numpy()
        out["hessian"] = self._hessian(step, name, mod, cap, arrays)
        return out

    def _hessian(self, step, name, mod, cap, arrays) -> dict:
        act = self._acts[name]
        args, kwargs = cap
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DegenerateLocalHessianWarning)
            try:
                lh = local_hessian_at(
                    mod,
                    name,
                    args,
                    kwargs,
                    self.phi,
                    self._phi_name,
                    act,
                    "auto",
                    self.budget,
                    None,
                    self.hessian_dtype,
                    False,
                )
            except MemoryBudgetError as e:
                return self._estimate(step, name, mod, act, args, kwargs, str(e))
        for w in caught:
            if not issubclass(w.category, DegenerateLocalHessianWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        degenerate = any(issubclass(w.category, DegenerateLocalHessianWarning) for w in caught)
        info: dict[str, Any] = {
            "status": "exact",
            "method": lh.method,
            "activation": lh.activation,
            "numel": lh.numel,
            "degenerate": degenerate,
            "finite": lh.finite,
        }
        if lh.rank_bound is not None:
            info["rank_bound"] = lh.rank_bound
        if not lh.finite:
            return info
        s = spectrum_summary(lh, **self._summ)
        info.update(s.scalars())
        for k, v in s.arrays().items():
            arrays[
                f"layers/{name}/hessian_{k}" if k != "eigenvalues" else f"layers/{name}/hessian_eigens"
            ] = v
        if self.store_hessian:
            if lh.blocks is not None:
                arrays[f"layers/{name}/hessian_blocks"] = lh.blocks.cpu().numpy()
                arrays[f"layers/{name}/hessian_unit_coords"] = lh.unit_coords.cpu().numpy()
            else:
                arrays[f"layers/{name}/hessian"] = lh.matrix.cpu().numpy()
        return info

    def _estimate(self, step, name, mod, act, args, kwargs, why: str) -> dict:
        phi = self.phi

        def S(model):
            return apply_phi(phi, act(model.get_submodule(name)(*args, **kwargs)))

        params = [(pn, p) for pn, p in mod.named_parameters(recurse=False) if p.requires_grad]
        blocks = {pn: [p] for pn, p in params}
        res = block_traces(
            self.model,
            S,
            K=self.K,
            blocks=blocks,
            seed=(self.seed + int(step)) % (2**63),
            hvp="reverse",
            progress=False,
        )
        info: dict[str, Any] = {
            "status": "estimated",
            "activation": act.name,
            "numel": sum(p.numel() for _, p in params),
            "K": self.K,
            "reason": why.split(".")[0],
            "trace": res.total.mean,
            "trace_se": res.total.se,
            "finite": res.total.finite,
        }
        for b in res.blocks:
            info[f"trace_{b.name}"] = b.mean
            info[f"trace_{b.name}_se"] = b.se
        return info


def _scores(task: str, output, targets) -> dict[str, float]:
    """Model metrics from an eval-mode output (see the class docs)."""
    skm = _require_sklearn()
    out = output.detach().double().cpu()
    y = targets.detach().cpu().numpy() if torch.is_tensor(targets) else np.asarray(targets)
    if task == "regression":
        pred = out.numpy().reshape(y.shape) if out.numel() == y.size else out.numpy()
        mse = skm.mean_squared_error(y, pred)
        return {
            "r2": float(skm.r2_score(y, pred)),
            "mae": float(skm.mean_absolute_error(y, pred)),
            "rmse": float(math.sqrt(mse)),
        }
    y = y.reshape(-1).astype(np.int64)
    if out.dim() == 1 or (out.dim() == 2 and out.shape[1] == 1):
        p1 = torch.sigmoid(out.reshape(-1)).numpy()
        pred = (p1 > 0.5).astype(np.int64)
        prob, labels = p1, [0, 1]
    else:
        prob_t = torch.softmax(out.reshape(-1, out.shape[-1]), -1)
        prob = prob_t.numpy()
        pred = prob.argmax(1)
        labels = list(range(prob.shape[1]))
        if prob.shape[1] == 2:
            prob = prob[:, 1]
    scores = {
        "accuracy": float(skm.accuracy_score(y, pred)),
        "precision": float(skm.precision_score(y, pred, labels=labels, average="macro", zero_division=0)),
        "recall": float(skm.recall_score(y, pred, labels=labels, average="macro", zero_division=0)),
        "f1": float(skm.f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
    }
    try:
        if np.ndim(prob) == 1:
            scores["auc"] = float(skm.roc_auc_score(y, prob))
        else:
            scores["auc"] = float(skm.roc_auc_score(y, prob, multi_class="ovr", labels=labels))
    except ValueError:  # a class absent from this batch: AUC undefined
        scores["auc"] = math.nan
    return scores
