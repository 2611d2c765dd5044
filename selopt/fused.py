"""The fast CPU implementation: torch's fused AdamW kernel plus a linear-time select per block.

What ``backend="auto"`` runs for CPU tensors (the reference, :mod:`selopt.reference`,
stays the ground truth and runs with ``backend="torch"``). One step of a bucket:

1. every tensor's moments and a *candidate* parameter come from one call of
   torch's fused AdamW (``torch._fused_adamw_``, as ``torch.optim.AdamW(fused=True)``):
   one pass over memory in place of the reference's dozen;
2. per block, the threshold is the k-th largest key of ``|m|`` as stored
   (:mod:`selopt.selection`'s keys, NaN above every number, zero never) by
   numpy's introselect: linear time, and 15x faster than ``torch.kthvalue``
   on CPU (bench/NOTES.md §6);
3. the unselected entries get back their old value, decayed under
   ``decay="all"``, by one masked numpy multiply (bit for bit the reference's
   ``p * (1 - lr * wd)``; a torch ``where`` on a bool mask is 5x slower on CPU).

The moments of the selected entries and the whole of ``m`` and ``v`` are the
fused kernel's, so they round as ``torch.optim.AdamW(fused=True)`` does, not
as the reference's for-loop: within the kernels' tolerances of the reference,
with the selection equal to the reference's selection of the stored ``m``.
Low-precision params (and the moments of bf16/fp16 moment state) step in fp32
copies and are rounded once on store, stochastically when asked; a soft mask
in ``"update"`` mode applies the reference's update to the stored moments.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from selopt import reference
from selopt.bucket import Bucket
from selopt.options import AdamWOptions
from selopt.selection import MIN_THRESHOLD, block_k

# The largest key below NaN's: inf's. A threshold is never above it plus one, so every NaN (whatever
# its payload bits, which numpy's select sees) ranks at the top and ties with every other NaN.
INF_KEY = {np.dtype(np.int32): 0x7F800000, np.dtype(np.int64): 0x7FF0000000000000}


def prepare_adamw(bucket: Bucket, options: AdamWOptions, *, grad_scale: Tensor | None = None,
                  found_inf: Tensor | None = None, cache=None):
    """The fused CPU implementation of :func:`selopt.functional.prepare_adamw`; ``cache`` is unused.

    ``found_inf`` is read on the host (a CPU tensor: no synchronisation to
    speak of); when set, nothing changes, counts included.

    >>> p, g = torch.zeros(4), torch.tensor([1.0, -4.0, 2.0, 0.5])
    >>> b = Bucket([p], [g], [torch.zeros(4)], [torch.zeros(4)], [torch.tensor(0.0)])
    >>> prepare_adamw(b, AdamWOptions(lr=0.1, weight_decay=0.0, fraction=0.5))()
    >>> [round(x, 6) for x in p.tolist()]  # the fused kernel rounds a little differently from the reference
    [0.0, 0.1, -0.1, 0.0]
    """
    def step() -> None:
        if found_inf is not None and bool(found_inf):
            return
        with torch.no_grad():
            _step(bucket, options, grad_scale)
    return step


def _step(bucket: Bucket, options: AdamWOptions, grad_scale: Tensor | None) -> None:
    params = [p.detach() for p in bucket.params]
    masks = bucket.column("soft_masks")
    masked_grads = options.soft_mask_mode == "grad" and any(s is not None for s in masks)
    dtype = reference.compute_dtype(params[0].dtype)
    working = {name: [_in_compute_dtype(t, dtype) for t in bucket.column(name)]
               for name in ("exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs")}
    working["params"] = [_in_compute_dtype(p, dtype) for p in params]
    if masked_grads:  # the mask scales the gradient: the fused kernel gets the reference's effective gradient
        grads = [reference.effective_grad(p, g, maximize=options.maximize, soft_mask=s, soft_mask_mode="grad",
                                          grad_scale=grad_scale) for p, g, s in zip(params, bucket.grads, masks)]
    else:
        grads = [_in_compute_dtype(g, dtype) for g in bucket.grads]
    selective = options.fraction < 1 or (options.soft_mask_mode == "update" and any(s is not None for s in masks))
    olds = [p.clone() for p in working["params"]] if selective else None
    torch._foreach_add_(list(bucket.steps), 1.0)
    torch._fused_adamw_(
        working["params"], grads, working["exp_avgs"], working["exp_avg_sqs"],
        working["max_exp_avg_sqs"] if options.amsgrad else [], list(bucket.steps), lr=float(options.lr),
        beta1=options.beta1, beta2=options.beta2, weight_decay=options.weight_decay, eps=options.eps,
        amsgrad=options.amsgrad, maximize=options.maximize and not masked_grads,
        grad_scale=None if masked_grads else grad_scale)
    for name in ("exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"):
        for stored, new in zip(bucket.column(name), working[name]):
            if stored is not None and new is not stored:
                stored.copy_(new)  # rounded once to the state's dtype, which the selection then reads
    for i, p in enumerate(params):
        new_param = working["params"][i]
        if selective:
            _select_and_restore(bucket, i, new_param, olds[i], options)
        elif bucket.selections is not None and bucket.selections[i] is not None:
            bucket.selections[i].fill_(True)
        if new_param is not p:
            _store_param(p, new_param, bucket, i, options)


def _in_compute_dtype(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """``t`` itself when it is already in the compute dtype, else a copy in it (rounded back on store)."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _select_and_restore(bucket: Bucket, i: int, new_param: Tensor, old: Tensor, options: AdamWOptions) -> None:
    """Give the unselected entries of ``new_param`` their old value, as the reference does; record the selection."""
    tensors = bucket.tensors(i)
    unselected = unselected_entries(tensors["exp_avgs"], options.fraction, options.block_size)
    if tensors["selections"] is not None:
        np.logical_not(unselected, out=tensors["selections"].numpy())
    soft_mask = tensors["soft_masks"]
    if soft_mask is not None and options.soft_mask_mode == "update":
        # The mask scales the update inside the fused formula: the reference's update, from the stored moments.
        vmax = tensors["max_exp_avg_sqs"] if options.amsgrad else None
        moments = reference.Moments(tensors["exp_avgs"].to(old.dtype), tensors["exp_avg_sqs"].to(old.dtype),
                                    None if vmax is None else vmax.to(old.dtype))
        new_param.copy_(reference.apply_update(old, moments, torch.from_numpy(~unselected),
                                               step=float(tensors["steps"]), options=options, soft_mask=soft_mask))
    elif options.fraction < 1:
        target = new_param.numpy()
        if options.decay == "all" and options.weight_decay != 0:
            decay = target.dtype.type(1 - float(options.lr) * options.weight_decay)
            np.multiply(old.numpy(), decay, out=target, where=unselected)
        else:
            np.copyto(target, old.numpy(), where=unselected)


def unselected_entries(exp_avg: Tensor, fraction: float, block_size: int | None) -> np.ndarray:
    """The entries MoFO leaves alone, shaped like ``exp_avg``: the complement of
    :func:`selopt.selection.selection_mask`, computed by a linear-time select.

    >>> unselected_entries(torch.tensor([0.1, -3.0, 2.0, 0.5]), 0.5, None).tolist()
    [True, False, False, True]
    """
    if fraction >= 1:
        return np.zeros(tuple(exp_avg.shape), dtype=bool)  # dense AdamW: every entry, zeros included
    m = exp_avg.detach()
    m = m.float() if m.dtype not in (torch.float32, torch.float64) else m
    values = m.numpy()
    key_dtype = np.dtype(np.int64 if values.dtype == np.float64 else np.int32)
    # |m|'s bit pattern (sign bit cleared) orders like |m|; a fresh contiguous array in m's logical order.
    keys = np.bitwise_and(values.view(key_dtype), np.iinfo(key_dtype).max).reshape(-1)
    unselected = np.empty(keys.shape, dtype=bool)
    n = keys.size
    block = n if block_size is None else block_size
    whole = n // block * block if n else 0
    for start, stop, width in ((0, whole, block), (whole, n, n - whole)):
        if stop > start:
            rows = keys[start:stop].reshape(-1, width)
            rank = width - block_k(fraction, width)  # the k-th largest is at this index in ascending order
            kth = np.partition(rows, rank, axis=1)[:, rank:rank + 1]
            threshold = np.clip(kth, MIN_THRESHOLD, INF_KEY[key_dtype] + 1)
            np.less(rows, threshold, out=unselected[start:stop].reshape(-1, width))
    return unselected.reshape(exp_avg.shape)


def _store_param(param: Tensor, new_param: Tensor, bucket: Bucket, i: int, options: AdamWOptions) -> None:
    """Round the compute-dtype ``new_param`` once into ``param``, stochastically for bf16 when asked."""
    if options.stochastic_rounding and param.dtype == torch.bfloat16:
        seed = bucket.column("rounding_seeds")[i]
        step = float(bucket.steps[i])
        generator = None if seed is None else reference.rounding_generator(seed, step, param.device)
        new_param = reference.stochastic_round_to_bf16(new_param, generator)
    param.copy_(new_param)
