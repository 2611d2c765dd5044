"""The fast CPU implementation: torch's fused AdamW kernel plus a linear-time select per block.

What ``backend="auto"`` runs for CPU tensors (the reference, :mod:`selopt.reference`,
stays the ground truth and runs with ``backend="torch"``). One step of a bucket:

1. every tensor's moments and a *candidate* parameter come from torch's
   fused AdamW kernel (``torch._fused_adamw_``, as ``torch.optim.AdamW(fused=True)``):
   one pass over memory in place of the reference's dozen. A dense bucket is
   one call; under MoFO each tensor, piece by piece (:data:`PIECE`), keeps
   its old value first and goes through steps 2-3 while the piece is in cache;
2. per block, the threshold is the k-th largest key of ``|m|`` as stored
   (:mod:`selopt.selection`'s keys, NaN above every number, zero never) by
   numpy's introselect: linear time, and 14x faster than ``torch.kthvalue``
   on CPU (bench/NOTES.md §7);
3. the unselected entries get back their old value, decayed under
   ``decay="all"`` (bit for bit the reference's ``p * (1 - lr * wd)``), by a
   blend of bit patterns under an integer mask (bench/NOTES.md §7: masked
   copies, torch's ``where`` or numpy's ``where=``, are 4-6x slower on CPU).

The moments of the selected entries and the whole of ``m`` and ``v`` are the
fused kernel's, so they round as ``torch.optim.AdamW(fused=True)`` does, not
as the reference's for-loop: within the kernels' tolerances of the reference,
with the selection equal to the reference's selection of the stored ``m``.
Low-precision params (and the moments of bf16/fp16 moment state) step in fp32
copies and are rounded once on store, stochastically when asked; a soft mask
in ``"update"`` mode applies the reference's update to the stored moments.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from selopt import reference
from selopt.bucket import Bucket
from selopt.options import AdamWOptions
from selopt.selection import MIN_THRESHOLD, block_k

# The integer view of each compute dtype's bits (the keys of selopt.selection), and its sign-clearing mask.
KEY_DTYPES = {torch.float32: np.dtype(np.int32), torch.float64: np.dtype(np.int64)}
KEY_MAX = {np.dtype(np.int32): np.int32(2**31 - 1), np.dtype(np.int64): np.int64(2**63 - 1)}
# The largest key below NaN's: inf's. A threshold is never above it plus one, so every NaN (whatever
# its payload bits, which numpy's select sees) ranks at the top and ties with every other NaN.
INF_KEY = {np.dtype(np.int32): 0x7F800000, np.dtype(np.int64): 0x7FF0000000000000}
# Entries per piece of the select and the blend: a piece's keys, m, old and new param (1 MiB in fp32)
# stay in a core's L2 between the passes, which otherwise each stream a large tensor from DRAM.
PIECE = 1 << 16
MOMENT_FIELDS = ("exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs")


class Scratch:
    """The implementation's cache: two work buffers per dtype, grown to the largest tensor stepped.

    Reused from step to step because a fresh large buffer is page-faulted in on
    every step (about 20 ms for 64 MB on the 2-core VM of bench/NOTES.md §7,
    as long as torch's whole fused step of a 2^24-entry tensor).
    """

    def __init__(self):
        self.held: dict[torch.dtype, tuple[Tensor, Tensor]] = {}

    def buffers(self, numel: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        pair = self.held.get(dtype)
        if pair is None or pair[0].numel() < numel:
            pair = self.held[dtype] = (torch.empty(numel, dtype=dtype), torch.empty(numel, dtype=dtype))
        return pair[0][:numel], pair[1][:numel]


def prepare_adamw(bucket: Bucket, options: AdamWOptions, *, grad_scale: Tensor | None = None,
                  found_inf: Tensor | None = None, cache: Scratch | None = None):
    """The fused CPU implementation of :func:`selopt.functional.prepare_adamw`; ``cache`` a :class:`Scratch`
    (a new one per call when None).

    ``found_inf`` is read on the host (a CPU tensor: no synchronisation to
    speak of); when set, nothing changes, counts included.

    >>> p, g = torch.zeros(4), torch.tensor([1.0, -4.0, 2.0, 0.5])
    >>> b = Bucket([p], [g], [torch.zeros(4)], [torch.zeros(4)], [torch.tensor(0.0)])
    >>> prepare_adamw(b, AdamWOptions(lr=0.1, weight_decay=0.0, fraction=0.5))()
    >>> [round(x, 6) for x in p.tolist()]  # the fused kernel rounds a little differently from the reference
    [0.0, 0.1, -0.1, 0.0]
    """
    scratch = Scratch() if cache is None else cache

    def step() -> None:
        if found_inf is not None and bool(found_inf):
            return
        with torch.no_grad():
            torch._foreach_add_(list(bucket.steps), 1.0)  # the fused kernel reads the count after this step
            _step(bucket, options, grad_scale, scratch)
    return step


def _step(bucket: Bucket, options: AdamWOptions, grad_scale: Tensor | None, scratch: Scratch) -> None:
    masks = bucket.column("soft_masks")
    # torch's fused kernel writes the unscaled gradient back into the grad: a scaled or masked gradient
    # goes to it as the reference's effective gradient, computed apart, so the grads stay as they were.
    effective = grad_scale is not None or options.soft_mask_mode == "grad" and any(s is not None for s in masks)
    indices = [i for i, p in enumerate(bucket.params) if p.numel()]
    if options.fraction >= 1 and (options.soft_mask_mode == "grad" or all(s is None for s in masks)):
        # Dense: one fused call for the bucket, as torch.optim.AdamW(fused=True) makes; straight on the
        # bucket's tensors when they are all in the compute dtype (no working dict per tensor).
        if not effective and {bucket.params[0].dtype, bucket.exp_avgs[0].dtype} in ({torch.float32}, {torch.float64}):
            def column(name: str) -> list[Tensor]:
                return [getattr(bucket, name)[i] for i in indices]

            _fused_call([bucket.params[i].detach() for i in indices], column("grads"), column("exp_avgs"),
                        column("exp_avg_sqs"), column("max_exp_avg_sqs") if options.amsgrad else [],
                        column("steps"), options, effective)
            for selection in bucket.column("selections"):
                if selection is not None:
                    selection.fill_(True)
            return
        works = [_working(bucket, i, options, grad_scale, effective) for i in indices]
        _fused_adamw(works, options, effective)
        for work in works:
            if work["selections"] is not None:
                work["selections"].fill_(True)
            _finish(work, options)
        return
    # Tensor after tensor: spreading them over a pool of threads was slower at 2 threads (numpy's calls and
    # torch's own threads contend; bench/NOTES.md §7).
    for i in indices:
        _select_step(bucket, i, options, grad_scale, effective, scratch)


def _working(bucket: Bucket, i: int, options: AdamWOptions, grad_scale: Tensor | None, effective: bool) -> dict:
    """Tensor ``i``'s bucket entries plus what the fused kernel steps: ``new_param``, ``grad`` and the
    moments in the compute dtype (the entries themselves, or copies rounded back by :func:`_fused_adamw`)."""
    tensors = bucket.tensors(i)
    param = tensors["params"].detach()
    dtype = reference.compute_dtype(param.dtype)
    work = dict(tensors, param=param, new_param=_in_compute_dtype(param, dtype),
                **{f"new_{name}": _in_compute_dtype(tensors[name], dtype) for name in MOMENT_FIELDS})
    if effective:
        work["grad"] = reference.effective_grad(param, tensors["grads"], maximize=options.maximize,
                                                soft_mask=tensors["soft_masks"], soft_mask_mode=options.soft_mask_mode,
                                                grad_scale=grad_scale)
    else:
        work["grad"] = _in_compute_dtype(tensors["grads"], dtype)
    return work


def _fused_adamw(works: list[dict], options: AdamWOptions, effective: bool) -> None:
    """torch's fused AdamW kernel over the working tensors, whose moments are then stored (rounded once to
    the state's dtype: what the selection reads)."""
    def column(name: str) -> list[Tensor]:
        return [work[name] for work in works]

    _fused_call(column("new_param"), column("grad"), column("new_exp_avgs"), column("new_exp_avg_sqs"),
                column("new_max_exp_avg_sqs") if options.amsgrad else [], column("steps"), options, effective)
    for work in works:
        for name in MOMENT_FIELDS:
            if work[f"new_{name}"] is not work[name]:
                work[name].copy_(work[f"new_{name}"])


def _fused_call(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                max_exp_avg_sqs: list[Tensor], steps: list[Tensor], options: AdamWOptions, effective: bool) -> None:
    """``torch._fused_adamw_`` with the group's options; ``effective``: the grads are the reference's
    effective gradients (unscaled, negated to maximize, masked)."""
    torch._fused_adamw_(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr=float(options.lr), beta1=options.beta1,
        beta2=options.beta2, weight_decay=options.weight_decay, eps=options.eps, amsgrad=options.amsgrad,
        maximize=options.maximize and not effective)


def _select_step(bucket: Bucket, i: int, options: AdamWOptions, grad_scale: Tensor | None, effective: bool,
                 scratch: Scratch) -> None:
    """One tensor's selective step, piece by piece while each piece is in cache: keep the old value, run the
    fused kernel, select, give the unselected entries their old value back (:func:`keep_mask`)."""
    work = _working(bucket, i, options, grad_scale, effective)
    new_param = work["new_param"]
    masked_update = work["soft_masks"] is not None and options.soft_mask_mode == "update"
    old, keys = (t.view(new_param.shape) for t in scratch.buffers(new_param.numel(), new_param.dtype))
    decays = options.decay == "all" and options.weight_decay != 0 and not masked_update
    decay = 1 - float(options.lr) * options.weight_decay
    stepped = [t for name, t in work.items() if name.endswith(MOMENT_FIELDS) or name in ("new_param", "grad")]
    # A tensor of one piece steps whole: no views to make.
    in_pieces = not masked_update and new_param.numel() > PIECE and all(t is None or t.is_contiguous() for t in stepped)

    def step_span(span: slice | None) -> None:
        # The old value (decayed as the reference decays), then torch's fused kernel, on one run of entries
        # (None: the whole tensor, whatever its strides).
        piece, old_part = (work, old) if span is None else (_entries(work, span), old.view(-1)[span])
        if decays:
            # numpy's multiply, 4x faster than torch's on a tensor of 2^16, rounds the same: both take the
            # factor in the param's dtype (the reference's p * (1 - lr * wd)).
            values = piece["new_param"].numpy()
            np.multiply(values, values.dtype.type(decay), out=old_part.numpy())
        else:
            old_part.copy_(piece["new_param"])
        _fused_adamw([piece], options, effective)

    if not in_pieces:
        step_span(None)
    if masked_update:
        _masked_update(work, new_param, old, keys, options)
    else:
        _restore_unselected(work, new_param, old, keys, options, step_span if in_pieces else None)
    _finish(work, options)


def _entries(work: dict, span: slice) -> dict:
    """``work`` with its stepped tensors (contiguous) narrowed to entries ``span`` of their flattened views."""
    piece = dict(work, new_param=work["new_param"].view(-1)[span], grad=work["grad"].view(-1)[span])
    for name in MOMENT_FIELDS:
        if work[name] is not None:
            piece[name] = work[name].view(-1)[span]
            new = work[f"new_{name}"]
            piece[f"new_{name}"] = piece[name] if new is work[name] else new.view(-1)[span]
    return piece


def _finish(work: dict, options: AdamWOptions) -> None:
    """Round the working param into the param, once, as the reference stores it."""
    if work["new_param"] is not work["param"]:
        work["param"].copy_(reference.as_stored_param(work["new_param"], work["param"], seed=work["rounding_seeds"],
                                                      step=float(work["steps"]), options=options))


def _masked_update(tensors: dict, new_param: Tensor, old: Tensor, keys: Tensor, options: AdamWOptions) -> None:
    """A soft mask scales the update inside the fused formula: the reference's update, from the stored moments."""
    keep = keep_mask(tensors["exp_avgs"], options.fraction, options.block_size, out=keys.numpy())
    if tensors["selections"] is not None:
        np.equal(keep, 0, out=tensors["selections"].numpy())
    vmax = tensors["max_exp_avg_sqs"] if options.amsgrad else None
    moments = reference.Moments(tensors["exp_avgs"].to(old.dtype), tensors["exp_avg_sqs"].to(old.dtype),
                                None if vmax is None else vmax.to(old.dtype))
    new_param.copy_(reference.apply_update(old, moments, torch.from_numpy(keep == 0), step=float(tensors["steps"]),
                                           options=options, soft_mask=tensors["soft_masks"]))


def _restore_unselected(tensors: dict, new_param: Tensor, old: Tensor, keys: Tensor, options: AdamWOptions,
                        step_span: Callable[[slice], None] | None) -> None:
    """Give the unselected entries of ``new_param`` the value ``old`` holds for them; record the selection.
    ``step_span``: what makes a span of ``exp_avg`` final (see :func:`keep_mask`), or None when it is."""
    # Flat numpy views, written in place: a non-contiguous param or selection goes through a copy.
    target = new_param if new_param.is_contiguous() else new_param.contiguous()
    selections = tensors["selections"]
    selected = None if selections is None else selections if selections.is_contiguous() else selections.contiguous()
    key_dtype = KEY_DTYPES[old.dtype]
    new_bits, old_bits = (t.numpy().view(key_dtype).reshape(-1) for t in (target, old))
    selection = None if selected is None else selected.numpy().reshape(-1)

    def blend(piece: slice, keep: np.ndarray) -> None:
        # new ^= (new ^ old) & keep: a bit blend, 4-6x faster than torch's where or numpy's masked copy.
        np.bitwise_xor(old_bits[piece], new_bits[piece], out=old_bits[piece])
        np.bitwise_and(old_bits[piece], keep, out=old_bits[piece])
        np.bitwise_xor(new_bits[piece], old_bits[piece], out=new_bits[piece])
        if selection is not None:
            np.equal(keep, 0, out=selection[piece])

    keep_mask(tensors["exp_avgs"], options.fraction, options.block_size, out=keys.numpy(), before_span=step_span,
              each_piece=blend)
    if target is not new_param:
        new_param.copy_(target)
    if selected is not selections:
        selections.copy_(selected)


def _in_compute_dtype(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """``t`` itself when it is already in the compute dtype, else a copy in it (rounded back on store)."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def keep_mask(exp_avg: Tensor, fraction: float, block_size: int | None, out: np.ndarray | None = None,
              before_span: Callable[[slice], None] | None = None,
              each_piece: Callable[[slice, np.ndarray], None] | None = None) -> np.ndarray:
    """Which entries MoFO leaves alone, shaped like ``exp_avg``: all bits set (-1) where an entry keeps its
    value, 0 where it is selected: the selection of :func:`selopt.selection.selection_mask`, found by a
    linear-time select. An integer as wide as the compute dtype, so that applying it is a bit blend.

    ``out``: where to write it (contiguous, that integer dtype, at least as long). The flattened tensor
    goes span by span (as many whole blocks as fit :data:`PIECE` entries, or one larger block) and piece
    by piece (a span, or :data:`PIECE` entries of a larger block): ``before_span(span)`` is called for
    each piece of a span before the span's thresholds are found (the caller computes that much of
    ``exp_avg``, contiguous, there), and ``each_piece(piece, mask)`` once a piece's mask is final, while
    it is still in cache.

    >>> keep_mask(torch.tensor([0.1, -3.0, 2.0, 0.5]), 0.5, None).tolist()
    [-1, 0, 0, -1]
    """
    m = exp_avg.detach()
    n = m.numel()
    key_dtype = KEY_DTYPES[reference.compute_dtype(m.dtype)]
    keys = np.empty(n, dtype=key_dtype) if out is None else out.view(key_dtype).reshape(-1)[:n]
    stored = m.reshape(-1)  # a view when m is contiguous, as it is wherever before_span writes it
    # m as stored, widened to the compute dtype, as integers. A numpy view sees what before_span writes;
    # a low-precision m is widened piece by piece, once that piece is written.
    bits = stored.numpy().view(key_dtype) if m.dtype in KEY_DTYPES else None

    def magnitudes(piece: slice) -> np.ndarray:
        return bits[piece] if bits is not None else stored[piece].float().numpy().view(key_dtype)

    if fraction >= 1:  # dense AdamW: every entry, zeros included
        for piece in [slice(0, n)] if before_span is not None and n else []:
            before_span(piece)
        keys.fill(0)
        if each_piece is not None:
            each_piece(slice(0, n), keys)
        return keys.reshape(m.shape)
    for start, stop, width in _spans(n, block_size):
        # A span of small blocks is one piece, with a threshold per row; a larger block has one threshold.
        pieces = [slice(a, min(a + PIECE, stop)) for a in range(start, stop, PIECE)] if width > PIECE else [
            slice(start, stop)]
        for piece in pieces if before_span is not None else ():
            before_span(piece)
        # A span of one piece keeps its keys (the select partitions a copy: a heap block, no page faults);
        # a larger block is partitioned in place, its keys made again piece by piece.
        whole_span = len(pieces) == 1
        thresholds = _thresholds(magnitudes(slice(start, stop)), keys[start:stop], width, fraction, whole_span)
        for piece in pieces:
            piece_keys = keys[piece]
            if not whole_span:
                np.bitwise_and(magnitudes(piece), KEY_MAX[key_dtype], out=piece_keys)
            # key - threshold is negative exactly where key < threshold (no overflow: both are below 2^31 or
            # 2^63), and the arithmetic shift spreads its sign bit over the word.
            rows = piece_keys.reshape(-1, width) if width <= PIECE else piece_keys
            np.subtract(rows, thresholds if width <= PIECE else thresholds.item(), out=rows)
            np.right_shift(piece_keys, piece_keys.itemsize * 8 - 1, out=piece_keys)
            if each_piece is not None:
                each_piece(piece, piece_keys)
    return keys.reshape(m.shape)


def _spans(n: int, block_size: int | None) -> list[tuple[int, int, int]]:
    """(start, stop, block width) of the runs of whole blocks that fit a piece, then of the shorter last block."""
    block = n if block_size is None else block_size
    whole = n // block * block
    step = max(block, PIECE // block * block)
    spans = [(start, min(start + step, whole), block) for start in range(0, whole, step)]
    return spans + ([(whole, n, n - whole)] if whole < n else [])


def _thresholds(magnitudes: np.ndarray, scratch: np.ndarray, width: int, fraction: float,
                keep_keys: bool) -> np.ndarray:
    """The threshold key of each block of ``width`` entries of ``magnitudes`` (a column), by numpy's
    introselect on the keys written into ``scratch``: a copy of them when ``keep_keys``, else in place."""
    rows = scratch.reshape(-1, width)
    np.bitwise_and(magnitudes.reshape(-1, width), KEY_MAX[scratch.dtype], out=rows)
    rank = width - block_k(fraction, width)  # the k-th largest is at this index in ascending order
    if keep_keys:
        rows = np.partition(rows, rank, axis=1)
    else:
        rows.partition(rank, axis=1)
    # (np.minimum and np.maximum: np.clip's Python wrapper costs as much as the select of a small block.)
    return np.minimum(np.maximum(rows[:, rank:rank + 1], MIN_THRESHOLD), INF_KEY[scratch.dtype] + 1)
