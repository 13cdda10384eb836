"""bench/run_cpu_suite.py publishes a self-writing suite's results only from a quiet run: the
staged files reach bench/results when the load stayed at or below the core count, or with
--allow-load, and never otherwise (issue 15: no committed number from a loaded machine)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _load_run_cpu_suite():
    """bench/run_cpu_suite.py, without leaving bench/ on sys.path: its modules (foreign_models,
    models) would shadow the test helpers of the same names for the rest of the session."""
    saved = list(sys.path)
    try:
        spec = importlib.util.spec_from_file_location("bench_run_cpu_suite", ROOT / "bench" / "run_cpu_suite.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path[:] = saved


rcs = _load_run_cpu_suite()


def staged(tmp_path: Path) -> tuple[Path, Path]:
    staging, results = tmp_path / "staging", tmp_path / "results"
    (staging / "sub").mkdir(parents=True)
    (staging / "foreign_models.json").write_text("{}")
    (staging / "sub" / "part.md").write_text("x")
    results.mkdir()
    (results / "foreign_models.json").write_text('{"committed": true}')
    return staging, results


def test_a_quiet_run_is_published(tmp_path):
    staging, results = staged(tmp_path)
    assert rcs.publish_staged(staging, results, {"start": 0.5, "end": 1.9, "cores": 2}, allow_load=False)
    assert (results / "foreign_models.json").read_text() == "{}"
    assert (results / "sub" / "part.md").read_text() == "x"


def test_a_loaded_run_leaves_the_committed_results(tmp_path):
    for load in ({"start": 2.5, "end": 1.0, "cores": 2}, {"start": 0.2, "end": 3.1, "cores": 2}):
        staging, results = staged(tmp_path / str(load["start"]))
        assert not rcs.publish_staged(staging, results, load, allow_load=False)
        assert (results / "foreign_models.json").read_text() == '{"committed": true}'
        assert not (results / "sub").exists()


def test_allow_load_publishes_a_loaded_run(tmp_path):
    staging, results = staged(tmp_path)
    assert rcs.publish_staged(staging, results, {"start": 5.0, "end": 5.0, "cores": 2}, allow_load=True)
    assert (results / "foreign_models.json").read_text() == "{}"


def test_every_self_writing_suite_is_staged():
    """The opt-in suites that do not go through models.write_results (and its load check)."""
    for suite in rcs.OPT_IN:
        cmd = rcs.SUITES[suite][0]
        writes_itself = cmd[0] != "-m"
        assert (suite in rcs.STAGED) == writes_itself, suite
        if writes_itself:
            assert any("{out}" in c for c in cmd), suite
