"""hutchtrace on models nobody here wrote: HF transformers, PEFT, torchvision, timm (issue 13, item 6).

Each model is randomly initialised from a tiny config (``tests/foreign_models.py``; no
download) and checked three ways, against references that share no probe or HVP code
with hutchtrace:

(a) every per-probe sample ``z_b . (H z)_b`` equals a plain double backward on the same
    probes, re-derived from the Philox definition, to float64 rounding;
(b) the call has no side effect: parameters, buffers, ``.grad`` (set and unset), train/eval
    flags, ``requires_grad`` and the global RNG are exactly as before;
(c) ``probing="auto", rtol=0.1`` gives intervals consistent with a long, independent,
    block-isolated Hutchinson estimate.

Skipped without the optional packages (``pip install -e ".[foreign]"``).
"""

from __future__ import annotations

import contextlib
import math
import warnings

import foreign_models as fm
import pytest
import torch
from helpers import assert_same_snapshot, snapshot
from scipy import stats

import hutchtrace
from hutchtrace.kernels import reference

#: the backbone of the exactness tests: the default a new user gets (every row is evaluated
#: exactly once, by one operator, whatever ``auto`` tries while timing)
HVP_EXACT = "auto"
SEED = 11
K_EXACT = 2

#: On the million-parameter CNNs (L = 62-142, 1.5-11 M parameters) the pilot is 128 rows like
#: everywhere else, but the test does not fit CI: on resnet18 (eval, 2 cores) the auto run took
#: 214 s and the 64-probe isolated reference 589 s. bench/foreign_models.py runs auto on them.
needs_scalable_auto = pytest.mark.skip(reason="minutes per model on a 2-core CPU (auto 214 s + reference 589 s "
                                              "on resnet18); measured by bench/foreign_models.py instead")


def _require(name: str) -> None:
    pytest.importorskip(fm.REQUIRES[name])
    if fm.REQUIRES[name] == "peft":
        pytest.importorskip("transformers")


def _swap(case):
    return hutchtrace.twice_differentiable() if case.needs_swap else contextlib.nullcontext()


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*loss_type=None.*")
        yield


def _dirty_grads(model) -> None:
    """``.grad`` set on some parameters and left ``None`` on others: both must survive the call."""
    g = torch.Generator().manual_seed(0)
    for i, p in enumerate(model.parameters()):
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype) if i % 2 == 0 else None


# ------------------------------------------------------------------------------- probes
def test_independent_philox_matches_the_reference_probes():
    """The tests' own Philox re-derivation agrees with the documented probe contract."""
    for seed, probe, offset, n in [(0, 0, 0, 37), (SEED, 2, 5, 70), (2**40 + 3, 7, 2**32 - 3, 11),
                                   (2**63 - 1, 2**33 + 1, 123_456_789, 9)]:
        mine = fm.philox_rademacher(seed, probe, offset, n)
        theirs = reference.probes(seed, probe, offset, n, kind="rademacher", dtype=torch.float64)[0]
        assert torch.equal(mine, theirs)


# ---------------------------------------------------------------------- (a) and (b)
@pytest.mark.parametrize("name", fm.MODELS)
def test_per_probe_samples_exact_and_no_side_effects(name):
    _require(name)
    case = fm.build(name)
    model = case.model
    _dirty_grads(model)
    before = snapshot(model)
    rng = torch.get_rng_state()
    with _swap(case):
        # variance="sample": the samples are the same; the pairwise round would allocate 16 float64
        # rows of P (1.4 GB and 4 s on resnet18) for these K = 2 probes
        res = hutchtrace.block_traces(model, case.loss, K=K_EXACT, seed=SEED, hvp=HVP_EXACT, probing="global",
                                      variance="sample", progress=False, **case.kwargs())
    assert_same_snapshot(before, snapshot(model))  # (b)

    ref_model = fm.swapped_copy(model) if case.needs_swap else None
    for p in model.parameters():
        p.grad = None  # the reference's backward must not see the test's gradients
    names, want, scale = fm.reference_samples(case, SEED, K_EXACT, rng_state=rng, model=ref_model)
    assert res.names == names  # one block per unique trainable tensor, in named_parameters() order
    assert res.meta["K"] == K_EXACT and res.samples.shape == (K_EXACT, len(names))
    assert all(b.finite for b in res.blocks)
    # float64 rounding: a sample is a sum over the block, and the products come from two
    # evaluations of the same graph. Its scale is sum|(Hz)_i| over the block, floored at 1e-3 of
    # the probe's total: a block whose (Hz)_b cancels (a BatchNorm bias feeding another
    # normalisation) carries rounding from the whole product. Measured <= 1 eps on every model
    # here (float32: <= 1.6 eps); 1024 eps leaves a wide margin while any wrong probe entry or
    # missing term gives errors of order 1
    tol = 1024 * torch.finfo(torch.float64).eps * (scale + 1e-3 * scale.sum(1, keepdim=True))
    err = (res.samples - want).abs()
    assert bool((err <= tol).all()), f"worst error / tolerance {float((err / tol).max()):.3g}"
    assert bool((scale > 0).any(0).all())  # no block is compared on zeros only

    for block, aliases in case.aliases.items():  # tied weights: one block, every other name an alias
        assert res[block].aliases == aliases
        assert all(res[a] is res[block] for a in aliases)
    if name == "lora":
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert res.names == trainable and all("lora_" in n for n in res.names)
        assert len(res.names) == 8 and sum(b.numel for b in res.blocks) < sum(p.numel() for p in model.parameters())


def test_mobilenet_without_the_swap_is_a_clear_error():
    _require("mobilenet_v3_small")
    case = fm.build("mobilenet_v3_small")
    before = snapshot(case.model)
    with pytest.raises(hutchtrace.HVPUnsupportedError, match=r"twice_differentiable\(\)"):
        hutchtrace.block_traces(case.model, case.loss, K=1, seed=0, hvp=HVP_EXACT, progress=False, **case.kwargs())
    assert_same_snapshot(before, snapshot(case.model))


# ---------------------------------------------------------------------------- (c)
#: the long reference: probes per block (its SE enters the comparison)
K_REF = 64
#: family-wise false-alarm probability of one model's comparison (Bonferroni over blocks)
ALPHA = 1e-3
#: a cap on auto's probes: on these random-init models some blocks have traces of 1-3 % of the
#: largest with per-probe spreads 5-15x their size, so rtol=0.1 on every block would take
#: 10^3-10^4 probes (T5: ~25000 for one block). The intervals must be right at any K; the
#: comparison below does not need convergence (bench/foreign_models.py reports it)
MAX_K_AUTO = 64
SLOW_AUTO = {"resnet18_train", "resnet18_eval", "mobilenet_v3_small"}


def _auto_params():
    out = []
    for name in fm.MODELS:
        marks = [needs_scalable_auto] if name in SLOW_AUTO else []
        out.append(pytest.param(name, False, marks=marks, id=name))
    out.append(pytest.param("gpt2", True, id="gpt2-train-dropout"))
    return out


@pytest.mark.filterwarnings("ignore:adaptive stopping did not reach")
@pytest.mark.parametrize("name, train", _auto_params())
def test_auto_intervals_consistent_with_a_long_independent_estimate(name, train):
    """``|est_b - ref_b| <= t_{1 - ALPHA / 2L} sqrt(se_b^2 + se_ref,b^2)`` on every block.

    Both estimates are unbiased for ``tr H_bb`` and independent (different probes), so the
    standardised difference is approximately standard normal when both SEs are right; the
    quantile is Student's t with the reference's ``K_REF - 1`` degrees of freedom (its SE is a
    sample estimate), Bonferroni-corrected over the ``L`` blocks. Models run in eval mode
    (no dropout) unless ``train``; blocks whose Hessian vanishes analytically (the key bias of
    softmax attention) carry only rounding, so the scale has a floor of 1e-8 of the largest trace.
    """
    _require(name)
    case = fm.build(name, train=train)
    rng = torch.get_rng_state()
    with _swap(case):
        res = hutchtrace.block_traces(case.model, case.loss, K=8, seed=SEED, probing="auto", rtol=0.1,
                                      max_K=MAX_K_AUTO, hvp=HVP_EXACT, progress=False, **case.kwargs())
    assert res.meta["pilot_rows"] > 0 and res.meta["K"] > 8  # a pilot, then adaptive rounds
    ref_model = fm.swapped_copy(case.model) if case.needs_swap else None
    names, ref_mean, ref_se = fm.reference_isolated(case, K_REF, seed=2024, model=ref_model,
                                                    rng_state=rng if train else None)
    assert res.names == names
    mean = torch.tensor([b.mean for b in res.blocks], dtype=torch.float64)
    se = torch.tensor([b.se for b in res.blocks], dtype=torch.float64)
    floor = 1e-8 * float(ref_mean.abs().max())
    z = (mean - ref_mean).abs() / (se**2 + ref_se**2 + floor**2).sqrt()
    L = len(names)
    bound = float(stats.t.ppf(1 - ALPHA / (2 * L), K_REF - 1))
    worst = int(z.argmax())
    assert float(z.max()) <= bound, (
        f"{names[worst]}: auto {float(mean[worst]):.5g} +- {float(se[worst]):.3g}, "
        f"reference {float(ref_mean[worst]):.5g} +- {float(ref_se[worst]):.3g}, "
        f"|z| = {float(z.max()):.2f} > {bound:.2f}")


# ----------------------------------------------------------- HF specifics
def _checkpointed_gpt2(dropout: float):
    pytest.importorskip("transformers")
    case = fm.build("gpt2")
    tf = fm._quiet_transformers()
    with fm._seeded(99):
        model = tf.GPT2LMHeadModel(fm._gpt2_config(resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout))
    model.to(torch.float64).train()
    case.model = model
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return case


def _checkpointing_matches_plain(dropout: float, hvp: str):
    case = _checkpointed_gpt2(dropout)
    rng = torch.get_rng_state()
    res = hutchtrace.block_traces(case.model, case.loss, K=8, seed=SEED, hvp=hvp, progress=False)
    case.model.gradient_checkpointing_disable()  # the reference differentiates the plain model
    names, want, scale = fm.reference_samples(case, SEED, 8, rng_state=rng)
    assert res.meta["K"] == 8 and res.names == names
    assert bool((res.samples.abs().sum(1) > 0).all()), "rows never evaluated"
    tol = 1024 * torch.finfo(torch.float64).eps * (scale + 1e-3 * scale.sum(1, keepdim=True))
    assert bool(((res.samples - want).abs() <= tol).all())


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gradient_checkpointing_exact_with_reverse(dropout):
    """Non-reentrant checkpointing (HF's default) recomputes the forward inside the double
    backward, replaying the RNG: same samples as the plain model, dropout included."""
    _checkpointing_matches_plain(dropout, "reverse")


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gradient_checkpointing_exact_with_the_default_backbone(dropout):
    _checkpointing_matches_plain(dropout, "auto")


def test_dict_inputs_and_model_output_criterion_equal_a_closure():
    """``data=(dict, targets)`` with a criterion on a ``ModelOutput`` is the closure it stands for."""
    _require("bert")
    case = fm.build("bert")
    inputs, y = case.data
    # One named backbone for both: under "auto" each call may time its way to a different
    # (equally exact) backbone, and bit-equality only holds for the same arithmetic.
    res_data = hutchtrace.block_traces(case.model, case.loss, K=4, seed=SEED, data=case.data, hvp="reverse",
                                       progress=False)
    res_closure = hutchtrace.block_traces(case.model, lambda m: case.loss(m(**inputs), y), K=4, seed=SEED,
                                          hvp="reverse", progress=False)
    assert res_data.names == res_closure.names
    assert torch.equal(res_data.samples, res_closure.samples)
    assert res_data.meta["loss_form"] != res_closure.meta["loss_form"]


# ------------------------------------------------------------------ float16 / bfloat16
def test_float16_nan_blocks_are_flagged_never_averaged():
    """GPT-2 in float16 overflows in the HVP on most blocks (a plain double backward does too):
    those blocks are NaN with ``finite=False``, the others are the mean of finite samples, and
    the warning points to bfloat16 / float32."""
    _require("gpt2")
    case = fm.build("gpt2", dtype=torch.float16, train=False)
    with pytest.warns(hutchtrace.NonFiniteWarning, match="bfloat16 or float32"):
        res = hutchtrace.block_traces(case.model, case.loss, K=4, seed=SEED, hvp=HVP_EXACT, progress=False)
    bad = [b for b in res.blocks if not b.finite]
    assert len(bad) >= len(res.blocks) // 2  # measured: 26 of 28
    for j, b in enumerate(res.blocks):
        col = res.samples[:, j]
        if b.finite:
            assert bool(torch.isfinite(col).all()) and math.isclose(b.mean, float(col.mean()), rel_tol=1e-12)
        else:
            assert not bool(torch.isfinite(col).all())
            assert math.isnan(b.mean) and math.isnan(b.se) and all(math.isnan(c) for c in b.ci)
    assert not res.total.finite and math.isnan(res.total.mean)
    # not hutchtrace's doing: a plain float16 double backward overflows on the same blocks
    _, plain, _ = fm.reference_samples(case, SEED, 4)
    assert torch.isfinite(plain).all(0).tolist() == [b.finite for b in res.blocks]


def test_bfloat16_is_finite_and_close_to_float32():
    _require("gpt2")
    res = {}
    for dt in (torch.float32, torch.bfloat16):
        case = fm.build("gpt2", dtype=dt, train=False)
        with warnings.catch_warnings():
            warnings.simplefilter("error", hutchtrace.NonFiniteWarning)
            res[dt] = hutchtrace.block_traces(case.model, case.loss, K=4, seed=SEED, hvp=HVP_EXACT, progress=False)
    a, b = res[torch.float32].samples, res[torch.bfloat16].samples
    assert bool(torch.isfinite(b).all())
    # bfloat16 keeps 8 significant bits (eps 2^-7 = 0.8 %); the per-probe samples agree to a few
    # eps (measured 0.59 %, bench/results/foreign_models.md)
    assert float((a - b).norm() / a.norm()) <= 4 * 2.0**-7
