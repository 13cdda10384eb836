"""``hutchtrace demo --quick`` runs end to end and writes the report folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[2]


def _command() -> list[str]:
    exe = shutil.which("hutchtrace", path=os.path.dirname(sys.executable))
    # the console script when installed, else the module form (same entry point)
    return [exe] if exe else [sys.executable, "-m", "hutchtrace"]


def test_demo_quick_writes_report(tmp_path):
    out = tmp_path / "report"
    env = dict(
        os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), MPLBACKEND="Agg"
    )
    proc = subprocess.run(
        _command() + ["demo", "--quick", "--out", str(out), "--seed", "1", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in (
        "clean.png",
        "noisy.png",
        "comparison.png",
        "clean.jsonl",
        "noisy.jsonl",
        "summary.json",
        "summary.md",
    ):
        f = out / name
        assert f.exists() and f.stat().st_size > 0, name
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    s = json.loads((out / "summary.json").read_text())
    assert set(s["runs"]) == {"clean", "noisy"}
    assert s["config"]["seed"] == 1 and s["config"]["layers"] == ["0", "2", "4"]
    clean, noisy = s["runs"]["clean"], s["runs"]["noisy"]
    assert clean["final"]["train_acc"] > 0.9  # the clean run learns digits
    assert noisy["final"]["train_acc"] < clean["final"]["train_acc"]  # 40 % random labels are not fitted yet
    # the printed summary table is the markdown file
    assert "| clean | 0% |" in proc.stdout and "| noisy | 40% |" in proc.stdout
    assert (out / "summary.md").read_text() in proc.stdout
    from hutchtrace.monitor.sinks import read_log

    rows = read_log(out / "noisy.jsonl", as_dataframe=False)
    # 40 epochs x 18 steps, measured every 10 steps
    assert len(rows) == 72 and all("trace/0" in r and "memorised" in r for r in rows)
    assert sum(len(r["alarms"]) for r in rows) == noisy["alarms"]


def test_cli_rejects_bad_arguments(tmp_path):
    from hutchtrace.cli import main

    assert main(["demo", "--noise", "1.5", "--out", str(tmp_path)]) == 2
    assert main([]) == 1
    assert main(["--version"]) == 0
