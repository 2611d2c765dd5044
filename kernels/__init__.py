"""Triton kernels of selopt, installed as ``selopt.kernels``.

:func:`prepare_adamw` is the Triton implementation of
:func:`selopt.functional.adamw`: the one-pass block kernel (:mod:`.block`) or
the exact per-tensor radix select (:mod:`.exact`), compiled before anything is
written. :func:`multi_tensor_adamw_` checks a bucket (:func:`check_bucket`),
prepares and runs it. Every function takes a :class:`selopt.bucket.Bucket`.
"""

from selopt.kernels.exact import EXCHANGED_COUNTS
from selopt.kernels.adamw import (
    TRITON_MOMENT_DTYPES, TRITON_PARAM_DTYPES, PreparedStep, check_bucket, multi_tensor_adamw_, prepare_adamw,
)
from selopt.kernels.launch import KernelCompileError
from selopt.kernels.tables import PlanCache

__all__ = ["EXCHANGED_COUNTS", "TRITON_MOMENT_DTYPES", "TRITON_PARAM_DTYPES", "KernelCompileError", "PlanCache", "PreparedStep",
           "check_bucket", "multi_tensor_adamw_", "prepare_adamw"]
