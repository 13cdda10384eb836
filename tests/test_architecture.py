"""The layers of docs/architecture.md hold: the import-linter contracts in pyproject.toml are kept,
and they do fail on a planted upward import and on a planted cycle (so the check can fail)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).parent / "lint-imports"

pytestmark = pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed (pip install -e .[test])")


def lint(root: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(root))  # the copy's hutchtrace, not an installed one
    return subprocess.run([str(LINT), "--no-cache"], cwd=root, env=env, capture_output=True, text=True)


def copy_tree(tmp_path: Path) -> Path:
    dst = tmp_path / "repo"
    shutil.copytree(ROOT / "hutchtrace", dst / "hutchtrace", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", dst / "pyproject.toml")
    return dst


def test_layers_are_kept():
    res = lint(ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Contracts: 2 kept, 0 broken." in res.stdout


def test_an_upward_import_breaks_the_layers(tmp_path):
    repo = copy_tree(tmp_path)
    state = repo / "hutchtrace" / "core" / "state.py"
    state.write_text(state.read_text() + "\nfrom ..estimate import result  # planted: core imports estimate\n")
    res = lint(repo)
    assert res.returncode != 0
    assert "hutchtrace.core is not allowed to import hutchtrace.estimate" in res.stdout


def test_a_cycle_between_siblings_is_refused(tmp_path):
    repo = copy_tree(tmp_path)
    probing = repo / "hutchtrace" / "estimate" / "probing.py"
    probing.write_text(probing.read_text() + "\nfrom . import accumulate  # planted: accumulate imports probing\n")
    res = lint(repo)
    assert res.returncode != 0
    assert "No cycles are allowed in hutchtrace.estimate" in res.stdout
