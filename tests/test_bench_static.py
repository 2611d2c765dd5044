"""bench.static: its SASS parsing and occupancy arithmetic, and the spill/compile check CI relies on."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="bench.static compiles the Triton kernels (pip install 'selopt[triton]')")

from bench import static  # noqa: E402


@pytest.mark.parametrize(("opcode", "bits"), [("LDG.E.128", 128), ("LDG.E.64.CONSTANT", 64), ("STG.E.U16", 16),
                                               ("LDG.E", 32), ("STG.E.U8", 8), ("RED.E.ADD.64.STRONG.GPU", 64)])
def test_access_width_is_read_from_the_opcode(opcode, bits):
    assert static.access_bits(opcode) == bits


def test_occupancy_follows_the_tightest_limit():
    # 128 registers x 8 warps: the register file holds 2 such CTAs; 64 registers: 4.
    assert static.ctas_per_sm(90, registers=128, num_warps=8, shared_bytes=0) == 2
    assert static.ctas_per_sm(90, registers=64, num_warps=8, shared_bytes=0) == 4
    # One warp of 32 registers: the 32-CTA limit; 100 KiB of shared memory: 2 CTAs.
    assert static.ctas_per_sm(90, registers=32, num_warps=1, shared_bytes=0) == 32
    assert static.ctas_per_sm(90, registers=32, num_warps=1, shared_bytes=100 * 1024) == 2


def test_quick_report_compiles_without_spills_on_sm_90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "bench.static", "--arch", "90", "--quick", "--check", "--out", ""],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "FAIL" not in result.stdout
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "path" not in line]
    assert len(rows) == len(static.QUICK)
    assert all("| no |" in row for row in rows)  # the spills column


def test_exact_path_bytes_count_the_list_when_the_window_holds_and_m_when_it_misses():
    # Per fp32 entry: moments 20 + list written <= 4/16, update 16; the refinement rounds read
    # the list (<= 4/16 each) or, when the window missed, m (4 each).
    config = static.PATHS["exact fp32"]

    def total(window_missed):
        return sum(static.working_share(name, window_missed) * static.streamed_bytes(
            static.Compiled(name, {}, None), config) for name in (
            "_moments_histogram_kernel", "_refine_from_list_kernel", "_refine_from_m_kernel",
            "_refine_from_list_kernel", "_refine_from_m_kernel", "_exact_update_kernel"))

    assert total(window_missed=False) == 36.75
    assert total(window_missed=True) == 44.25
