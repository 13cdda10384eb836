"""Shared builders and timing helpers of the throughput suites (not collected by pytest).

Every suite times the same four models, at two scales:

========  =====================================================  ==================================
name      model (``hutchtrace.zoo``)                              why
========  =====================================================  ==================================
mlp       tanh MLP 64-256-256-10, cross-entropy                   dense layers, few large blocks
cnn       ``SmallCNN`` (conv-BN-tanh-pool x2, BN in train mode)   convolutions, BatchNorm coupling
resnet    ResNet layout: ``bench``: ``ResNetSmall`` (ResNet-18,    residual adds, BN, many blocks
          4 stages x 2 basic blocks, 62 blocks); ``small``:
          :class:`ResNetStages` (2 stages x 1 basic block, 20
          blocks, the same basic block)
lm        ``TinyLM`` 2 layers, vocab 256, d 64, ctx 32, tied emb  attention, LayerNorm, weight tying
========  =====================================================  ==================================

``scale="bench"`` are the CPU sizes of the overhead and memory suites (a bare HVP takes a
few milliseconds on one core); ``scale="small"`` the sizes of the probing and peer suites,
which run thousands of probes to reach a 5 % relative standard error; ``scale="gpu"``
larger versions for a GPU. Everything is float32 unless stated.

The ``small`` ResNet is a shallower instance of the same family: the ResNet-18 layout at
``small`` scale (62 blocks) needs of the order of 10^5-10^6 HVP rows to reach the target
under every scheme, hours on one core, which only an extrapolation could report. Two
stages of the same basic block (stem, one block per stage, a projection shortcut, BatchNorm
in train mode, 20 blocks) reach it in seconds to minutes, so its times are measured.

Also here: where results go (:func:`output_dir`; committed results only from a quiet
machine, :func:`write_results`), robust summaries of interleaved timings (:func:`spread`,
:func:`verdict`), and the projection rule for runs that stop at their probe cap
(:func:`project`: at most :data:`MAX_PROJECTION` times the measured run).
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hutchtrace import zoo

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

MODELS = ("mlp", "cnn", "resnet", "lm")
SCRATCH = Path("/tmp/hutchtrace-bench")
MAX_PROJECTION = 10.0  # never publish a time-to-target projected beyond 10x the measured run


class ResNetStages(nn.Module):
    """A ResNet layout with ``len(stages)`` stages of ``zoo``'s basic block (two 3x3 convs with
    BatchNorm, a residual add, a 1x1 projection shortcut where the shape changes); stage ``i``
    has ``stages[i]`` blocks and ``width * 2**i`` channels, stride 2 from the second stage on.
    ``stages=(2, 2, 2, 2)`` is ``zoo.ResNetSmall`` (ResNet-18)."""

    def __init__(self, stages=(1, 1), width=4, in_ch=3, classes=10):
        super().__init__()
        from hutchtrace.zoo import _BasicBlock

        self.stem = nn.Sequential(nn.Conv2d(in_ch, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        cin, layers = width, []
        for i, blocks in enumerate(stages):
            c = width * 2**i
            layers.append(nn.Sequential(*[_BasicBlock(cin if j == 0 else c, c, (1 if i == 0 else 2) if j == 0 else 1)
                                          for j in range(blocks)]))
            cin = c
        self.stages = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.stages(self.stem(x)), 1).flatten(1))


def make_resnet_stages(n=8, size=8, width=4, stages=(1, 1), classes=10, seed=0, dtype=torch.float32):
    """:class:`ResNetStages` in train mode on random 3 x size x size images, initialised like
    ``zoo.make_resnet`` (the same generator streams)."""
    from hutchtrace.zoo import _build, _gen, _init

    model = _init(_build(ResNetStages, stages, width, 3, classes), seed, dtype).train()
    g = _gen(seed + 1)
    x = torch.randn(n, 3, size, size, generator=g).to(dtype)
    y = torch.randint(0, classes, (n,), generator=g)
    return model, nn.CrossEntropyLoss(), (x, y)


_SPECS = {
    "bench": {
        "mlp": lambda dt: zoo.make_mlp(n=256, sizes=(64, 256, 256, 10), dtype=dt),
        "cnn": lambda dt: zoo.make_cnn(n=64, size=8, width=16, dtype=dt),
        "resnet": lambda dt: zoo.make_resnet(n=8, size=16, width=8, dtype=dt),
        "lm": lambda dt: zoo.make_lm(n=8, vocab=256, d=64, ctx=32, layers=2, dtype=dt),
    },
    "small": {
        "mlp": lambda dt: zoo.make_mlp(n=64, sizes=(16, 32, 32, 8), dtype=dt),
        "cnn": lambda dt: zoo.make_cnn(n=16, size=8, width=4, dtype=dt),
        "resnet": lambda dt: make_resnet_stages(n=8, size=8, width=4, stages=(1, 1), dtype=dt),
        "lm": lambda dt: zoo.make_lm(n=4, vocab=32, d=16, ctx=8, layers=2, dtype=dt),
    },
    "gpu": {
        "mlp": lambda dt: zoo.make_mlp(n=1024, sizes=(256, 1024, 1024, 10), dtype=dt),
        "cnn": lambda dt: zoo.make_cnn(n=256, size=8, width=64, dtype=dt),
        "resnet": lambda dt: zoo.make_resnet(n=64, size=32, width=32, dtype=dt),
        "lm": lambda dt: zoo.make_lm(n=32, vocab=256, d=64, ctx=32, layers=2, dtype=dt),
    },
}


DESCRIPTIONS = {
    "bench": {
        "mlp": "tanh MLP 64-256-256-10, batch 256",
        "cnn": "conv-BN-tanh-pool x2 (BatchNorm in train mode), width 16, batch 64",
        "resnet": "ResNet-18 layout (4 stages x 2 basic blocks, BN train), width 8, 8 images 16x16",
        "lm": "causal transformer LM, tied embeddings, LayerNorm; 2 layers, vocab 256, d 64, ctx 32, batch 8",
    },
    "small": {
        "mlp": "tanh MLP 16-32-32-8, batch 64",
        "cnn": "conv-BN-tanh-pool x2 (BatchNorm in train mode), width 4, batch 16",
        "resnet": "ResNet layout, 2 stages x 1 basic block (BN train, projection shortcut), width 4, 8 images 8x8",
        "lm": "causal transformer LM, tied embeddings, LayerNorm; 2 layers, vocab 32, d 16, ctx 8, batch 4",
    },
    "gpu": {
        "mlp": "tanh MLP 256-1024-1024-10, batch 1024",
        "cnn": "conv-BN-tanh-pool x2, width 64, batch 256",
        "resnet": "ResNet-18 layout, width 32, 64 images 32x32",
        "lm": "causal transformer LM, tied embeddings; 2 layers, vocab 256, d 64, ctx 32, batch 32",
    },
}


def describe(name: str, scale: str) -> str:
    return DESCRIPTIONS.get(scale, {}).get(name, name)


def make(name: str, scale: str = "bench", dtype=torch.float32, device="cpu"):
    """``(model, criterion, (inputs, targets))`` of benchmark model ``name`` on ``device``."""
    model, crit, (x, y) = _SPECS[scale][name](dtype)
    return model.to(device), crit, (x.to(device), y.to(device))


def numel(model) -> int:
    seen, n = set(), 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def set_threads() -> int:
    """One intra-op thread unless ``HUTCHTRACE_BENCH_THREADS`` says otherwise (the machine
    is shared: one thread gives reproducible ratios)."""
    n = int(os.environ.get("HUTCHTRACE_BENCH_THREADS", "1"))
    torch.set_num_threads(n)
    return n


def quick() -> bool:
    """``HUTCHTRACE_BENCH_QUICK=1``: smoke-test sizes (seconds), numbers not meaningful."""
    return os.environ.get("HUTCHTRACE_BENCH_QUICK", "0") not in ("", "0")


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device="cpu") -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def interleave(fns: dict, rounds: int, device="cpu") -> dict[str, list[float]]:
    """Time every callable once per round, in rotating order, ``rounds`` times.

    Interleaving exposes every variant to the same background load (the machine is shared),
    so ratios of medians (or of minima) are meaningful even when absolute times drift.
    """
    names = list(fns)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            out[n].append(timed(fns[n], device))
    return out


def summary(times: list[float]) -> dict:
    return {"min": min(times), "median": statistics.median(times), "max": max(times), "n": len(times)}


def spread(values) -> dict:
    """``{median, q1, q3, min, max, n}`` of a list of per-round values (quartiles by the
    inclusive method; with one value every field is that value)."""
    v = sorted(float(x) for x in values)
    if not v:
        raise ValueError("spread() of no values")
    q1, q3 = (statistics.quantiles(v, n=4, method="inclusive")[::2] if len(v) >= 2 else (v[0], v[0]))
    return {"median": statistics.median(v), "q1": q1, "q3": q3, "min": v[0], "max": v[-1], "n": len(v)}


def noise_band(sp: dict) -> tuple[float, float]:
    """The band a per-round statistic moves in: the interquartile range with 5 rounds or
    more, else the full range (a quartile of 2-4 values says little)."""
    return (sp["q1"], sp["q3"]) if sp["n"] >= 5 else (sp["min"], sp["max"])


def verdict(sp: dict, threshold: float, want: str = "below") -> str:
    """``met`` / ``not met`` / ``inside the noise`` for a target ``value <= threshold``
    (``want="below"``) or ``>= threshold`` (``"above"``), judged on :func:`noise_band`: a
    target is met or missed only when the whole band is on one side of it."""
    lo, hi = noise_band(sp)
    if want == "below":
        return "met" if hi <= threshold else ("not met" if lo > threshold else "inside the noise")
    return "met" if lo >= threshold else ("not met" if hi < threshold else "inside the noise")


def paired_ratios(num: list[float], den: list[float]) -> list[float]:
    """Per-round ratios ``num[r] / den[r]`` of interleaved timings (same round, same load)."""
    return [a / b for a, b in zip(num, den)]


def environment() -> dict:
    """Versions, device and commit for the result files."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "hutchtrace"], cwd=ROOT,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except Exception:  # no git
        commit, dirty = "unknown", None
    import hutchtrace
    from hutchtrace.kernels import loader, ops

    env = {
        "commit": commit,
        "hutchtrace_path": str(Path(hutchtrace.__file__).parent),
        "hutchtrace_dirty": dirty,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "extension": loader.HAS_EXT,
        "backend_cpu": ops.backend_name("cpu"),
        "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
        env["backend_cuda"] = ops.backend_name("cuda")
    return env


@contextmanager
def preserved(model):
    """The state guard hutchtrace uses (BatchNorm-train made functorch-safe, SDPA math kernel,
    everything restored on exit); the peers and the bare baselines run inside it too, so
    every method differentiates the same function."""
    from hutchtrace.core.state import PreservedState

    with PreservedState(model):
        yield


def md_table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        if isinstance(v, float):
            if v != v:
                return "-"
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def device() -> str:
    """``HUTCHTRACE_BENCH_DEVICE`` (default ``cpu``)."""
    return os.environ.get("HUTCHTRACE_BENCH_DEVICE", "cpu")


def scale(default: str) -> str:
    """``HUTCHTRACE_BENCH_SCALE`` overrides the suite's model scale (``bench``/``small``/``gpu``)."""
    return os.environ.get("HUTCHTRACE_BENCH_SCALE", default)


class LoadTooHigh(RuntimeError):
    """A suite meant for bench/results/ ran on a machine busier than its core count."""


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def cores() -> int:
    return os.cpu_count() or 1


class _LoadSampler:
    """Samples the 1-minute load average every ``every`` seconds in a daemon thread, so a
    suite records its load at the start, the end and its peak in between."""

    def __init__(self, every: float = 5.0):
        self.start = load_average()
        self.samples = [self.start] if self.start is not None else []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._thread.start()

    def _run(self, every):
        while not self._stop.wait(every):
            x = load_average()
            if x is not None:
                self.samples.append(x)

    def finish(self) -> dict:
        self._stop.set()
        end = load_average()
        if end is not None:
            self.samples.append(end)
        peak = max(self.samples) if self.samples else None
        return {"start": self.start, "end": end, "peak": peak, "cores": cores()}


_SUITES: dict[str, _LoadSampler] = {}


def begin_suite(suite: str) -> None:
    """Start recording the load of ``suite`` (each bench module calls it when it starts)."""
    _SUITES.setdefault(suite, _LoadSampler())


def publishing() -> bool:
    """``HUTCHTRACE_BENCH_PUBLISH=1`` (``run_cpu_suite.py --publish``): write to bench/results/."""
    return os.environ.get("HUTCHTRACE_BENCH_PUBLISH", "0") not in ("", "0")


def allow_load() -> bool:
    """``HUTCHTRACE_BENCH_ALLOW_LOAD=1`` (``--allow-load``): publish a run made under load,
    labelled as such in the results and the rendered tables."""
    return os.environ.get("HUTCHTRACE_BENCH_ALLOW_LOAD", "0") not in ("", "0")


def output_dir() -> Path:
    """Where results go: ``HUTCHTRACE_BENCH_OUT`` if set, else bench/results/ when publishing
    (and not a quick run), else the scratch directory /tmp/hutchtrace-bench."""
    if os.environ.get("HUTCHTRACE_BENCH_OUT"):
        return Path(os.environ["HUTCHTRACE_BENCH_OUT"])
    return RESULTS if publishing() and not quick() else SCRATCH


def load_over(load: dict) -> bool:
    """A run counts as loaded when the load average at its start or its end exceeded the
    number of cores (the benchmark itself adds about 1)."""
    return any(x is not None and x > load["cores"] for x in (load.get("start"), load.get("end")))


def write_results(suite: str, data: dict, markdown: str, *, source: str | None = None, timed: bool = True) -> Path:
    """``<out>/<prefix>_<suite>.json`` and ``.md`` (prefix ``cpu``/``gpu`` from the device, or
    ``HUTCHTRACE_BENCH_PREFIX``; ``<out>`` from :func:`output_dir`).

    The load average at the start, the end and the peak of the suite is recorded. Results
    meant for bench/results/ from a run whose load exceeded the core count are **refused**
    (written to /tmp/hutchtrace-bench/refused/, and :class:`LoadTooHigh` is raised) unless
    ``HUTCHTRACE_BENCH_ALLOW_LOAD=1``, in which case they are labelled ``loaded``.
    ``timed=False`` (results that do not depend on the load, e.g. HVP row counts): the load
    is recorded, never enforced. ``source``: the generating script, for the header."""
    import json

    prefix = os.environ.get("HUTCHTRACE_BENCH_PREFIX") or ("gpu" if device().startswith("cuda") else "cpu")
    out_dir = output_dir()
    sampler = _SUITES.pop(suite, None)
    load = sampler.finish() if sampler else {"start": None, "end": load_average(), "peak": None, "cores": cores()}
    committed = out_dir.resolve() == RESULTS.resolve()
    loaded = timed and load_over(load)
    refused = committed and loaded and not allow_load()
    if refused:
        out_dir = SCRATCH / "refused"
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {"suite": suite, "environment": environment(), "quick": quick(), "load": load,
            "loaded": loaded, **data}
    path = out_dir / f"{prefix}_{suite}.json"
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    env = data["environment"]
    src = source or f"bench/{'bench_' + suite if not suite.startswith('gpu') else suite}.py"
    head = (f"<!-- generated by {src}; commit {env['commit'][:12]}, torch {env['torch']}, "
            f"{env.get('gpu') or env['cpu']}, {env['threads']} thread(s), load average start {load['start']} / "
            f"end {load['end']} / peak {load['peak']} on {load['cores']} cores -->\n")
    if loaded:
        head += (f"\n**Measured under load** (load average above the {load['cores']} cores); "
                 "not comparable with quiet runs.\n\n")
    (out_dir / f"{prefix}_{suite}.md").write_text(head + markdown.rstrip() + "\n")
    if refused:
        raise LoadTooHigh(
            f"{suite}: the load average was {load['start']} at the start and {load['end']} at the end, above the "
            f"{load['cores']} cores of this machine, so these timings would not be comparable with a quiet run; "
            f"bench/results/ was left untouched and the results went to {path}. Re-run on a quiet machine, or "
            "pass --allow-load (HUTCHTRACE_BENCH_ALLOW_LOAD=1) to publish them labelled as measured under load.")
    return path


def bare_probe_loop(model, crit, data, K: int, backbone: str, rows: int, dev="cpu"):
    """Return ``fn()``: the bare work of ``K`` probes with backbone ``backbone``: build the
    batch (forward, first-order graph for the reverse backbones) once, then the HVPs of
    ``K`` distinct pre-generated vectors, ``rows`` per call for the batched backbones. No probe
    generation, no reduction, no statistics: what a hand-written HVP loop would time."""
    from hutchtrace.backbones.base import make_backbone
    from hutchtrace.core.state import ForwardRNG
    from hutchtrace.problem.blocks import resolve_blocks
    from hutchtrace.problem.loss import make_loss_spec

    layout = resolve_blocks(model, "param")
    spec = make_loss_spec(crit, data)
    batch = next(iter(spec.batches()))
    g = torch.Generator().manual_seed(0)
    R = rows if backbone.endswith(("batched", "vmap")) else 1
    calls = -(-K // R)
    # one distinct vector per probe (a single reused vector would sit in the cache, which the
    # probes of a real run do not)
    vsets = [[torch.randn((R,) + tuple(t.shape), generator=g).to(dtype=t.dtype, device=t.device)
              for t in layout.tensors] for _ in range(calls)]
    vsets = [vs if R > 1 else [v[0] for v in vs] for vs in vsets]

    def fn():
        with preserved(model):
            rng = ForwardRNG([torch.device(dev)])
            rng.start_batch()
            bb = make_backbone(backbone, model, layout.names, layout.tensors, rng)
            bb.prepare(batch)
            for vs in vsets:
                bb.hvp(vs)
            bb.release()
            rng.end_batch()

    return fn


# ------------------------------------------------------------- time to accuracy: projection
def target_eps(means: torch.Tensor, rtol: float = 0.05) -> torch.Tensor:
    """The estimator's per-block tolerance ``max(rtol |tr_b|, atol)``, default ``atol``."""
    atol = 0.01 * rtol * float(means.abs().max())
    return torch.clamp(rtol * means.abs(), min=atol)


def pooled_means(runs) -> torch.Tensor:
    """Inverse-variance weighted block means over runs (each unbiased; weights ``1/SE_b^2``).

    A run with ``SE_b = 0`` measured block b exactly (e.g. a zero Hessian block, or a
    1-element block probed alone): such runs alone define the pooled mean of b. Runs with
    a non-finite mean or SE are left out.
    """
    m = torch.tensor([x["means"] for x in runs], dtype=torch.float64)
    se = torch.tensor([x["se"] for x in runs], dtype=torch.float64)
    ok = torch.isfinite(m) & torch.isfinite(se)
    exact = ok & (se == 0)
    wt = torch.where(ok & (se > 0), 1.0 / torch.where(se > 0, se, 1.0) ** 2, 0.0)
    wt = torch.where(exact.any(0, keepdim=True), exact.double(), wt)
    m = torch.where(ok, m, 0.0)
    pooled = (wt * m).sum(0) / wt.sum(0)
    if not torch.isfinite(pooled).all():
        raise ValueError(f"no finite estimate for blocks {torch.nonzero(~torch.isfinite(pooled)).flatten().tolist()}")
    return pooled


def project(x: dict, eps: torch.Tensor) -> None:
    """Classify a run to the target, in place: ``status`` ``reached`` (its stopping rule was
    met), ``projected`` (stopped at its probe cap; ``K* = K max_b (SE_b/eps_b)^2`` probes
    needed, at most :data:`MAX_PROJECTION` times the ``K`` done) or ``not reached`` (more than
    that: no time or rows are given, only the measured lower bounds).

    A projection scales the measured time and rows by ``factor = K*/K``, assuming the plan
    and the per-probe variances stay as measured. ``eps_b`` comes from :func:`target_eps` of
    the model's :func:`pooled_means`, one reference for every method: for a block whose trace
    is not yet resolved (``SE_b ~ |mean_b|``) a run's own ``K*`` would scale with
    ``1/mean_b^2`` of a noisy mean."""
    se = torch.tensor(x["se"], dtype=torch.float64)
    need = x["K"] * float(((se / eps) ** 2).max())
    if not math.isfinite(need):
        raise ValueError(f"cannot project a run with non-finite standard errors: {x['se']}")
    factor = 1.0 if x["converged"] else max(1.0, need / x["K"])
    status = "reached" if x["converged"] else ("projected" if factor <= MAX_PROJECTION else "not reached")
    ok = status != "not reached"
    x.update({"status": status, "factor": factor, "probes_needed": need, "extrapolated": status == "projected",
              "seconds": x["measured_seconds"] * factor if ok else None,
              "rows": x["measured_rows"] * factor if ok else None})


def aggregate(runs: list[dict]) -> dict:
    """Time and rows to the target over rounds (seeds) of one method: medians and ranges of
    the runs that reached it or were projected; ``status`` is the worst over the rounds
    (``not reached`` if any round was), ``factor`` the largest projection."""
    order = {"reached": 0, "projected": 1, "not reached": 2}
    status = max((r["status"] for r in runs), key=order.get)
    out = {"status": status, "factor": max(r["factor"] for r in runs), "rounds": len(runs),
           "measured_seconds": spread([r["measured_seconds"] for r in runs]),
           "measured_rows": spread([r["measured_rows"] for r in runs])}
    if status != "not reached":
        out["seconds"] = spread([r["seconds"] for r in runs])
        out["rows"] = spread([r["rows"] for r in runs])
    return out


def round_ratios(num: list[dict], den: list[dict]) -> dict | None:
    """Per-round ratios ``seconds(num) / seconds(den)`` of two methods run in the same rounds
    (interleaved): their spread, and the projection factors involved; None when either
    method did not reach the target in some round."""
    if any(r["seconds"] is None for r in num + den):
        return None
    sp = spread(paired_ratios([r["seconds"] for r in num], [r["seconds"] for r in den]))
    sp["rows"] = spread(paired_ratios([r["rows"] for r in num], [r["rows"] for r in den]))
    sp["factor"] = max(r["factor"] for r in num + den)
    return sp
