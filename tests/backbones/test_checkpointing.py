"""Gradient checkpointing (issue 13, item 4).

``torch.utils.checkpoint(use_reentrant=False)`` (the default of Hugging Face's
``gradient_checkpointing_enable``) recomputes the checkpointed region inside the backward;
the double backward of the reverse backbones goes through it and is exact. torch.func's
forward mode cannot run saved-tensor hooks, so the forward backbones refuse with the reason,
and ``auto`` uses reverse mode without losing a row. The reentrant form cannot run under
``torch.autograd.grad`` at all: every backbone refuses with the fix named.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.utils.checkpoint as cp
from helpers import assert_close_rel, exact_samples, probe_matrix
from torch import nn

import hutchtrace
from hutchtrace.backbones import auto as auto_mod
from hutchtrace.backbones.exact import exact_hessian
from hutchtrace.core.errors import HVPUnsupportedError


class Net(nn.Module):
    """Linear -> [tanh -> Linear -> tanh -> dropout] -> Linear, the bracket optionally checkpointed."""

    def __init__(self, mode=None, p: float = 0.0):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.mode = mode
        self.a = nn.Linear(5, 6).double()
        self.b = nn.Linear(6, 6).double()
        self.c = nn.Linear(6, 3).double()
        self.drop = nn.Dropout(p)
        with torch.no_grad():
            for q in self.parameters():
                q.copy_(torch.randn(q.shape, generator=g, dtype=torch.float64) * 0.7)

    def block(self, h):
        return self.drop(torch.tanh(self.b(torch.tanh(h))))

    def forward(self, x):
        h = self.a(x)
        h = self.block(h) if self.mode is None else cp.checkpoint(self.block, h, use_reentrant=self.mode)
        return self.c(h)


def mse(out, y):
    return ((out - y) ** 2).mean()


def xy():
    g = torch.Generator().manual_seed(1)
    f64 = torch.float64
    return torch.randn(16, 5, generator=g, dtype=f64), torch.randn(16, 3, generator=g, dtype=f64)


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    auto_mod._AUTO_CACHE.clear()
    # as if torch.func were initialised: auto then times forward mode on calls this short
    monkeypatch.setattr("hutchtrace.estimate.engine.auto.forward_mode_initialised", lambda: True)
    yield


@pytest.mark.parametrize("p", [0.0, 0.4])
@pytest.mark.parametrize("hvp", ["reverse", "reverse-batched", "auto"])
def test_non_reentrant_checkpointing_is_exact(hvp, p):
    """Against the exact Hessian of the same network without checkpointing (with dropout: the
    checkpoint replays the mask of its forward, and the call uses one mask)."""
    plain, ck = Net(None, p).train(), Net(False, p).train()
    data = xy()
    if hvp == "reverse-batched" and p > 0:
        # the checkpoint recomputes the dropout inside the vmapped backward: refused, named
        with pytest.raises(HVPUnsupportedError, match=r"random op.*hvp='reverse'"):
            hutchtrace.block_traces(ck, mse, K=4, data=data, seed=4, hvp=hvp)
        return
    H, layout = exact_hessian(plain, mse, data=data, method="autograd")
    res = hutchtrace.block_traces(ck, mse, K=64, data=data, seed=4, hvp=hvp)
    assert res.meta["K"] == 64 and not (res.samples.abs().sum(1) == 0).any()
    assert_close_rel(res.samples, exact_samples(H, layout, probe_matrix(layout, 4, 64)), 1e-10)
    if hvp == "auto":
        failed = res.meta["hvp_timings"]["failed"]
        assert res.meta["hvp"].startswith("reverse")
        assert "saved-tensor hooks" in failed["forward-vmap"] and "saved-tensor hooks" in failed["forward"]
        if p > 0:  # the batched backward cannot run the recomputed dropout: its rows went to 'reverse'
            assert "random op" in failed["reverse-batched"] and res.meta["hvp"] == "reverse"


@pytest.mark.parametrize("hvp", ["forward", "forward-vmap"])
def test_forward_mode_names_the_checkpoint_and_the_fix(hvp):
    with pytest.raises(HVPUnsupportedError, match=r"saved-tensor hooks.*hvp='reverse'"):
        hutchtrace.block_traces(Net(False), mse, K=2, data=xy(), seed=0, hvp=hvp)


@pytest.mark.parametrize("hvp", ["reverse", "reverse-batched", "forward", "forward-vmap", "auto"])
def test_reentrant_checkpointing_is_refused_with_the_fix(hvp):
    with pytest.raises(HVPUnsupportedError) as info:
        hutchtrace.block_traces(Net(True), mse, K=2, data=xy(), seed=0, hvp=hvp)
    msg = str(info.value)
    assert "use_reentrant=False" in msg
    assert "gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})" in msg
    if hvp == "auto":
        for name in ("reverse", "reverse-batched", "forward", "forward-vmap"):
            assert f"'{name}':" in msg
        assert not re.search(r"hvp='(reverse|forward)", msg)


def test_hugging_face_gradient_checkpointing():
    """A tiny random-init GPT-2 with model.gradient_checkpointing_enable() (non-reentrant by
    default): ``auto`` equals double backward on the same model without checkpointing."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=24, n_positions=8, n_embd=8, n_layer=2, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    plain = transformers.GPT2LMHeadModel(cfg).double().train()
    ck = transformers.GPT2LMHeadModel(cfg).double().train()
    ck.load_state_dict(plain.state_dict())
    ck.gradient_checkpointing_enable()
    ids = torch.randint(0, 24, (2, 8), generator=torch.Generator().manual_seed(2))

    def loss(m):
        return m(input_ids=ids, labels=ids).loss

    ref = hutchtrace.block_traces(plain, loss, K=48, seed=1, hvp="reverse")
    res = hutchtrace.block_traces(ck, loss, K=48, seed=1, hvp="auto")
    assert res.meta["K"] == 48 and res.meta["hvp"].startswith("reverse")
    torch.testing.assert_close(res.samples, ref.samples, rtol=1e-9, atol=1e-9)
    ck.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(HVPUnsupportedError, match="use_reentrant=False"):
        hutchtrace.block_traces(ck, loss, K=2, seed=1, hvp="auto")
