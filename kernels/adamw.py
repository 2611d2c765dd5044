"""The Triton implementation of one selective AdamW step for a bucket of tensors.

The bucket (:class:`selopt.bucket.Bucket`) shares a device, a parameter dtype
and a moment dtype. Which kernels run, by :attr:`AdamWOptions.path
<selopt.options.AdamWOptions.path>`:

* first, one program per tensor computes the step's scalars and advances its
  step count (:mod:`selopt.kernels.steps`);
* ``"dense"`` and ``"one_pass"``: the one-pass kernel of
  :mod:`selopt.kernels.block`, one launch;
* ``"exact"``: the radix select of :mod:`selopt.kernels.exact`, nine
  launches whatever the number of tensors.

:func:`prepare_adamw` has the signature of every implementation
(:mod:`selopt.bucket`) and, as torch's functional optimizers, trusts
its caller; :func:`check_bucket` is the validation, and
:func:`multi_tensor_adamw_` checks, prepares and runs. Nothing here reads a
device value back, so the step neither waits for the GPU nor breaks
CUDA-graph capture.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

import triton.language as tl

from selopt import quantization
from selopt.bucket import Bucket
from selopt.kernels import block, exact, tables
from selopt.kernels.launch import compile_launches
from selopt.options import AdamWOptions

TRITON_PARAM_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
# uint8: 8-bit moments (selopt.quantization), codes with fp32 scales, dequantized and requantized in registers.
TRITON_MOMENT_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.uint8: tl.uint8}


def _split_double(x: float) -> tuple[float, float]:
    """x as an fp32 pair (hi, lo) with hi + lo == x to ~48 bits: kernel float arguments are fp32."""
    hi = struct.unpack("f", struct.pack("f", x))[0]
    return hi, x - hi


class KernelScalars(NamedTuple):
    """The step's scalar kernel arguments, named as the kernels' parameters."""

    # Inputs of the per-tensor scalars (selopt.kernels.steps): lr as a device pointer, or an fp32
    # hi/lo pair with the host decay factor; weight decay and the betas as hi/lo pairs.
    lr_ptr: Tensor | None
    lr_hi: float
    lr_lo: float
    decay_factor: float
    weight_decay_hi: float
    weight_decay_lo: float
    beta1_hi: float
    beta1_lo: float
    beta2_hi: float
    beta2_lo: float
    # The element kernels' inputs.
    beta2: float
    lerp_weight: float  # 1 - beta1
    one_minus_beta2: float
    eps: float
    grad_scale_ptr: Tensor | None
    found_inf_ptr: Tensor | None

    @classmethod
    def of(cls, options: AdamWOptions, device: torch.device, grad_scale: Tensor | None,
           found_inf: Tensor | None) -> KernelScalars:
        lr = options.lr
        lr_on_device = isinstance(lr, Tensor) and lr.device == device
        lr_value = 0.0 if lr_on_device else float(lr)  # a CPU tensor reads back without a device sync
        beta1, beta2 = options.beta1, options.beta2
        return cls(lr if lr_on_device else None, *_split_double(lr_value), 1.0 - lr_value * options.weight_decay,
                   *_split_double(options.weight_decay), *_split_double(beta1), *_split_double(beta2),
                   beta2, 1.0 - beta1, 1.0 - beta2, options.eps, grad_scale, found_inf)


def kernel_flags(options: AdamWOptions, param_dtype: torch.dtype, moment_dtype: torch.dtype, quant_block: int,
                 scalars: KernelScalars, has_soft_mask: bool, writes_selection: bool) -> dict:
    """The kernels' constexpr flags, named as their parameters: the options and what the bucket holds
    (``quant_block``: entries per scale of 8-bit moments, 0 for float moments)."""
    return dict(
        PARAM_DTYPE=TRITON_PARAM_DTYPES[param_dtype], MOMENT_DTYPE=TRITON_MOMENT_DTYPES[moment_dtype],
        QUANT_BLOCK=quant_block,
        AMSGRAD=options.amsgrad, MAXIMIZE=options.maximize, DECAY_SELECTED=options.decay == "selected",
        SOFT_MASK=has_soft_mask,
        SOFT_MASK_ON_GRAD=has_soft_mask and options.soft_mask_mode == "grad",
        SOFT_MASK_ON_UPDATE=has_soft_mask and options.soft_mask_mode == "update",
        LR_ON_DEVICE=scalars.lr_ptr is not None, GRAD_SCALE=scalars.grad_scale_ptr is not None,
        FOUND_INF=scalars.found_inf_ptr is not None,
        STOCHASTIC_ROUNDING=options.stochastic_rounding and param_dtype == torch.bfloat16,
        WRITE_SELECTION=writes_selection,
        LERP_FROM_END=scalars.lerp_weight >= 0.5,  # torch's lerp switches formula at weight 0.5
    )


@dataclass(frozen=True)
class PreparedStep:
    """A compiled step: calling it launches the kernels and writes strided tensors back."""

    launches: list  # Launch records, and for shards the histogram exchanges between them
    write_back: list[tuple[Tensor, Tensor]]  # (strided original, the contiguous copy the kernels update)
    # Every tensor the launches address by pointer, contiguous copies of strided inputs included:
    # nothing else holds those copies until the launches have run.
    operands: Bucket | list
    # The launches of this bucket's next step, for the same tensors at the same addresses, from that
    # step's options (lr, betas, eps, weight decay may change), grad_scale and found_inf: the plan is
    # reused, so nothing per tensor is looked at. None when the step made contiguous copies (they
    # are new tensors each step) or exchanges histograms between shards.
    relaunch: Callable[[AdamWOptions, Tensor | None, Tensor | None], list] | None = None

    def __call__(self) -> None:
        for launch in self.launches:
            launch()
        for original, copy in self.write_back:
            original.copy_(copy)


# Bucket fields the step writes: a strided one goes through a contiguous copy, written back after.
_WRITTEN = ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs")


def _contiguous(bucket: Bucket) -> tuple[Bucket, list[tuple[Tensor, Tensor]]]:
    """``bucket`` with contiguous tensors (the kernels address flattened memory), and the copies to write back."""
    copied, write_back = {}, []
    for name, values in bucket.fields():
        if values is None or all([t is None or t.is_contiguous() for t in values]):
            continue
        copied[name] = [t if t is None or t.is_contiguous() else t.contiguous() for t in values]
        if name in _WRITTEN:
            write_back += [(t, c) for t, c in zip(values, copied[name]) if c is not t]
    return (bucket.replace(**copied) if copied else bucket), write_back


def prepare_adamw(bucket: Bucket, options: AdamWOptions, *, grad_scale: Tensor | None = None,
                  found_inf: Tensor | None = None, cache: tables.PlanCache | None = None,
                  whole_numels: list[int] | None = None, combine: Callable[[Tensor], None] | None = None,
                  ) -> PreparedStep:
    """Compile one step of the bucket; nothing is written until the returned step is called.

    The signature of every implementation (:mod:`selopt.bucket`), trusted as
    torch's functional optimizers trust theirs (:func:`check_bucket` checks
    it), with steps fp32 and rounding seeds int64 on the params' device.
    ``cache`` keeps the launch plans between steps (an optimizer owns one);
    without it every call builds its plan. A kernel that cannot compile raises
    :class:`~selopt.kernels.launch.KernelCompileError` with every tensor untouched.

    For shards of larger tensors (:mod:`selopt.distributed`) with per-tensor
    selection (``block_size=None``): ``whole_numels`` gives each whole
    tensor's size, which k is counted over, and ``combine`` sums each radix
    round's histograms over the shards before the bins are chosen
    (:func:`selopt.kernels.exact.exact_adamw_launches`). Other paths are
    elementwise or per local block and ignore both.
    """
    if not len(bucket):
        return PreparedStep([], [], [])
    device = bucket.params[0].device
    work, write_back = _contiguous(bucket)
    cache = tables.PlanCache() if cache is None else cache
    path = options.path
    per_tensor = path == "exact" and options.block_size is None
    if path == "exact":
        plan = tables.plan_for(cache, work, program_size=exact.CHUNK, row_size=options.block_size,
                               fraction=options.fraction, select_per_row=True,
                               whole_numels=whole_numels if per_tensor else None)
    else:
        program_size = block.DENSE_TILE if path == "dense" else options.block_size
        plan = tables.plan_for(cache, work, program_size=program_size, row_size=None, fraction=options.fraction,
                               select_per_row=False)
    combine = combine if per_tensor else None
    has_soft_mask = any(m is not None for m in work.column("soft_masks"))
    writes_selection = any(s is not None for s in work.column("selections"))
    param_dtype, moment_dtype = work.params[0].dtype, work.exp_avgs[0].dtype
    quant_block, code_tables = _quantization(work, device)

    def launches_for(options: AdamWOptions, grad_scale: Tensor | None, found_inf: Tensor | None) -> list:
        # Only what is per bucket: it holds no tensor of the step, so a kept closure keeps none alive.
        scalars = KernelScalars.of(options, device, grad_scale, found_inf)
        flags = kernel_flags(options, param_dtype, moment_dtype, quant_block, scalars, has_soft_mask=has_soft_mask,
                             writes_selection=writes_selection)
        values = {**plan.arguments(), **scalars._asdict(), **flags, **code_tables}
        if path == "exact":
            launches = exact.exact_adamw_launches(plan, values, combine)
        else:
            launches = block.block_adamw_launches(plan, values, program_size, path == "dense")
        compile_launches(launches, device)
        return launches

    launches = launches_for(options, grad_scale, found_inf)
    # Copies are new tensors each step, and exchanges between shards are bound to their process groups.
    replayable = work is bucket and combine is None
    return PreparedStep(launches, write_back, work, launches_for if replayable else None)


def _quantization(bucket: Bucket, device: torch.device) -> tuple[int, dict]:
    """The bucket's 8-bit block size (0 for float moments; one per bucket, as the optimizer buckets by it)
    and the code tables its kernels look codes up in, by parameter name."""
    if bucket.exp_avg_scales is None:
        return 0, {"code_values": None, "code_buckets": None}
    code_values, code_buckets = tables.code_tables(device)
    block_size = quantization.block_of(bucket.exp_avgs[0], bucket.exp_avg_scales[0])
    return block_size, {"code_values": code_values, "code_buckets": code_buckets}


def check_bucket(bucket: Bucket, options: AdamWOptions) -> None:
    """Raise ``ValueError``/``TypeError`` unless ``bucket`` is one :func:`prepare_adamw` can step.

    One entry per param in every field; params of one kernel dtype on one
    device; grads and moments shaped like their params (moments of one kernel
    moment dtype); steps one-element fp32 tensors on the device; soft masks
    fp32, ``(rows,)`` or full shape; selections contiguous bool tensors shaped
    like their params; an int64 seed per bf16 param when the options ask for
    stochastic rounding. 8-bit (uint8) moments come with their fp32 scales
    (:mod:`selopt.quantization`), contiguous, one block size for the bucket.
    """
    count = len(bucket)
    for name, values in bucket.fields():
        if values is not None and len(values) != count:
            raise ValueError(f"{name} must have one entry per param ({count}), got {len(values)}")
    if (bucket.max_exp_avg_sqs is not None) != options.amsgrad:
        raise ValueError(f"max_exp_avg_sqs must be given exactly when options.amsgrad, got amsgrad={options.amsgrad}")
    if count == 0:
        return
    device, param_dtype, moment_dtype = bucket.params[0].device, bucket.params[0].dtype, bucket.exp_avgs[0].dtype
    if param_dtype not in TRITON_PARAM_DTYPES:
        raise TypeError(f"params must be one of {list(TRITON_PARAM_DTYPES)} for the Triton kernels, got {param_dtype}")
    if moment_dtype not in TRITON_MOMENT_DTYPES:
        raise TypeError(f"exp_avgs must be one of {list(TRITON_MOMENT_DTYPES)}, got {moment_dtype}")
    for name, dtype in (("params", param_dtype), ("grads", param_dtype), ("exp_avgs", moment_dtype),
                        ("exp_avg_sqs", moment_dtype), ("max_exp_avg_sqs", moment_dtype)):
        for t, p in zip(bucket.column(name), bucket.params):
            if t is not None and (t.shape != p.shape or t.device != device or t.dtype != dtype):
                raise ValueError(f"{name} must match its param in shape and device and be {dtype}, got "
                                 f"{tuple(t.shape)} {t.dtype} on {t.device} for a param {tuple(p.shape)} on {device}")
    if {(s.dtype, s.device) for s in bucket.steps} != {(torch.float32, device)} or any(
            s.numel() != 1 for s in bucket.steps):
        raise ValueError(f"steps must be one-element fp32 tensors on {device}, got "
                         f"{sorted({f'{s.dtype} on {s.device}, {s.numel()} elements' for s in bucket.steps})}")
    _check_optional_columns(bucket, options, device)
    _check_scales(bucket, options, device)


def _check_scales(bucket: Bucket, options: AdamWOptions, device: torch.device) -> None:
    quantized = bucket.exp_avgs[0].dtype == torch.uint8
    given = [name for name in ("exp_avg_scales", "exp_avg_sq_scales") if getattr(bucket, name) is not None]
    if not quantized:
        if given:
            raise ValueError(f"{' and '.join(given)} belong to 8-bit (uint8) moments, got {bucket.exp_avgs[0].dtype} ones")
        return
    if len(given) != 2:
        raise ValueError("8-bit (uint8) moments need exp_avg_scales and exp_avg_sq_scales (selopt.quantization)")
    if options.amsgrad:
        raise ValueError("8-bit moments keep no max_exp_avg_sq: amsgrad needs float moments")
    blocks = set()
    for name in given:
        for scales, codes, p in zip(getattr(bucket, name), bucket.exp_avgs, bucket.params):
            block = quantization.block_of(codes, scales)
            if (scales.dtype != torch.float32 or scales.device != device or not scales.is_contiguous()
                    or p.dim() == 0 or block not in _QUANT_BLOCKS
                    or scales.shape != quantization.scales_shape(p.shape, block)):
                raise ValueError(
                    f"{name} must be contiguous fp32 tensors on {device} of shape (rows, row length / block) for a "
                    f"block of {quantization.MIN_QUANT_BLOCK}..{quantization.QUANT_BLOCK} entries (a power of two), got "
                    f"{tuple(scales.shape)} {scales.dtype} on {scales.device} for a param {tuple(p.shape)}")
            blocks.add(block)
    if len(blocks) > 1:
        raise ValueError(f"8-bit moments of one bucket must share their block size, got {sorted(blocks)}")
    if options.block_size is not None and options.block_size % blocks.pop():
        raise ValueError(f"block_size {options.block_size} must hold whole blocks of the 8-bit moments")


_QUANT_BLOCKS = [2**i for i in range(quantization.MIN_QUANT_BLOCK.bit_length() - 1,
                                     quantization.QUANT_BLOCK.bit_length())]


def _check_optional_columns(bucket: Bucket, options: AdamWOptions, device: torch.device) -> None:
    for mask, p in zip(bucket.column("soft_masks"), bucket.params):
        if mask is not None and (mask.dtype != torch.float32 or mask.device != device
                                 or mask.shape not in (p.shape[:1], p.shape)):
            raise ValueError(
                f"soft_masks must be fp32 on {device} with shape {tuple(p.shape[:1])} or {tuple(p.shape)}, "
                f"got {tuple(mask.shape)} {mask.dtype} on {mask.device}"
            )
    for selection, p in zip(bucket.column("selections"), bucket.params):
        if selection is not None and (selection.dtype != torch.bool or selection.shape != p.shape
                                      or not selection.is_contiguous() or selection.device != device):
            raise ValueError(f"selections must be contiguous bool tensors shaped like their params on {device}")
    if options.stochastic_rounding and bucket.params[0].dtype == torch.bfloat16:
        if any(s is None or s.dtype != torch.int64 or s.device != device or s.numel() != 1
               for s in bucket.column("rounding_seeds")):
            raise ValueError(f"stochastic rounding of bf16 params needs rounding_seeds: one-element int64 tensors "
                             f"on {device}, one per param (an optimizer keeps them in its state)")


def multi_tensor_adamw_(bucket: Bucket, options: AdamWOptions, **step) -> None:
    """One selective AdamW step, in place: :func:`check_bucket`, then :func:`prepare_adamw`, then run.

    ``step``: :func:`prepare_adamw`'s keywords (``grad_scale``, ``found_inf``, ``cache``, ...).

    Example (on CPU this needs ``TRITON_INTERPRET=1``):
        >>> p, g = torch.zeros(6, device="cuda"), torch.arange(6.0, device="cuda")
        >>> m, v, t = torch.zeros_like(p), torch.zeros_like(p), torch.zeros((), device="cuda")
        >>> options = AdamWOptions(lr=0.1, weight_decay=0.0, fraction=0.5)
        >>> multi_tensor_adamw_(Bucket([p], [g], [m], [v], [t]), options)
        >>> (p != 0).tolist(), t.item()
        ([False, False, False, True, True, True], 1.0)
    """
    check_bucket(bucket, options)
    prepare_adamw(bucket, options, **step)()
