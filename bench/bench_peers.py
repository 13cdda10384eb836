"""hutchtrace vs the peers on the same job at the same accuracy target (issue 9 (d)).

**The job.** Per-block (one block per parameter tensor) traces of the loss Hessian of one
batch, with a 5 % relative standard error on every block whose |trace| exceeds 1 % of the
largest, and the absolute floor ``atol = 0.01 * 0.05 * max_b |trace_b|`` on the others
(the rule of ``block_traces(rtol=0.05)``). Wall time from nothing (operator construction
included) to the target; HVP rows counted.

**The peers** have no per-block adaptive trace API, so each is given the best loop its
public API allows, written here once (``hutchinson_to_target``): Rademacher probes drawn
with torch, Hutchinson samples ``z_b . (H z)_b`` per block, rounds of probes until every
block meets the rule with its *sample* standard error (the peers report no other), the
round size growing as in ``block_traces``. Two schemes per peer, the faster reported:

* ``global``: one HVP of the whole model per probe, every block read off it (what
  PyHessian's ``hessian.trace()`` loop does, read per block);
* ``isolated``: per probe, one HVP per block with the probe supported on that block (the
  per-layer traces of HAWQ-V2-style analyses), ``L`` HVPs per probe.

The peers' HVPs:

* **PyHessian** 0.1: ``pyhessian.hessian(model, criterion, data)`` then its
  ``utils.hessian_vector_product(gradsH, params, v)`` (double backward through the graph it
  builds once). Shim: PyHessian calls ``model.eval()``, which would silently change the
  Hessian of BatchNorm models; the model is wrapped so that ``eval()`` keeps its mode.
* **curvlinops** 3.x: ``HessianLinearOperator(model, loss, params, [(x, y)])`` (global) and
  the same with ``block_sizes=[1] * L`` (its block-diagonal operator: all blocks' isolated
  products in one ``@``), applied to a block of probe columns at once (it vmaps over them).
  Shim: a criterion without a ``reduction`` attribute gets ``reduction = "mean"``.
* **hessian-eigenthings** 1.0: ``HessianOperator(model, [(x, y)], loss_fn)`` (global) and
  one operator per block with ``param_filter`` (isolated); it rebuilds the graph for every
  product.
* **BackPACK** 1.7: ``DiagHessian`` gives the exact Hessian diagonal, hence exact block
  traces in one extended backward pass, for the architectures it supports (``nn.Sequential``
  of supported layers: here the MLP only). Its time is that one pass.

Every method, hutchtrace included, runs inside the same state guard
(:class:`hutchtrace.core.state.PreservedState`: BatchNorm-train without running-stat updates,
SDPA math kernel), so all differentiate the same function. Before timing, every peer's HVP
is checked against hutchtrace's reverse HVP on a random vector (relative error <= 1e-3); a
peer that fails (e.g. a wrong product) is reported as such and not timed. BackPACK's traces
are checked against the exact Hessian. A peer that is not installed is skipped
(``pytest.importorskip``).

**Rounds.** One round per seed; within a round every method runs once, in an order that
rotates from round to round (background load hits every method alike). The speed-up over
the fastest peer is taken per round, ``peer seconds / hutchtrace seconds``, and reported as
the median and range over rounds.

**Measured, not extrapolated.** A run that stops at its probe cap or its time budget is
projected from its measured standard errors (``K* = K max_b (SE_b/eps_b)^2``, ``eps_b`` from
the traces pooled over every method's runs, :func:`models.project`) only when ``K*/K <= 10``,
and labelled with that factor; beyond 10x it is reported as not reached, with the measured
lower bound. hutchtrace runs ``probing="auto"``; its ``global`` and ``isolated`` schemes are
timed too so the table separates algorithm from implementation.

Target (issue 9): hutchtrace at least 3x faster than the fastest peer on every model where
that peer runs. Models: the ``small`` scale of :mod:`models`. One thread.

    pip install PyHessian curvlinops-for-pytorch backpack-for-pytorch hessian-eigenthings
    pytest bench/bench_peers.py -s
"""

from __future__ import annotations

import math
import time
import warnings

import models as bm
import pytest
import torch
from torch import nn

import hutchtrace
from hutchtrace.problem.blocks import resolve_blocks

RTOL = 0.05
PEERS = ("pyhessian", "curvlinops", "eigenthings", "backpack")
_RESULTS: dict[str, dict] = {}


SEEDS = (0, 1)


def _seeds():
    return SEEDS[:1] if bm.quick() else SEEDS


def _budget(scheme: str) -> float:
    """Wall-clock budget of one peer run. A peer's global scheme is never its fastest on the
    coupled models (it is reported as projected or not reached); its isolated scheme gets
    the time to reach the target or a projection within 10x."""
    if bm.quick():
        return 3.0
    return 15.0 if scheme == "global" else 60.0


def _cap(scheme: str, L: int) -> int:
    if bm.quick():
        return 32
    return 32000 if scheme == "global" else max(64, 80000 // L)


def peer_versions() -> dict:
    """Installed versions of the peers (None when absent)."""
    from importlib import metadata

    out = {}
    for peer, dist in (("pyhessian", "PyHessian"), ("curvlinops", "curvlinops-for-pytorch"),
                       ("eigenthings", "hessian-eigenthings"), ("backpack", "backpack-for-pytorch")):
        try:
            out[peer] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[peer] = None
    return out


# ----------------------------------------------------------------------------- the job
class Job:
    def __init__(self, name, dev):
        self.name = name
        self.dev = dev
        self.model, self.crit, self.data = bm.make(name, bm.scale("small"), device=dev)
        self.layout = resolve_blocks(self.model)
        self.L = self.layout.num_blocks
        self.tensors = self.layout.tensors
        # unique trainable parameters in model.parameters() order, and their block
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        pos = {id(t): b for t, b in zip(self.tensors, self.layout.block_index)}
        self.block_of_param = [pos[id(p)] for p in self.params]

    def loss(self, model=None):
        x, y = self.data
        return self.crit((model or self.model)(x), y)


def rule(mean: torch.Tensor, se: torch.Tensor, rtol=RTOL):
    """``(every block meets SE_b <= eps_b, eps)``: the stopping rule of ``block_traces(rtol=)``."""
    eps = bm.target_eps(mean, rtol)
    return bool((se <= eps).all()), eps


def hutchinson_to_target(job: Job, setup, samples, scheme: str, seed: int = 0) -> dict:
    """The peers' loop: rounds of Rademacher probes until every block meets the rule."""
    t0 = time.perf_counter()
    state = setup()
    gen = torch.Generator().manual_seed(seed)
    cap, budget = _cap(scheme, job.L), _budget(scheme)
    chunks, K, n_round = [], 0, 16
    while True:
        todo = n_round
        while todo > 0:
            R = min(16, todo)
            Z = [(torch.randint(0, 2, (R,) + tuple(p.shape), generator=gen).to(p.dtype) * 2 - 1).to(job.dev)
                 for p in job.params]
            chunks.append(samples(state, Z, scheme))
            todo -= R
        K += n_round
        S = torch.cat(chunks).double()
        mean, se = S.mean(0), S.std(0) / math.sqrt(K)
        met, eps = rule(mean, se)
        need = K * float(((se / eps) ** 2).max())
        elapsed = time.perf_counter() - t0
        if met or K >= cap or elapsed > budget:
            break
        n_round = int(min(max(math.ceil(1.1 * need) - K, 8), K, cap - K))
    per_probe_rows = 1 if scheme == "global" else job.L
    # time and rows to the target: extrapolated in bench_peers once every method has run
    return {"seed": seed, "K": K, "converged": met, "measured_seconds": elapsed,
            "measured_rows": K * per_probe_rows, "means": mean.tolist(), "se": se.tolist()}


def per_block(job: Job, products, Z) -> torch.Tensor:
    """``(R, L)`` samples ``z_b . (HZ)_b`` from per-parameter probes and products."""
    R = Z[0].shape[0]
    out = torch.zeros(R, job.L, dtype=torch.float64, device=Z[0].device)
    for j, (z, h) in enumerate(zip(Z, products)):
        out[:, job.block_of_param[j]] += (z.reshape(R, -1).double() * h.reshape(R, -1).double()).sum(1)
    return out.cpu()


def reference_hvp(job: Job, v: list[torch.Tensor]) -> list[torch.Tensor]:
    with bm.preserved(job.model):
        g = torch.autograd.grad(job.loss(), job.params, create_graph=True)
        return [h.detach() for h in torch.autograd.grad(g, job.params, v)]


def check_hvp(job: Job, hvp_fn) -> float:
    """Relative error of a peer's H v against hutchtrace's reference product."""
    gen = torch.Generator().manual_seed(5)
    v = [torch.randn(p.shape, generator=gen).to(dtype=p.dtype, device=p.device) for p in job.params]
    want = torch.cat([h.reshape(-1).double() for h in reference_hvp(job, v)])
    got = torch.cat([h.reshape(-1).double() for h in hvp_fn(v)])
    return float((got - want).norm() / want.norm())


# ----------------------------------------------------------------------------- peers
class _KeepMode(nn.Module):
    """PyHessian calls ``model.eval()``; keep the mode whose Hessian is asked for."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)

    def train(self, mode: bool = True):
        return self


def pyhessian_peer(job: Job):
    pyhessian = pytest.importorskip("pyhessian")
    from pyhessian.utils import hessian_vector_product

    def setup():
        for p in job.params:
            p.grad = None
        h = pyhessian.hessian(_KeepMode(job.model), job.crit, data=job.data, cuda=job.dev.startswith("cuda"))
        return h

    def hvp(h, v):
        return hessian_vector_product(h.gradsH, h.params, v)

    def samples(h, Z, scheme):
        R = Z[0].shape[0]
        out = []
        for r in range(R):
            z = [zj[r] for zj in Z]
            if scheme == "global":
                out.append(per_block(job, [x.unsqueeze(0) for x in hvp(h, z)], [x.unsqueeze(0) for x in z]))
            else:
                row = torch.zeros(1, job.L, dtype=torch.float64)
                for b in range(job.L):
                    zb = [zj if job.block_of_param[j] == b else torch.zeros_like(zj) for j, zj in enumerate(z)]
                    row[0, b] = per_block(job, [x.unsqueeze(0) for x in hvp(h, zb)],
                                          [x.unsqueeze(0) for x in zb])[0, b]
                out.append(row)
        return torch.cat(out)

    return setup, samples, lambda v: hvp(setup(), v)


def curvlinops_peer(job: Job):
    curvlinops = pytest.importorskip("curvlinops")
    crit = job.crit
    if not hasattr(crit, "reduction"):
        crit.reduction = "mean"  # curvlinops reads it to normalise over batches

    def make(block_sizes):
        return curvlinops.HessianLinearOperator(job.model, crit, job.params, [job.data], progressbar=False,
                                                check_deterministic=False, block_sizes=block_sizes)

    def setup():
        return {"global": make(None), "isolated": make([1] * len(job.params))}

    def samples(ops_, Z, scheme):
        op = ops_[scheme]
        cols = [z.movedim(0, -1) for z in Z]  # (*shape, R) list format
        HZ = op @ cols
        return per_block(job, [h.movedim(-1, 0) for h in HZ], Z)

    def hvp(v):
        HV = make(None) @ [x.unsqueeze(-1) for x in v]
        return [h[..., 0] for h in HV]

    return setup, samples, hvp


def eigenthings_peer(job: Job):
    het = pytest.importorskip("hessian_eigenthings")
    names = {id(p): n for n, p in job.model.named_parameters()}

    def loss_fn(model, batch):
        return job.crit(model(batch[0]), batch[1])

    def make(pfilter=None):
        return het.HessianOperator(job.model, [job.data], loss_fn, param_filter=pfilter)

    def setup():
        blocks = []
        for b in range(job.L):
            keep = {names[id(p)] for p, pb in zip(job.params, job.block_of_param) if pb == b}
            blocks.append(make(lambda n, p, keep=keep: n in keep))
        return {"global": make(), "blocks": blocks}

    def flat(z):
        return torch.cat([x.reshape(-1) for x in z])

    def samples(ops_, Z, scheme):
        R = Z[0].shape[0]
        out = torch.zeros(R, job.L, dtype=torch.float64)
        for r in range(R):
            z = [zj[r] for zj in Z]
            if scheme == "global":
                hz = ops_["global"].matvec(flat(z))
                parts = list(torch.split(hz, [p.numel() for p in job.params]))
                out[r] = per_block(job, [x.unsqueeze(0) for x in parts], [x.unsqueeze(0) for x in z])[0]
            else:
                for b, op in enumerate(ops_["blocks"]):
                    zb = flat([zj for j, zj in enumerate(z) if job.block_of_param[j] == b])
                    out[r, b] = float((zb.double() * op.matvec(zb).double()).sum())
        return out

    def hvp(v):
        hz = make().matvec(flat(v))
        return list(torch.split(hz, [p.numel() for p in job.params]))

    return setup, samples, hvp


def backpack_exact(job: Job):
    """Per-block exact traces from BackPACK's DiagHessian, or raise if unsupported."""
    backpack = pytest.importorskip("backpack")
    from backpack.extensions import DiagHessian

    if not isinstance(job.model, nn.Sequential):
        raise NotImplementedError(f"BackPACK needs an nn.Sequential of supported layers; "
                                  f"{type(job.model).__name__} has a custom forward")
    model = backpack.extend(job.model)
    crit = backpack.extend(job.crit)
    for p in job.params:
        p.grad = None
    with backpack.backpack(DiagHessian()):
        crit(model(job.data[0]), job.data[1]).backward()
    out = torch.zeros(job.L, dtype=torch.float64)
    for p, b in zip(job.params, job.block_of_param):
        out[b] += float(p.diag_h.double().sum())
    return out


# ----------------------------------------------------------------------------- hutchtrace
def ours(job: Job, scheme: str, seed: int) -> dict:
    # global: capped lower than in bench_probing (which measures it); here it only places
    # the peers' global loops
    cap = {"global": 8000, "isolated": max(64, 80000 // job.L), "auto": max(64, 160000 // job.L)}[scheme]
    if bm.quick():
        cap = 32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        t0 = time.perf_counter()
        res = hutchtrace.block_traces(job.model, job.crit, K=16, data=job.data, seed=seed, rtol=RTOL,
                                      probing=scheme, max_K=cap, progress=False)
        secs = time.perf_counter() - t0
    return {"seed": seed, "K": res.meta["K"], "converged": bool(res.meta["converged"]), "measured_seconds": secs,
            "measured_rows": res.meta["hvp_rows"], "final_plan": res.meta["probing"],
            "means": [b.mean for b in res.blocks], "se": [b.se for b in res.blocks]}


def _fmt_time(agg: dict) -> str:
    if agg["status"] == "not reached":
        return f"not reached (> {agg['measured_seconds']['min']:.3g} s)"
    s = agg["seconds"]
    txt = f"{s['median']:.3g} s [{s['min']:.3g}-{s['max']:.3g}]"
    return txt + (f" projected x{agg['factor']:.2g}" if agg["status"] == "projected" else "")


@pytest.fixture(scope="module", autouse=True)
def _write():
    bm.begin_suite("peers")
    yield
    if not _RESULTS:
        return
    parts = ["### hutchtrace vs peers: time to 5 % relative SE on every non-negligible block\n"]
    for name, r in _RESULTS.items():
        rows = []
        for who, x in r["methods"].items():
            if "error" in x:
                rows.append([who, x["error"][:90], "-", "-"])
            else:
                rows.append([who, _fmt_time(x), f"{x['rows']['median']:.4g}" if "rows" in x else "-", x.get("note", "")])
        parts.append(f"**{name}**: {r['model']} (P = {r['P']}, L = {r['L']}; {r['rounds']} rounds)\n")
        parts.append(bm.md_table(["method", "time to target, median [range]", "HVP rows (median)", "note"], rows))
        t = r["target"]
        if t["fastest_peer"]:
            sp = t["speedup"]
            txt = (f"{sp['median']:.3g}x [{sp['min']:.3g}-{sp['max']:.3g}]" if sp else "unknown (a run not reached)")
            parts.append(f"\nfastest peer: {t['fastest_peer']}; hutchtrace auto over it, per round: **{txt}** "
                         f"(target >= 3x: {t['verdict']})\n")
        else:
            parts.append("")
    bm.write_results("peers", {"rtol": RTOL, "max_projection": bm.MAX_PROJECTION, "cases": _RESULTS},
                     "\n".join(parts))


def _run_backpack(job: Job) -> dict:
    try:
        with bm.preserved(job.model):
            t0 = time.perf_counter()
            exact = backpack_exact(job)
            secs = time.perf_counter() - t0
        if bm.numel(job.model) <= 6000:
            from hutchtrace.backbones.exact import exact_block_traces, exact_hessian

            H, layout = exact_hessian(job.model, job.crit, data=job.data)
            want = exact_block_traces(H, layout)
            assert torch.allclose(exact, want, rtol=1e-3, atol=1e-5 * float(want.abs().max())), (exact, want)
        # exact in one pass: reached, no probes
        return {"K": 0, "converged": True, "status": "reached", "factor": 1.0, "measured_seconds": secs,
                "measured_rows": 0, "seconds": secs, "rows": 0}
    except pytest.skip.Exception as exc:
        return {"error": f"not installed ({exc})"}
    except Exception as exc:  # noqa: BLE001 - an unsupported model is a result
        return {"error": f"unsupported: {type(exc).__name__}: {str(exc).splitlines()[0]}"}


@pytest.mark.parametrize("name", bm.MODELS)
def bench_peers(benchmark, name):
    bm.set_threads()
    dev = bm.device()
    scale = bm.scale("small")
    job = Job(name, dev)
    # hutchtrace: warm the backbone cache before the timed runs
    kw = 8 if bm.quick() else 32
    hutchtrace.block_traces(job.model, job.crit, K=kw, data=job.data, seed=3, probing="isolated", progress=False)
    hutchtrace.block_traces(job.model, job.crit, K=kw, data=job.data, seed=3, probing="global", progress=False)
    methods: dict[str, callable] = {f"hutchtrace {s}": (lambda seed, s=s: ours(job, s, seed))
                                    for s in ("auto", "global", "isolated")}
    errors: dict[str, dict] = {}
    makers = {"pyhessian": pyhessian_peer, "curvlinops": curvlinops_peer, "eigenthings": eigenthings_peer}
    for peer, maker in makers.items():
        try:
            setup, samples, hvp = maker(job)
        except pytest.skip.Exception as exc:
            errors[peer] = {"error": f"not installed ({exc})"}
            continue
        try:
            with bm.preserved(job.model):
                err = check_hvp(job, hvp)
        except Exception as exc:  # noqa: BLE001 - an unsupported model is a result
            errors[peer] = {"error": f"fails on this model: {type(exc).__name__}: {str(exc).splitlines()[0]}"}
            continue
        if not err <= 1e-3:
            errors[peer] = {"error": f"wrong Hessian-vector products (relative error {err:.2g}); not timed"}
            continue
        for scheme in ("global", "isolated"):
            def run(seed, setup=setup, samples=samples, scheme=scheme):
                with bm.preserved(job.model):
                    return hutchinson_to_target(job, setup, samples, scheme, seed=seed)
            methods[f"{peer} {scheme}"] = run
    # rounds: every method once per seed, the order rotating
    names = list(methods)
    runs: dict[str, list] = {n: [] for n in names}
    for r, seed in enumerate(_seeds()):
        for n in names[r % len(names):] + names[: r % len(names)]:
            if n in errors:
                continue
            try:
                runs[n].append(methods[n](seed))
            except Exception as exc:  # noqa: BLE001
                errors[n] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
    sampled = [x for n, xs in runs.items() if n not in errors for x in xs]
    eps = bm.target_eps(bm.pooled_means(sampled), RTOL)
    for x in sampled:
        bm.project(x, eps)
    results: dict[str, dict] = {}
    for n in names:
        if n in errors:
            results[n] = errors[n]
        else:
            results[n] = {**bm.aggregate(runs[n]), "runs": runs[n]}
    results.update({k: v for k, v in errors.items() if k not in results})
    bp = _run_backpack(job)
    if "error" in bp:
        results["backpack"] = bp
    else:
        # exact, one pass: timed once per round, interleaved is moot (milliseconds)
        bp_runs = [bp] + [_run_backpack(job) for _ in _seeds()[1:]]
        runs["backpack DiagHessian"] = bp_runs
        results["backpack DiagHessian"] = {**bm.aggregate(bp_runs), "runs": bp_runs,
                                           "note": "exact diagonal, supported layers only"}
    peers = [n for n, v in results.items() if not n.startswith("hutchtrace") and "seconds" in v]
    fastest = min(peers, key=lambda n: results[n]["seconds"]["median"]) if peers else None
    speedup = bm.round_ratios(runs[fastest], runs["hutchtrace auto"]) if fastest else None
    target = {
        "fastest_peer": fastest, "speedup": speedup,
        "verdict": (bm.verdict(speedup, 3.0, "above") if speedup else
                    ("unknown (a run not reached)" if fastest else "no peer ran")),
    }
    _RESULTS[name] = {"model": bm.describe(name, scale), "scale": scale, "P": bm.numel(job.model), "L": job.L,
                      "versions": peer_versions(),
                      "rounds": len(_seeds()), "seeds": list(_seeds()), "methods": results, "target": target}
    benchmark.group = "peers"
    benchmark.extra_info.update({"model": name, "fastest_peer": fastest})
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    print(f"\n{name}: " + "; ".join(f"{k} {_fmt_time(v)}" if "status" in v else f"{k}: {v['error'][:60]}"
                                     for k, v in results.items())
          + f"\n  -> fastest peer {fastest}, speed-up {speedup['median'] if speedup else float('nan'):.3g}x")
