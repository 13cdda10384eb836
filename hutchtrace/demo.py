"""``hutchtrace demo``: watch per-layer curvature separate clean training from label memorisation.

The demo trains the same small MLP (64-128-128-10, ReLU) on scikit-learn's ``digits``
(1797 8x8 images, shipped with scikit-learn, no download) twice: once with clean labels
and once with a fraction of the training labels replaced by uniformly random classes.
A :class:`~hutchtrace.monitor.monitor.Monitor` measures the per-layer Hessian traces (``K`` probes
on the current mini-batch) every few steps, with the gradient norm and the loss, and a
one-sided CUSUM (:class:`~hutchtrace.monitor.cusum.CUSUMDetector`) on the first layer is
calibrated *once* on the clean run's early measurements, then applied to both runs.

The report folder gets ``clean.png``/``noisy.png`` (per-layer traces with 2-SE bands and
alarm markers), ``comparison.png``, the JSONL logs, ``summary.json`` and ``summary.md``.

Memorisation is measured directly: the fraction of training examples whose random label
differs from the true one that the network predicts with the *random* label.

The training helpers here are shared with ``examples/memorisation_experiment.py``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .monitor.cusum import CUSUMDetector
from .monitor.monitor import Monitor
from .monitor.sinks import JSONLSink, plot_monitor

__all__ = ["DigitsTask", "make_task", "make_model", "train_run", "RunResult", "run_demo", "DEMO_BLOCK"]

DEMO_BLOCK = "0"  # the first Linear layer (blocks="module" names blocks by module path)


@dataclass
class DigitsTask:
    """Digits split into train/test, with a fraction of the training labels randomised."""

    x_train: torch.Tensor
    y_train: torch.Tensor  # labels used for training (noisy)
    y_true: torch.Tensor  # the true labels of the training images
    mislabeled: torch.Tensor  # bool: assigned label != true label
    x_test: torch.Tensor
    y_test: torch.Tensor
    noise: float


def make_task(seed: int, noise: float, n_train: int = 1200) -> DigitsTask:
    """Split digits with a private generator; replace ``noise`` of the labels by random classes."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on environment
        raise ImportError(
            "the demo needs scikit-learn (for its bundled digits data): pip install scikit-learn"
        ) from exc
    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(10_000 + seed)
    perm = torch.randperm(len(x), generator=g)
    tr, te = perm[:n_train], perm[n_train:]
    y_train = y[tr].clone()
    flip = torch.rand(n_train, generator=g) < noise
    y_train[flip] = torch.randint(0, 10, (int(flip.sum()),), generator=g)
    return DigitsTask(x[tr], y_train, y[tr], y_train != y[tr], x[te], y[te], noise)


def make_model(seed: int, width: int = 128) -> nn.Module:
    """The demo MLP, initialised from a private generator (the global RNG is untouched)."""
    net = nn.Sequential(
        nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
    )
    g = torch.Generator().manual_seed(20_000 + seed)
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.in_features)  # PyTorch's default Linear init
                m.weight.uniform_(-bound, bound, generator=g)
                m.bias.uniform_(-bound, bound, generator=g)
    return net


@dataclass
class RunResult:
    """One training run: the monitor's records plus the final accuracies."""

    seed: int
    noise: float
    steps: int
    records: list[dict] = field(default_factory=list)
    alarms: list[dict] = field(default_factory=list)
    final: dict = field(default_factory=dict)
    seconds: float = 0.0


def _metrics(net: nn.Module, task: DigitsTask) -> dict:
    with torch.no_grad():
        was = net.training
        net.eval()
        pred = net(task.x_train).argmax(1)
        test = net(task.x_test).argmax(1)
        net.train(was)
    mis = task.mislabeled
    return {
        "train_acc": float((pred == task.y_train).float().mean()),
        "memorised": float((pred[mis] == task.y_train[mis]).float().mean()) if bool(mis.any()) else 0.0,
        "test_acc": float((test == task.y_test).float().mean()),
    }


def train_run(
    seed: int,
    noise: float,
    epochs: int,
    monitor_factory=None,
    *,
    batch_size: int = 64,
    lr: float = 1e-3,
    width: int = 128,
    progress=None,
    desc: str = "",
) -> RunResult:
    """Train the demo MLP with Adam; ``monitor_factory(model, criterion) -> Monitor`` or None.

    The monitor is stepped after every optimiser step with the current batch; each record
    also carries ``train_acc``, ``memorised`` and ``test_acc``. ``progress(done, total, desc)``
    is called once per epoch.
    """
    task = make_task(seed, noise)
    net = make_model(seed, width)
    crit = nn.CrossEntropyLoss()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    mon = monitor_factory(net, crit) if monitor_factory is not None else None
    g = torch.Generator().manual_seed(30_000 + seed)
    n = len(task.x_train)
    step = 0
    t0 = time.perf_counter()
    for ep in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - batch_size + 1, batch_size):
            b = perm[i : i + batch_size]
            xb, yb = task.x_train[b], task.y_train[b]
            opt.zero_grad(set_to_none=True)
            loss = crit(net(xb), yb)
            loss.backward()
            opt.step()
            if mon is not None:
                mon.step(step, data=(xb, yb), loss_value=loss.detach(), extra=lambda: _metrics(net, task))
            step += 1
        if progress is not None:
            progress(ep + 1, epochs, desc)
    res = RunResult(
        seed=seed, noise=noise, steps=step, seconds=time.perf_counter() - t0, final=_metrics(net, task)
    )
    if mon is not None:
        res.records = mon.history
        res.alarms = [a.to_dict() for a in mon.alarms]
        mon.close()
    return res


# --------------------------------------------------------------------------- the demo
class _Bar:
    """Epoch progress on stderr (tqdm when installed)."""

    def __init__(self, total: int, enabled: bool = True):
        self.enabled = enabled
        self.total = total
        self.done = 0
        self.t0 = time.perf_counter()
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, unit="epoch", leave=False, file=sys.stderr)
            except ImportError:
                self.bar = None

    def __call__(self, done: int, total: int, desc: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_description(desc)
            self.bar.update(1)
        else:
            sys.stderr.write(f"\r{desc}: epoch {done}/{total} ({time.perf_counter() - self.t0:.0f} s)")
            sys.stderr.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            sys.stderr.write("\n")


def _series(records: list[dict], block: str) -> tuple[list[float], list[float], list[int]]:
    x = [r["blocks"][block]["trace"] for r in records]
    se = [r["blocks"][block]["se"] for r in records]
    st = [r["step"] for r in records]
    return x, se, st


def run_demo(
    out: str | Path = "hutchtrace-demo",
    quick: bool = False,
    seed: int = 0,
    noise: float = 0.4,
    progress: bool = True,
    stream=None,
) -> dict:
    """Run the demo and write the report folder; returns the summary dict.

    Protocol (the memorisation experiment's protocol A, with one reference run):

    1. Both runs are monitored by a :class:`~hutchtrace.monitor.monitor.Monitor`: per-module traces,
       ``K=8`` probes on the current batch every ``every`` steps (fixed interval, so both runs
       are measured at the same steps), the loss and the gradient norm, logged to JSONL.
    2. The clean run's monitor carries a one-sided (``"up"``) CUSUM on every layer, ``k=0.5``,
       that calibrates itself on the first ``warmup`` measurements ("healthy early training")
       and then watches the rest of the run. ``h`` is simulated for a false-alarm probability
       of ``0.05 / L`` per layer (Bonferroni over the L layers: <= 5 % for the run) over the
       run's measurements, including the warm-up estimation error.
    3. That calibration is reused unchanged (``restart()``: same ``mu0``, scale and ``h``,
       statistics zeroed) by the noisy run's monitor from its first measurement on.
    """
    stream = sys.stdout if stream is None else stream
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: intra-op threads only add contention
    try:
        return _run_demo(out, quick, seed, noise, progress, stream)
    finally:
        torch.set_num_threads(threads)


def _run_demo(out, quick, seed, noise, progress, stream) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = _DemoConfig.make(quick, seed, noise)
    t0 = time.perf_counter()
    bar = _Bar(2 * cfg.epochs, enabled=progress)
    detector = CUSUMDetector(k=0.5, alpha=0.05 / cfg.n_layers, horizon=cfg.n_meas, direction="up",
                             warmup=cfg.warmup, n_paths=20_000, seed=seed)
    runs = {}
    for arm, nz in (("clean", 0.0), ("noisy", noise)):
        if arm == "noisy":
            detector = detector.copy().restart()  # calibrated once, on the clean run
        runs[arm] = _train_arm(cfg, out / f"{arm}.jsonl", nz, detector, bar, f"{arm} ({nz:.0%} random labels)")
    bar.close()
    summary = {"config": _config_summary(cfg, detector), "runs": {}}
    for arm, res in runs.items():
        summary["runs"][arm] = _arm_summary(arm, res, detector.names)
        plot_monitor(
            res.records,
            out / f"{arm}.png",
            title=f"digits MLP, {res.noise:.0%} random labels (seed {seed}): per-layer Hessian traces",
        )
    _plot_comparison(runs, out / "comparison.png", cfg.warmup, summary)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    md = _summary_md(summary)
    (out / "summary.md").write_text(md)
    stream.write(md + f"\nReport written to {out.resolve()}\n")
    stream.flush()
    return summary


@dataclass(frozen=True)
class _DemoConfig:
    """The demo's schedule: epochs, how often the monitor measures, the detector's warm-up."""

    epochs: int
    every: int
    warmup: int
    noise: float
    seed: int
    steps_per_epoch: int = 1200 // 64
    n_layers: int = 3
    K: int = 8

    @classmethod
    def make(cls, quick: bool, seed: int, noise: float) -> _DemoConfig:
        return cls(epochs=40 if quick else 300, every=10 if quick else 25, warmup=12 if quick else 16,
                   noise=noise, seed=seed)

    @property
    def n_meas(self) -> int:
        return -(-self.epochs * self.steps_per_epoch // self.every)


def _train_arm(cfg: _DemoConfig, log: Path, noise: float, detector, bar, desc: str):
    """Train one arm with a Monitor writing ``log`` (a fresh file)."""
    if log.exists():
        log.unlink()

    def factory(model, crit):
        return Monitor(model, crit, every=cfg.every, K=cfg.K, blocks="module", overhead=None,
                       detector=detector, sinks=[JSONLSink(log, fsync=False)], seed=cfg.seed)

    return train_run(cfg.seed, noise, cfg.epochs, factory, progress=bar, desc=desc)


def _config_summary(cfg: _DemoConfig, detector) -> dict:
    names = detector.names
    return {
        "epochs": cfg.epochs,
        "steps_per_epoch": cfg.steps_per_epoch,
        "every": cfg.every,
        "K": cfg.K,
        "warmup": cfg.warmup,
        "noise": cfg.noise,
        "seed": cfg.seed,
        "layers": names,
        "detector": {
            "k": detector.k,
            "h": detector.h,
            "direction": detector.direction,
            "threshold": detector.threshold_source,
            "mu0": dict(zip(names, detector.mu0.tolist())),
            "sigma_proc": dict(zip(names, np.sqrt(detector.sigma_proc2).tolist())),
            "rho": dict(zip(names, detector.rho.tolist())),
        },
    }


def _arm_summary(arm: str, res, names) -> dict:
    """One arm's alarms, per-layer trace range and (noisy arm) the onset of memorisation."""
    alarms = res.alarms
    first = alarms[0] if alarms else None
    onset = None
    if arm == "noisy":  # sustained: from here on >= 10 % of the mislabeled examples memorised
        for r in reversed(res.records):
            if r["memorised"] < 0.1:
                break
            onset = r["step"]
    per_layer = {}
    for b in names:
        x, _, _ = _series(res.records, b)
        la = [a for a in alarms if a["block"] == b]
        per_layer[b] = {
            "start": x[0],
            "max": max(x),
            "end": x[-1],
            "alarms": len(la),
            "first_alarm_step": la[0]["step"] if la else None,
        }
    return {
        "noise": res.noise,
        "steps": res.steps,
        "seconds": round(res.seconds, 2),
        "final": res.final,
        "alarms": len(alarms),
        "first_alarm": first,
        "memorisation_onset_step": onset,
        "memorised_at_first_alarm": None
        if first is None
        else next(r["memorised"] for r in res.records if r["step"] == first["step"]),
        "layers": per_layer,
    }


def _plot_comparison(runs: dict, path: Path, warmup: int, summary: dict) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.6))
    axes = fig.subplots(1, 2)
    for arm, res in runs.items():
        color = "tab:blue" if arm == "clean" else "tab:red"
        x, se, st = _series(res.records, DEMO_BLOCK)
        axes[0].plot(st, x, color=color, lw=1, label=f"{arm} ({res.noise:.0%} random)")
        lo = [a - 2 * b for a, b in zip(x, se)]
        hi = [a + 2 * b for a, b in zip(x, se)]
        axes[0].fill_between(st, lo, hi, color=color, alpha=0.2, lw=0)
        fa = summary["runs"][arm]["layers"][DEMO_BLOCK]["first_alarm_step"]
        if fa is not None:
            axes[0].axvline(fa, color=color, ls="--", lw=1)
        axes[1].plot(
            st,
            [r.get("memorised", 0.0) if arm == "noisy" else r.get("train_acc") for r in res.records],
            color=color,
            lw=1,
            label="memorised fraction" if arm == "noisy" else "train accuracy",
        )
    axes[0].axvspan(
        runs["clean"].records[0]["step"],
        runs["clean"].records[warmup - 1]["step"],
        color="tab:orange",
        alpha=0.1,
        lw=0,
        label="calibration (clean)",
    )
    axes[0].set_title("first-layer trace ±2 SE; dashed: its first CUSUM alarm", fontsize=9)
    axes[0].set_xlabel("step")
    axes[0].legend(fontsize=7)
    axes[1].set_title(
        "clean run: train accuracy; noisy run: fraction of mislabeled\nexamples predicted with "
        "their random label (memorised)",
        fontsize=9,
    )
    axes[1].set_xlabel("step")
    axes[1].legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _summary_md(s: dict) -> str:
    c = s["config"]
    det = c["detector"]
    th = det["threshold"]
    lines = [
        "# hutchtrace demo: curvature monitoring of label memorisation",
        "",
        f"digits MLP 64-128-128-10, Adam, {c['epochs']} epochs x {c['steps_per_epoch']} steps, clean labels "
        "vs "
        f"{c['noise']:.0%} random labels. Per-layer Hessian traces (K={c['K']} probes on the current batch) "
        "every "
        f"{c['every']} steps.",
        f"One-sided ({det['direction']}) CUSUM per layer, k={det['k']}, h={det['h']:.2f} (false-alarm "
        "probability "
        f"{th.get('alpha'):.3g} per layer over {th.get('horizon')} measurements), calibrated once on the "
        "clean run's "
        f"first {c['warmup']} measurements and reused unchanged for the noisy run.",
        "",
        "| run | random labels | train acc | memorised | test acc | alarms | first alarm |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, r in s["runs"].items():
        f = r["final"]
        fa = r["first_alarm"]
        fa_s = "none" if fa is None else f"layer {fa['block']} {fa['direction']} at step {fa['step']}"
        lines.append(
            f"| {arm} | {r['noise']:.0%} | {f['train_acc']:.3f} | {f['memorised']:.3f} | "
            f"{f['test_acc']:.3f} | {r['alarms']} | {fa_s} |"
        )
    lines += [
        "",
        "| run | layer | trace at start | max | end | alarms | first alarm (step) |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, r in s["runs"].items():
        for b, v in r["layers"].items():
            first = "-" if v["first_alarm_step"] is None else str(v["first_alarm_step"])
            lines.append(
                f"| {arm} | {b} | {v['start']:.3g} | {v['max']:.3g} | {v['end']:.3g} | {v['alarms']} | "
                f"{first} |"
            )
    nz = s["runs"].get("noisy", {})
    lines.append("")
    if nz.get("memorisation_onset_step") is not None:
        lines.append(
            f"Memorisation onset in the noisy run (from then on >= 10 % of the mislabeled examples "
            f"predicted with their random label): step {nz['memorisation_onset_step']}."
        )
    else:
        lines.append(
            "The noisy run did not reach a sustained 10 % memorisation of its mislabeled examples"
            " (run longer than --quick to see it)."
        )
    if nz.get("memorised_at_first_alarm") is not None:
        lines.append(
            f"At the noisy run's first alarm {nz['memorised_at_first_alarm']:.1%} of the mislabeled examples "
            "were memorised."
        )
    lines += [
        "",
        f"Total time {s['seconds']} s. Files: clean.png, noisy.png, comparison.png, clean.jsonl, "
        "noisy.jsonl, summary.json.",
    ]
    return "\n".join(lines) + "\n"
