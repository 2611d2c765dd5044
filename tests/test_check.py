"""``python -m selopt.check``, the self-check users run on a new machine: passes here, fails when it must."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton", reason="the self-check runs the Triton kernels (pip install 'selopt[triton]')")

from selopt import check, reference  # noqa: E402


def test_self_check_from_a_neutral_directory_passes_and_says_there_is_no_gpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "selopt.check"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    out = result.stdout
    if not torch.cuda.is_available():
        assert out.startswith("No CUDA device: running the kernels under Triton's interpreter")
    for key in ("device:", "driver:", "torch:", "triton:", "selopt:"):
        assert key in out
    assert "FAIL" not in out
    assert f"PASS: {len(check.cases(tiny=True))} of {len(check.cases(tiny=True))} checks passed" in out


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="runs the kernels in this process: needs a CUDA device or TRITON_INTERPRET=1")
def test_self_check_fails_and_names_the_case_when_kernels_and_reference_disagree(monkeypatch, capsys):
    exact = reference.adamw_math

    def off_by_a_little(*args, **kwargs):
        result = exact(*args, **kwargs)
        return result._replace(param=result.param + 1e-3)

    monkeypatch.setattr(reference, "adamw_math", off_by_a_little)
    monkeypatch.setattr(check, "cases", lambda tiny: [
        check.Case("dense fp32", ((3, 5),), options=dict(fraction=1.0)),
        check.Case("MoFO exact fp32", ((40,),), options=dict(fraction=0.1)),
    ])
    assert check.main([]) == 1
    out = capsys.readouterr().out
    assert "dense fp32" in out and "MoFO exact fp32" in out
    assert "tensor (3, 5): param differs by up to" in out
    assert out.rstrip().endswith("FAIL: 0 of 2 checks passed")
