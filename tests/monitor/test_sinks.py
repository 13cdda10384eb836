"""Sinks: crash safety (SIGKILL mid-run), torn lines, CSV/JSONL round trips, plots, TensorBoard."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hutchtrace.monitor.sinks import (
    CSVSink,
    JSONLSink,
    TensorBoardSink,
    flatten_record,
    plot_monitor,
    read_log,
)

ROOT = Path(__file__).resolve().parents[2]


def _record(i: int, n_blocks: int = 3) -> dict:
    return {
        "step": i,
        "measurement": i,
        "time": 1.0 + i,
        "loss": 1.0 / (i + 1),
        "grad_norm": 0.5 * i,
        "K": 8,
        "blocks": {
            f"layer{b}": {
                "trace": i + b / 10,
                "se": 0.1 * b,
                "cusum_up": 0.0,
                "cusum_down": 0.0,
                "baseline": 1.0,
            }
            for b in range(n_blocks)
        },
        "total": {"trace": 3.0 * i, "se": 0.3},
        "alarms": [{"block": "layer0", "step": i, "direction": "up", "statistic": 6.0}] if i % 7 == 3 else [],
    }


WRITER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from hutchtrace.monitor.sinks import JSONLSink, CSVSink
    sys.path.insert(0, {tests!r})
    from test_sinks import _record
    sinks = [JSONLSink({jsonl!r}), CSVSink({csv!r})]
    i = 0
    while True:
        rec = _record(i, n_blocks=40)
        for s in sinks:
            s.write(rec)
        i += 1
""")


def test_sigkill_mid_run_leaves_a_valid_log(tmp_path):
    jsonl, csv = tmp_path / "run.jsonl", tmp_path / "run.csv"
    script = tmp_path / "writer.py"
    script.write_text(
        WRITER.format(root=str(ROOT), tests=str(Path(__file__).resolve().parent), jsonl=str(jsonl), csv=str(csv))
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if csv.exists() and csv.stat().st_size > 60_000 and proc.poll() is None:
                break
            if proc.poll() is not None:
                pytest.fail(f"writer died: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)  # mid-run, with no chance to clean up
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    for path in (jsonl, csv):
        rows = read_log(path, as_dataframe=False)
        assert len(rows) >= 10
        # every row read is a complete, correct record, in order
        for i, r in enumerate(rows):
            exp = flatten_record(_record(i, n_blocks=40))
            assert set(r) == set(exp)
            assert (
                r["step"] == i and r["trace/layer39"] == exp["trace/layer39"] and r["alarms"] == exp["alarms"]
            )
    # JSONL is written first: it can only be ahead of the CSV, by at most one record
    nj, nc = len(read_log(jsonl, as_dataframe=False)), len(read_log(csv, as_dataframe=False))
    assert nc <= nj <= nc + 1


@pytest.mark.parametrize("cls,suffix", [(JSONLSink, "jsonl"), (CSVSink, "csv")])
def test_torn_last_line_ignored_and_repaired_on_append(tmp_path, cls, suffix):
    path = tmp_path / f"log.{suffix}"
    with cls(path) as s:
        for i in range(3):
            s.write(_record(i))
    full = path.read_bytes()
    path.write_bytes(full + full.splitlines(keepends=True)[-1][:25])  # a torn 4th line
    rows = read_log(path, as_dataframe=False)
    assert [r["step"] for r in rows] == [0, 1, 2]
    with cls(path) as s:  # a resumed run appends: the torn tail is cut first
        s.write(_record(3))
    assert path.read_bytes().endswith(b"\n")
    rows = read_log(path, as_dataframe=False)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert rows[3]["alarms"] == _record(3)["alarms"]


def test_read_log_dataframe_nested_and_malformed_middle_line(tmp_path):
    pd = pytest.importorskip("pandas")
    path = tmp_path / "log.jsonl"
    with JSONLSink(path, fsync=False) as s:
        s.write(_record(0))
        s._write_line("{not json}\n")
        s.write(_record(1))
    with pytest.warns(UserWarning, match="line 2"):
        df = read_log(path)
    assert isinstance(df, pd.DataFrame) and list(df["step"]) == [0, 1]
    assert "trace/layer2" in df.columns and "se/total" in df.columns
    with pytest.warns(UserWarning):
        nested = read_log(path, as_dataframe=False, flat=False)
    assert nested[1]["blocks"]["layer1"]["trace"] == 1.1


def test_csv_columns_fixed_by_header(tmp_path):
    path = tmp_path / "log.csv"
    with CSVSink(path) as s:
        s.write({"step": 0, "loss": 1.0})
        with pytest.warns(UserWarning, match="dropping"):
            s.write({"step": 1, "loss": 0.5, "new": 3})
    with CSVSink(path) as s:  # reopening reuses the existing header
        s.write({"step": 2, "loss": float("nan")})
    rows = read_log(path, as_dataframe=False)
    assert [r["step"] for r in rows] == [0, 1, 2] and "new" not in rows[1]
    assert rows[2]["loss"] != rows[2]["loss"]  # NaN survives


def test_plot_monitor_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    recs = [_record(i) for i in range(20)]
    recs[3]["calibrating"] = True
    recs[5]["alarms"] = [{"block": "layer1", "step": 5, "direction": "down", "value": 5.1, "statistic": 7.0}]
    recs[6]["alarms"] = [{"block": "layer2", "step": 6, "direction": "nonfinite", "value": float("nan")}]
    out = plot_monitor(recs, tmp_path / "m.png", title="t")
    assert out.exists() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    path = tmp_path / "log.jsonl"
    with JSONLSink(path) as s:
        for r in recs:
            s.write(r)
    assert plot_monitor(path, tmp_path / "n.png", blocks=["layer0"]).exists()
    with pytest.raises(KeyError, match="nope"):
        plot_monitor(path, tmp_path / "x.png", blocks=["nope"])


def test_tensorboard_sink(tmp_path):
    pytest.importorskip("tensorboard")
    sink = TensorBoardSink(tmp_path / "tb")
    for i in range(3):
        sink.write(_record(i))
    sink.close()
    files = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert files and files[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert "hutchtrace/trace/layer1" in acc.Tags()["scalars"]
    assert [e.value for e in acc.Scalars("hutchtrace/trace/layer1")] == pytest.approx([0.1, 1.1, 2.1])


def test_jsonl_record_is_one_line_json(tmp_path):
    path = tmp_path / "a.jsonl"
    with JSONLSink(path) as s:
        s.write(_record(2))
    lines = path.read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0]) == _record(2)
