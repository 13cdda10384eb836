"""Weight sharing done right, and the "unrolled" comparison that shows why (docs/maths.md section 2).

A tensor ``W`` used at ``m`` places makes the loss ``f(W) = F(W, ..., W)`` with ``F`` the
*unrolled* function of one copy per use. Since ``W -> (W, ..., W)`` is linear,

.. math:: \\nabla^2_W f = \\sum_{i,j} H_{ij},\\qquad
          \\operatorname{tr} \\nabla^2_W f = \\sum_i \\operatorname{tr} H_{ii}
          + \\sum_{i \\ne j} \\operatorname{tr} H_{ij},\\qquad H_{ij} = \\partial^2 F / \\partial W_i \\partial W_j .

:func:`hutchtrace.block_traces` differentiates the de-duplicated tensor, so it estimates the
left side. Tools that attach statistics per module *call* (hooks, per-use probes) treat
every use as its own coordinate and estimate ``sum_i tr H_ii`` only, missing the cross-use
terms; the gap can flip the sign (a copy task at initialisation: ratio -0.91).

:func:`unrolled_traces` measures both on the same graph: each module call that uses a shared
tensor gets its own leaf copy ``W_i`` (forward hooks swap it in), and per probe

* the *true* sample uses the same probe on every copy: ``z^T (sum_ij H_ij) z``;
* the *unrolled* sample uses independent probes ``z_i`` (``z_1 = z``): expectation
  ``sum_i tr H_ii``;
* their paired difference estimates the cross-use sum ``sum_{i != j} tr H_ij``.

Uses are counted per call of a module that owns the tensor (a tied embedding/output pair
gives 2 uses, an RNN cell unrolled T steps gives T). Repeated use inside one module call
stays merged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.errors import BlockSpecError
from ..core.state import ForwardRNG, PreservedState
from ..estimate.stats import mean_se_ci
from ..kernels import ops
from ..problem.blocks import resolve_blocks, unwrap_model
from ..problem.loss import check_loss_value, make_loss_spec

__all__ = ["SharedTrace", "unrolled_traces", "unrolled_hessian", "count_uses"]


@dataclass(frozen=True)
class SharedTrace:
    """Trace of one shared tensor's Hessian block, true vs unrolled.

    ``true``, ``unrolled`` and ``cross`` are ``(mean, se)`` pairs; ``cross`` estimates
    ``sum_{i != j} tr H_ij`` = true - unrolled from paired samples. ``samples`` is the
    ``(K, 2)`` float64 tensor of per-probe (true, unrolled) samples.
    """

    name: str
    uses: int
    numel: int
    true: tuple[float, float]
    unrolled: tuple[float, float]
    cross: tuple[float, float]
    samples: torch.Tensor = field(repr=False, compare=False, default=None)

    @property
    def ratio(self) -> float:
        """unrolled / true (1 when sharing does not matter)."""
        return self.unrolled[0] / self.true[0] if self.true[0] != 0 else math.nan


class _UseSwapper:
    """Forward hooks giving each call of an owner module its own copy of a shared tensor."""

    def __init__(self, model: nn.Module, target: torch.Tensor):
        self.owners = [(m, n) for m in model.modules() for n, p in m.named_parameters(recurse=False)
                       if p is target]
        self.target = target
        self.copies: list[torch.Tensor] | None = None
        self.calls = 0
        self.handles = []

    def __enter__(self):
        for mod, pname in self.owners:
            self.handles.append(mod.register_forward_pre_hook(self._pre(pname)))
            self.handles.append(mod.register_forward_hook(self._post(pname)))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []

    def _pre(self, pname):
        def hook(mod, args):
            i = self.calls
            self.calls += 1
            if self.copies is not None:
                if i >= len(self.copies):
                    raise RuntimeError("the model used the shared tensor more often than in the counting pass; "
                                       "unrolled_traces needs a forward whose call pattern is fixed")
                # plain attribute: the module's forward reads self.<pname> -> this copy
                del mod._parameters[pname]
                setattr(mod, pname, self.copies[i])
        return hook

    def _post(self, pname):
        def hook(mod, args, out):
            if self.copies is not None:
                delattr(mod, pname)
                mod._parameters[pname] = self.target
        return hook


def count_uses(model: nn.Module, fn, target: torch.Tensor) -> int:
    """Number of calls of modules owning ``target`` during one evaluation of ``fn(model)``."""
    with _UseSwapper(model, target) as sw, torch.no_grad():
        fn(model)
    return sw.calls


def _shared_tensors(model: nn.Module, fn, layout) -> list[tuple[str, torch.Tensor, int]]:
    out = []
    for name, t in zip(layout.names, layout.tensors):
        m = count_uses(model, fn, t)
        if m > 1:
            out.append((name, t, m))
    return out


def _copy_graph(model, fn, target, m, rng):
    """(copies, grads of the loss w.r.t. the copies with create_graph)."""
    copies = [target.detach().clone().requires_grad_(True) for _ in range(m)]
    sw = _UseSwapper(model, target)
    sw.copies = copies
    with sw, torch.enable_grad(), rng.forward():
        loss = check_loss_value(fn(model))
    if sw.calls != m:
        raise RuntimeError(f"the shared tensor was used {sw.calls} times, but {m} times when counting")
    grads = torch.autograd.grad(loss, copies, create_graph=True, allow_unused=True)
    return copies, grads


def _hvp(copies, grads, vs):
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    if not live:
        return [torch.zeros_like(c) for c in copies]
    out = torch.autograd.grad([grads[i] for i in live], copies, [vs[i] for i in live], retain_graph=True,
                              allow_unused=True)
    return [torch.zeros_like(c) if o is None else o for o, c in zip(out, copies)]


def unrolled_traces(model: nn.Module, loss, K: int = 10, *, data=None, params=None, seed: int | None = None,
                    probe: str = "rademacher", level: float = 0.95) -> list[SharedTrace]:
    """True vs unrolled traces of every shared tensor (see module docstring).

    Args:
        model, loss, data: as in :func:`hutchtrace.block_traces` (one batch or a dataset).
        K: probes.
        params: names of tensors to analyse (default: every trainable tensor used more than once).
        seed, probe, level: as in :func:`hutchtrace.block_traces`.

    Returns:
        one :class:`SharedTrace` per shared tensor.

    Example:
        >>> from hutchtrace import zoo
        >>> model, crit, data = zoo.make_rnn(dtype=torch.float64)
        >>> out = unrolled_traces(model, crit, K=20, data=data, seed=0)
        >>> [(s.name, s.uses) for s in out]
        [('inp.weight', 5), ('inp.bias', 5), ('rec.weight', 5)]
    """
    from ..core.validate import resolve_seed

    if isinstance(K, bool) or not isinstance(K, int) or K < 1:
        raise ValueError(f"K must be an int >= 1, got {K!r}")
    seed = resolve_seed(seed)
    model = unwrap_model(model)
    layout = resolve_blocks(model, "param")
    spec = make_loss_spec(loss, data)
    batches = list(spec.batches())
    total_count = sum(b.count for b in batches)
    with PreservedState(model):
        shared = _shared_tensors(model, batches[0].fn, layout)
        if params is not None:
            wanted = set(params)
            unknown = wanted - set(layout.names)
            if unknown:
                raise BlockSpecError(f"unknown parameter names {sorted(unknown)}")
            shared = [s for s in shared if s[0] in wanted]
        offset_of = dict(zip(layout.names, layout.offsets))
        results = []
        rng = ForwardRNG([layout.device()])
        for name, t, m in shared:
            true_s = torch.zeros(K, dtype=torch.float64)
            unr_s = torch.zeros(K, dtype=torch.float64)
            for batch in batches:
                rng.start_batch()
                copies, grads = _copy_graph(model, batch.fn, t, m, rng)
                for k in range(K):
                    # use i's probe: the global probe's entries at offset + i * total length,
                    # so use 0 sees exactly the probe block_traces would use
                    zs = [ops.probes(seed, k, offset_of[name] + i * layout.total_numel, t.numel(), kind=probe,
                                     dtype=t.dtype, device=t.device).reshape(t.shape) for i in range(m)]
                    same = _hvp(copies, grads, [zs[0]] * m)
                    indep = _hvp(copies, grads, zs)
                    true_s[k] += batch.weight * float(sum((zs[0] * u).sum() for u in same))
                    unr_s[k] += batch.weight * float(sum((z * u).sum() for z, u in zip(zs, indep)))
                rng.end_batch()
            true_s /= total_count
            unr_s /= total_count

            def summary(x):
                mean = x.mean()
                var = x.var() if K > 1 else torch.tensor(math.nan, dtype=torch.float64)
                se, _, _ = mean_se_ci(mean, var, K, level)
                return float(mean), float(se)

            results.append(SharedTrace(name=name, uses=m, numel=t.numel(), true=summary(true_s),
                                       unrolled=summary(unr_s), cross=summary(true_s - unr_s),
                                       samples=torch.stack([true_s, unr_s], 1)))
    return results


def unrolled_hessian(model: nn.Module, loss, name: str, *, data=None) -> torch.Tensor:
    """Exact unrolled Hessian ``[H_ij]`` of one shared tensor, shape ``(m, n, m, n)`` (small models).

    ``H.sum((0, 2))`` is the true Hessian block; ``sum_i tr H[i, :, i, :]`` the unrolled trace.
    """
    model = unwrap_model(model)
    layout = resolve_blocks(model, "param")
    if name not in layout.names:
        raise BlockSpecError(f"{name!r} is not a trainable parameter name")
    t = layout.tensors[layout.names.index(name)]
    spec = make_loss_spec(loss, data)
    batches = list(spec.batches())
    n = t.numel()
    out = None
    total = 0.0
    with PreservedState(model):
        m = count_uses(model, batches[0].fn, t)
        rng = ForwardRNG([t.device])
        for batch in batches:
            rng.start_batch()
            copies, grads = _copy_graph(model, batch.fn, t, m, rng)
            rows = []
            for i in range(m):
                for e in range(n):
                    v = [torch.zeros_like(c) for c in copies]
                    v[i].view(-1)[e] = 1.0
                    rows.append(torch.cat([h.reshape(-1) for h in _hvp(copies, grads, v)]))
            H = torch.stack(rows).reshape(m, n, m, n).double() * batch.weight
            out = H if out is None else out + H
            total += batch.count
            rng.end_batch()
    return out / total
