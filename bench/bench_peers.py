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
(:class:`hutchtrace.state.PreservedState`: BatchNorm-train without running-stat updates,
SDPA math kernel), so all differentiate the same function. Before timing, every peer's HVP
is checked against hutchtrace's reverse HVP on a random vector (relative error <= 1e-3); a
peer that fails (e.g. a wrong product) is reported as such and not timed. BackPACK's traces
are checked against the exact Hessian. A peer that is not installed is skipped
(``pytest.importorskip``).

Runs that exceed their probe cap or time budget are extrapolated as in ``bench_probing``
(``K* = K max_b (SE_b/eps_b)^2``, ``eps_b`` from the traces pooled over every method's run,
:func:`models.extrapolate`). hutchtrace runs ``probing="auto"``; its ``global`` and
``isolated`` schemes are timed too so the table separates algorithm from implementation.

Target (issue 9): hutchtrace at least 3x faster than the fastest peer on every model where
that peer runs. Models: the ``small`` scale of :mod:`models`. One thread.

    pip install PyHessian curvlinops-for-pytorch backpack-for-pytorch hessian-eigenthings
    pytest bench/bench_peers.py -s
"""

from __future__ import annotations

import math
import time
import warnings

import pytest
import torch
from torch import nn

import hutchtrace
import models as bm
from hutchtrace.blocks import resolve_blocks

RTOL = 0.05
PEERS = ("pyhessian", "curvlinops", "eigenthings", "backpack")
_RESULTS: dict[str, dict] = {}


def _budget() -> float:
    return 3.0 if bm.quick() else 25.0


def _cap(scheme: str, L: int) -> int:
    if bm.quick():
        return 32
    return 20000 if scheme == "global" else max(64, 40000 // L)


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
    cap, budget = _cap(scheme, job.L), _budget()
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
    return {"seconds": elapsed, "rows": K * per_probe_rows, "K": K, "converged": met, "extrapolated": not met,
            "measured_seconds": elapsed, "measured_rows": K * per_probe_rows, "means": mean.tolist(),
            "se": se.tolist()}


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
def ours(job: Job, scheme: str) -> dict:
    cap = {"global": 20000, "isolated": max(64, 40000 // job.L), "auto": max(64, 80000 // job.L)}[scheme]
    if bm.quick():
        cap = 32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        t0 = time.perf_counter()
        res = hutchtrace.block_traces(job.model, job.crit, K=16, data=job.data, seed=1, rtol=RTOL, probing=scheme,
                                      max_K=cap, progress=False)
        secs = time.perf_counter() - t0
    rows = res.meta["hvp_rows"]
    return {"seconds": secs, "rows": rows, "K": res.meta["K"], "converged": bool(res.meta["converged"]),
            "extrapolated": not res.meta["converged"], "measured_seconds": secs, "measured_rows": rows,
            "final_plan": res.meta["probing"], "means": [b.mean for b in res.blocks],
            "se": [b.se for b in res.blocks]}


@pytest.fixture(scope="module", autouse=True)
def _write():
    yield
    if not _RESULTS:
        return
    parts = ["### hutchtrace vs peers: time to 5 % relative SE on every non-negligible block\n"]
    for name, r in _RESULTS.items():
        rows = []
        for who, x in r["runs"].items():
            if "error" in x:
                rows.append([who, "-", "-", "-", "-", x["error"][:90]])
            else:
                rows.append([who, x["seconds"], x["rows"], x.get("K", "-"),
                             "yes" if x.get("extrapolated") else "no", x.get("note", "")])
        parts.append(f"**{name}** (P = {r['P']}, L = {r['L']})\n")
        parts.append(bm.md_table(["method", "seconds", "HVP rows", "probes", "extrapolated", "note"], rows))
        t = r["target"]
        parts.append(f"\nfastest peer: {t['fastest_peer']} ({t['fastest_peer_seconds']:.3g} s); hutchtrace auto "
                     f"{t['ours_seconds']:.3g} s: **{t['speedup']:.3g}x** (target >= 3x: "
                     f"{'met' if t['met'] else 'not met'})\n")
    bm.write_results("peers", {"rtol": RTOL, "cases": _RESULTS}, "\n".join(parts))


@pytest.mark.parametrize("name", bm.MODELS)
def bench_peers(benchmark, name):
    bm.set_threads()
    dev = bm.device()
    job = Job(name, dev)
    runs: dict[str, dict] = {}
    # hutchtrace: warm the backbone cache, then the timed runs
    kw = 8 if bm.quick() else 32
    hutchtrace.block_traces(job.model, job.crit, K=kw, data=job.data, seed=3, probing="isolated", progress=False)
    hutchtrace.block_traces(job.model, job.crit, K=kw, data=job.data, seed=3, probing="global", progress=False)
    for scheme in ("auto", "global", "isolated"):
        runs[f"hutchtrace {scheme}"] = ours(job, scheme)
    makers = {"pyhessian": pyhessian_peer, "curvlinops": curvlinops_peer, "eigenthings": eigenthings_peer}
    for peer, maker in makers.items():
        try:
            setup, samples, hvp = maker(job)
        except pytest.skip.Exception as exc:
            runs[peer] = {"error": f"not installed ({exc})"}
            continue
        try:
            with bm.preserved(job.model):
                err = check_hvp(job, hvp)
        except Exception as exc:  # noqa: BLE001 - an unsupported model is a result
            runs[peer] = {"error": f"fails on this model: {type(exc).__name__}: {str(exc).splitlines()[0]}"}
            continue
        if not err <= 1e-3:
            runs[peer] = {"error": f"wrong Hessian-vector products (relative error {err:.2g}); not timed"}
            continue
        for scheme in ("global", "isolated"):
            try:
                with bm.preserved(job.model):
                    runs[f"{peer} {scheme}"] = hutchinson_to_target(job, setup, samples, scheme)
            except Exception as exc:  # noqa: BLE001
                runs[f"{peer} {scheme}"] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
    try:
        with bm.preserved(job.model):
            t0 = time.perf_counter()
            exact = backpack_exact(job)
            secs = time.perf_counter() - t0
        runs["backpack DiagHessian"] = {"seconds": secs, "rows": 0, "K": 0, "extrapolated": False,
                                        "note": "exact diagonal, supported layers only"}
        if bm.numel(job.model) <= 6000:
            from hutchtrace.exact import exact_block_traces, exact_hessian

            H, layout = exact_hessian(job.model, job.crit, data=job.data)
            want = exact_block_traces(H, layout)
            assert torch.allclose(exact, want, rtol=1e-3, atol=1e-5 * float(want.abs().max())), (exact, want)
    except pytest.skip.Exception as exc:
        runs["backpack"] = {"error": f"not installed ({exc})"}
    except Exception as exc:  # noqa: BLE001
        runs["backpack"] = {"error": f"unsupported: {type(exc).__name__}: {str(exc).splitlines()[0]}"}
    sampled = [v for v in runs.values() if "se" in v]
    eps = bm.target_eps(bm.pooled_means(sampled), RTOL)
    for v in sampled:
        bm.extrapolate(v, eps)
    peer_times = {k: v["seconds"] for k, v in runs.items() if not k.startswith("hutchtrace") and "seconds" in v}
    ours_s = runs["hutchtrace auto"]["seconds"]
    fastest = min(peer_times, key=peer_times.get) if peer_times else None
    target = {
        "fastest_peer": fastest, "fastest_peer_seconds": peer_times.get(fastest, float("nan")),
        "ours_seconds": ours_s,
        "speedup": (peer_times[fastest] / ours_s) if fastest else float("nan"),
        "met": bool(fastest and peer_times[fastest] / ours_s >= 3),
    }
    _RESULTS[name] = {"P": bm.numel(job.model), "L": job.L, "runs": runs, "target": target}
    benchmark.group = "peers"
    benchmark.extra_info.update({"model": name, "target": target,
                                 "seconds": {k: v.get("seconds") for k, v in runs.items()}})
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    print(f"\n{name}: " + "; ".join(f"{k} {v['seconds']:.3g}s" if "seconds" in v else f"{k}: {v['error'][:60]}"
                                     for k, v in runs.items())
          + f"\n  -> fastest peer {fastest}, speed-up {target['speedup']:.3g}x")
