"""Hugging Face ``Trainer`` integration: param groups split the way ``Trainer`` splits them.

``Trainer`` builds its own AdamW with two groups: weight decay for every
parameter except biases and normalisation weights, none for those. Passing a
selopt optimizer instead keeps everything else of ``Trainer`` (scheduler,
gradient accumulation, ``optimizer.pt`` checkpoints and resume)::

    from transformers import Trainer
    opt = selopt.MoFO(selopt.hf.trainer_param_groups(model, weight_decay=0.01, fraction=0.15), lr=2e-5)
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None))
    trainer.train()                    # later: trainer.train(resume_from_checkpoint=True)

With ``optimizers=(opt, None)`` the Trainer still creates the learning-rate
schedule from ``args`` on top of ``opt``; ``args.learning_rate`` and
``args.weight_decay`` are not used, the optimizer's own values are.

This module does not import ``transformers``: the split is plain module
inspection, so it also works for models that are not Hugging Face ones.
"""

from __future__ import annotations

import re

import torch

from selopt.groups import two_groups

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
    model: torch.nn.Module, weight_decay: float = 0.0, fraction: float = 0.15, **options
) -> list[dict]:
    """``Trainer``'s two param groups for a selopt optimizer: decayed and selective, then dense without decay.

    The first group (weight matrices, embeddings, lm_head) gets ``weight_decay``,
    ``fraction`` and ``options`` (e.g. ``block_size``); the second (biases and
    norm weights, :func:`no_decay_parameter_names`) trains densely with no decay.
    Frozen parameters (e.g. from :mod:`selopt.hft`) are left out, tied ones
    counted once, order as in ``model.named_parameters()``, so a ``Trainer``
    AdamW checkpoint of the same model loads into it. Empty groups are dropped.

    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    >>> groups = trainer_param_groups(model, weight_decay=0.1, fraction=0.2)
    >>> [(len(g["params"]), g["weight_decay"], g["fraction"]) for g in groups]
    [(1, 0.1, 0.2), (3, 0.0, 1.0)]
    """
    no_decay = no_decay_parameter_names(model)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    return two_groups(
        [p for name, p in trainable if name not in no_decay],
        [p for name, p in trainable if name in no_decay],
        weight_decay, fraction, **options,
    )
