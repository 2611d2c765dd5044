"""Device-side building blocks shared by the one-pass and the exact kernels.

Every function here is ``@triton.jit`` and pure: it takes values and returns
values; the kernels in :mod:`selopt.kernels.block` and
:mod:`selopt.kernels.exact` do the loads and stores around them.

Launches are described by one int64 table with a row per run of a tensor
(the whole tensor, or one block of the exact path), ``NUM_COLUMNS`` columns wide; the ``COL_*`` constants
name the columns. Pointers are stored as integers and cast back on the device,
so one launch reaches tensors that live in separate allocations. A map
gives each program its row (one load, where a search of the table would be a
chain of dependent loads), and a per-tensor row of ``STEP_SCALARS`` floats,
written by :mod:`selopt.kernels.steps` once per tensor and step, holds the
step's scalars, so no program recomputes them.
"""

import math
import struct

import torch
import triton
import triton.language as tl

from selopt import quantization, selection

COL_PARAM = tl.constexpr(0)
COL_GRAD = tl.constexpr(1)
COL_EXP_AVG = tl.constexpr(2)
COL_EXP_AVG_SQ = tl.constexpr(3)
COL_MAX_EXP_AVG_SQ = tl.constexpr(4)
COL_SOFT_MASK = tl.constexpr(5)
COL_SELECTION = tl.constexpr(6)
COL_NUMEL = tl.constexpr(7)
COL_K_FULL = tl.constexpr(8)  # k of a full program (one-pass) or of the whole row (exact)
COL_K_TAIL = tl.constexpr(9)  # k of the row's last, shorter program (one-pass)
COL_MASK_DIV = tl.constexpr(10)  # elements per soft-mask value; 0 means no soft mask
COL_FIRST_PROGRAM = tl.constexpr(11)  # index of the row's first program in the grid
COL_OFFSET = tl.constexpr(12)  # where the row starts inside its tensor
COL_TENSOR = tl.constexpr(13)  # index of the row's tensor in the bucket (its step-scalars row)
COL_ROUNDING_SEED = tl.constexpr(14)  # address of the tensor's int64 stochastic-rounding seed, or 0
# 8-bit moments: the address of the row's first fp32 scale of exp_avg and of exp_avg_sq (else 0).
COL_EXP_AVG_SCALE = tl.constexpr(15)
COL_EXP_AVG_SQ_SCALE = tl.constexpr(16)
NUM_COLUMNS = tl.constexpr(17)

# Per tensor: step size, 1 / sqrt(bias correction 2), decay factor, step count before the update.
SCALAR_STEP_SIZE = tl.constexpr(0)
SCALAR_INV_BIAS_CORRECTION2_SQRT = tl.constexpr(1)
SCALAR_DECAY = tl.constexpr(2)
SCALAR_STEP = tl.constexpr(3)
STEP_SCALARS = tl.constexpr(4)

# 8-bit moments (selopt.quantization), through two small tables built once per device
# (selopt.kernels.tables.code_tables), a few KiB that stay in L1. ``code_values``, fp32: the signed
# (exp_avg) and unsigned (exp_avg_sq) code maps, then their 255 decision points, each padded to 256
# with +inf.
SIGNED_MAP = tl.constexpr(0)
UNSIGNED_MAP = tl.constexpr(quantization.CODES)
SIGNED_POINTS = tl.constexpr(2 * quantization.CODES)
UNSIGNED_POINTS = tl.constexpr(3 * quantization.CODES)
CODE_VALUES = 4 * quantization.CODES
# ``code_buckets``, uint8: a normalized value's code in two lookups instead of an 8-step search. Its
# |value| falls in a bucket, the top 16 bits of its fp32 pattern (8 exponent and 7 mantissa bits), and
# every bucket from BUCKET_LOW (a power of two below the smallest |decision point|: below it the first
# bucket holds every smaller |value|) up to the one of 1.0 holds at most one decision point, so the
# table gives the points below the bucket and one comparison with the next point decides. One row of
# BUCKETS per sign of the signed map (a negative value's bucket counts the points below its low end),
# one for the unsigned map (exp_avg_sq is never negative).
BUCKET_SHIFT = tl.constexpr(16)
_LOWEST_POINT = min(float(quantization.decision_points(signed).abs().min()) for signed in (True, False))
BUCKET_LOW = tl.constexpr(struct.unpack("<i", struct.pack("<f", 2.0 ** math.floor(math.log2(_LOWEST_POINT))))[0]
                          >> BUCKET_SHIFT.value)
BUCKETS = tl.constexpr((struct.unpack("<i", struct.pack("<f", 1.0))[0] >> BUCKET_SHIFT.value) - BUCKET_LOW.value + 1)
SIGNED_BUCKETS = tl.constexpr(0)
SIGNED_NEGATIVE_BUCKETS = tl.constexpr(BUCKETS.value)
UNSIGNED_BUCKETS = tl.constexpr(2 * BUCKETS.value)
CODE_BUCKETS = 3 * BUCKETS.value

# Counters per row in the exact path's histogram: the widest radix round's bins.
RADIX_BINS = tl.constexpr(selection.RADIX_BINS)


# NaN's key, above every number, and the lowest threshold, above |m| == 0 (selopt.selection).
NAN_KEY = tl.constexpr(selection.NAN_KEY[torch.int32])
MIN_THRESHOLD = tl.constexpr(selection.MIN_THRESHOLD)
# The key the exact path gives lanes past a tensor's or a candidate list's end: below every key, so
# they never count in a histogram. (The one-pass kernel needs none: its padding lanes hold m = 0.)
PADDING_KEY = tl.constexpr(-1)


@triton.jit
def broadcast(scalar, like):
    """``scalar`` as a block shaped like ``like``. Conditions are built on blocks, not scalars,
    because Triton's interpreter cannot AND a block mask with a scalar condition."""
    return tl.zeros(like.shape, scalar.dtype) + scalar


@triton.jit
def load_pointer(row_ptr, column, dtype: tl.constexpr):
    return tl.load(row_ptr + column).to(tl.pointer_type(dtype))


@triton.jit
def stream(row_ptr, column, start, lanes, dtype: tl.constexpr, ALIGNED: tl.constexpr):
    """Addresses of one tile of a streamed tensor (param, grad, a moment).

    ``ALIGNED``: the host checked that every table address is 16-byte aligned
    and that tiles hold whole multiples of 8 entries, so every run of
    contiguous addresses starts 16-byte aligned. The hint sits on the tensor
    of pointers: on the integer address it is dropped, and Triton 3.6 also
    drops it on the scalar pointer; with it the compiler emits 128-bit accesses.
    """
    pointers = load_pointer(row_ptr, column, dtype) + start + lanes
    if ALIGNED:
        pointers = tl.multiple_of(pointers, 16)
    return pointers


@triton.jit
def round_to_bf16_nearest(x):
    """fp32 -> the nearest bf16 value (ties to even), still held in fp32.

    Done on the bits so that it is exact everywhere: Triton's interpreter
    truncates when it converts fp32 to bf16. The result converts to bf16
    exactly under any rounding mode.
    """
    bits = x.to(tl.int32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    rounded = tl.where(x != x, 0x7FC00000, rounded)
    return rounded.to(tl.float32, bitcast=True)


@triton.jit
def round_to_bf16_stochastic(x, random_bits):
    """fp32 -> bf16 up or down with probability given by the distance: E[result] = x.

    Adds 16 random bits below bf16's last mantissa bit and truncates, like the
    reference ``stochastic_round_to_bf16``; inf and NaN are rounded to nearest.
    """
    bits = x.to(tl.int32, bitcast=True)
    noise = (random_bits & 0xFFFF).to(tl.int32)
    rounded = ((bits + noise) & -65536).to(tl.float32, bitcast=True)
    finite = (bits & 0x7F800000) != 0x7F800000
    return tl.where(finite, rounded, round_to_bf16_nearest(x))


@triton.jit
def round_for_store(x, DTYPE: tl.constexpr):
    """fp32 -> the value ``DTYPE`` will hold, rounded to nearest; still fp32 for bf16."""
    if DTYPE == tl.bfloat16:
        return round_to_bf16_nearest(x)
    else:
        return x.to(DTYPE)


@triton.jit
def magnitude_key(m):
    """The key of |m| (:func:`selopt.selection.magnitude_keys`).

    The bits of ``tl.abs(m)``, not ``bits & 0x7FFFFFFF``: the same key, but the
    mask would tell the compiler the key is non-negative, from which it proves
    :func:`kth_largest_key`'s sign-bit count to be a comparison and compiles
    each count back to compare, select and bit-packing, costlier per key
    (``bench.static``; figures in bench/NOTES.md). NaN is given its key
    explicitly: the sign a NaN keeps through ``abs`` is not specified.
    """
    return tl.where(m == m, tl.abs(m).to(tl.int32, bitcast=True), NAN_KEY)


@triton.jit
def selection_threshold(kth_largest):
    """The threshold from a block's k-th largest key: never below MIN_THRESHOLD, so |m| == 0 never moves."""
    return tl.maximum(kth_largest, MIN_THRESHOLD)


@triton.jit
def kth_largest_key(key, k):
    """The k-th largest of ``key`` (non-negative int32), by bisection on its 31 value bits.

    Builds the answer from the top bit down: keep a bit when at least ``k``
    keys are >= the answer with that bit set. 31 counts over registers, no
    sort (sorting is very slow under Triton's interpreter). When fewer than
    ``k`` keys are non-zero the answer is 0 (:func:`selection_threshold` raises it).

    Each count is of the keys *below* the candidate: the sign bit of
    ``key - candidate``, shifted down and summed (a subtract, then a shift
    folded into the add, cheaper than compare, select and add), and these
    counts are nearly all of the selection's cost.
    """
    threshold = k * 0
    for bit in tl.static_range(30, -1, -1):
        candidate = threshold | (1 << bit)
        below = ((key - candidate).to(tl.uint32, bitcast=True) >> 31).to(tl.int32)
        count = key.numel - tl.sum(below, axis=0)
        threshold = tl.where(count >= k, candidate, threshold)
    return threshold


@triton.jit
def power(base, exponent):
    """base ** exponent for an int32 exponent >= 0, by squaring: only multiplications."""
    result = base * 0 + 1
    for bit in tl.static_range(31):
        result = tl.where(((exponent >> bit) & 1) == 1, result * base, result)
        base = base * base
    return result


@triton.jit
def sqrt_f64(x):
    """fp64 square root from fp32's and one Newton step (~1e-14 relative): mul/div only."""
    root = tl.sqrt_rn(x.to(tl.float32)).to(tl.float64)
    return 0.5 * (root + x / root)


@triton.jit
def as_tensor(x, dtype: tl.constexpr):
    """A float kernel argument as a ``dtype`` scalar tensor.

    Compiled kernels receive float arguments as fp32 tensors, the interpreter as
    Python floats; adding a zero of ``dtype`` converts both (exactly, when
    widening). Not ``tl.to_tensor``: Triton 3.6 does not have it.
    """
    return tl.zeros((), dtype) + x


@triton.jit
def _join_double(hi, lo):
    return as_tensor(hi, tl.float64) + as_tensor(lo, tl.float64)


@triton.jit
def step_scalars(
    step, lr_ptr, lr_hi, lr_lo, decay_factor, weight_decay_hi, weight_decay_lo,
    beta1_hi, beta1_lo, beta2_hi, beta2_lo, LR_ON_DEVICE: tl.constexpr,
):
    """Step size, 1 / sqrt of the second bias correction and the decay factor, for step count ``step``.

    Computed in fp64 from hi/lo fp32 pairs (kernel float arguments are fp32),
    so they round to the values the reference's Python doubles give. ``step``
    is the count after this update.
    """
    count = step.to(tl.int32)
    beta1 = _join_double(beta1_hi, beta1_lo)
    beta2 = _join_double(beta2_hi, beta2_lo)
    if LR_ON_DEVICE:
        lr = tl.load(lr_ptr).to(tl.float64)
        decay = (1.0 - lr * _join_double(weight_decay_hi, weight_decay_lo)).to(tl.float32)
    else:
        lr = _join_double(lr_hi, lr_lo)
        decay = as_tensor(decay_factor, tl.float32)
    step_size = (lr / (1.0 - power(beta1, count))).to(tl.float32)
    inv_bias_correction2_sqrt = (1.0 / sqrt_f64(1.0 - power(beta2, count))).to(tl.float32)
    return step_size, inv_bias_correction2_sqrt, decay


@triton.jit
def adam_moments(g, m, v, vmax, lerp_weight, beta2, one_minus_beta2,
                 AMSGRAD: tl.constexpr, LERP_FROM_END: tl.constexpr, MOMENT_DTYPE: tl.constexpr):
    """New moments in fp32, each already rounded to what ``MOMENT_DTYPE`` stores.

    ``m`` follows torch's ``lerp`` formula for the weight's side of 0.5 so that
    fp32 results match the reference. Returns (m, v, vmax, second moment the
    denominator uses).
    """
    if LERP_FROM_END:
        m = g - (g - m) * (1.0 - lerp_weight)
    else:
        m = m + lerp_weight * (g - m)
    v = v * beta2 + one_minus_beta2 * g * g
    m = round_for_store(m, MOMENT_DTYPE).to(tl.float32)
    v = round_for_store(v, MOMENT_DTYPE).to(tl.float32)
    if AMSGRAD:
        # NaN-propagating, as torch.maximum in the reference: tl.maximum would drop a NaN vmax.
        vmax = tl.where((v > vmax) | (v != v), v, vmax)
        return m, v, vmax, vmax
    else:
        return m, v, vmax, v


@triton.jit
def masked_update(p, m, second_moment, selected, scale, step_size, inv_bias_correction2_sqrt, eps, decay,
                  DECAY_SELECTED: tl.constexpr, SCALE_UPDATE: tl.constexpr):
    """Decoupled decay and the AdamW step on the selected entries, in fp32.

    The hardware's fast square root and division (a few ulps; the IEEE-rounded
    ``sqrt_rn``/``div_rn`` cost many instructions each, with a branch to a slow
    path): the update is lr-sized, so a few ulps of it are far below one
    rounding of the parameter.
    """
    denom = tl.sqrt(second_moment) * inv_bias_correction2_sqrt + eps
    numerator = m * scale if SCALE_UPDATE else m
    decayed = p * decay
    kept = p if DECAY_SELECTED else decayed
    # where(), not a multiply by the mask: unselected entries stay exact even if the step is NaN.
    return tl.where(selected, decayed - step_size * numerator / denom, kept)


@triton.jit
def load_soft_mask(row_ptr, start, lanes, in_block):
    """The row's soft-mask factor for each lane (1 where the tensor has no mask)."""
    mask_div = tl.load(row_ptr + COL_MASK_DIV)
    index = (tl.load(row_ptr + COL_OFFSET) + start + lanes) // tl.maximum(mask_div, 1)
    has_mask = broadcast(mask_div, lanes) > 0
    return tl.load(load_pointer(row_ptr, COL_SOFT_MASK, tl.float32) + index, mask=in_block & has_mask, other=1.0)


@triton.jit
def load_step_gradient(row_ptr, start, lanes, in_block, grad_scale_ptr, PARAM_DTYPE: tl.constexpr,
                       GRAD_SCALE: tl.constexpr, MAXIMIZE: tl.constexpr, SOFT_MASK: tl.constexpr,
                       SOFT_MASK_ON_GRAD: tl.constexpr, ALIGNED: tl.constexpr):
    """The gradient the moments see (unscaled, negated to maximize, soft-masked in "grad" mode), and the mask."""
    g = tl.load(stream(row_ptr, COL_GRAD, start, lanes, PARAM_DTYPE, ALIGNED), mask=in_block, other=0.0)
    g = g.to(tl.float32)
    if GRAD_SCALE:
        g = tl.div_rn(g, tl.load(grad_scale_ptr).to(tl.float32))
    if MAXIMIZE:
        g = -g
    scale = 1.0
    if SOFT_MASK:
        scale = load_soft_mask(row_ptr, start, lanes, in_block)
        if SOFT_MASK_ON_GRAD:
            g = g * scale
    return g, scale


@triton.jit
def per_lane(block_values, QUANT_BLOCK: tl.constexpr):
    """A value per quant block as a value per lane: each repeated over its block's QUANT_BLOCK lanes."""
    blocks: tl.constexpr = block_values.numel
    return tl.reshape(tl.broadcast_to(block_values[:, None], (blocks, QUANT_BLOCK)), (blocks * QUANT_BLOCK,))


@triton.jit
def quant_blocks(row_ptr, start, found_inf_ptr, TILE: tl.constexpr, QUANT_BLOCK: tl.constexpr,
                 FOUND_INF: tl.constexpr):
    """The tile's quant blocks: their scales' index from the row's first scale, which lie in the row,
    and which are stored (none when found_inf is set). Tiles start on a block and hold whole blocks."""
    blocks = tl.arange(0, TILE // QUANT_BLOCK)
    in_row = start + blocks * QUANT_BLOCK < tl.load(row_ptr + COL_NUMEL)
    stored = in_row
    if FOUND_INF:
        stored = in_row & (broadcast(tl.load(found_inf_ptr).to(tl.float32), blocks) == 0)
    return start // QUANT_BLOCK + blocks, in_row, stored


@triton.jit
def load_moment(row_ptr, column, scale_column, start, lanes, in_block, code_values, SIGNED: tl.constexpr,
                MOMENT_DTYPE: tl.constexpr, QUANT_BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """One tile of a moment as its state holds it, in fp32: 8-bit codes read as
    ``code_map[code] * scale`` (:func:`selopt.quantization.dequantize`), lanes past the row as 0."""
    stored = tl.load(stream(row_ptr, column, start, lanes, MOMENT_DTYPE, ALIGNED), mask=in_block, other=0)
    if QUANT_BLOCK:
        blocks, in_row, _ = quant_blocks(row_ptr, start, row_ptr, lanes.numel, QUANT_BLOCK, False)
        # Scale 0 past the row: the padding lanes read 0 whatever their code stands for.
        scales = tl.load(load_pointer(row_ptr, scale_column, tl.float32) + blocks, mask=in_row, other=0.0)
        code_map = code_values + (SIGNED_MAP if SIGNED else UNSIGNED_MAP)
        return tl.load(code_map + stored.to(tl.int32)) * per_lane(scales, QUANT_BLOCK)
    else:
        return stored.to(tl.float32)


@triton.jit
def code_of(y, code_values, code_buckets, SIGNED: tl.constexpr):
    """The code of ``y`` in [-1, 1] (not NaN): how many decision points are <= y, as
    ``torch.searchsorted(points, y, right=True)`` in :func:`selopt.quantization.quantize`.

    Two dependent table lookups (``code_buckets``: the points below y's bucket, then the bucket's
    one possible point) where a binary search over the 256 points would take eight. |y| <= 1, so
    the bucket never passes 1.0's; below BUCKET_LOW every |y| shares the first bucket.
    """
    bits = y.to(tl.int32, bitcast=True)
    bucket = tl.maximum(((bits >> BUCKET_SHIFT) & 0x7FFF) - BUCKET_LOW, 0)
    if SIGNED:
        bucket = tl.where(bits < 0, bucket + SIGNED_NEGATIVE_BUCKETS, bucket + SIGNED_BUCKETS)
        points = code_values + SIGNED_POINTS
    else:
        bucket = bucket + UNSIGNED_BUCKETS
        points = code_values + UNSIGNED_POINTS
    below = tl.load(code_buckets + bucket).to(tl.int32)
    return below + (y >= tl.load(points + below)).to(tl.int32)


@triton.jit
def quantize(x, code_values, code_buckets, SIGNED: tl.constexpr, QUANT_BLOCK: tl.constexpr):
    """``x`` (fp32) in 8 bits, as :func:`selopt.quantization.quantize`: (codes, the scale of each
    block, the values they stand for: what the state will hold).

    The absmax is a max of magnitude keys, whose NaN key is above every number: a NaN anywhere in a
    block gives it a NaN scale (a float max would drop it), and all its entries read NaN.
    """
    blocks: tl.constexpr = x.numel // QUANT_BLOCK
    absmax = tl.max(tl.reshape(magnitude_key(x), (blocks, QUANT_BLOCK)), axis=1).to(tl.float32, bitcast=True)
    scale = per_lane(absmax, QUANT_BLOCK)
    # y = x / scale rounded as the reference's IEEE division (a plain reciprocal multiply can move y by
    # an ulp across a decision point), at 3 instructions an entry instead of div.rn's dozen: the block's
    # correctly rounded reciprocal, once per block, then one exact residual and one correction by FMA
    # (Markstein: with y0 within an ulp and the reciprocal within half an ulp, the corrected quotient is
    # the correctly rounded one) as long as neither the residual nor the reciprocal is subnormal. So a
    # block whose absmax is far from 1 is first scaled by a power of two (exact, and the quotient is the
    # same): moments that decay for thousands of steps pass through such blocks. (Only a quotient under
    # 2**-66, whose code is zero's whatever its last bits, may then lose bits.)
    # The divisor is 1 where the scale is 0 or NaN (y is 0 there anyway): no 0 / 0 is evaluated.
    rescale = tl.where(absmax < 2.0**-40, 2.0**100, tl.where(absmax > 2.0**40, 2.0**-100, 1.0))
    divisor = tl.where(absmax > 0, absmax, 1.0) * rescale
    inverse = per_lane(tl.div_rn(1.0, divisor), QUANT_BLOCK)
    divisor = per_lane(divisor, QUANT_BLOCK)
    scaled = x * per_lane(rescale, QUANT_BLOCK)
    y = scaled * inverse
    y = tl.fma(tl.fma(-y, divisor, scaled), inverse, y)
    y = tl.where(scale > 0, y, 0.0)
    y = tl.where(y == y, y, 0.0)  # an infinite scale's inf / inf
    code = code_of(y, code_values, code_buckets, SIGNED)
    if not SIGNED:
        code = tl.where(x > 0, tl.maximum(code, 1), code)  # a positive v never reads 0 (selopt.quantization)
    value = tl.load(code_values + (SIGNED_MAP if SIGNED else UNSIGNED_MAP) + code) * scale
    return code.to(tl.uint8), absmax, value


@triton.jit
def store_quantized(row_ptr, column, scale_column, start, lanes, store_mask, x, code_values, code_buckets,
                    found_inf_ptr, SIGNED: tl.constexpr, QUANT_BLOCK: tl.constexpr, FOUND_INF: tl.constexpr,
                    ALIGNED: tl.constexpr):
    """Quantize one tile of a moment, store its codes and scales, and return the values stored."""
    codes, scales, value = quantize(x, code_values, code_buckets, SIGNED, QUANT_BLOCK)
    tl.store(stream(row_ptr, column, start, lanes, tl.uint8, ALIGNED), codes, mask=store_mask)
    blocks, _, stored = quant_blocks(row_ptr, start, found_inf_ptr, lanes.numel, QUANT_BLOCK, FOUND_INF)
    tl.store(load_pointer(row_ptr, scale_column, tl.float32) + blocks, scales, mask=stored)
    return value


@triton.jit
def update_moments(row_ptr, start, lanes, in_block, store_mask, g, lerp_weight, beta2, one_minus_beta2,
                   code_values, code_buckets, found_inf_ptr, AMSGRAD: tl.constexpr, LERP_FROM_END: tl.constexpr,
                   MOMENT_DTYPE: tl.constexpr, QUANT_BLOCK: tl.constexpr, FOUND_INF: tl.constexpr,
                   ALIGNED: tl.constexpr):
    """Load, update and store the moments of one tile; returns m and the denominator's second moment,
    as stored (8-bit ones dequantized, updated in fp32 and requantized in registers)."""
    if QUANT_BLOCK:
        m = load_moment(row_ptr, COL_EXP_AVG, COL_EXP_AVG_SCALE, start, lanes, in_block, code_values, True,
                        MOMENT_DTYPE, QUANT_BLOCK, ALIGNED)
        v = load_moment(row_ptr, COL_EXP_AVG_SQ, COL_EXP_AVG_SQ_SCALE, start, lanes, in_block, code_values, False,
                        MOMENT_DTYPE, QUANT_BLOCK, ALIGNED)
        m, v, _, _ = adam_moments(g, m, v, v, lerp_weight, beta2, one_minus_beta2, False, LERP_FROM_END, tl.float32)
        m = store_quantized(row_ptr, COL_EXP_AVG, COL_EXP_AVG_SCALE, start, lanes, store_mask, m, code_values,
                            code_buckets, found_inf_ptr, True, QUANT_BLOCK, FOUND_INF, ALIGNED)
        v = store_quantized(row_ptr, COL_EXP_AVG_SQ, COL_EXP_AVG_SQ_SCALE, start, lanes, store_mask, v, code_values,
                            code_buckets, found_inf_ptr, False, QUANT_BLOCK, FOUND_INF, ALIGNED)
        return m, v
    else:
        m_ptr = stream(row_ptr, COL_EXP_AVG, start, lanes, MOMENT_DTYPE, ALIGNED)
        v_ptr = stream(row_ptr, COL_EXP_AVG_SQ, start, lanes, MOMENT_DTYPE, ALIGNED)
        m = tl.load(m_ptr, mask=in_block, other=0.0).to(tl.float32)
        v = tl.load(v_ptr, mask=in_block, other=0.0).to(tl.float32)
        vmax = v
        if AMSGRAD:
            vmax_ptr = stream(row_ptr, COL_MAX_EXP_AVG_SQ, start, lanes, MOMENT_DTYPE, ALIGNED)
            vmax = tl.load(vmax_ptr, mask=in_block, other=0.0).to(tl.float32)
        m, v, vmax, second_moment = adam_moments(
            g, m, v, vmax, lerp_weight, beta2, one_minus_beta2, AMSGRAD, LERP_FROM_END, MOMENT_DTYPE)
        tl.store(m_ptr, m.to(MOMENT_DTYPE), mask=store_mask)
        tl.store(v_ptr, v.to(MOMENT_DTYPE), mask=store_mask)
        if AMSGRAD:
            tl.store(vmax_ptr, vmax.to(MOMENT_DTYPE), mask=store_mask)
        return m, second_moment


@triton.jit
def update_param(
    row_ptr, start, lanes, in_block, store_mask, step_scalars, m, second_moment, selected, scale, eps,
    PARAM_DTYPE: tl.constexpr, DECAY_SELECTED: tl.constexpr, SOFT_MASK_ON_UPDATE: tl.constexpr,
    STOCHASTIC_ROUNDING: tl.constexpr, WRITE_SELECTION: tl.constexpr, ALIGNED: tl.constexpr,
):
    """Decay and step the selected entries of one tile and store them once."""
    scalars = step_scalars + tl.load(row_ptr + COL_TENSOR) * STEP_SCALARS
    p_ptr = stream(row_ptr, COL_PARAM, start, lanes, PARAM_DTYPE, ALIGNED)
    p = tl.load(p_ptr, mask=in_block, other=0.0).to(tl.float32)
    p = masked_update(p, m, second_moment, selected, scale, tl.load(scalars + SCALAR_STEP_SIZE),
                      tl.load(scalars + SCALAR_INV_BIAS_CORRECTION2_SQRT), eps, tl.load(scalars + SCALAR_DECAY),
                      DECAY_SELECTED, SOFT_MASK_ON_UPDATE)
    if STOCHASTIC_ROUNDING:
        # Philox keyed by the tensor's seed (saved in its state: a resumed run draws the same
        # numbers), counter = (element offset, step): a fresh stream per element and step, read
        # from device values only, so graph replays draw new numbers.
        offset = tl.load(row_ptr + COL_OFFSET) + start + lanes
        seed = tl.load(load_pointer(row_ptr, COL_ROUNDING_SEED, tl.int64))
        random_bits, _, _, _ = tl.philox(
            seed, offset.to(tl.uint32), (offset >> 32).to(tl.uint32),
            tl.load(scalars + SCALAR_STEP).to(tl.uint32), tl.zeros_like(lanes).to(tl.uint32))
        p = round_to_bf16_stochastic(p, random_bits)
    else:
        p = round_for_store(p, PARAM_DTYPE)
    tl.store(p_ptr, p.to(PARAM_DTYPE), mask=store_mask)
    if WRITE_SELECTION:
        selection_address = tl.load(row_ptr + COL_SELECTION)
        if selection_address != 0:
            selection_ptr = selection_address.to(tl.pointer_type(tl.int8)) + start + lanes
            tl.store(selection_ptr, selected.to(tl.int8), mask=store_mask)


@triton.jit
def tile_of(table, program_rows, found_inf_ptr, TILE: tl.constexpr, FOUND_INF: tl.constexpr,
            ALIGNED: tl.constexpr, QUANT_BLOCK: tl.constexpr):
    """Where this program works: (row, row pointer, tile start in the row, lanes, in-bounds
    mask, store mask). A set found_inf masks every store. ``QUANT_BLOCK``: 8-bit moments' block
    (0 for float moments); rows then hold whole blocks."""
    pid = tl.program_id(0)
    row = tl.load(program_rows + pid)
    row_ptr = table + row.to(tl.int64) * NUM_COLUMNS
    numel = tl.load(row_ptr + COL_NUMEL)
    # int64 tile start, int32 lanes: tensors above 2^31 elements stay addressable while the
    # per-element address math stays 32-bit.
    start = (pid - tl.load(row_ptr + COL_FIRST_PROGRAM)).to(tl.int64) * TILE
    lanes = tl.arange(0, TILE)
    limit = tl.minimum(numel - start, TILE).to(tl.int32)
    if ALIGNED:
        # Segments hold a multiple of 8 elements (checked on the host), so the mask is constant
        # over runs of 8 lanes: what 128-bit accesses of bf16 need (4 lanes suffice for fp32).
        if QUANT_BLOCK:
            # Whole quant blocks of at least 32 entries: 128-bit accesses of the 8-bit codes need 16.
            limit = tl.multiple_of(limit, QUANT_BLOCK)
        else:
            limit = tl.multiple_of(limit, 8)
    in_block = lanes < limit
    store_mask = in_block
    if FOUND_INF:
        found_inf = tl.load(found_inf_ptr).to(tl.float32)
        store_mask = in_block & (broadcast(found_inf, lanes) == 0)
    return row, row_ptr, start, lanes, in_block, store_mask
