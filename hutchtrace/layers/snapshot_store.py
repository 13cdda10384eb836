"""The on-disk layout of a snapshot run: crash-safe writers and the readers (seed Appendix A).

A run directory, safe against a killed process:

.. code-block:: text

    run_dir/run.json                    written once (atomically): layers, task, settings
    run_dir/index.jsonl                 append-only; one JSON line per snapshot (scalars)
    run_dir/snap_<step>_<seq>.npz       np.savez_compressed arrays of that snapshot

Each snapshot's arrays are written to a temporary file, fsynced and renamed into place
(``os.replace``); only then is its index line appended, flushed and fsynced. A complete index
line therefore always points to a complete array file, and a process killed at any moment
loses at most the snapshot in flight: a torn last line is skipped by :func:`load_run` (with a
warning) and truncated away when a recorder reopens the directory (:func:`repair_tail`);
stray temporary files are ignored. Re-recording a step (after resuming from a checkpoint)
appends a new line; :func:`load_run` keeps the last one per step.

The writer is :class:`~hutchtrace.layers.snapshots.SnapshotRecorder`; what each record holds
is listed there.

Example:
    >>> import tempfile
    >>> run = tempfile.mkdtemp()
    >>> write_arrays_atomic(os.path.join(run, "snap_00000000_00000.npz"), {"w": np.ones(2)})
    >>> append_line(os.path.join(run, INDEX), json.dumps({"step": 0, "file": "snap_00000000_00000.npz"}))
    >>> load_arrays(run, 0)["w"].tolist(), count_lines(os.path.join(run, INDEX))
    ([1.0, 1.0], 1)
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings

import numpy as np

__all__ = [
    "INDEX",
    "META",
    "append_line",
    "count_lines",
    "jsonable",
    "load_arrays",
    "load_run",
    "read_meta",
    "repair_tail",
    "write_arrays_atomic",
    "write_json_atomic",
]

INDEX = "index.jsonl"
META = "run.json"


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def write_arrays_atomic(path: str, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez_compressed`` into a temp file in the same directory, fsync, then ``os.replace``."""
    d = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".npz", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(d)


def write_json_atomic(path: str, obj) -> None:
    """``json.dump`` into a temp file in the same directory, fsync, then ``os.replace``."""
    d = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".json", dir=d)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(jsonable(obj), f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(d)


def read_meta(run_dir) -> dict | None:
    """The run's ``run.json``, or ``None`` when it has none."""
    meta_path = os.path.join(os.fspath(run_dir), META)
    if not os.path.exists(meta_path):
        return None
    with open(meta_path, encoding="utf-8") as f:
        return json.load(f)


def append_line(path: str, text: str) -> None:
    """Append one line, flush and fsync: after a return the line survives a crash."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())


def repair_tail(path: str) -> int:
    """Truncate a torn last line (no trailing newline); returns the bytes removed."""
    if not os.path.exists(path):
        return 0
    with open(path, "rb+") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size == 0:
            return 0
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        f.seek(0)
        data = f.read()
        keep = data.rfind(b"\n") + 1
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
        return size - keep


def count_lines(path: str) -> int:
    """Lines in ``path`` (0 when it does not exist): the snapshots already in an index."""
    if not os.path.exists(path):
        return 0
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def jsonable(obj):
    """``obj`` with numpy scalars as Python numbers and keys as strings, for ``json.dumps``."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


# --------------------------------------------------------------------------------------------
# reading


def _read_index(run_dir: str) -> list[dict]:
    path = os.path.join(os.fspath(run_dir), INDEX)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: {run_dir!r} is not a SnapshotRecorder run directory")
    with open(path, "rb") as f:
        raw = f.read()
    lines = raw.split(b"\n")
    records, bad = [], []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            bad.append(i + 1)
            continue
        if not os.path.exists(os.path.join(os.fspath(run_dir), rec.get("file", ""))):
            bad.append(i + 1)
            continue
        records.append(rec)
    if bad:
        warnings.warn(
            f"{path}: skipped {len(bad)} incomplete snapshot line(s) {bad[:5]} (an interrupted write); "
            "every other snapshot is intact",
            RuntimeWarning,
            stacklevel=3,
        )
    last: dict[int, dict] = {}
    for rec in records:  # a re-recorded step (resumed run) supersedes the earlier line
        last[rec["step"]] = rec
    return sorted(last.values(), key=lambda r: r["step"])


def load_run(run_dir):
    """The run's snapshots as a ``pandas.DataFrame``, one row per step (ascending).

    Columns are the index records flattened with ``/``: ``step``, ``train_loss``,
    ``scores/accuracy``, ``layers/<layer>/weights/mean``, ``layers/<layer>/hessian/rank``,
    ``layers/<layer>/hessian/eig_psd_max``, ... and ``file`` (the arrays; see
    :func:`load_arrays`). ``frame.attrs`` holds ``run_dir`` and the run's ``meta``.
    Torn or orphaned index lines from an interrupted run are skipped with a warning.
    """
    try:
        import pandas as pd
    except ImportError as e:  # pragma: no cover
        raise ImportError("load_run needs pandas: pip install pandas") from e
    records = _read_index(run_dir)
    frame = pd.json_normalize(records, sep="/") if records else pd.DataFrame(columns=["step", "file"])
    meta = read_meta(run_dir)
    if meta is None:
        meta = {}
    frame.attrs["run_dir"] = os.fspath(run_dir)
    frame.attrs["meta"] = meta
    return frame.reset_index(drop=True)


def load_arrays(run_dir, step: int) -> dict[str, np.ndarray]:
    """The arrays of the snapshot at ``step``: ``layers/<layer>/weights``, ``.../gradient``,
    ``.../hessian_eigens``, ``.../weights_welch_psd``, ... (keys as stored)."""
    for rec in _read_index(run_dir):
        if rec["step"] == int(step):
            with np.load(os.path.join(os.fspath(run_dir), rec["file"])) as z:
                return {k: z[k] for k in z.files}
    raise KeyError(f"no snapshot at step {step} in {run_dir}")
