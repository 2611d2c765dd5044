"""Optimizer step speed: selopt against torch's AdamW and the official MoFO loop.

Run from the repository root::

    python -m bench.speed                   # full run for this machine
    python -m bench.speed --quick           # seconds: tiny sizes (what CI runs)
    python -m bench.speed --sizes 20 22 24 --llama-layers 1 --dtypes fp32 bf16

With a CUDA device it times the CUDA variants (selopt's Triton kernels via
``backend="auto"``) and prints the performance targets (``TARGETS`` below, and
the README's "Performance" section) with PASS/MISS.
Without one it times the CPU comparisons (selopt's torch backend against
``torch.optim.AdamW`` fused, foreach and for-loop, and the official MoFO loop);
the GPU figures need a GPU.

Every number is a median over single steps, with several copies of the
params/grads/state cycled so that no step runs from cache. Results are
printed and written to ``bench/results/<device>.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import statistics
import sys
from pathlib import Path

import torch

from bench import common
from bench.common import Case, Variant

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# The performance targets: step time against torch.optim.AdamW(fused=True) in the same run, and
# exact MoFO's speed-up over the official loop (README, "Performance"). Each is checked on every
# (case, dtype) measured; the worst case decides.
TARGETS = (
    ("dense AdamW <= 1.0x torch fused", "selopt_adamw", "ratio", 1.0),
    ("one-pass MoFO <= 1.1x torch fused", "selopt_mofo_block", "ratio", 1.1),
    ("exact MoFO <= 1.5x torch fused", "selopt_mofo_exact", "ratio", 1.5),
    ("exact MoFO >= 10x faster than official_mofo", "selopt_mofo_exact", "speedup_vs_official", 10.0),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto: cuda when available, else cpu")
    parser.add_argument("--sizes", type=int, nargs="*", metavar="LOG2",
                        help="single-tensor sizes as powers of two (default: 20 22 24 26 28 on GPU, 20 22 24 on CPU)")
    parser.add_argument("--llama-layers", default=None, metavar="N|auto",
                        help="decoder layers of the Llama-2-7B tensor list; auto fits memory (GPU default), "
                             "0 skips it (CPU default: 1)")
    parser.add_argument("--no-llama-embeddings", action="store_true",
                        help="leave embed_tokens, final norm and lm_head (2 x 131M entries) out of the Llama list")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(common.DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--variants", nargs="+", metavar="NAME",
                        help="only these variant names (torch_adamw_fused is always kept as the baseline)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed steps per measurement (default: 50 on GPU, 5 on CPU)")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="stop a measurement after this long once --min-repeats steps are timed "
                             "(default: 5 GPU, 60 CPU)")
    parser.add_argument("--min-repeats", type=int, default=3,
                        help="timed steps a measurement always gets (default 3)")
    parser.add_argument("--max-copies", type=int, default=16, help="most input copies cycled per size")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's, 1 with --quick: tiny steps gain nothing from more "
                             "and stall when the cores are shared)")
    parser.add_argument("--system-malloc", action="store_true",
                        help="CPU: leave glibc's malloc as configured (by default freed blocks stay mapped, see "
                             "common.keep_freed_memory_mapped)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, 3 steps: checks the command end to end in seconds (CI)")
    parser.add_argument("--markdown", type=Path, metavar="JSON",
                        help="print the Markdown tables of a results file and exit (measures nothing)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default: bench/results/<device>.json)")
    args = parser.parse_args(argv)
    for name in ("repeats", "min_repeats", "max_copies", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.sizes is not None and any(not 0 <= s <= 34 for s in args.sizes):
        parser.error(f"--sizes are powers of two in [0, 34], got {args.sizes}")
    if args.llama_layers not in (None, "auto") and not (args.llama_layers.isdigit()):
        parser.error(f"--llama-layers must be a non-negative integer or 'auto', got {args.llama_layers!r}")
    return args


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice, 0) if choice == "cuda" else torch.device("cpu")


def llama_layers_that_fit(dtype: torch.dtype, budget_bytes: int, embeddings: bool) -> int:
    """Layers of Llama-2-7B whose params, grads and fp32 moments fit ``budget_bytes``, 1 to 32."""
    # + 4 B: torch's foreach AdamW holds sqrt(v) of the whole list at once.
    per_element = common.resident_bytes_per_element(dtype) + 4
    fixed = common.llama_shapes(0, embeddings=embeddings)
    fixed_numel = sum(math.prod(shape) for _, shape in fixed)
    # Room for the temporaries of the largest tensor (|m|, masks, denominators of the loops).
    dims = common.LLAMA2_7B
    largest = dims.hidden * (max(dims.vocab, dims.intermediate) if embeddings else dims.intermediate)
    room = budget_bytes - fixed_numel * per_element - 6 * 4 * largest
    return max(1, min(32, room // (common.llama_layer_numel() * per_element)))


def build_cases(args: argparse.Namespace, device: torch.device, budget_bytes: int) -> list[Case]:
    cuda = device.type == "cuda"
    if args.quick:
        sizes = [12] if args.sizes is None else args.sizes
    else:
        sizes = args.sizes if args.sizes is not None else ([20, 22, 24, 26, 28] if cuda else [20, 22, 24])
    embeddings = not args.no_llama_embeddings
    cases = []
    for dtype_name in args.dtypes:
        cases += [Case("single", dtype_name, common.single_tensor_shapes(1 << s)) for s in sizes]
        if args.quick:
            layers = 2 if args.llama_layers in (None, "auto") else int(args.llama_layers)
            if layers:
                shapes = common.llama_shapes(layers, common.LLAMA_MINI, embeddings)
                cases.append(Case(f"llama-mini-{layers}L", dtype_name, shapes))
            continue
        layers_arg = args.llama_layers or ("auto" if cuda else "1")
        if layers_arg == "auto":
            layers = llama_layers_that_fit(common.DTYPES[dtype_name], budget_bytes, embeddings)
        else:
            layers = int(layers_arg)
        if layers:
            name = f"llama2-7b-{layers}L" + ("" if embeddings else "-noembed")
            cases.append(Case(name, dtype_name, common.llama_shapes(layers, embeddings=embeddings)))
    return cases


def measure_case(
    case: Case, variants: list[Variant], device: torch.device, args: argparse.Namespace, budget_bytes: int,
    skipped: list[dict],
) -> list[dict]:
    copies = common.rotation_copies(case, device, budget_bytes, 2 if args.quick else args.max_copies)
    inputs = common.make_inputs(case, device, copies)
    records = []
    for variant in variants:
        if variant.name == "selopt_hft" and not case.is_model:
            skipped.append(dict(variant=variant.label, case=case.name, dtype=case.dtype_name, numel=case.numel,
                                reason="HFT freezes whole tensors: it needs a model's tensor list"))
            continue
        if variant.name == "torch_adamw_fused":
            available, why = common.torch_fused_available(device, case.dtype)
            if not available:
                skipped.append(dict(variant=variant.label, case=case.name, dtype=case.dtype_name, numel=case.numel,
                                    reason=f"torch fused AdamW unavailable: {why}"))
                continue
        try:
            prepared = common.prepare(variant, case, inputs)
            timing = common.time_steps(
                prepared.steps, device, args.repeats, args.max_seconds, min(args.min_repeats, args.repeats)
            )
        except Exception as error:  # one broken variant (e.g. kernels not built) must not lose the others
            skipped.append(dict(variant=variant.label, case=case.name, dtype=case.dtype_name, numel=case.numel,
                                reason=f"{type(error).__name__}: {error}"))
            print(f"  {variant.label:<26} FAILED: {type(error).__name__}: {error}", flush=True)
            common.release_memory(device)
            continue
        seconds = timing.median_ms * 1e-3
        record = dict(
            variant=variant.name,
            block_size=variant.block_size,
            fraction=common.FRACTION if "mofo" in variant.name else 1.0,
            backend=common.selopt_backend(device) if variant.is_selopt else "torch",
            case=case.name,
            dtype=case.dtype_name,
            numel=case.numel,
            n_tensors=case.n_tensors,
            numel_stepped=prepared.numel_stepped,
            tensors_stepped=prepared.tensors_stepped,
            bytes_per_step=prepared.bytes_per_step,
            copies=copies,
            n_steps=len(timing.times_ms),
            time_ms=timing.median_ms,
            time_ms_min=min(timing.times_ms),
            gbps=prepared.bytes_per_step / seconds / 1e9,
            cpu_ms_per_step=timing.host_median_ms,
        )
        records.append(record)
        print(f"  {variant.label:<26} {record['time_ms']:10.3f} ms  {record['gbps']:8.2f} GB/s  "
              f"host {record['cpu_ms_per_step']:9.3f} ms  ({record['n_steps']} steps, {copies} copies)", flush=True)
        del prepared
        common.release_memory(device)
    del inputs
    common.release_memory(device)
    return records


def add_relative_numbers(records: list[dict], copy_gbps: float) -> None:
    fused = {(r["case"], r["dtype"], r["numel"]): r["time_ms"] for r in records if r["variant"] == "torch_adamw_fused"}
    for r in records:
        r["pct_copy_bw"] = 100.0 * r["gbps"] / copy_gbps
        base = fused.get((r["case"], r["dtype"], r["numel"]))
        r["ratio_vs_torch_fused"] = None if base is None else r["time_ms"] / base


def evaluate_targets(records: list[dict]) -> list[dict]:
    """Each target per dtype: the worst measured value over the cases, and PASS only if every case meets it."""
    official = {(r["case"], r["dtype"], r["numel"]): r["time_ms"] for r in records if r["variant"] == "official_mofo"}
    rows = []
    for dtype in sorted({r["dtype"] for r in records}):
        for label, variant, kind, limit in TARGETS:
            values = []
            for r in records:
                if r["variant"] != variant or r["dtype"] != dtype:
                    continue
                if kind == "ratio" and r["ratio_vs_torch_fused"] is not None:
                    values.append((r["ratio_vs_torch_fused"], r))
                elif kind == "speedup_vs_official" and (r["case"], r["dtype"], r["numel"]) in official:
                    values.append((official[(r["case"], r["dtype"], r["numel"])] / r["time_ms"], r))
            if not values:
                rows.append(dict(target=label, dtype=dtype, limit=limit, status="NOT MEASURED"))
                continue
            meets = [(v <= limit) if kind == "ratio" else (v >= limit) for v, _ in values]
            worst, where = (max if kind == "ratio" else min)(values, key=lambda item: item[0])
            rows.append(dict(
                target=label, dtype=dtype, limit=limit, worst=worst,
                worst_at=f"{where['case']} n={where['numel']}" + (f" block={where['block_size']}" if where["block_size"] else ""),
                geomean=math.exp(statistics.fmean(math.log(v) for v, _ in values)),
                passed=sum(meets), measured=len(meets), status="PASS" if all(meets) else "MISS",
            ))
    return rows


def format_numel(numel: int) -> str:
    if numel & (numel - 1) == 0:
        return f"2^{numel.bit_length() - 1}"
    return f"{numel / 1e6:.1f}M" if numel >= 1e5 else str(numel)


def format_table(records: list[dict]) -> str:
    header = ("case", "dtype", "numel", "tensors", "variant", "backend", "ms/step", "GB/s", "% copy", "x fused", "host CPU ms")
    rows = [header]
    for r in records:
        label = r["variant"] + (f"[{r['block_size']}]" if r["block_size"] else "")
        ratio = "-" if r["ratio_vs_torch_fused"] is None else f"{r['ratio_vs_torch_fused']:.2f}"
        rows.append((r["case"], r["dtype"], format_numel(r['numel']), str(r["n_tensors"]),
                     label, r["backend"], f"{r['time_ms']:.3f}", f"{r['gbps']:.1f}", f"{r['pct_copy_bw']:.1f}",
                     ratio, f"{r['cpu_ms_per_step']:.3f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_targets(rows: list[dict]) -> str:
    lines = [f"{'target':<46} {'dtype':<5} {'worst':>8} {'geomean':>8}  {'cases':>6}  status  worst at"]
    for row in rows:
        if row["status"] == "NOT MEASURED":
            lines.append(f"{row['target']:<46} {row['dtype']:<5} {'-':>8} {'-':>8}  {'-':>6}  NOT MEASURED")
            continue
        lines.append(f"{row['target']:<46} {row['dtype']:<5} {row['worst']:8.2f} {row['geomean']:8.2f}  "
                     f"{row['passed']:>2}/{row['measured']:<3}  {row['status']:<6}  {row['worst_at']}")
    return "\n".join(lines)


def markdown_tables(result: dict) -> str:
    """The results as Markdown: a summary of ratios to torch fused AdamW, then every record."""
    records = result["records"]
    columns = []
    for r in records:
        key = (r["case"], r["numel"], r["dtype"])
        if key not in columns:
            columns.append(key)
    variants = []
    for r in records:
        label = r["variant"] + (f"[{r['block_size']}]" if r["block_size"] else "")
        if label not in variants:
            variants.append(label)
    by_key = {(r["variant"] + (f"[{r['block_size']}]" if r["block_size"] else ""), r["case"], r["numel"], r["dtype"]): r
              for r in records}
    heads = [f"{case} {format_numel(numel)} {dtype}" for case, numel, dtype in columns]
    lines = ["Step time relative to `torch.optim.AdamW(fused=True)` (lower is better; ms per step in brackets):", "",
             "| variant | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads)]
    for label in variants:
        cells = []
        for case, numel, dtype in columns:
            r = by_key.get((label, case, numel, dtype))
            if r is None:
                cells.append("-")
            elif r["ratio_vs_torch_fused"] is None:
                cells.append(f"({r['time_ms']:.3g})")
            else:
                cells.append(f"{r['ratio_vs_torch_fused']:.2f}x ({r['time_ms']:.3g})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "All records:", "",
              "| case | dtype | numel | tensors | variant | backend | ms/step | GB/s | % copy BW | x fused | host CPU ms |",
              "|---|---|---:|---:|---|---|---:|---:|---:|---:|---:|"]
    for r in records:
        label = r["variant"] + (f"[{r['block_size']}]" if r["block_size"] else "")
        ratio = "-" if r["ratio_vs_torch_fused"] is None else f"{r['ratio_vs_torch_fused']:.2f}"
        lines.append(f"| {r['case']} | {r['dtype']} | {format_numel(r['numel'])} | {r['n_tensors']} | {label} | "
                     f"{r['backend']} | {r['time_ms']:.3f} | {r['gbps']:.2f} | {r['pct_copy_bw']:.1f} | {ratio} | "
                     f"{r['cpu_ms_per_step']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.markdown:
        result = json.loads(args.markdown.read_text())
        print(markdown_tables(result))
        return result
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    if args.repeats is None:
        args.repeats = 3 if args.quick else (50 if cuda else 5)
    if args.max_seconds is None:
        args.max_seconds = 5.0 if cuda else 60.0
    threads = args.threads or (1 if args.quick else None)
    if threads:
        torch.set_num_threads(threads)
    allocator = "n/a (CUDA caching allocator)" if cuda else "glibc defaults"
    if not cuda and not args.system_malloc:
        if common.keep_freed_memory_mapped():
            allocator = "glibc with M_MMAP_MAX=0, M_TRIM_THRESHOLD=2 GiB (freed blocks stay mapped)"
        else:
            allocator = "system allocator (not glibc: left as is)"
    load_start = common.load_average()
    budget = common.memory_budget_bytes(device)
    variants = common.variants_for(device)
    if args.variants:
        unknown = set(args.variants) - {v.name for v in variants}
        if unknown:
            raise SystemExit(f"--variants: unknown {sorted(unknown)}; choose from {sorted({v.name for v in variants})}")
        variants = [v for v in variants if v.name in args.variants or v.name == "torch_adamw_fused"]

    print(f"device   {common.device_full_name(device)}")
    print(f"allocator {allocator}")
    print(f"versions torch {torch.__version__}, triton {common.triton_version()}, selopt backend "
          f"{common.selopt_backend(device)!r}")
    if not cuda:
        print("No CUDA device: these are the CPU comparisons (selopt's torch backend, the readable reference, against "
              "torch.optim.AdamW and the official MoFO loop). The GPU figures and the performance targets need a GPU: "
              "run the same command on a CUDA machine.")
    fused_note = {}
    for dtype_name in args.dtypes:
        available, why = common.torch_fused_available(device, common.DTYPES[dtype_name])
        fused_note[dtype_name] = "available" if available else f"unavailable ({why})"
        print(f"torch AdamW(fused=True) on {device.type} {dtype_name}: {fused_note[dtype_name]}"
              + ("" if available else "; ratio_vs_torch_fused is null"))

    copy_bytes = (16 << 20) if args.quick else ((1 << 30) if cuda else (256 << 20))
    copy_start = common.copy_bandwidth_gbps(device, copy_bytes)
    print(f"copy bandwidth {copy_start:.1f} GB/s (a {copy_bytes >> 20} MiB copy, read + write bytes)\n", flush=True)

    records, skipped = [], []
    for case in build_cases(args, device, budget):
        print(f"{case.name} {case.dtype_name}: {case.numel:,} elements in {case.n_tensors} tensors", flush=True)
        records += measure_case(case, variants, device, args, budget, skipped)
    # Measured again at the end: the better of the two is the machine's bandwidth, the
    # other one was disturbed (by other jobs on a shared host, or clocks still rising).
    copy_end = common.copy_bandwidth_gbps(device, copy_bytes)
    copy_gbps = max(copy_start, copy_end)
    print(f"\ncopy bandwidth at the end {copy_end:.1f} GB/s; using {copy_gbps:.1f} GB/s")
    add_relative_numbers(records, copy_gbps)

    print("\n" + format_table(records))
    targets = evaluate_targets(records) if cuda else []
    if cuda:
        print("\nPerformance targets (ratio = time / torch fused AdamW time, same run; worst case decides):")
        print(format_targets(targets))
        if "bf16" in args.dtypes:
            print("bf16: torch's AdamW keeps bf16 moments (14 B/elem) where selopt keeps fp32 ones (22 B/elem), "
                  "so at equal bandwidth the bf16 ratio is 22/14 = 1.57x; the targets are applied as written.")
    else:
        print("\nPerformance targets are for the CUDA kernels and are not evaluated on CPU.")
    for entry in skipped:
        print(f"skipped {entry['variant']} on {entry['case']} {entry['dtype']}: {entry['reason']}")

    result = dict(
        device=common.device_slug(device),
        device_name=common.device_full_name(device),
        device_type=device.type,
        torch=torch.__version__,
        triton=common.triton_version(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=shlex.join(["python", "-m", "bench.speed", *(sys.argv[1:] if argv is None else argv)]),
        copy_bandwidth_gbps=copy_gbps,
        load_average=dict(start=load_start, end=common.load_average()),
        torch_threads=torch.get_num_threads(),
        cpu_allocator=allocator,
        copy_bandwidth_gbps_start_end=[copy_start, copy_end],
        copy_bytes=copy_bytes,
        torch_adamw_fused=fused_note,
        bytes_model=(
            "per element and step: param read+write, grad read, exp_avg read+write, exp_avg_sq read+write; "
            "28 B fp32, 22 B bf16 params/grads with fp32 moments (selopt, official_mofo), 14 B for torch AdamW on "
            "bf16 params (its moments are bf16). MoFO variants are charged AdamW's bytes, so their GB/s is the "
            "useful bandwidth. selopt_hft counts only the trained tensors; selopt_softmask adds 4 B per masked row."
        ),
        timing=(
            "median over single steps after warm-up, cycling input copies; "
            + ("CUDA events around each step"
               if cuda else "wall time of the step() call")
            + "; cpu_ms_per_step is the CPU time of the calling thread in step() (time.thread_time)"
        ),
        records=records,
        targets=targets,
        skipped=skipped,
    )
    out = args.out or RESULTS_DIR / f"{result['device']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
