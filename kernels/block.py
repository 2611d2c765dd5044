"""One-pass selective AdamW: one program per block, every tensor of a bucket in one launch.

(After the launch that computes the step's scalars, :mod:`selopt.kernels.steps`.)

A program loads its block of ``p``, ``g``, ``m`` and ``v`` once, updates the
moments, finds the block's top-k threshold of ``|m|`` in registers, applies
the soft mask, decay and update, and stores once: the bytes of plain AdamW.
"""

import triton
import triton.language as tl

from selopt.kernels import device as d
from selopt.kernels.launch import Launch
from selopt.kernels.steps import step_scalars_launch
from selopt.options import ONE_PASS_MAX_BLOCK
from selopt.quantization import QUANT_BLOCK

# The largest block one program selects in registers (AdamWOptions.path decides with it); larger
# blocks take the exact path, cut into segments of block_size.
MAX_BLOCK = ONE_PASS_MAX_BLOCK
# Tile of the dense kernel (fraction == 1), where the block size has no meaning, and its warps:
# 16 entries per thread with no reduction to share keeps the registers low enough for several CTAs
# per SM (bench.static; figures in bench/NOTES.md).
DENSE_TILE = 4096
DENSE_WARPS = 8
# A tile holds whole blocks of 8-bit moments (and a one-pass block is at least QUANT_BLOCK with them).
assert DENSE_TILE % QUANT_BLOCK == 0


def num_warps_for(block: int) -> int:
    # 32 entries per thread: each of the bisection's 31 counts costs a few instructions per entry
    # plus one warp and one cross-warp reduction per warp, so fewer, fuller warps spend fewer
    # instructions per entry on reductions, and up to 1024 entries need no cross-warp step at all;
    # 32 entries still fit in registers without spilling (bench.static, bench/NOTES.md).
    return min(8, max(1, block // 1024))


@triton.jit
def _block_selection(m, k):
    """The block's selection (:mod:`selopt.selection`): the k largest |m|, NaN above every number, 0 never.

    NaN takes key -1 for the bisection, which then looks for the (k - NaNs)-th
    largest of the other keys, and is selected apart: the same selection as
    giving NaN the top key, in fewer registers (with the top key the largest
    blocks spill on older Tritons; bench/NOTES.md §5). Padding lanes load
    m = 0: key 0 counts below every bisection candidate and is never selected.
    """
    key = tl.where(m == m, tl.abs(m).to(tl.int32, bitcast=True), -1)
    nans = tl.sum((key < 0).to(tl.int32), axis=0)
    threshold = d.selection_threshold(d.kth_largest_key(key, k - nans))
    # Compared unsigned, NaN's -1 is the largest key: selected whatever the threshold.
    return key.to(tl.uint32, bitcast=True) >= threshold.to(tl.uint32, bitcast=True)


@triton.jit
def _block_adamw_kernel(
    table, program_rows, step_scalars, beta2, lerp_weight, one_minus_beta2, eps, grad_scale_ptr, found_inf_ptr,
    code_values, code_buckets, BLOCK: tl.constexpr, DENSE: tl.constexpr, ALIGNED: tl.constexpr,
    PARAM_DTYPE: tl.constexpr, MOMENT_DTYPE: tl.constexpr, QUANT_BLOCK: tl.constexpr,
    AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, DECAY_SELECTED: tl.constexpr,
    SOFT_MASK: tl.constexpr, SOFT_MASK_ON_GRAD: tl.constexpr, SOFT_MASK_ON_UPDATE: tl.constexpr,
    GRAD_SCALE: tl.constexpr, FOUND_INF: tl.constexpr,
    STOCHASTIC_ROUNDING: tl.constexpr, WRITE_SELECTION: tl.constexpr, LERP_FROM_END: tl.constexpr,
):
    row, row_ptr, start, lanes, in_block, store_mask = d.tile_of(
        table, program_rows, found_inf_ptr, BLOCK, FOUND_INF, ALIGNED, QUANT_BLOCK)
    g, scale = d.load_step_gradient(row_ptr, start, lanes, in_block, grad_scale_ptr, PARAM_DTYPE,
                                    GRAD_SCALE, MAXIMIZE, SOFT_MASK, SOFT_MASK_ON_GRAD, ALIGNED)
    m, second_moment = d.update_moments(row_ptr, start, lanes, in_block, store_mask, g, lerp_weight, beta2,
                                        one_minus_beta2, code_values, code_buckets, found_inf_ptr, AMSGRAD,
                                        LERP_FROM_END, MOMENT_DTYPE, QUANT_BLOCK, FOUND_INF, ALIGNED)
    if DENSE:
        selected = in_block
    else:
        is_full = tl.load(row_ptr + d.COL_NUMEL) - start >= BLOCK
        k = tl.load(row_ptr + tl.where(is_full, d.COL_K_FULL, d.COL_K_TAIL)).to(tl.int32)
        selected = _block_selection(m, k)
    d.update_param(row_ptr, start, lanes, in_block, store_mask, step_scalars, m, second_moment, selected, scale,
                   eps, PARAM_DTYPE, DECAY_SELECTED, SOFT_MASK_ON_UPDATE, STOCHASTIC_ROUNDING,
                   WRITE_SELECTION, ALIGNED)


def block_adamw_launches(plan, values: dict, block: int, dense: bool) -> list[Launch]:
    """The step's scalars, then the one-pass kernel over every ``block`` of ``plan`` (:mod:`selopt.kernels.tables`).

    ``values`` holds the step's arguments and flags by kernel parameter name.
    """
    warps = DENSE_WARPS if dense else num_warps_for(block)
    return [step_scalars_launch(plan, values),
            Launch.bind(_block_adamw_kernel, (plan.num_programs,), {**values, "BLOCK": block, "DENSE": dense}, warps)]
