"""Models nobody here wrote, randomly initialised from tiny configs, and independent references.

Used by ``tests/estimate/test_foreign_models.py`` and ``bench/foreign_models.py``. Every model is built
from a config (no hub download: ``HF_HUB_OFFLINE=1``) under a fixed seed, without touching the
caller's RNG. The references do not use hutchtrace's probe or HVP code:

* :func:`philox_rademacher`: the Rademacher probes re-implemented from the Philox-4x32-10
  definition (numpy, 64-bit products), keyed as documented: entry ``i`` (global offset in
  ``model.named_parameters()`` order, tied tensors once) of probe ``k`` with seed ``s`` is the
  sign bit of word ``i mod 4`` of ``Philox(counter=(i div 4, k), key=s)``;
* :func:`reference_samples`: ``z_b . (H z)_b`` per parameter tensor by plain double backward
  (``torch.autograd.grad`` twice) on the model's own objective;
* :func:`reference_isolated`: a long Hutchinson estimate of every ``tr H_bb`` with probes
  supported on one block at a time, from ``torch.Generator`` signs (a different random
  stream), for the statistical comparison with ``probing="auto"``.
"""

from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

F = nn.functional

#: families of the suite; each needs the package in brackets
MODELS = (
    "gpt2",  # transformers: tied input / output embeddings, dropout in train mode
    "bert",  # transformers: dict inputs, pad tokens (Embedding padding_idx), criterion on ModelOutput.logits
    "bart",  # transformers: encoder-decoder, one tensor under four names
    "t5",  # transformers: relative attention bias, tied embeddings
    "vit",  # transformers: image model, criterion form
    "lora",  # peft: LoRA adapters on GPT-2, the base model frozen
    "resnet18_train",  # torchvision: BatchNorm with batch statistics
    "resnet18_eval",  # torchvision: BatchNorm with running statistics
    "mobilenet_v3_small",  # torchvision: Hardsigmoid gates (needs hutchtrace.twice_differentiable)
    "convnext_atto",  # timm: LayerNorm2d, depthwise conv, layer scale, GELU
    "timm_vit",  # timm: vit_tiny layout
)

REQUIRES = {
    "gpt2": "transformers", "bert": "transformers", "bart": "transformers", "t5": "transformers",
    "vit": "transformers", "lora": "peft", "resnet18_train": "torchvision", "resnet18_eval": "torchvision",
    "mobilenet_v3_small": "torchvision", "convnext_atto": "timm", "timm_vit": "timm",
}


@dataclass
class Case:
    """A model with its loss in the form a user would pass.

    ``loss``/``data`` go to ``hutchtrace.block_traces`` unchanged; :meth:`objective` evaluates
    the same scalar for the references (the user's loss is not hutchtrace code; HF's
    ``ModelOutput.loss`` casts the logits to float32 even in a float64 model, so the reference
    must use that loss, not its own). ``needs_swap``: the model uses an op without a second
    derivative and is measured inside ``hutchtrace.twice_differentiable()``.
    """

    name: str
    model: nn.Module
    loss: Callable
    data: Any
    needs_swap: bool = False
    aliases: dict = field(default_factory=dict)  # block name -> expected aliases
    notes: str = ""

    def kwargs(self) -> dict:
        return {} if self.data is None else {"data": self.data}

    def objective(self, model: nn.Module) -> torch.Tensor:
        """The scalar ``block_traces`` differentiates: ``loss(model)``, or ``loss(model(inputs), targets)``."""
        if self.data is None:
            return self.loss(model)
        inputs, targets = self.data
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
        return self.loss(out, targets)


# --------------------------------------------------------------------------------- models
@contextlib.contextmanager
def _seeded(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


def _ids(n: int, T: int, vocab: int, seed: int, low: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, vocab, (n, T), generator=g)


def _gpt2_config(**kw):
    tf = _quiet_transformers()
    base = dict(n_layer=2, n_embd=16, n_head=2, n_inner=32, vocab_size=32, n_positions=8,
                bos_token_id=0, eos_token_id=0)
    return tf.GPT2Config(**{**base, **kw})


def build(name: str, dtype: torch.dtype = torch.float64, train: bool | None = None) -> Case:
    """The case ``name`` (see :data:`MODELS`) in ``dtype``; ``train`` overrides the default mode."""
    with _seeded(1234):
        case = _BUILDERS[name]()
    case.model.to(dtype)
    if train is not None:
        case.model.train(train)
    if dtype != torch.float64:
        case.data = _cast(case.data, dtype)
    return case


def _cast(obj, dtype):
    if torch.is_tensor(obj):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: _cast(v, dtype) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_cast(v, dtype) for v in obj)
    return obj


def _gpt2() -> Case:
    tf = _quiet_transformers()
    model = tf.GPT2LMHeadModel(_gpt2_config(resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)).train()
    ids = _ids(4, 8, 32, 1)

    def loss(m):  # HF ModelOutput: the loss from labels
        return m(input_ids=ids, labels=ids).loss


    return Case("gpt2", model, loss, None, aliases={"transformer.wte.weight": ("lm_head.weight",)},
                notes="train mode, dropout 0.1, tied embeddings")


def _bert() -> Case:
    tf = _quiet_transformers()
    cfg = tf.BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=3, pad_token_id=0)
    model = tf.BertForSequenceClassification(cfg).eval()
    ids = _ids(4, 8, 32, 2)
    mask = torch.ones_like(ids)
    ids[0, 5:], mask[0, 5:] = 0, 0  # padded sequences: Embedding(padding_idx=0) sees pad tokens
    ids[2, 6:], mask[2, 6:] = 0, 0
    inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    y = torch.tensor([0, 2, 1, 2])

    def criterion(out, target):  # a criterion on a ModelOutput
        return F.cross_entropy(out.logits, target)


    return Case("bert", model, criterion, (inputs, y),
                notes="eval mode, dict inputs, pad tokens, criterion on ModelOutput.logits")


def _bart() -> Case:
    tf = _quiet_transformers()
    cfg = tf.BartConfig(vocab_size=32, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                        max_position_embeddings=16, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                        decoder_start_token_id=2, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    model = tf.BartForConditionalGeneration(cfg).eval()
    src, tgt = _ids(3, 8, 32, 3), _ids(3, 6, 32, 4)
    src[1, 6:] = 1  # pad tokens (Embedding padding_idx=1)
    mask = (src != 1).long()

    def loss(m):
        return m(input_ids=src, attention_mask=mask, labels=tgt).loss


    aliases = ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight", "lm_head.weight")
    return Case("bart", model, loss, None, aliases={"model.shared.weight": aliases},
                notes="eval mode, one embedding under four names, pad tokens")


def _t5() -> Case:
    tf = _quiet_transformers()
    cfg = tf.T5Config(vocab_size=32, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2,
                      relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                      dropout_rate=0.0)
    model = tf.T5ForConditionalGeneration(cfg).eval()
    src, tgt = _ids(3, 8, 32, 5), _ids(3, 6, 32, 6)

    def loss(m):
        return m(input_ids=src, labels=tgt).loss


    aliases = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight")
    return Case("t5", model, loss, None, aliases={"shared.weight": aliases},
                notes="eval mode, relative attention bias, tied embeddings")


def _vit() -> Case:
    tf = _quiet_transformers()
    cfg = tf.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=32, num_labels=3)
    model = tf.ViTForImageClassification(cfg).eval()
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(4, 3, 16, 16, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 1])

    def criterion(out, target):
        return F.cross_entropy(out.logits, target)


    return Case("vit", model, criterion, (x, y), notes="eval mode, (pixels, labels) criterion form")


def _lora() -> Case:
    tf = _quiet_transformers()
    import peft

    base = tf.GPT2LMHeadModel(_gpt2_config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], lora_dropout=0.0,
                          fan_in_fan_out=True, init_lora_weights=False)  # B != 0: a nonzero adapter
    model = peft.get_peft_model(base, cfg).eval()
    ids = _ids(4, 8, 32, 8)

    def loss(m):
        return m(input_ids=ids, labels=ids).loss


    return Case("lora", model, loss, None, notes="eval mode, LoRA r=2 on c_attn and c_fc; base frozen")


def _images(n: int, size: int, seed: int, classes: int = 10):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g, dtype=torch.float64), torch.arange(n) % classes


def _resnet18(train: bool) -> Case:
    import torchvision

    model = torchvision.models.resnet18(num_classes=10).train(train)
    x, y = _images(4, 16, 9)
    ce = nn.CrossEntropyLoss()
    return Case("resnet18_train" if train else "resnet18_eval", model, ce, (x, y),
                notes=f"{'train' if train else 'eval'} mode, 16x16 inputs")


def _mobilenet() -> Case:
    import torchvision

    model = torchvision.models.mobilenet_v3_small(num_classes=10).train()
    x, y = _images(4, 32, 10)
    ce = nn.CrossEntropyLoss()
    return Case("mobilenet_v3_small", model, ce, (x, y), needs_swap=True,
                notes="train mode (BatchNorm, dropout 0.2), Hardsigmoid gates, 32x32 inputs")


def _convnext() -> Case:
    import timm

    model = timm.create_model("convnext_atto", pretrained=False, num_classes=5, depths=(1, 1, 1, 1),
                              dims=(8, 16, 16, 16)).train()
    x, y = _images(2, 32, 11, classes=5)
    ce = nn.CrossEntropyLoss()
    return Case("convnext_atto", model, ce, (x, y), notes="depths (1,1,1,1), dims (8,16,16,16), 32x32 inputs")


def _timm_vit() -> Case:
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=16, patch_size=4,
                              depth=2, embed_dim=16, num_heads=2).eval()
    x, y = _images(4, 16, 12, classes=5)
    ce = nn.CrossEntropyLoss()
    return Case("timm_vit", model, ce, (x, y), notes="vit_tiny layout: depth 2, width 16, 16x16 inputs")


_BUILDERS = {
    "gpt2": _gpt2, "bert": _bert, "bart": _bart, "t5": _t5, "vit": _vit, "lora": _lora,
    "resnet18_train": lambda: _resnet18(True), "resnet18_eval": lambda: _resnet18(False),
    "mobilenet_v3_small": _mobilenet, "convnext_atto": _convnext, "timm_vit": _timm_vit,
}


# ----------------------------------------------------------------------- independent probes
_M0, _M1, _W0, _W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85  # Philox-4x32 (Salmon et al. 2011)
_M32 = np.uint64(0xFFFFFFFF)


def _philox4x32_10(c0, c1, c2, c3, k0: int, k1: int) -> list[np.ndarray]:
    """Philox-4x32-10 on uint64 arrays / scalars holding 32-bit words."""
    k0, k1 = np.uint64(k0), np.uint64(k1)
    s32 = np.uint64(32)
    for r in range(10):
        if r:
            k0, k1 = (k0 + np.uint64(_W0)) & _M32, (k1 + np.uint64(_W1)) & _M32
        p0, p1 = np.uint64(_M0) * c0, np.uint64(_M1) * c2  # exact: 32 x 32 bits fit in 64
        c0, c1, c2, c3 = ((p1 >> s32) ^ c1 ^ k0), p1 & _M32, ((p0 >> s32) ^ c3 ^ k1), p0 & _M32
    return [c0, c1, c2, c3]


def philox_rademacher(seed: int, probe: int, offset: int, numel: int) -> torch.Tensor:
    """Probe ``probe``'s Rademacher entries for global elements ``offset .. offset+numel-1`` (float64)."""
    g0, g1 = offset >> 2, (offset + numel + 3) >> 2  # the Philox groups of 4 words covering the range
    g = np.arange(g0, g1, dtype=np.uint64)
    words = _philox4x32_10(g & _M32, g >> np.uint64(32), np.uint64(probe & 0xFFFFFFFF), np.uint64(probe >> 32),
                           seed & 0xFFFFFFFF, seed >> 32)
    lanes = np.stack(np.broadcast_arrays(*words), 1).reshape(-1)  # element 4 g + j is word j of group g
    w = lanes[offset - 4 * g0: offset - 4 * g0 + numel]
    return torch.from_numpy(1.0 - 2.0 * (w >> np.uint64(31)).astype(np.float64))


# ------------------------------------------------------------------------- references
def trainable(model: nn.Module) -> tuple[list[str], list[torch.Tensor]]:
    """Unique trainable tensors in ``named_parameters()`` order (tied ones once, first name)."""
    names, params = [], []
    for n, p in model.named_parameters():  # remove_duplicate=True: the first name of a tied tensor
        if p.requires_grad:
            names.append(n)
            params.append(p)
    return names, params


@contextlib.contextmanager
def _math_attention():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):  # the fused CPU kernel has no double backward
        yield


def _gradient_graph(case: Case, model: nn.Module, rng_state):
    names, params = trainable(model)
    with _math_attention(), torch.random.fork_rng(devices=[]):
        if rng_state is not None:
            torch.set_rng_state(rng_state)  # the dropout draw block_traces made
        loss = case.objective(model)
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    return names, params, grads


def reference_samples(case: Case, seed: int, K: int, rng_state=None, model: nn.Module | None = None) -> tuple:
    """``(names, samples, scale)``, each ``(K, L)``: ``z_b . (H z)_b`` for the Philox probes 0..K-1 of
    ``seed``, and ``sum_{i in b} |(H z)_i|``, the magnitude the rounding of a sample scales with.

    ``rng_state``: the global RNG state at the start of the hutchtrace call (the one forward of
    a batch draws its dropout masks from it). ``model``: a stand-in to differentiate (default
    ``case.model``).
    """
    model = case.model if model is None else model
    names, params, grads = _gradient_graph(case, model, rng_state)
    offsets = np.cumsum([0] + [p.numel() for p in params])
    samples = torch.zeros(K, len(params), dtype=torch.float64)
    scale = torch.zeros(K, len(params), dtype=torch.float64)
    for k in range(K):
        z = [philox_rademacher(seed, k, int(o), p.numel()).to(p.dtype).reshape(p.shape)
             for o, p in zip(offsets[:-1], params)]
        used = [(g, zz) for g, zz in zip(grads, z) if g is not None]
        hz = torch.autograd.grad([u[0] for u in used], params, [u[1] for u in used], retain_graph=True,
                                 allow_unused=True)
        for j, (zz, h) in enumerate(zip(z, hz)):
            if h is not None:
                samples[k, j] = float((zz.double() * h.double()).sum())
                scale[k, j] = float(h.double().abs().sum())
    return names, samples, scale


def reference_isolated(case: Case, K: int, seed: int, model: nn.Module | None = None, rng_state=None) -> tuple:
    """``(names, mean (L,), se (L,))``: ``K`` block-supported Rademacher probes per block.

    Probes from ``torch.Generator(seed)``, one block at a time, products by double backward
    through one first-order graph. ``t_b = z_b . (H_bb z_b)`` is unbiased for ``tr H_bb`` with no
    cross-block variance; ``se`` is the sample standard deviation over ``sqrt(K)``. ``rng_state``
    as in :func:`reference_samples` (models with dropout).
    """
    model = case.model if model is None else model
    names, params, grads = _gradient_graph(case, model, rng_state)
    gen = torch.Generator().manual_seed(seed)
    samples = torch.zeros(K, len(params), dtype=torch.float64)
    for b, (g, p) in enumerate(zip(grads, params)):
        if g is None:
            continue
        z = (torch.randint(0, 2, (K, *p.shape), generator=gen) * 2 - 1).to(p.dtype)
        try:  # all K probes of the block in one vmapped backward
            (hz,) = torch.autograd.grad(g, p, z, retain_graph=True, is_grads_batched=True, allow_unused=True)
            rows = [hz[k] for k in range(K)] if hz is not None else [None] * K
        except RuntimeError:
            rows = [torch.autograd.grad(g, p, z[k], retain_graph=True, allow_unused=True)[0] for k in range(K)]
        for k, h in enumerate(rows):
            samples[k, b] = 0.0 if h is None else float((z[k].double() * h.double()).sum())
    return names, samples.mean(0), samples.std(0) / K**0.5


def swapped_copy(model: nn.Module) -> nn.Module:
    """A deep copy with every ``nn.Hardsigmoid`` replaced by a module computing ``relu6(x + 3) / 6``.

    Independent of :func:`hutchtrace.twice_differentiable` (module surgery, not a function mode),
    for the mobilenet reference.
    """

    class Relu6Gate(nn.Module):
        def forward(self, x):
            return F.relu6(x + 3.0) / 6.0

    m = copy.deepcopy(model)
    for parent in m.modules():
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.Hardsigmoid):
                setattr(parent, child_name, Relu6Gate())
    return m
