"""Shared test utilities: exact per-probe samples from dense Hessians, model snapshots."""

from __future__ import annotations

import torch

from hutchtrace.backbones.exact import block_slices
from hutchtrace.kernels.reference import probes

CASES = ["mlp", "cnn_bn", "lm_tied", "rnn", "shared_frozen"]


def make_case(name: str, dtype=torch.float64, **kw):
    from hutchtrace import zoo

    factory = {
        "mlp": zoo.make_mlp,
        "cnn_bn": zoo.make_cnn,
        "lm_tied": zoo.make_lm,
        "rnn": zoo.make_rnn,
        "shared_frozen": zoo.make_shared_frozen,
        "dropout": zoo.make_dropout_mlp,
    }[name]
    return factory(dtype=dtype, **kw)


def probe_matrix(layout, seed: int, K: int, kind="rademacher", first=0, dtype=torch.float64) -> torch.Tensor:
    """``(K, P)`` probes over the selected tensors, exactly as the estimator draws them."""
    return torch.cat(
        [probes(seed, first, off, t.numel(), num_probes=K, kind=kind, dtype=dtype)
         for off, t in zip(layout.offsets, layout.tensors)],
        1,
    )


def exact_samples(H: torch.Tensor, layout, Z: torch.Tensor, groups=None) -> torch.Tensor:
    """``t_b^(k) = z_b^T (H z^(k,g(b)))_b`` for probe rows ``Z`` ``(K, P)`` and a group partition."""
    sl = block_slices(layout)
    L = len(sl)
    if groups is None:
        groups = [list(range(L))]
    out = torch.zeros(Z.shape[0], L, dtype=H.dtype)
    for g in groups:
        mask = torch.zeros(Z.shape[1], dtype=H.dtype)
        for b in g:
            mask[sl[b]] = 1
        HZ = (Z * mask) @ H
        for b in g:
            out[:, b] = (Z[:, sl[b]] * HZ[:, sl[b]]).sum(1)
    return out


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """Columnwise: ``max|a - e| <= rtol * max|e|``.

    Blocks whose curvature vanishes structurally (a conv bias before BatchNorm) hold pure
    rounding noise, so the scale has a floor of ``1e-4`` of the largest block's scale.
    """
    col = expected.abs().amax(0)
    scale = torch.maximum(col, 1e-4 * col.max()).clamp_min(1e-300)
    err = (actual - expected).abs().amax(0)
    bad = (err > rtol * scale) & (err > 1e-300)
    assert not bad.any(), f"relative errors {(err / scale).tolist()} exceed {rtol}"


def snapshot(model: torch.nn.Module) -> dict:
    """Everything the no-side-effects guarantee covers."""
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "param_ids": [id(p) for p in model.parameters()],
        "buffers": [b.detach().clone() for b in model.buffers()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "grad_ids": [id(p.grad) for p in model.parameters()],
        "training": [m.training for m in model.modules()],
        "bn_track": [getattr(m, "track_running_stats", None) for m in model.modules()],
        "rng": torch.get_rng_state().clone(),
        "requires_grad": [p.requires_grad for p in model.parameters()],
    }


def assert_same_snapshot(a: dict, b: dict) -> None:
    for x, y in zip(a["params"], b["params"]):
        assert torch.equal(x, y)
    assert a["param_ids"] == b["param_ids"]
    for x, y in zip(a["buffers"], b["buffers"]):
        assert torch.equal(x, y)
    for x, y in zip(a["grads"], b["grads"]):
        assert (x is None and y is None) or torch.equal(x, y)
    assert a["grad_ids"] == b["grad_ids"]
    assert a["training"] == b["training"]
    assert a["bn_track"] == b["bn_track"]
    assert a["requires_grad"] == b["requires_grad"]
    assert torch.equal(a["rng"], b["rng"])
