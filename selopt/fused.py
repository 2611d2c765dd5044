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
   ``decay="all"`` (bit for bit the reference's ``p * (1 - lr * wd)``), by a
   blend of bit patterns under an integer mask (bench/NOTES.md §6: masked
   copies, torch's ``where`` or numpy's ``where=``, are 10-15x slower on CPU).

The moments of the selected entries and the whole of ``m`` and ``v`` are the
fused kernel's, so they round as ``torch.optim.AdamW(fused=True)`` does, not
as the reference's for-loop: within the kernels' tolerances of the reference,
with the selection equal to the reference's selection of the stored ``m``.
Low-precision params (and the moments of bf16/fp16 moment state) step in fp32
copies and are rounded once on store, stochastically when asked; a soft mask
in ``"update"`` mode applies the reference's update to the stored moments.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

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
    olds = [_unselected_value(p, s, options) for p, s in zip(working["params"], masks)] if selective else None
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
    def finish(i: int) -> None:
        new_param = working["params"][i]
        if selective:
            _select_and_restore(bucket, i, new_param, olds[i], options)
        elif bucket.selections is not None and bucket.selections[i] is not None:
            bucket.selections[i].fill_(True)
        if new_param is not params[i]:
            _store_param(params[i], new_param, bucket, i, options)

    threads = torch.get_num_threads()
    if threads > 1 and len(params) > 1:
        # numpy's select and blend run on one core, tensor by tensor (they release the GIL): spread the
        # tensors over torch's thread count, as torch spreads its own ops.
        list(_worker_pool(threads).map(finish, range(len(params))))
    else:
        for i in range(len(params)):
            finish(i)


@functools.cache
def _worker_pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="selopt-fused")


def _unselected_value(param: Tensor, soft_mask: Tensor | None, options: AdamWOptions) -> Tensor:
    """What an unselected entry of ``param`` becomes: ``param * (1 - lr * wd)`` under ``decay="all"`` (the
    reference's very operation), else ``param``; a copy, taken before the fused kernel writes ``param``.
    With a soft mask on the update, ``param`` itself, from which the reference's update is stepped."""
    update_masked = soft_mask is not None and options.soft_mask_mode == "update"
    if options.decay == "all" and options.weight_decay != 0 and not update_masked:
        return torch.mul(param, 1 - float(options.lr) * options.weight_decay)
    return param.clone()


def _in_compute_dtype(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """``t`` itself when it is already in the compute dtype, else a copy in it (rounded back on store)."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _select_and_restore(bucket: Bucket, i: int, new_param: Tensor, old: Tensor, options: AdamWOptions) -> None:
    """Give the unselected entries of ``new_param`` the value ``old`` holds for them; record the selection."""
    tensors = bucket.tensors(i)
    keep = keep_mask(tensors["exp_avgs"], options.fraction, options.block_size)
    if tensors["selections"] is not None:
        np.equal(keep, 0, out=tensors["selections"].numpy())
    soft_mask = tensors["soft_masks"]
    if soft_mask is not None and options.soft_mask_mode == "update":
        # The mask scales the update inside the fused formula: the reference's update, from the stored moments.
        vmax = tensors["max_exp_avg_sqs"] if options.amsgrad else None
        moments = reference.Moments(tensors["exp_avgs"].to(old.dtype), tensors["exp_avg_sqs"].to(old.dtype),
                                    None if vmax is None else vmax.to(old.dtype))
        new_param.copy_(reference.apply_update(old, moments, torch.from_numpy(keep == 0), step=float(tensors["steps"]),
                                               options=options, soft_mask=soft_mask))
    elif options.fraction < 1:
        # new ^= (new ^ old) & keep: a bit blend, 15x faster than numpy's or torch's masked copies on CPU.
        new_bits, old_bits = (t.numpy().view(keep.dtype) for t in (new_param, old))
        difference = np.bitwise_xor(new_bits, old_bits)
        np.bitwise_and(difference, keep, out=difference)
        np.bitwise_xor(new_bits, difference, out=new_bits)


def keep_mask(exp_avg: Tensor, fraction: float, block_size: int | None) -> np.ndarray:
    """Which entries MoFO leaves alone, shaped like ``exp_avg``: all bits set (-1) where an entry keeps its
    value, 0 where it is selected, the selection of :func:`selopt.selection.selection_mask` by a linear-time select.

    An integer mask as wide as the compute dtype, so that applying it is a bit blend.

    >>> keep_mask(torch.tensor([0.1, -3.0, 2.0, 0.5]), 0.5, None).tolist()
    [-1, 0, 0, -1]
    """
    m = exp_avg.detach()
    m = m.float() if m.dtype not in (torch.float32, torch.float64) else m
    values = m.numpy()
    key_dtype = np.dtype(np.int64 if values.dtype == np.float64 else np.int32)
    if fraction >= 1:
        return np.zeros(values.shape, dtype=key_dtype)  # dense AdamW: every entry, zeros included
    # |m|'s bit pattern (sign bit cleared) orders like |m|; a fresh contiguous array in m's logical order.
    keys = np.bitwise_and(values.view(key_dtype), np.iinfo(key_dtype).max).reshape(-1)
    n = keys.size
    block = n if block_size is None else block_size
    whole = n // block * block if n else 0
    for start, stop, width in ((0, whole, block), (whole, n, n - whole)):
        if stop > start:
            rows = keys[start:stop].reshape(-1, width)
            rank = width - block_k(fraction, width)  # the k-th largest is at this index in ascending order
            kth = np.partition(rows, rank, axis=1)[:, rank:rank + 1]
            # key - threshold is negative exactly where key < threshold (no overflow: both are below 2^31 or
            # 2^63), and the arithmetic shift spreads its sign bit over the word.
            np.subtract(rows, np.clip(kth, MIN_THRESHOLD, INF_KEY[key_dtype] + 1), out=rows)
    np.right_shift(keys, keys.itemsize * 8 - 1, out=keys)
    return keys.reshape(values.shape)


def _store_param(param: Tensor, new_param: Tensor, bucket: Bucket, i: int, options: AdamWOptions) -> None:
    """Round the compute-dtype ``new_param`` once into ``param``, stochastically for bf16 when asked."""
    if options.stochastic_rounding and param.dtype == torch.bfloat16:
        seed = bucket.column("rounding_seeds")[i]
        step = float(bucket.steps[i])
        generator = None if seed is None else reference.rounding_generator(seed, step, param.device)
        new_param = reference.stochastic_round_to_bf16(new_param, generator)
    param.copy_(new_param)
