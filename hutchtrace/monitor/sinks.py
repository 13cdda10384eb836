"""Where :class:`~hutchtrace.monitor.monitor.Monitor` records go: crash-safe logs, TensorBoard, plots.

A record is a dict (one per measurement)::

    {"step": 120, "measurement": 3, "time": 1.7e9, "loss": 0.41, "grad_norm": 2.3, "K": 8,
     "every": 40, "meas_s": 0.012, "calibrating": False, "threshold": 5.75,
     "blocks": {"fc1": {"trace": 3.2, "se": 0.4, "cusum_up": 0.0, "cusum_down": 1.1,
                        "baseline": 3.0}, ...},
     "total": {"trace": 5.1, "se": 0.6},
     "alarms": [{"block": "fc1", "step": 120, "direction": "up", "statistic": 6.1, ...}]}

:func:`flatten_record` turns it into one flat row (``trace/fc1``, ``se/fc1``,
``cusum_up/fc1``, ...; ``alarms`` stays a list).

**Crash safety.** :class:`JSONLSink` and :class:`CSVSink` append one line per record,
then ``flush()`` and ``os.fsync()`` (``fsync=False`` skips the sync). A process killed
mid-write can leave at most one torn last line; :func:`read_log` ignores it, and reopening
the file for appending first truncates such a tail so a resumed run starts on a clean line.
Non-finite numbers are written as ``NaN`` / ``Infinity`` (Python's JSON dialect).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Callable

__all__ = [
    "JSONLSink",
    "CSVSink",
    "TensorBoardSink",
    "CallbackSink",
    "read_log",
    "flatten_record",
    "plot_monitor",
    "sink_for_path",
]


def flatten_record(record: dict) -> dict:
    """One flat dict per record: scalars as they are, ``blocks[b][q]`` -> ``"q/b"``."""
    out: dict[str, Any] = {}
    for key, val in record.items():
        if key == "blocks":
            for b, qs in val.items():
                for q, v in qs.items():
                    out[f"{q}/{b}"] = v
        elif key == "total" and isinstance(val, dict):
            for q, v in val.items():
                out[f"{q}/total"] = v
        else:
            out[key] = val
    return out


def _repair_tail(path: Path) -> None:
    """Drop a torn (newline-less) last line left by a crash, so appends start cleanly."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        # find the last newline
        pos, chunk = size, 4096
        while pos > 0:
            start = max(0, pos - chunk)
            f.seek(start)
            buf = f.read(pos - start)
            i = buf.rfind(b"\n")
            if i >= 0:
                f.truncate(start + i + 1)
                return
            pos = start
        f.truncate(0)


class _LineSink:
    def __init__(self, path, fsync: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _repair_tail(self.path)
        self.fsync = fsync
        self._f = open(self.path, "a", encoding="utf-8", newline="")

    def _write_line(self, line: str) -> None:
        if self._f is None:
            raise ValueError(f"sink for {self.path} is closed")
        self._f.write(line)
        self._f.flush()
        if self.fsync:
            os.fsync(self._f.fileno())

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class JSONLSink(_LineSink):
    """One JSON object per line (the full nested record), appended, flushed and fsynced.

    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "run.jsonl")
    >>> with JSONLSink(p) as s:
    ...     s.write({"step": 0, "loss": 1.5, "blocks": {"fc": {"trace": 2.0, "se": 0.1}}})
    >>> read_log(p, as_dataframe=False)[0]["trace/fc"]
    2.0
    """

    def write(self, record: dict) -> None:
        self._write_line(json.dumps(record, default=_json_default) + "\n")


class CSVSink(_LineSink):
    """A flat CSV (:func:`flatten_record`), header from the first record; list fields as JSON.

    Columns are fixed by the first record written to the file (or by the existing header
    when appending): later keys outside them are dropped with one warning, missing ones
    are left empty.
    """

    def __init__(self, path, fsync: bool = True):
        super().__init__(path, fsync)
        self.columns: list[str] | None = None
        if self.path.stat().st_size > 0:
            with open(self.path, encoding="utf-8", newline="") as f:
                self.columns = next(csv.reader(f), None)
        self._warned = False

    def write(self, record: dict) -> None:
        flat = flatten_record(record)
        lines = []
        if self.columns is None:
            self.columns = list(flat)
            lines.append(self.columns)
        extra = [k for k in flat if k not in self.columns]
        if extra and not self._warned:
            warnings.warn(f"CSVSink({self.path}): dropping keys {extra} not in the header", stacklevel=2)
            self._warned = True
        lines.append([_csv_cell(flat.get(c)) for c in self.columns])
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerows(lines)
        self._write_line(buf.getvalue())


def _json_default(obj):
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:  # pragma: no cover
        pass
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def _csv_cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, (list, dict)):
        return json.dumps(v, default=_json_default)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    return str(v)


def _parse_cell(s: str):
    if s == "":
        return None
    if s in ("true", "false"):
        return s == "true"
    if s[0] in "[{":
        try:
            return json.loads(s)
        except ValueError:
            return s
    try:
        return int(s)
    except ValueError:
        pass
    try:
        return float(s)
    except ValueError:
        return s


class CallbackSink:
    """Calls ``fn(record)`` for every record."""

    def __init__(self, fn: Callable[[dict], Any]):
        self.fn = fn

    def write(self, record: dict) -> None:
        self.fn(record)


class TensorBoardSink:
    """Writes every numeric field as a scalar (tag ``hutchtrace/<field>``) and alarms as text.

    Needs ``tensorboard`` (``pip install tensorboard``); uses ``torch.utils.tensorboard``.
    """

    def __init__(self, log_dir, prefix: str = "hutchtrace"):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ImportError(
                "TensorBoardSink needs the tensorboard package: pip install tensorboard"
            ) from exc
        self.writer = SummaryWriter(log_dir=str(log_dir))
        self.prefix = prefix

    def write(self, record: dict) -> None:
        step = int(record.get("step", 0))
        for key, v in flatten_record(record).items():
            if key in ("step", "time", "measurement") or isinstance(v, bool):
                continue
            if isinstance(v, (int, float)) and v is not None and math.isfinite(v):
                self.writer.add_scalar(f"{self.prefix}/{key}", v, step)
        for a in record.get("alarms", []):
            self.writer.add_text(f"{self.prefix}/alarms", json.dumps(a), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def sink_for_path(path) -> Any:
    """``.jsonl``/``.json`` -> :class:`JSONLSink`, ``.csv`` -> :class:`CSVSink`, else TensorBoard dir."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return JSONLSink(p)
    if suffix == ".csv":
        return CSVSink(p)
    if suffix == "":
        return TensorBoardSink(p)
    raise ValueError(
        f"cannot infer a sink from {str(path)!r}: use a .jsonl or .csv file, or a directory for TensorBoard"
    )


# --------------------------------------------------------------------------- reading
def read_log(path, as_dataframe: bool = True, flat: bool = True):
    """Read a JSONL or CSV log written by a sink, tolerating a torn last line.

    Returns a pandas DataFrame (one row per measurement, flat columns) or, with
    ``as_dataframe=False`` (or without pandas), a list of dicts (flat unless ``flat=False``;
    CSV logs are always flat). A malformed line *before* the last one is skipped with a
    warning naming its line number (it cannot come from a crash of an appending writer).
    """
    p = Path(path)
    raw = p.read_bytes().decode("utf-8", errors="replace")
    complete = raw.endswith("\n")
    lines = raw.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    torn = None if complete or not lines else lines.pop()
    if p.suffix.lower() == ".csv":
        rows = _read_csv_lines(lines, p)
    else:
        rows = []
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                warnings.warn(f"{p}: skipping malformed line {i}", stacklevel=2)
                continue
            rows.append(flatten_record(rec) if flat else rec)
        if torn is not None:  # a complete JSON object without its newline is still valid
            try:
                rec = json.loads(torn)
                rows.append(flatten_record(rec) if flat else rec)
            except ValueError:
                pass
    if not as_dataframe:
        return rows
    try:
        import pandas as pd
    except ImportError:
        return rows
    return pd.DataFrame(rows)


def _read_csv_lines(lines: list[str], p: Path) -> list[dict]:
    if not lines:
        return []
    reader = csv.reader(lines)
    header = next(reader)
    rows = []
    for i, cells in enumerate(reader, 2):
        if len(cells) != len(header):
            warnings.warn(f"{p}: skipping malformed line {i}", stacklevel=3)
            continue
        rows.append({h: _parse_cell(c) for h, c in zip(header, cells)})
    return rows


# --------------------------------------------------------------------------- plotting
def _as_rows(log) -> list[dict]:
    if isinstance(log, (str, os.PathLike)):
        return read_log(log, as_dataframe=False)
    if hasattr(log, "to_dict") and hasattr(log, "columns"):  # DataFrame
        return log.to_dict("records")
    if hasattr(log, "history"):  # a Monitor
        return [flatten_record(r) for r in log.history]
    return [flatten_record(r) if "blocks" in r else r for r in log]


def plot_monitor(log, path=None, blocks=None, title: str | None = None, band: float = 2.0):
    """Per-block traces with ``+-band*SE`` bands, CUSUM alarms, loss and gradient norm.

    Args:
        log: a log path, a DataFrame / list of records from :func:`read_log`, or a Monitor.
        path: where to save the figure (PNG, ...); ``None`` returns the figure unsaved.
        blocks: block names to plot (default: all).
        title: figure title.
        band: half-width of the error band in standard errors.

    Alarms are marked with a triangle at the alarmed value (up: red, down: blue, non-finite:
    dotted line); the calibration window is shaded. Returns the saved path, or the
    ``matplotlib.figure.Figure`` when ``path`` is None. Needs matplotlib (pyplot is not used).
    """
    try:
        from matplotlib.figure import Figure  # object API: no pyplot state, no backend switch
    except ImportError as exc:
        raise ImportError("plot_monitor needs matplotlib: pip install matplotlib") from exc
    rows = _as_rows(log)
    if not rows:
        raise ValueError("the log has no records to plot")
    names = [k[len("trace/") :] for k in rows[0] if k.startswith("trace/") and k != "trace/total"]
    if blocks is not None:
        missing = [b for b in blocks if b not in names]
        if missing:
            raise KeyError(f"blocks {missing} not in the log; it has {names}")
        names = list(blocks)
    steps = [r["step"] for r in rows]
    n_extra = 2
    fig = Figure(figsize=(8, 1.9 * (len(names) + n_extra)))
    axes = fig.subplots(len(names) + n_extra, 1, sharex=True, squeeze=False)
    axes = axes[:, 0]
    calib = [r["step"] for r in rows if r.get("calibrating")]
    colors = {"up": "tab:red", "down": "tab:blue"}
    for ax, b in zip(axes, names):
        tr = [_nan(r.get(f"trace/{b}")) for r in rows]
        se = [_nan(r.get(f"se/{b}")) for r in rows]
        ax.plot(steps, tr, color="k", lw=1, label="trace")
        ax.fill_between(
            steps,
            [t - band * s for t, s in zip(tr, se)],
            [t + band * s for t, s in zip(tr, se)],
            color="0.6",
            alpha=0.4,
            lw=0,
            label=f"±{band:g} SE",
        )
        base = [_nan(r.get(f"baseline/{b}")) for r in rows]
        if any(math.isfinite(v) for v in base):
            ax.plot(steps, base, color="tab:green", lw=0.8, ls="--", label="baseline")
        if calib:
            ax.axvspan(min(calib), max(calib), color="tab:orange", alpha=0.08, lw=0)
        for r in rows:
            for a in r.get("alarms") or []:
                if a.get("block") != b:
                    continue
                d = a.get("direction")
                if d == "nonfinite":
                    ax.axvline(a["step"], color="k", ls=":", lw=1)
                else:
                    val = a.get("value", r.get(f"trace/{b}"))
                    ax.plot(
                        [a["step"]],
                        [_nan(val)],
                        marker="^" if d == "up" else "v",
                        color=colors.get(d, "k"),
                        ms=7,
                        ls="none",
                    )
        ax.set_ylabel(f"tr H[{b}]", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper left")
    ax = axes[len(names)]
    ax.plot(steps, [_nan(r.get("loss")) for r in rows], color="tab:purple", lw=1)
    ax.set_ylabel("loss", fontsize=8)
    ax.grid(alpha=0.3)
    ax = axes[len(names) + 1]
    ax.plot(steps, [_nan(r.get("grad_norm")) for r in rows], color="tab:brown", lw=1)
    ax.set_ylabel("|grad|", fontsize=8)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
        return Path(path)
    return fig


def _nan(v) -> float:
    return math.nan if v is None else float(v)
