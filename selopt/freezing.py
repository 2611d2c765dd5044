"""Freezing parameters by layer and module name: what :mod:`selopt.hft` and :mod:`selopt.cofi` share.

Both methods pick parameters by where they sit in a transformer: the layer
index in the parameter name (:func:`layer_index`, with a regex from
:func:`compile_layer_pattern`) and the module name inside that layer
(:func:`member_regex`). Both then set ``requires_grad`` and report what trains
(:func:`apply_trainable`, :class:`FreezeReport`), and both raise the same
error, naming the model's parameters, when their patterns match nothing
(:func:`no_match_error`).

>>> layer_regex = compile_layer_pattern(DEFAULT_LAYER_PATTERN)
>>> name = "model.layers.3.self_attn.q_proj.weight"
>>> layer_index(name, layer_regex), bool(member_regex("q_proj").search(name))
(3, True)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

# Matches the layer index in Hugging Face names: "model.layers.3.", "transformer.h.3.",
# "encoder.layer.3.", "blocks.3.". The first match in a name is its layer.
DEFAULT_LAYER_PATTERN = r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\."


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


def member_regex(member: str) -> re.Pattern:
    """The regex that finds module ``member`` (itself a regex) as one dotted component of a parameter name.

    >>> regex = member_regex("q_proj")
    >>> bool(regex.search("model.layers.0.self_attn.q_proj.weight")), bool(regex.search("layers.0.q_proj_extra.weight"))
    (True, False)
    """
    return re.compile(rf"(?:^|\.)(?:{member})(?:\.|$)")


def compile_layer_pattern(layer_pattern: str) -> re.Pattern:
    """Compile ``layer_pattern``, checked to be a regex whose first group captures the layer index.

    >>> compile_layer_pattern(r"\\.h\\.(\\d+)\\.").groups
    1
    """
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
    """The layer a parameter or module name belongs to, or None outside the layer stack.

    >>> regex = compile_layer_pattern(DEFAULT_LAYER_PATTERN)
    >>> layer_index("transformer.h.5.mlp.c_fc.weight", regex), layer_index("lm_head.weight", regex)
    (5, None)
    """
    match = layer_regex.search(name)
    return int(match.group(1)) if match else None


def no_match_error(model: torch.nn.Module, what: str) -> ValueError:
    """The error for patterns that match no parameter of ``model``: it names the first parameters and the fix.

    >>> str(no_match_error(torch.nn.Linear(2, 2), "the patterns")).split(". Pass")[0]
    "no parameter of the model matches the patterns; first parameter names: ['weight', 'bias']"
    """
    names = [name for name, _ in model.named_parameters()][:6]
    return ValueError(
        f"no parameter of the model matches {what}; first parameter names: {names}. "
        "Pass patterns={'attention': [...], 'ffn': [...], 'norm': [...]} with the model's module names "
        "and layer_pattern=r'...\\.(\\d+)\\.' capturing its layer index."
    )


def apply_trainable(model: torch.nn.Module, trains, layers: dict[int, dict[str, list[str]]]) -> FreezeReport:
    """Set ``requires_grad`` from ``trains(name) -> bool`` and report the result; ``layers`` goes into the report.

    >>> report = apply_trainable(torch.nn.Linear(2, 2), lambda name: name == "weight", {})
    >>> report.trainable, report.frozen, report.trainable_numel, report.total_numel
    (['weight'], ['bias'], 4, 6)
    """
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
