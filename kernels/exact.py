"""Exact selection over whole tensors (``block_size=None``, the MoFO paper): radix select on device.

A block of millions of entries does not fit in one program, so the k-th
largest ``|m|`` of each row (a tensor, or a block of it) is found in rounds over the 31 value bits of
its key (:mod:`selopt.selection`), in the rounds of ``selection.RADIX_ROUNDS``:

1. moments + histogram of the top 10 key bits, per row (a register
   histogram per tile, then one atomic per non-empty bin);
2. per row, the boundary bin: the bin holding the k-th largest, and the
   rank still to find inside it;
3. histogram of the next 11 bits among the keys in that bin (one atomic per
   such key: they are few), then select again;
4. the same for the last 10 bits: the exact threshold;
5. the masked update, as the one-pass kernel's.

Seven launches for the whole bucket (after the step's scalars,
:mod:`selopt.kernels.steps`) and no host synchronisation; scratch is a
histogram of ``d.RADIX_BINS`` counters and two scalars per row, never per
element. Bytes per fp32 element: 20 (moments) + 4 + 4 (two rereads of m) +
16 (update) = 44, against 28 for AdamW.
"""

import functools
from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor

from selopt import selection
from selopt.kernels import _device as d
from selopt.kernels.launch import Launch
from selopt.kernels.steps import step_scalars_launch

CHUNK = 4096
# The rounds of selopt.selection for int32 keys. The first round sees every key and uses a register
# histogram (8 exponent bits + 2 mantissa bits: its cost grows with the bins, so few); the others
# see only the boundary bin's keys.
ROUNDS = selection.RADIX_ROUNDS[torch.int32]
_NUM_WARPS = 8


@triton.jit
def _accumulate_histogram(histogram_row_ptr, key, prefix, BIN_SHIFT: tl.constexpr, BIN_BITS: tl.constexpr,
                          SPARSE: tl.constexpr):
    # Only keys whose bits above this round equal the prefix found so far take part.
    candidate = (key >= 0) & ((key >> (BIN_SHIFT + BIN_BITS)) == prefix)
    bins = tl.where(candidate, (key >> BIN_SHIFT) & ((1 << BIN_BITS) - 1), 0)
    # Relaxed atomics: the counts are read by the next launch, which the kernel boundary orders;
    # the default (acq_rel) fences the whole GPU around every atomic.
    if SPARSE:
        # Refinement rounds: only the few keys inside the boundary bin count, so one atomic per
        # candidate is cheaper than a register histogram, whose cost grows with the bin count.
        tl.atomic_add(histogram_row_ptr + bins, tl.full(bins.shape, 1, tl.int64), mask=candidate, sem="relaxed")
    else:
        counts = tl.histogram(bins, 1 << BIN_BITS, mask=candidate)
        # One atomic per non-empty bin of the tile, not per element: |m| of a tile spans few bins.
        tl.atomic_add(histogram_row_ptr + tl.arange(0, 1 << BIN_BITS), counts.to(tl.int64), mask=counts > 0,
                      sem="relaxed")


@triton.jit
def _moments_histogram_kernel(
    table, program_rows, histogram, beta2, lerp_weight, one_minus_beta2, grad_scale_ptr, found_inf_ptr,
    CHUNK: tl.constexpr, ALIGNED: tl.constexpr, BIN_SHIFT: tl.constexpr, BIN_BITS: tl.constexpr,
    PARAM_DTYPE: tl.constexpr, MOMENT_DTYPE: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
    SOFT_MASK: tl.constexpr, SOFT_MASK_ON_GRAD: tl.constexpr, GRAD_SCALE: tl.constexpr,
    FOUND_INF: tl.constexpr, LERP_FROM_END: tl.constexpr,
):
    row, row_ptr, start, lanes, in_block, store_mask = d.tile_of(
        table, program_rows, found_inf_ptr, CHUNK, FOUND_INF, ALIGNED)
    g, _ = d.load_step_gradient(row_ptr, start, lanes, in_block, grad_scale_ptr, PARAM_DTYPE,
                                GRAD_SCALE, MAXIMIZE, SOFT_MASK, SOFT_MASK_ON_GRAD, ALIGNED)
    m, _ = d.update_moments(row_ptr, start, lanes, in_block, store_mask, g, lerp_weight, beta2,
                            one_minus_beta2, AMSGRAD, LERP_FROM_END, MOMENT_DTYPE, ALIGNED)
    key = d.magnitude_key(m, in_block)
    _accumulate_histogram(histogram + row.to(tl.int64) * d.RADIX_BINS, key, 0, BIN_SHIFT, BIN_BITS, SPARSE=False)


@triton.jit
def _refine_histogram_kernel(
    table, program_rows, histogram, select_state,
    CHUNK: tl.constexpr, ALIGNED: tl.constexpr, BIN_SHIFT: tl.constexpr, BIN_BITS: tl.constexpr,
    MOMENT_DTYPE: tl.constexpr,
):
    row, row_ptr, start, lanes, in_block, _ = d.tile_of(table, program_rows, table, CHUNK, False, ALIGNED)
    prefix = tl.load(select_state + row.to(tl.int64) * 2)
    m = tl.load(d.stream(row_ptr, d.COL_EXP_AVG, start, lanes, MOMENT_DTYPE, ALIGNED), mask=in_block, other=0.0)
    key = d.magnitude_key(m.to(tl.float32), in_block)
    _accumulate_histogram(histogram + row.to(tl.int64) * d.RADIX_BINS, key, prefix, BIN_SHIFT, BIN_BITS, SPARSE=True)


@triton.jit
def _select_bin_kernel(table, histogram, select_state, FIRST_ROUND: tl.constexpr, BIN_BITS: tl.constexpr):
    """One program per row: the bin that holds the k-th largest key, then clear the histogram."""
    row = tl.program_id(0).to(tl.int64)
    bins = tl.arange(0, 1 << BIN_BITS)
    counts = tl.load(histogram + row.to(tl.int64) * d.RADIX_BINS + bins)
    if FIRST_ROUND:
        rank = tl.load(table + row * d.NUM_COLUMNS + d.COL_K_FULL)
        prefix = rank * 0
    else:
        prefix = tl.load(select_state + row.to(tl.int64) * 2)
        rank = tl.load(select_state + row.to(tl.int64) * 2 + 1)
    at_or_above = tl.sum(counts, axis=0) - tl.cumsum(counts, axis=0) + counts
    # The highest bin with at least `rank` keys at or above it. When there are fewer candidates
    # than `rank` (NaNs), no bin qualifies, bin 0 is taken every round: threshold 0 selects them all.
    boundary = tl.max(tl.where(at_or_above >= rank, bins, 0), axis=0)
    above = tl.sum(tl.where(bins > boundary, counts, 0), axis=0)
    tl.store(select_state + row.to(tl.int64) * 2, (prefix << BIN_BITS) | boundary)
    tl.store(select_state + row.to(tl.int64) * 2 + 1, rank - above)
    tl.store(histogram + row.to(tl.int64) * d.RADIX_BINS + bins, tl.zeros_like(counts))


@triton.jit
def _exact_update_kernel(
    table, program_rows, step_scalars, select_state, eps, found_inf_ptr,
    CHUNK: tl.constexpr, ALIGNED: tl.constexpr,
    PARAM_DTYPE: tl.constexpr, MOMENT_DTYPE: tl.constexpr, AMSGRAD: tl.constexpr,
    DECAY_SELECTED: tl.constexpr, SOFT_MASK: tl.constexpr, SOFT_MASK_ON_UPDATE: tl.constexpr,
    FOUND_INF: tl.constexpr, STOCHASTIC_ROUNDING: tl.constexpr, WRITE_SELECTION: tl.constexpr,
):
    row, row_ptr, start, lanes, in_block, store_mask = d.tile_of(
        table, program_rows, found_inf_ptr, CHUNK, FOUND_INF, ALIGNED)
    m = tl.load(d.stream(row_ptr, d.COL_EXP_AVG, start, lanes, MOMENT_DTYPE, ALIGNED), mask=in_block, other=0.0)
    m = m.to(tl.float32)
    second_column = d.COL_MAX_EXP_AVG_SQ if AMSGRAD else d.COL_EXP_AVG_SQ
    second_moment = tl.load(d.stream(row_ptr, second_column, start, lanes, MOMENT_DTYPE, ALIGNED),
                            mask=in_block, other=0.0).to(tl.float32)
    selected = d.magnitude_key(m, in_block) >= tl.load(select_state + row.to(tl.int64) * 2).to(tl.int32)
    scale = 1.0
    if SOFT_MASK_ON_UPDATE:
        scale = d.load_soft_mask(row_ptr, start, lanes, in_block)
    d.update_param(row_ptr, start, lanes, in_block, store_mask, step_scalars, m, second_moment, selected, scale,
                   eps, PARAM_DTYPE, DECAY_SELECTED, SOFT_MASK_ON_UPDATE, STOCHASTIC_ROUNDING,
                   WRITE_SELECTION, ALIGNED)


def exact_adamw_launches(plan, values: dict, combine: Callable[[Tensor], None] | None = None) -> list:
    """The step's scalars, then the exact path over ``plan`` (:mod:`selopt.kernels.tables`).

    ``values`` holds the step's arguments and flags by kernel parameter name.
    ``combine``, for shards of larger tensors, runs before each bin choice on
    the round's histogram (a ``[rows, bins]`` view) and sums it with the other
    shards' (an all-reduce): every shard then chooses the whole tensor's bins.
    """
    grid, per_row = (plan.num_programs,), (plan.num_rows,)
    values = {**values, "CHUNK": CHUNK}
    (shift, bits), *refinements = ROUNDS
    launches = [
        step_scalars_launch(plan, values),
        Launch.bind(_moments_histogram_kernel, grid, {**values, "BIN_SHIFT": shift, "BIN_BITS": bits}, _NUM_WARPS),
        *_combined(plan, bits, combine),
        Launch.bind(_select_bin_kernel, per_row, {**values, "FIRST_ROUND": True, "BIN_BITS": bits}, _NUM_WARPS),
    ]
    for shift, bits in refinements:
        launches += [
            Launch.bind(_refine_histogram_kernel, grid, {**values, "BIN_SHIFT": shift, "BIN_BITS": bits}, _NUM_WARPS),
            *_combined(plan, bits, combine),
            Launch.bind(_select_bin_kernel, per_row, {**values, "FIRST_ROUND": False, "BIN_BITS": bits}, _NUM_WARPS),
        ]
    launches.append(Launch.bind(_exact_update_kernel, grid, values, _NUM_WARPS))
    return launches


def _combined(plan, bits: int, combine: Callable[[Tensor], None] | None) -> list:
    if combine is None:
        return []
    return [functools.partial(combine, plan.histogram[:, :1 << bits])]
