"""The layer of a local Hessian and its block input ``z_i`` (docs/maths.md section 7).

``LH_i`` holds the block input ``z_i`` fixed. It is captured by a forward hook during one
``model(inputs)`` under ``torch.no_grad`` and :class:`~hutchtrace.core.state.PreservedState`
(no parameter, buffer, mode or RNG change), detached from the model. A layer that runs zero
times or more than once in that forward has no single ``z_i`` and is refused.

Example:
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> x = torch.randn(5, 3)
    >>> (z,), kwargs = capture_block_inputs(net, x, ["2"])["2"]
    >>> torch.equal(z, torch.tanh(net[0](x))), kwargs
    (True, {})
"""

from __future__ import annotations

import torch
from torch import nn

from ...core.errors import BlockSpecError
from ...core.state import PreservedState
from ...problem.blocks import unwrap_model
from ...problem.loss import call_model
from .errors import LocalHessianError

__all__ = ["capture_block_inputs", "capture_forward", "layer_and_name", "trainable_parameters"]


def layer_and_name(model: nn.Module, layer) -> tuple[nn.Module, str]:
    """``(module, its name in model)`` for a submodule or a submodule's name."""
    if isinstance(layer, str):
        try:
            return model.get_submodule(layer), layer
        except AttributeError:
            names = [n for n, _ in model.named_modules() if n][:12]
            raise BlockSpecError(
                f"the model has no submodule named {layer!r}; pass a module or one of its names, e.g. {names}"
            ) from None
    if isinstance(layer, nn.Module):
        for name, m in model.named_modules():
            if m is layer:
                return m, name
        raise BlockSpecError(
            f"the layer {type(layer).__name__} is not a submodule of the model; pass a module of the model "
            "(or its name), or call local_hessian(layer, block_input, layer) to give the block input directly"
        )
    raise TypeError(f"layer must be an nn.Module or a module name, got {type(layer).__name__}")


def trainable_parameters(layer: nn.Module, name: str) -> list[tuple[str, torch.Tensor]]:
    """``theta_i``: the layer's ``(name, parameter)`` pairs that require grad (BlockSpecError if none)."""
    params = [(n, p) for n, p in layer.named_parameters() if p.requires_grad]
    if not params:
        what = "has no parameters" if not list(layer.parameters()) else "has only frozen parameters"
        raise BlockSpecError(
            f"layer {name or '(model)'!r} ({type(layer).__name__}) {what}, so it has no local Hessian. "
            "Pass the parameterised layer (an nn.Linear / nn.Conv2d / any module with trainable parameters); "
            "its activation is found automatically when it follows in an nn.Sequential, or pass activation="
        )
    return params


def _detach(obj):
    if torch.is_tensor(obj):
        return obj.detach()
    if isinstance(obj, (tuple, list)):
        return type(obj)(_detach(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _detach(v) for k, v in obj.items()}
    return obj


def capture_block_inputs(model: nn.Module, inputs, layers) -> dict[str, tuple[tuple, dict]]:
    """Run ``model(inputs)`` once and return each layer's block input ``(args, kwargs)``.

    The forward runs under ``torch.no_grad`` inside :class:`~hutchtrace.core.state.PreservedState`
    (no parameter, buffer, mode or RNG change); the model's current train/eval mode is used.
    Raises :class:`LocalHessianError` when a layer runs zero times or more than once.
    """
    return capture_forward(model, inputs, layers)[0]


def capture_forward(model: nn.Module, inputs, layers):
    """``(block inputs by layer name, model output)`` from one no-grad forward."""
    model = unwrap_model(model)
    resolved = [layer_and_name(model, layer) for layer in layers]
    seen: dict[str, list] = {name: [] for _, name in resolved}
    handles = []

    def hook_for(name):
        def hook(module, args, kwargs, output):
            seen[name].append((_detach(args), _detach(kwargs)))

        return hook

    try:
        for mod, name in resolved:
            handles.append(mod.register_forward_hook(hook_for(name), with_kwargs=True))
        with PreservedState(model), torch.no_grad():
            output = call_model(model, inputs)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for mod, name in resolved:
        calls = seen[name]
        if not calls:
            raise LocalHessianError(
                f"layer {name!r} did not run in model(inputs); its block input z_i is undefined. Check the "
                "layer name and that the forward uses it"
            )
        if len(calls) > 1:
            raise LocalHessianError(
                f"layer {name!r} ran {len(calls)} times in one forward (a reused module); LH_i is "
                "defined for one block input. Capture the input you want and call "
                "local_hessian(layer, z, layer)"
            )
        out[name] = calls[0]
    return out, _detach(output)
