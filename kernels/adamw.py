"""``multi_tensor_adamw_``: one selective AdamW step for a bucket of tensors, on the device.

The bucket shares a device, a parameter dtype and a moment dtype. Which
kernels run:

* first, one program per tensor computes the step's scalars and advances its
  step count (:mod:`selopt.kernels.steps`);
* ``fraction == 1`` (dense AdamW) or ``block_size <= MAX_BLOCK``: the
  one-pass kernel of :mod:`selopt.kernels.block`, one launch;
* ``block_size=None`` (one block per tensor, the MoFO paper) or a larger
  block: the exact radix select of :mod:`selopt.kernels.exact`, seven
  launches whatever the number of tensors.

Nothing here reads a device value back, so the step neither waits for the
GPU nor breaks CUDA-graph capture.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

import triton.language as tl

from selopt.kernels import block, exact, tables
from selopt.kernels.launch import Launch, compile_launches
from selopt.reference import DECAY_MODES, SOFT_MASK_MODES

PARAM_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
MOMENT_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16}
_seeds: dict[torch.device, Tensor] = {}


def _split_double(x: float) -> tuple[float, float]:
    """x as an fp32 pair (hi, lo) with hi + lo == x to ~48 bits: kernel float arguments are fp32."""
    hi = struct.unpack("f", struct.pack("f", x))[0]
    return hi, x - hi


def _rounding_seed(device: torch.device) -> Tensor:
    # Drawn once per device from torch's generator (so torch.manual_seed makes runs repeatable)
    # and kept on the device: the random streams also depend on each tensor's step count.
    if device not in _seeds:
        _seeds[device] = torch.randint(0, 2**62, (), dtype=torch.int64, device=device)
    return _seeds[device]


def _check_column(name: str, tensors: Sequence[Tensor], shapes: list, device: torch.device,
                  dtype: torch.dtype) -> None:
    """Each tensor shaped like its param, on ``device``, of ``dtype``.

    Compared a column at a time (list and set comparisons run in C): this runs
    on every step for every tensor, and per-tensor Python checks cost more
    host time than the launches. Only a failure looks at tensors one by one.
    """
    if [t.shape for t in tensors] == shapes and {t.device for t in tensors} == {device} and {
            t.dtype for t in tensors} == {dtype}:
        return
    for t, shape in zip(tensors, shapes):
        if t.shape != shape or t.device != device or t.dtype != dtype:
            raise ValueError(f"{name} must match its param in shape and device and be {dtype}, got "
                             f"{tuple(t.shape)} {t.dtype} on {t.device} for a param {tuple(shape)} on {device}")


def _contiguous(column: list) -> list:
    # The kernels address flattened memory; a strided tensor goes through a contiguous copy.
    if all([t is None or t.is_contiguous() for t in column]):
        return column
    return [t if t is None or t.is_contiguous() else t.contiguous() for t in column]


class KernelScalars(NamedTuple):
    """The step's scalar kernel arguments."""

    # Inputs of the per-tensor scalars (selopt.kernels.steps): lr (device pointer or None, then an
    # fp32 hi/lo pair), the host decay factor, and weight decay, beta1, beta2 as hi/lo pairs.
    step: tuple
    beta2: float
    lerp_weight: float  # 1 - beta1
    one_minus_beta2: float
    eps: float
    grad_scale: Tensor | None
    found_inf: Tensor | None
    seed: Tensor | None

    @property
    def elementwise(self) -> tuple:
        """The arguments the element kernels take, in their order."""
        return (self.beta2, self.lerp_weight, self.one_minus_beta2, self.eps, self.grad_scale, self.found_inf,
                self.seed)


@dataclass(frozen=True)
class PreparedStep:
    """A checked, compiled step: calling it launches the kernels and writes strided tensors back."""

    launches: list[Launch]
    write_back: list[tuple[Tensor, Tensor]]  # (strided original, the contiguous copy the kernels update)
    # Every tensor the launches address by pointer, contiguous copies of strided inputs included:
    # nothing else holds those copies until the launches have run.
    operands: list[list[Tensor | None]]

    def __call__(self) -> None:
        for launch in self.launches:
            launch()
        for original, copy in self.write_back:
            original.copy_(copy)


def multi_tensor_adamw_(*args, **kwargs) -> None:
    """One selective AdamW step, in place: ``prepare_multi_tensor_adamw(...)()``; same arguments.

    Example (on CPU this needs ``TRITON_INTERPRET=1``):
        >>> p, g = torch.zeros(6, device="cuda"), torch.arange(6.0, device="cuda")
        >>> m, v, t = torch.zeros_like(p), torch.zeros_like(p), torch.zeros((), device="cuda")
        >>> multi_tensor_adamw_([p], [g], [m], [v], None, [t], lr=0.1, beta1=0.9, beta2=0.999,
        ...                     eps=1e-8, weight_decay=0.0, fraction=0.5, block_size=None)
        >>> (p != 0).tolist(), t.item()
        ([False, False, False, True, True, True], 1.0)
    """
    prepare_multi_tensor_adamw(*args, **kwargs)()


def prepare_multi_tensor_adamw(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor] | None,
    steps: Sequence[Tensor],
    soft_masks: Sequence[Tensor | None] | None = None,
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool = False,
    fraction: float = 1.0,
    block_size: int | None = None,
    decay: str = "all",
    soft_mask_mode: str = "update",
    stochastic_rounding: bool = False,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    selections: Sequence[Tensor | None] | None = None,
    assume_matching: bool = False,
) -> PreparedStep:
    """Check and compile one selective AdamW step for tensors sharing device, dtype and moment dtype.

    Nothing is written until the returned :class:`PreparedStep` is called, so
    a bad argument (``ValueError``/``TypeError``) or a kernel that cannot
    compile here (:class:`~selopt.kernels.launch.KernelCompileError`) leaves
    every tensor as it was. The optimizer prepares all its buckets before
    running any.

    Semantics are :func:`selopt.reference.adamw_step_`'s (SPEC §1): dense
    moments, per block the entries with the ``block_k(fraction, n)`` largest
    ``|m|`` (ties included, NaN never), decoupled decay, the masked update.
    ``max_exp_avg_sqs`` given means amsgrad. ``steps`` are 0-d fp32 tensors
    on the params' device; each advances by 1 (by 0 when ``found_inf`` is
    set, in which case nothing else changes either). ``soft_masks`` entries
    are None, a ``(rows,)`` or a full-shape fp32 tensor in [0, 1].
    ``selections``, for diagnostics, are bool tensors shaped like the params
    (or None) that receive the selection mask. With bf16 moments, selection
    and update use the moments as stored (rounded to nearest).

    ``assume_matching=True`` skips checking that grads and moments match their
    params in shape and dtype, for a caller that guarantees it (the optimizer
    does: torch enforces it for ``.grad``, and selopt creates and loads the
    state). Devices and contiguity are still checked: a model moved after its
    optimizer state was made would otherwise hand the kernels foreign pointers.
    """
    count = len(params)
    lists = {"grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs, "steps": steps}
    optional = {"max_exp_avg_sqs": max_exp_avg_sqs, "soft_masks": soft_masks, "selections": selections}
    for name, values in {**lists, **{k: v for k, v in optional.items() if v is not None}}.items():
        if len(values) != count:
            raise ValueError(f"{name} must have one entry per param ({count}), got {len(values)}")
    if count == 0:
        return PreparedStep([], [], [])
    device, param_dtype, moment_dtype = params[0].device, params[0].dtype, exp_avgs[0].dtype
    if param_dtype not in PARAM_DTYPES:
        raise TypeError(f"params must be one of {list(PARAM_DTYPES)} for the Triton kernels, got {param_dtype}")
    if moment_dtype not in MOMENT_DTYPES:
        raise TypeError(f"exp_avgs must be one of {list(MOMENT_DTYPES)}, got {moment_dtype}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    if block_size is not None and (block_size <= 0 or block_size & (block_size - 1)):
        raise ValueError(f"block_size must be None or a positive power of two, got {block_size!r}")
    if decay not in DECAY_MODES:
        raise ValueError(f"decay must be one of {DECAY_MODES}, got {decay!r}")
    if soft_mask_mode not in SOFT_MASK_MODES:
        raise ValueError(f"soft_mask_mode must be one of {SOFT_MASK_MODES}, got {soft_mask_mode!r}")
    if assume_matching:
        for name, column in (("params", params), ("exp_avgs", exp_avgs)):
            if {t.device for t in column} != {device}:
                raise ValueError(f"{name} must all be on {device}, got {sorted({str(t.device) for t in column})}")
    else:
        shapes = [p.shape for p in params]
        _check_column("params", params, shapes, device, param_dtype)
        _check_column("grads", grads, shapes, device, param_dtype)
        _check_column("exp_avgs", exp_avgs, shapes, device, moment_dtype)
        _check_column("exp_avg_sqs", exp_avg_sqs, shapes, device, moment_dtype)
        if max_exp_avg_sqs is not None:
            _check_column("max_exp_avg_sqs", max_exp_avg_sqs, shapes, device, moment_dtype)
    if {(s.dtype, s.device) for s in steps} != {(torch.float32, device)} or any([s.numel() != 1 for s in steps]):
        raise ValueError(f"steps must be one-element fp32 tensors on {device}, got "
                         f"{sorted({f'{s.dtype} on {s.device}, {s.numel()} elements' for s in steps})}")
    soft_masks = list(soft_masks) if soft_masks is not None else [None] * count
    for mask, p in zip(soft_masks, params):
        if mask is None:
            continue
        rows = p.shape[:1]
        if mask.dtype != torch.float32 or mask.device != device or mask.shape not in (rows, p.shape):
            raise ValueError(
                f"soft_masks must be fp32 on {device} with shape {tuple(rows)} or {tuple(p.shape)}, "
                f"got {tuple(mask.shape)} {mask.dtype} on {mask.device}"
            )
    selections = list(selections) if selections is not None else [None] * count
    for selection, p in zip(selections, params):
        if selection is not None and (selection.dtype != torch.bool or selection.shape != p.shape
                                      or not selection.is_contiguous() or selection.device != device):
            raise ValueError(f"selections must be contiguous bool tensors shaped like their params on {device}")

    columns = [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs or [None] * count, soft_masks]
    work = [_contiguous(column) for column in columns]

    lr_on_device = isinstance(lr, Tensor) and lr.device == device
    lr_value = 0.0 if lr_on_device else float(lr)  # a CPU tensor reads back without a device sync
    dense_step = fraction >= 1.0
    one_pass = dense_step or (block_size is not None and block_size <= block.MAX_BLOCK)
    has_soft_mask = any(m is not None for m in soft_masks)
    flags = dict(
        PARAM_DTYPE=PARAM_DTYPES[param_dtype], MOMENT_DTYPE=MOMENT_DTYPES[moment_dtype],
        AMSGRAD=max_exp_avg_sqs is not None, MAXIMIZE=maximize, DECAY_SELECTED=decay == "selected",
        SOFT_MASK=has_soft_mask,
        SOFT_MASK_ON_GRAD=has_soft_mask and soft_mask_mode == "grad",
        SOFT_MASK_ON_UPDATE=has_soft_mask and soft_mask_mode == "update",
        LR_ON_DEVICE=lr_on_device, GRAD_SCALE=grad_scale is not None, FOUND_INF=found_inf is not None,
        STOCHASTIC_ROUNDING=stochastic_rounding and param_dtype == torch.bfloat16,
        WRITE_SELECTION=any(s is not None for s in selections),
        LERP_FROM_END=(1.0 - beta1) >= 0.5,  # torch's lerp switches formula at weight 0.5
    )
    scalars = KernelScalars(
        step=(lr if lr_on_device else None, *_split_double(lr_value), 1.0 - lr_value * weight_decay,
              *_split_double(weight_decay), *_split_double(beta1), *_split_double(beta2)),
        beta2=beta2, lerp_weight=1.0 - beta1, one_minus_beta2=1.0 - beta2, eps=eps, grad_scale=grad_scale,
        found_inf=found_inf, seed=_rounding_seed(device) if flags["STOCHASTIC_ROUNDING"] else None,
    )
    if one_pass:
        tile = block.DENSE_TILE if dense_step else block_size
        plan = tables.plan_for(*work, steps, selections, tile=tile, segment=None, fraction=fraction, exact=False)
        launches = block.block_adamw_launches(plan, scalars, flags, tile, dense_step)
    else:
        plan = tables.plan_for(*work, steps, selections, tile=exact.CHUNK, segment=block_size, fraction=fraction,
                               exact=True)
        launches = exact.exact_adamw_launches(plan, scalars, flags)
    compile_launches(launches, device)
    write_back = [(original, copy) for index in (0, 2, 3, 4)  # params and moments: what the step writes
                  for original, copy in zip(columns[index], work[index]) if copy is not original]
    return PreparedStep(launches, write_back, work)
