"""What a loss's autograd graph rules out before anything runs: custom ``autograd.Function`` s
without a second derivative, without forward mode or vmap rules, reentrant checkpointing."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class GraphReport:
    """Custom ``autograd.Function`` s found in a loss's graph, by what they lack."""

    once_differentiable: list[str] = field(default_factory=list)
    #: no ``setup_context`` (ctx as forward's first argument) or no ``jvp``: torch.func's
    #: forward mode cannot run them
    no_forward_mode: list[str] = field(default_factory=list)
    #: no vmap rule: a vmapped forward-mode backbone cannot run them
    no_vmap: list[str] = field(default_factory=list)
    reentrant_checkpoint: bool = False

    def forward_blockers(self) -> dict[str, str]:
        """Backbone name -> why it cannot work, known before running it."""
        out = {}
        if self.no_forward_mode:
            why = (f"custom autograd.Function(s) {self.no_forward_mode} lack setup_context or jvp: "
                   "torch.func's forward mode cannot run them")
            out["forward"] = out["forward-vmap"] = why
        elif self.no_vmap:
            out["forward-vmap"] = f"custom autograd.Function(s) {self.no_vmap} have no vmap rule"
        return out


def _overrides(cls, name: str) -> bool:
    base = getattr(torch.autograd.function, "_SingleLevelFunction", torch.autograd.Function)
    return getattr(cls, name, None) is not getattr(base, name, None)


def inspect_graph(loss: torch.Tensor) -> GraphReport:
    """Walk the graph of ``loss`` once and report its custom ``autograd.Function`` s."""
    rep = GraphReport()
    seen: set[int] = set()
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        cls = getattr(node, "_forward_cls", None)
        if cls is not None:
            name = cls.__name__
            if name == "CheckpointFunction" and cls.__module__.startswith("torch.utils.checkpoint"):
                rep.reentrant_checkpoint = True
            if hasattr(getattr(cls, "backward", None), "__wrapped__") and name not in rep.once_differentiable:
                rep.once_differentiable.append(name)
            if not (_overrides(cls, "setup_context") and _overrides(cls, "jvp")):
                if name not in rep.no_forward_mode:
                    rep.no_forward_mode.append(name)
            elif not (getattr(cls, "generate_vmap_rule", False) or _overrides(cls, "vmap")):
                if name not in rep.no_vmap:
                    rep.no_vmap.append(name)
        stack.extend(nxt for nxt, _ in node.next_functions)
    return rep


def once_differentiable_functions(loss: torch.Tensor) -> list[str]:
    """Names of custom autograd.Functions with a ``@once_differentiable`` backward in the
    graph of ``loss``. Their gradients are detached by PyTorch, so a double backward through
    them returns zero curvature instead of failing."""
    return inspect_graph(loss).once_differentiable
