"""``hvp="auto"``: every probe row evaluated exactly once by one operator, and a backbone
choice that is robust and cheap (issue 13 A, C, D).

* A backbone that fails while being timed hands its rows to the next: the samples equal
  ``hvp="reverse"``'s, no row is left at zero, ``K`` and the standard errors agree.
* Backbones that multiply by different matrices (PyTorch's autograd modes disagree on
  ``nn.Embedding(padding_idx=...)``) are never mixed: the reference (double backward, the
  symmetric Hessian) is used, with one warning and ``meta["hvp_disagreement"]``.
* When every backbone fails the error lists all of them and advises none of them.
* Forward mode is not timed where it cannot win (a short call, a custom Function without
  forward-mode support, an earlier failure); a choice is cached only from stable timings
  and is re-checked on later calls.
"""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_rel, exact_samples, make_case, probe_matrix
from torch import nn

import hutchtrace
from hutchtrace import zoo
from hutchtrace.backbones import auto as auto_mod
from hutchtrace.backbones.auto import MARGIN, AutoHVP, Timing
from hutchtrace.backbones.base import backbones_for
from hutchtrace.backbones.exact import exact_hessian
from hutchtrace.backbones.forward import ForwardHVP
from hutchtrace.backbones.reverse import ReverseHVP
from hutchtrace.core.errors import HVPUnsupportedError
from hutchtrace.estimate.engine import auto as engine_auto
from hutchtrace.estimate.engine.rows import _RowPool


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    auto_mod._AUTO_CACHE.clear()
    # as if torch.func had been initialised in this process (whether it has depends on the
    # tests run before): auto then times forward mode on calls as short as these
    monkeypatch.setattr(engine_auto, "forward_mode_initialised", lambda: True)
    yield
    auto_mod._AUTO_CACHE.clear()


class LegacyTanh(torch.autograd.Function):
    """Old-style Function (ctx in forward, no setup_context/jvp): double backward works,
    torch.func's forward mode cannot run it."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.tanh()

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (1 - x.tanh() ** 2)


class LegacyNet(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = nn.Linear(5, 7).double()
        self.b = nn.Linear(7, 3).double()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))

    def forward(self, x):
        return self.b(LegacyTanh.apply(self.a(x)))


def mse(out, y):
    return ((out - y) ** 2).mean()


def xy(n=20, d_in=5, d_out=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d_in, generator=g, dtype=torch.float64),
            torch.randn(n, d_out, generator=g, dtype=torch.float64))


def assert_complete_and_equal(res, ref):
    """No lost row: nothing left at zero, K and the SE from all K samples, equal to reverse's."""
    assert res.meta["K"] == ref.meta["K"] == res.samples.shape[0]
    assert not (res.samples.abs().sum(1) == 0).any(), "unevaluated (all-zero) probe rows"
    torch.testing.assert_close(res.samples, ref.samples, rtol=1e-12, atol=1e-12)
    K = res.samples.shape[0]
    se = float(res.samples.sum(1).std() / math.sqrt(K))
    assert res.total.se == pytest.approx(se, rel=1e-9)
    assert res.total.se == pytest.approx(ref.total.se, rel=1e-9)


# ------------------------------------------------------------------ A: no lost rows
def test_legacy_autograd_function_loses_no_rows():
    net = LegacyNet()
    x, y = xy()
    ref = hutchtrace.block_traces(net, mse, K=16, data=(x, y), seed=1, hvp="reverse", variance="sample")
    res = hutchtrace.block_traces(net, mse, K=16, data=(x, y), seed=1, hvp="auto", variance="sample")
    assert_complete_and_equal(res, ref)
    assert res.meta["hvp"].startswith("reverse")
    failed = res.meta["hvp_timings"]["failed"]
    assert set(failed) == {"forward", "forward-vmap"} and "LegacyTanh" in failed["forward"]


def test_legacy_function_rules_out_forward_mode_without_running_it(monkeypatch):
    prepared = []
    monkeypatch.setattr(ForwardHVP, "prepare", lambda self, batch: prepared.append(self.name))
    net = LegacyNet()
    x, y = xy()
    res = hutchtrace.block_traces(net, mse, K=200, data=(x, y), seed=1, hvp="auto")
    assert prepared == [] and res.meta["hvp"].startswith("reverse")


def test_a_backbone_failing_mid_timing_hands_its_rows_to_the_next(monkeypatch):
    """reverse-batched fails on its second call (after delivering its warm-up rows): the rows
    of the failed chunk go to another backbone, none is lost, none is evaluated twice."""
    calls = {"n": 0}
    real = ReverseHVP.hvp

    def flaky(self, vs, support=None):
        if self.batched:
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("Batching rule not implemented for aten::planted_failure")
        return real(self, vs, support=support)

    monkeypatch.setattr(ReverseHVP, "hvp", flaky)
    model, crit, data = make_case("mlp")
    ref = hutchtrace.block_traces(model, crit, K=64, data=data, seed=2, hvp="reverse", variance="sample")
    res = hutchtrace.block_traces(model, crit, K=64, data=data, seed=2, hvp="auto", variance="sample")
    assert calls["n"] >= 2
    assert "reverse-batched" in res.meta["hvp_timings"]["failed"]
    assert "forward" not in res.meta["hvp_timings"]["failed"]  # a batching failure is member-specific
    assert_complete_and_equal(res, ref)


def test_dataset_mode_and_isolated_plan_lose_no_rows():
    net = LegacyNet()
    x, y = xy(n=24)
    data = [(x[:8], y[:8]), (x[8:16], y[8:16]), (x[16:], y[16:])]
    kw = dict(K=24, data=data, seed=4, probing="isolated", variance="sample")
    ref = hutchtrace.block_traces(net, mse, hvp="reverse", **kw)
    res = hutchtrace.block_traces(net, mse, hvp="auto", **kw)
    assert_complete_and_equal(res, ref)


def test_the_row_ledger_catches_a_lost_row(monkeypatch):
    """Planted defect: a failing backbone's rows are dropped instead of handed back. The
    engine's per-batch check must raise instead of returning zero samples."""
    monkeypatch.setattr(_RowPool, "put_back", lambda self, ks, gs: None)
    real = ReverseHVP.hvp

    def fail_batched(self, vs, support=None):
        if self.batched:
            raise RuntimeError("Batching rule not implemented for aten::planted_failure")
        return real(self, vs, support=support)

    monkeypatch.setattr(ReverseHVP, "hvp", fail_batched)
    model, crit, data = make_case("mlp")
    with pytest.raises(RuntimeError, match="never evaluated"):
        hutchtrace.block_traces(model, crit, K=16, data=data, seed=2, hvp="auto")


def test_every_backbone_failing_lists_all_and_advises_none():
    probs = F.log_softmax(torch.randn(6, 2, 5, dtype=torch.float64), -1)

    class CTCNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(5, dtype=torch.float64))

        def forward(self):
            return F.ctc_loss((probs + self.w).log_softmax(-1), torch.ones(2, 3, dtype=torch.long),
                              torch.full((2,), 6), torch.full((2,), 3))

    with pytest.raises(HVPUnsupportedError) as info:
        hutchtrace.block_traces(CTCNet(), lambda m: m(), K=2, hvp="auto")
    msg = str(info.value)
    assert "no HVP backbone works" in msg
    for name in ("reverse", "reverse-batched", "forward", "forward-vmap"):
        assert f"'{name}':" in msg, name
    assert not re.search(r"hvp='(reverse|forward)", msg), "advises a backbone that already failed"
    assert "_ctc_loss" in msg


# ------------------------------------------------------------------ D: one operator
class PadEmb(nn.Module):
    def __init__(self, V=12, D=4):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.e = nn.Embedding(V, D, padding_idx=0).double()
        self.h = nn.Linear(D, 3).double()
        with torch.no_grad():
            for q in self.parameters():
                q.copy_(torch.randn(q.shape, generator=g, dtype=torch.float64))

    def forward(self, idx):
        return self.h(torch.tanh(self.e(idx))).mean(1)


def pad_data():
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(1, 12, (4, 6), generator=g)
    idx[:, -2:] = 0  # pad tokens
    return idx, torch.randn(4, 3, generator=g, dtype=torch.float64)


def test_padding_idx_backbones_are_not_mixed():
    net = PadEmb()
    data = pad_data()
    crit = lambda o, t: ((o - t) ** 2).sum()  # noqa: E731
    H, layout = exact_hessian(net, crit, data=data, method="autograd")  # double backward: symmetric
    assert torch.allclose(H, H.T, atol=1e-12)
    fwd = hutchtrace.block_traces(net, crit, K=8, data=data, seed=0, hvp="forward")
    Z8 = probe_matrix(layout, 0, 8)
    assert not torch.allclose(fwd.samples, exact_samples(H, layout, Z8), rtol=1e-3)  # a different operator
    with pytest.warns(RuntimeWarning, match="padding_idx") as rec:
        res = hutchtrace.block_traces(net, crit, K=96, data=data, seed=0, hvp="auto")
    assert sum("hvp='auto'" in str(w.message) for w in rec) == 1
    dis = res.meta["hvp_disagreement"]
    assert dis["reference"].startswith("reverse") and dis["rejected"].startswith("forward")
    assert dis["relative_difference"] > 1e3 * dis["tolerance"]
    assert res.meta["hvp"].startswith("reverse")
    assert_close_rel(res.samples, exact_samples(H, layout, probe_matrix(layout, 0, 96)), 1e-10)
    # a later call remembers the disagreement without timing (or warning) again
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        again = hutchtrace.block_traces(net, crit, K=96, data=data, seed=0, hvp="auto")
    assert again.meta["hvp_disagreement"]["rejected"] == dis["rejected"]
    assert not any(k.startswith("forward") for k in again.meta["hvp_timings"] if k not in ("failed",))


@pytest.mark.parametrize("case", ["mlp", "cnn_bn", "lm_tied"])
def test_float32_rounding_is_not_a_disagreement(case):
    """Forward and reverse mode products differ by rounding only on ordinary models: no warning,
    and forward mode was really compared (it was timed)."""
    model, crit, data = make_case(case, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        res = hutchtrace.block_traces(model, crit, K=128, data=data, seed=0, hvp="auto")
    assert res.meta["hvp_disagreement"] is None
    compared = res.meta["hvp_timings"]["compared"]  # forward mode really was compared
    assert set(compared) == {"forward-vmap"} and compared["forward-vmap"] < 1e-2


# ------------------------------------------------------------------ C: robust and cheap
def test_a_short_call_does_not_time_forward_mode(monkeypatch):
    prepared = []
    real = ForwardHVP.prepare
    monkeypatch.setattr(ForwardHVP, "prepare", lambda self, b: (prepared.append(self.name), real(self, b))[1])
    model, crit, data = make_case("mlp")
    res = hutchtrace.block_traces(model, crit, K=16, data=data, seed=0, hvp="auto")
    assert prepared == [] and res.meta["hvp"].startswith("reverse")
    res = hutchtrace.block_traces(model, crit, K=256, data=data, seed=0, hvp="auto")
    assert prepared, "a long call should time forward mode"


def test_before_torch_func_is_initialised_only_a_long_call_times_forward_mode(monkeypatch):
    """The first forward-mode product of a process imports torch._dynamo (seconds): auto pays
    it only for a call whose reverse-mode estimate is CHALLENGE_MIN_SECONDS or more."""
    monkeypatch.setattr(engine_auto, "forward_mode_initialised", lambda: False)
    prepared = []
    real = ForwardHVP.prepare
    monkeypatch.setattr(ForwardHVP, "prepare", lambda self, b: (prepared.append(self.name), real(self, b))[1])
    model, crit, data = make_case("mlp")
    hutchtrace.block_traces(model, crit, K=256, data=data, seed=0, hvp="auto")
    assert prepared == []
    auto_mod._AUTO_CACHE.clear()
    monkeypatch.setattr(engine_auto, "CHALLENGE_MIN_SECONDS", 0.0)  # as if the call were long
    hutchtrace.block_traces(model, crit, K=256, data=data, seed=0, hvp="auto")
    assert prepared == ["forward-vmap"]


def _timing(per_row, prep=0.0, chunk=8):
    return Timing(prep, list(per_row), chunk)


def test_forward_needs_the_margin_in_both_measurements():
    auto = AutoHVP(("rules",), backbones_for("hessian"))
    auto.record("reverse", _timing([1.0, 1.05]))
    auto.record("forward-vmap", _timing([0.7, 0.85]))  # 0.85 * 1.25 > 1.0: not clearly faster
    assert auto.choose(100) == "reverse"
    auto.record("forward-vmap", _timing([0.7, 0.75]))  # 0.75 * 1.25 < 1.0 in both
    assert auto.choose(100) == "forward-vmap"
    auto.record("reverse-batched", _timing([0.5, 0.55]))  # the reference family's best is what counts
    assert auto.choose(100) == "reverse-batched"


def test_unstable_timings_are_not_cached():
    auto = AutoHVP(("rules2",), backbones_for("hessian"))
    auto.record("reverse", _timing([1.0, 1.0]))
    auto.record("forward-vmap", _timing([0.2, 0.6]))  # spread 3x > MARGIN
    assert auto.choose(100) == "forward-vmap"  # faster in both measurements: used by this call,
    assert not auto.store(challenged=True)  # but not cached
    assert auto_mod._AUTO_CACHE[("rules2",)]["timings"] == {}
    auto.record("forward-vmap", _timing([0.5, 0.5 * MARGIN * 0.99]))
    assert auto.store(challenged=True)
    assert AutoHVP(("rules2",), backbones_for("hessian")).cached_choice(100, want_challenge=True) \
        == "forward-vmap"


def test_a_cached_choice_is_revalidated_and_retimed_when_off(monkeypatch):
    # the timings of a loaded test machine are rarely within the margin: call them stable so
    # that the first call caches its choice (whether it does is tested above)
    monkeypatch.setattr(Timing, "stable", lambda self: len(self.per_row_s) >= 2)
    model, crit, data = make_case("mlp")
    kw = dict(K=256, data=data, seed=0, hvp="auto", variance="sample")
    first = hutchtrace.block_traces(model, crit, **kw)
    entry = next(iter(auto_mod._AUTO_CACHE.values()))
    assert entry["timings"] and entry["challenged"] and not first.meta["hvp_timings"]["from_cache"]
    checked = []
    real_valid = AutoHVP.still_valid
    monkeypatch.setattr(AutoHVP, "still_valid", lambda self, n, ts: checked.append((n, len(ts))) or True)
    second = hutchtrace.block_traces(model, crit, **kw)
    assert checked == [(first.meta["hvp"], 2)], "the cached choice must be re-measured on 2 chunks"
    assert second.meta["hvp_timings"]["from_cache"] and second.meta["hvp"] == first.meta["hvp"]
    assert "compared" not in second.meta["hvp_timings"]  # nothing re-timed
    torch.testing.assert_close(second.samples, first.samples, rtol=1e-5, atol=1e-8)
    # planted: the cache claims every backbone is 1000x faster than it is; the check on the
    # next call's first chunks sees it and re-times
    monkeypatch.setattr(AutoHVP, "still_valid", real_valid)
    for t in entry["timings"].values():
        t.per_row_s = [v / 1000 for v in t.per_row_s]
    third = hutchtrace.block_traces(model, crit, **kw)
    assert not third.meta["hvp_timings"]["from_cache"] and "compared" in third.meta["hvp_timings"]
    torch.testing.assert_close(third.samples, first.samples, rtol=1e-5, atol=1e-8)


def test_a_deterministic_failure_is_remembered(monkeypatch):
    w = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    m = nn.Module()
    m.w = w
    pts = torch.randn(5, 3, dtype=torch.float64)
    loss = lambda mm: torch.cdist(mm.w, pts).pow(2).sum()  # noqa: E731  (no forward-mode AD)
    res = hutchtrace.block_traces(m, loss, K=128, hvp="auto", seed=0)
    assert "forward-vmap" in res.meta["hvp_timings"]["failed"]
    prepared = []
    monkeypatch.setattr(ForwardHVP, "prepare", lambda self, b: prepared.append(self.name))
    again = hutchtrace.block_traces(m, loss, K=128, hvp="auto", seed=0)
    assert prepared == [] and "forward-vmap" in again.meta["hvp_timings"]["failed"]
    torch.testing.assert_close(again.samples, res.samples, rtol=1e-12, atol=1e-12)


def test_auto_keeps_no_side_effects_and_matches_exact_on_every_case():
    """The full path (timing, comparison, hand-over) still gives exact per-probe samples."""
    for case in ("mlp", "cnn_bn", "lm_tied"):
        model, crit, data = make_case(case)
        H, layout = exact_hessian(model, crit, data=data)
        res = hutchtrace.block_traces(model, crit, K=100, data=data, seed=7, hvp="auto")
        assert_close_rel(res.samples, exact_samples(H, layout, probe_matrix(layout, 7, 100)), 1e-9)


def test_zoo_dropout_model_one_operator_under_auto():
    model, crit, data = zoo.make_dropout_mlp(dtype=torch.float64)
    H, layout = exact_hessian(model, crit, data=data, method="autograd")
    res = hutchtrace.block_traces(model, crit, K=100, data=data, seed=3, hvp="auto")
    assert_close_rel(res.samples, exact_samples(H, layout, probe_matrix(layout, 3, 100)), 1e-10)


def test_non_finite_products_are_not_called_a_disagreement():
    from hutchtrace.core.errors import NonFiniteWarning

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.randn(3, dtype=torch.float64))
            self.c = nn.Parameter(torch.zeros(2, dtype=torch.float64))

        def forward(self):
            return (self.a.tanh() ** 2).sum() + torch.sqrt((self.c**2).sum())  # sqrt'' blows up at 0

    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        res = hutchtrace.block_traces(Net(), lambda m: m(), K=128, seed=0, hvp="auto")
    kinds = {type(w.message) for w in rec
             if "hvp='auto'" in str(w.message) or isinstance(w.message, NonFiniteWarning)}
    assert kinds == {NonFiniteWarning}
    assert res.meta["hvp_disagreement"] is None and not res["c"].finite and res["a"].finite


def test_the_cache_keeps_no_frame_of_a_call_alive():
    """A cached failure must not hold its traceback: its frames hold the model and the batch."""
    import gc
    import weakref

    w = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    m = nn.Module()
    m.w = w
    pts = torch.randn(5, 3, dtype=torch.float64)
    hutchtrace.block_traces(m, lambda mm: torch.cdist(mm.w, pts).pow(2).sum(), K=128, hvp="auto", seed=0)
    entry = next(iter(auto_mod._AUTO_CACHE.values()))
    assert entry["failed"] and all(e.__traceback__ is None for e in entry["failed"].values())
    ref = weakref.ref(m)
    del m, w
    gc.collect()
    assert ref() is None


def test_the_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(auto_mod, "_AUTO_CACHE_SIZE", 3)
    net = nn.Linear(3, 1).double()
    x = torch.ones(2, 3, dtype=torch.float64)
    losses = [lambda m: m(x).pow(2).sum() for _ in range(6)]  # kept alive: six distinct ids, six keys
    for loss in losses:
        hutchtrace.block_traces(net, loss, K=2, seed=0, hvp="auto")
    assert len(auto_mod._AUTO_CACHE) == 3


def test_exact_hessian_default_is_the_symmetric_reference_on_padding_idx():
    """``exact_hessian(method="auto")`` must not return forward-over-reverse's non-symmetric
    matrix (pad row zeroed, column kept): it falls back to double backward."""
    net = PadEmb()
    data = pad_data()
    crit = lambda o, t: ((o - t) ** 2).sum()  # noqa: E731
    H_func, _ = exact_hessian(net, crit, data=data, method="func")
    assert float((H_func - H_func.T).abs().max()) > 1e-3 * float(H_func.abs().max())  # the disagreement is real
    H_auto, _ = exact_hessian(net, crit, data=data)
    H_rev, _ = exact_hessian(net, crit, data=data, method="autograd")
    assert torch.equal(H_auto, H_rev)
    assert float((H_auto - H_auto.T).abs().max()) <= 1e-12 * float(H_auto.abs().max())
