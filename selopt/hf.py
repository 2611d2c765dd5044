"""Hugging Face ``Trainer`` integration: Trainer's param-group rule, optimizers for ``optimizer_cls_and_kwargs``,
and a callback that logs what each step moved.

``Trainer`` builds its own AdamW with two groups: weight decay for every
parameter except biases and normalisation weights, none for those. A selopt
optimizer takes its place in one of two ways; both keep everything else of
``Trainer`` (lr schedule, gradient accumulation, ``optimizer.pt`` checkpoints
and resume)::

    # 1. Build it yourself and hand it over:
    opt = selopt.MoFO(selopt.hf.trainer_param_groups(model, weight_decay=0.01, fraction=0.15), lr=2e-5)
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None))

    # 2. Let Trainer build it (needed with FSDP or DeepSpeed, where Trainer refuses `optimizers`,
    #    and with `model_init`): biases and norm weights still train densely.
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      optimizer_cls_and_kwargs=(selopt.hf.TrainerMoFO, {"lr": 2e-5, "fraction": 0.15}))

With ``optimizers=(opt, None)`` the Trainer still creates the learning-rate
schedule from ``args`` on top of ``opt``; ``args.learning_rate`` and
``args.weight_decay`` are not used, the optimizer's own values are. With
``optimizer_cls_and_kwargs`` Trainer takes the weight decay from
``args.weight_decay`` and the learning rate from the kwargs only (see
:class:`TrainerAdamW`).

Choosing selopt by name (``TrainingArguments(optim="mofo")``) is not possible:
``TrainingArguments`` converts ``optim`` to the closed enum
``transformers.training_args.OptimizerNames`` (an unknown name raises
``ValueError``), and ``Trainer.get_optimizer_cls_and_kwargs`` looks names up in
a private table (``transformers.trainer_optimizer._OPTIMIZER_HANDLERS`` in
transformers 5); transformers has no registry or entry point through which
another package can add an optimizer. ``optimizer_cls_and_kwargs`` is the
supported way to give Trainer an optimizer it builds itself.

:class:`UpdateStatsCallback` (or :func:`log_update_stats`) adds the fraction
of entries each param group's update moved (:mod:`selopt.stats`) to Trainer's
logs.

:func:`trainer_param_groups` does not import ``transformers``: the split is
plain module inspection, so it also works for models that are not Hugging
Face ones.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch

from selopt.groups import dense_vectors, require_module, two_groups
from selopt.optim import AdamW, MoFO
from selopt.wrappers import class_name, innermost

try:
    from transformers import TrainerCallback
except ImportError:  # the param-group helpers need no transformers; the callback is for Trainer only
    TrainerCallback = object

# Trainer's name rule (lower-cased full parameter names): biases and parameters under a module
# named like a norm (``input_layernorm``, ``post_attention_layernorm``, ``model.norm``, ``ln_norm``).
_NO_DECAY_NAME = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")
_NORM_TYPES = tuple(
    t for t in (torch.nn.LayerNorm, getattr(torch.nn, "RMSNorm", None), torch.nn.GroupNorm) if t is not None
)


def _is_norm(module: torch.nn.Module) -> bool:
    # Model libraries define their own norms (LlamaRMSNorm, T5LayerNorm, ...): recognise them by class name too.
    name = type(module).__name__
    return isinstance(module, _NORM_TYPES) or name.endswith("LayerNorm") or name.endswith("RMSNorm")


def no_decay_parameter_names(model: torch.nn.Module) -> set[str]:
    """Names of the parameters ``Trainer`` exempts from weight decay: biases and norm weights.

    ``Trainer``'s rule (a bias or norm in the lower-cased name, or a parameter of
    an ``nn.LayerNorm``), extended to every module whose class is a norm
    (``nn.RMSNorm``, ``nn.GroupNorm``, classes named ``*LayerNorm``/``*RMSNorm``)
    whatever its attribute name.

    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    >>> sorted(no_decay_parameter_names(model))
    ['0.bias', '1.bias', '1.weight']
    """
    names = set()
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(prefix=module_name, recurse=False):
            if _is_norm(module) or _NO_DECAY_NAME.search(param_name.lower()):
                names.add(param_name)
    return names


def trainer_param_groups(
    model: torch.nn.Module, weight_decay: float | None = None, fraction: float | None = None, **options
) -> list[dict]:
    """``Trainer``'s two param groups for a selopt optimizer: decayed and selective, then dense without decay.

    The first group (weight matrices, embeddings, lm_head) gets ``weight_decay``,
    ``fraction`` and ``options`` (e.g. ``block_size``) where they are given,
    and otherwise the optimizer's own arguments, as with
    :func:`selopt.param_groups`; the second (biases and norm weights,
    :func:`no_decay_parameter_names`) trains densely (``fraction=1.0``) with no decay.
    Frozen parameters (e.g. from :mod:`selopt.hft`) are left out, tied ones
    counted once, order as in ``model.named_parameters()``, so a ``Trainer``
    AdamW checkpoint of the same model loads into it. Empty groups are dropped.

    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    >>> groups = trainer_param_groups(model, weight_decay=0.1, fraction=0.2)
    >>> [(len(g["params"]), g["weight_decay"], g["fraction"]) for g in groups]
    [(1, 0.1, 0.2), (3, 0.0, 1.0)]
    """
    require_module("trainer_param_groups", model)
    no_decay = no_decay_parameter_names(model)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    return two_groups(
        [p for name, p in trainable if name not in no_decay],
        [p for name, p in trainable if name in no_decay],
        weight_decay, fraction, **options,
    )


def _require_lr(cls: type, lr) -> float:
    if lr is None:
        # Trainer passes optimizer_cls_and_kwargs' kwargs as they are: without an lr the optimizer's default
        # (1e-3) would train silently, whatever TrainingArguments.learning_rate says.
        raise TypeError(
            f"{cls.__name__} needs lr: with optimizer_cls_and_kwargs Trainer does not pass "
            "TrainingArguments.learning_rate, so give it in the kwargs, e.g. (selopt.hf.TrainerMoFO, {'lr': 2e-5})"
        )
    return lr


class TrainerAdamW(AdamW):
    """:class:`selopt.AdamW` for ``Trainer(optimizer_cls_and_kwargs=(TrainerAdamW, {...}))``: vectors train densely.

    Trainer calls ``TrainerAdamW(groups, **kwargs)`` with its own two groups
    (decay and no decay, ``args.weight_decay`` on the first). Each group's
    tensors with fewer than 2 dimensions (biases and norm weights, which
    Trainer's rule puts in the no-decay group) get ``fraction=1``, as
    :func:`trainer_param_groups` does; the rest keep ``kwargs``' selection.
    ``lr`` is required: Trainer passes only the kwargs, not
    ``TrainingArguments.learning_rate``. Trainer builds the optimizer after
    wrapping the model, so this also works where ``optimizers=`` is refused
    (FSDP, DeepSpeed, ``model_init``). The state dict is a plain selopt one.

    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    >>> trainer_groups = [{"params": [model[0].weight], "weight_decay": 0.1},
    ...                   {"params": [model[0].bias, model[1].weight, model[1].bias], "weight_decay": 0.0}]
    >>> opt = TrainerMoFO(trainer_groups, lr=2e-5, fraction=0.2)
    >>> [(len(g["params"]), g["weight_decay"], g["fraction"]) for g in opt.param_groups]
    [(1, 0.1, 0.2), (3, 0.0, 1.0)]
    """

    def __init__(self, params: Iterable, lr: float | None = None, *args, **kwargs):
        super().__init__(dense_vectors(params), _require_lr(type(self), lr), *args, **kwargs)


class TrainerMoFO(MoFO):
    """:class:`selopt.MoFO` for ``Trainer(optimizer_cls_and_kwargs=(TrainerMoFO, {...}))``; see :class:`TrainerAdamW`."""

    def __init__(self, params: Iterable, lr: float | None = None, *args, **kwargs):
        super().__init__(dense_vectors(params), _require_lr(type(self), lr), *args, **kwargs)


def _selopt_optimizer(optimizer) -> AdamW:
    # Trainer hands callbacks its optimizer as accelerate wrapped it (AcceleratedOptimizer.optimizer); the
    # error names what is inside, since the wrapper's class says nothing about which optimizer it holds.
    found = innermost(optimizer)
    if not isinstance(found, AdamW):
        raise TypeError(f"UpdateStatsCallback needs a selopt optimizer (selopt.AdamW, selopt.MoFO or "
                        f"selopt.hf.TrainerMoFO), Trainer has {class_name(found)}")
    return found


class UpdateStatsCallback(TrainerCallback):
    """A ``Trainer`` callback that adds what the last optimizer step moved to each training log.

    At the start of training it turns on :meth:`selopt.AdamW.track_updates`; at
    each training log (the entry with ``loss``, every ``logging_steps``) it adds,
    for param group ``i``:

    - ``selopt/group{i}/moved``: fraction of the group's entries the update moved;
    - ``selopt/group{i}/moved_entries``: how many;
    - ``selopt/group{i}/decayed``: fraction weight decay changed (groups with
      weight decay; 1.0 with ``decay="all"``, which decays every entry);
    - with ``per_tensor=True``, ``selopt/{parameter name}/moved`` for each tensor.

    Values are those of the last step before the log, as Trainer's own
    ``grad_norm`` and ``learning_rate``; steps in between cost no host sync.
    They go into ``logs`` and ``trainer.state.log_history``. Trainer calls its
    reporting integrations (TensorBoard, W&B, ...) before the callbacks it is
    given, so to reach those too add the callback with :func:`log_update_stats`.
    Under FSDP every rank must log (Trainer's callbacks run on every rank).
    Trainer hands callbacks accelerate's wrapper of the optimizer; the callback
    reaches the selopt optimizer inside it (as :func:`selopt.unwrap` does), and
    without one its ``TypeError`` names the inner optimizer's class.
    """

    def __init__(self, per_tensor: bool = False):
        if not isinstance(per_tensor, bool):
            raise TypeError(f"per_tensor must be a bool, got {per_tensor!r}")
        self.per_tensor = per_tensor
        self._optimizer: AdamW | None = None
        self._names: dict[int, str] = {}

    def on_train_begin(self, args, state, control, optimizer=None, model=None, **kwargs):
        self._optimizer = _selopt_optimizer(optimizer)
        self._optimizer.track_updates(per_tensor=self.per_tensor)
        self._names = {id(p): name for name, p in model.named_parameters()} if model is not None else {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._optimizer is None or logs is None or "loss" not in logs:
            return  # not a training log (evaluation, end-of-training summary)
        stats = self._optimizer.update_stats()
        if not stats.tracked:
            return
        added = {}
        for i, (group, counts) in enumerate(zip(self._optimizer.param_groups, stats.groups)):
            added[f"selopt/group{i}/moved"] = counts.fraction
            added[f"selopt/group{i}/moved_entries"] = counts.moved
            if counts.weight_decay:
                added[f"selopt/group{i}/decayed"] = counts.decayed_fraction
            for index, tensor_counts in (counts.tensors or {}).items():
                name = self._names.get(id(group["params"][index]), f"group{i}.{index}")
                added[f"selopt/{name}/moved"] = tensor_counts.fraction
        logs.update(added)
        # Trainer recorded a copy of logs before calling the callbacks.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(added)


def log_update_stats(trainer, *, per_tensor: bool = False) -> UpdateStatsCallback:
    """Add an :class:`UpdateStatsCallback` to ``trainer`` ahead of its reporting integrations.

    Trainer calls callbacks in order, and the integrations ``report_to`` chose
    come before the ones given to ``Trainer(callbacks=...)`` or ``add_callback``;
    first in line, the statistics reach them as well.
    """
    handler = getattr(trainer, "callback_handler", None)
    if handler is None or not isinstance(getattr(handler, "callbacks", None), list):
        raise TypeError(f"trainer must be a transformers.Trainer, got {type(trainer).__name__}")
    callback = UpdateStatsCallback(per_tensor=per_tensor)
    handler.callbacks.insert(0, callback)
    return callback
