"""Options that do nothing for a param group say so, once: a warning names the option and the group."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from selopt.options import AdamWOptions


def warn_idle_options(optimizer, group: dict, options: AdamWOptions, params: list[Tensor],
                      masks: dict[Tensor, Tensor]) -> None:
    """Warn (``UserWarning``) about an option of ``group`` that does nothing at this step.

    ``stochastic_rounding=True`` rounds bf16 params only, and a non-default
    ``soft_mask_mode`` acts only through a soft mask. Each option of each group
    is looked at once, at its first step with gradients, from host values only
    (dtypes and the optimizer's ``masks``), and never again, whatever it found:
    a step after that costs one set lookup per group.
    """
    if not (options.stochastic_rounding or options.soft_mask_mode != "update"):
        return
    # Kept out of state dicts and copies (torch pickles only defaults, state and groups): a copy warns again.
    checked = optimizer.__dict__.setdefault("_idle_options_checked", set())
    if not params:
        return  # nothing steps: nothing to judge the option by yet
    # stacklevel 6 points at the caller of opt.step(), through this function, step and torch's three
    # wrappers of it (no_grad, compiler.disable, the profiling hook); another depth only misplaces the line.
    def index() -> int:
        return next(i for i, g in enumerate(optimizer.param_groups) if g is group)

    if options.stochastic_rounding and (id(group), "stochastic_rounding") not in checked:
        checked.add((id(group), "stochastic_rounding"))
        dtypes = {p.dtype for p in params}
        if torch.bfloat16 not in dtypes:
            names = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
            warnings.warn(f"stochastic_rounding=True does nothing in param group {index()}: it rounds bfloat16 params "
                          f"only, and this group's params are {names}", UserWarning, stacklevel=6)
    if options.soft_mask_mode != "update" and (id(group), "soft_mask_mode") not in checked:  # "update": the default
        checked.add((id(group), "soft_mask_mode"))
        if not any(p in masks for p in group["params"]):
            warnings.warn(f"soft_mask_mode={options.soft_mask_mode!r} does nothing in param group {index()}: none of its "
                          "params has a soft mask (set_soft_mask or selopt.cofi.attach_soft_masks sets one)",
                          UserWarning, stacklevel=6)
