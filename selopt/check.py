"""``python -m selopt.check``: the first thing to run on a new GPU machine.

Checks what will run on this machine. First the pure-torch reference
(:mod:`selopt.reference`, what ``backend="torch"`` runs) against
``torch.optim.AdamW``; then the fused CPU path (:mod:`selopt.fused`, what CPU
tensors run) and selopt's Triton kernels against the reference over shapes,
dtypes and options; times one step against
``torch.optim.AdamW(fused=True)``; prints a PASS/FAIL table with the device,
driver, torch and Triton versions; exits non-zero on any failure.

Without a CUDA device it says so and runs the kernel checks under Triton's
interpreter on CPU tensors, at tiny sizes (and times nothing). Without a GPU
and without a usable Triton the kernels will not run here (CPU tensors run
the fused CPU path), so their checks are SKIPPED with the reason and the
check passes on the reference and the fused CPU path. On a CUDA or ROCm machine whose kernels
cannot run, it fails. On ROCm (where torch calls an AMD GPU ``cuda``) it runs
the same checks and prints the GPU's gfx architecture and the HIP version.

What "pass" means, per case and tensor: the kernel's selection equals the
reference selection computed from the kernel's own ``exp_avg`` (near-ties may
rank differently after one rounding, so not from the reference's ``m``); the
moments agree within a few ulps; the parameter within one rounding of its
dtype; the step count advanced by one.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

import selopt
from selopt import fused, quantization, reference
from selopt.bucket import Bucket
from selopt.options import AdamWOptions

HYPER = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)  # AdamWOptions keywords
# One rounding of each parameter dtype; fp32 gets a few ulps.
PARAM_RTOL = {torch.float32: 4e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}


@dataclass(frozen=True)
class Case:
    name: str
    shapes: tuple
    param_dtype: torch.dtype = torch.float32
    moment_dtype: torch.dtype = torch.float32
    options: dict = field(default_factory=dict)
    soft_mask: str | None = None  # "rows" or "full"


EIGHT_BIT = torch.uint8  # Case.moment_dtype of 8-bit moments (selopt.quantization)


def cases(tiny: bool) -> list[Case]:
    """The checked cases: ``tiny`` sizes for the interpreter, sizes that fill a GPU's blocks otherwise.

    8-bit cases hold matrices of one quant block each (a bucket shares it): 256, and 32 entries.
    """
    odd = ((1,), (0,), (37,), (5, 67)) if tiny else ((1,), (0,), (4097,), (1000, 1031), (2**20 + 3,))
    blocks = (64, 1024) if tiny else (256, 1024, 4096)
    exact_segment = 8192 if tiny else 65536
    found = [Case("dense fp32", odd, options=dict(fraction=1.0))]
    for size in blocks:
        found.append(Case(f"MoFO block {size} fp32", odd, options=dict(fraction=0.1, block_size=size)))
    found += [
        Case("MoFO exact fp32", odd, options=dict(fraction=0.1)),
        Case(f"MoFO exact segments of {exact_segment}", odd + ((2 * exact_segment + 5,),), options=dict(fraction=0.1, block_size=exact_segment)),
        Case("MoFO exact bf16/fp32", odd, torch.bfloat16, options=dict(fraction=0.15)),
        Case("MoFO exact bf16/bf16", odd, torch.bfloat16, torch.bfloat16, options=dict(fraction=0.15)),
        Case(f"MoFO block {blocks[-1]} fp16/fp32", odd, torch.float16, options=dict(fraction=0.2, block_size=blocks[-1])),
        Case("amsgrad, maximize, decay=selected, beta1=0.3", odd,
             options=dict(fraction=0.25, amsgrad=True, maximize=True, decay="selected", betas=(0.3, 0.999))),
        Case("soft mask per row on the update", odd, options=dict(fraction=0.3), soft_mask="rows"),
        Case("soft mask per entry on the gradient", odd, options=dict(fraction=0.3, block_size=blocks[0],
                                                                       soft_mask_mode="grad"), soft_mask="full"),
    ]
    by_256 = ((5, 1024), (3, 2, 768)) if tiny else ((1024, 4096), (1000, 1536))
    by_32 = ((16, 288),) if tiny else ((2048, 2080),)
    found += [
        Case("dense 8-bit", by_256, moment_dtype=EIGHT_BIT, options=dict(fraction=1.0)),
        Case("MoFO block 1024 8-bit", by_256, moment_dtype=EIGHT_BIT, options=dict(fraction=0.1, block_size=1024)),
        Case("MoFO exact 8-bit", by_256, moment_dtype=EIGHT_BIT, options=dict(fraction=0.1)),
        Case(f"MoFO exact segments of {exact_segment} bf16/8-bit, blocks of 32", by_32, torch.bfloat16, EIGHT_BIT,
             options=dict(fraction=0.15, block_size=exact_segment)),
    ]
    return found


def fused_cases() -> list[Case]:
    """The cases the fused CPU path is checked on: the tiny ones, but for 8-bit moments (the reference runs those)."""
    return [case for case in cases(tiny=True) if case.moment_dtype != EIGHT_BIT]


def _drivers() -> str:
    try:
        version = ctypes.c_int()
        ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version))
        return f"{version.value // 1000}.{version.value % 1000 // 10}"
    except OSError:
        return "unknown"


def environment(device: torch.device) -> list[tuple[str, str]]:
    """What the results depend on: device, driver (on ROCm, the HIP version) and library versions."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception as error:  # noqa: BLE001 - reported, and the kernel checks say why they cannot run
        triton_version = "not installed" if isinstance(error, ModuleNotFoundError) else f"broken ({error})"
    if device.type == "cuda" and torch.version.hip:
        # ROCm's torch calls an AMD GPU "cuda"; its architecture is the gfx name (gfx942:sramecc+:xnack-).
        arch = torch.cuda.get_device_properties(device).gcnArchName.split(":")[0]
        where = f"{torch.cuda.get_device_name(device)} ({arch})"
        runtime = f"ROCm, HIP {torch.version.hip}"
    elif device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        where = f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"
        runtime = f"driver {_drivers()}, CUDA runtime {torch.version.cuda}"
    else:
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        where = f"CPU ({platform.processor() or platform.machine()})" + (", Triton interpreter" if interpreted else "")
        runtime = "no CUDA device"
    return [("device", where), ("driver", runtime), ("torch", torch.__version__),
            ("triton", triton_version), ("selopt", selopt.__version__)]


# fp64: 1e-10 relative; fp32: a few ulps (the reference follows torch's order of operations).
REFERENCE_TOLERANCES = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=4e-7, atol=1e-7)}


@dataclass(frozen=True)
class ReferenceCase:
    name: str
    dtype: torch.dtype
    options: dict = field(default_factory=dict)  # AdamW keywords; a fraction below 1 checks MoFO's selection


def reference_cases() -> list[ReferenceCase]:
    """The checks of the torch reference: AdamW at ``fraction=1``, and MoFO's selection."""
    return [
        ReferenceCase("reference = torch.optim.AdamW, fp32", torch.float32),
        ReferenceCase("reference = torch.optim.AdamW, fp64 amsgrad maximize", torch.float64,
                      dict(amsgrad=True, maximize=True)),
        ReferenceCase("reference MoFO moves torch.topk of |m|, fp64", torch.float64,
                      dict(fraction=0.25, weight_decay=0.0)),
    ]


def reference_problems(case: ReferenceCase, steps: int = 5, seed: int = 0) -> list[str]:
    """How selopt's torch reference (``backend="torch"``) differs from ``torch.optim.AdamW(foreach=False)``.

    Both step identical params with identical gradients, on CPU. At
    ``fraction=1`` the params and state must agree. Below 1 the moments must
    still agree (they are dense), and each step must move exactly the
    ``max(1, floor(fraction * n))`` entries of largest ``|exp_avg|`` per tensor
    (``torch.topk``, as the official MoFO code), each by torch's own update.

    >>> reference_problems(reference_cases()[0])
    []
    """
    options = {**HYPER, **case.options}
    fraction = options.pop("fraction", 1.0)
    gen = torch.Generator().manual_seed(seed)
    initial = [torch.randn(shape, generator=gen, dtype=case.dtype) for shape in ((7, 13), (37,), (1,))]
    ours = [p.clone().requires_grad_() for p in initial]
    theirs = [p.clone().requires_grad_() for p in initial]
    opt_ours = selopt.AdamW(ours, fraction=fraction, backend="torch", **options)
    opt_theirs = torch.optim.AdamW(theirs, foreach=False, **options)
    tolerance = REFERENCE_TOLERANCES[case.dtype]
    problems = []
    for step in range(1, steps + 1):
        before_ours = [p.detach().clone() for p in ours]
        before_theirs = [p.detach().clone() for p in theirs]
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, generator=gen, dtype=case.dtype)
            b.grad = a.grad.clone()
        opt_ours.step()
        opt_theirs.step()
        for index, (a, b) in enumerate(zip(ours, theirs)):
            where = f"step {step}, tensor {tuple(a.shape)}"
            for key, value in opt_theirs.state[b].items():
                if not torch.allclose(opt_ours.state[a][key].to(value.dtype), value, **tolerance):
                    problems.append(f"{where}: {key} differs from torch's")
            if fraction == 1.0:
                if not torch.allclose(a.detach(), b.detach(), **tolerance):
                    problems.append(f"{where}: param differs by up to {_max_difference(a.detach(), b.detach()):.3g}")
                continue
            m = opt_theirs.state[b]["exp_avg"].flatten()
            chosen = torch.zeros_like(m, dtype=torch.bool)
            chosen[m.abs().topk(max(1, int(fraction * m.numel()))).indices] = True
            moved, wanted = (a.detach() - before_ours[index]).flatten(), (b.detach() - before_theirs[index]).flatten()
            if not torch.equal(moved != 0, chosen):
                problems.append(f"{where}: moved {int((moved != 0).sum())} entries, not torch.topk's "
                                f"{int(chosen.sum())} of largest |exp_avg|")
            elif not torch.allclose(moved[chosen], wanted[chosen], rtol=1e-9, atol=1e-14):
                problems.append(f"{where}: the moved entries moved other than torch's update")
    return problems[:5]


def step_problems(before: dict, after: dict, *, options: AdamWOptions, soft_mask: Tensor | None = None,
                  grad_scale: Tensor | None = None) -> list[str]:
    """How one tensor's kernel step differs from the reference; empty when it matches.

    ``before`` and ``after`` hold ``param``, ``exp_avg``, ``exp_avg_sq``,
    ``max_exp_avg_sq`` (or None) and ``step``; ``before`` also the ``grad``,
    ``after`` the kernel's ``selection``.

    >>> p, options = torch.tensor([1.0, 2.0]), AdamWOptions(**HYPER)
    >>> before = dict(param=p, grad=torch.ones(2), exp_avg=torch.zeros(2), exp_avg_sq=torch.zeros(2),
    ...               max_exp_avg_sq=None, step=torch.tensor(0.0))
    >>> want = reference.adamw_math(p, torch.ones(2), torch.zeros(2), torch.zeros(2), None, step=1, options=options)
    >>> after = dict(param=want.param, exp_avg=want.exp_avg, exp_avg_sq=want.exp_avg_sq, max_exp_avg_sq=None,
    ...              step=torch.tensor(1.0), selection=want.selected)
    >>> step_problems(before, after, options=options)
    []
    """
    m, p = after["exp_avg"], after["param"]
    problems = []
    selection = reference.selection_mask(m.float(), options.fraction, options.block_size)
    if not torch.equal(after["selection"], selection):
        problems.append(f"selection differs in {int((after['selection'] != selection).sum())} entries")
    lr = float(options.lr)
    want = reference.adamw_math(
        before["param"], before["grad"], before["exp_avg"], before["exp_avg_sq"], before["max_exp_avg_sq"],
        step=float(before["step"]) + 1, soft_mask=soft_mask, grad_scale=grad_scale,
        options=AdamWOptions.from_group({**options.group_defaults(), "lr": lr}))
    # bf16 moments round to 2^-8; fp32 moments are within a few ulps (torch's CPU lerp may fuse). The
    # ulps are those of m's operands: where the old m and the gradient nearly cancel, the new m is
    # small, and one rounding of the product in the lerp is large beside it.
    bf16 = m.dtype == torch.bfloat16
    grad = reference.effective_grad(before["param"], before["grad"], maximize=options.maximize, soft_mask=soft_mask,
                                    soft_mask_mode=options.soft_mask_mode, grad_scale=grad_scale)
    operands = {"exp_avg": before["exp_avg"].float().abs() + grad.float().abs()}
    pairs = [("exp_avg", want.exp_avg), ("exp_avg_sq", want.exp_avg_sq), ("max_exp_avg_sq", want.max_exp_avg_sq)]
    for name, expected in pairs:
        if expected is None:
            continue
        got, expected = after[name].float(), expected.float()
        allowed = (2**-8 if bf16 else 1e-6) * expected.abs() + 1e-8
        if not bf16 and name in operands:
            allowed = allowed + 2**-21 * operands[name]
        close = ((got - expected).abs() <= allowed) | (got.isnan() & expected.isnan()) | (got == expected)
        if not bool(close.all()):
            problems.append(f"{name} differs by up to {_max_difference(after[name], expected):.3g}")
    # The update is lr-sized: bf16 moments move it by up to ~2^-8 of lr.
    update_atol = 1e-7 if m.dtype == torch.float32 else 2**-7 * lr
    if torch.equal(want.selected, selection) and not torch.allclose(
            p.float(), want.param.to(p.dtype).float(), rtol=PARAM_RTOL[p.dtype], atol=update_atol, equal_nan=True):
        problems.append(f"param differs by up to {_max_difference(p, want.param.to(p.dtype)):.3g}")
    if float(after["step"]) != float(before["step"]) + 1:
        problems.append(f"step is {float(after['step'])}, expected {float(before['step']) + 1}")
    return problems


def quantized_step_problems(before: dict, after: dict, *, options: AdamWOptions) -> list[str]:
    """:func:`step_problems` for 8-bit moments: ``before`` and ``after`` also hold ``exp_avg_scale`` and
    ``exp_avg_sq_scale``, and ``exp_avg``/``exp_avg_sq`` are their codes.

    The selection must be the reference's of the kernel's own stored ``m``; the scales within an ulp
    of the reference's and the codes equal but for a few moved by one (the fresh moments may differ
    by an ulp, torch's ``lerp`` fusing its multiply-add: a code then moves only at a decision point);
    the param within one rounding of its dtype; the step count advanced by one.
    """
    state = {key: value.clone() for key, value in before.items()
             if key in ("step", "exp_avg", "exp_avg_sq", "exp_avg_scale", "exp_avg_sq_scale")}
    param = before["param"].clone()
    want = reference.adamw_step_(param, before["grad"], state, options=options)
    problems = []
    m = reference.QuantizedMoment(after["exp_avg"], after["exp_avg_scale"], signed=True).values()
    selection = reference.selection_mask(m, options.fraction, options.block_size)
    if not torch.equal(after["selection"], selection):
        problems.append(f"selection differs in {int((after['selection'] != selection).sum())} entries")
    for key in ("exp_avg", "exp_avg_sq"):
        scales, expected = after[f"{key}_scale"], state[f"{key}_scale"]
        if not torch.allclose(scales, expected, rtol=2**-23, atol=0, equal_nan=True):
            problems.append(f"{key}_scale differs by up to {_max_difference(scales, expected):.3g}")
        moved = (after[key].int() - state[key].int()).abs()
        if moved.numel() and (int(moved.max()) > 1 or float((moved > 0).float().mean()) > 1e-3):
            problems.append(f"{key} codes differ in {int((moved > 0).sum())} entries, by up to {int(moved.max())}")
    p = after["param"]
    if torch.equal(want, selection) and not torch.allclose(p.float(), param.float(), rtol=PARAM_RTOL[p.dtype],
                                                           atol=1e-7, equal_nan=True):
        problems.append(f"param differs by up to {_max_difference(p, param):.3g}")
    if float(after["step"]) != float(before["step"]) + 1:
        problems.append(f"step is {float(after['step'])}, expected {float(before['step']) + 1}")
    return problems


def _max_difference(a: Tensor, b: Tensor) -> float:
    difference = (a.float() - b.float()).abs()
    return float(difference.nan_to_num(float("inf")).max()) if difference.numel() else 0.0


def fused_step(bucket: Bucket, options: AdamWOptions) -> None:
    """One step of the fused CPU path (:mod:`selopt.fused`), for :func:`run_case`."""
    fused.prepare_adamw(bucket, options)()


def run_case(case: Case, device: torch.device, seed: int = 0,
             step: Callable[[Bucket, AdamWOptions], None] | None = None) -> list[str]:
    """Step an implementation once on ``case`` (``step(bucket, options)``; the kernels by default) and
    compare every tensor with the reference."""
    gen = torch.Generator().manual_seed(seed)
    options = AdamWOptions(**{**HYPER, **case.options})
    amsgrad = options.amsgrad
    quantized = case.moment_dtype == EIGHT_BIT
    tensors = []
    for shape in case.shapes:
        def random(scale=1.0, positive=False, dtype=torch.float32 if quantized else case.moment_dtype):
            values = torch.rand(shape, generator=gen) if positive else torch.randn(shape, generator=gen)
            return (scale * values).to(device=device, dtype=dtype)

        tensors.append(dict(
            param=random(dtype=case.param_dtype), grad=random(dtype=case.param_dtype), exp_avg=random(0.1),
            exp_avg_sq=random(0.1, positive=True), max_exp_avg_sq=random(0.12, positive=True) if amsgrad else None,
            step=torch.tensor(3.0, device=device),
            selection=torch.zeros(shape, dtype=torch.bool, device=device)))
        if quantized:
            block = quantization.quant_block(shape)
            for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
                tensors[-1][key], tensors[-1][f"{key}_scale"] = quantization.quantize(tensors[-1][key], block, signed)
    masks = None
    if case.soft_mask:
        masks = [torch.rand(s[:1] if case.soft_mask == "rows" else s, generator=gen).to(device) for s in case.shapes]
    before = [{k: v.clone() if isinstance(v, Tensor) else v for k, v in t.items()} for t in tensors]
    columns = {key: [t[key] for t in tensors] for key in tensors[0]}
    bucket = Bucket(columns["param"], columns["grad"], columns["exp_avg"], columns["exp_avg_sq"],
                    columns["step"], max_exp_avg_sqs=columns["max_exp_avg_sq"] if amsgrad else None,
                    soft_masks=masks, selections=columns["selection"], exp_avg_scales=columns.get("exp_avg_scale"),
                    exp_avg_sq_scales=columns.get("exp_avg_sq_scale"))
    if step is None:
        from selopt import kernels

        try:
            kernels.multi_tensor_adamw_(bucket, options)
        except kernels.KernelCompileError as error:
            return [str(error)]
    else:
        step(bucket, options)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    problems = []
    for index, (old, new) in enumerate(zip(before, tensors)):
        mask = None if masks is None else masks[index]
        found = (quantized_step_problems(old, new, options=options) if quantized
                 else step_problems(old, new, options=options, soft_mask=mask))
        for problem in found:
            problems.append(f"tensor {tuple(case.shapes[index])}: {problem}")
    return problems


def time_against_torch_fused(device: torch.device, numel: int = 2**24, tensors: int = 16,
                             steps: int = 20) -> list[tuple[str, float]]:
    """Milliseconds per step of selopt's variants and of torch fused AdamW, side by side, on fp32 params."""
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (numel // tensors,)
    variants = {
        "torch.optim.AdamW(fused=True)": lambda ps: torch.optim.AdamW(ps, fused=True),
        "selopt.AdamW": lambda ps: selopt.AdamW(ps, backend="triton"),
        "selopt.MoFO(block_size=1024)": lambda ps: selopt.MoFO(ps, block_size=1024, backend="triton"),
        "selopt.MoFO (exact, per tensor)": lambda ps: selopt.MoFO(ps, backend="triton"),
    }
    times = []
    for label, make in variants.items():
        params = [torch.nn.Parameter(torch.randn(shape, device=device, generator=gen)) for _ in range(tensors)]
        for p in params:
            p.grad = torch.randn(shape, device=device, generator=gen)
        opt = make(params)
        for _ in range(3):
            opt.step()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            opt.step()
        end.record()
        torch.cuda.synchronize(device)
        times.append((label, start.elapsed_time(end) / steps))
        del params, opt
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m selopt.check", description=__doc__.split("\n\n")[0])
    parser.parse_args(argv)
    on_gpu = torch.cuda.is_available()  # CUDA, and ROCm, whose torch calls its devices "cuda" too
    problem = selopt.functional.triton_problem()
    if not on_gpu and problem is None and os.environ.get("TRITON_INTERPRET") != "1":
        print("No CUDA device: running the kernels under Triton's interpreter on CPU, at tiny sizes "
              "(nothing is timed).", flush=True)
        # The interpreter must be chosen before Triton decorates the kernels, so in a fresh process.
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        return subprocess.run([sys.executable, "-m", "selopt.check", *(argv or [])], env=env).returncode
    if not on_gpu and problem is not None:
        print("No CUDA device and no usable Triton: CPU tensors run the fused CPU path, checked with the torch "
              "reference; the kernel checks are skipped.", flush=True)
    device = torch.device("cuda" if on_gpu else "cpu")
    width = 60
    for key, value in environment(device):
        print(f"{key:>8}: {value}")
    print(f"\n{'check':<{width}} result")
    failed = passed = skipped = 0

    def report(name: str, problems: list[str]) -> None:
        nonlocal failed, passed
        failed, passed = failed + bool(problems), passed + (not problems)
        print(f"{name:<{width}} {'FAIL' if problems else 'PASS'}", flush=True)
        for line in problems[:5]:
            print(f"    {line}")

    for reference_case in reference_cases():
        report(reference_case.name, reference_problems(reference_case))
    for case in fused_cases():  # what CPU tensors run, on every machine
        report(f"fused CPU: {case.name}", run_case(case, torch.device("cpu"), step=fused_step))
    if problem is None:
        for case in cases(tiny=not on_gpu):
            report(case.name, run_case(case, device))
    elif on_gpu:
        # backend="auto" would run the reference instead, with one warning: a GPU user must hear it here.
        kind = "ROCm" if torch.version.hip else "CUDA"
        report("Triton kernels", [f"selopt's Triton kernels cannot run on this {kind} device: {problem}"])
    else:
        for case in cases(tiny=True):
            skipped += 1
            print(f"{case.name:<{width}} SKIPPED", flush=True)
        print(f"    the kernels cannot run here: {problem}")
    if on_gpu and problem is None:
        print(f"\n{'one step, 2^24 fp32 entries in 16 tensors':<{width}} ms/step  vs torch fused")
        times = time_against_torch_fused(device)
        baseline = times[0][1]
        for label, ms in times:
            print(f"{label:<{width}} {ms:7.3f}  {ms / baseline:5.2f}x")
    summary = f"{passed} of {passed + failed} checks passed"
    if skipped:
        summary += f", {skipped} kernel checks skipped (no GPU and no usable Triton)"
    print(f"\n{'FAIL' if failed else 'PASS'}: {summary}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
