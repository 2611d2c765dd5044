"""Every kernel specialization compiles for real NVIDIA and AMD targets, checked without a GPU.

The check runs in a subprocess: ``make test`` sets ``TRITON_INTERPRET=1``,
under which ``@triton.jit`` gives interpreter functions that never compile.
CI also runs it on the oldest supported Triton (``make compile-check-oldest``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton", reason="the compile check compiles Triton kernels (pip install 'selopt[triton]')")

# Every configuration for sm_80 (A100), sm_90 (H100), gfx942 (MI300X, MI325X) and gfx90a (MI250X);
# every path with all options together for sm_100 (B200) and sm_120 (RTX 50xx), the other NVIDIA
# targets CI's Triton supports. The AMD targets cost about 70 s each (bench/NOTES.md §6, AMD Instinct).
ARCHS, QUICK_ARCHS = ["sm_80", "sm_90", "gfx942", "gfx90a"], ["sm_100", "sm_120"]


def run_python(*args: str, timeout: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_every_kernel_specialization_compiles_for_real_gpus():
    result = run_python("-m", "selopt.kernels.compile_check", "--arch", *ARCHS, "--quick-arch", *QUICK_ARCHS,
                        "--jobs", "2", timeout=1200)
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    assert "all kernels compiled" in result.stdout
    for arch in ARCHS + QUICK_ARCHS:
        assert f"\n{arch}: " in result.stdout and f"{arch} [" not in result.stdout


def test_a_kernel_that_cannot_compile_fails_the_check_with_kernel_configuration_and_cause(tmp_path):
    # Reintroduce the bug the interpreter let through: a plain module-level int read inside @jit.
    (tmp_path / "broken.py").write_text(textwrap.dedent("""
        import triton
        import triton.language as tl

        RADIX_BINS = 2048

        @triton.jit
        def _select_bin_kernel(table, histogram, select_state, FIRST_ROUND: tl.constexpr, BIN_BITS: tl.constexpr):
            tl.store(histogram + tl.program_id(0) * RADIX_BINS, 0)
    """))
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        import broken
        from selopt.kernels import compile_check, exact
        exact._select_bin_kernel = broken._select_bin_kernel
        sys.exit(compile_check.main(["--arch", "90", "--only", "exact one tensor"]))
    """)
    result = run_python("-c", script, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr[-4000:]
    assert "FAIL sm_90 [exact one tensor] selopt kernel _select_bin_kernel failed to compile" in result.stdout
    assert 'NameError("Cannot access global variable RADIX_BINS' in result.stdout
    assert "FIRST_ROUND=True, BIN_BITS=10" in result.stdout
    assert result.stdout.rstrip().endswith("FAILED")


def test_an_unknown_target_is_refused_naming_the_argument():
    result = run_python("-m", "selopt.kernels.compile_check", "--arch", "90", "--quick-arch", "gfx1100",
                        timeout=120)
    assert result.returncode == 2
    assert "--quick-arch: arch 'gfx1100' is neither a compute capability (80, sm_90) nor an AMD target (gfx90a, gfx942)" in (
        result.stderr)


def test_the_check_refuses_to_run_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-m", "selopt.kernels.compile_check", "--arch", "90"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "run with TRITON_INTERPRET unset" in result.stderr
