"""The closed form of ``LH_i`` for ``nn.Linear`` / ``nn.Conv2d`` followed by an elementwise ``A`` (docs/maths.md section 7).

With rows ``z_r`` (the samples for Linear; the samples x output positions of the unfolded
patches for Conv2d), ``u_{r,k} = w_k^T z_r + b_k`` and ``z~_r = [z_r; 1]``:

.. math::

    \\frac{\\partial^2 S}{\\partial w_{kj} \\partial w_{k'j'}}
        = \\delta_{kk'} \\sum_r A''(u_{rk}) z_{rj} z_{rj'},
    \\qquad LH^{(k)} = \\tilde Z^T \\mathrm{diag}(A''(u_{:,k})) \\tilde Z
        \\in \\mathbb{R}^{(n+1)\\times(n+1)},

so ``LH_i`` is block-diagonal over output units (over output channels for Conv2d; groups
restrict ``z~`` to the unit's group). Its rank is at most ``m min(R, n+1)``; for one input
the unit block is ``A''(u_k) z~ z~^T`` with the single non-zero eigenvalue
``A''(u_k)(||z||^2 + 1)``. The closed form takes ``O(R m n^2)`` time and ``m (n+1)^2``
memory, against ``O(R m^2 n^2)`` and ``p_i^2`` for the dense paths.

``A''`` comes from a double backward through ``A`` itself, so module hyper-parameters
(``nn.Softplus(beta=2)``) are honoured. :func:`closed_form_problem` says why the formula does
not apply to a layer (another module type, a parametrization or hooks, extra parameters, a
custom ``phi``, a coupling activation), ``None`` when it does.

Example:
    >>> from hutchtrace.layers.local_hessian.activation import resolve_activation
    >>> from hutchtrace.layers.local_hessian.prepare import prepare
    >>> layer = torch.nn.Linear(2, 3).double()
    >>> p = prepare(layer, "", (torch.randn(4, 2, dtype=torch.float64),), {},
    ...             resolve_activation("tanh"), "sum", 2**20, None)
    >>> blocks, coords, R, rank_bound = closed_form(p)
    >>> tuple(blocks.shape), coords[1].tolist(), R, rank_bound
    ((3, 3, 3), [2, 3, 7], 4, 9)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ...core.errors import HVPUnsupportedError
from .activation import Activation
from .budget import check_budget
from .errors import LocalHessianError
from .prepare import PreparedLayer

__all__ = ["closed_form", "closed_form_problem"]


def closed_form_problem(mod: nn.Module, act: Activation, phi, method: str) -> str | None:
    """Why the closed form does not apply (None when it does)."""
    if type(mod) not in (nn.Linear, nn.Conv2d):
        return f"the closed form covers nn.Linear and nn.Conv2d (exact types), not {type(mod).__name__}"
    if parametrize.is_parametrized(mod):
        return "the layer is parametrized (its weight is computed from other tensors)"
    if mod._forward_hooks or mod._forward_pre_hooks:
        return "the layer has forward hooks that may change its output"
    names = {n for n, p in mod.named_parameters() if p.requires_grad}
    if not names <= {"weight", "bias"}:
        return f"the layer has parameters other than weight/bias: {sorted(names - {'weight', 'bias'})}"
    if not (phi == "sum" or phi == "mean"):
        return "phi is a custom callable (the closed form needs phi = 'sum' or 'mean')"
    if act.kind == "coupled":
        return (
            f"activation {act.name!r} couples the output units, so LH_i is not block-diagonal; "
            "use method='generic'"
        )
    if act.kind == "custom" and method != "closed_form":
        return (
            f"activation {act.name!r} is not known to be elementwise (pass method='closed_form' to assert it)"
        )
    return None


def _unit_rows(mod: nn.Module, z: torch.Tensor, W: torch.Tensor):
    """``(Zt, u_lin, groups)``: rows ``Zt`` ``(g, R, F)`` and ``u - b`` ``(g, m_g, R)``."""
    if isinstance(mod, nn.Linear):
        n = mod.in_features
        if z.shape[-1] != n:
            raise LocalHessianError(f"block input has last dim {z.shape[-1]}, the Linear layer expects {n}")
        Z = z.reshape(-1, n)
        return Z.unsqueeze(0), (W @ Z.T).unsqueeze(0), 1
    # Conv2d: unfold patches; unbatched (C, H, W) input is one sample.
    x = z if z.dim() == 4 else z.unsqueeze(0)
    mode = "constant" if mod.padding_mode == "zeros" else mod.padding_mode
    x = F.pad(x, mod._reversed_padding_repeated_twice, mode=mode)
    patches = F.unfold(
        x, mod.kernel_size, dilation=mod.dilation, padding=0, stride=mod.stride
    )  # (N, C*kk, L)
    Nn, _, L = patches.shape
    g = mod.groups
    Fg = mod.in_channels // g * math.prod(mod.kernel_size)
    Zt = patches.reshape(Nn, g, Fg, L).permute(1, 0, 3, 2).reshape(g, Nn * L, Fg)
    Wg = W.reshape(g, mod.out_channels // g, Fg)
    return Zt, Wg @ Zt.transpose(1, 2), g


def _second_derivative(act: Activation, u: torch.Tensor) -> torch.Tensor:
    """Elementwise ``A''(u)`` by double backward through ``A`` (keeps module hyper-parameters)."""
    if act.fn is None:
        return torch.zeros_like(u)
    with torch.enable_grad():
        uu = u.detach().requires_grad_(True)
        try:
            y = act(uu)
            (g1,) = torch.autograd.grad(y.sum(), uu, create_graph=True)
            if not g1.requires_grad:
                return torch.zeros_like(u)
            (g2,) = torch.autograd.grad(g1.sum(), uu, allow_unused=True)
        except RuntimeError as e:
            raise HVPUnsupportedError(
                f"activation {act.name!r} has no second derivative in autograd ({str(e).splitlines()[0]}); "
                "use a twice-differentiable activation"
            ) from e
    return torch.zeros_like(u) if g2 is None else g2.detach()


def closed_form(layer: PreparedLayer):
    """``(blocks (m, q, q), dense-order coords (m, q), R, rank bound)`` of the closed form."""
    if len(layer.args) != 1 or layer.kwargs:
        raise LocalHessianError(
            f"layer {layer.name!r} was called with {len(layer.args)} positional and {len(layer.kwargs)} "
            "keyword inputs; the closed form needs one input tensor"
        )
    mod, z, act, phi = layer.module, layer.args[0], layer.act, layer.phi
    dtype, budget, name = layer.dtype, layer.budget, layer.name
    W = mod.weight.detach().to(dtype)
    b = mod.bias.detach().to(dtype) if mod.bias is not None else None
    use_w = mod.weight.requires_grad
    use_b = b is not None and mod.bias.requires_grad
    m = W.shape[0]
    Fk = W[0].numel()
    q = (Fk if use_w else 0) + (1 if use_b else 0)
    itemsize = torch.empty((), dtype=dtype).element_size()
    check_budget(
        m * q * q * itemsize,
        budget,
        name,
        (m * Fk if use_w else 0) + (m if use_b else 0),
        "the closed-form blocks",
    )
    Zt, u, g = _unit_rows(mod, z, W)
    mg = m // g
    if b is not None:
        u = u + b.reshape(g, mg, 1)
    a2 = _second_derivative(act, u)
    if phi == "mean":
        a2 = a2 / u.numel()
    R = Zt.shape[1]
    cols = ([Zt] if use_w else []) + ([torch.ones(g, R, 1, dtype=dtype, device=Zt.device)] if use_b else [])
    Z1 = torch.cat(cols, -1)  # (g, R, q)
    blocks = torch.zeros(g, mg, q, q, dtype=dtype, device=Zt.device)
    # Rows per pass so the (m, rows, q) temporary uses at most a quarter of the remaining budget.
    spare = max(budget - m * q * q * itemsize, 0) // 4
    rc = int(max(1, min(R, spare // max(m * q * itemsize, 1))))
    for r0 in range(0, R, rc):
        Zc = Z1[:, r0 : r0 + rc]  # (g, rc, q)
        tmp = a2[:, :, r0 : r0 + rc, None] * Zc[:, None]  # (g, mg, rc, q)
        blocks += tmp.transpose(-1, -2) @ Zc[:, None]  # (g, mg, q, q)
    blocks = blocks.reshape(m, q, q)
    # Dense-order coordinates of unit k: its weight row (row-major), then its bias.
    k = torch.arange(m, device=Zt.device)
    parts = []
    if use_w:
        parts.append(k[:, None] * Fk + torch.arange(Fk, device=Zt.device)[None, :])
    if use_b:
        parts.append(((m * Fk if use_w else 0) + k)[:, None])
    coords = torch.cat(parts, 1)
    # each unit k: rank(Z~^T D_k Z~) <= rank(Z~); undefined for non-finite inputs (flagged later)
    bound = mg * int(torch.linalg.matrix_rank(Z1).sum()) if bool(torch.isfinite(Z1).all()) else None
    return blocks, coords, R, bound
