"""Triton kernels of selopt, installed as ``selopt.kernels``.

:func:`multi_tensor_adamw_` runs one selective AdamW step for a bucket of
tensors: the one-pass block kernel (:mod:`.block`) or the exact per-tensor
radix select (:mod:`.exact`). :func:`prepare_multi_tensor_adamw` checks and
compiles the same step without writing anything, for callers that must not
half-update (the optimizer prepares every bucket before running any).
"""

from selopt.kernels.adamw import (
    MOMENT_DTYPES, PARAM_DTYPES, PreparedStep, multi_tensor_adamw_, prepare_multi_tensor_adamw,
)
from selopt.kernels.launch import KernelCompileError

__all__ = ["MOMENT_DTYPES", "PARAM_DTYPES", "KernelCompileError", "PreparedStep", "multi_tensor_adamw_",
           "prepare_multi_tensor_adamw"]
