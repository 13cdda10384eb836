"""One random function per call (issue 13 B).

Dropout (any RNG in the forward) draws ONE mask per batch for a whole call: the same for
every probe of every adaptive round, for the pilot of ``probing="auto"``, after a plan switch,
and in dataset mode (one mask per batch, the same in every pass). The global RNG is exactly
as before after the call.

The sharpest check: blocks of ONE element probed in isolation. A Rademacher probe gives
``t_b = z_b^2 H_bb = H_bb`` exactly, so every sample of such a block is the exact diagonal
entry of the Hessian under the mask the call used: a second mask shows up as a second value.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import assert_close_rel, exact_samples, probe_matrix
from torch import nn

import hutchtrace
from hutchtrace.backbones.exact import exact_hessian


class MaskLog(nn.Module):
    """Inverted dropout drawing its mask from the global RNG, logging every mask it draws
    together with the batch it was drawn for (``key``: the model's first input value)."""

    def __init__(self, p: float, log: list):
        super().__init__()
        self.p = p
        self.log = log
        self.key = None

    def forward(self, x):
        if not self.training:
            return x
        keep = (torch.rand(x.shape) > self.p).to(x.dtype)
        try:  # plain tensors only (a torch.func transform may wrap them)
            self.log.append((self.key, keep.flatten().tolist()))
        except (RuntimeError, ValueError):
            pass
        return x * keep / (1 - self.p)


class ScalarNet(nn.Module):
    """``y = c . drop(tanh(a * x1 + b * x2 + W x))`` with scalar parameters a, b (one-element
    blocks) and a dense W (a noisy block that keeps adaptive rounds going)."""

    def __init__(self, log: list, d: int = 6, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = nn.Parameter(torch.randn((), generator=g, dtype=torch.float64))
        self.b = nn.Parameter(torch.randn((), generator=g, dtype=torch.float64))
        self.W = nn.Parameter(torch.randn(d, 4, generator=g, dtype=torch.float64) * 0.5)
        self.c = nn.Parameter(torch.randn(d, generator=g, dtype=torch.float64))
        self.drop = MaskLog(0.5, log)

    def forward(self, x):
        self.drop.key = round(float(x[0, 0]), 9)
        h = torch.tanh(self.a * x[:, :1] + self.b * x[:, 1:2] ** 2 + x @ self.W.T)
        return self.drop(h) @ self.c


def mse(out, y):
    return ((out - y) ** 2).mean()


def data(n=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    return torch.randn(n, 4, generator=g, dtype=f64), torch.randn(n, generator=g, dtype=f64)


def masks_by_batch(log) -> dict:
    out: dict = {}
    for key, mask in log:
        out.setdefault(key, set()).add(tuple(mask))
    return out


@pytest.mark.parametrize("hvp", ["reverse", "reverse-batched", "auto"])
def test_one_mask_over_adaptive_rounds(hvp):
    log: list = []
    model = ScalarNet(log).train()
    x, y = data()
    H, layout = exact_hessian(model, mse, data=(x, y), method="autograd")  # one forward: one mask
    assert len(masks_by_batch(log)[round(float(x[0, 0]), 9)]) == 1
    log.clear()
    rng_before = torch.get_rng_state().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # max_K reached before rtol: intended
        res = hutchtrace.block_traces(model, mse, K=8, data=(x, y), seed=3, probing="isolated", rtol=1e-4,
                                      max_K=40, hvp=hvp, variance="sample")
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert len(res.meta["segments"]) == 1 and res.meta["K"] == 40  # 8 + 8 + 16 + 8: four rounds
    assert {len(m) for m in masks_by_batch(log).values()} == {1}, "a new dropout mask between rounds"
    # every sample of a one-element block is H_bb under the call's mask: all identical, exact
    diag = torch.diagonal(H)
    for name in ("a", "b"):
        b = res.names.index(name)
        col = res.samples[:, b]
        assert torch.allclose(col, col[0].expand_as(col), rtol=1e-12, atol=0)
        assert col[0] == pytest.approx(float(diag[layout.offsets[layout.block_index.index(b)]]), rel=1e-10)
    Z = probe_matrix(layout, 3, 40)
    assert_close_rel(res.samples, exact_samples(H, layout, Z, groups=[[i] for i in range(4)]), 1e-10)


@pytest.mark.parametrize("probing", ["colored", "auto"])
def test_one_mask_through_the_pilot_and_plan_switches(probing):
    log: list = []
    model = ScalarNet(log).train()
    x, y = data()
    H, layout = exact_hessian(model, mse, data=(x, y), method="autograd")
    log.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = hutchtrace.block_traces(model, mse, K=8, data=(x, y), seed=5, probing=probing, rtol=1e-3,
                                      max_K=120, hvp="reverse", pilot_K=4)
    assert {len(m) for m in masks_by_batch(log).values()} == {1}
    segs = res.meta["segments"]
    assert segs[0]["probing"] == "isolated"  # the pilot
    if probing == "colored":  # (auto's path depends on measured seconds per row)
        # a colored run re-colors after rounds when the coupling model finds a better partition
        assert len(segs) >= 2 and all(s["probing"] == "colored" for s in segs[1:])
    L = layout.num_blocks
    known = {"isolated": [[b] for b in range(L)], "global": [list(range(L))]}
    if res.meta["probing"] == "colored":
        known_final = res.meta["groups"]
    for i, s in enumerate(segs):
        groups = known.get(s["probing"]) or (known_final if i == len(segs) - 1 else None)
        if groups is None:
            continue
        rows = slice(s["first_probe"], s["first_probe"] + s["K"])
        Z = probe_matrix(layout, 5, s["K"], first=s["first_probe"])
        assert_close_rel(res.samples[rows], exact_samples(H, layout, Z, groups=groups), 1e-10)


def test_dataset_mode_one_mask_per_batch_in_every_round():
    log: list = []
    model = ScalarNet(log).train()
    x, y = data(n=18)
    batches = [(x[i : i + 6], y[i : i + 6]) for i in (0, 6, 12)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = hutchtrace.block_traces(model, mse, K=8, data=batches, seed=2, probing="isolated", rtol=1e-4,
                                      max_K=32, hvp="reverse")
    assert res.meta["K"] == 32
    per_batch = masks_by_batch(log)
    assert len(per_batch) == 3 and {len(m) for m in per_batch.values()} == {1}
    # one-element blocks: identical samples in every round (sums over the batches' H_bb)
    for name in ("a", "b"):
        col = res.samples[:, res.names.index(name)]
        assert torch.allclose(col, col[0].expand_as(col), rtol=1e-12, atol=0)


def test_shuffling_dataloader_gives_the_same_batches_and_masks_in_every_round():
    """A DataLoader shuffling with the global RNG: every pass of the call replays the first, so
    the batches (and their masks) are the same in every round."""
    log: list = []
    model = ScalarNet(log).train()
    x, y = data(n=18)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=6, shuffle=True)
    rng_before = torch.get_rng_state().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = hutchtrace.block_traces(model, mse, K=8, data=loader, seed=2, probing="isolated", rtol=1e-4,
                                      max_K=24, hvp="reverse")
    assert torch.equal(torch.get_rng_state(), rng_before)
    per_batch = masks_by_batch(log)
    assert len(per_batch) == 3, "the DataLoader yielded other batches in a later round"
    assert {len(m) for m in per_batch.values()} == {1}
    for name in ("a", "b"):
        col = res.samples[:, res.names.index(name)]
        assert torch.allclose(col, col[0].expand_as(col), rtol=1e-12, atol=0)


@pytest.mark.parametrize("estimator", ["decompose", "block_coupling"])
def test_other_estimators_use_one_mask_per_batch(estimator):
    """The structure diagnostics re-iterate the data for every product
    (:class:`~hutchtrace.backbones.curvature_op.CurvatureProducts`): one mask per batch for the call."""
    log: list = []
    model = ScalarNet(log).train()
    x, y = data(n=18)
    batches = [(x[i : i + 6], y[i : i + 6]) for i in (0, 6, 12)]
    rng_before = torch.get_rng_state().clone()
    fn = getattr(hutchtrace, estimator)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fn(model, mse, K=4, data=batches, seed=0, progress=False)
    assert torch.equal(torch.get_rng_state(), rng_before)
    per_batch = masks_by_batch(log)
    assert len(per_batch) == 3 and {len(m) for m in per_batch.values()} == {1}
