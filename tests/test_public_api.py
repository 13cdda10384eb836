"""The public API does not move: ``hutchtrace.__all__`` is pinned, every name resolves, the README
documents every name, and the documented submodules import (docs/architecture.md)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

import hutchtrace

ROOT = Path(__file__).resolve().parents[1]

PUBLIC = sorted([
    "Alarm", "Block", "BlockEstimate", "BlockLayout", "BlockSpecError", "BlockTraces", "CCAResult",
    "CSVSink", "CUSUMDetector", "CallbackSink", "Coupling", "DataFormatError", "Decomposition",
    "DegenerateLocalHessianWarning", "DeviceMismatchError", "HVPUnsupportedError", "HutchtraceError",
    "JSONLSink", "LocalHessian", "LocalHessianError", "LossError", "MemoryBudgetError", "Monitor",
    "NonFiniteWarning", "PCAResult", "ProbePlan", "SharedTrace", "SnapshotRecorder", "SpectrumSummary",
    "TensorBoardSink", "VarianceDecomposition", "VectorSummary", "__version__", "block_coupling",
    "block_eigenvalues", "block_traces", "cca", "decompose", "estimate_coupling_matrix",
    "exact_block_traces", "exact_hessian", "exact_variance", "hutchpp", "load_arrays", "load_run",
    "local_hessian", "local_hessian_rows", "plot_monitor", "read_log", "resolve_blocks", "snapshot_pca",
    "spectral_density", "spectrum_summary", "stable_rank", "twice_differentiable", "unrolled_traces",
    "variance_decomposition", "vector_summary",
])

#: documented in README ("Submodules for specialised use") with the public names each must offer
SUBMODULES = {
    "hutchtrace.distributed": ["sharded_block_traces", "dtensor_block_traces", "ParamShard", "shards_of",
                               "DistributedError", "all_reduce_welford"],
    "hutchtrace.monitor.lightning": ["lightning_callback_base"],
    "hutchtrace.monitor.hf": ["trainer_callback_base", "first_examples"],
    "hutchtrace.monitor.plots": [],
    "hutchtrace.zoo": ["make_mlp", "MeanSquared", "TinyLM"],
    "hutchtrace.kernels.ops": ["fill_probes_", "block_dot", "welford_update_"],
}


def test_all_is_pinned():
    assert sorted(hutchtrace.__all__) == PUBLIC
    assert len(set(hutchtrace.__all__)) == len(hutchtrace.__all__)


@pytest.mark.parametrize("name", PUBLIC)
def test_every_public_name_resolves(name):
    assert getattr(hutchtrace, name) is not None


def test_readme_documents_every_public_name():
    text = (ROOT / "README.md").read_text()
    table = text.split("## Public API", 1)[1].split("\n## ", 1)[0]
    documented = set()
    for line in table.splitlines():
        if line.startswith("| `"):
            documented.update(re.findall(r"`([A-Za-z_]\w*)`", line.split("|")[1]))
    assert documented == set(PUBLIC) - {"__version__"}
    for mod in SUBMODULES:
        assert f"`{mod}`" in table, f"README's Public API section does not name {mod}"


@pytest.mark.parametrize("module", sorted(SUBMODULES))
def test_documented_submodules_import(module):
    mod = importlib.import_module(module)
    for name in SUBMODULES[module]:
        assert hasattr(mod, name), f"{module}.{name}"
