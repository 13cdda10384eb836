"""Small reference models used by the tests, the benchmarks and the demo.

Each covers a case peers get wrong: BatchNorm in train mode, tied input/output
embeddings with LayerNorm and causal attention, a recurrent cell whose weights are shared
across unrolled steps, a frozen parameter plus a parameter shared by two modules,
dropout, residual connections. All accept ``dtype`` and are deterministic given ``seed``.

Every ``make_*`` returns ``(model, criterion, (inputs, targets))``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .problem.loss import MeanSquared  # re-exported: the zoo's regression criterion

__all__ = [
    "mlp",
    "MeanSquared",
    "SmallCNN",
    "TinyLM",
    "RecurrentNet",
    "SharedFrozenNet",
    "ResNetSmall",
    "DeepResNet",
    "HessianQuadratic",
    "make_mlp",
    "make_cnn",
    "make_lm",
    "make_rnn",
    "make_shared_frozen",
    "make_dropout_mlp",
    "make_resnet",
    "make_deep_resnet",
    "make_deep_lm",
]


def mlp(sizes=(16, 32, 32, 8), act: type[nn.Module] = nn.Tanh, dropout: float = 0.0) -> nn.Sequential:
    """A fully connected net ``sizes[0] -> ... -> sizes[-1]`` with ``act`` between layers."""
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(act())
            if dropout:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class SmallCNN(nn.Module):
    """conv-BN-tanh-pool x2 -> linear; BatchNorm in train mode couples the samples."""

    def __init__(self, in_ch=1, classes=4, width=4, bn=True):
        super().__init__()
        self.c1 = nn.Conv2d(in_ch, width, 3, padding=1)
        self.b1 = nn.BatchNorm2d(width) if bn else nn.Identity()
        self.c2 = nn.Conv2d(width, width, 3, padding=1)
        self.b2 = nn.BatchNorm2d(width) if bn else nn.Identity()
        self.fc = nn.Linear(width * 2 * 2, classes)

    def forward(self, x):
        x = F.avg_pool2d(torch.tanh(self.b1(self.c1(x))), 2)
        x = F.avg_pool2d(torch.tanh(self.b2(self.c2(x))), 2)
        return self.fc(x.flatten(1))


class TinyLM(nn.Module):
    """A one-block causal transformer LM with the input embedding tied to the output layer."""

    def __init__(self, vocab=12, d=8, heads=2, ctx=6, layers=1):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(ctx, d) * 0.1)
        self.blocks = nn.ModuleList([_Block(d, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight  # tied

    def forward(self, idx):
        x = self.emb(idx) + self.pos[: idx.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))


class _Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.ff1 = nn.Linear(d, 2 * d)
        self.ff2 = nn.Linear(2 * d, d)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(D, dim=-1)
        sh = lambda t: t.view(B, T, self.heads, D // self.heads).transpose(1, 2)  # noqa: E731
        a = F.scaled_dot_product_attention(sh(q), sh(k), sh(v), is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, D))
        return x + self.ff2(F.gelu(self.ff1(self.ln2(x))))


class RecurrentNet(nn.Module):
    """A tanh RNN cell unrolled ``steps`` times: the same weights are used at every step."""

    def __init__(self, n_in=3, hidden=5, n_out=2, steps=5):
        super().__init__()
        self.steps = steps
        self.inp = nn.Linear(n_in, hidden)
        self.rec = nn.Linear(hidden, hidden, bias=False)
        self.out = nn.Linear(hidden, n_out)

    def forward(self, x):  # x: (B, steps, n_in)
        h = torch.zeros(x.shape[0], self.rec.in_features, dtype=x.dtype, device=x.device)
        for t in range(self.steps):
            h = torch.tanh(self.inp(x[:, t]) + self.rec(h))
        return self.out(h)


class SharedFrozenNet(nn.Module):
    """A frozen layer, and one weight tensor used by two modules (tied by assignment)."""

    def __init__(self, n_in=4, hidden=6, n_out=3):
        super().__init__()
        self.frozen = nn.Linear(n_in, hidden)
        self.frozen.requires_grad_(False)
        self.a = nn.Linear(hidden, hidden)
        self.b = nn.Linear(hidden, hidden)
        self.b.weight = self.a.weight  # the same tensor, two modules
        self.out = nn.Linear(hidden, n_out)

    def forward(self, x):
        h = torch.tanh(self.frozen(x))
        h = torch.tanh(self.a(h))
        h = torch.tanh(self.b(h))
        return self.out(h)


class _BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.b1(self.c1(x)))
        y = self.b2(self.c2(y))
        return F.relu(y + (x if self.short is None else self.short(x)))


class ResNetSmall(nn.Module):
    """ResNet-18 layout (4 stages x 2 basic blocks, BN, residual adds) at a chosen width."""

    def __init__(self, in_ch=3, classes=10, width=8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_ch, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        chans = [width, 2 * width, 4 * width, 8 * width]
        stages = []
        cin = width
        for i, c in enumerate(chans):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(_BasicBlock(cin, c, stride), _BasicBlock(c, c, 1)))
            cin = c
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.stages(self.stem(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class DeepResNet(nn.Module):
    """A deep, narrow residual CNN: ``depth`` identity-shortcut basic blocks at one width.

    Six tensors per basic block (two bias-free convs, two BatchNorms), plus a stem conv-BN
    and a linear head: ``6 * depth + 5`` blocks at ``blocks="param"`` (101 for ``depth=16``)
    with only a few thousand parameters, so its exact Hessian is affordable. The probing
    study at many blocks (``bench/probing_scale.py``) uses it.
    """

    def __init__(self, in_ch=3, classes=4, width=4, depth=16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_ch, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
        self.stages = nn.Sequential(*[_BasicBlock(width, width, 1) for _ in range(depth)])
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        x = self.stages(self.stem(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class HessianQuadratic(nn.Module):
    """``loss(theta) = theta^T H theta / 2`` with ``theta`` split into one parameter per block:
    a model whose Hessian is exactly ``H`` (symmetric ``P x P``), block ``b`` of size
    ``sizes[b]``. An HVP is one matrix product, so a statistical study of a real model can
    run on its dense Hessian (``exact_hessian``) at the cost of ``P^2`` per probe row, with
    the same probes and therefore the same samples (``bench/probing_scale.py``).

    Call it without inputs: ``hutchtrace.block_traces(q, lambda m: m(), ...)``.
    """

    def __init__(self, H: torch.Tensor, sizes):
        super().__init__()
        if H.dim() != 2 or H.shape[0] != H.shape[1] or H.shape[0] != sum(sizes):
            raise ValueError(f"H must be square with side sum(sizes) = {sum(sizes)}, got {tuple(H.shape)}")
        self.register_buffer("H", H)
        self.blocks = nn.ParameterList([nn.Parameter(torch.zeros(int(n), dtype=H.dtype, device=H.device))
                                        for n in sizes])

    def forward(self):
        th = torch.cat(list(self.blocks)).unsqueeze(0)
        return 0.5 * (th @ self.H @ th.T).squeeze()


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _build(ctor, *args, **kwargs) -> nn.Module:
    """Construct a module without consuming the global RNG (its init is overwritten anyway)."""
    with torch.random.fork_rng(devices=[]):
        return ctor(*args, **kwargs)


def _init(model: nn.Module, seed: int, dtype):
    g = _gen(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.to(dtype)


def make_mlp(n=32, sizes=(16, 32, 32, 8), act=nn.Tanh, seed=0, dtype=torch.float32):
    """Tanh MLP 16-32-32-8 with cross-entropy on random labels (the test MLP of docs/maths.md)."""
    model = _init(_build(mlp, sizes, act), seed, dtype)
    g = _gen(seed + 1)
    x = torch.randn(n, sizes[0], generator=g).to(dtype)
    y = torch.randint(0, sizes[-1], (n,), generator=g)
    return model, nn.CrossEntropyLoss(), (x, y)


def make_dropout_mlp(n=16, sizes=(6, 10, 3), p=0.3, seed=0, dtype=torch.float32):
    """An MLP with dropout (train mode) and mean squared error."""
    model = _init(_build(mlp, sizes, nn.Tanh, dropout=p), seed, dtype).train()
    g = _gen(seed + 1)
    x = torch.randn(n, sizes[0], generator=g).to(dtype)
    y = torch.randn(n, sizes[-1], generator=g).to(dtype)
    return model, MeanSquared(), (x, y)


def make_cnn(n=8, size=8, classes=4, width=4, seed=0, dtype=torch.float32):
    """SmallCNN with BatchNorm in train mode on random 1x8x8 images."""
    model = _init(_build(SmallCNN, 1, classes, width), seed, dtype).train()
    g = _gen(seed + 1)
    x = torch.randn(n, 1, size, size, generator=g).to(dtype)
    y = torch.randint(0, classes, (n,), generator=g)
    return model, nn.CrossEntropyLoss(), (x, y)


class _SeqCE(nn.Module):
    """Cross-entropy over (B, T, V) logits and (B, T) targets."""

    def forward(self, logits, targets):
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def make_lm(n=4, vocab=12, d=8, ctx=6, layers=1, copy_task=False, seed=0, dtype=torch.float32):
    """TinyLM (tied embeddings, LayerNorm, causal attention) on random token sequences."""
    model = _init(_build(TinyLM, vocab, d, 2, ctx, layers), seed, dtype)
    g = _gen(seed + 1)
    idx = torch.randint(0, vocab, (n, ctx), generator=g)
    tgt = idx.clone() if copy_task else torch.randint(0, vocab, (n, ctx), generator=g)
    return model, _SeqCE(), (idx, tgt)


def make_rnn(n=6, steps=5, seed=0, dtype=torch.float32):
    """RecurrentNet unrolled over ``steps`` steps, MSE loss."""
    model = _init(_build(RecurrentNet, 3, 5, 2, steps), seed, dtype)
    g = _gen(seed + 1)
    x = torch.randn(n, steps, 3, generator=g).to(dtype)
    y = torch.randn(n, 2, generator=g).to(dtype)
    return model, nn.MSELoss(), (x, y)


def make_shared_frozen(n=10, seed=0, dtype=torch.float32):
    """SharedFrozenNet with cross-entropy."""
    model = _init(_build(SharedFrozenNet), seed, dtype)
    model.frozen.requires_grad_(False)
    g = _gen(seed + 1)
    x = torch.randn(n, 4, generator=g).to(dtype)
    y = torch.randint(0, 3, (n,), generator=g)
    return model, nn.CrossEntropyLoss(), (x, y)


def make_resnet(n=8, size=16, width=8, classes=10, seed=0, dtype=torch.float32):
    """ResNetSmall (ResNet-18 layout) in train mode on random 3xSxS images."""
    model = _init(_build(ResNetSmall, 3, classes, width), seed, dtype).train()
    g = _gen(seed + 1)
    x = torch.randn(n, 3, size, size, generator=g).to(dtype)
    y = torch.randint(0, classes, (n,), generator=g)
    return model, nn.CrossEntropyLoss(), (x, y)


def make_deep_resnet(n=8, size=6, width=4, depth=16, classes=4, seed=0, dtype=torch.float32):
    """DeepResNet (101 blocks at the defaults, P = 5 000) in train mode on random 3xSxS images.

    Like every zoo model, 1-d parameters start at 0.1 times a normal draw: BatchNorm scales
    near 0 keep each residual branch small, so the deep stack stays well conditioned.
    """
    model = _init(_build(DeepResNet, 3, classes, width, depth), seed, dtype).train()
    g = _gen(seed + 1)
    x = torch.randn(n, 3, size, size, generator=g).to(dtype)
    y = torch.randint(0, classes, (n,), generator=g)
    return model, nn.CrossEntropyLoss(), (x, y)


def make_deep_lm(n=4, vocab=12, d=8, ctx=6, layers=8, seed=0, dtype=torch.float32):
    """TinyLM with ``layers`` transformer blocks: 12 tensors each plus 4 (tied embedding,
    positions, final LayerNorm), so 100 blocks at ``layers=8`` (P = 4 960)."""
    return make_lm(n=n, vocab=vocab, d=d, ctx=ctx, layers=layers, seed=seed, dtype=dtype)
