"""Kernel speed without a GPU: what the compiled SASS and AMDGCN say, and the H100 time it predicts.

``python -m bench.static`` compiles selopt's kernels for sm_90, sm_80 and
gfx942 (AMD MI300X) through the library's own launch path
(:mod:`selopt.kernels.compile_check`'s compile-only driver). For NVIDIA
targets it disassembles the cubins with the ``cuobjdump`` that ships in the
Triton wheel, and reports per kernel configuration:

* registers, spills (local-memory bytes and LDL/STL instructions), shared
  memory, CTAs per SM (occupancy limits of an H100: 65,536 registers in
  256-register warp allocations, 2,048 threads, 32 CTAs, 228 KiB shared);
* the widths of the global accesses, and the barriers (``BAR``);
* warp-instructions per element: SASS instructions x warps / elements per
  program. The kernels are straight-line code (loops are reported), so the
  static count is the dynamic one, give or take the never-taken branches;
* bytes per element: the tensors the kernel must stream (params, grads,
  moments), not counting per-program table reads;
* for sm_90, a roofline **prediction** of the H100 time of one step over 2^28
  elements: bytes / copy bandwidth, warp-instructions / issue rate, and the
  sum over the kernels of the larger of the two.

For AMD targets it reads the AMDGCN assembly Triton keeps (``asm["amdgcn"]``)
and reports the same measures in AMD's terms: VGPRs and SGPRs, scratch
(spill) bytes and ``scratch_*`` instructions, LDS, waves per SIMD (the
occupancy limits in :data:`CDNA`), the widths of ``global_*``/``buffer_*``
accesses, the ``s_barrier`` count and wave-instructions per element
(Triton's warp is the 64-lane wavefront there). It predicts no time for them.

The assumptions of the prediction are in :data:`H100` and written into the
JSON, as are those of the AMD occupancy (:data:`CDNA`). ``--check`` exits
non-zero on a compile error, a spill, or a kernel that streams whole tensors
(:data:`VECTORISED_KERNELS`) in narrower than 128-bit accesses (CI runs it on
``--quick``); results go to ``bench/results/static-sm<arch>.json`` and
``static-gfx<arch>.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import dataclasses
from dataclasses import asdict, dataclass

import torch

import triton
from triton.backends.compiler import GPUTarget

from selopt.kernels import block, launch, select_state
from selopt.kernels.compile_check import (Compiled, Configuration, compile_only, gpu_target, run_configuration,
                                          target_name)
from selopt.kernels.launch import KernelCompileError
from selopt.quantization import QUANT_BLOCK

# What the prediction assumes: an H100 SXM5 80GB. Copy bandwidth is that of an H100
# device-to-device copy (read + write bytes; bench/NOTES.md §2, §4); the issue rate is one
# warp-instruction per clock per SM sub-partition at the clock an H100 holds under a
# memory-bound load.
H100 = dict(sms=132, issue_per_clock_per_sm=4, clock_hz=1.755e9, copy_bytes_per_s=3.0e12, elements=2**28)
# Occupancy limits per SM (sm_80 and sm_90 share the register file and thread limits).
SM_REGISTERS, REGISTER_ALLOCATION, SM_THREADS, SM_CTAS = 65536, 256, 2048, 32
SM_SHARED = {80: 164 * 1024, 90: 228 * 1024}
CTA_RESERVED_SHARED = 1024
# Occupancy limits of an AMD Instinct CDNA3 compute unit (MI300X, MI325X: gfx942), the same as
# CDNA2's (MI250X: gfx90a), from AMD's hardware specifications (a 512 KiB VGPR file and a 12.5 KiB
# SGPR file per CU of 4 SIMDs, 64 KiB LDS, wavefront 64) and LLVM's AMDGPU backend (allocation
# granules, at most 8 waves per SIMD). A wave's VGPRs and AGPRs come from one file of 512 per lane.
CDNA = dict(simds_per_cu=4, wavefront=64, vgprs_per_simd_lane=512, vgpr_granule=8, sgprs_per_simd=800,
            sgpr_granule=16, max_waves_per_simd=8, lds_bytes_per_cu=64 * 1024,
            source="rocm.docs.amd.com/en/latest/reference/gpu-arch-specs.html; "
                   "llvm.org/docs/CommandGuide/llvm-calc-occupancy.html (gfx90a: 8 waves/EU, 4 EUs/CU)")

PATHS = {
    "dense fp32": Configuration("dense fp32", None, 1.0),
    "dense bf16/fp32": Configuration("dense bf16/fp32", None, 1.0, torch.bfloat16),
    **{f"block {size} fp32": Configuration(f"block {size} fp32", size) for size in (256, 1024, 4096, 8192, 16384)
       if size <= block.MAX_BLOCK},
    "block 1024 bf16/fp32": Configuration("block 1024 bf16/fp32", 1024, param_dtype=torch.bfloat16),
    "block 4096 bf16/fp32, every option": Configuration(
        "block 4096 bf16/fp32, every option", 4096, param_dtype=torch.bfloat16, options=frozenset(
            {"amsgrad", "maximize", "decay_selected", "soft_mask_rows_update", "lr_on_device", "grad_scale",
             "found_inf", "stochastic_rounding"})),
    "exact fp32": Configuration("exact fp32", None),
    "exact bf16/fp32": Configuration("exact bf16/fp32", None, param_dtype=torch.bfloat16),
    # 8-bit moments (codes and a scale per block of 256, selopt.quantization), fp32 and bf16 params.
    **{f"{path} {param}/8-bit": Configuration(f"{path} {param}/8-bit", size, fraction, dtype, torch.uint8,
                                              quant_block=QUANT_BLOCK)
       for path, size, fraction in (("dense", None, 1.0), ("block 1024", 1024, 0.25), ("block 4096", 4096, 0.25),
                                    ("exact", None, 0.25))
       for param, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))},
}
# With 8-bit moments only the one-pass path: gfx942 streams the dense and exact paths' codes in 64-bit
# accesses (8 codes per lane of its 64-wide waves), which --check would fail (bench/NOTES.md §9).
QUICK = ("dense fp32", "block 1024 fp32", f"block {block.MAX_BLOCK} fp32", "block 4096 bf16/fp32, every option",
         "exact fp32", "block 1024 fp32/8-bit")

# The kernels that stream whole tensors (params, grads, moments), in 128-bit accesses (vectorised()).
# The candidate-list kernel reads a short list of positions and the per-segment kernels read tables.
VECTORISED_KERNELS = ("_block_adamw_kernel", "_moments_histogram_kernel", "_refine_from_m_kernel",
                      "_exact_update_kernel")

_INSTRUCTION = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_GLOBAL_ACCESS = re.compile(r"^(LDG|STG|RED|ATOMG)\b")
# AMDGCN: an instruction is a tab-indented lower-case mnemonic (directives start with a dot).
_AMDGCN_INSTRUCTION = re.compile(r"^\t([a-z][a-z0-9_]*)(?:\s+(\S.*))?$")
_AMDGCN_GLOBAL_ACCESS = re.compile(r"^(?:global|buffer|flat)_(load|store|atomic)_(\w+)$")


@dataclass
class KernelReport:
    """The static measures of one compiled kernel."""

    kernel: str
    num_warps: int
    elements_per_program: int  # 0 for per-segment kernels (their cost does not grow with the elements)
    registers: int
    local_bytes: int
    spill_instructions: int
    shared_bytes: int
    ctas_per_sm: int
    instructions: int
    backward_branches: int
    barriers: int
    global_access_bits: dict
    warp_instructions_per_element: float
    bytes_per_element: float

    @property
    def spills(self) -> bool:
        return bool(self.local_bytes or self.spill_instructions)


@dataclass
class AmdKernelReport:
    """The static measures of one kernel compiled for an AMD target (a warp is a 64-lane wavefront)."""

    kernel: str
    num_warps: int
    elements_per_program: int  # 0 for per-segment kernels (their cost does not grow with the elements)
    vgprs: int  # VGPRs and AGPRs together: what the occupancy counts
    sgprs: int
    scratch_bytes: int
    spilled_registers: int  # VGPRs and SGPRs the compiler spilled
    spill_instructions: int
    lds_bytes: int
    waves_per_simd: int
    compiler_occupancy: int  # the waves per SIMD LLVM reports, for comparison (it cannot see Triton's LDS)
    instructions: int
    backward_branches: int
    barriers: int
    global_access_bits: dict
    warp_instructions_per_element: float
    bytes_per_element: float

    @property
    def spills(self) -> bool:
        return bool(self.scratch_bytes or self.spilled_registers or self.spill_instructions)


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def disassemble(cubin: bytes) -> tuple[str, str]:
    """(SASS, resource usage) of a cubin, from ``cuobjdump``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], check=True, capture_output=True, text=True)
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], check=True, capture_output=True,
                               text=True)
    return sass.stdout, usage.stdout


def access_bits(opcode: str) -> int:
    """Width in bits of a global access: ``LDG.E.128`` -> 128, ``STG.E.U16`` -> 16, ``LDG.E`` -> 32."""
    for part in opcode.split(".")[1:]:
        digits = re.fullmatch(r"[US]?(\d+)", part)
        if digits:
            return int(digits.group(1))
    return 32


def ctas_per_sm(arch: int, registers: int, num_warps: int, shared_bytes: int) -> int:
    per_warp = math.ceil(registers * 32 / REGISTER_ALLOCATION) * REGISTER_ALLOCATION
    by_registers = (SM_REGISTERS // per_warp) // num_warps
    by_threads = SM_THREADS // (32 * num_warps)
    by_shared = SM_SHARED[arch] // (shared_bytes + CTA_RESERVED_SHARED)
    return min(by_registers, by_threads, SM_CTAS, by_shared)


def amdgcn_access_bits(mnemonic: str) -> int | None:
    """Width in bits of an AMDGCN global access, None for other instructions.

    Example:
        >>> [amdgcn_access_bits(m) for m in ("global_load_dwordx4", "buffer_store_short", "global_atomic_add_f32",
        ...                                  "buffer_load_dword", "global_load_ubyte", "s_load_dwordx2")]
        [128, 16, 32, 32, 8, None]
    """
    match = _AMDGCN_GLOBAL_ACCESS.match(mnemonic)
    if not match:
        return None
    kind, operand = match.groups()
    if kind == "atomic":
        return 64 if operand.endswith("_x2") else 32
    if "byte" in operand:
        return 8
    if "short" in operand:
        return 16
    vector = re.search(r"dwordx(\d)", operand)
    return 32 * int(vector.group(1)) if vector else 32


def _round_up(value: int, granule: int) -> int:
    return max(1, math.ceil(value / granule)) * granule


def waves_per_simd(vgprs: int, sgprs: int, num_warps: int, lds_bytes: int) -> int:
    """Waves of one kernel a CDNA SIMD holds at once (:data:`CDNA`'s limits).

    A workgroup's waves spread over the CU's four SIMDs; its LDS is the CU's.

    Example:
        >>> waves_per_simd(vgprs=61, sgprs=36, num_warps=8, lds_bytes=0)    # 64 VGPRs: 8 waves
        8
        >>> waves_per_simd(vgprs=103, sgprs=36, num_warps=8, lds_bytes=0)   # 104 VGPRs: 4 waves
        4
    """
    by_vgprs = CDNA["vgprs_per_simd_lane"] // _round_up(vgprs, CDNA["vgpr_granule"])
    by_sgprs = CDNA["sgprs_per_simd"] // _round_up(sgprs, CDNA["sgpr_granule"])
    by_lds = CDNA["max_waves_per_simd"]
    if lds_bytes:
        workgroups = CDNA["lds_bytes_per_cu"] // lds_bytes
        by_lds = math.ceil(workgroups * num_warps / CDNA["simds_per_cu"])
    return min(CDNA["max_waves_per_simd"], by_vgprs, by_sgprs, by_lds)


def streamed_bytes(compiled: Compiled, config: Configuration, tensors_only: bool = False) -> float:
    """Bytes per element the kernel moves when all its programs work: the tensors it reads and writes, once each.

    The exact path's moments kernel also writes its candidate list, at most
    one int32 key per ``CANDIDATE_SHARE`` entries; its list kernels read it.
    ``tensors_only``: the params, grads and moments alone, without the list
    and the selections written (what the 128-bit accesses must carry).
    """
    param = config.param_dtype.itemsize
    # A moment: its entry, and for 8-bit moments its share of the block's fp32 scale (not counted in
    # what the 128-bit accesses must carry: one short vector per tile).
    moment = config.moment_dtype.itemsize + (4 / config.quant_block if config.quant_block and not tensors_only else 0)
    amsgrad = "amsgrad" in config.options
    selection = 1 if "selections" in config.options and not tensors_only else 0
    candidate_list = 0 if tensors_only else 4
    moments = (2 + amsgrad) * moment * 2  # m, v (and vmax), each read and written
    if compiled.name == "_block_adamw_kernel":
        return 3 * param + moments + selection  # p read + written, g read
    if compiled.name == "_moments_histogram_kernel":
        return param + moments + candidate_list / select_state.CANDIDATE_SHARE.value
    if compiled.name == "_refine_from_m_kernel":
        return moment
    if compiled.name == "_refine_from_list_kernel":
        return candidate_list
    if compiled.name == "_exact_update_kernel":
        return 2 * param + 2 * moment + selection  # p read + written, m and the denominator's moment read
    return 0.0  # per-segment kernels


def vectorised(report: KernelReport | AmdKernelReport, compiled: Compiled, config: Configuration,
               warp_size: int) -> bool:
    """Whether a kernel's 128-bit accesses can carry every param, grad and moment byte it streams.

    Each 128-bit access of a program moves 16 bytes per lane; a tensor read or
    written in narrower pieces leaves them short of the bytes it streams.
    """
    if report.kernel not in VECTORISED_KERNELS:
        return True
    lanes = report.num_warps * warp_size
    carried = report.global_access_bits.get(128, 0) * 16 * lanes / report.elements_per_program
    return carried >= streamed_bytes(compiled, config, tensors_only=True)


def working_share(name: str, window_missed: bool) -> float:
    """The share of a kernel's programs that do their work (the others stop after a flag load).

    Each exact-path refinement round launches a kernel over ``m`` and one
    over the candidate list; a row's programs work in one of them: the list
    when the window around the last threshold holds the new one, ``m`` when
    it missed. The list spans at most 1/``CANDIDATE_SHARE`` of a row's programs.
    """
    if name == "_refine_from_m_kernel":
        return 1.0 if window_missed else 0.0
    if name == "_refine_from_list_kernel":
        return 0.0 if window_missed else 1 / select_state.CANDIDATE_SHARE.value
    return 1.0


def elements_per_program(compiled: Compiled) -> int:
    return compiled.options.get("BLOCK") or compiled.options.get("CHUNK") or 0


def analyse(compiled: Compiled, config: Configuration, arch: int) -> KernelReport:
    sass, usage = disassemble(compiled.binary.asm["cubin"])
    resources = dict(re.findall(r"(\w+):(\d+)", usage.split("Function", 1)[1]))
    instructions, backward, barriers, spills, widths = 0, 0, 0, 0, {}
    for line in sass.splitlines():
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        address, opcode, operands = int(match.group(1), 16), match.group(2), match.group(3)
        if opcode == "NOP":
            continue
        instructions += 1
        if opcode.startswith("BRA"):
            target = re.search(r"0x([0-9a-f]+)", operands)
            # Triton ends every kernel with a branch to itself after EXIT; that is no loop.
            if target and int(target.group(1), 16) < address:
                backward += 1
        barriers += opcode.startswith("BAR")
        spills += opcode.startswith(("LDL", "STL"))
        if _GLOBAL_ACCESS.match(opcode):
            bits = access_bits(opcode)
            widths[bits] = widths.get(bits, 0) + 1
    num_warps = compiled.binary.metadata.num_warps
    registers, shared = int(resources["REG"]), int(resources["SHARED"])
    report = KernelReport(
        kernel=compiled.name, num_warps=num_warps, elements_per_program=elements_per_program(compiled),
        registers=registers, local_bytes=int(resources["LOCAL"]) + int(resources.get("STACK", 0)),
        spill_instructions=spills, shared_bytes=shared, ctas_per_sm=ctas_per_sm(arch, registers, num_warps, shared),
        instructions=instructions, backward_branches=backward - 1 if backward else 0, barriers=barriers,
        global_access_bits=dict(sorted(widths.items())), warp_instructions_per_element=0.0, bytes_per_element=0.0,
    )
    return per_element(report, compiled, config, window_missed=False)


def read_amdgcn(asm: str, kernel: str) -> dict:
    """Counts over the body of ``kernel`` in its AMDGCN assembly, and the resource lines LLVM prints after it.

    Spills show in the resource lines (``ScratchSize``, ``.vgpr_spill_count``)
    and, on gfx942, as ``scratch_*`` instructions (flat scratch).
    """
    body = asm.split(f"\n{kernel}:", 1)[1].split("\n.Lfunc_end", 1)[0]
    labels, counts, widths = set(), dict(instructions=0, backward=0, barriers=0, scratch=0), {}
    for line in body.splitlines():
        if re.match(r"^\.L\w+:", line):
            labels.add(line[:-1])
        match = _AMDGCN_INSTRUCTION.match(line)
        if not match or match.group(1) == "s_nop":
            continue
        mnemonic, operands = match.group(1), match.group(2) or ""
        counts["instructions"] += 1
        # A branch to a label already seen goes backward: a loop.
        counts["backward"] += mnemonic.startswith(("s_branch", "s_cbranch")) and operands.split()[-1] in labels
        counts["barriers"] += mnemonic == "s_barrier"
        counts["scratch"] += mnemonic.startswith("scratch_")
        bits = amdgcn_access_bits(mnemonic)
        if bits:
            widths[bits] = widths.get(bits, 0) + 1

    def resource(pattern: str) -> int:
        return int(re.search(pattern, asm).group(1))

    return dict(counts, widths=dict(sorted(widths.items())),
                vgprs=resource(r"; TotalNumVgprs: (\d+)"), sgprs=resource(r"; TotalNumSgprs: (\d+)"),
                scratch_bytes=resource(r"; ScratchSize: (\d+)"),
                occupancy=resource(r"; Occupancy: (\d+)"),
                spilled=resource(r"\.vgpr_spill_count:\s+(\d+)") + resource(r"\.sgpr_spill_count:\s+(\d+)"))


def analyse_amdgcn(compiled: Compiled, config: Configuration) -> AmdKernelReport:
    counts = read_amdgcn(compiled.binary.asm["amdgcn"], compiled.name)
    # Triton allocates LDS at launch (the assembly's LDSByteSize is 0); its metadata has the size.
    num_warps, lds_bytes = compiled.binary.metadata.num_warps, compiled.binary.metadata.shared
    report = AmdKernelReport(
        kernel=compiled.name, num_warps=num_warps, elements_per_program=elements_per_program(compiled),
        vgprs=counts["vgprs"], sgprs=counts["sgprs"], scratch_bytes=counts["scratch_bytes"],
        spilled_registers=counts["spilled"], spill_instructions=counts["scratch"], lds_bytes=lds_bytes,
        waves_per_simd=waves_per_simd(counts["vgprs"], counts["sgprs"], num_warps, lds_bytes),
        compiler_occupancy=counts["occupancy"], instructions=counts["instructions"],
        backward_branches=counts["backward"], barriers=counts["barriers"], global_access_bits=counts["widths"],
        warp_instructions_per_element=0.0, bytes_per_element=0.0,
    )
    return per_element(report, compiled, config, window_missed=False)


def per_element(report: KernelReport | AmdKernelReport, compiled: Compiled, config: Configuration,
                window_missed: bool) -> KernelReport | AmdKernelReport:
    """``report`` with its per-element figures for a step whose candidate window held (or missed)."""
    share = working_share(compiled.name, window_missed)
    elements = report.elements_per_program
    return dataclasses.replace(
        report,
        warp_instructions_per_element=round(share * report.instructions * report.num_warps / elements, 3)
        if elements else 0.0,
        bytes_per_element=share * streamed_bytes(compiled, config))


def predict_h100(kernels: list[KernelReport]) -> dict:
    """Roofline prediction of one step over ``H100["elements"]`` elements (a prediction, not a measurement)."""
    n = H100["elements"]
    issue_rate = H100["sms"] * H100["issue_per_clock_per_sm"] * H100["clock_hz"]
    bytes_ms = sum(k.bytes_per_element for k in kernels) * n / H100["copy_bytes_per_s"] * 1e3
    issue_ms = sum(k.warp_instructions_per_element for k in kernels) * n / issue_rate * 1e3
    bound_ms = sum(max(k.bytes_per_element * n / H100["copy_bytes_per_s"],
                       k.warp_instructions_per_element * n / issue_rate) for k in kernels) * 1e3
    return dict(bytes_bound_ms=round(bytes_ms, 3), issue_bound_ms=round(issue_ms, 3),
                predicted_ms=round(bound_ms, 3))


def report_path(name: str, config: Configuration, arch: int | str) -> dict:
    target = gpu_target(arch)
    with compile_only(arch) as compiled:
        run_configuration(config)
    if target.backend == "hip":
        kernels = [analyse_amdgcn(c, config) for c in compiled]
    else:
        kernels = [analyse(c, config, target.arch) for c in compiled]
    streaming = [k for k in kernels if k.elements_per_program]
    occupancy = (dict(min_waves_per_simd=min(k.waves_per_simd for k in streaming)) if target.backend == "hip"
                 else dict(min_ctas_per_sm=min(k.ctas_per_sm for k in streaming)))
    result = dict(
        path=name, kernels=[asdict(k) for k in kernels],
        spills=any(k.spills for k in kernels),
        **_totals(streaming, target),
        **occupancy,
        access_bits=sorted({bits for k in streaming for bits in k.global_access_bits}),
        vectorised=all(vectorised(k, c, config, target.warp_size) for k, c in zip(kernels, compiled)),
        window_missed=None,
    )
    if any(c.name == "_refine_from_m_kernel" for c in compiled):
        # The exact path's figures above are for a step whose window held the threshold (the list
        # at its fullest); these for one whose refinement reread m.
        missed = [per_element(k, c, config, window_missed=True) for k, c in zip(kernels, compiled)]
        result["window_missed"] = _totals([k for k in missed if k.elements_per_program], target)
    return result


def _totals(streaming: list[KernelReport | AmdKernelReport], target: GPUTarget) -> dict:
    return dict(
        warp_instructions_per_element=round(sum(k.warp_instructions_per_element for k in streaming), 3),
        bytes_per_element=round(sum(k.bytes_per_element for k in streaming), 3),
        # The prediction's numbers are an H100's: for other targets the table has none.
        h100_prediction=predict_h100(streaming) if target_name(target) == "sm_90" else None,
    )


def host_time_ms(tensors: int = 300, steps: int = 200) -> dict:
    """Host CPU time of one ``selopt.MoFO`` step (exact path) for a model of ``tensors`` tensors.

    CPU tensors stand in for CUDA ones under the compile-only driver, so each
    launch costs what Triton's launch path costs on the host (argument binding,
    cache lookup) but no driver call. Thread CPU time, min and median of
    ``steps`` steps after two warm-up steps (the first compiles).
    """
    import statistics
    import time
    from unittest import mock

    import selopt
    from selopt import functional

    shapes = [(64, 64)] * 7 + [(64,)] * 2  # a decoder layer's matrices and norms, in miniature
    params = [torch.nn.Parameter(torch.randn(shapes[i % len(shapes)])) for i in range(tensors)]
    for p in params:
        p.grad = torch.randn_like(p)
    # The optimizer sends CUDA tensors to the kernels; these CPU tensors stand in for them.
    with mock.patch.object(functional, "choose_implementation", lambda *args, **kwargs: functional.TRITON), \
            compile_only(90):
        opt = selopt.MoFO(params)
        opt.step()
        opt.step()
        times = []
        for _ in range(steps):
            start = time.thread_time()
            opt.step()
            times.append((time.thread_time() - start) * 1e3)
    return dict(tensors=tensors, min_ms=round(min(times), 3), median_ms=round(statistics.median(times), 3))


def markdown(results: list[dict]) -> str:
    lines = ["| path | regs | spills | CTAs/SM | access bits | barriers | warp-instr/elem | B/elem | "
             "predicted H100 ms, 2^28 elems (bytes / issue / max) |", "|---" * 9 + "|"]
    for r in results:
        streaming = [k for k in r["kernels"] if k["elements_per_program"]]
        p = r["h100_prediction"]
        predicted = f"{p['bytes_bound_ms']:.2f} / {p['issue_bound_ms']:.2f} / {p['predicted_ms']:.2f}" if p else "-"
        lines.append(
            f"| {r['path']} | {'/'.join(str(k['registers']) for k in streaming)} | {'yes' if r['spills'] else 'no'} "
            f"| {r['min_ctas_per_sm']} | {','.join(map(str, r['access_bits']))} "
            f"| {sum(k['barriers'] for k in streaming)} | {r['warp_instructions_per_element']:.2f} "
            f"| {_bytes_cell(r)} | {predicted} |")
    return "\n".join(lines)


def markdown_amdgcn(results: list[dict]) -> str:
    lines = ["| path | VGPRs | SGPRs | spills | waves/SIMD | access bits | barriers | wave-instr/elem | B/elem |",
             "|---" * 9 + "|"]
    for r in results:
        streaming = [k for k in r["kernels"] if k["elements_per_program"]]
        lines.append(
            f"| {r['path']} | {'/'.join(str(k['vgprs']) for k in streaming)} "
            f"| {'/'.join(str(k['sgprs']) for k in streaming)} | {'yes' if r['spills'] else 'no'} "
            f"| {r['min_waves_per_simd']} | {','.join(map(str, r['access_bits']))} "
            f"| {sum(k['barriers'] for k in streaming)} | {r['warp_instructions_per_element']:.2f} "
            f"| {_bytes_cell(r)} |")
    return "\n".join(lines)


def _bytes_cell(result: dict) -> str:
    missed = result["window_missed"]
    if not missed:
        return f"{result['bytes_per_element']:g}"
    predicted = f", predicted {missed['h100_prediction']['predicted_ms']:.2f} ms" if missed["h100_prediction"] else ""
    return f"{result['bytes_per_element']:g} ({missed['bytes_per_element']:g}{predicted} if the window misses)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.static", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", default=["90", "80", "gfx942"],
                        help="targets: NVIDIA compute capabilities (90, sm_80) or AMD architectures (gfx942)")
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    parser.add_argument("--check", action="store_true",
                        help="exit non-zero on a spill or tensors streamed in narrower than 128-bit accesses")
    parser.add_argument("--no-host-time", action="store_true", help="skip the host-time measurement")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"),
                        help="folder of static-sm<arch>.json and static-gfx<arch>.json ('' writes nothing)")
    args = parser.parse_args(argv)
    if launch.INTERPRETED:
        parser.error("the kernels were loaded by Triton's interpreter: run with TRITON_INTERPRET unset")
    try:
        targets = [gpu_target(arch) for arch in args.arch]
    except ValueError as error:
        parser.error(f"--arch: {error}")
    triton.knobs.cache.dir = tempfile.mkdtemp(prefix="selopt-static-")
    names = QUICK if args.quick else tuple(PATHS)
    host = None if args.quick or args.no_host_time else host_time_ms()
    if host:
        print(f"host CPU time of a {host['tensors']}-tensor MoFO step: {host['min_ms']} ms min, "
              f"{host['median_ms']} ms median")
    failed = False
    for arch, target in zip(args.arch, targets):
        results = report_target(arch, names)
        failed = failed or len(results) < len(names) or any(r["spills"] or not r["vectorised"] for r in results)
        table = markdown_amdgcn(results) if target.backend == "hip" else markdown(results)
        print(f"\n{target_name(target)}, Triton {triton.__version__}\n\n{table}\n", flush=True)
        if args.out and not args.quick:
            write_report(args.out, target, results, host, argv if argv is not None else sys.argv[1:])
    return 1 if failed and args.check else 0


def report_target(arch: int | str, names: tuple[str, ...]) -> list[dict]:
    """The reports of the paths ``names`` for ``arch``.

    Prints a FAIL line for a path that fails to compile, and one for the paths
    that spill and for those whose tensors are not all streamed in 128-bit accesses.
    """
    name, results = target_name(gpu_target(arch)), []
    for path in names:
        try:
            results.append(report_path(path, PATHS[path], arch))
        except KernelCompileError as error:
            print(f"FAIL {name} [{path}] {error}")
    spilling = [r["path"] for r in results if r["spills"]]
    if spilling:
        print(f"FAIL {name}: spills in {'; '.join(spilling)}")
    narrow = [r["path"] for r in results if not r["vectorised"]]
    if narrow:
        print(f"FAIL {name}: tensors not streamed in 128-bit accesses in {'; '.join(narrow)}")
    return results


def write_report(folder: str, target: GPUTarget, results: list[dict], host: dict | None, argv: list[str]) -> None:
    """``static-sm90.json``, ``static-gfx942.json``: the reports with what they assume."""
    name = target_name(target)
    if target.backend == "hip":
        assumptions = dict(occupancy_assumptions=CDNA, note="static analysis of the compiled code, not a measurement")
    else:
        assumptions = dict(prediction_assumptions=H100, note="static analysis of the compiled code and a roofline "
                                                             "prediction, not a measurement")
    document = dict(arch=name, triton=triton.__version__, torch=torch.__version__,
                    command=" ".join(["python -m bench.static", *argv]), **assumptions, host_time=host,
                    paths=results)
    with open(os.path.join(folder, f"static-{name.replace('_', '')}.json"), "w") as f:
        json.dump(document, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    sys.exit(main())
