"""Exact local Hessians (docs/maths.md section 7): closed form vs torch.func vs the seed's row-by-row definition.

References are written independently of hutchtrace: ``S(theta)`` is coded by hand on a flat
parameter vector and differentiated with ``torch.func.hessian`` or by a literal loop of
double-backward rows. Everything is float64, so the paths must agree to ~1e-15 relative; the
tolerance 1e-12 leaves three orders of magnitude of rounding headroom and would still catch
any wrong term (those are O(1)).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import hessian

from hutchtrace.core.errors import BlockSpecError, HVPUnsupportedError, MemoryBudgetError
from hutchtrace.layers.local_hessian import (
    DegenerateLocalHessianWarning,
    LocalHessianError,
    local_hessian,
    local_hessian_rows,
)
from hutchtrace.layers.local_hessian.capture import capture_block_inputs

DT = torch.float64
TOL = 1e-12

# A and its analytic second derivative A''
ACTS = {
    "tanh": (torch.tanh, lambda u: -2 * torch.tanh(u) * (1 - torch.tanh(u) ** 2)),
    "softplus": (F.softplus, lambda u: torch.sigmoid(u) * (1 - torch.sigmoid(u))),
    "sigmoid": (
        torch.sigmoid,
        lambda u: torch.sigmoid(u) * (1 - torch.sigmoid(u)) * (1 - 2 * torch.sigmoid(u)),
    ),
}


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _linear(n, m, bias=True, seed=0):
    g = _gen(seed)
    layer = nn.Linear(n, m, bias=bias).to(DT)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(m, n, generator=g, dtype=DT) * 0.7)
        if bias:
            layer.bias.copy_(torch.randn(m, generator=g, dtype=DT) * 0.7)
    return layer


def _theta(layer):
    return torch.cat([p.detach().reshape(-1) for p in layer.parameters()])


def _S_ref(layer, Z, act):
    """Hand-written S(theta) on the flat (W row-major, b) vector."""
    m, n = layer.weight.shape
    has_b = layer.bias is not None

    def S(theta):
        W = theta[: m * n].reshape(m, n)
        u = Z @ W.T + (theta[m * n :] if has_b else 0)
        return ACTS[act][0](u).sum()

    return S


def _rows_ref(S, theta):
    """The seed's Algorithm 1, literally: g = grad S (create_graph); row j = grad g_j."""
    th = theta.clone().requires_grad_(True)
    g = torch.autograd.grad(S(th), th, create_graph=True)[0]
    return torch.stack([torch.autograd.grad(g[j], th, retain_graph=True)[0] for j in range(th.numel())])


# ------------------------------------------------------------------------------------------
# agreement of the three paths


@pytest.mark.parametrize("act", sorted(ACTS))
@pytest.mark.parametrize("N", [1, 5])
@pytest.mark.parametrize("bias", [True, False])
def test_closed_form_equals_torch_func_and_rows(act, N, bias):
    layer = _linear(8, 6, bias=bias, seed=N)
    Z = torch.randn(N, 8, generator=_gen(10 + N), dtype=DT)
    H_func = hessian(_S_ref(layer, Z, act))(_theta(layer))
    H_rows = _rows_ref(_S_ref(layer, Z, act), _theta(layer))
    lh = local_hessian(layer, Z, layer, activation=act)
    assert lh.method == "closed_form" and lh.is_block_diagonal
    assert lh.blocks.shape == (6, 8 + bias, 8 + bias)
    H_cf = lh.dense()
    scale = H_func.abs().max()
    assert scale > 0.1  # a non-trivial matrix
    assert (H_cf - H_func).abs().max() <= TOL * scale
    assert (H_cf - H_rows).abs().max() <= TOL * scale
    # the library's own generic and row paths (literal Algorithm 1 and batched rows)
    for method, chunk in [("generic", None), ("rows", 1), ("rows", 7)]:
        other = local_hessian(layer, Z, layer, activation=act, method=method, chunk=chunk)
        assert other.method == method and not other.is_block_diagonal
        assert (other.matrix - H_func).abs().max() <= TOL * scale


def test_closed_form_entries_are_the_spec_formula():
    """LH^(k) = Ztil^T diag(A''(u_:,k)) Ztil, zero between units (docs/maths.md section 7)."""
    layer = _linear(5, 4, seed=3)
    Z = torch.randn(7, 5, generator=_gen(4), dtype=DT)
    lh = local_hessian(layer, Z, layer, activation="tanh")
    u = Z @ layer.weight.detach().T + layer.bias.detach()
    a2 = ACTS["tanh"][1](u)
    Zt = torch.cat([Z, torch.ones(7, 1, dtype=DT)], 1)
    for k in range(4):
        expect = Zt.T @ torch.diag(a2[:, k]) @ Zt
        assert (lh.blocks[k] - expect).abs().max() <= TOL * expect.abs().max()
    H = lh.dense()
    # coordinates of unit 0 and unit 1 (W row-major, then b): cross terms vanish
    u0 = [*range(5), 20]
    u1 = [*range(5, 10), 21]
    assert H[u0][:, u1].abs().max() == 0
    assert lh.trace() == pytest.approx(float((a2 * (Z.pow(2).sum(1, keepdim=True) + 1)).sum()), rel=1e-13)
    assert torch.equal(lh.diagonal(), H.diagonal())


@pytest.mark.parametrize("act", sorted(ACTS))
def test_single_input_eigenvalues(act):
    """N = 1: eigenvalues are {A''(u_k)(||z||^2 + 1)}_k plus m*n zeros."""
    m, n = 6, 8
    layer = _linear(n, m, seed=7)
    z = torch.randn(1, n, generator=_gen(8), dtype=DT)
    lh = local_hessian(layer, z, layer, activation=act)
    u = (z @ layer.weight.detach().T + layer.bias.detach())[0]
    predicted = (
        torch.cat([ACTS[act][1](u) * (z.pow(2).sum() + 1), torch.zeros(m * n, dtype=DT)]).sort().values
    )
    ev = lh.eigenvalues()
    assert ev.shape == (m * (n + 1),)
    assert (ev - predicted).abs().max() <= TOL * predicted.abs().max()
    dense_ev = torch.linalg.eigvalsh(lh.dense())
    assert (dense_ev - ev).abs().max() <= TOL * predicted.abs().max()


@pytest.mark.parametrize("N", [1, 3, 5, 9, 20])
def test_rank_is_m_min_N_n_plus_1(N):
    m, n = 6, 8
    layer = _linear(n, m, seed=N)
    Z = torch.randn(N, n, generator=_gen(N), dtype=DT)
    lh = local_hessian(layer, Z, layer, activation="softplus")
    s = lh.summary()
    assert s.rank == m * min(N, n + 1) == lh.rank_bound
    assert s.singular == (N < n + 1)


def test_rank_bound_follows_the_input_rank():
    """A constant-zero input feature (e.g. a blank pixel) removes one direction per unit."""
    m, n, N = 5, 6, 30
    layer = _linear(n, m, seed=4)
    Z = torch.randn(N, n, generator=_gen(4), dtype=DT)
    Z[:, 2] = 0
    lh = local_hessian(layer, Z, layer, activation="softplus")
    assert lh.rank_bound == m * n  # rank [Z, 1] = n, not n + 1
    assert lh.summary().rank == m * n


CONVS = [
    {"in_channels": 3, "out_channels": 4, "kernel_size": 3, "padding": 1},
    {"in_channels": 4, "out_channels": 6, "kernel_size": 3, "stride": 2, "padding": 1},
    {
        "in_channels": 4,
        "out_channels": 6,
        "kernel_size": (2, 3),
        "groups": 2,
        "padding_mode": "circular",
        "padding": 1,
    },
    {
        "in_channels": 3,
        "out_channels": 2,
        "kernel_size": 3,
        "padding": "same",
        "dilation": 2,
        "padding_mode": "reflect",
    },
    {"in_channels": 2, "out_channels": 3, "kernel_size": 2, "bias": False},
]


@pytest.mark.parametrize(
    "cfg",
    CONVS,
    ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items() if k not in ("in_channels", "out_channels")),
)
def test_conv2d_closed_form_equals_generic(cfg):
    torch.manual_seed(0)
    conv = nn.Conv2d(**cfg).to(DT)
    x = torch.randn(2, cfg["in_channels"], 6, 5, generator=_gen(1), dtype=DT)
    cf = local_hessian(conv, x, conv, activation=nn.Softplus(beta=2.0))
    gen = local_hessian(conv, x, conv, activation=nn.Softplus(beta=2.0), method="generic")
    assert cf.method == "closed_form" and gen.method == "generic"
    assert cf.blocks.shape[0] == cfg["out_channels"] and cf.num_inputs == 2
    scale = gen.matrix.abs().max()
    assert scale > 0.1
    assert (cf.dense() - gen.matrix).abs().max() <= TOL * scale


def test_unbatched_inputs_are_one_sample():
    conv = nn.Conv2d(2, 3, 2).to(DT)
    x = torch.randn(2, 4, 4, generator=_gen(3), dtype=DT)
    one = local_hessian(conv, x, conv, activation="tanh")
    batched = local_hessian(conv, x[None], conv, activation="tanh")
    assert one.num_inputs == batched.num_inputs == 1 and torch.equal(one.blocks, batched.blocks)
    layer = _linear(3, 2)
    z = torch.randn(3, generator=_gen(4), dtype=DT)
    v = local_hessian(layer, z, layer, activation="tanh")
    assert v.num_inputs == 1 and torch.equal(
        v.blocks, local_hessian(layer, z[None], layer, activation="tanh").blocks
    )


def test_phi_mean_and_callable():
    layer = _linear(4, 3, seed=2)
    Z = torch.randn(6, 4, generator=_gen(2), dtype=DT)
    s = local_hessian(layer, Z, layer, activation="tanh")
    mean = local_hessian(layer, Z, layer, "mean", activation="tanh")
    assert mean.method == "closed_form"
    assert (mean.dense() - s.dense() / (6 * 3)).abs().max() <= TOL * s.dense().abs().max() / 18
    # a callable phi goes through the generic path: phi(y) = sum(y^2) on top of tanh
    sq = local_hessian(layer, Z, layer, lambda y: (y**2).sum(), activation="tanh")
    assert sq.method == "generic" and sq.phi == "<lambda>"
    m, n = 3, 4

    def S(theta):
        u = Z @ theta[: m * n].reshape(m, n).T + theta[m * n :]
        return (torch.tanh(u) ** 2).sum()

    ref = hessian(S)(_theta(layer))
    assert (sq.matrix - ref).abs().max() <= TOL * ref.abs().max()


# ------------------------------------------------------------------------------------------
# the block input and the activation rule


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4), nn.Softplus(beta=1.5), nn.Linear(4, 2)
    ).to(DT)


def test_hook_captures_block_input_and_auto_activation():
    net = _net()
    x = torch.randn(9, 5, generator=_gen(5), dtype=DT)
    z2 = torch.tanh(net[0](x)).detach()
    for layer in ("2", net[2]):
        lh = local_hessian(net, x, layer)
        assert lh.layer == "2" and lh.activation.startswith("softplus(beta=1.5")
        direct = local_hessian(net[2], z2, net[2], activation=nn.Softplus(beta=1.5))
        assert torch.equal(lh.blocks, direct.blocks)
    assert local_hessian(net, x, "0").activation == "tanh"
    caps = capture_block_inputs(net, x, ["0", "2"])
    assert torch.equal(caps["0"][0][0], x) and torch.allclose(caps["2"][0][0], z2, rtol=0, atol=0)


def test_auto_activation_is_identity_without_a_following_activation():
    net = _net()
    x = torch.randn(3, 5, generator=_gen(6), dtype=DT)
    with pytest.warns(DegenerateLocalHessianWarning, match="identically zero"):
        lh = local_hessian(net, x, "4")  # last module: A = identity, S linear in theta
    assert lh.activation == "identity" and lh.trace() == 0.0
    assert torch.count_nonzero(lh.dense()) == 0


def test_explicit_activation_overrides_and_custom_forward():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = _linear(3, 4, seed=9)

        def forward(self, x):
            return torch.tanh(self.fc(x)).sum(1)

    net = Custom()
    x = torch.randn(4, 3, generator=_gen(9), dtype=DT)
    with pytest.warns(DegenerateLocalHessianWarning):
        local_hessian(net, x, "fc")  # the tanh inside forward is invisible to "auto"
    by_name = local_hessian(net, x, "fc", activation="tanh")
    by_fn = local_hessian(net, x, "fc", activation=torch.tanh)
    by_mod = local_hessian(net, x, "fc", activation=nn.Tanh())
    ref = hessian(_S_ref(net.fc, x, "tanh"))(_theta(net.fc))
    for lh in (by_name, by_fn, by_mod):
        assert lh.method == "closed_form"
        assert (lh.dense() - ref).abs().max() <= TOL * ref.abs().max()


def test_coupled_activation_uses_generic_path():
    layer = _linear(3, 4, seed=1)
    Z = torch.randn(5, 3, generator=_gen(1), dtype=DT)
    lh = local_hessian(layer, Z, layer, activation=nn.LogSoftmax(dim=-1))
    assert lh.method == "generic"
    m, n = 4, 3

    def S(theta):
        return torch.log_softmax(Z @ theta[: m * n].reshape(m, n).T + theta[m * n :], -1).sum()

    ref = hessian(S)(_theta(layer))
    assert (lh.matrix - ref).abs().max() <= TOL * ref.abs().max()
    # softmax couples the units: entries between unit 0 and unit 1 are non-zero
    assert lh.matrix[0:3, 3:6].abs().max() > 1e-3
    with pytest.raises(LocalHessianError, match="couples the output units"):
        local_hessian(layer, Z, layer, activation="softmax", method="closed_form")


def test_generic_path_for_any_module():
    torch.manual_seed(2)
    ln = nn.LayerNorm(4).to(DT)
    with torch.no_grad():
        ln.weight.copy_(torch.randn(4, generator=_gen(3), dtype=DT))
        ln.bias.copy_(torch.randn(4, generator=_gen(4), dtype=DT))
    x = torch.randn(6, 4, generator=_gen(5), dtype=DT)
    lh = local_hessian(ln, x, ln, activation="tanh")
    assert lh.method == "generic"

    def S(theta):
        return torch.tanh(F.layer_norm(x, (4,), theta[:4], theta[4:])).sum()

    ref = _rows_ref(S, _theta(ln))
    assert (lh.matrix - ref).abs().max() <= TOL * ref.abs().max()
    with pytest.raises(LocalHessianError, match=r"nn\.Linear and nn\.Conv2d"):
        local_hessian(ln, x, ln, activation="tanh", method="closed_form")


def test_auto_falls_back_to_rows_without_functorch_support():
    class OldStyleTanh(torch.autograd.Function):  # no setup_context: unusable under torch.func
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return torch.tanh(x)

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * (1 - torch.tanh(x) ** 2)

    layer = _linear(4, 3, seed=5)
    Z = torch.randn(5, 4, generator=_gen(5), dtype=DT)
    lh = local_hessian(layer, Z, layer, activation=OldStyleTanh.apply)
    assert lh.method == "rows" and lh.activation == "OldStyleTanh"
    ref = local_hessian(layer, Z, layer, activation="tanh").dense()
    assert (lh.matrix - ref).abs().max() <= TOL * ref.abs().max()


def test_frozen_bias_and_dtype_cast():
    layer = _linear(4, 3, seed=6)
    layer.bias.requires_grad_(False)
    Z = torch.randn(5, 4, generator=_gen(6), dtype=DT)
    cf = local_hessian(layer, Z, layer, activation="tanh")
    gen = local_hessian(layer, Z, layer, activation="tanh", method="generic")
    assert cf.numel == 12 and cf.params == ("weight",) and cf.blocks.shape == (3, 4, 4)
    assert (cf.dense() - gen.matrix).abs().max() <= TOL * gen.matrix.abs().max()
    layer.bias.requires_grad_(True)
    f32 = nn.Linear(4, 3)
    f32.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})
    lh = local_hessian(f32, Z.float(), f32, activation="tanh", dtype=DT)
    assert lh.dtype == DT and f32.weight.dtype == torch.float32
    # float64 computation from float32-rounded parameters: compare to the float64 path on those values
    ref = local_hessian(f32.to(DT), Z.float().to(DT), f32, activation="tanh")
    assert (lh.dense() - ref.dense()).abs().max() <= TOL * ref.dense().abs().max()


def test_rows_stream_without_the_dense_matrix():
    layer = _linear(5, 4, seed=8)
    Z = torch.randn(6, 5, generator=_gen(8), dtype=DT)
    dense = local_hessian(layer, Z, layer, activation="sigmoid").dense()
    for method in ("generic", "rows"):
        seen, chunks = [], []
        for idx, block in local_hessian_rows(layer, Z, layer, activation="sigmoid", method=method, chunk=7):
            assert block.shape == (len(idx), 24) and len(idx) <= 7
            seen.append(idx)
            chunks.append(block)
        assert torch.equal(torch.cat(seen), torch.arange(24))
        assert (torch.cat(chunks) - dense).abs().max() <= TOL * dense.abs().max()
        # selected rows only (e.g. the bias rows 20..23 and one weight row)
        pick = [22, 3, 20, 21, 23]
        got = torch.cat(
            [
                b
                for _, b in local_hessian_rows(
                    layer, Z, layer, activation="sigmoid", method=method, rows=pick, chunk=2
                )
            ]
        )
        assert (got - dense[pick]).abs().max() <= TOL * dense.abs().max()
    with pytest.raises(ValueError, match=r"rows must be"):
        next(iter(local_hessian_rows(layer, Z, layer, activation="sigmoid", rows=[24])))


# ------------------------------------------------------------------------------------------
# degenerate cases and errors


@pytest.mark.parametrize("act", ["relu", nn.LeakyReLU(0.1), "identity"])
def test_piecewise_linear_activation_warns_and_returns_zero(act):
    layer = _linear(4, 3, seed=1)
    Z = torch.randn(5, 4, generator=_gen(1), dtype=DT)
    for method in ("auto", "generic"):
        with pytest.warns(DegenerateLocalHessianWarning, match="piecewise linear"):
            lh = local_hessian(layer, Z, layer, activation=act, method=method)
        assert torch.count_nonzero(lh.dense()) == 0


def test_non_differentiable_activation_errors():
    layer = _linear(4, 3)
    Z = torch.randn(5, 4, dtype=DT)
    for act in ("sign", "step", torch.round):
        with pytest.raises(HVPUnsupportedError, match="piecewise constant"):
            local_hessian(layer, Z, layer, activation=act)


def test_layers_without_parameters_and_bad_names():
    net = _net()
    x = torch.randn(3, 5, dtype=DT)
    with pytest.raises(BlockSpecError, match="has no parameters"):
        local_hessian(net, x, "1")  # the Tanh
    with pytest.raises(BlockSpecError, match="no submodule named"):
        local_hessian(net, x, "fc9")
    with pytest.raises(BlockSpecError, match="not a submodule"):
        local_hessian(net, x, nn.Linear(5, 7))
    frozen = _net()
    for p in frozen[0].parameters():
        p.requires_grad_(False)
    with pytest.raises(BlockSpecError, match="only frozen parameters"):
        local_hessian(frozen, x, "0")
    with pytest.raises(ValueError, match="unknown activation"):
        local_hessian(net, x, "0", activation="swishy")
    with pytest.raises(ValueError, match="method must be"):
        local_hessian(net, x, "0", method="exact")
    with pytest.raises(ValueError, match="chunk"):
        local_hessian(net, x, "0", chunk=0)


def test_layer_called_twice_or_never():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3).to(DT)
            self.unused = nn.Linear(3, 3).to(DT)

        def forward(self, x):
            return self.fc(torch.tanh(self.fc(x)))

    net = Twice()
    x = torch.randn(2, 3, dtype=DT)
    with pytest.raises(LocalHessianError, match="ran 2 times"):
        local_hessian(net, x, "fc", activation="tanh")
    with pytest.raises(LocalHessianError, match="did not run"):
        local_hessian(net, x, "unused", activation="tanh")


def test_memory_budget_errors_point_to_block_traces():
    layer = _linear(30, 20)  # P = 620: dense 620^2 * 8 B = 3.1 MB; blocks 20 * 31^2 * 8 B = 154 kB
    Z = torch.randn(4, 30, dtype=DT)
    with pytest.raises(MemoryBudgetError, match=r"block_traces"):
        local_hessian(layer, Z, layer, activation="tanh", method="generic", max_memory=1 << 20)
    with pytest.raises(MemoryBudgetError, match=r"p_i = 620"):
        local_hessian(layer, Z, layer, activation="tanh", max_memory=100_000)  # even the blocks do not fit
    lh = local_hessian(layer, Z, layer, activation="tanh", max_memory=1 << 20)  # the closed form fits
    assert lh.nbytes == 20 * 31 * 31 * 8
    with pytest.raises(MemoryBudgetError, match="assembling the dense matrix"):
        lh.dense()
    assert lh.eigenvalues().shape == (620,)  # eigenvalues need only the blocks


def test_no_side_effects():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 2)).to(
        DT
    )
    net.train()
    x = torch.randn(8, 4, dtype=DT)
    net(x).sum().backward()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    grads = [p.grad.clone() for p in net.parameters()]
    modes = [m.training for m in net.modules()]
    rng = torch.get_rng_state()
    for method in ("auto", "generic", "rows"):
        local_hessian(net, x, "4", activation="tanh", method=method)
        local_hessian(net, x, "1", activation="tanh", method=method)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, net.parameters()))
    assert [m.training for m in net.modules()] == modes
    assert torch.equal(rng, torch.get_rng_state())


def test_nonfinite_entries_are_flagged():
    from hutchtrace.core.errors import NonFiniteWarning

    layer = _linear(3, 2)
    Z = torch.tensor([[1.0, float("nan"), 0.0]], dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegenerateLocalHessianWarning)
        with pytest.warns(NonFiniteWarning, match="NaN/Inf"):
            lh = local_hessian(layer, Z, layer, activation="tanh")
    assert lh.finite is False
