"""``selopt.functional.adamw``: one selective AdamW step on lists of tensors (``docs/design.md`` §4).

torch's layering: the optimizer class gathers a param group's tensors into
buckets (:class:`selopt.bucket.Bucket`), :func:`prepare_adamw` takes a bucket
plus the group's :class:`~selopt.options.AdamWOptions`, and an
implementation prepares the step, which runs when called, so that a caller
can prepare every bucket before writing anything. Every implementation is
called as ``prepare(bucket, options, grad_scale=..., found_inf=..., cache=...)``:

- ``selopt.reference.prepare_adamw``: the torch reference, tensor by tensor;
- ``selopt.fused.prepare_adamw``: torch's fused AdamW and a linear-time select, for CPU tensors;
- ``selopt.kernels.prepare_adamw``: the fused Triton kernels, a few launches per bucket;
- ``selopt.distributed.prepare_adamw_on_kernels`` and ``prepare_adamw``:
  DTensor params (FSDP2, tensor parallel), the kernels or the reference on
  their local shards, with exact selection across shards.

:func:`choose_implementation` is the one place that picks among them, once
per bucket of tensors sharing device, dtypes and sharding. :func:`adamw`
takes torch-style lists, for callers of the functional API.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from selopt import distributed, fused, reference, selection
from selopt.bucket import Bucket
from selopt.options import AdamWOptions
from selopt.state import moment_dtype

MIN_TRITON = (3, 6)  # the oldest Triton whose compile selopt's CI checks (torch 2.11's on CUDA)
# Devices whose tensors backend="auto" sends to the kernels (tests add "cpu", where the interpreter runs them).
AUTO_KERNEL_DEVICES = ("cuda",)
# Devices whose tensors backend="auto" sends to the fused torch implementation (its select runs in numpy).
AUTO_FUSED_DEVICES = ("cpu",)


class Implementation(NamedTuple):
    """A way to run the step: ``prepare(bucket, options, grad_scale=, found_inf=, cache=)`` returns it."""

    name: str
    prepare: Callable[..., Callable[[], None]]
    # Where it keeps step counts and rounding seeds: the kernels read them on the device (no sync,
    # graph-capturable); the reference on the host, as torch.optim.AdamW keeps its step.
    counts_on_device: bool
    # What the caller keeps between steps and passes as ``cache`` (the kernels' launch plans).
    make_cache: Callable[[], object] | None = None


def _kernels_prepare(*args, **kwargs):
    from selopt import kernels  # Triton is optional: imported only when the kernels run

    return kernels.prepare_adamw(*args, **kwargs)


def _plan_cache():
    from selopt import kernels

    return kernels.PlanCache()


REFERENCE = Implementation("torch", reference.prepare_adamw, counts_on_device=False)
FUSED = Implementation("torch fused", fused.prepare_adamw, counts_on_device=False, make_cache=fused.Scratch)
TRITON = Implementation("triton", _kernels_prepare, counts_on_device=True, make_cache=_plan_cache)
SHARDED = Implementation("sharded", distributed.prepare_adamw, counts_on_device=False)
SHARDED_TRITON = Implementation("sharded triton", distributed.prepare_adamw_on_kernels, counts_on_device=True,
                                make_cache=_plan_cache)


@functools.cache
def triton_problem() -> str | None:
    """Why selopt's Triton kernels cannot run in this environment, or None when they can."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed: `pip install triton` (or `pip install 'selopt[triton]'`)"
    try:
        import triton

        from selopt import kernels  # noqa: F401 - import errors of the kernels themselves count too
    except Exception as error:  # noqa: BLE001 - a broken install must not break the optimizer
        return f"importing the Triton kernels failed with {type(error).__name__}: {error}"
    version = tuple(int(part) for part in re.findall(r"\d+", triton.__version__)[:2])
    if version < MIN_TRITON:
        return f"Triton {triton.__version__} is older than {'.'.join(map(str, MIN_TRITON))}, the oldest selopt supports"
    return None


def warn_fallback(message: str) -> None:
    """The fallback warning; an optimizer passes its own ``warn`` that gives each message once."""
    warnings.warn(f"{message}. Please report this to the selopt maintainers with the output of "
                  "`python -m selopt.check`.", RuntimeWarning, stacklevel=6)


def choose_implementation(device: torch.device, param_dtype: torch.dtype, moment_dtype: torch.dtype, *,
                          sharded: bool, options: AdamWOptions,
                          warn: Callable[[str], None] = warn_fallback) -> Implementation:
    """The implementation for a bucket: its device, param and moment dtypes, DTensor or not, and the options.

    Raises when ``options.backend`` asks for what cannot run here, before any
    state changes; ``warn`` receives the reason for a fallback to the reference.

    >>> choose_implementation(torch.device("cpu"), torch.float32, torch.float32, sharded=False,
    ...                       options=AdamWOptions()).name
    'torch fused'
    """
    backend = options.backend
    if backend == "auto" and device.type in AUTO_FUSED_DEVICES and device.type not in AUTO_KERNEL_DEVICES:
        # torch's fused kernel updates from the fresh moments; 8-bit ones are read as stored: the reference.
        chosen = REFERENCE if moment_dtype == torch.uint8 else FUSED
    elif backend == "torch" or (backend == "auto" and device.type not in AUTO_KERNEL_DEVICES):
        chosen = REFERENCE
    else:
        chosen = _triton_or_fallback(device, param_dtype, moment_dtype, backend, warn)
    if sharded:  # DTensor params step their local shards, on the kernels or the reference
        chosen = SHARDED_TRITON if chosen is TRITON else SHARDED
    if options.capturable and not chosen.counts_on_device and device.type != "cpu":
        raise ValueError(
            f"capturable=True, but a param on {device} steps on the torch reference, which reads the step count "
            "on the host and so cannot be captured; device params step capturably on the Triton backend "
            "(backend='triton' or 'auto'), or set capturable=False"
        )
    return chosen


def _triton_or_fallback(device: torch.device, param_dtype: torch.dtype, moment_dtype: torch.dtype,
                        backend: str, warn: Callable[[str], None]) -> Implementation:
    problem = triton_problem()
    if problem is not None:
        if backend == "auto":
            warn(f"selopt runs its torch reference instead of the Triton kernels: {problem}")
            return REFERENCE
        raise ImportError(f"backend='triton' cannot run: {problem}. Or use backend='auto' to fall back to "
                          "the torch reference")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "backend='triton' on CPU tensors runs only under Triton's interpreter: "
            "set TRITON_INTERPRET=1 before importing triton, or use backend='torch'"
        )
    from selopt import kernels

    if param_dtype not in kernels.TRITON_PARAM_DTYPES or moment_dtype not in kernels.TRITON_MOMENT_DTYPES:
        return REFERENCE  # fp64 has no kernel: the reference runs it, reading its step on the host
    return TRITON


def amp_scalar(name: str, value: Tensor | None, device: torch.device | None = None) -> Tensor | None:
    """GradScaler's ``grad_scale`` or ``found_inf`` as the step reads it: a 0-d view, checked.

    FSDP's ``ShardedGradScaler`` hands them over with shape ``(1,)``.
    ``device``: where the step reads it on the device (the kernels), else None.

    >>> amp_scalar("found_inf", torch.zeros(1)).shape
    torch.Size([])
    """
    if value is None:
        return None
    if not isinstance(value, Tensor) or value.numel() != 1 or not value.is_floating_point():
        shown = f"shape {tuple(value.shape)} {value.dtype}" if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"{name} must be a one-element floating-point tensor (as GradScaler sets it), got {shown}")
    if device is not None and value.device != device:
        raise ValueError(f"{name} must be on the params' device {device} for the Triton kernels, got {value.device}")
    return value if value.dim() == 0 else value.view(())


def prepare_adamw(bucket: Bucket, options: AdamWOptions, *, grad_scale: Tensor | None = None,
                  found_inf: Tensor | None = None, cache=None, implementation: Implementation | None = None,
                  warn: Callable[[str], None] = warn_fallback) -> Callable[[], None]:
    """The step of :func:`adamw` for one bucket, prepared: nothing is written until it is called.

    ``implementation`` defaults to :func:`choose_implementation`'s for the
    first param. A Triton bucket whose kernels cannot compile falls back to the
    reference with ``backend="auto"`` (``warn`` gets the reason, and ``cache``
    remembers the kind of bucket, so later steps go to the reference at once)
    and raises :class:`~selopt.kernels.KernelCompileError` with ``"triton"``.
    """
    if not len(bucket):
        return lambda: None
    params = bucket.params
    if implementation is None:
        implementation = choose_implementation(params[0].device, params[0].dtype, bucket.exp_avgs[0].dtype,
                                               sharded=distributed.is_dtensor(params[0]), options=options, warn=warn)
    device = params[0].device if implementation.counts_on_device else None
    step = dict(grad_scale=amp_scalar("grad_scale", grad_scale, device),
                found_inf=amp_scalar("found_inf", found_inf, device), cache=cache)
    if not implementation.counts_on_device:  # the reference paths compile nothing
        return implementation.prepare(bucket, options, **step)
    from selopt import kernels

    # The reference reads the device step counts back: correct, if slower.
    fallback = SHARDED if implementation is SHARDED_TRITON else REFERENCE
    kind = _bucket_kind(implementation, bucket, options, step)
    if cache is None or kind not in cache.falling_back:
        try:
            return implementation.prepare(bucket, options, **step)
        except kernels.KernelCompileError as error:
            if options.backend != "auto":
                raise
            warn(f"selopt runs its torch reference for {params[0].dtype} params with "
                 f"{bucket.exp_avgs[0].dtype} moments: {error}")
            if cache is not None:
                cache.falling_back.add(kind)
    return fallback.prepare(bucket, options, **step)


def _bucket_kind(implementation: Implementation, bucket: Bucket, options: AdamWOptions, step: dict) -> tuple:
    """What picks a bucket's kernel specializations, but for tensor sizes and addresses."""
    present = (bucket.soft_masks is not None, bucket.selections is not None,
               step["grad_scale"] is not None, step["found_inf"] is not None)
    return (implementation.name, bucket.params[0].device, bucket.params[0].dtype, bucket.exp_avgs[0].dtype,
            options.structure(), present)


def adamw(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
          exp_avg_sqs: Sequence[Tensor], max_exp_avg_sqs: Sequence[Tensor] | None, state_steps: Sequence[Tensor], *,
          options: AdamWOptions, soft_masks: Sequence[Tensor | None] | None = None,
          rounding_seeds: Sequence[Tensor | None] | None = None, selections: Sequence[Tensor | None] | None = None,
          grad_scale: Tensor | None = None, found_inf: Tensor | None = None, cache=None,
          implementation: Implementation | None = None) -> None:
    """One selective AdamW step, in place, on torch-style lists of tensors of one bucket.

    ``params`` and their ``grads``, moments and ``state_steps`` (the counts
    before this step, one-element fp32 tensors, advanced by 1) as torch's
    ``torch.optim.adamw.adamw`` takes them; ``max_exp_avg_sqs`` with amsgrad;
    ``options`` the group's :class:`~selopt.options.AdamWOptions`. Optional:
    ``soft_masks`` (per row or full shape, fp32), ``rounding_seeds`` (int64,
    for stochastic rounding of bf16 params), ``selections`` (bool buffers that
    receive the selection), GradScaler's ``grad_scale`` and ``found_inf``,
    ``cache`` (an implementation's state between steps, e.g. the kernels'
    :class:`~selopt.kernels.PlanCache`).

    >>> p, g = torch.zeros(4), torch.tensor([1.0, -4.0, 2.0, 0.5])
    >>> m, v, t = torch.zeros(4), torch.zeros(4), torch.tensor(0.0)
    >>> adamw([p], [g], [m], [v], None, [t], options=AdamWOptions(lr=0.1, weight_decay=0.0, fraction=0.5))
    >>> p.round(decimals=6).tolist(), t.item()
    ([0.0, 0.10000000149011612, -0.10000000149011612, 0.0], 1.0)
    """
    bucket = Bucket(params, grads, exp_avgs, exp_avg_sqs, state_steps, max_exp_avg_sqs, soft_masks, rounding_seeds,
                    selections)
    prepare_adamw(bucket, options, grad_scale=grad_scale, found_inf=found_inf, cache=cache,
                  implementation=implementation)()


def selection_bytes_per_step(optimizer: torch.optim.Optimizer) -> int:
    """Bytes this rank all-reduces per step for exact selection of sharded params (what a
    :class:`selopt.distributed.Traffic` counts). Assumes every param gets a gradient in the step.

    >>> selection_bytes_per_step(torch.optim.SGD([torch.zeros(3, requires_grad=True)], lr=0.1))
    0
    """
    total = 0
    for group in optimizer.param_groups:
        options = AdamWOptions.from_group(group) if "fraction" in group else None
        if options is None or options.path != "exact" or options.block_size is not None:
            continue  # dense, blocks and plain torch optimizers exchange nothing
        for p in filter(distributed.is_dtensor, group["params"]):
            implementation = choose_implementation(p.device, p.dtype, moment_dtype(p.dtype, options.moment_dtype),
                                                   sharded=True, options=options, warn=lambda message: None)
            total += distributed.exchanged_bytes(p, _exchanged_counts(implementation, p.dtype))
    return total


def _exchanged_counts(implementation: Implementation, param_dtype: torch.dtype) -> int:
    """Counts one exactly-selected sharded tensor exchanges per step on ``implementation``."""
    if implementation is SHARDED_TRITON:
        from selopt import kernels

        return kernels.EXCHANGED_COUNTS
    key_dtype = torch.int64 if param_dtype == torch.float64 else torch.int32
    return sum(1 << bits for _, bits in selection.RADIX_ROUNDS[key_dtype])
