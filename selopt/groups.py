"""Param-group helpers: the usual split into selective matrices and dense vectors."""

from __future__ import annotations

import torch


def param_groups(model: torch.nn.Module, weight_decay: float | None = None, fraction: float | None = None,
                 **options) -> list[dict]:
    """Two param groups: matrices (the optimizer's settings), then 1-D tensors (dense, no weight decay).

    Biases and norm weights are few and are not what a model forgets through,
    so they train densely (``fraction=1.0``), and weight decay on them is the
    usual mistake (``weight_decay=0.0``). That is all this sets: the matrix
    group gets ``weight_decay``, ``fraction`` and ``options`` (e.g.
    ``block_size=4096``) only when they are given, and otherwise takes the
    optimizer's own arguments, so ``selopt.AdamW(param_groups(model))`` is
    AdamW and ``selopt.MoFO(param_groups(model), fraction=0.3)`` moves 30%.
    Frozen parameters are left out; empty groups are dropped.

    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    >>> opt = selopt.MoFO(param_groups(model), fraction=0.2, weight_decay=0.1)
    >>> [(len(g["params"]), g["weight_decay"], g["fraction"]) for g in opt.param_groups]
    [(1, 0.1, 0.2), (3, 0.0, 1.0)]
    >>> [sorted(g) for g in param_groups(model, weight_decay=0.05)]
    [['params', 'weight_decay'], ['fraction', 'params', 'weight_decay']]
    """
    require_module("param_groups", model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return two_groups(
        [p for p in trainable if p.dim() >= 2], [p for p in trainable if p.dim() < 2], weight_decay, fraction, **options
    )


def require_module(function: str, model) -> None:
    """Refuse anything but an ``nn.Module``: the split needs the module (``model.parameters()`` is not enough)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            f"{function} wants the model, an nn.Module (it reads which parameters are trainable and their shapes), "
            f"got {type(model).__name__}: pass `model`, not `model.parameters()`"
        )


def two_groups(selective: list, dense: list, weight_decay: float | None, fraction: float | None,
               **options) -> list[dict]:
    """The selective group (``weight_decay``, ``fraction`` where given, and ``options``) and the dense one
    (``fraction=1.0``, no decay); empty ones dropped. A setting not given is left to the optimizer."""
    given = {key: value for key, value in (("weight_decay", weight_decay), ("fraction", fraction)) if value is not None}
    groups = (
        {"params": selective, **given, **options},
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
