"""Which ops and model families PyTorch can differentiate twice (the HVP's requirement).

A Hessian-vector product differentiates the backward pass, so every op of a model needs a
second derivative: a derivative of its backward op (reverse-over-reverse, hutchtrace's
``hvp="reverse"``) or a forward-mode derivative of it (forward-over-reverse,
``hvp="forward"``). This script checks, randomly initialised (no downloads), float64:

* activations: every ``torch.nn`` activation module, timm's activation layers
  (``timm.layers.get_act_layer``), HF transformers' ``ACT2CLS``; each composed with
  ``tanh`` so the backward op is differentiated in both its inputs;
* torchvision ops that appear in detection / warping models (``roi_align``, ``roi_pool``,
  ``ps_roi_align``, ``deform_conv2d``, ``grid_sample``, ``interpolate`` modes);
* model families: the torchvision classification families (smallest variant; alexnet, VGG and
  the larger ResNets add no op the others lack), two segmentation models, and one small model
  of 42 timm families (:data:`TIMM_MODELS`).

Per case: reverse-over-reverse (plain ``torch.autograd.grad`` twice) and
forward-over-reverse (``torch.func.jvp`` of ``torch.func.grad``), each ``ok`` or the failing
op; the relative error of the reverse product against central finite differences of the
gradient (catches silently wrong second derivatives); custom ``@once_differentiable``
Functions in the graph (PyTorch drops their curvature silently); and, where a failing op is
one :func:`hutchtrace.twice_differentiable` swaps, the same checks under it.

    python bench/second_order_survey.py                      # everything (~30-60 min, one core)
    python bench/second_order_survey.py --only activations,ops

Writes ``bench/results/second_order_survey.{json,md}``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import functional_call, grad, jvp  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import hutchtrace  # noqa: E402
from hutchtrace.backbones.graph import once_differentiable_functions
from hutchtrace.core.errors import failing_op, is_second_order_failure  # noqa: E402
from hutchtrace.core.state import differentiable_mode  # noqa: E402
from hutchtrace.core.twice import swap_for_failing_op  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DT = torch.float64


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int):
    def handler(signum, frame):
        raise _Timeout(f"timed out after {seconds} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _short(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    op = failing_op(msg)
    return f"{op}" if op else f"{type(exc).__name__}: {msg[:140]}"


def _input_rejected(r: dict) -> bool:
    """Both modes failed with the same error that is not about derivatives (a shape assertion):
    the model does not accept this input size."""
    rev, fwd = r.get("reverse"), r.get("forward")
    return rev not in ("ok", None) and rev == fwd and not is_second_order_failure(rev) and "hardsigmoid" not in rev


def _swap_may_help(r: dict) -> bool:
    """A failure naming an op :func:`hutchtrace.twice_differentiable` swaps, or a NaN product."""
    failed = [m for m in ("reverse", "forward") if r.get(m) not in ("ok", None)]
    return any(swap_for_failing_op(r[m]) for m in failed) or r.get("finite") is False


# ----------------------------------------------------------------------------- elementwise
def check_function(fn, shape=(6, 40), scale=3.0, seed=0) -> dict:
    """rr / fr status and the finite-difference error of ``x -> tanh(fn(x)) . w``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=DT) * scale
    v = torch.randn(shape, generator=g, dtype=DT)
    with torch.no_grad():
        w = torch.randn(fn(x).shape, generator=g, dtype=DT)

    def f(t):
        return (torch.tanh(fn(t)) * w).sum()

    def gradient(t):
        t = t.detach().clone().requires_grad_()
        return torch.autograd.grad(f(t), t, create_graph=True)[0]

    out = {}
    hv = None
    try:
        xx = x.clone().requires_grad_()
        gx = torch.autograd.grad(f(xx), xx, create_graph=True)[0]
        hv = torch.autograd.grad(gx, xx, v, allow_unused=True)[0]
        hv = torch.zeros_like(x) if hv is None else hv
        out["reverse"] = "ok"
        out["finite"] = bool(torch.isfinite(hv).all())
    except Exception as e:  # noqa: BLE001 - the survey records every failure
        out["reverse"] = _short(e)
    try:
        _, fr = jvp(grad(f), (x,), (v,))
        out["forward"] = "ok"
        if hv is not None:
            out["reverse_vs_forward"] = float((hv - fr).norm() / fr.norm().clamp_min(1e-300))
    except Exception as e:  # noqa: BLE001
        out["forward"] = _short(e)
    if hv is not None:
        eps = 1e-6
        fd = (gradient(x + eps * v) - gradient(x - eps * v)).detach() / (2 * eps)
        out["fd_rel_err"] = float((hv - fd).norm() / fd.norm().clamp_min(1e-300))
    return out


def activation_cases() -> dict:
    import torch.nn.modules.activation as A

    cases = {}
    for n in A.__all__:
        cls = getattr(A, n)
        if n in ("MultiheadAttention",):
            continue
        try:
            m = {"Threshold": lambda: cls(0.1, 2.0), "Softmax2d": lambda: None}.get(n, cls)()
        except TypeError:
            continue
        if m is None:
            continue
        if n == "RReLU":
            m.eval()  # train mode draws a random slope per call: no function to differentiate
        cases[f"torch.nn.{n}"] = m.to(DT)
    with contextlib.suppress(ImportError):
        from timm.layers import get_act_layer
        from timm.layers.create_act import _ACT_LAYER_DEFAULT

        for n in sorted(_ACT_LAYER_DEFAULT):
            cls = get_act_layer(n)
            if cls is not None and n != "identity":
                cases[f"timm {n} ({cls.__name__})"] = cls().to(DT)
    with contextlib.suppress(ImportError):
        from transformers.activations import ACT2CLS, ACT2FN

        for n in sorted(ACT2CLS):
            try:
                cases[f"transformers {n} ({type(ACT2FN[n]).__name__})"] = ACT2FN[n].to(DT)
            except Exception:  # noqa: BLE001
                pass
    return cases


def survey_functions(cases: dict) -> dict:
    out = {}
    for name, fn in cases.items():
        r = check_function(fn)
        if _swap_may_help(r):
            with hutchtrace.twice_differentiable():
                r["with_swap"] = check_function(fn)
        out[name] = r
        print(f"{name:48s} {r}", flush=True)
    return out


def op_cases() -> dict:
    F = torch.nn.functional
    cases = {
        "F.interpolate bilinear": lambda x: F.interpolate(x.reshape(1, 1, 6, 40), scale_factor=2, mode="bilinear"),
        "F.interpolate bicubic": lambda x: F.interpolate(x.reshape(1, 1, 6, 40), scale_factor=2, mode="bicubic"),
        "F.interpolate nearest": lambda x: F.interpolate(x.reshape(1, 1, 6, 40), scale_factor=2, mode="nearest"),
        "F.grid_sample": lambda x: F.grid_sample(
            x.reshape(1, 1, 6, 40), torch.tanh(x.reshape(1, 6, 20, 2)), align_corners=False
        ),
        "F.adaptive_max_pool2d": lambda x: F.adaptive_max_pool2d(x.reshape(1, 1, 6, 40), (3, 5)),
        "F.max_pool2d": lambda x: F.max_pool2d(x.reshape(1, 1, 6, 40), 2),
        "F.avg_pool2d ceil_mode": lambda x: F.avg_pool2d(x.reshape(1, 1, 6, 40), 3, ceil_mode=True),
        "F.group_norm": lambda x: F.group_norm(x.reshape(2, 4, 30), 2),
        "F.pixel_shuffle": lambda x: F.pixel_shuffle(x.reshape(1, 4, 6, 10), 2),
        # an all-zero row, as window padding produces in Swin V2's cosine attention
        "F.normalize with an all-zero vector": lambda x: F.normalize(x * (torch.arange(6) > 0)[:, None].to(x), dim=-1),
        "F.normalize": lambda x: F.normalize(x, dim=-1),
    }
    with contextlib.suppress(ImportError):
        import torchvision.ops as tvo

        boxes = torch.tensor([[0, 1.0, 0.5, 30.0, 4.5], [0, 5.0, 1.0, 20.0, 5.0]], dtype=DT)
        offs = torch.zeros(1, 18, 4, 38, dtype=DT)
        wdc = torch.randn(1, 1, 3, 3, generator=torch.Generator().manual_seed(3), dtype=DT)
        cases.update({
            "torchvision.ops.roi_align": lambda x: tvo.roi_align(x.reshape(1, 1, 6, 40), boxes, (2, 2), 1.0, 2),
            "torchvision.ops.roi_pool": lambda x: tvo.roi_pool(x.reshape(1, 1, 6, 40), boxes, (2, 2), 1.0),
            "torchvision.ops.ps_roi_align": lambda x: tvo.ps_roi_align(x.reshape(1, 4, 6, 10), boxes, (2, 2), 1.0, 2),
            "torchvision.ops.deform_conv2d": lambda x: tvo.deform_conv2d(x.reshape(1, 1, 6, 40), offs, wdc),
        })
    return cases


# ----------------------------------------------------------------------------- models
def _logits(out):
    if hasattr(out, "logits"):
        out = out.logits
    if isinstance(out, dict):
        out = next(iter(out.values()))
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out.reshape(out.shape[0], -1)


def check_model(model: nn.Module, x: torch.Tensor) -> dict:
    """Per model, in the kernels hutchtrace selects (:func:`hutchtrace.core.state.differentiable_mode`:
    the math attention kernel): rr / fr status, FD error, once_differentiable Functions, params."""
    with differentiable_mode(model):
        return _check_model(model, x)


def _check_model(model: nn.Module, x: torch.Tensor) -> dict:
    model = model.to(DT).train()
    for m in model.modules():  # as hutchtrace does: no in-place running-stat updates
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    x = x.to(DT)
    g = torch.Generator().manual_seed(1)
    v = [torch.randn(p.shape, generator=g, dtype=DT) for p in params]

    def loss_of(out):
        z = _logits(out)
        y = torch.arange(z.shape[0]) % z.shape[1]
        return nn.functional.cross_entropy(z, y)

    def loss():
        torch.manual_seed(0)  # the same dropout / drop-path draw at every evaluation
        return loss_of(model(x))

    out = {"params": sum(p.numel() for p in params), "input": list(x.shape)}
    t0 = time.perf_counter()
    hv = None
    try:
        L = loss()
        out["once_differentiable"] = once_differentiable_functions(L)
        gr = torch.autograd.grad(L, params, create_graph=True)
        dot = sum((a * b).sum() for a, b in zip(gr, v))
        hv = torch.autograd.grad(dot, params, allow_unused=True)
        hv = [torch.zeros_like(p) if h is None else h for p, h in zip(params, hv)]
        out["reverse"] = "ok"
        out["finite"] = bool(all(torch.isfinite(h).all() for h in hv))
    except Exception as e:  # noqa: BLE001
        out["reverse"] = _short(e)
    out["reverse_s"] = round(time.perf_counter() - t0, 2)
    if hv is not None:
        eps = 1e-6

        def grad_at(sign):
            with torch.no_grad():
                for p, d in zip(params, v):
                    p.add_(sign * eps * d)
            try:
                return [t.detach() for t in torch.autograd.grad(loss(), params, allow_unused=True)]
            finally:
                with torch.no_grad():
                    for p, d in zip(params, v):
                        p.sub_(sign * eps * d)

        gp, gm = grad_at(1.0), grad_at(-1.0)
        fd = torch.cat([((a if a is not None else 0 * p) - (b if b is not None else 0 * p)).reshape(-1) / (2 * eps)
                        for a, b, p in zip(gp, gm, params)])
        h = torch.cat([t.reshape(-1) for t in hv])
        out["fd_rel_err"] = float((h - fd).norm() / fd.norm().clamp_min(1e-300))
    t0 = time.perf_counter()
    try:
        state = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        consts = {n: b for n, b in model.named_buffers()}
        consts.update({n: p.detach() for n, p in model.named_parameters() if not p.requires_grad})

        def f(*ps):
            torch.manual_seed(0)
            return loss_of(functional_call(model, {**consts, **dict(zip(names, ps))}, (x,)))

        _, fr = jvp(grad(f, argnums=tuple(range(len(names)))), tuple(state.values()), tuple(v))
        out["forward"] = "ok"
        if hv is not None:
            a = torch.cat([t.reshape(-1) for t in hv])
            b = torch.cat([t.reshape(-1) for t in fr])
            out["reverse_vs_forward"] = float((a - b).norm() / b.norm().clamp_min(1e-300))
    except Exception as e:  # noqa: BLE001
        out["forward"] = _short(e)
    out["forward_s"] = round(time.perf_counter() - t0, 2)
    return out


def survey_model(name: str, build, size: int, limit: int) -> dict:
    torch.manual_seed(0)
    try:
        with time_limit(limit):
            model = build()
            x = torch.randn(2, 3, size, size)
            r = check_model(model, x)
            if _swap_may_help(r):
                torch.manual_seed(0)
                with hutchtrace.twice_differentiable():
                    r["with_swap"] = check_model(build(), x)
        if _input_rejected(r):
            r = {"error": f"input {size}x{size} rejected: {r['reverse']}"}
    except Exception as e:  # noqa: BLE001
        r = {"error": _short(e)}
        if os.environ.get("SURVEY_DEBUG"):
            traceback.print_exc()
    print(f"{name:40s} {r}", flush=True)
    return r


def torchvision_cases() -> dict:
    import torchvision.models as tv

    def vit():
        return tv.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                                    mlp_dim=64, num_classes=10)

    def maxvit():
        return tv.MaxVit(input_size=(64, 64), stem_channels=8, partition_size=2, block_channels=[8, 16],
                         block_layers=[1, 1], head_dim=4, stochastic_depth_prob=0.0, num_classes=10)

    c = {
        "convnext_tiny": (lambda: tv.convnext_tiny(num_classes=10), 64),
        "densenet121": (lambda: tv.densenet121(num_classes=10), 64),
        "efficientnet_b0": (lambda: tv.efficientnet_b0(num_classes=10), 64),
        "efficientnet_v2_s": (lambda: tv.efficientnet_v2_s(num_classes=10), 64),
        "googlenet": (lambda: tv.googlenet(num_classes=10, aux_logits=False, init_weights=True), 64),
        "inception_v3": (lambda: tv.inception_v3(num_classes=10, aux_logits=False, init_weights=True), 96),
        "maxvit (tiny config)": (maxvit, 64),
        "mnasnet0_5": (lambda: tv.mnasnet0_5(num_classes=10), 64),
        "mobilenet_v2": (lambda: tv.mobilenet_v2(num_classes=10), 64),
        "mobilenet_v3_small": (lambda: tv.mobilenet_v3_small(num_classes=10), 64),
        "regnet_x_400mf": (lambda: tv.regnet_x_400mf(num_classes=10), 64),
        "regnet_y_400mf": (lambda: tv.regnet_y_400mf(num_classes=10), 64),
        "resnet18": (lambda: tv.resnet18(num_classes=10), 64),
        "shufflenet_v2_x0_5": (lambda: tv.shufflenet_v2_x0_5(num_classes=10), 64),
        "squeezenet1_1": (lambda: tv.squeezenet1_1(num_classes=10), 64),
        "swin_t": (lambda: tv.swin_t(num_classes=10), 64),
        "swin_v2_t": (lambda: tv.swin_v2_t(num_classes=10), 64),
        "swin_v2_t (224x224 inputs)": (lambda: tv.swin_v2_t(num_classes=10), 224),
        "vit (tiny config)": (vit, 32),
        "segmentation lraspp_mobilenet_v3_large": (
            lambda: tv.segmentation.lraspp_mobilenet_v3_large(num_classes=3, weights_backbone=None), 64),
    }
    return {f"torchvision {k}": v for k, v in c.items()}


#: one small model per timm family, chosen to cover its distinct layers: hard-swish / hard-sigmoid
#: gates (mobilenetv3, lcnet, hardcorenas, ghostnet, levit, mobilenetv4, repghost), cosine
#: attention (swinv2, swinv2_cr), re-parameterised blocks (mobileone, fastvit, repvit), weight
#: standardisation (nf_regnet), self-attention variants (halo, lambda, bottleneck, XCiT...)
TIMM_MODELS = (
    "mobilenetv3_small_050", "lcnet_050", "hardcorenas_a", "ghostnet_050", "mobilenetv4_conv_small",
    "repghostnet_050", "efficientnet_b0", "tinynet_e", "mixnet_s", "rexnet_100", "levit_128s", "mobilevit_xxs",
    "mobilevitv2_050", "efficientvit_m0", "efficientvit_b0", "efficientformer_l1", "efficientformerv2_s0",
    "edgenext_xx_small", "fastvit_t8", "mobileone_s0", "repvit_m1", "fasternet_t0", "hgnetv2_b0", "starnet_s050",
    "convnext_atto", "caformer_s18", "poolformerv2_s12", "vit_tiny_patch16_224", "deit_tiny_patch16_224",
    "pit_ti_224", "xcit_nano_12_p16_224", "tiny_vit_5m_224", "swinv2_tiny_window8_256", "swinv2_cr_tiny_224",
    "maxvit_nano_rw_256", "coatnet_nano_rw_224", "regnetx_002", "resnet18", "nf_regnet_b0", "lambda_resnet26t",
    "halonet26t", "botnet26t_256",
)


def timm_cases(names=TIMM_MODELS) -> dict:
    import timm

    out = {}
    for name in names:
        def build(name=name):
            try:
                return timm.create_model(name, pretrained=False, num_classes=10, img_size=64)
            except TypeError:  # a model without a configurable input size
                return timm.create_model(name, pretrained=False, num_classes=10)

        out[f"timm {name}"] = (build, 64)
    return out


def survey_models(cases: dict, limit: int) -> dict:
    out = {}
    for name, (build, size) in cases.items():
        r = survey_model(name, build, size, limit)
        for native in (224, 256):  # some models need their native input size
            if "error" not in r or native <= size:
                continue
            r2 = survey_model(f"{name} @{native}", build, native, limit)
            r = r2 if "error" not in r2 else r
        out[name] = r
    return out


# ----------------------------------------------------------------------------- report
def _status(r: dict, mode: str) -> str:
    s = r.get(mode, "-")
    if mode == "reverse" and s == "ok" and r.get("finite") is False:
        s = "NaN products"
    if s != "ok" and "with_swap" in r:
        w = r["with_swap"]
        ws = "NaN products" if mode == "reverse" and w.get("finite") is False else w.get(mode)
        s += f" -> with twice_differentiable(): {ws}"
    return s


def _num(r: dict, key: str) -> str:
    x = r.get(key, r.get("with_swap", {}).get(key))
    return f"{x:.1e}" if x is not None and math.isfinite(x) else "-"


def write_md(res: dict, path: Path) -> None:
    lines = [
        "# Second derivatives in PyTorch: ops and model families",
        "",
        f"`python bench/second_order_survey.py` (torch {res['versions']['torch']}, torchvision "
        f"{res['versions'].get('torchvision')}, timm {res['versions'].get('timm')}, transformers "
        f"{res['versions'].get('transformers')}); float64, random init. reverse = double backward, "
        "forward = jvp of grad; `reverse vs forward` = relative difference of the two products "
        "(one random direction); `fd` = relative error of the double-backward product against central "
        "finite differences of the gradient (eps = 1e-6; meaningless across ReLU / max-pool kinks, "
        "which a 1e-6 step crosses in large models). Failures name the op PyTorch reports.",
        "",
    ]
    for section in ("activations", "ops", "models"):
        if section not in res:
            continue
        rows = res[section]
        bad = {k: r for k, r in rows.items() if r.get("reverse") != "ok" or r.get("forward") != "ok"
               or r.get("once_differentiable") or "error" in r or r.get("finite") is False}
        lines += [f"## {section}: {len(rows)} checked, {len(rows) - len(bad)} twice differentiable in both modes",
                  ""]
        lines += ["| case | reverse | forward | reverse vs forward | fd | once_differentiable | params |",
                  "|---|---|---|---|---|---|---|"]
        for k, r in rows.items():
            if "error" in r:
                lines.append(f"| {k} | not run: {r['error']} | | | | |")
                continue
            od = ", ".join(r.get("once_differentiable") or []) or ""
            lines.append(f"| {k} | {_status(r, 'reverse')} | {_status(r, 'forward')} | "
                         f"{_num(r, 'reverse_vs_forward')} | {_num(r, 'fd_rel_err')} | {od} | {r.get('params', '')} |")
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="activations,ops,torchvision,timm")
    ap.add_argument("--limit", type=int, default=240, help="seconds per model")
    ap.add_argument("--models", default=None, help="comma-separated substrings: only these model cases")
    ap.add_argument("--merge", action="store_true", help="update the entries of an existing results file")
    ap.add_argument("--out", default=str(RESULTS / "second_order_survey"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    only = set(args.only.split(","))
    versions = {"torch": torch.__version__}
    for mod in ("torchvision", "timm", "transformers"):
        with contextlib.suppress(ImportError):
            versions[mod] = __import__(mod).__version__
    res = {"versions": versions}
    if "activations" in only:
        res["activations"] = survey_functions(activation_cases())
    if "ops" in only:
        res["ops"] = survey_functions(op_cases())
    models = {}
    if "torchvision" in only:
        models.update(torchvision_cases())
    if "timm" in only:
        models.update(timm_cases())
    if args.models:
        keys = args.models.split(",")
        models = {k: v for k, v in models.items() if any(q in k for q in keys)}
    if models:
        res["models"] = survey_models(models, args.limit)
    out = Path(args.out)
    if args.merge and out.with_suffix(".json").exists():
        old = json.loads(out.with_suffix(".json").read_text())
        for section in ("activations", "ops", "models"):
            old.setdefault(section, {}).update(res.get(section, {}))
        old["versions"] = res["versions"]
        res = old
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    write_md(res, out.with_suffix(".md"))
    print(f"wrote {out}.json / .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
