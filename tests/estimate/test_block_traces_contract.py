"""No side effects, clear errors for bad input, and the result object's API."""

import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_same_snapshot, make_case, snapshot
from torch import nn

import hutchtrace
from hutchtrace.core.errors import (
    BlockSpecError,
    DataFormatError,
    DeviceMismatchError,
    HVPUnsupportedError,
    LossError,
    NonFiniteWarning,
)

BACKBONES = ["reverse", "reverse-batched", "forward", "forward-vmap", "auto"]


# ---------------------------------------------------------------------------- side effects
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hvp", BACKBONES)
def test_no_side_effects_batchnorm_train_mode(hvp, dtype):
    model, crit, data = make_case("cnn_bn", dtype=dtype)
    # a realistic state: populated running stats, stale grads, one submodule in eval mode
    with torch.no_grad():
        model(data[0])
    crit(model(data[0]), data[1]).backward()
    model.b2.eval()
    torch.manual_seed(1234)
    before = snapshot(model)
    hutchtrace.block_traces(model, crit, K=3, data=data, seed=0, hvp=hvp)
    assert_same_snapshot(before, snapshot(model))


def test_no_side_effects_dropout_and_dataset_mode():
    model, crit, (x, y) = make_case("dropout")
    torch.manual_seed(5)
    before = snapshot(model)
    hutchtrace.block_traces(model, crit, K=2, data=[(x[:5], y[:5]), (x[5:], y[5:])], hvp="auto")
    assert_same_snapshot(before, snapshot(model))


def test_eval_mode_model_stays_in_eval_and_uses_running_stats():
    model, crit, data = make_case("cnn_bn")
    with torch.no_grad():
        model(data[0])
    model.eval()
    before = snapshot(model)
    res = hutchtrace.block_traces(model, crit, K=2, data=data, seed=0, hvp="reverse")
    assert_same_snapshot(before, snapshot(model))
    assert all(b.finite for b in res.blocks)


# ---------------------------------------------------------------------------- bad input
def test_loss_not_scalar():
    model, _, (x, y) = make_case("mlp")
    with pytest.raises(LossError, match="scalar"):
        hutchtrace.block_traces(model, lambda m: m(x).sum(0), K=2)
    with pytest.raises(LossError, match="scalar"):
        hutchtrace.block_traces(model, nn.CrossEntropyLoss(reduction="none"), K=2, data=(x, y))


def test_loss_returns_python_float():
    model, crit, (x, y) = make_case("mlp")
    with pytest.raises(LossError, match="not a tensor"):
        hutchtrace.block_traces(model, lambda m: float(crit(m(x), y)), K=2)


@pytest.mark.parametrize("hvp", BACKBONES)
def test_loss_independent_of_every_parameter(hvp):
    model, _, (x, _) = make_case("mlp")
    with pytest.raises(LossError, match="does not depend"):
        hutchtrace.block_traces(model, lambda m: (x**2).sum(), K=2, hvp=hvp)


def test_no_trainable_parameters():
    model, crit, data = make_case("mlp")
    model.requires_grad_(False)
    with pytest.raises(BlockSpecError, match="no trainable parameters"):
        hutchtrace.block_traces(model, crit, K=2, data=data)


@pytest.mark.parametrize("K,exc", [(0, ValueError), (-3, ValueError), (2.5, TypeError), ("10", TypeError), (True, TypeError)])
def test_bad_K(K, exc):
    model, crit, data = make_case("mlp")
    with pytest.raises(exc, match="K"):
        hutchtrace.block_traces(model, crit, K=K, data=data)


def test_unknown_and_overlapping_blocks():
    model, crit, data = make_case("mlp")
    with pytest.raises(BlockSpecError, match="neither a trainable parameter"):
        hutchtrace.block_traces(model, crit, K=2, data=data, blocks={"x": ["nope.weight"]})
    with pytest.raises(BlockSpecError, match="overlap"):
        hutchtrace.block_traces(model, crit, K=2, data=data, blocks={"a": [model[0]], "b": ["0.weight"]})
    with pytest.raises(BlockSpecError, match="unknown block specification"):
        hutchtrace.block_traces(model, crit, K=2, data=data, blocks="layers")
    with pytest.raises(BlockSpecError, match="frozen"):
        m2, c2, d2 = make_case("shared_frozen")
        hutchtrace.block_traces(m2, c2, K=2, data=d2, blocks={"f": ["frozen.weight"]})
    with pytest.raises(BlockSpecError, match="not a trainable parameter"):
        hutchtrace.block_traces(model, crit, K=2, data=data, blocks={"t": [torch.zeros(3)]})


def test_data_of_the_wrong_form():
    model, crit, (x, y) = make_case("mlp")
    with pytest.raises(DataFormatError, match="not supported"):
        hutchtrace.block_traces(model, crit, K=2, data=x)
    with pytest.raises(DataFormatError, match="wrong form"):
        hutchtrace.block_traces(model, crit, K=2, data=[(x, y, y)])
    with pytest.raises(DataFormatError, match="criterion"):
        hutchtrace.block_traces(model, crit, K=2)  # a criterion without data
    with pytest.raises(DataFormatError, match="closure"):
        hutchtrace.block_traces(model, lambda m: crit(m(x), y), K=2, data=(x, y))
    with pytest.raises(DataFormatError, match="empty"):
        hutchtrace.block_traces(model, crit, K=2, data=[])


class _OnceDiff(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.tanh()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (1 - x.tanh() ** 2)


def test_op_without_double_backward_names_op_and_suggests_backbone():
    model, _, (x, y) = make_case("mlp")
    probs = F.log_softmax(torch.randn(6, 2, 5, dtype=torch.float64), -1)

    class CTCNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(5, dtype=torch.float64))

        def forward(self):
            return F.ctc_loss((probs + self.w).log_softmax(-1), torch.ones(2, 3, dtype=torch.long),
                              torch.full((2,), 6), torch.full((2,), 3))

    net = CTCNet()
    with pytest.raises(HVPUnsupportedError, match=r"_ctc_loss_backward.*hvp='forward'"):
        hutchtrace.block_traces(net, lambda m: m(), K=2, hvp="reverse")
    with pytest.raises(HVPUnsupportedError, match=r"_ctc_loss.*hvp='reverse'"):
        hutchtrace.block_traces(net, lambda m: m(), K=2, hvp="forward")
    with pytest.raises(HVPUnsupportedError, match="no HVP backbone works"):
        hutchtrace.block_traces(net, lambda m: m(), K=2, hvp="auto")
    with pytest.raises(HVPUnsupportedError, match="once_differentiable"):
        hutchtrace.block_traces(model, lambda m: crit_once(m, x, y), K=2, hvp="reverse")


def crit_once(m, x, y):
    h = _OnceDiff.apply(m[0](x))
    return F.cross_entropy(m[4](m[2](h)), y)


def test_auto_falls_back_when_one_backbone_lacks_an_op(monkeypatch):
    # cdist has double backward but no forward-mode AD: auto must pick a reverse backbone.
    # (as if torch.func were initialised: auto then times forward mode on a call this short)
    monkeypatch.setattr("hutchtrace.estimate.engine.auto.forward_mode_initialised", lambda: True)
    w = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    m = nn.Module()
    m.w = w
    pts = torch.randn(5, 3, dtype=torch.float64)
    # K=64: auto times forward mode only when the call has enough rows to repay the timing
    res = hutchtrace.block_traces(m, lambda mm: torch.cdist(mm.w, pts).pow(2).sum(), K=64, hvp="auto", seed=0)
    assert res.meta["hvp"].startswith("reverse")
    assert "forward" in res.meta["hvp_timings"]["failed"]
    assert "forward-vmap" in res.meta["hvp_timings"]["failed"]


def test_parameters_on_different_devices():
    m = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    m[1].to("meta")
    with pytest.raises(DeviceMismatchError, match="different devices"):
        hutchtrace.block_traces(m, lambda mm: mm(torch.ones(1, 2)).sum(), K=2)


def test_non_finite_blocks_are_flagged_not_averaged():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.randn(3, dtype=torch.float64))
            self.c = nn.Parameter(torch.zeros(2, dtype=torch.float64))

        def forward(self):
            return (self.a.tanh() ** 2).sum() + torch.sqrt((self.c**2).sum())  # sqrt'' blows up at 0

    net = Net()
    with pytest.warns(NonFiniteWarning, match=r"\['c'\]"):
        res = hutchtrace.block_traces(net, lambda m: m(), K=4, seed=0, hvp="reverse")
    assert not res["c"].finite and math.isnan(res["c"].mean)
    assert res["a"].finite and math.isfinite(res["a"].mean)
    assert res.nonfinite_blocks == ["c"]
    assert not res.total.finite and math.isnan(res.total.mean)
    assert "NON-FINITE" in res.table()


def test_bad_probe_seed_backbone_arguments():
    model, crit, data = make_case("mlp")
    with pytest.raises(ValueError, match="probe must be"):
        hutchtrace.block_traces(model, crit, K=2, data=data, probe="uniform")
    with pytest.raises(ValueError, match="seed"):
        hutchtrace.block_traces(model, crit, K=2, data=data, seed=-1)
    with pytest.raises(ValueError, match="hvp must be"):
        hutchtrace.block_traces(model, crit, K=2, data=data, hvp="jacrev")
    with pytest.raises(TypeError, match="nn.Module"):
        hutchtrace.block_traces(lambda x: x, crit, K=2, data=data)


# ---------------------------------------------------------------------------- result API
def test_result_api():
    pd = pytest.importorskip("pandas")
    model, crit, data = make_case("mlp")
    res = hutchtrace.block_traces(model, crit, K=5, data=data, seed=0)
    text = repr(res)
    assert "BlockTraces(L=6, K=5" in text and "0.weight" in text and "total" in text
    assert res.samples.shape == (5, 6) and res.samples.dtype == torch.float64
    d = res.to_dict()
    json.dumps(d)
    assert d["meta"]["seed"] == 0 and d["meta"]["backend"] in ("fallback", "compiled-cpu")
    assert set(d["meta"]) >= {"K", "seed", "probe", "hvp", "backend", "wall_time_s", "probing"}
    df = res.to_dataframe()
    assert isinstance(df, pd.DataFrame) and list(df.index)[-1] == "total"
    assert df.loc["0.weight", "trace"] == pytest.approx(res["0.weight"].mean)
    b = res[0]
    assert b.ci[0] < b.mean < b.ci[1] and b.numel == 512
    with pytest.raises(KeyError, match="no block named"):
        res["nope"]


def test_single_probe_has_no_standard_error():
    model, crit, data = make_case("mlp")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = hutchtrace.block_traces(model, crit, K=1, data=data, seed=0)
    assert math.isnan(res[0].se) and math.isfinite(res[0].mean)
