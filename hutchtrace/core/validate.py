"""Argument checks shared by every public estimator (one message per mistake, everywhere)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["PROBE_KINDS", "draw_seed", "resolve_seed", "check_probe_kind", "check_level", "check_model"]

PROBE_KINDS = ("rademacher", "gaussian")


def draw_seed() -> int:
    """A fresh 63-bit seed from OS entropy, via a private ``torch.Generator`` (never the global RNG)."""
    g = torch.Generator()
    return int(g.seed()) & ((1 << 63) - 1)


def resolve_seed(seed) -> int:
    """``seed`` validated as an int in [0, 2^63), or a fresh one for ``None``."""
    if seed is None:
        return draw_seed()
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63) or None, got {seed!r}")
    return seed


def check_probe_kind(probe) -> str:
    if probe not in PROBE_KINDS:
        raise ValueError(f"probe must be one of {PROBE_KINDS}, got {probe!r}")
    return probe


def check_level(level) -> float:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    return level


def check_model(model) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model
