"""GGN-vector products against a dense J^T Lambda J built independently (torch.func.jacrev)."""

import math

import pytest
import torch
import torch.nn.functional as F
from curvature_helpers import exact_ggn
from helpers import assert_same_snapshot, exact_samples, make_case, probe_matrix, snapshot
from torch import nn

import hutchtrace
from hutchtrace.backbones.base import backbones_for
from hutchtrace.backbones.exact import exact_hessian
from hutchtrace.backbones.ggn import GGNProduct, output_hessian
from hutchtrace.core.errors import LossError
from hutchtrace.core.state import ForwardRNG, PreservedState
from hutchtrace.problem.loss import make_loss_spec
from hutchtrace.zoo import MeanSquared

GGN = ["ggn", "ggn-vmap"]
SMALL = {"mlp": {"n": 12, "sizes": (6, 9, 9, 4)}, "lm_tied": {"n": 2}, "cnn_bn": {"n": 6}}


def test_backbones_are_registered_for_ggn_curvature():
    assert set(GGN) <= set(backbones_for("ggn"))
    assert not set(GGN) & set(backbones_for("hessian"))


# ---------------------------------------------------------------------------- exact products
@pytest.mark.parametrize("case", ["mlp", "cnn_bn", "lm_tied", "rnn", "shared_frozen"])
@pytest.mark.parametrize("hvp", GGN)
def test_per_probe_samples_equal_dense_ggn(case, hvp):
    """block_traces(curvature="ggn") samples are exactly z_b^T (G z)_b (BN train mode, tied
    embeddings with attention, an RNN with nn.MSELoss, frozen + shared weights)."""
    model, crit, data = make_case(case, **SMALL.get(case, {}))
    G, layout = exact_ggn(model, crit, data)
    res = hutchtrace.block_traces(model, crit, K=4, data=data, seed=11, curvature="ggn", hvp=hvp)
    expected = exact_samples(G, layout, probe_matrix(layout, 11, 4))
    scale = float(expected.abs().max())
    assert float((res.samples - expected).abs().max()) <= 1e-10 * scale
    assert res.meta["curvature"] == "ggn"


def _products(model, crit, data, vs, name, fast=True):
    spec = make_loss_spec(crit, data)
    layout = hutchtrace.resolve_blocks(model)
    with PreservedState(model):
        rng = ForwardRNG([torch.device("cpu")])
        rng.start_batch()
        bb = GGNProduct(model, layout.names, layout.tensors, rng, batched=name == "ggn-vmap", fast=fast)
        batch = next(iter(spec.batches()))
        bb.prepare(batch)
        if bb.batched:
            out = bb.hvp(vs)
        else:
            rows = [bb.hvp([v[r] for v in vs]) for r in range(vs[0].shape[0])]
            out = [torch.stack([row[j] for row in rows]) for j in range(len(vs))]
        kind = bb.output_hessian_kind
        bb.release()
    return torch.cat([o.reshape(o.shape[0], -1) for o in out], 1), kind, layout


@pytest.mark.parametrize("crit, kind", [
    (nn.CrossEntropyLoss(), "cross-entropy"),
    (nn.CrossEntropyLoss(reduction="sum", label_smoothing=0.1), "cross-entropy"),
    (F.cross_entropy, "cross-entropy"),
    (lambda o, t: F.cross_entropy(o, t), "generic"),
])
@pytest.mark.parametrize("hvp", GGN)
def test_cross_entropy_fast_path_and_generic_path_match_dense(crit, kind, hvp):
    model, _, data = make_case("mlp", n=12, sizes=(5, 7, 4))
    G, layout = exact_ggn(model, crit, data)
    V = torch.randn(3, G.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    vs = [V[:, a:b].reshape((3,) + tuple(t.shape)) for t, (a, b) in
          zip(layout.tensors, _bounds(layout))]
    out, used, _ = _products(model, crit, data, vs, hvp)
    assert used == kind
    assert torch.allclose(out, V @ G, rtol=0, atol=1e-12 * float((V @ G).abs().max()))


@pytest.mark.parametrize("crit, kind", [
    (nn.MSELoss(), "squared-error"),
    (MeanSquared(), "squared-error"),
    (nn.MSELoss(reduction="sum"), "squared-error"),
    (lambda o, t: F.mse_loss(o, t), "generic"),  # reverse-over-reverse: no ZeroTensor bug
    (lambda o, t: (torch.cosh(o - t)).mean(), "generic"),
])
@pytest.mark.parametrize("hvp", GGN)
def test_regression_criteria_match_dense(crit, kind, hvp):
    model, _, (x, _) = make_case("mlp", n=10, sizes=(5, 6, 3))
    y = torch.randn(10, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    G, layout = exact_ggn(model, crit, (x, y))
    V = torch.randn(2, G.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    vs = [V[:, a:b].reshape((2,) + tuple(t.shape)) for t, (a, b) in zip(layout.tensors, _bounds(layout))]
    out, used, _ = _products(model, crit, (x, y), vs, hvp)
    assert used == kind
    assert torch.allclose(out, V @ G, rtol=0, atol=1e-12 * float((V @ G).abs().max()))


def test_bce_with_logits_fast_path_equals_generic():
    logits = torch.randn(7, 3, dtype=torch.float64)
    y = torch.rand(7, 3, dtype=torch.float64)
    u = torch.randn(4, 7, 3, dtype=torch.float64)
    fast, kind = output_hessian(nn.BCEWithLogitsLoss(), logits, y, batched=True)
    gen, kind2 = output_hessian(nn.BCEWithLogitsLoss(), logits, y, batched=True, fast=False)
    assert (kind, kind2) == ("bce-logits", "generic")
    assert torch.allclose(fast(u), gen(u), rtol=0, atol=1e-15)


def test_cross_entropy_with_ignored_targets_uses_the_generic_path():
    logits = torch.randn(6, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, -100, 3, 2, -100])
    lam, kind = output_hessian(nn.CrossEntropyLoss(), logits, y)
    assert kind == "generic"
    u = torch.randn(6, 4, dtype=torch.float64)
    p = torch.softmax(logits, -1)
    keep = (y != -100).double()[:, None]
    expected = keep * (p * u - p * (p * u).sum(-1, keepdim=True)) / 4  # mean over the 4 kept targets
    assert torch.allclose(lam(u), expected, atol=1e-15)


def _bounds(layout):
    out, pos = [], 0
    for t in layout.tensors:
        out.append((pos, pos + t.numel()))
        pos += t.numel()
    return out


# ---------------------------------------------------------------------------- structure
def test_ggn_equals_hessian_for_a_model_linear_in_its_parameters():
    """f(x; W, b) = W x + b is linear in theta, so T = 0 and H = G (any criterion)."""
    net = nn.Linear(4, 3).double()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(9, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (9,), generator=g)
    crit = nn.CrossEntropyLoss()
    H, _ = exact_hessian(net, crit, data=(x, y))
    res_g = hutchtrace.block_traces(net, crit, K=6, data=(x, y), seed=5, curvature="ggn", hvp="ggn")
    res_h = hutchtrace.block_traces(net, crit, K=6, data=(x, y), seed=5, hvp="reverse")
    assert torch.allclose(res_g.samples, res_h.samples, rtol=0, atol=1e-12)
    G, _ = exact_ggn(net, crit, (x, y))
    assert torch.allclose(G, H, atol=1e-12)


def test_dataset_mode_is_the_size_weighted_mean_of_batch_ggns():
    model, crit, (x, y) = make_case("mlp", n=14, sizes=(5, 6, 3))
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    G, layout = exact_ggn(model, crit, batches)
    res = hutchtrace.block_traces(model, crit, K=3, data=batches, seed=2, curvature="ggn")
    expected = exact_samples(G, layout, probe_matrix(layout, 2, 3))
    assert torch.allclose(res.samples, expected, rtol=0, atol=1e-12 * float(expected.abs().max()))


@pytest.mark.parametrize("hvp", GGN)
def test_dropout_mask_is_shared_by_jvp_and_backward(hvp):
    """One batch, dropout in train mode: the product is J^T Lambda J for ONE mask (the one a
    single forward from the current RNG state draws), the same in every probe."""
    model, _, (x, y) = make_case("dropout")
    crit = nn.MSELoss()
    state = torch.get_rng_state()
    G, layout = exact_ggn(model, crit, (x, y))  # one forward from `state`
    torch.set_rng_state(state)
    res = hutchtrace.block_traces(model, crit, K=4, data=(x, y), seed=4, curvature="ggn", hvp=hvp)
    expected = exact_samples(G, layout, probe_matrix(layout, 4, 4))
    assert torch.allclose(res.samples, expected, rtol=0, atol=1e-12 * float(expected.abs().max()))


def test_ggn_diagonal_blocks_are_psd_for_a_convex_criterion():
    model, crit, data = make_case("mlp", n=16, sizes=(4, 6, 3))
    G, _ = exact_ggn(model, crit, data)
    assert float(torch.linalg.eigvalsh(G)[0]) > -1e-12 * float(G.abs().max())
    res = hutchtrace.block_traces(model, crit, K=30, data=data, seed=0, curvature="ggn", probing="isolated")
    assert (res.means > 0).all()


# ---------------------------------------------------------------------------- contract
def test_closure_loss_is_rejected_with_a_clear_message():
    model, crit, (x, y) = make_case("mlp")
    with pytest.raises(LossError, match="curvature='ggn' needs a criterion loss\\(outputs, targets\\) with data"):
        hutchtrace.block_traces(model, lambda m: crit(m(x), y), K=2, curvature="ggn")


def test_non_tensor_outputs_are_rejected():
    class Dict(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return {"logits": self.lin(x)}

    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    with pytest.raises(LossError, match="one floating-point tensor"):
        hutchtrace.block_traces(Dict(), lambda o, t: F.cross_entropy(o["logits"], t), K=2, data=(x, y),
                                curvature="ggn")


def test_unknown_ggn_backbone_name():
    model, crit, data = make_case("mlp")
    with pytest.raises(ValueError, match="ggn"):
        hutchtrace.block_traces(model, crit, K=2, data=data, curvature="ggn", hvp="reverse")


@pytest.mark.parametrize("hvp", GGN + ["auto"])
def test_no_side_effects(hvp):
    model, crit, data = make_case("cnn_bn")
    with torch.no_grad():
        model(data[0])
    crit(model(data[0]), data[1]).backward()
    torch.manual_seed(7)
    before = snapshot(model)
    hutchtrace.block_traces(model, crit, K=3, data=data, seed=0, curvature="ggn", hvp=hvp)
    assert_same_snapshot(before, snapshot(model))


def test_float32_model_agrees_with_float64_reference():
    model64, crit, data64 = make_case("mlp", n=12, sizes=(5, 7, 4))
    model32, _, data32 = make_case("mlp", n=12, sizes=(5, 7, 4), dtype=torch.float32)
    G, layout = exact_ggn(model64, crit, data64)
    res = hutchtrace.block_traces(model32, crit, K=3, data=data32, seed=1, curvature="ggn")
    expected = exact_samples(G, layout, probe_matrix(layout, 1, 3))
    err = float((res.samples - expected).abs().max()) / float(expected.abs().max())
    assert err < 1e-5  # float32 rounding only
    assert math.isfinite(err)
