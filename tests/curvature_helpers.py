"""Dense references for the curvature-structure tests: the exact GGN, block Frobenius norms,
and the small models of the seed's qualitative claims.

The GGN reference is built independently of :mod:`hutchtrace.backbones.ggn`: the full Jacobian of the
model outputs by ``torch.func.jacrev`` and the criterion's output Hessian by
``jacrev(jacrev(criterion))`` (reverse-over-reverse, which also avoids the forward-mode
ZeroTensor bug of ``F.mse_loss``), assembled as ``G = sum_m w_m J_m^T Lambda_m J_m / sum_m n_m``.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call, jacrev

from hutchtrace.backbones.exact import block_slices
from hutchtrace.core.state import PreservedState
from hutchtrace.problem.blocks import resolve_blocks


def _ggn_one(model, layout, crit, x, y):
    names, tensors = layout.names, layout.tensors
    sizes = [t.numel() for t in tensors]
    shapes = [t.shape for t in tensors]

    def f(flat):
        ps = {n: q.reshape(s) for n, q, s in zip(names, torch.split(flat, sizes), shapes)}
        return functional_call(model, ps, (x,), tie_weights=True, strict=False)

    theta = torch.cat([t.detach().reshape(-1) for t in tensors])
    # one forward only (a model with dropout draws its mask once, as the estimator's backbones do)
    def f_aux(th):
        o = f(th)
        return o, o.detach()

    J, out = jacrev(f_aux, has_aux=True)(theta)
    J = J.reshape(out.numel(), -1)
    Lam = jacrev(jacrev(lambda o: crit(o.reshape(out.shape), y)))(out.reshape(-1))
    return J.T @ Lam @ J


def exact_ggn(model: nn.Module, crit, data, blocks="param") -> tuple[torch.Tensor, object]:
    """Dense ``G`` over the selected tensors in the estimator's element order.

    ``data``: one ``(x, y)`` pair or a list of pairs (then the dataset mean, batches weighted by
    their sizes for a mean-reduced criterion)."""
    layout = resolve_blocks(model, blocks)
    batches = [data] if isinstance(data, tuple) else list(data)
    total = 0.0
    G = None
    with PreservedState(model):
        for x, y in batches:
            n = 1.0 if isinstance(data, tuple) else float(y.shape[0])
            Gm = _ggn_one(model, layout, crit, x, y) * n
            G = Gm if G is None else G + Gm
            total += n
    return G / total, layout


def block_frobenius2(M: torch.Tensor, layout) -> torch.Tensor:
    """``(L, L)`` matrix of ``||M_bc||_F^2``."""
    sl = block_slices(layout)
    L = len(sl)
    return torch.tensor([[float((M[sl[b]][:, sl[c]] ** 2).sum()) for c in range(L)] for b in range(L)],
                        dtype=torch.float64)


def block(M: torch.Tensor, layout, b: int, c: int | None = None) -> torch.Tensor:
    sl = block_slices(layout)
    return M[sl[b]][:, sl[b if c is None else c]]


def rademacher_var_of_sq(A: torch.Tensor) -> float:
    """``Var ||A z||^2`` for a Rademacher ``z`` (docs/maths.md Q2): ``2||A^T A||_F^2 - 2 sum_j (A^T A)_jj^2``."""
    AtA = A.T @ A
    return float(2 * (AtA**2).sum() - 2 * (torch.diagonal(AtA) ** 2).sum())


def hutchinson_var(S: torch.Tensor, cross: float = 0.0, kind: str = "rademacher") -> float:
    """docs/maths.md Theorem 1.1: ``Var z_b^T (M z)_b = 2 F_bb - 2 d_b (Rademacher) + X_b``."""
    own = float((S**2).sum())
    d = float((torch.diagonal(S) ** 2).sum())
    return (2 * own - 2 * d if kind == "rademacher" else 2 * own) + cross


def var_and_se(x: torch.Tensor) -> tuple[float, float]:
    """Sample variance of ``x`` and the Monte-Carlo SE of that variance (via the 4th moment)."""
    x = x - x.mean()
    n = x.numel()
    s2 = float((x**2).sum() / (n - 1))
    m4 = float((x**4).mean())
    return s2, math.sqrt(max(m4 - s2**2, 0.0) / n)


class DeepMLP(nn.Module):
    """``inp -> depth x hidden -> out``; ``skip > 0`` makes every hidden layer a residual branch
    ``h + skip * W act(h)``, else ``act(W h)`` (plain)."""

    def __init__(self, d_in=8, width=16, depth=12, d_out=4, act=torch.relu, skip=0.0, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.inp = nn.Linear(d_in, width)
        self.hid = nn.ModuleList([nn.Linear(width, width) for _ in range(depth)])
        self.out = nn.Linear(width, d_out)
        self.act, self.skip = act, skip
        with torch.no_grad():
            for mod in [self.inp, *self.hid, self.out]:
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) / math.sqrt(mod.weight.shape[1]))
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.1)
            for mod in self.hid:
                mod.weight.mul_(skip if skip else 1.0)
        self.double()

    def forward(self, x):
        h = self.act(self.inp(x))
        for lin in self.hid:
            h = h + lin(self.act(h)) if self.skip else self.act(lin(h))
        return self.out(h)


class InputAsParameter(nn.Module):
    """Makes the inputs ``X`` the trainable coordinates of a frozen network: its Hessian is the
    input Hessian ``d^2 loss / dX^2`` (``forward`` ignores its argument)."""

    def __init__(self, net: nn.Module, X: torch.Tensor):
        super().__init__()
        self.net = net
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.x = nn.Parameter(X.clone())

    def forward(self, _ignored):
        return self.net(self.x)
