"""``python -m selopt.check``, the self-check users run on a new machine: passes here, fails when it must.

Without a GPU and without Triton it checks the torch reference and skips the
kernels; that path, and a GPU machine whose kernels cannot run, are simulated
by replacing ``triton_problem`` and ``torch.cuda.is_available``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import selopt
from selopt import check, functional, reference

NO_TRITON = "Triton is not installed: `pip install triton` (or `pip install 'selopt[triton]'`)"


def test_self_check_from_a_neutral_directory_passes_and_says_there_is_no_gpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "selopt.check"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    out = result.stdout
    kernels = functional.triton_problem() is None
    if not torch.cuda.is_available():
        assert out.startswith("No CUDA device: running the kernels under Triton's interpreter" if kernels else
                              "No CUDA device and no usable Triton")
    for key in ("device:", "driver:", "torch:", "triton:", "selopt:"):
        assert key in out
    assert "FAIL" not in out
    # The reference, the fused CPU path, and the kernels when they can run.
    checked = len(check.reference_cases()) + len(check.fused_cases()) + (len(check.cases(tiny=True)) if kernels else 0)
    assert f"PASS: {checked} of {checked} checks passed" in out


_run = subprocess.run


def _no_subprocess(command, *args, **kwargs):
    # platform.processor() runs `uname`; the interpreter run is `python -m selopt.check` again.
    assert "selopt.check" not in command, "the check must not start the interpreter run when Triton cannot run"
    return _run(command, *args, **kwargs)


def _no_kernel_case(monkeypatch):
    run_case = check.run_case

    def fused_only(case, device, seed=0, step=None):
        if step is None:
            pytest.fail("a kernel check ran without Triton")
        return run_case(case, device, seed, step)

    monkeypatch.setattr(check, "run_case", fused_only)


def test_without_gpu_or_triton_the_reference_and_the_fused_path_are_checked_and_the_kernels_skipped(
        monkeypatch, capsys):
    monkeypatch.setattr(functional, "triton_problem", lambda: NO_TRITON)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(check.subprocess, "run", _no_subprocess)
    _no_kernel_case(monkeypatch)
    assert check.main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("No CUDA device and no usable Triton: CPU tensors run the fused CPU path")
    for case in check.reference_cases():
        assert re.search(rf"^{re.escape(case.name)} +PASS$", out, re.MULTILINE), out
    for case in check.fused_cases():
        assert re.search(rf"^fused CPU: {re.escape(case.name)} +PASS$", out, re.MULTILINE), out
    for case in check.cases(tiny=True):
        assert re.search(rf"^{re.escape(case.name)} +SKIPPED$", out, re.MULTILINE), out
    assert f"the kernels cannot run here: {NO_TRITON}" in out
    n_passed, n_kernels = len(check.reference_cases()) + len(check.fused_cases()), len(check.cases(tiny=True))
    assert out.rstrip().endswith(f"PASS: {n_passed} of {n_passed} checks passed, {n_kernels} kernel checks "
                                 "skipped (no GPU and no usable Triton)")


def test_a_wrong_fused_cpu_path_fails_its_rows(monkeypatch, capsys):
    def off_by_a_little(bucket, options):
        check.fused.prepare_adamw(bucket, options)()
        for p in bucket.params:
            p.mul_(1.001)

    monkeypatch.setattr(functional, "triton_problem", lambda: NO_TRITON)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(check, "fused_step", off_by_a_little)
    _no_kernel_case(monkeypatch)
    assert check.main([]) == 1
    out = capsys.readouterr().out
    assert re.search(r"^fused CPU: MoFO exact fp32 +FAIL$", out, re.MULTILINE), out
    assert "tensor (37,): param differs by up to" in out


def test_without_gpu_or_triton_a_wrong_reference_still_fails(monkeypatch, capsys):
    class OffByALittle(selopt.AdamW):  # a reference whose learning rate is 1% too large
        def __init__(self, params, lr=1e-3, **kwargs):
            super().__init__(params, lr=lr * 1.01, **kwargs)

    monkeypatch.setattr(functional, "triton_problem", lambda: NO_TRITON)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(selopt, "AdamW", OffByALittle)
    assert check.main([]) == 1
    out = capsys.readouterr().out
    assert re.search(r"^reference = torch.optim.AdamW, fp32 +FAIL$", out, re.MULTILINE), out
    assert "step 1, tensor (7, 13): param differs by up to" in out
    n_fused = len(check.fused_cases())  # compared with the reference's math, not with selopt.AdamW
    assert out.rstrip().endswith(f"FAIL: {n_fused} of {n_fused + len(check.reference_cases())} checks passed, "
                                 f"{len(check.cases(tiny=True))} kernel checks skipped (no GPU and no usable Triton)")


@pytest.mark.parametrize("hip, kind", [(None, "CUDA"), ("6.2.0", "ROCm")])
def test_on_a_gpu_machine_kernels_that_cannot_run_fail(monkeypatch, capsys, hip, kind):
    monkeypatch.setattr(functional, "triton_problem", lambda: NO_TRITON)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "hip", hip)
    monkeypatch.setattr(check, "environment", lambda device: [("device", f"{device} (simulated)")])
    monkeypatch.setattr(check.subprocess, "run", _no_subprocess)
    assert check.main([]) == 1
    out = capsys.readouterr().out
    assert re.search(r"^Triton kernels +FAIL$", out, re.MULTILINE), out
    assert f"selopt's Triton kernels cannot run on this {kind} device: {NO_TRITON}" in out
    assert "SKIPPED" not in out
    n = len(check.reference_cases()) + len(check.fused_cases())  # the reference and the fused CPU path
    assert out.rstrip().endswith(f"FAIL: {n} of {n + 1} checks passed")


def test_reference_check_catches_a_wrong_selection(monkeypatch):
    class MovesTooMuch(selopt.AdamW):
        def __init__(self, params, fraction=1.0, **kwargs):
            super().__init__(params, fraction=min(1.0, fraction + 0.1), **kwargs)

    mofo = next(case for case in check.reference_cases() if case.options.get("fraction", 1.0) < 1)
    assert check.reference_problems(mofo) == []
    monkeypatch.setattr(selopt, "AdamW", MovesTooMuch)
    assert "step 1, tensor (37,): moved 12 entries, not torch.topk's 9 of largest |exp_avg|" in (
        check.reference_problems(mofo))


@pytest.mark.skipif(functional.triton_problem() is not None, reason="needs Triton (pip install 'selopt[triton]')")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="runs the kernels in this process: needs a CUDA device or TRITON_INTERPRET=1")
def test_self_check_fails_and_names_the_case_when_kernels_and_reference_disagree(monkeypatch, capsys):
    exact = reference.adamw_math

    def off_by_a_little(*args, **kwargs):
        result = exact(*args, **kwargs)
        return result._replace(param=result.param + 1e-3)

    monkeypatch.setattr(reference, "adamw_math", off_by_a_little)
    monkeypatch.setattr(check, "reference_cases", lambda: [])  # the kernel rows alone
    monkeypatch.setattr(check, "cases", lambda tiny: [
        check.Case("dense fp32", ((3, 5),), options=dict(fraction=1.0)),
        check.Case("MoFO exact fp32", ((40,),), options=dict(fraction=0.1)),
    ])
    assert check.main([]) == 1
    out = capsys.readouterr().out
    assert "dense fp32" in out and "MoFO exact fp32" in out
    assert "tensor (3, 5): param differs by up to" in out
    assert out.rstrip().endswith("FAIL: 0 of 4 checks passed")  # both cases, on the fused CPU path and the kernels


def test_on_rocm_the_check_prints_the_gfx_architecture_and_the_hip_version(monkeypatch, capsys):
    # ROCm's torch: an AMD GPU is a "cuda" device, torch.version.hip is set and torch.version.cuda is not.
    monkeypatch.setattr(torch.version, "hip", "6.4.43482-0f2d60242")
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "AMD Instinct MI300X")
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: SimpleNamespace(gcnArchName="gfx942:sramecc+:xnack-"))
    monkeypatch.setattr(functional, "triton_problem", lambda: NO_TRITON)
    monkeypatch.setattr(check.subprocess, "run", _no_subprocess)
    assert check.main([]) == 1  # the same checks as on CUDA: kernels that cannot run fail
    out = capsys.readouterr().out
    assert "  device: AMD Instinct MI300X (gfx942)\n" in out
    assert "  driver: ROCm, HIP 6.4.43482-0f2d60242\n" in out
    assert f"selopt's Triton kernels cannot run on this ROCm device: {NO_TRITON}" in out
    for case in check.reference_cases():
        assert re.search(rf"^{re.escape(case.name)} +PASS$", out, re.MULTILINE), out
