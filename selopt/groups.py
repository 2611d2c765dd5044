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


def dense_vectors(params) -> list[dict]:
    """``params`` (tensors or param groups) with each group's tensors of fewer than 2 dims moved to a dense group.

    Each group is split in two, keeping its options: tensors with 2 or more
    dims, and the rest (biases, norm weights) with ``fraction=1.0``. Empty
    parts are dropped. This is :func:`param_groups`' rule applied to groups
    someone else built, such as ``transformers.Trainer``'s.

    >>> model = torch.nn.Linear(4, 3)
    >>> [(len(g["params"]), g.get("fraction")) for g in dense_vectors([{"params": model.parameters(), "lr": 0.1}])]
    [(1, None), (1, 1.0)]
    """
    params = list(params)
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    split = []
    for group in groups:
        tensors = group["params"]
        tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
        # Named parameters come as (name, tensor) pairs, or with their names in "param_names".
        is_matrix = [(p[1] if isinstance(p, tuple) else p).dim() >= 2 for p in tensors]
        for matrices, options in ((True, {}), (False, {"fraction": 1.0})):
            part = {**group, **options, "params": [p for p, m in zip(tensors, is_matrix) if m == matrices]}
            if "param_names" in group:
                part["param_names"] = [n for n, m in zip(group["param_names"], is_matrix) if m == matrices]
            split.append(part)
    return [group for group in split if group["params"]]
