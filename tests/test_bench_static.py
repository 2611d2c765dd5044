"""bench.static: its SASS and AMDGCN parsing and occupancy arithmetic, the committed gfx942 report, and the
spill/width/compile check CI relies on."""

from __future__ import annotations

import json
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


@pytest.mark.parametrize(("mnemonic", "bits"), [("global_load_dwordx4", 128), ("buffer_store_dwordx2", 64),
                                                 ("global_load_dwordx3", 96), ("buffer_load_dword", 32),
                                                 ("global_store_short", 16), ("buffer_load_ushort", 16),
                                                 ("global_load_ubyte", 8), ("global_atomic_add_x2", 64),
                                                 ("buffer_atomic_add_f32", 32), ("s_load_dwordx4", None),
                                                 ("scratch_store_dword", None), ("ds_read_b128", None)])
def test_amdgcn_access_width_is_read_from_the_mnemonic(mnemonic, bits):
    assert static.amdgcn_access_bits(mnemonic) == bits


def test_cdna_occupancy_follows_the_tightest_limit():
    # 512 VGPRs per SIMD lane in granules of 8: 61 -> 64 VGPRs, 8 waves (the cap); 80: 6; 130 -> 136: 3.
    assert static.waves_per_simd(vgprs=61, sgprs=36, num_warps=8, lds_bytes=0) == 8
    assert static.waves_per_simd(vgprs=80, sgprs=36, num_warps=8, lds_bytes=0) == 6
    assert static.waves_per_simd(vgprs=130, sgprs=36, num_warps=8, lds_bytes=0) == 3
    # 800 SGPRs per SIMD in granules of 16: 104 -> 112 SGPRs, 7 waves.
    assert static.waves_per_simd(vgprs=32, sgprs=104, num_warps=8, lds_bytes=0) == 7
    # 64 KiB of LDS per CU: two workgroups of 8 waves over 4 SIMDs hold 4 waves per SIMD.
    assert static.waves_per_simd(vgprs=32, sgprs=32, num_warps=8, lds_bytes=32 * 1024) == 4


AMDGCN = """\t.text
_kernel:
\ts_load_dwordx2 s[2:3], s[0:1], 0x0
\tbuffer_load_dwordx4 v[2:5], v2, s[16:19], 0 offen
.LBB0_1:
\tglobal_load_dword v3, v2, s[40:41] offset:40
\ts_nop 0
\tscratch_store_dword off, v1, s33
\ts_barrier
\ts_cbranch_scc1 .LBB0_1
\ts_branch .LBB0_2
.LBB0_2:
\tbuffer_store_dwordx4 v[2:5], v2, s[16:19], 0 offen
\ts_endpgm
.Lfunc_end0:
; TotalNumSgprs: 36
; TotalNumVgprs: 61
; ScratchSize: 8
; Occupancy: 8
    .sgpr_spill_count: 0
    .vgpr_spill_count: 2
"""


def test_amdgcn_reading_counts_instructions_loops_barriers_spills_and_widths():
    counts = static.read_amdgcn(AMDGCN, "_kernel")
    # s_nop is not counted; the branch back to .LBB0_1 is a loop, the one forward to .LBB0_2 is not.
    assert counts == dict(instructions=9, backward=1, barriers=1, scratch=1, widths={32: 1, 128: 2}, vgprs=61,
                          sgprs=36, scratch_bytes=8, occupancy=8, spilled=2)


def test_a_kernel_is_vectorised_when_its_128_bit_accesses_carry_every_tensor_byte():
    # Dense fp32 on gfx942: p, g, m, v read and p, m, v written, 28 B per entry; 8 waves of 64 lanes
    # over 4096 entries: 14 accesses of 16 B per lane carry them, 13 do not.
    config = static.PATHS["dense fp32"]
    compiled = static.Compiled("_block_adamw_kernel", {"BLOCK": 4096}, None)

    def report(accesses):
        return static.AmdKernelReport("_block_adamw_kernel", 8, 4096, 61, 36, 0, 0, 0, 0, 8, 8, 334, 0, 0,
                                      accesses, 0.0, 0.0)

    assert static.vectorised(report({32: 1, 64: 1, 128: 14}), compiled, config, warp_size=64)
    assert not static.vectorised(report({32: 9, 64: 1, 128: 13}), compiled, config, warp_size=64)
    assert not static.vectorised(report({32: 57, 64: 1}), compiled, config, warp_size=64)


def test_the_committed_gfx942_report_is_spill_free_and_vectorised_on_every_path():
    with open(os.path.join(os.path.dirname(static.__file__), "results", "static-gfx942.json")) as f:
        report = json.load(f)
    assert report["arch"] == "gfx942" and report["occupancy_assumptions"] == static.CDNA
    assert [p["path"] for p in report["paths"]] == list(static.PATHS)
    for path in report["paths"]:
        # 8-bit moments: gfx942 reads the dense and exact paths' codes in narrower than 128-bit accesses
        # (an open gap; sm_90 streams them in 128-bit ones), so those rows are held to no spills only.
        narrow_codes = path["path"].endswith("/8-bit") and not path["path"].startswith("block")
        assert not path["spills"] and (path["vectorised"] or narrow_codes), path["path"]
        for kernel in path["kernels"]:
            # LLVM's occupancy agrees with ours; it cannot see the LDS Triton allocates at launch.
            agree = kernel["waves_per_simd"] == kernel["compiler_occupancy"]
            assert agree if not kernel["lds_bytes"] else kernel["waves_per_simd"] <= kernel["compiler_occupancy"]


def test_quick_report_compiles_without_spills_and_vectorised_on_sm_90_and_gfx942():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "bench.static", "--arch", "90", "gfx942", "--quick", "--check",
                             "--out", ""], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "FAIL" not in result.stdout
    assert "\nsm_90, Triton" in result.stdout and "\ngfx942, Triton" in result.stdout
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "path" not in line]
    assert len(rows) == 2 * len(static.QUICK)
    assert all("| no |" in row for row in rows)  # the spills column
    assert all(",128 |" in row for row in rows)  # the access bits column


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
