"""Shared builders and timing helpers of the throughput suites (not collected by pytest).

Every suite times the same four models, at two scales:

========  =====================================================  ==================================
name      model (``hutchtrace.zoo``)                              why
========  =====================================================  ==================================
mlp       tanh MLP 64-256-256-10, cross-entropy                   dense layers, few large blocks
cnn       ``SmallCNN`` (conv-BN-tanh-pool x2, BN in train mode)   convolutions, BatchNorm coupling
resnet    ``ResNetSmall`` (ResNet-18 layout, 4 stages x 2 blocks) 62 blocks, residual adds, BN
lm        ``TinyLM`` 2 layers, vocab 256, d 64, ctx 32, tied emb  attention, LayerNorm, weight tying
========  =====================================================  ==================================

``scale="bench"`` are the CPU sizes of the overhead and memory suites (a bare HVP takes a
few milliseconds on one core); ``scale="small"`` the sizes of the probing and peer suites,
which run thousands of probes to reach a 5 % relative standard error; ``scale="gpu"``
larger versions for a GPU. Everything is float32 unless stated.
"""

from __future__ import annotations

import math

import os
import platform
import statistics
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from hutchtrace import zoo

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

MODELS = ("mlp", "cnn", "resnet", "lm")

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
        "resnet": lambda dt: zoo.make_resnet(n=8, size=8, width=4, dtype=dt),
        "lm": lambda dt: zoo.make_lm(n=4, vocab=32, d=16, ctx=8, layers=2, dtype=dt),
    },
    "gpu": {
        "mlp": lambda dt: zoo.make_mlp(n=1024, sizes=(256, 1024, 1024, 10), dtype=dt),
        "cnn": lambda dt: zoo.make_cnn(n=256, size=8, width=64, dtype=dt),
        "resnet": lambda dt: zoo.make_resnet(n=64, size=32, width=32, dtype=dt),
        "lm": lambda dt: zoo.make_lm(n=32, vocab=256, d=64, ctx=32, layers=2, dtype=dt),
    },
}


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
    from hutchtrace import _ext, ops

    env = {
        "commit": commit,
        "hutchtrace_path": str(Path(hutchtrace.__file__).parent),
        "hutchtrace_dirty": dirty,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "extension": _ext.HAS_EXT,
        "backend_cpu": ops.backend_name("cpu"),
        "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
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
    from hutchtrace.state import PreservedState

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


def write_results(suite: str, data: dict, markdown: str) -> Path:
    """``bench/results/<prefix>_<suite>.json`` and ``.md`` (prefix ``cpu``/``gpu`` from the
    device, or ``HUTCHTRACE_BENCH_PREFIX``). Quick (smoke) runs write under /tmp instead."""
    prefix = os.environ.get("HUTCHTRACE_BENCH_PREFIX") or ("gpu" if device().startswith("cuda") else "cpu")
    out_dir = Path(os.environ.get("HUTCHTRACE_BENCH_OUT", "/tmp/hutchtrace-bench" if quick() else RESULTS))
    out_dir.mkdir(parents=True, exist_ok=True)
    import json

    data = {"suite": suite, "environment": environment(), "quick": quick(), **data}
    path = out_dir / f"{prefix}_{suite}.json"
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    env = data["environment"]
    head = (f"<!-- generated by bench/{'bench_' + suite if not suite.startswith('gpu') else suite}.py; "
            f"commit {env['commit'][:12]}, torch {env['torch']}, {env.get('gpu') or env['cpu']}, "
            f"{env['threads']} thread(s), load average {env['loadavg']} -->\n")
    (out_dir / f"{prefix}_{suite}.md").write_text(head + markdown.rstrip() + "\n")
    return path


def bare_probe_loop(model, crit, data, K: int, backbone: str, rows: int, dev="cpu"):
    """Return ``fn()``: the bare work of ``K`` probes with backbone ``backbone``: build the
    batch (forward, first-order graph for the reverse backbones) once, then the HVPs of
    ``K`` distinct pre-generated vectors, ``rows`` per call for the batched backbones. No probe
    generation, no reduction, no statistics: what a hand-written HVP loop would time."""
    from hutchtrace.blocks import resolve_blocks
    from hutchtrace.hvp import make_backbone
    from hutchtrace.loss import make_loss_spec
    from hutchtrace.state import ForwardRNG

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


# ------------------------------------------------------------- time-to-accuracy extrapolation
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


def extrapolate(x: dict, eps: torch.Tensor) -> None:
    """Scale an unconverged run's time and rows by ``K*/K``, ``K* = K max_b (SE_b/eps_b)^2``
    with ``eps_b`` from :func:`target_eps` of the model's :func:`pooled_means`; in place.

    Pooled means, not each run's own: for a block whose trace is not yet resolved
    (``SE_b ~ |mean_b|``) a run's own ``K*`` scales with ``1/mean_b^2`` of a noisy mean, and
    comparisons between methods would be noise."""
    se = torch.tensor(x["se"], dtype=torch.float64)
    need = x["K"] * float(((se / eps) ** 2).max())
    if not math.isfinite(need):
        raise ValueError(f"cannot extrapolate a run with non-finite standard errors: {x['se']}")
    scale = 1.0 if x["converged"] else max(1.0, need / x["K"])
    x.update({"seconds": x["measured_seconds"] * scale, "rows": x["measured_rows"] * scale, "probes_needed": need})
