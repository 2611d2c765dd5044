"""Param-group helpers: the usual split into selective matrices and dense vectors."""

from __future__ import annotations

import torch


def param_groups(model: torch.nn.Module, weight_decay: float = 1e-2, fraction: float = 0.15, **options) -> list[dict]:
    """Two param groups: matrices decay and are selective, 1-D tensors are dense without decay.

    Biases and norm weights are few and are not what a model forgets through,
    so they train densely, and weight decay on them is the usual mistake.
    ``options`` (e.g. ``block_size=4096``) go to the selective group. Frozen
    parameters are left out; empty groups are dropped.

    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    >>> groups = param_groups(model, weight_decay=0.1, fraction=0.2)
    >>> [(len(g["params"]), g["weight_decay"], g["fraction"]) for g in groups]
    [(1, 0.1, 0.2), (3, 0.0, 1.0)]
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    return two_groups(
        [p for p in trainable if p.dim() >= 2], [p for p in trainable if p.dim() < 2], weight_decay, fraction, **options
    )


def two_groups(selective: list, dense: list, weight_decay: float, fraction: float, **options) -> list[dict]:
    """The selective group (decay, ``fraction``, ``options``) and the dense one (no decay); empty ones dropped."""
    groups = (
        {"params": selective, "weight_decay": weight_decay, "fraction": fraction, **options},
        {"params": dense, "weight_decay": 0.0, "fraction": 1.0},
    )
    return [g for g in groups if g["params"]]
