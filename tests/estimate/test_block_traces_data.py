"""Loss forms: closures, criterion + one batch, criterion + iterable of batches."""

import pytest
import torch
from helpers import assert_close_rel, exact_samples, make_case, probe_matrix
from torch.utils.data import DataLoader, TensorDataset

import hutchtrace
from hutchtrace.backbones.exact import exact_hessian


def _batches(x, y, sizes):
    out, s = [], 0
    for n in sizes:
        out.append((x[s : s + n], y[s : s + n]))
        s += n
    return out


def test_dataset_mode_unequal_batches_equals_dataset_mean_hessian():
    model, crit, (x, y) = make_case("mlp", n=20)
    batches = _batches(x, y, [3, 9, 8])
    H, layout = exact_hessian(model, crit, data=batches)
    # the dataset-mean Hessian is the Hessian on the concatenated data (mean reduction)
    H_full, _ = exact_hessian(model, crit, data=(x, y))
    assert torch.allclose(H, H_full, atol=1e-12)
    res = hutchtrace.block_traces(model, crit, K=5, data=batches, seed=21, hvp="reverse")
    assert res.meta["n_batches"] == 3 and res.meta["n_samples"] == 20
    assert_close_rel(res.samples, exact_samples(H_full, layout, probe_matrix(layout, 21, 5)), 1e-10)


def test_dataloader_and_sum_reduction():
    model, crit, (x, y) = make_case("mlp", n=20)
    loader = DataLoader(TensorDataset(x, y), batch_size=7)  # 7, 7, 6
    H_full, layout = exact_hessian(model, crit, data=(x, y))
    res = hutchtrace.block_traces(model, crit, K=4, data=loader, seed=8, hvp="reverse-batched")
    assert_close_rel(res.samples, exact_samples(H_full, layout, probe_matrix(layout, 8, 4)), 1e-10)
    # a sum-reduced criterion gives the same per-sample mean
    res_sum = hutchtrace.block_traces(model, torch.nn.CrossEntropyLoss(reduction="sum"), K=4, data=loader,
                                      seed=8, hvp="reverse-batched")
    assert torch.allclose(res_sum.samples, res.samples, rtol=1e-10)


def test_generator_of_batches_is_consumed_once():
    model, crit, (x, y) = make_case("mlp", n=12)
    gen = ((x[i : i + 4], y[i : i + 4]) for i in range(0, 12, 4))
    res = hutchtrace.block_traces(model, crit, K=3, data=gen, seed=1, hvp="reverse")
    H, layout = exact_hessian(model, crit, data=(x, y))
    assert_close_rel(res.samples, exact_samples(H, layout, probe_matrix(layout, 1, 3)), 1e-10)


def test_closure_with_dict_inputs_and_hf_style_outputs():
    model, crit, (x, y) = make_case("mlp")

    class Out:  # HuggingFace-style output object
        def __init__(self, logits):
            self.logits = logits

    class Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids=None, attention_mask=None):
            return Out(self.inner(input_ids) * attention_mask)

    wrapped = Wrapped(model)
    batch = {"input_ids": x, "attention_mask": torch.ones(x.shape[0], 1, dtype=x.dtype)}

    def closure(m):
        return crit(m(**batch).logits, y)

    res = hutchtrace.block_traces(wrapped, closure, K=3, seed=4, hvp="auto")
    H, layout = exact_hessian(model, crit, data=(x, y))
    assert res.names == ["inner." + n for n in layout.names]
    assert_close_rel(res.samples, exact_samples(H, layout, probe_matrix(layout, 4, 3)), 1e-10)
    # criterion with a dict of inputs in data
    res2 = hutchtrace.block_traces(wrapped, lambda out, t: crit(out.logits, t), K=3, data=(batch, y), seed=4)
    assert torch.allclose(res.samples, res2.samples, rtol=1e-10)


def test_multi_input_model_tuple_inputs():
    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(3, 2).double()
            self.b = torch.nn.Linear(4, 2).double()

        def forward(self, u, v):
            return torch.tanh(self.a(u) + self.b(v))

    m = Two()
    u, v, y = torch.randn(5, 3).double(), torch.randn(5, 4).double(), torch.randn(5, 2).double()
    res = hutchtrace.block_traces(m, torch.nn.functional.mse_loss, K=2, data=((u, v), y), seed=0)
    H, layout = exact_hessian(m, torch.nn.functional.mse_loss, data=((u, v), y))
    assert_close_rel(res.samples, exact_samples(H, layout, probe_matrix(layout, 0, 2)), 1e-10)


def test_seed_none_is_recorded_and_reproducible():
    model, crit, data = make_case("mlp")
    rng = torch.get_rng_state()
    a = hutchtrace.block_traces(model, crit, K=3, data=data, hvp="reverse")
    b = hutchtrace.block_traces(model, crit, K=3, data=data, hvp="reverse")
    assert torch.equal(rng, torch.get_rng_state())
    assert a.meta["seed"] != b.meta["seed"]
    again = hutchtrace.block_traces(model, crit, K=3, data=data, hvp="reverse", seed=a.meta["seed"])
    assert torch.equal(again.samples, a.samples)


def test_same_probes_whatever_the_batching_and_backbone():
    model, crit, data = make_case("cnn_bn")
    outs = [
        hutchtrace.block_traces(model, crit, K=7, data=data, seed=5, hvp=h, probe_batch=pb).samples
        for h, pb in [("reverse", None), ("reverse-batched", 3), ("forward-vmap", 2), ("forward-vmap", 7)]
    ]
    for o in outs[1:]:
        assert torch.allclose(o, outs[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("progress", [True, False])
def test_progress_display(progress, capsys):
    model, crit, data = make_case("mlp")
    hutchtrace.block_traces(model, crit, K=3, data=data, seed=0, hvp="reverse", progress=progress)
    err = capsys.readouterr().err
    assert ("block_traces" in err) == progress
