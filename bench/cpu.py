"""The CPU step side by side: selopt's fused CPU path, its torch reference and torch's three AdamWs.

Run from the repository root (about 4 minutes on 2 cores)::

    python -m bench.cpu                  # writes bench/results/cpu-step.json
    python -m bench.cpu --quick          # seconds, tiny sizes (what CI runs)

Two sizes: 60 fp32 tensors of 256x256 (the tensors of a small model) and one
of 2^24 entries; 1 and 2 torch threads. The variants run in rounds, one step
of each per round, so that every ratio compares steps taken under the same
load; a figure is the median over the rounds. Ratios are to
``torch.optim.AdamW(fused=True)`` in the same run. The targets of issue 24:
dense ``selopt.AdamW`` <= 1.2x, ``selopt.MoFO`` exact and with
``block_size=1024`` <= 3x.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import selopt
from bench import common

RESULTS = Path(__file__).resolve().parent / "results" / "cpu-step.json"
LR, WEIGHT_DECAY, FRACTION = common.LR, common.WEIGHT_DECAY, common.FRACTION
# (name, builder, target ratio to torch fused or None)
VARIANTS: list[tuple[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer], float | None]] = [
    ("torch AdamW fused", lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=WEIGHT_DECAY, fused=True), None),
    ("torch AdamW for-loop", lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=WEIGHT_DECAY, foreach=False), None),
    ("torch AdamW foreach", lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=WEIGHT_DECAY, foreach=True), None),
    ("selopt.AdamW", lambda ps: selopt.AdamW(ps, lr=LR, weight_decay=WEIGHT_DECAY), 1.2),
    ("selopt.AdamW reference", lambda ps: selopt.AdamW(ps, lr=LR, weight_decay=WEIGHT_DECAY, backend="torch"), None),
    ("selopt.MoFO block 1024", lambda ps: selopt.MoFO(ps, lr=LR, weight_decay=WEIGHT_DECAY, fraction=FRACTION,
                                                      block_size=1024), 3.0),
    ("selopt.MoFO block 1024 reference", lambda ps: selopt.MoFO(ps, lr=LR, weight_decay=WEIGHT_DECAY,
                                                                fraction=FRACTION, block_size=1024,
                                                                backend="torch"), None),
    ("selopt.MoFO exact", lambda ps: selopt.MoFO(ps, lr=LR, weight_decay=WEIGHT_DECAY, fraction=FRACTION), 3.0),
    ("selopt.MoFO exact reference", lambda ps: selopt.MoFO(ps, lr=LR, weight_decay=WEIGHT_DECAY, fraction=FRACTION,
                                                           backend="torch"), None),
]


def cases(quick: bool) -> list[tuple[str, list[tuple[int, ...]], int]]:
    """(name, shapes, rounds) of each size."""
    if quick:
        return [("6 x 64x64", [(64, 64)] * 6, 3), ("one tensor of 2^14", [(128, 128)], 3)]
    return [("60 x 256x256", [(256, 256)] * 60, 15), ("one tensor of 2^24", [(4096, 4096)], 7)]


def optimizers(shapes: list[tuple[int, ...]], seed: int = 0) -> list[tuple[str, torch.optim.Optimizer]]:
    """Every variant's optimizer over its own copy of the same params and grads."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(shape, generator=gen) for shape in shapes]
    grads = [torch.randn(shape, generator=gen) for shape in shapes]
    built = []
    for name, build, _ in VARIANTS:
        copies = [p.clone().requires_grad_() for p in params]
        for p, g in zip(copies, grads):
            p.grad = g.clone()
        built.append((name, build(copies)))
    return built


def time_in_rounds(built: list[tuple[str, torch.optim.Optimizer]], rounds: int) -> dict[str, list[float]]:
    """Milliseconds of each variant's steps, taken one step of each per round after two warm-up rounds."""
    times: dict[str, list[float]] = {name: [] for name, _ in built}
    for round_index in range(rounds + 2):
        for name, opt in built:
            start = time.perf_counter()
            opt.step()
            if round_index >= 2:
                times[name].append((time.perf_counter() - start) * 1e3)
    return times


def measure(quick: bool, threads: list[int]) -> list[dict]:
    records = []
    for case, shapes, rounds in cases(quick):
        built = optimizers(shapes)
        for count in threads:
            torch.set_num_threads(count)
            times = time_in_rounds(built, rounds)
            fused = statistics.median(times["torch AdamW fused"])
            for name, _, target in VARIANTS:
                median = statistics.median(times[name])
                records.append(dict(case=case, threads=count, variant=name, ms=median, ratio=median / fused,
                                    target=target, met=None if target is None else median / fused <= target,
                                    rounds=rounds))
                print(f"{case:<20} {count} thread(s)  {name:<34} {median:9.2f} ms  {median / fused:6.2f}x"
                      + ("" if target is None else f"  (target <= {target}x: "
                         f"{'met' if median / fused <= target else 'MISSED'})"), flush=True)
        del built
    return records


def primitives(numel: int = 1 << 16, repeats: int = 200) -> dict[str, float]:
    """Microseconds per call of the ways to select and to restore on one fp32 tensor of ``numel``
    (one thread): why :mod:`selopt.fused` uses numpy's partition and a bit blend."""
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    m, new, old = (torch.randn(numel, generator=gen) for _ in range(3))
    keys = m.abs().view(torch.int32)
    rank = numel - numel * 15 // 100
    unselected = keys < int(keys.kthvalue(rank).values)
    keep = -unselected.to(torch.int32)
    arrays = dict(keys=keys.numpy(), new=new.numpy(), old=old.numpy(), unselected=unselected.numpy(),
                  keep=keep.numpy(), scratch=np.empty(numel, dtype=np.int32))
    candidates = {
        "select: torch.kthvalue": lambda: keys.kthvalue(rank),
        "select: torch.topk": lambda: keys.topk(numel - rank, sorted=False),
        "select: numpy.partition (copy)": lambda: np.partition(arrays["keys"], rank),
        "restore: torch.where": lambda: torch.where(unselected, old, new, out=new),
        "restore: numpy.copyto(where=)": lambda: np.copyto(arrays["new"], arrays["old"], where=arrays["unselected"]),
        "restore: bit blend (xor, and, xor)": lambda: _blend(arrays),
        "reference: torch.optim fused AdamW step of the same tensor": _fused_step(numel),
    }
    timings = {}
    for name, call in candidates.items():
        call()
        start = time.perf_counter()
        for _ in range(repeats):
            call()
        timings[name] = (time.perf_counter() - start) / repeats * 1e6
        print(f"{name:<58} {timings[name]:8.1f} us", flush=True)
    return timings


def _blend(arrays: dict) -> None:
    new_bits, old_bits, scratch = arrays["new"].view(np.int32), arrays["old"].view(np.int32), arrays["scratch"]
    np.bitwise_xor(new_bits, old_bits, out=scratch)
    np.bitwise_and(scratch, arrays["keep"], out=scratch)
    np.bitwise_xor(new_bits, scratch, out=new_bits)


def _fused_step(numel: int) -> Callable[[], None]:
    p = torch.zeros(numel, requires_grad=True)
    p.grad = torch.ones(numel)
    return torch.optim.AdamW([p], fused=True).step


def markdown(records: list[dict]) -> str:
    """The README's table: ms per step and the ratio to torch fused, per size and thread count."""
    columns = list(dict.fromkeys((r["case"], r["threads"]) for r in records))  # in the order measured
    header = "| variant | " + " | ".join(f"{case}, {t} thr." for case, t in columns) + " |"
    lines = [header, "|---" * (len(columns) + 1) + "|"]
    for name, _, target in VARIANTS:
        cells = []
        for case, count in columns:
            r = next(r for r in records if r["variant"] == name and r["case"] == case and r["threads"] == count)
            cells.append(f"{r['ms']:.1f} ms ({r['ratio']:.2f}x)")
        lines.append(f"| {name}" + ("" if target is None else f" (target <= {target}x)") + " | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 3 rounds: seconds")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path, default=None, help=f"JSON to write (default {RESULTS}; none with --quick)")
    args = parser.parse_args(argv)
    timings = primitives(repeats=5 if args.quick else 200)
    records = measure(args.quick, args.threads)
    print(markdown(records))
    out = args.out if args.out is not None else (None if args.quick else RESULTS)
    if out is not None:
        result = dict(device=common.device_full_name(torch.device("cpu")), torch=torch.__version__,
                      date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                      command=shlex.join(["python", "-m", "bench.cpu", *(sys.argv[1:] if argv is None else argv)]),
                      fraction=FRACTION, lr=LR, weight_decay=WEIGHT_DECAY, load_average_at_end=common.load_average(),
                      primitives_us_per_2e16_fp32=timings,
                      records=records, table=markdown(records))
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out}")
    return 0 if all(r["met"] is not False for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
