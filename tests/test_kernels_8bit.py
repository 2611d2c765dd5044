"""8-bit moments in the Triton kernels against the torch reference (selopt.quantization, issue 23).

Runs on CUDA when there is one, else on CPU under Triton's interpreter
(``TRITON_INTERPRET=1``); sizes stay small for the interpreter. Each step is
checked from the kernels' own state before it: the reference steps a copy of
that state, and the kernels' codes and scales must equal the reference's, the
selection must be the reference selection of the kernels' own stored ``m``,
and the params within the kernel tests' tolerances. Every codes and scales
tensor sits inside a buffer of sentinels, so a write past a tensor shows.

Codes and scales are compared exactly, with one allowance: torch's CPU
``lerp`` fuses its multiply-add, the kernels round twice (no FMA contraction,
selopt.kernels.launch), so a fresh ``m`` may differ by an ulp. A scale is then
an ulp apart, and a code moves by one only where the reference's ``m / scale``
lies within a few ulps of a decision point. :func:`code_differences` checks
exactly that.
"""

from __future__ import annotations

import os

import pytest
import torch

import selopt
from selopt import quantization, reference
from selopt.bucket import Bucket
from selopt.check import HYPER, PARAM_RTOL
from selopt.options import AdamWOptions

pytest.importorskip("triton", reason="the kernel tests need Triton (pip install 'selopt[triton]')")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA device: run with TRITON_INTERPRET=1 to check the kernels on CPU", allow_module_level=True)

from selopt import kernels  # noqa: E402  (after the skip: importing needs a usable Triton)
from selopt.kernels import exact  # noqa: E402

GUARD = 64
# Buckets of one quant block each (the optimizer buckets by it), 2-D and 3-D, rows of 3 to 16 blocks.
SHAPES = {32: [(16, 288), (48, 96)], 128: [(8, 640), (12, 2, 192)], 256: [(5, 1024), (3, 2, 768)]}
# dense; one-pass blocks; exact per tensor and over segments longer than the one-pass limit.
PATHS = {"dense": dict(fraction=1.0), "one_pass 256": dict(fraction=0.1, block_size=256),
         "one_pass 1024": dict(fraction=0.1, block_size=1024), "exact": dict(fraction=0.1),
         "exact segments": dict(fraction=0.1, block_size=2 * exact.CHUNK)}
SENTINEL = {torch.uint8: 0xA5, torch.float32: float("nan"), torch.bfloat16: float("nan")}


def guarded(values: torch.Tensor) -> torch.Tensor:
    """A copy of ``values`` on the device inside a buffer of sentinels."""
    buffer = torch.full((values.numel() + 2 * GUARD,), SENTINEL[values.dtype], dtype=values.dtype, device=DEVICE)
    inside = buffer[GUARD:GUARD + values.numel()].view(values.shape)
    inside.copy_(values)
    return inside


def guards_intact(t: torch.Tensor) -> bool:
    storage = torch.as_strided(t.view(-1), (t.numel() + 2 * GUARD,), (1,), t.storage_offset() - GUARD)
    guards = torch.cat([storage[:GUARD], storage[GUARD + t.numel():]])
    return bool(guards.isnan().all()) if t.is_floating_point() else bool((guards == SENTINEL[t.dtype]).all())


class QuantizedBucket:
    """Params, grads and 8-bit state of tensors sharing a quant block, as the optimizer hands them over."""

    def __init__(self, shapes, param_dtype=torch.float32, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.shapes = shapes
        self.columns = {name: [] for name in ("params", "grads", "exp_avgs", "exp_avg_sqs", "exp_avg_scales",
                                              "exp_avg_sq_scales", "steps", "selections")}
        for shape in shapes:
            block = quantization.quant_block(shape)
            m_codes, m_scales = quantization.quantize(0.1 * torch.randn(shape, generator=gen), block, signed=True)
            v_codes, v_scales = quantization.quantize(0.1 * torch.rand(shape, generator=gen), block, signed=False)
            values = dict(params=torch.randn(shape, generator=gen).to(param_dtype),
                          grads=torch.randn(shape, generator=gen).to(param_dtype), exp_avgs=m_codes,
                          exp_avg_sqs=v_codes, exp_avg_scales=m_scales, exp_avg_sq_scales=v_scales)
            for name, value in values.items():
                self.columns[name].append(guarded(value))
            self.columns["steps"].append(torch.tensor(3.0, device=DEVICE))
            self.columns["selections"].append(torch.randint(0, 2, shape, generator=gen).bool().to(DEVICE))

    def bucket(self) -> Bucket:
        return Bucket(**self.columns)

    def state(self, index: int) -> dict:
        """Tensor ``index``'s state as the reference reads it (copies)."""
        c = self.columns
        return dict(step=c["steps"][index].clone(), exp_avg=c["exp_avgs"][index].clone(),
                    exp_avg_sq=c["exp_avg_sqs"][index].clone(), exp_avg_scale=c["exp_avg_scales"][index].clone(),
                    exp_avg_sq_scale=c["exp_avg_sq_scales"][index].clone())

    def step_and_check(self, options: AdamWOptions, **step) -> None:
        """One kernel step, checked against the reference stepping a copy of the state before it."""
        before = [(self.columns["params"][i].clone(), self.state(i)) for i in range(len(self.shapes))]
        kernels.multi_tensor_adamw_(self.bucket(), options, **step)
        for i, (param, state) in enumerate(before):
            where = f"tensor {i} {self.shapes[i]}"
            for name, column in self.columns.items():
                if name not in ("steps", "selections"):
                    assert guards_intact(column[i]), f"{where}: write outside its {name}"
            # The reference's fp32 moments before they are quantized: what a code that differs is checked on.
            exp_avg, exp_avg_sq, _ = reference.stored_moments(state)
            fresh = reference.adam_moments(param, self.columns["grads"][i], exp_avg.values(), exp_avg_sq.values(),
                                           None, options=options, grad_scale=step.get("grad_scale"))
            selected = reference.adamw_step_(param, self.columns["grads"][i], state, options=options, **step)
            assert_stored_like_reference(self.columns, i, state, fresh, where)
            m = quantization.dequantize(self.columns["exp_avgs"][i], self.columns["exp_avg_scales"][i], signed=True)
            own_selection = reference.selection_mask(m, options.fraction, options.block_size)
            if step.get("found_inf") is None:  # a skipped step writes no selection either
                assert torch.equal(self.columns["selections"][i], own_selection), f"{where}: selection"
            if torch.equal(own_selection, selected):
                got = self.columns["params"][i]
                torch.testing.assert_close(got, param, rtol=PARAM_RTOL[got.dtype], atol=1e-7, equal_nan=True,
                                           msg=lambda text: f"{where}: param: {text}")
            assert float(self.columns["steps"][i]) == float(state["step"]), f"{where}: step count"


def assert_stored_like_reference(columns: dict, index: int, state: dict, fresh: reference.Moments,
                                 where: str) -> None:
    """Tensor ``index``'s codes and scales as the reference's ``state`` holds them (module docstring)."""
    for key, fresh_value, signed in (("exp_avg", fresh.exp_avg, True), ("exp_avg_sq", fresh.exp_avg_sq, False)):
        codes, scales = columns[f"{key}s"][index], columns[f"{key}_scales"][index]
        torch.testing.assert_close(scales, state[f"{key}_scale"], rtol=2**-23, atol=0, equal_nan=True,
                                   msg=lambda text: f"{where}: {key}_scale: {text}")
        problems = code_differences(codes, state[key], fresh_value, state[f"{key}_scale"], signed)
        assert not problems, f"{where}: {key} codes: {problems}"


def code_differences(got: torch.Tensor, want: torch.Tensor, fresh: torch.Tensor, scales: torch.Tensor,
                     signed: bool) -> list[str]:
    """Codes of the kernels that differ from the reference's other than by one, at a decision point
    that the reference's ``fresh / scale`` lies within 4 ulps of."""
    differ = got != want
    if not bool(differ.any()):
        return []
    if int((got.int() - want.int()).abs().max()) > 1:
        return [f"{int(differ.sum())} codes differ, some by more than one"]
    block = quantization.block_of(want, scales)
    normalized = (fresh.float().reshape(-1, block) / scales.reshape(-1, 1)).view(want.shape)[differ]
    point = quantization.decision_points(signed, want.device)[torch.minimum(got, want)[differ].long()]
    far = (normalized - point).abs() > 4 * torch.finfo(torch.float32).eps * point.abs()
    return [f"{int(far.sum())} codes differ away from a decision point"] if bool(far.any()) else []


# Blocks of 256 take the longest under the interpreter (a bisection per small program): every quant
# block size on the other paths, the largest on it.
@pytest.mark.parametrize(("path", "quant_block"), [(path, quant_block) for path in PATHS for quant_block in SHAPES
                                                   if path != "one_pass 256" or quant_block == 256])
def test_kernels_store_and_step_as_the_reference_fp32(path, quant_block):
    bucket = QuantizedBucket(SHAPES[quant_block], seed=quant_block)
    options = AdamWOptions(**HYPER, **PATHS[path])
    for step in range(3):
        for g in bucket.columns["grads"]:
            g.copy_(torch.randn(g.shape, generator=torch.Generator().manual_seed(step)))
        bucket.step_and_check(options)


@pytest.mark.parametrize("path", list(PATHS))
def test_kernels_store_and_step_as_the_reference_bf16(path):
    bucket = QuantizedBucket(SHAPES[256] + [(9, 512)], torch.bfloat16, seed=1)
    bucket.step_and_check(AdamWOptions(**HYPER, **PATHS[path]))


@pytest.mark.parametrize("path", ["dense", "one_pass 256", "exact"])
def test_found_inf_leaves_codes_scales_and_params_unchanged(path):
    bucket = QuantizedBucket(SHAPES[128], seed=2)
    before = {name: [t.clone() for t in column] for name, column in bucket.columns.items() if name != "selections"}
    bucket.step_and_check(AdamWOptions(**HYPER, **PATHS[path]), found_inf=torch.ones((), device=DEVICE))
    for name, column in before.items():
        for old, new in zip(column, bucket.columns[name]):
            torch.testing.assert_close(new, old, rtol=0, atol=0, equal_nan=True, msg=lambda text: f"{name}: {text}")


@pytest.mark.parametrize("path", ["dense", "one_pass 1024", "exact"])
def test_a_nan_gradient_makes_its_blocks_scales_nan(path):
    bucket = QuantizedBucket(SHAPES[256], seed=3)
    bucket.columns["grads"][0].view(-1)[300] = float("nan")  # in the second block of 256
    bucket.step_and_check(AdamWOptions(**HYPER, **PATHS[path]))
    for name in ("exp_avg_scales", "exp_avg_sq_scales"):
        nan_blocks = bucket.columns[name][0].isnan().view(-1).nonzero().view(-1).tolist()
        assert nan_blocks == [1], (name, nan_blocks)
    # Its entries read NaN, so they rank above every number and move (as with fp32 moments).
    assert bucket.columns["selections"][0].view(-1)[256:512].all()


@pytest.mark.parametrize("options", [dict(fraction=1.0), dict(fraction=0.2, block_size=512), dict(fraction=0.2)])
def test_mofo_8bit_on_the_kernels_steps_as_on_the_reference(options):
    # A bucket per quant block, and tensors too small (or 1-D) for 8-bit state keep fp32 moments.
    shapes = [(16, 288), (8, 640), (5, 1024), (3, 2, 768), (7, 64), (300,)]
    gen = torch.Generator().manual_seed(4)
    initial = [torch.randn(shape, generator=gen) for shape in shapes]
    models = {backend: [torch.nn.Parameter(p.clone()) for p in initial] for backend in ("triton", "torch")}
    optimizers = {backend: selopt.MoFO(params, moment_dtype="8bit", backend=backend, **HYPER, **options)
                  for backend, params in models.items()}
    for _ in range(3):
        grads = [torch.randn(shape, generator=gen) for shape in shapes]
        for params in models.values():
            for p, g in zip(params, grads):
                p.grad = g.clone()
        for optimizer in optimizers.values():
            optimizer.step()
    for ours, theirs, shape in zip(models["triton"], models["torch"], shapes):
        state, want = optimizers["triton"].state[ours], optimizers["torch"].state[theirs]
        eight_bit = quantization.quant_block(shape) is not None
        assert state["exp_avg"].dtype == (torch.uint8 if eight_bit else torch.float32), shape
        for key in ("exp_avg_scale", "exp_avg_sq_scale") if eight_bit else ():
            torch.testing.assert_close(state[key], want[key], rtol=4 * 2**-23, atol=0)
        for key in ("exp_avg", "exp_avg_sq") if eight_bit else ():
            # Three steps of an ulp apart in m (the module docstring) may move a code at a decision point.
            assert int((state[key].int() - want[key].int()).abs().max()) <= 1, (shape, key)
            assert float((state[key] != want[key]).float().mean()) < 1e-3, (shape, key)
        torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("signed", [True, False])
def test_the_bucket_lookup_finds_the_code_searchsorted_finds(signed):
    # device.code_of's two lookups, in torch, on every decision point, its neighbours and random values.
    from selopt.kernels import device as d, tables

    values, buckets = (t.cpu() for t in tables.code_tables(torch.device(DEVICE)))
    points = quantization.decision_points(signed)
    y = torch.cat([points, torch.nextafter(points, torch.tensor(2.0)), torch.nextafter(points, torch.tensor(-2.0)),
                   torch.rand(200_000, generator=torch.Generator().manual_seed(5)) ** 8,
                   torch.tensor([0.0, 1.0, 1e-30, 2.0**-23])]).clamp(-1, 1)
    y = torch.cat([y, -y]) if signed else y.abs()
    bits = y.view(torch.int32)
    bucket = (((bits >> d.BUCKET_SHIFT.value) & 0x7FFF) - d.BUCKET_LOW.value).clamp(min=0)
    if signed:
        bucket = bucket + torch.where(bits < 0, d.SIGNED_NEGATIVE_BUCKETS.value, d.SIGNED_BUCKETS.value)
        padded = values[d.SIGNED_POINTS.value:d.SIGNED_POINTS.value + quantization.CODES]
    else:
        bucket = bucket + d.UNSIGNED_BUCKETS.value
        padded = values[d.UNSIGNED_POINTS.value:d.UNSIGNED_POINTS.value + quantization.CODES]
    below = buckets[bucket].long()
    assert torch.equal(below + (y >= padded[below]).long(), torch.searchsorted(points, y, right=True))


@pytest.mark.parametrize("signed", [True, False])
def test_the_quotient_by_the_scale_rounds_as_ieee_division(signed):
    # Values an ulp either side of every decision point times scales from 1e-40 (subnormal) to 1e15: the
    # kernels' reciprocal-and-correction quotient must pick the codes the reference's IEEE division picks.
    # With beta1 = 0 the stored m is the gradient itself, bit for bit on both sides.
    gen = torch.Generator().manual_seed(11)
    points = quantization.decision_points(signed)
    near = torch.cat([points, torch.nextafter(points, torch.tensor(2.0)), torch.nextafter(points, torch.tensor(-2.0))])
    near = near[near.abs() <= 1]
    rows = 48
    y = near[torch.randint(0, len(near), (rows, 256), generator=gen)]
    y[:, 0] = 1.0  # the block's absmax is its scale itself
    scales = 10.0 ** (torch.rand(rows, 1, generator=gen) * 55 - 40)
    grad = (y * scales).abs() if not signed else y * scales
    param = torch.nn.Parameter(torch.zeros(rows, 256, device=DEVICE))
    param.grad = grad.to(DEVICE)
    opt = selopt.AdamW([param], lr=1e-3, betas=(0.0, 0.999), moment_dtype="8bit", backend="triton")
    opt.step()
    codes, want_scales = quantization.quantize(grad, 256, signed=True)
    assert torch.equal(opt.state[param]["exp_avg_scale"].cpu(), want_scales)
    assert torch.equal(opt.state[param]["exp_avg"].cpu(), codes)
