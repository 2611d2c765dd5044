"""CoFiTune (Zhang et al., arXiv 2404.10306, ACL 2024 Findings): coarse-to-fine fine-tuning.

Coarse: only chosen module kinds (by default the FFN's ``up_proj`` and
``down_proj``) in a chosen span of layers train; everything else, embeddings
and head included, is frozen (:func:`freeze_coarse`). The paper searches the
span and modules for the best trade-off between *speciality* (the new task)
and *versatility* (what the model could do before); :func:`search` runs that
search with the user's training and evaluation callbacks. Its choice for
Llama-style models is the second quarter of depth (``"bottom2"``).

Fine: inside the trainable modules, units that matter for general ability
move less. :func:`importance` scores FFN intermediate neurons, hidden output
dimensions and attention heads by the gradient, with respect to all-ones
"gates" on those units, of a label-free KL divergence between two dropout
forward passes on general data; per layer the scores become ``|tanh(z)|``
in [0, 1). :func:`attach_soft_masks` gives the optimizer ``1 - importance``
per output row of ``up_proj`` (intermediate), ``down_proj`` (hidden) and
``q_proj``/``k_proj``/``v_proj`` (the rows of each head); ``o_proj`` stays
unmasked, as in the official code.

How this differs from the official code (github.com/rattlesnakey/CoFiTune),
on purpose:

- The official code multiplies *gradients* by the mask, tiled along
  DeepSpeed ZeRO's flat partition of each parameter. selopt scales the
  *update* by default (``mode="update"``): under Adam a constant factor on a
  row's gradient cancels between ``m`` and ``sqrt(v)`` except through eps, so
  a gradient mask barely acts; ``mode="grad"`` does what the official code
  does. Masks are given per row of the whole parameter; sharded parameters
  (FSDP2) take their slice on each rank (:mod:`selopt.distributed`).
- The official code accumulates the *signed* gate gradients, and never zeroes
  the gates' ``.grad`` between batches, so batch ``t`` of ``n`` is counted
  ``n - t + 1`` times and a unit's positive and negative contributions cancel.
  selopt sums ``|gradient|`` with every batch counted once: importance is the
  size of the loss's sensitivity to a unit, whatever its sign (the gradient
  head-importance of Michel et al., 2019, which the paper builds on, takes
  the absolute value too), and it must not depend on the batch order.
- The official loss is one-directional ``KL(p2 || p1)`` scaled by a
  temperature; selopt uses the symmetric KL, which does not depend on which
  of the two dropout passes comes first (the scale cancels in the z-score).
- With grouped-query attention the official mask (one row block per query
  head) does not fit ``k_proj``/``v_proj``; selopt gives each key/value head
  the mask of the most important query head it serves.

Typical use::

    report = cofi.freeze_coarse(model, layers="bottom2")
    scores = cofi.importance(model, general_batches)
    opt = selopt.AdamW(p for p in model.parameters() if p.requires_grad)
    cofi.attach_soft_masks(opt, model, scores)
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selopt.freezing import (
    DEFAULT_LAYER_PATTERN,
    FreezeReport,
    apply_trainable,
    compile_layer_pattern,
    layer_index,
    member_regex,
    no_match_error,
)
from selopt.wrappers import class_name, innermost

# Fractions of depth, [start, stop): the quarters the paper compares and the two halves.
LAYER_PRESETS: dict[str, tuple[float, float]] = {
    "bottom1": (0.0, 0.25),
    "bottom2": (0.25, 0.5),
    "middle": (0.5, 0.75),
    "top": (0.75, 1.0),
    "bottom_half": (0.0, 0.5),
    "top_half": (0.5, 1.0),
}
DEFAULT_MODULES = ("up_proj", "down_proj")
# Projections whose output rows belong to one attention head each (Hugging Face Llama/Qwen/Mistral names).
DEFAULT_ATTENTION_INPUTS = ("q_proj", "k_proj", "v_proj")
SOFT_MASK_MODES = ("update", "grad")
# Seconds between two progress lines of importance(); search() writes one line per candidate.
PROGRESS_EVERY_S = 10.0


class _Progress:
    """Progress lines on stderr, flushed, as ``bench/forgetting.py`` writes them: ``[what] ... (elapsed)``."""

    def __init__(self, what: str, enabled: bool):
        if not isinstance(enabled, bool):
            raise TypeError(f"progress must be a bool, got {enabled!r}")
        self.what, self.enabled = what, enabled
        self.started = self.last = time.perf_counter()

    def log(self, message: str) -> None:
        if self.enabled:
            self.last = time.perf_counter()
            print(f"[{self.what}] {message} ({self.last - self.started:.0f}s)", file=sys.stderr, flush=True)

    def due(self) -> bool:
        return self.enabled and time.perf_counter() - self.last >= PROGRESS_EVERY_S


def layer_range(layers: str | range | tuple[int, int], n_layers: int) -> range:
    """The layer indices a preset name, ``range`` or ``(start, stop)`` pair selects in a model of ``n_layers``.

    Preset bounds are ``floor(fraction * n_layers)``, so with 32 layers
    ``"bottom2"`` is layers 8-15.

    >>> layer_range("bottom2", 32)
    range(8, 16)
    >>> layer_range((2, 5), 32)
    range(2, 5)
    """
    if isinstance(layers, str):
        if layers not in LAYER_PRESETS:
            raise ValueError(f"layers must be one of {tuple(LAYER_PRESETS)}, a range or a (start, stop) pair, got {layers!r}")
        low, high = LAYER_PRESETS[layers]
        span = range(math.floor(low * n_layers), math.floor(high * n_layers))
        if not span:
            raise ValueError(f"layers={layers!r} selects no layer of a {n_layers}-layer model; give an explicit (start, stop)")
        return span
    if isinstance(layers, range):
        if layers.step != 1:
            raise ValueError(f"layers as a range must have step 1, got {layers!r}")
        start, stop = layers.start, layers.stop
    elif isinstance(layers, (tuple, list)) and len(layers) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
        start, stop = layers
    else:
        raise TypeError(f"layers must be a preset name, a range or a (start, stop) pair of ints, got {layers!r}")
    if not 0 <= start < stop <= n_layers:
        raise ValueError(f"layers (start, stop) must satisfy 0 <= start < stop <= {n_layers}, got ({start}, {stop})")
    return range(start, stop)


def _check_module_names(modules: Sequence[str], argument: str = "modules") -> tuple[str, ...]:
    if isinstance(modules, str) or not isinstance(modules, Sequence) or not modules:
        raise TypeError(f"{argument} must be a non-empty sequence of module names, got {modules!r}")
    for module in modules:
        if not isinstance(module, str) or not module:
            raise TypeError(f"{argument} must hold non-empty strings, got {module!r}")
    return tuple(modules)


def freeze_coarse(
    model: nn.Module,
    layers: str | range | tuple[int, int] = "bottom2",
    modules: Sequence[str] = DEFAULT_MODULES,
    *,
    layer_pattern: str = DEFAULT_LAYER_PATTERN,
) -> FreezeReport:
    """Train only ``modules`` inside the ``layers`` span; freeze everything else (CoFiTune's coarse step).

    Args:
        model: its parameters' ``requires_grad`` is set in place.
        layers: a preset of :data:`LAYER_PRESETS` (``"bottom1"`` 0-25% of depth,
            ``"bottom2"`` 25-50% (the paper's choice), ``"middle"`` 50-75%,
            ``"top"`` 75-100%, ``"bottom_half"``, ``"top_half"``), a ``range``
            or a ``(start, stop)`` pair of layer indices.
        modules: module names (regexes matched against one dotted component
            of the parameter name) that train inside the span.
        layer_pattern: regex whose first group is the layer index.

    Returns:
        A :class:`selopt.freezing.FreezeReport`; ``report.layers`` lists the trained
        modules of each layer in the span.

    Example:
        >>> model = tiny_llama(layers=8)
        >>> report = freeze_coarse(model, layers="bottom2", modules=("up_proj", "down_proj"))
        >>> report.trainable
        ['model.layers.2.mlp.up_proj.weight', 'model.layers.2.mlp.down_proj.weight', 'model.layers.3.mlp.up_proj.weight', 'model.layers.3.mlp.down_proj.weight']
        >>> opt = selopt.AdamW(p for p in model.parameters() if p.requires_grad)
    """
    modules = _check_module_names(modules)
    layer_regex = compile_layer_pattern(layer_pattern)
    names = [name for name, _ in model.named_parameters()]
    indices = [i for i in (layer_index(name, layer_regex) for name in names) if i is not None]
    if not indices:
        raise no_match_error(model, f"layer_pattern {layer_pattern!r}")
    span = layer_range(layers, max(indices) + 1)
    regexes = [(module, member_regex(module)) for module in modules]

    chosen: dict[int, dict[str, list[str]]] = {}
    trainable = set()
    for name in names:
        index = layer_index(name, layer_regex)
        if index is None or index not in span:
            continue
        for module, regex in regexes:
            if regex.search(name):
                trainable.add(name)
                found = chosen.setdefault(index, {"modules": []})["modules"]
                if module not in found:
                    found.append(module)
    if not trainable:
        raise no_match_error(model, f"modules {modules} in layers {span.start}-{span.stop - 1}")
    return apply_trainable(model, trainable.__contains__, dict(sorted(chosen.items())))


# ---------------------------------------------------------------------------------------------
# Coarse search


@dataclass(frozen=True)
class SearchResult:
    """One scored configuration; ``score = weight * speciality + (1 - weight) * versatility``."""

    config: dict
    speciality: float
    versatility: float
    score: float


def candidate_grid(
    layers: Iterable[str | range | tuple[int, int]] = ("bottom1", "bottom2", "middle", "top"),
    modules: Iterable[Sequence[str]] = (
        ("up_proj", "down_proj"),
        ("gate_proj", "up_proj", "down_proj"),
        ("q_proj", "k_proj", "v_proj", "o_proj"),
    ),
) -> list[dict]:
    """Every (layer span, module set) pair as a :func:`freeze_coarse` config, as the paper's search compares.

    >>> len(candidate_grid()), candidate_grid()[0]
    (12, {'layers': 'bottom1', 'modules': ('up_proj', 'down_proj')})
    """
    return [{"layers": span, "modules": tuple(kinds)} for span in layers for kinds in modules]


def _score(value, what: str, config: Mapping) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what} for config {dict(config)} must be a finite number, got {value!r}")
    return float(value)


def search(
    candidates: Sequence[Mapping],
    train_and_score: Callable[[dict], tuple[float, object]],
    versatility: Callable[[object], float],
    *,
    weight: float = 0.5,
    progress: bool = True,
) -> list[SearchResult]:
    """Train and score each candidate configuration; return them best first.

    Args:
        candidates: :func:`freeze_coarse` keyword dicts (``layers``, ``modules``),
            e.g. from :func:`candidate_grid`.
        train_and_score: ``config -> (speciality, trained)``: starts from the
            base model, calls ``freeze_coarse(model, **config)``, fine-tunes
            and returns the new-task score and whatever :func:`versatility`
            needs (the model, a checkpoint path...).
        versatility: ``trained -> score`` of general ability after fine-tuning.
        weight: share of speciality in the ranking score, in [0, 1]; both
            scores should be on the same scale (e.g. accuracies).
        progress: write a line to stderr when the search starts and after
            each candidate (its scores and the time so far), since each one
            is a fine-tune; ``False`` writes nothing.

    Example:
        >>> def finetune_and_eval(config):  # yours: train with freeze_coarse(model, **config), score the new task
        ...     return (1.0 if config["layers"] == "top" else 0.5), config
        >>> def eval_general(trained):      # yours: score general ability of what finetune_and_eval returned
        ...     return 0.9 if trained["layers"] == "bottom2" else 0.2
        >>> ranked = search(candidate_grid(), finetune_and_eval, eval_general, progress=False)
        >>> ranked[0].config["layers"]  # then: freeze_coarse(model, **ranked[0].config)
        'bottom2'
    """
    candidates = _check_search_arguments(candidates, train_and_score, versatility, weight)
    log = _Progress("cofi.search", progress)
    log.log(f"{len(candidates)} candidate configurations, one fine-tune each")
    results = []
    for number, config in enumerate(candidates, 1):
        results.append(_score_candidate(dict(config), train_and_score, versatility, weight))
        described = " ".join(f"{key}={value!r}" for key, value in results[-1].config.items())
        log.log(f"{number}/{len(candidates)} {described}: speciality {results[-1].speciality:.4g}, "
                f"versatility {results[-1].versatility:.4g}, score {results[-1].score:.4g}")
    # Stable sort: equal scores keep the candidates' order; versatility breaks ties first.
    return sorted(results, key=lambda r: (-r.score, -r.versatility))


def _check_search_arguments(candidates, train_and_score, versatility, weight) -> list:
    """:func:`search`'s arguments checked before any fine-tune starts; returns the candidates as a list."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be in [0, 1], got {weight!r}")
    if not callable(train_and_score) or not callable(versatility):
        raise TypeError("train_and_score and versatility must be callables")
    candidates = list(candidates)
    if not candidates:
        raise ValueError("candidates must hold at least one configuration")
    for config in candidates:
        if not isinstance(config, Mapping) or not set(config) <= {"layers", "modules"}:
            raise ValueError(f"each candidate must be a dict with keys among ('layers', 'modules'), got {config!r}")
        if "modules" in config:
            _check_module_names(config["modules"], "candidate modules")
        if isinstance(config.get("layers"), str) and config["layers"] not in LAYER_PRESETS:
            raise ValueError(f"candidate layers must be one of {tuple(LAYER_PRESETS)} or a span, got {config['layers']!r}")
    return candidates


def _score_candidate(config: dict, train_and_score, versatility, weight: float) -> SearchResult:
    """Fine-tune one configuration through the user's callbacks and score it."""
    outcome = train_and_score(config)
    if not isinstance(outcome, tuple) or len(outcome) != 2:
        raise TypeError(f"train_and_score must return (speciality, trained), got {type(outcome).__name__}")
    speciality = _score(outcome[0], "speciality", config)
    general = _score(versatility(outcome[1]), "versatility", config)
    return SearchResult(config, speciality, general, weight * speciality + (1 - weight) * general)


# ---------------------------------------------------------------------------------------------
# Fine: unit importance and soft masks


@dataclass
class Importance:
    """Per-layer unit importance in [0, 1), keyed by layer index.

    ``ffn``: FFN intermediate neurons (rows of ``up_proj``); ``hidden``: hidden
    output dimensions of the FFN (rows of ``down_proj``); ``heads``: attention
    heads (inputs of ``o_proj``).
    """

    ffn: dict[int, Tensor]
    hidden: dict[int, Tensor]
    heads: dict[int, Tensor]

    _KINDS = ("ffn", "hidden", "heads")

    def merge(self, *others: Importance) -> Importance:
        """Element-wise max with importances from other tasks (a unit matters if it matters anywhere)."""
        return merge_importance(self, *others)

    def save(self, path: str | os.PathLike) -> None:
        torch.save({kind: {i: t.cpu() for i, t in getattr(self, kind).items()} for kind in self._KINDS}, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Importance:
        data = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(data, dict) or set(data) != set(cls._KINDS):
            raise ValueError(f"{path} does not hold a selopt.cofi.Importance (keys {cls._KINDS})")
        return cls(**{kind: {int(i): t for i, t in data[kind].items()} for kind in cls._KINDS})


def merge_importance(*importances: Importance) -> Importance:
    """Element-wise max of importances computed on several tasks; layers and shapes must agree."""
    if not importances or not all(isinstance(x, Importance) for x in importances):
        raise TypeError("merge_importance takes one or more Importance objects")
    merged = {}
    for kind in Importance._KINDS:
        tables = [getattr(x, kind) for x in importances]
        if any(set(t) != set(tables[0]) for t in tables):
            raise ValueError(f"importances to merge cover different layers in {kind!r}")
        merged[kind] = {}
        for index in tables[0]:
            shapes = {tuple(t[index].shape) for t in tables}
            if len(shapes) != 1:
                raise ValueError(f"importances to merge have different shapes for {kind}[{index}]: {sorted(shapes)}")
            merged[kind][index] = torch.stack([t[index].cpu() for t in tables]).amax(dim=0)
    return Importance(**merged)


def normalize_per_layer(scores: Tensor) -> Tensor:
    """``|tanh(zscore)|`` of one layer's accumulated gradients: in [0, 1), 0 for a constant layer."""
    scores = scores.double()
    std = scores.std() if scores.numel() > 1 else scores.new_zeros(())
    if not std > 0:
        return torch.zeros_like(scores, dtype=torch.float32)
    return torch.tanh((scores - scores.mean()) / std).abs().float()


def _find_units(model: nn.Module, layer_regex, names: dict[str, str]) -> dict[int, dict[str, tuple[str, nn.Module]]]:
    found: dict[int, dict[str, tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules():
        index = layer_index(name + ".", layer_regex)
        last = name.rsplit(".", 1)[-1]
        for role, wanted in names.items():
            if index is not None and last == wanted:
                found.setdefault(index, {})[role] = (name, module)
    return found


def _num_heads(model: nn.Module, attention: nn.Module, num_heads: int | None) -> int:
    if num_heads is not None:
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
        return num_heads
    for owner in (attention, getattr(attention, "config", None), getattr(model, "config", None)):
        for attribute in ("num_heads", "num_attention_heads", "n_heads"):
            value = getattr(owner, attribute, None)
            if isinstance(value, int) and value > 0:
                return value
    raise ValueError("cannot tell the number of attention heads from the model: pass num_heads=")


def _logits(output) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"cannot find logits in the model output of type {type(output).__name__}")


def symmetric_kl(logits_a: Tensor, logits_b: Tensor, weights: Tensor | None = None) -> Tensor:
    """Mean over positions of ``(KL(a||b) + KL(b||a)) / 2`` between two predictive distributions."""
    log_a = F.log_softmax(logits_a.float(), dim=-1)
    log_b = F.log_softmax(logits_b.float(), dim=-1)
    per_position = 0.5 * ((log_a.exp() - log_b.exp()) * (log_a - log_b)).sum(-1)
    if weights is None:
        return per_position.mean()
    weights = weights.to(per_position)
    return (per_position * weights).sum() / weights.sum().clamp_min(1)


@contextlib.contextmanager
def _gate_hooks(
    model: nn.Module, units: dict[int, dict[str, tuple[str, nn.Module]]], dropout: float, num_heads: int | None
) -> Iterator[dict[str, dict[int, Tensor]]]:
    """All-ones gates on each layer's units, placed by forward hooks (input gates apply dropout too), removed on exit.

    Yields ``{"ffn": {layer: gate}, "hidden": {...}, "heads": {...}}``, layers in increasing order.
    """
    device = next(model.parameters()).device
    gates: dict[str, dict[int, Tensor]] = {"ffn": {}, "hidden": {}, "heads": {}}
    hooks = []

    def gate_input(gate: Tensor, groups: int):
        def hook(module, args):
            x = args[0]
            shaped = x.unflatten(-1, (groups, -1)) if groups > 0 else x
            shaped = F.dropout(shaped, dropout, training=True) if dropout else shaped
            scale = gate.to(x.dtype)[:, None] if groups > 0 else gate.to(x.dtype)
            return ((shaped * scale).flatten(-2) if groups > 0 else shaped * scale, *args[1:])
        return hook

    def gate_output(gate: Tensor):
        def hook(module, args, output):
            return output * gate.to(output.dtype)
        return hook

    try:
        for index, roles in sorted(units.items()):
            if "ffn_out" in roles:
                _, module = roles["ffn_out"]
                out_features, in_features = module.weight.shape
                gates["ffn"][index] = torch.ones(in_features, device=device, requires_grad=True)
                gates["hidden"][index] = torch.ones(out_features, device=device, requires_grad=True)
                hooks.append(module.register_forward_pre_hook(gate_input(gates["ffn"][index], 0)))
                hooks.append(module.register_forward_hook(gate_output(gates["hidden"][index])))
            if "attn_out" in roles:
                name, module = roles["attn_out"]
                parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
                heads = _num_heads(model, parent, num_heads)
                if module.weight.shape[1] % heads:
                    raise ValueError(f"{name} has {module.weight.shape[1]} inputs, not divisible by num_heads={heads}")
                gates["heads"][index] = torch.ones(heads, device=device, requires_grad=True)
                hooks.append(module.register_forward_pre_hook(gate_input(gates["heads"][index], heads)))
        yield gates
    finally:
        for hook in hooks:
            hook.remove()


def _accumulate_gate_grads(model: nn.Module, batches: Iterable, gates: Sequence[Tensor],
                           log: _Progress | None = None) -> list[Tensor]:
    """Per gate, the sum over ``batches`` of ``|grad|`` of the symmetric KL between two dropout passes.

    The passes run in train mode; the model's mode is restored afterwards.
    ``log`` gets a line after the first batch and then every
    ``PROGRESS_EVERY_S`` seconds.
    """
    total = f"/{len(batches)}" if hasattr(batches, "__len__") else ""
    totals = [torch.zeros_like(gate) for gate in gates]
    was_training = model.training
    model.train()
    seen = 0
    try:
        for batch in batches:
            kwargs = dict(batch) if isinstance(batch, Mapping) else {"input_ids": batch}
            weights = kwargs.get("attention_mask")
            call = (lambda: model(**kwargs)) if isinstance(batch, Mapping) else (lambda: model(batch))
            with torch.enable_grad():
                loss = symmetric_kl(_logits(call()), _logits(call()), weights)
                grads = torch.autograd.grad(loss, gates, allow_unused=True)
            for summed, grad in zip(totals, grads):
                if grad is not None:
                    summed.add_(grad.abs())
            seen += 1
            if log is not None and (seen == 1 or log.due()):
                log.log(f"batch {seen}{total}")
    finally:
        model.train(was_training)
    if not seen:
        raise ValueError("batches must yield at least one batch")
    if log is not None:
        log.log(f"done: {seen} batches")
    return totals


def importance(
    model: nn.Module,
    batches: Iterable,
    *,
    dropout: float = 0.1,
    num_heads: int | None = None,
    ffn_in: str = "up_proj",
    ffn_out: str = "down_proj",
    attn_out: str = "o_proj",
    layer_pattern: str = DEFAULT_LAYER_PATTERN,
    progress: bool = True,
) -> Importance:
    """Unit importance for general ability, from a label-free KL between two dropout passes.

    All-ones gates, placed by forward hooks, multiply the FFN intermediate
    activations (input of ``ffn_out``), the FFN's hidden output (output of
    ``ffn_out``) and each attention head (input of ``attn_out``). For each
    batch the model runs twice with dropout ``dropout`` on the gated
    activations (Llama-style models have no dropout of their own; any the
    model has is on too), the symmetric KL between the two predictions is
    back-propagated to the gates only, and ``|grad|`` is accumulated. Each
    layer's totals are then normalised to ``|tanh(zscore)|`` in [0, 1).

    Args:
        model: the model before fine-tuning; its parameters and mode are
            left as they were.
        batches: ``input_ids`` tensors, or dicts of model keyword arguments
            (an ``attention_mask`` entry also weights the KL per position),
            from general data (pre-training-like text).
        dropout: probability in [0, 1) of the dropout applied by the hooks.
        num_heads: attention heads; read from the model when None.
        ffn_in, ffn_out, attn_out: last name components of the FFN input
            projection, the FFN output projection and the attention output.
        progress: write lines to stderr as batches are done (after the
            first, then every ``PROGRESS_EVERY_S`` seconds, and at the end);
            ``False`` writes nothing.

    Example:
        >>> model = tiny_llama()
        >>> batches = [torch.randint(0, 32, (2, 8)) for _ in range(2)]
        >>> scores = importance(model, batches, progress=False)
        >>> scores.ffn[0].shape, scores.hidden[0].shape, scores.heads[0].shape  # layer 0
        (torch.Size([24]), torch.Size([16]), torch.Size([2]))
    """
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    for argument, value in (("ffn_in", ffn_in), ("ffn_out", ffn_out), ("attn_out", attn_out)):
        if not isinstance(value, str) or not value:
            raise TypeError(f"{argument} must be a module name, got {value!r}")
    log = _Progress("cofi.importance", progress)
    units = _find_units(model, compile_layer_pattern(layer_pattern), {"ffn_out": ffn_out, "attn_out": attn_out})
    if not units:
        raise no_match_error(model, f"modules {ffn_out!r} / {attn_out!r} inside layers")

    log.log(f"scoring the units of {len(units)} layers: two dropout passes and one backward per batch")
    with _gate_hooks(model, units, dropout, num_heads) as gates:
        flat_gates = [gate for table in gates.values() for gate in table.values()]
        totals = iter(_accumulate_gate_grads(model, batches, flat_gates, log))
    scores = {kind: {i: normalize_per_layer(next(totals)).cpu() for i in table} for kind, table in gates.items()}
    return Importance(**scores)


def soft_masks(
    model: nn.Module,
    scores: Importance,
    *,
    ffn_in: str = "up_proj",
    ffn_out: str = "down_proj",
    attn_in: Sequence[str] = DEFAULT_ATTENTION_INPUTS,
    attn_out: str = "o_proj",
    layer_pattern: str = DEFAULT_LAYER_PATTERN,
) -> dict[str, Tensor]:
    """``1 - importance`` per output row: parameter name -> mask (weights and biases alike).

    - ``ffn_in`` (``up_proj``): one row per FFN intermediate neuron, ``scores.ffn``;
    - ``ffn_out`` (``down_proj``): one row per hidden dimension, ``scores.hidden``;
    - ``attn_in`` (``q_proj``, ``k_proj``, ``v_proj``): the ``head_dim`` rows of
      each head take that head's mask, ``scores.heads``. With grouped-query
      attention a key/value head serves several query heads and takes the
      mask of the most important of them (``1 - max``), as importances merge.
      ``head_dim`` is the input width of ``attn_out`` over the number of heads.

    ``attn_out`` (``o_proj``) is not masked, as in the official code: its unit
    per head is a block of input columns, which a per-row mask cannot express
    (a full-shape mask would cost 4 bytes per entry). ``attn_in=()`` leaves
    attention unmasked. Raises ``ValueError`` where a mask cannot apply: a
    layer with head scores but none of the ``attn_in`` modules, or rows that
    do not match the units.
    """
    attn_in = _check_module_names(attn_in, "attn_in") if attn_in else ()
    roles = {"ffn_in": ffn_in, "ffn_out": ffn_out, "attn_out": attn_out, **{f"attn_in:{m}": m for m in attn_in}}
    units = _find_units(model, compile_layer_pattern(layer_pattern), roles)
    masks = _ffn_masks(units, scores)
    for index, table in sorted(scores.heads.items()) if attn_in else ():
        masks.update(_head_masks(units.get(index, {}), index, table, attn_in, attn_out))
    return masks


def _ffn_masks(units: dict[int, dict[str, tuple[str, nn.Module]]], scores: Importance) -> dict[str, Tensor]:
    """The masks of each layer's ``ffn_in`` rows (``scores.ffn``) and ``ffn_out`` rows (``scores.hidden``)."""
    masks = {}
    for role, kind in (("ffn_in", "ffn"), ("ffn_out", "hidden")):
        for index, table in sorted(getattr(scores, kind).items()):
            if role not in units.get(index, {}):
                raise ValueError(f"importance has {kind} scores for layer {index}, but the model has no {role} module there")
            name, module = units[index][role]
            masks.update(_row_masks(name, module, 1.0 - table, table.numel()))
    return masks


def _head_masks(roles: dict[str, tuple[str, nn.Module]], index: int, table: Tensor, attn_in: Sequence[str],
                attn_out: str) -> dict[str, Tensor]:
    """The masks of one layer's ``attn_in`` rows from its head scores ``table``: ``head_dim`` rows per head."""
    found = {role: roles[role] for role in roles if role.startswith("attn_in:")}
    if not found:
        raise ValueError(
            f"importance has head scores for layer {index}, but the model has none of the attention input "
            f"modules {attn_in} there: pass attn_in= with their names, or attn_in=() to leave attention unmasked"
        )
    if "attn_out" not in roles:
        raise ValueError(f"layer {index} has no {attn_out!r} module to tell the head width from: pass attn_out=")
    out_name, out_module = roles["attn_out"]
    heads = table.numel()
    if out_module.weight.shape[1] % heads:
        raise ValueError(f"{out_name} has {out_module.weight.shape[1]} inputs, not a multiple of {heads} heads")
    head_dim = out_module.weight.shape[1] // heads
    masks = {}
    for name, module in found.values():
        rows = module.weight.shape[0]
        if rows % head_dim or heads % (rows // head_dim):
            raise ValueError(f"{name} has {rows} output rows: not whole heads of {head_dim} rows each for "
                             f"{heads} query heads")
        # Query heads h * group .. (h + 1) * group - 1 share key/value head h (transformers' repeat_kv).
        group = heads // (rows // head_dim)
        per_head = 1.0 - table.view(-1, group).amax(dim=1)
        masks.update(_row_masks(name, module, per_head.repeat_interleave(head_dim), rows))
    return masks


def _row_masks(name: str, module: nn.Module, mask: Tensor, units: int) -> dict[str, Tensor]:
    """The per-row ``mask`` for each parameter of ``module``; its rows must be ``units``."""
    masks = {}
    for param_name, param in module.named_parameters(recurse=False):
        if param.dim() == 0 or param.shape[0] != units:
            raise ValueError(
                f"{name}.{param_name} has {param.shape[0] if param.dim() else 0} output rows, "
                f"its importance has {units} units"
            )
        masks[f"{name}.{param_name}"] = mask.to(param.device)
    return masks


def attach_soft_masks(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    scores: Importance,
    *,
    mode: str = "update",
    ffn_in: str = "up_proj",
    ffn_out: str = "down_proj",
    attn_in: Sequence[str] = DEFAULT_ATTENTION_INPUTS,
    attn_out: str = "o_proj",
    layer_pattern: str = DEFAULT_LAYER_PATTERN,
) -> list[str]:
    """Give a selopt optimizer the soft masks of :func:`soft_masks`; returns the names of the masked parameters.

    FFN rows (``up_proj``, ``down_proj``) and attention heads' rows (``q_proj``,
    ``k_proj``, ``v_proj``) are masked; ``o_proj`` is not (see
    :func:`soft_masks`). Parameters the optimizer does not hold (frozen ones)
    are skipped; every mask is checked against its parameter before any is
    attached. ``mode`` sets ``soft_mask_mode`` of the param groups that hold
    masked parameters: ``"update"`` (default) scales each row's step;
    ``"grad"`` scales its gradient, as the CoFiTune code does, which under
    Adam barely acts (a constant factor cancels between ``m`` and ``sqrt(v)``
    except through eps).

    Example:
        >>> model = tiny_llama(layers=1)
        >>> opt = selopt.AdamW(model.parameters())
        >>> for name in attach_soft_masks(opt, model, importance(model, [torch.randint(0, 32, (2, 8))])):
        ...     print(name)
        model.layers.0.mlp.up_proj.weight
        model.layers.0.mlp.down_proj.weight
        model.layers.0.self_attn.q_proj.weight
        model.layers.0.self_attn.k_proj.weight
        model.layers.0.self_attn.v_proj.weight
    """
    if mode not in SOFT_MASK_MODES:
        raise ValueError(f"mode must be one of {SOFT_MASK_MODES}, got {mode!r}")
    optimizer = innermost(optimizer)  # accelerate's AcceleratedOptimizer keeps the selopt one as .optimizer
    if not callable(getattr(optimizer, "set_soft_mask", None)):
        raise TypeError(f"optimizer must be a selopt optimizer with set_soft_mask, got {class_name(optimizer)}")
    masks = soft_masks(model, scores, ffn_in=ffn_in, ffn_out=ffn_out, attn_in=attn_in, attn_out=attn_out,
                       layer_pattern=layer_pattern)
    params = dict(model.named_parameters())
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    attached = [name for name in masks if id(params[name]) in group_of]
    for name in attached:
        optimizer.set_soft_mask(params[name], masks[name])
        group_of[id(params[name])]["soft_mask_mode"] = mode
    return attached
