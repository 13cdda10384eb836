"""``hutchtrace.twice_differentiable``: equal values, the original function's Hessian, no side effects.

The reference for the Hessian does not use the swap: central differences of the ORIGINAL
model's gradient (PyTorch has the first derivative of hardsigmoid, only not the second).
"""

from __future__ import annotations

import threading

import pytest
import torch
from helpers import assert_close_rel, assert_same_snapshot, exact_samples, probe_matrix, snapshot
from torch import nn

import hutchtrace
from hutchtrace.core.errors import HVPUnsupportedError

F = nn.functional
DTYPES = [torch.float64, torch.float32, torch.bfloat16]


class GatedNet(nn.Module):
    """A squeeze-and-excitation-like gate: ``h * hardsigmoid(W h)``, as in MobileNetV3."""

    def __init__(self, inplace: bool = False, functional: bool = False):
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.gate = nn.Linear(6, 6)
        self.out = nn.Linear(6, 2)
        self.act = nn.Hardsigmoid(inplace=inplace)
        self.functional = functional

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        pre = self.gate(h)
        g = F.hardsigmoid(pre) if self.functional else self.act(pre)
        return self.out(h * g)


def _gated(dtype=torch.float64, **kw):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = GatedNet(**kw).to(dtype)
        with torch.no_grad():
            net.gate.weight.mul_(4.0)  # gate inputs spread over (-3, 3) and beyond: both regimes
        x = torch.randn(16, 4, dtype=dtype)
        y = torch.randn(16, 2, dtype=dtype)
    return net, x, y


def _mse(out, y):
    return ((out - y) ** 2).mean()


def _hessian_by_differences(net, x, y, eps=1e-5) -> torch.Tensor:
    """``(P, P)`` central differences of the original model's gradient (no swap involved)."""
    params = list(net.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params])

    def grad_at(theta):
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(theta, params)
        gr = torch.autograd.grad(_mse(net(x), y), params)
        return torch.cat([g.reshape(-1) for g in gr])

    cols = []
    for j in range(flat.numel()):
        e = torch.zeros_like(flat)
        e[j] = eps
        cols.append((grad_at(flat + e) - grad_at(flat - e)) / (2 * eps))
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(flat, params)
    H = torch.stack(cols, 1)
    return (H + H.T) / 2


def _gate_margin(net, x) -> float:
    """Distance of the gate's inputs from the kinks at +-3 (differences must not straddle one)."""
    with torch.no_grad():
        pre = net.gate(torch.tanh(net.inp(x)))
    return float(((pre.abs() - 3.0).abs()).min())


@pytest.mark.parametrize("dtype", DTYPES)
def test_values_equal_the_original_ops(dtype):
    x = torch.linspace(-5, 5, 2001, dtype=torch.float64).to(dtype)
    x = torch.cat([x, torch.tensor([-3.0, 3.0, 0.0, -0.0, float("inf"), -float("inf")], dtype=dtype)])
    ref = F.hardsigmoid(x)
    with hutchtrace.twice_differentiable():
        forms = {
            "F.hardsigmoid": F.hardsigmoid(x),
            "F.hardsigmoid inplace kw": F.hardsigmoid(x.clone(), inplace=True),
            "F.hardsigmoid inplace positional": F.hardsigmoid(x.clone(), True),
            "nn.Hardsigmoid": nn.Hardsigmoid()(x),
            "nn.Hardsigmoid(inplace=True)": nn.Hardsigmoid(inplace=True)(x.clone()),
            "torch._C._nn.hardsigmoid": torch._C._nn.hardsigmoid(x),
            "torch._C._nn.hardsigmoid_": torch._C._nn.hardsigmoid_(x.clone()),
        }
    ulp = torch.finfo(dtype).eps
    for name, got in forms.items():
        assert got.dtype == dtype, name
        # relu6(x + 3) / 6 vs PyTorch's clamp(x + 3, 0, 6) * (1/6): one rounding apart at most
        assert torch.allclose(got, ref, rtol=ulp, atol=0), (name, (got - ref).abs().max())


def test_in_place_forms_write_into_their_input():
    x = torch.randn(10, dtype=torch.float64) * 4
    want = F.hardsigmoid(x)
    for op in (lambda t: F.hardsigmoid(t, inplace=True), nn.Hardsigmoid(inplace=True),
               torch._C._nn.hardsigmoid_):
        t = x.clone()
        with hutchtrace.twice_differentiable():
            out = op(t)
        assert out is t and torch.allclose(t, want, rtol=1e-15, atol=0)


def test_first_derivative_equals_the_original():
    x = torch.linspace(-5, 5, 1001, dtype=torch.float64)
    x = x[(x.abs() - 3).abs() > 1e-6]  # away from the kinks, where one-sided choices may differ
    w = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    xa = x.clone().requires_grad_()
    (ga,) = torch.autograd.grad((F.hardsigmoid(xa) * w).sum(), xa)
    xb = x.clone().requires_grad_()
    with hutchtrace.twice_differentiable():
        (gb,) = torch.autograd.grad((F.hardsigmoid(xb) * w).sum(), xb)
    exact = torch.where(x.abs() < 3, w / 6, torch.zeros_like(w))
    assert torch.equal(gb, exact)
    # PyTorch's own CPU backward multiplies by 1/6 rounded to float32 (1.0f / 6.0f) even in
    # float64: the original is within 2^-24 of the exact derivative, the swap exact
    assert torch.allclose(ga, exact, rtol=2.0**-24, atol=0)


def test_without_the_swap_hardsigmoid_has_no_second_derivative():
    """The premise: if PyTorch ever adds the derivative, this fails and the swap can be retired."""
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(torch.tanh(F.hardsigmoid(x)).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="hardsigmoid_backward"):
        torch.autograd.grad(g.sum(), x)


@pytest.mark.parametrize("form", ["module", "inplace", "functional"])
def test_hessian_is_the_original_function_s(form):
    kw = {"module": {}, "inplace": {"inplace": True}, "functional": {"functional": True}}[form]
    net, x, y = _gated(**kw)
    assert _gate_margin(net, x) > 1e-3
    H_fd = _hessian_by_differences(net, x, y)
    with hutchtrace.twice_differentiable():
        H, _ = hutchtrace.exact_hessian(net, _mse, data=(x, y))
    # central differences: O(eps^2 f''') + O(ulp / eps) ~ 1e-10 of the scale, plus PyTorch's
    # float32 constant 1/6 in the original backward (relative 3e-8, see above)
    assert torch.allclose(H, H_fd, rtol=0, atol=1e-7 * float(H_fd.abs().max()))


@pytest.mark.parametrize("hvp", ["reverse", "reverse-batched", "forward", "forward-vmap"])
def test_per_probe_samples_equal_the_exact_hessian_with_the_swap(hvp):
    net, x, y = _gated()
    with hutchtrace.twice_differentiable():
        H, layout = hutchtrace.exact_hessian(net, _mse, data=(x, y))
        res = hutchtrace.block_traces(net, _mse, K=6, data=(x, y), seed=3, hvp=hvp, probing="global",
                                      progress=False)
    Z = probe_matrix(layout, 3, 6)
    assert res.meta["hvp"] == hvp and res.meta["K"] == 6
    assert_close_rel(res.samples, exact_samples(H, layout, Z), 1e-10)


def test_auto_failure_outside_the_swap_does_not_stick_inside_it():
    """``hvp="auto"`` caches per model which backbones failed; a call inside the swap runs
    other ops, so the failures cached by the same model's call outside it must not apply."""
    net, x, y = _gated()
    with pytest.raises(HVPUnsupportedError):
        hutchtrace.block_traces(net, _mse, K=2, data=(x, y), seed=0, hvp="auto", progress=False)
    with hutchtrace.twice_differentiable():
        res = hutchtrace.block_traces(net, _mse, K=2, data=(x, y), seed=0, hvp="auto", progress=False)
    assert res.meta["K"] == 2 and all(b.finite for b in res.blocks)


@pytest.mark.parametrize("hvp", ["auto", "reverse", "forward"])
def test_error_without_the_swap_names_it(hvp):
    net, x, y = _gated()
    with pytest.raises(HVPUnsupportedError, match=r"hutchtrace\.twice_differentiable\(\)") as info:
        hutchtrace.block_traces(net, _mse, K=2, data=(x, y), seed=0, hvp=hvp, progress=False)
    msg = str(info.value)
    assert "hardsigmoid" in msg and "relu6(x + 3) / 6" in msg and "any mode" in msg


def test_no_side_effects_even_after_an_exception():
    net, x, y = _gated()
    for p in list(net.parameters())[::2]:
        p.grad = torch.randn_like(p)
    net.out.eval()
    before = snapshot(net)
    functional_before = F.hardsigmoid
    with pytest.raises(KeyError):
        with hutchtrace.twice_differentiable():
            hutchtrace.block_traces(net, _mse, K=2, data=(x, y), seed=0, progress=False)
            raise KeyError("user code failed inside the block")
    assert_same_snapshot(before, snapshot(net))
    assert F.hardsigmoid is functional_before
    assert isinstance(net.act, nn.Hardsigmoid) and type(net.act).forward is nn.Hardsigmoid.forward
    test_without_the_swap_hardsigmoid_has_no_second_derivative()  # the swap is gone


def test_nested_and_other_threads_unaffected():
    seen = {}

    def other_thread():
        x = torch.randn(5, dtype=torch.float64, requires_grad=True)
        (g,) = torch.autograd.grad(torch.tanh(F.hardsigmoid(x)).sum(), x, create_graph=True)
        try:
            torch.autograd.grad(g.sum(), x)
            seen["other"] = "swapped"
        except RuntimeError:
            seen["other"] = "original"

    net, x, y = _gated()
    with hutchtrace.twice_differentiable():
        with hutchtrace.twice_differentiable():
            res = hutchtrace.block_traces(net, _mse, K=2, data=(x, y), seed=0, hvp="reverse", progress=False)
        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
        res2 = hutchtrace.block_traces(net, _mse, K=2, data=(x, y), seed=0, hvp="reverse", progress=False)
    assert torch.equal(res.samples, res2.samples)
    assert seen["other"] == "original"  # torch-function modes are thread-local


def test_monitor_step_inside_the_swap():
    net, x, y = _gated()
    mon = hutchtrace.Monitor(net, _mse, every=1, K=2, overhead=None, detector=None, seed=0)
    with hutchtrace.twice_differentiable():
        rec = mon.step(data=(x, y))
    assert set(rec["blocks"]) == {"inp", "gate", "out"}
    assert all(torch.isfinite(torch.tensor(v["trace"])) for v in rec["blocks"].values())


# --------------------------------------------------------------------------- F.normalize
class CosineAttention(nn.Module):
    """Swin V2's cosine attention on a padded window: the padded token's key is exactly zero
    for every value of the parameters (no key bias), so its normalised key sits at the 0/0."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(4, 4)
        self.k = nn.Linear(4, 4, bias=False)
        self.v = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):  # x: (batch, tokens, 4), the last token zero padding
        q, k = F.normalize(self.q(x), dim=-1), F.normalize(self.k(x), dim=-1)
        att = torch.softmax(4.0 * q @ k.transpose(1, 2), -1)
        return self.out((att @ self.v(x)).mean(1))


def _cosine(dtype=torch.float64):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        net = CosineAttention().to(dtype)
        x = torch.randn(3, 5, 4, dtype=dtype)
        x[:, -1] = 0.0
        y = torch.randn(3, 2, dtype=dtype)
    return net, x, y


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_normalize_values_equal_the_original(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 5, 3, generator=g).to(dtype)
    x[0, 0] = 0.0
    x[1, 1] = 1e-14
    for kw in ({}, {"dim": -1}, {"dim": 0, "eps": 1e-3}, {"p": 1.0}, {"p": 3.0, "dim": 2}):
        want = F.normalize(x, **kw)
        with hutchtrace.twice_differentiable():
            got = F.normalize(x, **kw)
        assert torch.allclose(got, want, rtol=8 * torch.finfo(dtype).eps, atol=0), kw
        if kw.get("p", 2.0) != 2.0:
            assert torch.equal(got, want)  # other norms are not swapped


def test_normalize_premise_nan_second_derivative_at_zero():
    """The premise: if PyTorch fixes the 0/0, this fails and the swap can be retired."""
    x = torch.zeros(2, 3, dtype=torch.float64)
    x[0] = torch.tensor([1.0, 2.0, 3.0])
    x.requires_grad_()
    w = torch.tensor([[1.0, -2.0, 0.5]] * 2, dtype=torch.float64)
    (g,) = torch.autograd.grad(((F.normalize(x, dim=-1) * w).sum()) ** 2, x, create_graph=True)
    assert bool(torch.isfinite(g).all())  # the first derivative is fine
    (h,) = torch.autograd.grad(g.sum(), x)
    assert bool(torch.isnan(h[1]).all())
    with hutchtrace.twice_differentiable():
        (g,) = torch.autograd.grad(((F.normalize(x, dim=-1) * w).sum()) ** 2, x, create_graph=True)
        (h,) = torch.autograd.grad(g.sum(), x)
    assert bool(torch.isfinite(h).all())


def test_cosine_attention_hessian_is_the_original_function_s():
    net, x, y = _cosine()
    H_fd = _hessian_by_differences(net, x, y)  # the zero key stays zero under any perturbation
    assert bool(torch.isfinite(H_fd).all())
    with hutchtrace.twice_differentiable():
        H, layout = hutchtrace.exact_hessian(net, _mse, data=(x, y), method="autograd")
        res = hutchtrace.block_traces(net, _mse, K=6, data=(x, y), seed=3, hvp="reverse", probing="global",
                                      progress=False)
    assert torch.allclose(H, H_fd, rtol=0, atol=1e-7 * float(H_fd.abs().max()))
    assert_close_rel(res.samples, exact_samples(H, layout, probe_matrix(layout, 3, 6)), 1e-10)


def test_cosine_attention_without_the_swap_is_flagged_not_averaged():
    net, x, y = _cosine()
    with pytest.warns(hutchtrace.NonFiniteWarning, match="twice_differentiable"):
        res = hutchtrace.block_traces(net, _mse, K=2, data=(x, y), seed=0, hvp="reverse", progress=False)
    assert not res["k.weight"].finite
