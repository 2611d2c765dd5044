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

Rounds 3 and 4 read either ``m`` again or, when the last step's threshold
predicts this one, a short *candidate list* that step 1 wrote: the keys inside
a *window* around that threshold. The threshold is exact either way; the
window only chooses what the rounds read. docs/design.md §3 explains the
window (its state, its counters, how it moves) in one place; everything of it
lives in this module and the select state's ``d.STATE_*`` columns.

Nine launches for the whole bucket (after the step's scalars,
:mod:`selopt.kernels.steps`): in each refinement round a row's programs work
in one of two kernels, over the list or over ``m``, and stop at once in the
other. No host synchronisation; scratch per row is a histogram of
``d.RADIX_BINS`` counters, the select state (``select_state.STATE_*``, kept between
steps) and the candidate list.
"""

import functools
from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor

from selopt import quantization, selection
from selopt.kernels import device as d
from selopt.kernels import select_state as s
from selopt.kernels.launch import Launch
from selopt.kernels.steps import step_scalars_launch

CHUNK = 4096
# A chunk holds whole blocks of 8-bit moments (segments of block_size >= QUANT_BLOCK hold whole chunks' worth).
assert CHUNK % quantization.QUANT_BLOCK == 0

# The rounds of selopt.selection for int32 keys. The first round sees every key and uses a register
# histogram (8 exponent bits + 2 mantissa bits: its cost grows with the bins, so few); the others
# see only the boundary bin's keys, or the candidate list.
ROUNDS = selection.RADIX_ROUNDS[torch.int32]
(FIRST_SHIFT, FIRST_BITS), *REFINEMENTS = ROUNDS
_NUM_WARPS = 8

# Four counters per row after the first round's bins, so that a sharded tensor's all-reduce of that
# round's histogram sums them too: keys above the window, keys inside it, lists more than half full,
# lists that overflowed.
_ABOVE_WINDOW = tl.constexpr(1 << FIRST_BITS)
_IN_WINDOW = tl.constexpr((1 << FIRST_BITS) + 1)
_CROWDED = tl.constexpr((1 << FIRST_BITS) + 2)
_OVERFLOWED = tl.constexpr((1 << FIRST_BITS) + 3)
FIRST_ROUND_COUNTERS = (1 << FIRST_BITS) + 4
assert FIRST_ROUND_COUNTERS <= selection.RADIX_BINS
# Counts a sharded tensor's shards sum per step (selopt.distributed): every round's histogram, the first
# with the window's counters.
EXCHANGED_COUNTS = FIRST_ROUND_COUNTERS + sum(1 << bits for _, bits in REFINEMENTS)
# Keys relative to the window's low end have only the refinement rounds' bits: the window is at most
# that wide (a quarter octave of |m|), starts an eighth of an octave wide, and never reaches past
# the largest key.
_MAX_WINDOW_BITS = tl.constexpr(FIRST_SHIFT)
_FIRST_WINDOW_BITS = tl.constexpr(FIRST_SHIFT - 1)
_MAX_WINDOW_LOW = tl.constexpr(2**31 - 1 - (1 << FIRST_SHIFT))


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
def _window(state):
    """The row's candidate window, [low, low + width) in key units, centred on the last threshold (width 0: none)."""
    bits = tl.load(state + s.STATE_WINDOW_BITS).to(tl.int32)
    width = tl.where(bits > 0, 1 << bits, 0)
    low = tl.load(state + s.STATE_THRESHOLD).to(tl.int32) - width // 2
    return tl.minimum(tl.maximum(low, 0), _MAX_WINDOW_LOW), width


@triton.jit
def _candidates(row_ptr, state):
    """The row's candidate list and its capacity."""
    capacity = (tl.load(row_ptr + d.COL_NUMEL) + s.CANDIDATE_SHARE - 1) // s.CANDIDATE_SHARE
    return tl.load(state + s.STATE_CANDIDATES).to(tl.pointer_type(tl.int32)), capacity


@triton.jit
def _collect_candidates(row_ptr, state, histogram_row_ptr, key):
    """Append the tile's keys inside the window to the row's list; count them and the keys above it."""
    low, width = _window(state)
    if width > 0:
        inside = (key >= low) & (key - low < width)
        inside_count = tl.sum(inside.to(tl.int32), axis=0)
        above_count = tl.sum((key >= low + width).to(tl.int32), axis=0)
        tl.atomic_add(histogram_row_ptr + _ABOVE_WINDOW, above_count.to(tl.int64), sem="relaxed")
        if inside_count > 0:
            tl.atomic_add(histogram_row_ptr + _IN_WINDOW, inside_count.to(tl.int64), sem="relaxed")
            # One atomic per tile reserves its slots; the scan places each key in them, in lane order.
            first = tl.atomic_add(state + s.STATE_LIST_COUNT, inside_count.to(tl.int64), sem="relaxed")
            slots = first + tl.cumsum(inside.to(tl.int32), axis=0) - 1
            candidates, capacity = _candidates(row_ptr, state)
            tl.store(candidates + slots, key, mask=inside & (slots < capacity))
            # The reservations tile [0, keys in the window): one tile crosses each mark the list passes.
            last = first + inside_count
            if (first <= capacity // 2) & (last > capacity // 2):
                tl.atomic_add(histogram_row_ptr + _CROWDED, 1, sem="relaxed")
            if (first <= capacity) & (last > capacity):
                tl.atomic_add(histogram_row_ptr + _OVERFLOWED, 1, sem="relaxed")


@triton.jit
def _moments_histogram_kernel(
    table, program_rows, histogram, select_state, beta2, lerp_weight, one_minus_beta2, grad_scale_ptr,
    found_inf_ptr, code_values, code_buckets, CHUNK: tl.constexpr, ALIGNED: tl.constexpr, BIN_SHIFT: tl.constexpr,
    BIN_BITS: tl.constexpr, PARAM_DTYPE: tl.constexpr, MOMENT_DTYPE: tl.constexpr, QUANT_BLOCK: tl.constexpr,
    AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
    SOFT_MASK: tl.constexpr, SOFT_MASK_ON_GRAD: tl.constexpr, GRAD_SCALE: tl.constexpr,
    FOUND_INF: tl.constexpr, LERP_FROM_END: tl.constexpr,
):
    row, row_ptr, start, lanes, in_block, store_mask = d.tile_of(
        table, program_rows, found_inf_ptr, CHUNK, FOUND_INF, ALIGNED, QUANT_BLOCK)
    g, _ = d.load_step_gradient(row_ptr, start, lanes, in_block, grad_scale_ptr, PARAM_DTYPE,
                                GRAD_SCALE, MAXIMIZE, SOFT_MASK, SOFT_MASK_ON_GRAD, ALIGNED)
    m, _ = d.update_moments(row_ptr, start, lanes, in_block, store_mask, g, lerp_weight, beta2,
                            one_minus_beta2, code_values, code_buckets, found_inf_ptr, AMSGRAD, LERP_FROM_END,
                            MOMENT_DTYPE, QUANT_BLOCK, FOUND_INF, ALIGNED)
    key = tl.where(in_block, d.magnitude_key(m), d.PADDING_KEY)
    histogram_row = histogram + row.to(tl.int64) * d.RADIX_BINS
    _accumulate_histogram(histogram_row, key, 0, BIN_SHIFT, BIN_BITS, SPARSE=False)
    _collect_candidates(row_ptr, select_state + row.to(tl.int64) * s.STATE_COLUMNS, histogram_row, key)


@triton.jit
def _refine_from_m_kernel(
    table, program_rows, histogram, select_state, code_values,
    CHUNK: tl.constexpr, ALIGNED: tl.constexpr, BIN_SHIFT: tl.constexpr, BIN_BITS: tl.constexpr,
    MOMENT_DTYPE: tl.constexpr, QUANT_BLOCK: tl.constexpr,
):
    """A refinement round over ``m``, for the rows whose window missed; the others' programs stop at once."""
    row, row_ptr, start, lanes, in_block, _ = d.tile_of(table, program_rows, table, CHUNK, False, ALIGNED,
                                                        QUANT_BLOCK)
    state = select_state + row.to(tl.int64) * s.STATE_COLUMNS
    if tl.load(state + s.STATE_FROM_LIST) == 0:
        m = d.load_moment(row_ptr, d.COL_EXP_AVG, d.COL_EXP_AVG_SCALE, start, lanes, in_block, code_values, True,
                          MOMENT_DTYPE, QUANT_BLOCK, ALIGNED)
        key = tl.where(in_block, d.magnitude_key(m), d.PADDING_KEY)
        _accumulate_histogram(histogram + row.to(tl.int64) * d.RADIX_BINS, key, tl.load(state + s.STATE_PREFIX),
                              BIN_SHIFT, BIN_BITS, SPARSE=True)


@triton.jit
def _refine_from_list_kernel(
    table, program_rows, histogram, select_state,
    CHUNK: tl.constexpr, BIN_SHIFT: tl.constexpr, BIN_BITS: tl.constexpr,
):
    """A refinement round over the candidate list, for the rows whose window holds the k-th largest key.

    The list's keys, relative to the window's low end, are all the round
    needs. It spans at most 1/``s.CANDIDATE_SHARE`` of the row's programs;
    the others, and those of the rows that read ``m``, stop at once.
    """
    row, row_ptr, start, lanes, _, _ = d.tile_of(table, program_rows, table, CHUNK, False, False, 0)
    state = select_state + row.to(tl.int64) * s.STATE_COLUMNS
    candidates, capacity = _candidates(row_ptr, state)
    listed = tl.minimum(tl.load(state + s.STATE_LIST_COUNT), capacity) - start
    if (tl.load(state + s.STATE_FROM_LIST) != 0) & (listed > 0):
        in_list = lanes < tl.minimum(listed, CHUNK).to(tl.int32)
        key = tl.load(candidates + start + lanes, mask=in_list, other=0)
        key = tl.where(in_list, key - tl.load(state + s.STATE_BASE).to(tl.int32), d.PADDING_KEY)
        _accumulate_histogram(histogram + row.to(tl.int64) * d.RADIX_BINS, key, tl.load(state + s.STATE_PREFIX),
                              BIN_SHIFT, BIN_BITS, SPARSE=True)


@triton.jit
def _read_from_list_or_m(histogram_row_ptr, state, k, prefix, rank):
    """After the first round: read the candidate list when it holds the k-th largest key, else ``m``;
    then move the window for the next step."""
    low, width = _window(state)
    above_window = tl.load(histogram_row_ptr + _ABOVE_WINDOW)
    overflowed = tl.load(histogram_row_ptr + _OVERFLOWED)
    in_list = (width > 0) & (overflowed == 0) & (above_window < k) & (
        k <= above_window + tl.load(histogram_row_ptr + _IN_WINDOW))
    tl.store(state + s.STATE_PREFIX, tl.where(in_list, 0, prefix))
    tl.store(state + s.STATE_RANK, tl.where(in_list, k - above_window, rank))
    tl.store(state + s.STATE_BASE, tl.where(in_list, low, 0).to(tl.int64))
    tl.store(state + s.STATE_FROM_LIST, in_list.to(tl.int64))
    # As wide as the list holds, which catches the most movement of the threshold: narrower after an
    # overflow, wider while every list stays at most half full (a power of two wider about doubles
    # its keys). The window is re-centred on every threshold.
    bits = tl.load(state + s.STATE_WINDOW_BITS)
    crowded = tl.load(histogram_row_ptr + _CROWDED)
    bits = tl.where(overflowed > 0, tl.maximum(bits - 1, 1),
                    tl.where(crowded == 0, tl.minimum(bits + 1, _MAX_WINDOW_BITS), bits))
    tl.store(state + s.STATE_WINDOW_BITS, tl.where(width > 0, bits, _FIRST_WINDOW_BITS))


@triton.jit
def _select_bin_kernel(table, histogram, select_state, FIRST_ROUND: tl.constexpr, LAST_ROUND: tl.constexpr,
                       BIN_BITS: tl.constexpr):
    """One program per row: the bin that holds the k-th largest key, then clear the histogram."""
    row = tl.program_id(0).to(tl.int64)
    histogram_row = histogram + row * d.RADIX_BINS
    state = select_state + row * s.STATE_COLUMNS
    bins = tl.arange(0, 1 << BIN_BITS)
    counts = tl.load(histogram_row + bins)
    if FIRST_ROUND:
        rank = tl.load(table + row * d.NUM_COLUMNS + d.COL_K_FULL)
        prefix = rank * 0
    else:
        prefix = tl.load(state + s.STATE_PREFIX)
        rank = tl.load(state + s.STATE_RANK)
    at_or_above = tl.sum(counts, axis=0) - tl.cumsum(counts, axis=0) + counts
    # The highest bin with at least `rank` keys at or above it. When the row has fewer keys than
    # `rank`, no bin qualifies and bin 0 is taken every round: the threshold is then raised to the
    # lowest one, which selects every non-zero |m|.
    boundary = tl.max(tl.where(at_or_above >= rank, bins, 0), axis=0)
    above = tl.sum(tl.where(bins > boundary, counts, 0), axis=0)
    prefix = (prefix << BIN_BITS) | boundary
    if LAST_ROUND:
        tl.store(state + s.STATE_THRESHOLD, d.selection_threshold(tl.load(state + s.STATE_BASE) + prefix))
        tl.store(state + s.STATE_LIST_COUNT, 0)
    elif FIRST_ROUND:
        _read_from_list_or_m(histogram_row, state, rank, prefix, rank - above)
        counters = _ABOVE_WINDOW + tl.arange(0, 4)
        tl.store(histogram_row + counters, tl.zeros_like(counters).to(tl.int64))
    else:
        tl.store(state + s.STATE_PREFIX, prefix)
        tl.store(state + s.STATE_RANK, rank - above)
    tl.store(histogram_row + bins, tl.zeros_like(counts))


@triton.jit
def _exact_update_kernel(
    table, program_rows, step_scalars, select_state, eps, found_inf_ptr, code_values,
    CHUNK: tl.constexpr, ALIGNED: tl.constexpr,
    PARAM_DTYPE: tl.constexpr, MOMENT_DTYPE: tl.constexpr, QUANT_BLOCK: tl.constexpr, AMSGRAD: tl.constexpr,
    DECAY_SELECTED: tl.constexpr, SOFT_MASK: tl.constexpr, SOFT_MASK_ON_UPDATE: tl.constexpr,
    FOUND_INF: tl.constexpr, STOCHASTIC_ROUNDING: tl.constexpr, WRITE_SELECTION: tl.constexpr,
):
    row, row_ptr, start, lanes, in_block, store_mask = d.tile_of(
        table, program_rows, found_inf_ptr, CHUNK, FOUND_INF, ALIGNED, QUANT_BLOCK)
    # The moments as the first kernel stored them (8-bit ones read back as that kernel's own update read them).
    m = d.load_moment(row_ptr, d.COL_EXP_AVG, d.COL_EXP_AVG_SCALE, start, lanes, in_block, code_values, True,
                      MOMENT_DTYPE, QUANT_BLOCK, ALIGNED)
    second_column = d.COL_MAX_EXP_AVG_SQ if AMSGRAD else d.COL_EXP_AVG_SQ
    second_moment = d.load_moment(row_ptr, second_column, d.COL_EXP_AVG_SQ_SCALE, start, lanes, in_block,
                                  code_values, False, MOMENT_DTYPE, QUANT_BLOCK, ALIGNED)
    threshold = tl.load(select_state + row.to(tl.int64) * s.STATE_COLUMNS + s.STATE_THRESHOLD).to(tl.int32)
    selected = d.magnitude_key(m) >= threshold  # padding lanes (m = 0) are below every threshold
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
    launches = [
        step_scalars_launch(plan, values),
        Launch.bind(_moments_histogram_kernel, grid, {**values, "BIN_SHIFT": FIRST_SHIFT, "BIN_BITS": FIRST_BITS},
                    _NUM_WARPS),
        # The window's counters travel with the first round's histogram.
        *_combined(plan, FIRST_ROUND_COUNTERS, combine),
        Launch.bind(_select_bin_kernel, per_row,
                    {**values, "FIRST_ROUND": True, "LAST_ROUND": False, "BIN_BITS": FIRST_BITS}, _NUM_WARPS),
    ]
    for index, (shift, bits) in enumerate(REFINEMENTS):
        launches += [
            # Each row reads either its list or m: one of the two launches does its work.
            Launch.bind(_refine_from_list_kernel, grid, {**values, "BIN_SHIFT": shift, "BIN_BITS": bits}, _NUM_WARPS),
            Launch.bind(_refine_from_m_kernel, grid, {**values, "BIN_SHIFT": shift, "BIN_BITS": bits}, _NUM_WARPS),
            *_combined(plan, 1 << bits, combine),
            Launch.bind(_select_bin_kernel, per_row, {**values, "FIRST_ROUND": False,
                                                      "LAST_ROUND": index == len(REFINEMENTS) - 1,
                                                      "BIN_BITS": bits}, _NUM_WARPS),
        ]
    launches.append(Launch.bind(_exact_update_kernel, grid, values, _NUM_WARPS))
    return launches


def _combined(plan, counters: int, combine: Callable[[Tensor], None] | None) -> list:
    if combine is None:
        return []
    return [functools.partial(combine, plan.scratch.histogram[:, :counters])]

