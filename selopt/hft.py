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
optimizer after the call.

The layer-wise bookkeeping (which parameters belong to which layer and module)
is shared with :mod:`selopt.cofi`.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

# Matches the layer index in Hugging Face names: "model.layers.3.", "transformer.h.3.",
# "encoder.layer.3.", "blocks.3.". The first match in a name is its layer.
DEFAULT_LAYER_PATTERN = r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\."

# Module names of Llama, Qwen2 and Mistral (and most of their derivatives).
DEFAULT_PATTERNS: dict[str, tuple[str, ...]] = {
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "ffn": ("gate_proj", "up_proj", "down_proj"),
    "norm": ("input_layernorm", "post_attention_layernorm"),
}


@dataclass
class FreezeReport:
    """What a freezing call left trainable; ``print(report)`` gives a summary.

    ``layers`` maps each layer index to the trainable members of each category,
    e.g. ``{0: {"attention": ["k_proj", "o_proj"], "ffn": ["up_proj"], ...}}``.
    """

    trainable: list[str]
    frozen: list[str]
    trainable_numel: int
    total_numel: int
    trainable_bytes: int
    total_bytes: int
    layers: dict[int, dict[str, list[str]]] = field(default_factory=dict)

    @property
    def fraction_by_count(self) -> float:
        """Share of parameter entries that train."""
        return self.trainable_numel / self.total_numel if self.total_numel else 0.0

    @property
    def fraction_by_bytes(self) -> float:
        """Share of parameter bytes that train (differs from the count with mixed dtypes)."""
        return self.trainable_bytes / self.total_bytes if self.total_bytes else 0.0

    def __str__(self) -> str:
        lines = [
            f"{len(self.trainable)} trainable / {len(self.trainable) + len(self.frozen)} tensors, "
            f"{self.fraction_by_count:.1%} of entries, {self.fraction_by_bytes:.1%} of bytes"
        ]
        for index, categories in sorted(self.layers.items()):
            chosen = "; ".join(f"{cat}: {', '.join(members) or '-'}" for cat, members in categories.items())
            lines.append(f"  layer {index}: {chosen}")
        return "\n".join(lines)


def _member_regex(member: str) -> re.Pattern:
    # A member names one dotted component of the module path ("q_proj" matches
    # "model.layers.0.self_attn.q_proj.weight" but not "...q_proj_extra.weight").
    return re.compile(rf"(?:^|\.)(?:{member})(?:\.|$)")


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
                compiled[category].append((member, _member_regex(member)))
            except re.error as err:
                raise ValueError(f"patterns[{category!r}] entry {member!r} is not a valid regex: {err}") from None
    return compiled


def compile_layer_pattern(layer_pattern: str) -> re.Pattern:
    if not isinstance(layer_pattern, str):
        raise TypeError(f"layer_pattern must be a regex string, got {type(layer_pattern).__name__}")
    try:
        regex = re.compile(layer_pattern)
    except re.error as err:
        raise ValueError(f"layer_pattern {layer_pattern!r} is not a valid regex: {err}") from None
    if regex.groups < 1:
        raise ValueError(f"layer_pattern must capture the layer index in its first group, got {layer_pattern!r}")
    return regex


def layer_index(name: str, layer_regex: re.Pattern) -> int | None:
    """The layer a parameter or module name belongs to, or None outside the layer stack."""
    match = layer_regex.search(name)
    return int(match.group(1)) if match else None


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


def _no_match_error(model: torch.nn.Module, what: str) -> ValueError:
    names = [name for name, _ in model.named_parameters()][:6]
    return ValueError(
        f"no parameter of the model matches {what}; first parameter names: {names}. "
        "Pass patterns={'attention': [...], 'ffn': [...], 'norm': [...]} with the model's module names "
        "and layer_pattern=r'...\\.(\\d+)\\.' capturing its layer index."
    )


def apply_trainable(model: torch.nn.Module, trains, layers: dict[int, dict[str, list[str]]]) -> FreezeReport:
    """Set ``requires_grad`` from ``trains(name) -> bool`` and report the result."""
    trainable, frozen = [], []
    counts = {"trainable_numel": 0, "total_numel": 0, "trainable_bytes": 0, "total_bytes": 0}
    for name, param in model.named_parameters():
        on = bool(trains(name))
        param.requires_grad_(on)
        (trainable if on else frozen).append(name)
        numel, nbytes = param.numel(), param.numel() * param.element_size()
        counts["total_numel"] += numel
        counts["total_bytes"] += nbytes
        if on:
            counts["trainable_numel"] += numel
            counts["trainable_bytes"] += nbytes
    return FreezeReport(trainable=trainable, frozen=frozen, layers=layers, **counts)


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
        >>> freeze_half(model, seed=1).layers != report.layers   # stage 2 (DPO): a new draw
        True
    """
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
        raise _no_match_error(model, f"the patterns {dict(patterns or DEFAULT_PATTERNS)} inside layers")

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

    return apply_trainable(model, trains, chosen)
