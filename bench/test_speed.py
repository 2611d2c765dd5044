"""pytest-benchmark microbenchmarks of one optimizer step, per variant and dtype.

Not part of ``make test`` (which collects ``tests/`` only). Run::

    pytest bench/test_speed.py --benchmark-group-by=param:case,param:dtype_name
    pytest bench/test_speed.py -k "mofo and fp32" --benchmark-save=mofo

The model-sized case runs on CUDA only; ``python -m bench.speed`` is the full
sweep with bandwidth figures and the JSON results.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from bench import common

DEVICE = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
if DEVICE.type == "cpu":
    common.keep_freed_memory_mapped()  # as bench.speed does: no page faults from temporaries in the timings
CASES = {
    "single-2^20": lambda dtype: common.Case("single", dtype, common.single_tensor_shapes(1 << 20)),
    "llama2-7b-1L": lambda dtype: common.Case("llama2-7b-1L", dtype, common.llama_shapes(1, embeddings=False)),
}


@pytest.mark.parametrize("dtype_name", sorted(common.DTYPES))
@pytest.mark.parametrize("variant", common.variants_for(DEVICE), ids=lambda v: v.label)
@pytest.mark.parametrize("case", sorted(CASES))
def test_step(benchmark, case, variant, dtype_name):
    if case.startswith("llama") and DEVICE.type != "cuda":
        pytest.skip("a 202M-entry decoder layer takes seconds per CPU step: too slow for benchmark rounds; "
                    "python -m bench.speed measures it")
    bench_case = CASES[case](dtype_name)
    if variant.name == "selopt_hft" and not bench_case.is_model:
        pytest.skip("HFT freezes whole tensors: it needs a model's tensor list")
    if variant.name == "torch_adamw_fused":
        available, why = common.torch_fused_available(DEVICE, bench_case.dtype)
        if not available:
            pytest.skip(f"torch fused AdamW unavailable here: {why}")
    budget = common.memory_budget_bytes(DEVICE)
    inputs = common.make_inputs(bench_case, DEVICE, common.rotation_copies(bench_case, DEVICE, budget, 16))
    prepared = common.prepare(variant, bench_case, inputs)
    for step in prepared.steps * 2:  # optimizer state and kernel compilation before timing
        step()
    steps = itertools.cycle(prepared.steps)

    def one_step():
        next(steps)()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize(DEVICE)

    benchmark(one_step)
    benchmark.extra_info.update(
        device=common.device_full_name(DEVICE), bytes_per_step=prepared.bytes_per_step, copies=len(prepared.steps)
    )
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["gbps"] = prepared.bytes_per_step / benchmark.stats.stats.median / 1e9
