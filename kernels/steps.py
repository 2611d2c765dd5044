"""The step's scalars, once per tensor: the first launch of every step.

The bias corrections need ``beta ** step`` in fp64 (to round as the
reference's Python doubles do): a long chain of fp64 instructions, which every
warp of every program would otherwise repeat, and which consumer GPUs run at a
small fraction of their fp32 rate. One program per tensor computes them from the step count on the device,
writes them to the plan's ``step_scalars`` rows, and advances the count (by 0
when ``found_inf`` is set), so the step still never reads back to the host.
"""

import triton
import triton.language as tl

from selopt.kernels import device as d
from selopt.kernels.launch import Launch


@triton.jit
def _step_scalars_kernel(
    steps, step_scalars, lr_ptr, lr_hi, lr_lo, decay_factor, weight_decay_hi, weight_decay_lo,
    beta1_hi, beta1_lo, beta2_hi, beta2_lo, found_inf_ptr, LR_ON_DEVICE: tl.constexpr, FOUND_INF: tl.constexpr,
):
    tensor = tl.program_id(0)
    step_ptr = tl.load(steps + tensor).to(tl.pointer_type(tl.float32))
    step = tl.load(step_ptr)
    step_size, inv_bias_correction2_sqrt, decay = d.step_scalars(
        step + 1.0, lr_ptr, lr_hi, lr_lo, decay_factor, weight_decay_hi, weight_decay_lo,
        beta1_hi, beta1_lo, beta2_hi, beta2_lo, LR_ON_DEVICE)
    row = step_scalars + tensor * d.STEP_SCALARS
    tl.store(row + d.SCALAR_STEP_SIZE, step_size)
    tl.store(row + d.SCALAR_INV_BIAS_CORRECTION2_SQRT, inv_bias_correction2_sqrt)
    tl.store(row + d.SCALAR_DECAY, decay)
    tl.store(row + d.SCALAR_STEP, step)
    increment = 1.0
    if FOUND_INF:
        increment = 1.0 - tl.load(found_inf_ptr).to(tl.float32)
    tl.store(step_ptr, step + increment)


def step_scalars_launch(plan, values: dict) -> Launch:
    """The launch that fills ``plan.step_scalars`` and advances every tensor's step count."""
    return Launch.bind(_step_scalars_kernel, (plan.num_tensors,), values, num_warps=1)
