"""Kernel speed without a GPU: what the compiled SASS says, and the H100 time it predicts.

``python -m bench.static`` compiles selopt's kernels for sm_90 and sm_80
through the library's own launch path (:mod:`selopt.kernels.compile_check`'s
compile-only driver), disassembles the cubins with the ``cuobjdump`` that
ships in the Triton wheel, and reports per kernel configuration:

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

The assumptions of the prediction are in :data:`H100` and written into the
JSON. ``--check`` exits non-zero on a spill or a compile error (CI runs it on
``--quick``); results go to ``bench/results/static-sm<arch>.json``.
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

from selopt.kernels import block, launch, select_state
from selopt.kernels.compile_check import Compiled, Configuration, compile_only, run_configuration
from selopt.kernels.launch import KernelCompileError

# What the prediction assumes: an H100 SXM5 80GB. Copy bandwidth is that of an H100
# device-to-device copy (read + write bytes; bench/NOTES.md §2, §4); the issue rate is one
# warp-instruction per clock per SM sub-partition at the clock an H100 holds under a
# memory-bound load.
H100 = dict(sms=132, issue_per_clock_per_sm=4, clock_hz=1.755e9, copy_bytes_per_s=3.0e12, elements=2**28)
# Occupancy limits per SM (sm_80 and sm_90 share the register file and thread limits).
SM_REGISTERS, REGISTER_ALLOCATION, SM_THREADS, SM_CTAS = 65536, 256, 2048, 32
SM_SHARED = {80: 164 * 1024, 90: 228 * 1024}
CTA_RESERVED_SHARED = 1024

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
}
QUICK = ("dense fp32", "block 1024 fp32", f"block {block.MAX_BLOCK} fp32", "block 4096 bf16/fp32, every option",
         "exact fp32")

_INSTRUCTION = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_GLOBAL_ACCESS = re.compile(r"^(LDG|STG|RED|ATOMG)\b")


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


def streamed_bytes(compiled: Compiled, config: Configuration) -> float:
    """Bytes per element the kernel moves when all its programs work: the tensors it reads and writes, once each.

    The exact path's moments kernel also writes its candidate list, at most
    one int32 key per ``CANDIDATE_SHARE`` entries; its list kernels read it.
    """
    param = config.param_dtype.itemsize
    moment = config.moment_dtype.itemsize
    amsgrad = "amsgrad" in config.options
    selection = 1 if "selections" in config.options else 0
    moments = (2 + amsgrad) * moment * 2  # m, v (and vmax), each read and written
    if compiled.name == "_block_adamw_kernel":
        return 3 * param + moments + selection  # p read + written, g read
    if compiled.name == "_moments_histogram_kernel":
        return param + moments + 4 / select_state.CANDIDATE_SHARE.value
    if compiled.name == "_refine_from_m_kernel":
        return moment
    if compiled.name == "_refine_from_list_kernel":
        return 4
    if compiled.name == "_exact_update_kernel":
        return 2 * param + 2 * moment + selection  # p read + written, m and the denominator's moment read
    return 0.0  # per-segment kernels


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


def per_element(report: KernelReport, compiled: Compiled, config: Configuration, window_missed: bool) -> KernelReport:
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


def report_path(name: str, config: Configuration, arch: int) -> dict:
    with compile_only(arch) as compiled:
        run_configuration(config)
    kernels = [analyse(c, config, arch) for c in compiled]
    streaming = [k for k in kernels if k.elements_per_program]
    result = dict(
        path=name, kernels=[asdict(k) for k in kernels],
        spills=any(k.local_bytes or k.spill_instructions for k in kernels),
        **_totals(streaming, arch),
        min_ctas_per_sm=min(k.ctas_per_sm for k in streaming),
        access_bits=sorted({bits for k in streaming for bits in k.global_access_bits}),
        window_missed=None,
    )
    if any(c.name == "_refine_from_m_kernel" for c in compiled):
        # The exact path's figures above are for a step whose window held the threshold (the list
        # at its fullest); these for one whose refinement reread m.
        missed = [per_element(k, c, config, window_missed=True) for k, c in zip(kernels, compiled)]
        result["window_missed"] = _totals([k for k in missed if k.elements_per_program], arch)
    return result


def _totals(streaming: list[KernelReport], arch: int) -> dict:
    return dict(
        warp_instructions_per_element=round(sum(k.warp_instructions_per_element for k in streaming), 3),
        bytes_per_element=round(sum(k.bytes_per_element for k in streaming), 3),
        # The prediction's numbers are an H100's: for other targets the table has none.
        h100_prediction=predict_h100(streaming) if arch == 90 else None,
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


def _bytes_cell(result: dict) -> str:
    missed = result["window_missed"]
    if not missed:
        return f"{result['bytes_per_element']:g}"
    predicted = f", predicted {missed['h100_prediction']['predicted_ms']:.2f} ms" if missed["h100_prediction"] else ""
    return f"{result['bytes_per_element']:g} ({missed['bytes_per_element']:g}{predicted} if the window misses)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.static", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    parser.add_argument("--check", action="store_true", help="exit non-zero on a spill")
    parser.add_argument("--no-host-time", action="store_true", help="skip the host-time measurement")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"),
                        help="folder of static-sm<arch>.json ('' writes nothing)")
    args = parser.parse_args(argv)
    if launch.INTERPRETED:
        parser.error("the kernels were loaded by Triton's interpreter: run with TRITON_INTERPRET unset")
    triton.knobs.cache.dir = tempfile.mkdtemp(prefix="selopt-static-")
    names = QUICK if args.quick else tuple(PATHS)
    host = None if args.quick or args.no_host_time else host_time_ms()
    if host:
        print(f"host CPU time of a {host['tensors']}-tensor MoFO step: {host['min_ms']} ms min, "
              f"{host['median_ms']} ms median")
    failed = False
    for arch in args.arch:
        results = []
        for name in names:
            try:
                results.append(report_path(name, PATHS[name], arch))
            except KernelCompileError as error:
                print(f"FAIL sm_{arch} [{name}] {error}")
                failed = True
        spilling = [r["path"] for r in results if r["spills"]]
        if spilling:
            print(f"FAIL sm_{arch}: spills in {', '.join(spilling)}")
            failed = True
        print(f"\nsm_{arch}, Triton {triton.__version__}\n\n{markdown(results)}\n", flush=True)
        if args.out and not args.quick:
            document = dict(arch=f"sm_{arch}", triton=triton.__version__, torch=torch.__version__,
                            command="python -m bench.static", prediction_assumptions=H100, host_time=host,
                            note="static analysis of the compiled code and a roofline prediction, not a measurement",
                            paths=results)
            with open(os.path.join(args.out, f"static-sm{arch}.json"), "w") as f:
                json.dump(document, f, indent=1)
                f.write("\n")
    return 1 if failed and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
