"""One-pass selective AdamW: one program per block, every tensor of a bucket in one launch.

A program loads its block of ``p``, ``g``, ``m`` and ``v`` once, updates the
moments, finds the block's top-k threshold of ``|m|`` in registers, applies
the soft mask, decay and update, and stores once: the bytes of plain AdamW.
"""

import triton
import triton.language as tl

from selopt.kernels import _device as d
from selopt.kernels.launch import Launch

# The largest block one program selects in registers: at 8192 and above the kernel spills on sm_90
# (bench.static); larger blocks take the exact path, cut into segments of block_size.
MAX_BLOCK = 4096
# Tile of the dense kernel (fraction == 1), where the block size has no meaning.
DENSE_TILE = 4096


def num_warps_for(block: int) -> int:
    # More warps for big blocks: the 31 block-wide counts of the bisection are
    # reductions across the whole program, and they are the kernel's compute.
    return min(16, max(4, block // 512))


@triton.jit
def _block_adamw_kernel(
    table, tickets, num_rows,
    lr_ptr, lr_hi, lr_lo, decay_factor, weight_decay_hi, weight_decay_lo,
    beta1_hi, beta1_lo, beta2_hi, beta2_lo, beta2, lerp_weight, one_minus_beta2, eps,
    grad_scale_ptr, found_inf_ptr, seed_ptr,
    BLOCK: tl.constexpr, SEARCH_STEPS: tl.constexpr, DENSE: tl.constexpr,
    PARAM_DTYPE: tl.constexpr, MOMENT_DTYPE: tl.constexpr,
    AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, DECAY_SELECTED: tl.constexpr,
    SOFT_MASK: tl.constexpr, SOFT_MASK_ON_GRAD: tl.constexpr, SOFT_MASK_ON_UPDATE: tl.constexpr,
    LR_ON_DEVICE: tl.constexpr, GRAD_SCALE: tl.constexpr, FOUND_INF: tl.constexpr,
    STOCHASTIC_ROUNDING: tl.constexpr, WRITE_SELECTION: tl.constexpr, LERP_FROM_END: tl.constexpr,
):
    row, row_ptr, start, lanes, in_block, store_mask, step_increment = d.tile_of(
        table, num_rows, found_inf_ptr, BLOCK, SEARCH_STEPS, FOUND_INF)
    g, scale = d.load_step_gradient(row_ptr, start, lanes, in_block, grad_scale_ptr, PARAM_DTYPE,
                                    GRAD_SCALE, MAXIMIZE, SOFT_MASK, SOFT_MASK_ON_GRAD)
    m, second_moment = d.update_moments(row_ptr, start, lanes, in_block, store_mask, g, lerp_weight, beta2,
                                        one_minus_beta2, AMSGRAD, LERP_FROM_END, MOMENT_DTYPE)
    if DENSE:
        selected = in_block
    else:
        is_full = tl.load(row_ptr + d.COL_NUMEL) - start >= BLOCK
        k = tl.load(row_ptr + tl.where(is_full, d.COL_K_FULL, d.COL_K_TAIL)).to(tl.int32)
        key = d.magnitude_key(m, in_block)
        selected = key >= d.kth_largest_key(key, k)
    d.update_param(
        row_ptr, start, lanes, in_block, store_mask, step_increment, tickets, m, second_moment, selected, scale,
        lr_ptr, lr_hi, lr_lo, decay_factor, weight_decay_hi, weight_decay_lo, beta1_hi, beta1_lo,
        beta2_hi, beta2_lo, eps, seed_ptr, PARAM_DTYPE, DECAY_SELECTED, SOFT_MASK_ON_UPDATE, LR_ON_DEVICE,
        STOCHASTIC_ROUNDING, WRITE_SELECTION)


def block_adamw_launches(plan, scalars, flags, block: int, dense: bool) -> list[Launch]:
    """The one launch of the one-pass kernel over every block of ``plan`` (see :mod:`selopt.kernels.tables`)."""
    return [Launch(
        _block_adamw_kernel, (plan.num_programs,), (plan.table, plan.tickets, plan.num_rows, *scalars),
        dict(BLOCK=block, SEARCH_STEPS=plan.search_steps, DENSE=dense, **flags, num_warps=num_warps_for(block)),
    )]
