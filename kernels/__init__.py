"""Triton kernels of selopt, installed as ``selopt.kernels``.

:func:`multi_tensor_adamw_` runs one selective AdamW step for a bucket of
tensors: the one-pass block kernel (:mod:`.block`) or the exact per-tensor
radix select (:mod:`.exact`).
"""

from selopt.kernels.adamw import MOMENT_DTYPES, PARAM_DTYPES, multi_tensor_adamw_

__all__ = ["MOMENT_DTYPES", "PARAM_DTYPES", "multi_tensor_adamw_"]
