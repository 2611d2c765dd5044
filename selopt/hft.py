"""HFT, Half Fine-Tuning (Hui et al., arXiv 2404.18466, ACL 2025): freeze half of each layer.

For one training stage, each transformer layer trains 2 of its 4 attention
projections, 2 of its 3 FFN projections in a random half of the layers and 1
in the other half, and 1 of its 2 norms; embeddings and the LM head keep
training. The frozen half keeps what the model knew; the trained half learns
the new task. The choice is uniform and seeded, and is drawn again (new seed)
for every stage: SFT, then DPO, then each continual-learning task.

Freezing is ``requires_grad=False``, not a mask in the optimizer: frozen
weights cost no weight-gradient GEMM, no optimizer state and no step, which is
where the paper's ~30% training-time saving comes from. Pass the trainable
parameters (or :func:`selopt.param_groups`, which skips frozen ones) to the
optimizer after :func:`freeze_half`, and switch stages with
:func:`next_stage`, which also brings the optimizer to the new trainable set.

The layer-wise bookkeeping (which parameters belong to which layer and module,
freezing and its report) lives in :mod:`selopt.freezing`, shared with
:mod:`selopt.cofi`.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping, Sequence

import torch

from selopt.freezing import (
    DEFAULT_LAYER_PATTERN,
    FreezeReport,
    apply_trainable,
    compile_layer_pattern,
    layer_index,
    member_regex,
    no_match_error,
)

# Module names of Llama, Qwen2 and Mistral (and most of their derivatives).
DEFAULT_PATTERNS: dict[str, tuple[str, ...]] = {
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "ffn": ("gate_proj", "up_proj", "down_proj"),
    "norm": ("input_layernorm", "post_attention_layernorm"),
}


def compile_patterns(patterns: Mapping[str, Sequence[str]] | None) -> dict[str, list[tuple[str, re.Pattern]]]:
    """Validate ``patterns`` (category -> member name patterns) and compile each member."""
    if patterns is None:
        patterns = DEFAULT_PATTERNS
    if not isinstance(patterns, Mapping) or not patterns:
        raise TypeError(f"patterns must be a non-empty mapping of category -> member names, got {patterns!r}")
    compiled = {}
    for category, members in patterns.items():
        if not isinstance(category, str):
            raise TypeError(f"patterns keys must be category names (str), got {category!r}")
        if isinstance(members, str) or not isinstance(members, Sequence) or not members:
            raise TypeError(f"patterns[{category!r}] must be a non-empty sequence of names, got {members!r}")
        compiled[category] = []
        for member in members:
            if not isinstance(member, str) or not member:
                raise TypeError(f"patterns[{category!r}] must hold non-empty strings, got {member!r}")
            try:
                compiled[category].append((member, member_regex(member)))
            except re.error as err:
                raise ValueError(f"patterns[{category!r}] entry {member!r} is not a valid regex: {err}") from None
    return compiled


def classify(
    name: str, layer_regex: re.Pattern, compiled: dict[str, list[tuple[str, re.Pattern]]]
) -> tuple[int, str, str] | None:
    """``(layer, category, member)`` of a parameter name, or None if it is outside every category."""
    index = layer_index(name, layer_regex)
    if index is None:
        return None
    hits = [(cat, member) for cat, members in compiled.items() for member, regex in members if regex.search(name)]
    if not hits:
        return None
    if len(hits) > 1:
        raise ValueError(f"parameter {name!r} matches several patterns {hits}: make the patterns disjoint")
    return (index, *hits[0])


def freeze_half(
    model: torch.nn.Module,
    seed: int = 0,
    patterns: Mapping[str, Sequence[str]] | None = None,
    *,
    layer_pattern: str = DEFAULT_LAYER_PATTERN,
    train_others: bool = True,
) -> FreezeReport:
    """Freeze half of every layer's parameters, chosen at random per layer and category (HFT).

    In each layer and category with ``n`` members found, ``n // 2`` members
    train when ``n`` is even; when it is odd, ``n // 2 + 1`` train in a random
    half of the layers and ``n // 2`` in the rest. With the default patterns
    that is 2 of q/k/v/o, 2 or 1 of gate/up/down and 1 of the 2 norms. All
    parameters of a chosen module (weight and bias) train together.

    This is the first stage. For the next ones, while an optimizer built over
    the trainable parameters exists, use :func:`next_stage`: it also makes the
    optimizer step the newly unfrozen parameters, which it would otherwise
    leave untrained without a word.

    Args:
        model: any module; its parameters' ``requires_grad`` is set in place.
        seed: the draw; use a new seed for each training stage.
        patterns: category -> member module names (regexes matched against
            one dotted component of the parameter name). Defaults to the
            Hugging Face Llama/Qwen/Mistral names in :data:`DEFAULT_PATTERNS`.
        layer_pattern: regex whose first group is the layer index.
        train_others: parameters outside every category (embeddings, LM head,
            final norm) train if True, else they are frozen.

    Returns:
        A :class:`FreezeReport` of the trainable names and fractions.

    Raises:
        ValueError: if no parameter matches the patterns.

    Example:
        >>> model = tiny_llama(layers=2)
        >>> report = freeze_half(model, seed=0)   # stage 1 (SFT)
        >>> print(report)
        12 trainable / 21 tensors, 59.5% of entries, 59.5% of bytes
          layer 0: attention: q_proj, k_proj; ffn: up_proj; norm: input_layernorm
          layer 1: attention: k_proj, o_proj; ffn: gate_proj, up_proj; norm: input_layernorm
        >>> opt = selopt.AdamW(selopt.param_groups(model))
    """
    return apply_trainable(model, *_draw_half(model, seed, patterns, layer_pattern, train_others))


def _draw_half(model, seed, patterns, layer_pattern, train_others):
    """HFT's draw for ``model``: ``(trains(name) -> bool, chosen members per layer)``; changes nothing."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not isinstance(train_others, bool):
        raise TypeError(f"train_others must be a bool, got {train_others!r}")
    compiled = compile_patterns(patterns)
    layer_regex = compile_layer_pattern(layer_pattern)

    found: dict[int, dict[str, list[str]]] = {}
    where: dict[str, tuple[int, str, str]] = {}
    for name, _ in model.named_parameters():
        hit = classify(name, layer_regex, compiled)
        if hit is None:
            continue
        where[name] = hit
        index, category, member = hit
        members = found.setdefault(index, {cat: [] for cat in compiled}).setdefault(category, [])
        if member not in members:
            members.append(member)
    if not found:
        raise no_match_error(model, f"the patterns {dict(patterns or DEFAULT_PATTERNS)} inside layers")

    rng = random.Random(seed)
    layer_ids = sorted(found)
    chosen: dict[int, dict[str, list[str]]] = {index: {} for index in layer_ids}
    for category, members in compiled.items():
        order = [member for member, _ in members]
        # Odd-sized categories: which layers round up is itself a uniform draw
        # of half the layers (one more at random when the count is odd).
        rounds_up = set(rng.sample(layer_ids, len(layer_ids) // 2 + (rng.random() < 0.5) * (len(layer_ids) % 2)))
        for index in layer_ids:
            present = sorted(found[index].get(category, []), key=order.index)
            n_train = len(present) // 2 + (len(present) % 2 if index in rounds_up else 0)
            picked = set(rng.sample(present, n_train))
            chosen[index][category] = [member for member in present if member in picked]

    def trains(name: str) -> bool:
        if name not in where:
            return train_others
        index, category, member = where[name]
        return member in chosen[index][category]

    return trains, chosen


def next_stage(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    seed: int,
    patterns: Mapping[str, Sequence[str]] | None = None,
    *,
    layer_pattern: str = DEFAULT_LAYER_PATTERN,
    train_others: bool = True,
    keep_state: bool = False,
    group_of: Callable[[str, torch.nn.Parameter], int] | None = None,
) -> FreezeReport:
    """Start the next HFT stage: a new draw, and ``optimizer`` made to step exactly the new trainable half.

    HFT draws a new frozen half for each stage (SFT, then DPO, then each
    continual-learning task). An optimizer built over stage 1's trainable
    parameters does not hold the ones a new draw unfreezes, so calling
    :func:`freeze_half` again would leave them untrained, silently. This call
    redraws (as :func:`freeze_half` with the same arguments) and then:

    - parameters of ``model`` that are now frozen leave their param groups,
      with their optimizer state (and soft mask), so they cost no memory;
    - newly trainable ones join the param group that holds the parameters of
      their kind: matrices (2 dims or more) or vectors (biases, norm weights),
      as :func:`selopt.param_groups` and :func:`selopt.hf.trainer_param_groups`
      group them; a single group takes everything. When that is ambiguous
      (several groups hold matrices, say), ``group_of(name, param)`` must
      give the group index;
    - ``keep_state=False`` (default) clears the optimizer state of the
      model's parameters: each stage starts as a new optimizer would, which
      is what a new training stage is. ``keep_state=True`` keeps the moments
      and step counts of parameters that train in both stages.

    Parameter groups keep their options (lr, weight decay, selection), so an
    lr scheduler attached to ``optimizer`` keeps working. Everything is
    checked before anything changes.

    Example:
        >>> model = tiny_llama(layers=2)
        >>> stage1 = freeze_half(model, seed=0)                            # SFT
        >>> opt = selopt.AdamW(selopt.param_groups(model, fraction=1.0))
        >>> stage2 = next_stage(model, opt, seed=1)                        # DPO: a new draw
        >>> held = {id(p) for group in opt.param_groups for p in group["params"]}
        >>> held == {id(p) for p in model.parameters() if p.requires_grad}
        True
    """
    _check_stage_arguments(optimizer, keep_state, group_of)
    trains, chosen = _draw_half(model, seed, patterns, layer_pattern, train_others)
    joining = _joining(model, optimizer.param_groups, trains, group_of)  # raises before anything changes
    report = apply_trainable(model, trains, chosen)
    _drop_params(optimizer, {id(p) for p in model.parameters() if not p.requires_grad})
    for index, name, param in joining:
        group = optimizer.param_groups[index]
        group["params"].append(param)
        if "param_names" in group:
            group["param_names"].append(name)
    if not keep_state:
        for param in model.parameters():
            optimizer.state.pop(param, None)
    return report


def _check_stage_arguments(optimizer, keep_state, group_of) -> None:
    """Type checks of :func:`next_stage`'s arguments beyond those of the draw."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if not isinstance(keep_state, bool):
        raise TypeError(f"keep_state must be a bool, got {keep_state!r}")
    if group_of is not None and not callable(group_of):
        raise TypeError(f"group_of must be None or a callable (name, param) -> group index, got {group_of!r}")


def _joining(model, groups: list[dict], trains, group_of) -> list[tuple[int, str, torch.nn.Parameter]]:
    """``(group index, name, param)`` of each parameter that trains but no group holds yet; checks ``group_of``."""
    held = {id(p) for group in groups for p in group["params"]}
    joining = []
    for name, param in model.named_parameters():
        if trains(name) and id(param) not in held:
            index = _group_for(groups, name, param) if group_of is None else group_of(name, param)
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(groups):
                raise ValueError(f"group_of({name!r}, param) must be a group index in [0, {len(groups)}), got {index!r}")
            joining.append((index, name, param))
    return joining


def _drop_params(optimizer: torch.optim.Optimizer, leaving: set[int]) -> None:
    """Take the parameters whose ids are in ``leaving`` out of their groups, with their state and soft mask."""
    for group in optimizer.param_groups:
        kept = [i for i, p in enumerate(group["params"]) if id(p) not in leaving]
        for p in group["params"]:
            if id(p) in leaving:
                optimizer.state.pop(p, None)
                if callable(getattr(optimizer, "set_soft_mask", None)):
                    optimizer.set_soft_mask(p, None)
        group["params"] = [group["params"][i] for i in kept]
        if "param_names" in group:
            group["param_names"] = [group["param_names"][i] for i in kept]


def _group_for(groups: list[dict], name: str, param: torch.Tensor) -> int:
    """The one param group holding parameters of ``param``'s kind (matrix or vector); raises if there is not one."""
    if len(groups) == 1:
        return 0
    kind = "matrices" if param.dim() >= 2 else "vectors (fewer than 2 dims)"
    candidates = [i for i, group in enumerate(groups) if any((p.dim() >= 2) == (param.dim() >= 2) for p in group["params"])]
    if len(candidates) != 1:
        raise ValueError(
            f"cannot tell which param group {name!r} joins: {len(candidates)} of the optimizer's {len(groups)} groups "
            f"hold {kind}; pass group_of=lambda name, param: <group index>"
        )
    return candidates[0]
