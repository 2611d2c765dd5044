"""An optimizer's per-parameter state: torch's keys, how entries are made, and how saved ones load.

The keys are torch's (``step``, ``exp_avg``, ``exp_avg_sq``,
``max_exp_avg_sq``) plus selopt's ``rounding_seed`` (stochastic rounding of
bf16 params); :data:`selopt.bucket.STATE_KEYS` maps them to the fields of a
:class:`~selopt.bucket.Bucket`. Moments get :func:`moment_dtype`, on load too,
so fp32 moments of bf16 params stay fp32 (torch's load would round them).
"""

from __future__ import annotations

import copy
from collections import defaultdict

import torch
from torch import Tensor

from selopt import soft_masks
from selopt.options import AdamWOptions

STEP, EXP_AVG, EXP_AVG_SQ, MAX_EXP_AVG_SQ, ROUNDING_SEED = (
    "step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "rounding_seed")
MOMENT_KEYS = (EXP_AVG, EXP_AVG_SQ, MAX_EXP_AVG_SQ)


def moment_dtype(param_dtype: torch.dtype, requested: torch.dtype | None) -> torch.dtype:
    """Dtype of a parameter's moments: fp32 for low-precision params unless another is requested.

    A complex param has complex moments, as in ``torch.optim.AdamW``, whose real
    view has the dtype a real param of its real view would get.

    >>> moment_dtype(torch.bfloat16, None), moment_dtype(torch.complex64, torch.float32)
    (torch.float32, torch.complex64)
    """
    if param_dtype.is_complex:
        return moment_dtype(param_dtype.to_real(), requested).to_complex()
    if requested is not None:
        return requested
    return param_dtype if param_dtype in (torch.float32, torch.float64) else torch.float32


def check_param_dtype(dtype: torch.dtype, options: AdamWOptions) -> None:
    """Refuse parameters of ``dtype`` that the step cannot update under ``options``."""
    if not (dtype.is_floating_point or dtype.is_complex):
        raise TypeError(f"params must be floating-point or complex tensors, got one of dtype {dtype}")
    if dtype.is_complex and options.moment_dtype == torch.bfloat16:
        raise ValueError(
            "moment_dtype=torch.bfloat16 has no complex counterpart: "
            "complex params need moment_dtype None or torch.float32"
        )


def incomplete(entry: dict | None, param_dtype: torch.dtype, options: AdamWOptions) -> bool:
    """Whether a param's state ``entry`` lacks something ``options`` step with (:func:`complete` adds it)."""
    return not entry or (options.amsgrad and MAX_EXP_AVG_SQ not in entry) or (
        options.stochastic_rounding and param_dtype == torch.bfloat16 and ROUNDING_SEED not in entry)


def complete(state: dict, param: Tensor, options: AdamWOptions) -> dict:
    """Make what ``state`` (a param's entry, maybe empty) lacks for ``options``: zero moments, count 0, a seed."""
    if not state:
        dtype = moment_dtype(param.dtype, options.moment_dtype)
        state[STEP] = torch.tensor(0.0, dtype=torch.float32)
        state[EXP_AVG] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
        state[EXP_AVG_SQ] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
    if options.amsgrad and MAX_EXP_AVG_SQ not in state:
        state[MAX_EXP_AVG_SQ] = torch.zeros_like(state[EXP_AVG_SQ])
    if options.stochastic_rounding and param.dtype == torch.bfloat16 and ROUNDING_SEED not in state:
        # From torch's generator, so torch.manual_seed makes runs repeatable; saved with the state, so
        # a resumed run rounds as an uninterrupted one.
        state[ROUNDING_SEED] = torch.randint(0, 2**62, (), dtype=torch.int64).to(state[STEP].device)
    return state


def loaded_state(param_id, entry: dict, param: Tensor, group: dict) -> dict:
    """A saved state entry for ``param`` as selopt keeps it; raises if it does not fit ``param``.

    Moments get the param's :func:`moment_dtype`; ``step`` (a tensor or a
    number, both of which torch's AdamW loads) becomes an fp32 tensor; keys
    selopt does not use are kept as saved.
    """
    where = f"state_dict['state'][{param_id!r}]"
    if not entry:
        return {}
    missing = [key for key in (STEP, EXP_AVG, EXP_AVG_SQ) if key not in entry]
    if missing:
        raise ValueError(f"{where} lacks {', '.join(missing)}")
    loaded = dict(entry)
    dtype = moment_dtype(param.dtype, group["moment_dtype"])
    for key in MOMENT_KEYS:
        if key in entry:
            loaded[key] = _loaded_moment(f"{where}[{key!r}]", entry[key], param).to(device=param.device, dtype=dtype)
    # The step moves the count (and the seed) to the device its implementation keeps them on.
    loaded[STEP] = _loaded_number(f"{where}['step']", entry[STEP], torch.float32)
    if ROUNDING_SEED in entry:
        loaded[ROUNDING_SEED] = _loaded_number(f"{where}['rounding_seed']", entry[ROUNDING_SEED], torch.int64)
    return loaded


def _loaded_moment(where: str, value, param: Tensor) -> Tensor:
    if not isinstance(value, Tensor):
        raise ValueError(f"{where} must be a tensor, got {type(value).__name__}")
    if value.shape != param.shape:
        raise ValueError(f"{where} has shape {tuple(value.shape)}, but its param has shape {tuple(param.shape)}")
    if value.is_complex() != param.is_complex():
        raise ValueError(f"{where} is {value.dtype}, but its param is {param.dtype}: both or neither must be complex")
    return value


def _loaded_number(where: str, value, dtype: torch.dtype) -> Tensor:
    """A saved count (fp32) or seed (int64): a Python number or a one-element tensor, as a 0-d tensor."""
    integral = dtype == torch.int64
    if integral:
        fits = isinstance(value, int) or isinstance(value, Tensor) and not value.is_floating_point()
    else:
        fits = isinstance(value, (int, float)) or isinstance(value, Tensor)
    if isinstance(value, bool) or not fits or isinstance(value, Tensor) and value.numel() != 1:
        kind = "an integer or a one-element integer tensor" if integral else "a number or a one-element tensor"
        raise ValueError(f"{where} must be {kind}, got {value!r}")
    return torch.as_tensor(value, dtype=dtype).reshape(())


def place_counts(states: list[dict], device: torch.device) -> None:
    """Move the step counts (and seeds) of ``states`` to ``device``, where their implementation reads them.

    The kernels keep them on the device, the reference on the host. (``is_cpu``,
    not ``.device``: it makes no device object, and a count on another GPU
    implies moments there too, which the kernels refuse.)
    """
    on_host = device.type == "cpu"
    if any([s[STEP].is_cpu != on_host for s in states]):
        for s in states:
            for key in (STEP, ROUNDING_SEED):
                if key in s:
                    s[key] = s[key].to(device)


def loaded(param_groups: list[dict], defaults: dict, state_dict: dict) -> tuple[list[dict], dict, dict]:
    """A state_dict for an optimizer of ``param_groups``, checked in full: its groups, state and soft masks.

    Groups get the keys they lack from ``defaults`` (:func:`complete_group`);
    entries become :func:`loaded_state`'s; state that belongs to no param is
    kept as it is, as torch keeps it. Raises before anything is returned.
    """
    groups, targets = _loaded_groups(param_groups, defaults, state_dict["param_groups"])
    state, masks = defaultdict(dict), {}
    for key, entry in state_dict["state"].items():
        if key not in targets:
            state[key] = entry
            continue
        param, group = targets[key]
        if soft_masks.SOFT_MASK in entry:
            entry = dict(entry)
            masks[param] = soft_masks.loaded_soft_mask(key, entry.pop(soft_masks.SOFT_MASK), param)
        state[param] = loaded_state(key, entry, param, group)
    return groups, state, masks


def _loaded_groups(param_groups: list[dict], defaults: dict, saved_groups: list[dict]) -> tuple[list[dict], dict]:
    """The saved groups completed and checked against ``param_groups``, and each saved param id's (param, group)."""
    saved_groups = copy.deepcopy(saved_groups)
    ours = [len(group["params"]) for group in param_groups]
    theirs = [len(group["params"]) for group in saved_groups]
    if ours != theirs:
        raise ValueError(
            f"state_dict's param groups differ from this optimizer's: {len(theirs)} group(s) of {theirs} params "
            f"against {len(ours)} of {ours}. To move it to these groups, load it into an optimizer grouped as it "
            "was saved and copy that optimizer's .state into this one (see the README)"
        )
    targets = {}  # saved param id -> (param, its group as loaded)
    for group, saved in zip(param_groups, saved_groups):
        targets.update((i, (p, saved)) for i, p in zip(saved["params"], group["params"]))
        saved["params"] = group["params"]
        if "param_names" in group and "param_names" not in saved:
            saved["param_names"] = group["param_names"]
        complete_group(saved, defaults)
        options = AdamWOptions.from_group(saved)
        for dtype in {p.dtype for p in saved["params"]}:
            check_param_dtype(dtype, options)
    return saved_groups, targets


def complete_group(group: dict, defaults: dict) -> None:
    """Give a group saved by ``torch.optim.AdamW`` or an older selopt the keys it lacks, from ``defaults``.

    Nothing else is added, so a state dict round-trips unchanged. As
    ``torch.optim.AdamW`` on load, a ``torch.optim.Adam`` group loads as AdamW.
    """
    for key, value in defaults.items():
        group.setdefault(key, value)
    group["decoupled_weight_decay"] = True
