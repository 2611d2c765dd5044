"""An optimizer's per-parameter state: torch's keys, how entries are made, and how saved ones load.

The keys are torch's (``step``, ``exp_avg``, ``exp_avg_sq``,
``max_exp_avg_sq``) plus selopt's ``rounding_seed`` (stochastic rounding of
bf16 params) and, for 8-bit moments (``moment_dtype="8bit"``,
:mod:`selopt.quantization`), ``exp_avg_scale`` and ``exp_avg_sq_scale`` beside
``uint8`` codes in ``exp_avg`` and ``exp_avg_sq``; :data:`selopt.bucket.STATE_KEYS`
maps them to the fields of a :class:`~selopt.bucket.Bucket`. Moments get
:func:`moment_dtype`, on load too, so fp32 moments of bf16 params stay fp32
(torch's load would round them), fp32 moments load into an 8-bit optimizer
quantized and 8-bit ones into any other dequantized; :func:`fp32_moments`
turns an 8-bit state dict into one ``torch.optim.AdamW`` loads.
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections import defaultdict

import torch
from torch import Tensor

from selopt import distributed, quantization, soft_masks
from selopt.options import AdamWOptions

STEP, EXP_AVG, EXP_AVG_SQ, MAX_EXP_AVG_SQ, ROUNDING_SEED = (
    "step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "rounding_seed")
MOMENT_KEYS = (EXP_AVG, EXP_AVG_SQ, MAX_EXP_AVG_SQ)
# The 8-bit moments: their scale keys, and whether their code map is signed.
SCALE_KEYS = {EXP_AVG: "exp_avg_scale", EXP_AVG_SQ: "exp_avg_sq_scale"}
SIGNED = {EXP_AVG: True, EXP_AVG_SQ: False}


def moment_dtype(param_dtype: torch.dtype, requested: torch.dtype | None) -> torch.dtype:
    """Dtype of a parameter's moments: fp32 for low-precision params unless another is requested.

    A complex param has complex moments, as in ``torch.optim.AdamW``, whose real
    view has the dtype a real param of its real view would get.

    >>> moment_dtype(torch.bfloat16, None), moment_dtype(torch.complex64, torch.float32)
    (torch.float32, torch.complex64)
    """
    if param_dtype.is_complex:
        return moment_dtype(param_dtype.to_real(), requested).to_complex()
    if requested is not None and requested != quantization.EIGHT_BIT:
        return requested
    return param_dtype if param_dtype in (torch.float32, torch.float64) else torch.float32


def quant_block(param: Tensor, requested: torch.dtype | str | None) -> int | None:
    """Entries per scale of ``param``'s 8-bit moments, or None when they are not 8-bit.

    From the whole tensor's shape (a DTensor's is), never a shard's: the same
    state on any mesh (:func:`selopt.quantization.quant_block`).

    >>> quant_block(torch.zeros(64, 128), "8bit"), quant_block(torch.zeros(64, 128), None)
    (128, None)
    """
    return quantization.quant_block(param.shape) if requested == quantization.EIGHT_BIT else None


def stored_format(entry: dict | None, param: Tensor, requested: torch.dtype | str | None) -> tuple:
    """(dtype, entries per scale or None) of ``param``'s moments: as its state ``entry`` holds them, or, before
    it has one, as ``requested`` makes them. 8-bit moments are ``uint8`` codes; the optimizer steps them in
    buckets of one block size (a kernel tile holds whole blocks).

    >>> stored_format(None, torch.zeros(64, 128), "8bit"), stored_format(None, torch.zeros(3), "8bit")
    ((torch.uint8, 128), (torch.float32, None))
    """
    if entry:
        scales = entry.get(SCALE_KEYS[EXP_AVG])
        return entry[EXP_AVG].dtype, None if scales is None else quantization.block_of(entry[EXP_AVG], scales)
    block = quant_block(param, requested)
    return (torch.uint8 if block else moment_dtype(param.dtype, requested)), block


def check_param_dtype(dtype: torch.dtype, options: AdamWOptions) -> None:
    """Refuse parameters of ``dtype`` that the step cannot update under ``options``."""
    if not (dtype.is_floating_point or dtype.is_complex):
        raise TypeError(f"params must be floating-point or complex tensors, got one of dtype {dtype}")
    if dtype.is_complex and options.moment_dtype in (torch.bfloat16, quantization.EIGHT_BIT):
        raise ValueError(
            f"moment_dtype={options.moment_dtype!r} has no complex counterpart: "
            "complex params need moment_dtype None or torch.float32"
        )


def _zero_scales(param: Tensor, block: int) -> Tensor:
    """fp32 zeros for ``param``'s block scales; a DTensor's, sharded as it is (rows split as its rows)."""
    shape = quantization.scales_shape(param.shape, block)
    if not distributed.is_dtensor(param):
        return torch.zeros(shape, dtype=torch.float32, device=param.device)
    placements = tuple(param.placements)
    if any(p.is_shard() and p.dim != 0 for p in placements):
        raise ValueError(f"moment_dtype='8bit' needs params sharded on dim 0 (FSDP2's Shard(0)) or replicated, "
                         f"so that no block of the 8-bit state is split; got a param with placements {placements}")
    from torch.distributed.tensor import zeros

    return zeros(shape, dtype=torch.float32, device_mesh=param.device_mesh, placements=placements)


def incomplete(entry: dict | None, param_dtype: torch.dtype, options: AdamWOptions) -> bool:
    """Whether a param's state ``entry`` lacks something ``options`` step with (:func:`complete` adds it)."""
    return not entry or (options.amsgrad and MAX_EXP_AVG_SQ not in entry) or (
        options.stochastic_rounding and param_dtype == torch.bfloat16 and ROUNDING_SEED not in entry)


def complete(state: dict, param: Tensor, options: AdamWOptions) -> dict:
    """Make what ``state`` (a param's entry, maybe empty) lacks for ``options``: zero moments, count 0, a seed."""
    if not state:
        block = quant_block(param, options.moment_dtype)
        if not block and options.moment_dtype == quantization.EIGHT_BIT and param.dim() >= 2 and (
                param.numel() >= quantization.MIN_NUMEL):
            warnings.warn(f"a param of shape {tuple(param.shape)} keeps fp32 moments under moment_dtype='8bit': its "
                          f"rows of {param.numel() // param.shape[0]} entries have no power-of-two factor of "
                          f"{quantization.MIN_QUANT_BLOCK} or more to cut 8-bit blocks from", RuntimeWarning,
                          stacklevel=7)
        dtype = torch.uint8 if block else moment_dtype(param.dtype, options.moment_dtype)
        state[STEP] = torch.tensor(0.0, dtype=torch.float32)
        # Contiguous 8-bit codes: their blocks are runs of the flattened tensor.
        layout = torch.contiguous_format if block else torch.preserve_format
        state[EXP_AVG] = torch.zeros_like(param, dtype=dtype, memory_format=layout)
        state[EXP_AVG_SQ] = torch.zeros_like(param, dtype=dtype, memory_format=layout)
        if block:
            for key in SCALE_KEYS.values():
                state[key] = _zero_scales(param, block)
    if options.amsgrad and MAX_EXP_AVG_SQ not in state:
        state[MAX_EXP_AVG_SQ] = torch.zeros_like(state[EXP_AVG_SQ])
    if options.stochastic_rounding and param.dtype == torch.bfloat16 and ROUNDING_SEED not in state:
        # From torch's generator, so torch.manual_seed makes runs repeatable; saved with the state, so
        # a resumed run rounds as an uninterrupted one.
        state[ROUNDING_SEED] = torch.randint(0, 2**62, (), dtype=torch.int64).to(state[STEP].device)
    return state


def loaded_state(param_id, entry: dict, param: Tensor, group: dict) -> dict:
    """A saved state entry for ``param`` as selopt keeps it; raises if it does not fit ``param``.

    Moments get the param's :func:`moment_dtype`: saved fp32 moments are
    quantized for an 8-bit group, saved 8-bit ones dequantized for any other;
    ``step`` (a tensor or a number, both of which torch's AdamW loads) becomes
    an fp32 tensor; keys selopt does not use are kept as saved.
    """
    where = f"state_dict['state'][{param_id!r}]"
    if not entry:
        return {}
    missing = [key for key in (STEP, EXP_AVG, EXP_AVG_SQ) if key not in entry]
    if missing:
        raise ValueError(f"{where} lacks {', '.join(missing)}")
    loaded = {key: value for key, value in entry.items() if key not in SCALE_KEYS.values()}
    block = quant_block(param, group["moment_dtype"])
    dtype = moment_dtype(param.dtype, group["moment_dtype"])
    for key in MOMENT_KEYS:
        if key not in entry:
            continue
        value = _loaded_moment(f"{where}[{key!r}]", entry[key], param).to(device=param.device)
        scale_key = SCALE_KEYS.get(key)
        scales = _loaded_scales(where, entry, key, value, param)
        if scales is not None and block == quantization.block_of(value, scales):
            loaded[key], loaded[scale_key] = value, scales
            continue
        if scales is not None:
            value = _fp32(value, scales, SIGNED[key])
        if block and key in SCALE_KEYS:
            loaded[key], loaded[scale_key] = _on_shards(
                functools.partial(quantization.quantize, block=block, signed=SIGNED[key]), [value],
                [value.shape, quantization.scales_shape(param.shape, block)])
        else:
            loaded[key] = value.to(dtype)
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


def _loaded_scales(where: str, entry: dict, key: str, value: Tensor, param: Tensor) -> Tensor | None:
    """The saved scales of 8-bit moment ``key``, checked against its codes; None for a moment saved unquantized."""
    scale_key = SCALE_KEYS.get(key)
    scales = entry.get(scale_key)
    if (scales is None) != (value.dtype != torch.uint8):
        raise ValueError(f"{where}[{key!r}] is {value.dtype}: 8-bit codes (uint8) go with {scale_key!r}, other "
                         "moments without it")
    if scales is None:
        return None
    rows = param.shape[0] if param.dim() else 0
    if (not isinstance(scales, Tensor) or scales.dtype != torch.float32 or scales.dim() != 2
            or scales.shape[0] != rows or not scales.numel() or param.numel() % scales.numel()):
        shown = f"{tuple(scales.shape)} {scales.dtype}" if isinstance(scales, Tensor) else type(scales).__name__
        raise ValueError(f"{where}[{scale_key!r}] must be fp32 scales of shape ({rows}, blocks per row) for a param "
                         f"of shape {tuple(param.shape)}, got {shown}")
    return scales.to(device=param.device)


def _dequantized(codes: Tensor, scales: Tensor, signed: bool) -> tuple[Tensor]:
    return (quantization.dequantize(codes, scales, signed),)


def _fp32(codes: Tensor, scales: Tensor, signed: bool) -> Tensor:
    """Saved 8-bit codes and scales (plain tensors or DTensors) as the fp32 moment they stand for."""
    return _on_shards(functools.partial(_dequantized, signed=signed), [codes, scales], [codes.shape])[0]


def _on_shards(convert, tensors: list[Tensor], shapes: list) -> tuple[Tensor, ...]:
    """``convert`` on plain tensors, or on DTensors' local shards (each result a DTensor of its global
    shape in ``shapes``, sharded as the first input): 8-bit blocks never cross a ``Shard(0)`` shard."""
    if not distributed.is_dtensor(tensors[0]):
        return tuple(convert(*tensors))
    from torch.distributed.tensor import DTensor

    like = tensors[0]
    results = convert(*(t.to_local() for t in tensors))
    return tuple(DTensor.from_local(result.contiguous(), like.device_mesh, like.placements, run_check=False,
                                    shape=torch.Size(shape), stride=torch.empty(shape, device="meta").stride())
                 for result, shape in zip(results, shapes))


def fp32_moments(state_dict: dict) -> dict:
    """A copy of an optimizer ``state_dict`` whose 8-bit moments are fp32, as ``torch.optim.AdamW`` loads them.

    Entries without 8-bit moments, and the param groups, are kept as they are
    (torch ignores selopt's group keys). Loading the result into a selopt
    optimizer with other moments works too, but any selopt optimizer loads an
    8-bit state dict directly.

    >>> import selopt
    >>> opt = selopt.AdamW([torch.nn.Parameter(torch.ones(64, 64))], moment_dtype="8bit")
    >>> opt.param_groups[0]["params"][0].grad = torch.ones(64, 64); opt.step()
    >>> torch_opt = torch.optim.AdamW(opt.param_groups[0]["params"])
    >>> torch_opt.load_state_dict(fp32_moments(opt.state_dict()))
    >>> torch_opt.state_dict()["state"][0]["exp_avg"].dtype
    torch.float32
    """
    state = {}
    for key, entry in state_dict["state"].items():
        if SCALE_KEYS[EXP_AVG] in entry:
            entry = {name: value for name, value in entry.items() if name not in SCALE_KEYS.values()}
            for moment, scale_key in SCALE_KEYS.items():
                codes, scales = state_dict["state"][key][moment], state_dict["state"][key][scale_key]
                entry[moment] = _fp32(codes, scales, SIGNED[moment])
        state[key] = entry
    return {**state_dict, "state": state}


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
