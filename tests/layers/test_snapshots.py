"""SnapshotRecorder (round trip, crash safety, fallback estimates, metrics), the CCA / PCA
analyses and the --quick layer-wise study example."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from hutchtrace.core.errors import BlockSpecError
from hutchtrace.layers.local_hessian import local_hessian
from hutchtrace.layers.snapshot_store import INDEX, load_arrays, load_run
from hutchtrace.layers.snapshots import SnapshotRecorder

REPO = Path(__file__).resolve().parents[2]
DT = torch.float64


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6), nn.Softplus(), nn.Linear(6, 3)).to(DT)


def _data(n=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


def _ce(out, y):
    return nn.functional.cross_entropy(out, y)


def _sgd(net, lr):  # (torch.optim would import torch._dynamo: seconds of test time for nothing)
    with torch.no_grad():
        for p in net.parameters():
            p -= lr * p.grad


def _quiet(fn, *a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **k)


def test_round_trip(tmp_path):
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

    net, (x, y) = _net(), _data()
    rec = SnapshotRecorder(tmp_path / "run", net, task="classification")
    assert rec.layers == ["0", "2", "4"]
    expected = {}
    for step in range(3):
        net.zero_grad()
        loss = _ce(net(x), y)
        loss.backward()
        expected[step] = {
            "w0": net[0].weight.detach().clone(),
            "g0": net[0].weight.grad.clone(),
            "b2": net[2].bias.detach().clone(),
            "gb2": net[2].bias.grad.clone(),
            "lh0": local_hessian(net, x, "0"),
            "lh2": local_hessian(net, x, "2"),
            "out": net(x).detach(),
            "loss": loss.item(),
        }
        rec.record(step, x, y, train_loss=loss.item())
        _sgd(net, 0.4)
    frame = load_run(rec.run_dir)
    assert list(frame["step"]) == [0, 1, 2]
    assert frame.attrs["meta"]["layers"] == ["0", "2", "4"]
    assert frame.attrs["meta"]["activations"] == {
        "0": "tanh",
        "2": "softplus(beta=1.0, threshold=20.0)",
        "4": "identity",
    }
    for i, step in enumerate(range(3)):
        e = expected[step]
        arr = load_arrays(rec.run_dir, step)
        np.testing.assert_array_equal(arr["layers/0/weights"], e["w0"].numpy())
        np.testing.assert_array_equal(arr["layers/0/gradient"], e["g0"].numpy())
        np.testing.assert_array_equal(arr["layers/2/bias"], e["b2"].numpy())
        np.testing.assert_array_equal(arr["layers/2/bias_gradient"], e["gb2"].numpy())
        for layer, lh in (("0", e["lh0"]), ("2", e["lh2"])):
            np.testing.assert_allclose(
                arr[f"layers/{layer}/hessian_eigens"],
                lh.eigenvalues().numpy(),
                rtol=0,
                atol=1e-12 * float(lh.eigenvalues().abs().max()),
            )
            assert frame[f"layers/{layer}/hessian/trace"][i] == pytest.approx(lh.trace(), rel=1e-12)
            assert frame[f"layers/{layer}/hessian/method"][i] == "closed_form"
        row = frame.iloc[i]
        assert row["layers/0/hessian/rank"] == 8 * min(40, 6)
        assert row["layers/2/hessian/rank"] == 6 * min(40, 9)
        assert (
            row["layers/0/hessian/det_kind"] == row["layers/2/hessian/det_kind"] == "determinant"
        )  # full rank
        assert row["layers/4/hessian/det_kind"] == "pseudo-determinant"
        assert bool(row["layers/4/hessian/degenerate"]) and row["layers/4/hessian/rank"] == 0
        assert row["layers/0/weights/mean"] == pytest.approx(float(e["w0"].mean()), rel=1e-12)
        assert row["layers/0/gradient/std"] == pytest.approx(float(e["g0"].std(unbiased=False)), rel=1e-12)
        assert row["layers/0/weights/rank"] == int(torch.linalg.matrix_rank(e["w0"]))
        pred = e["out"].argmax(1).numpy()
        assert row["scores/accuracy"] == accuracy_score(y.numpy(), pred)
        assert row["scores/f1"] == pytest.approx(f1_score(y.numpy(), pred, average="macro", zero_division=0))
        prob = torch.softmax(e["out"], 1).numpy()
        assert row["scores/auc"] == pytest.approx(roc_auc_score(y.numpy(), prob, multi_class="ovr"))
        assert row["train_loss"] == e["loss"]
        psd = arr["layers/0/gradient_welch_psd"]
        assert row["layers/0/gradient/psd_max"] == pytest.approx(float(psd.max()))


def test_trace_estimates_when_the_local_hessian_is_over_budget(tmp_path):
    net, (x, _y) = _net(), _data()
    # blocks in float64: layer 0: 8 * 6^2 * 8 B = 2304 B, layer 2: 3888 B, layer 4: 1176 B
    rec = SnapshotRecorder(tmp_path / "run", net, task=None, local_hessian_budget=2000, K=64, seed=3)
    rec.record(0, x)
    row = load_run(rec.run_dir).iloc[0]
    assert row["layers/4/hessian/status"] == "exact"
    for layer in ("0", "2"):
        assert row[f"layers/{layer}/hessian/status"] == "estimated"
        assert "hessian/eig_mean" not in "".join(c for c in row.index if c.startswith(f"layers/{layer}/"))
        exact = local_hessian(net, x, layer)
        est, se = row[f"layers/{layer}/hessian/trace"], row[f"layers/{layer}/hessian/trace_se"]
        # Hutchinson with K = 64 probes is unbiased with standard error se; 4 se is a 6e-5 two-sided
        # tail for a Gaussian mean (the seed is fixed, so the test is deterministic)
        assert se > 0 and abs(est - exact.trace()) <= 4 * se
        w_exact = float(exact.diagonal()[: exact.numel - exact.shapes[1][0]].sum())
        assert (
            abs(row[f"layers/{layer}/hessian/trace_weight"] - w_exact)
            <= 4 * row[f"layers/{layer}/hessian/trace_weight_se"]
        )


def test_regression_metrics_and_metrics_data(tmp_path):
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 3, generator=g, dtype=DT), torch.randn(30, generator=g, dtype=DT)
    xt, yt = torch.randn(20, 3, generator=g, dtype=DT), torch.randn(20, generator=g, dtype=DT)

    def mse(out, t):
        return ((out.reshape(-1) - t) ** 2).mean()

    rec = SnapshotRecorder(tmp_path / "r", net, task="regression", criterion=mse)
    _quiet(rec.record, 7, x, y, metrics_data=(xt, yt))
    row = load_run(rec.run_dir).iloc[0]
    pred = net(xt).detach().reshape(-1).numpy()
    assert row["scores/r2"] == pytest.approx(r2_score(yt.numpy(), pred), rel=1e-12)
    assert row["scores/mae"] == pytest.approx(mean_absolute_error(yt.numpy(), pred), rel=1e-12)
    assert row["scores/rmse"] == pytest.approx(math.sqrt(mean_squared_error(yt.numpy(), pred)), rel=1e-12)
    assert row["train_loss"] == pytest.approx(
        mse(net(x), y).item(), rel=1e-12
    )  # criterion on (inputs, targets)


_CHILD = r"""
import os, sys, time
sys.path.insert(0, {repo!r})
import torch
torch.set_num_threads(1)
import hutchtrace.layers.snapshots as hs
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
x = torch.randn(16, 4)
rec = hs.SnapshotRecorder({run!r}, net, task=None)
for s in range(2):
    rec.record(s, x)

def torn(path, text):  # the kill lands in the middle of the index append
    with open(path, "a") as f:
        f.write(text[: len(text) // 2])
        f.flush()
        os.fsync(f.fileno())
    open({ready!r}, "w").close()
    time.sleep(120)

hs.append_line = torn
rec.record(2, x)
"""


def test_recorder_killed_mid_write_reloads_cleanly(tmp_path):
    run, ready = tmp_path / "run", tmp_path / "ready"
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD.format(repo=str(REPO), run=str(run), ready=str(ready))],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.time() + 120
        while not ready.exists():
            if proc.poll() is not None:
                pytest.fail(f"child exited early: {proc.stderr.read().decode()[-2000:]}")
            if time.time() > deadline:
                pytest.fail("child never reached the write")
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    raw = (run / INDEX).read_bytes()
    assert not raw.endswith(b"\n")  # a torn last line really is on disk
    with pytest.warns(RuntimeWarning, match="skipped 1 incomplete"):
        frame = load_run(run)
    assert list(frame["step"]) == [0, 1]
    for s in (0, 1):
        arrays = _quiet(load_arrays, run, s)
        assert arrays["layers/0/weights"].shape == (6, 4)
    # a new recorder repairs the tail and appends after it
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    with pytest.warns(RuntimeWarning, match="truncated a torn last line"):
        rec = SnapshotRecorder(run, net, task=None)
    rec.record(2, torch.randn(16, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        frame = load_run(run)
    assert list(frame["step"]) == [0, 1, 2]
    assert all(json.loads(line) for line in (run / INDEX).read_text().splitlines())


def test_stray_files_and_a_failed_write_leave_the_run_intact(tmp_path, monkeypatch):
    net, (x, _) = _net(), _data()
    rec = SnapshotRecorder(tmp_path / "run", net, task=None)
    _quiet(rec.record, 0, x)
    # what a SIGKILL during np.savez_compressed / before os.replace leaves behind
    (tmp_path / "run" / ".tmp_abcd.npz").write_bytes(b"PK\x03\x04partial")
    (tmp_path / "run" / "snap_00000001_00001.npz").write_bytes(b"orphan: no index line")

    def crash(src, dst):
        raise KeyboardInterrupt("killed while renaming")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        _quiet(rec.record, 1, x)
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        frame = load_run(rec.run_dir)
    assert list(frame["step"]) == [0]
    assert len((tmp_path / "run" / INDEX).read_text().splitlines()) == 1


def test_resume_rerecorded_step_supersedes(tmp_path):
    net, (x, _) = _net(), _data()
    rec = SnapshotRecorder(tmp_path / "run", net, task=None)
    _quiet(rec.record, 0, x)
    _quiet(rec.record, 1, x)
    with torch.no_grad():
        net[0].weight.add_(1.0)
    rec2 = SnapshotRecorder(tmp_path / "run", net, task=None)  # resumed from a checkpoint at step 1
    _quiet(rec2.record, 1, x)
    frame = load_run(tmp_path / "run")
    assert list(frame["step"]) == [0, 1]
    assert frame["layers/0/weights/mean"].iloc[1] == pytest.approx(net[0].weight.mean().item(), rel=1e-12)
    np.testing.assert_array_equal(
        load_arrays(tmp_path / "run", 1)["layers/0/weights"], net[0].weight.detach()
    )
    with pytest.raises(ValueError, match="use a new run directory"):
        SnapshotRecorder(tmp_path / "run", net, layers=["0"], task=None)


def test_record_has_no_side_effects_and_schedule(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3)).to(DT)
    x, y = _data()
    _ce(net(x), y).backward()
    net.train()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    grads = [p.grad.clone() for p in net.parameters()]
    rng = torch.get_rng_state()
    rec = SnapshotRecorder(tmp_path / "run", net, task="classification", every=3, local_hessian_budget=1000)
    out = [_quiet(rec.maybe_record, s, x, y) for s in range(7)]
    assert [o is not None for o in out] == [True, False, False, True, False, False, True]
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, net.parameters()))
    assert net.training and net[2].training
    assert torch.equal(rng, torch.get_rng_state())
    rec2 = SnapshotRecorder(tmp_path / "run2", net, task=None, steps=[2, 5])
    assert [rec2.due(s) for s in range(6)] == [False, False, True, False, False, True]


def test_bad_arguments(tmp_path, monkeypatch):
    net = _net()
    with pytest.raises(ValueError, match="task"):
        SnapshotRecorder(tmp_path / "a", net, task="clustering")
    with pytest.raises(ValueError, match="K must be"):
        SnapshotRecorder(tmp_path / "a", net, task=None, K=1)
    with pytest.raises(ValueError, match="not recorded"):
        SnapshotRecorder(tmp_path / "a", net, layers=["0"], activations={"2": "tanh"}, task=None)
    with pytest.raises(ValueError, match="non-differentiable"):
        SnapshotRecorder(tmp_path / "a", net, layers=["0"], activations={"0": "sign"}, task=None)
    with pytest.raises(BlockSpecError, match="has no parameters"):
        SnapshotRecorder(tmp_path / "a", net, layers=["1"], task=None)
    monkeypatch.setitem(sys.modules, "sklearn.metrics", None)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        SnapshotRecorder(tmp_path / "b", net, task="classification")
    SnapshotRecorder(tmp_path / "b", net, task=None)  # metrics off: no scikit-learn needed
    with pytest.raises(FileNotFoundError, match="not a SnapshotRecorder run"):
        load_run(tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------
# analysis


def _planted(n=300, seed=0):
    import pandas as pd

    rng = np.random.default_rng(seed)
    t = rng.normal(size=n)
    return pd.DataFrame(
        {
            "train_loss": -t + 0.2 * rng.normal(size=n),
            "scores/accuracy": rng.normal(size=n),
            "layers/0/hessian/trace": t + 0.2 * rng.normal(size=n),
            "layers/0/weights/std": rng.normal(size=n),
            "layers/0/hessian/condition": np.full(n, np.inf),  # non-finite: dropped
            "layers/0/hessian/numel": np.full(n, 40),  # bookkeeping: not a statistic
            "layers/0/hessian/eig_max": np.full(n, 2.0),  # constant: dropped
        }
    )


def test_cca_matches_sklearn_and_finds_the_planted_link():
    from sklearn.cross_decomposition import CCA

    from hutchtrace.layers.analysis import cca, parameter_columns, quality_columns

    frame = _planted()
    assert quality_columns(frame) == ["train_loss", "scores/accuracy"]
    assert "layers/0/hessian/numel" not in parameter_columns(frame)
    res = cca(frame, n_components=2)
    assert set(res.dropped) == {"layers/0/hessian/condition", "layers/0/hessian/eig_max"}
    assert res.y_columns == ["layers/0/hessian/trace", "layers/0/weights/std"]
    X = frame[res.x_columns].to_numpy()
    Y = frame[res.y_columns].to_numpy()
    Xs, Ys = (X - X.mean(0)) / X.std(0), (Y - Y.mean(0)) / Y.std(0)
    xs, ys = CCA(n_components=2, scale=False, max_iter=500).fit(Xs, Ys).transform(Xs, Ys)
    ref = [np.corrcoef(xs[:, j], ys[:, j])[0, 1] for j in range(2)]
    np.testing.assert_allclose(res.correlations, ref, rtol=1e-10)
    # signal: corr(-t + e1, t + e2) with var(e) = 0.04 -> 1 / 1.04 = 0.96
    assert res.correlations[0] == pytest.approx(1 / 1.04, abs=0.03)
    # the second pair is pure noise: under independence n r^2 is ~ chi^2 with (2-1)(2-1) = 1 dof,
    # so r <= sqrt(chi2_{1-1e-6}(1) / n) = sqrt(23.9 / 300) = 0.28
    assert abs(res.correlations[1]) < 0.28
    assert res.x_loadings.loc["train_loss", "cc1"] ** 2 > 0.9
    assert set(res.stats()) == {"max", "avg", "median", "min", "std"}


def test_cca_warns_when_snapshots_are_too_few():
    from hutchtrace.layers.analysis import cca

    frame = _planted(n=4)
    with pytest.warns(RuntimeWarning, match="carry no evidence"):
        cca(frame, n_components=1)


def test_pca_matches_sklearn():
    from sklearn.decomposition import PCA

    from hutchtrace.layers.analysis import snapshot_pca

    frame = _planted(n=60, seed=2)
    res = snapshot_pca(
        frame,
        [
            "train_loss",
            "scores/accuracy",
            "layers/0/hessian/trace",
            "layers/0/weights/std",
            "layers/0/hessian/eig_max",
        ],
        n_components=3,
    )
    assert res.dropped == ["layers/0/hessian/eig_max"]
    A = frame[res.columns].to_numpy()
    A = (A - A.mean(0)) / A.std(0)
    sk = PCA(n_components=3).fit(A)
    np.testing.assert_allclose(res.explained_variance_ratio, sk.explained_variance_ratio_, rtol=1e-10)
    np.testing.assert_allclose(np.abs(res.scores.to_numpy()), np.abs(sk.transform(A)), atol=1e-10)
    np.testing.assert_allclose(np.abs(res.components.to_numpy()), np.abs(sk.components_), atol=1e-10)


def test_analysis_of_a_recorded_run(tmp_path):
    from hutchtrace.layers.analysis import cca, snapshot_pca

    net, (x, y) = _net(), _data()
    rec = SnapshotRecorder(tmp_path / "run", net, task="classification")
    for step in range(8):
        net.zero_grad()
        loss = _ce(net(x), y)
        loss.backward()
        _quiet(rec.record, step, x, y, train_loss=loss.item())
        _sgd(net, 0.4)
    frame = load_run(rec.run_dir)
    res = _quiet(
        cca,
        frame,
        ["train_loss", "scores/accuracy"],
        ["layers/0/hessian/trace", "layers/2/gradient/norm"],
        n_components=1,
    )
    assert res.n_samples == 8 and 0 <= res.correlations[0] <= 1 + 1e-12
    p = snapshot_pca(frame, n_components=2)
    assert p.scores.shape == (8, 2) and all(c.startswith("layers/") for c in p.columns)


# ------------------------------------------------------------------------------------------
# the example


def test_layerwise_study_quick(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("layerwise_study", REPO / "examples" / "layerwise_study.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results = mod.main(["--quick", "--out", str(tmp_path / "out")])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    for png in (
        "lh_eigenvalue_histograms",
        "gradient_welch_psd",
        "pca_architectures",
        "lh_trace_over_training",
    ):
        assert (tmp_path / "out" / f"{png}.png").stat().st_size > 0
    ok, total = results["rank_structural"]
    assert total > 0 and ok == total  # rank LH = m min(N, n+1) at every exact snapshot (docs/maths.md section 7)
    assert len(results["rows"]) == 7 and "seed:" in out and "here:" in out
    assert set(results["near_zero"]) == {"no", "sure", "huge"}
