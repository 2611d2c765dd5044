"""Optimizer state bytes per parameter: fp32, bf16 and 8-bit moments, counted from what is allocated.

Run from the repository root (about a minute and 8 GB of memory on CPU)::

    python -m bench.memory               # writes bench/results/state-memory.json
    python -m bench.memory --quick       # Llama-shaped at dim 256, seconds (what the tests run)

The model is Llama-2-7B-shaped (bf16 params): its embedding, one decoder
layer and its head, every tensor at its real shape, so that block sizes and
the size threshold fall as they fall on the real model; the whole 7B model
has 32 such layers. Each optimizer takes one step (state is made on the
first), then the bytes of every distinct storage its state holds are summed,
per kind of tensor: matrices and 1-D tensors (norms). The 7B figures
multiply the measured bytes of one layer by 32, with the embedding and head
added once.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

import torch

import selopt
from bench import common

RESULTS = Path(__file__).resolve().parent / "results" / "state-memory.json"
# (name, moment_dtype): selopt.MoFO's option, the same for AdamW.
MOMENTS = [("fp32 moments", torch.float32), ("bf16 moments", torch.bfloat16), ("8-bit moments", "8bit")]
LAYERS_7B = 32
QUICK_DIMS = common.LlamaDims(hidden=256, intermediate=768, heads=4, vocab=1024)


def state_bytes(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> list[int]:
    """Bytes allocated for each param's optimizer state: every distinct storage its entry holds, once.

    >>> p = torch.nn.Parameter(torch.zeros(64, 64))
    >>> opt = selopt.AdamW([p], moment_dtype="8bit"); p.grad = torch.ones_like(p); opt.step()
    >>> state_bytes(opt, [p])  # codes 2 x 4096 B, scales 2 x 64 x 4 B, the fp32 step count
    [8708]
    """
    counted = []
    for p in params:
        storages = {}
        for value in optimizer.state[p].values():
            if isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        counted.append(sum(storages.values()))
    return counted


def measure(dims: common.LlamaDims) -> dict:
    """One step of MoFO per moment dtype on the Llama-shaped tensors; bytes by kind, per param."""
    shapes = common.llama_shapes(1, dims)
    params = [torch.nn.Parameter(torch.zeros(shape, dtype=torch.bfloat16)) for _, shape in shapes]
    for p in params:
        p.grad = torch.full_like(p, 1e-3)
    kinds = {"matrices": [p.dim() >= 2 for p in params], "1-D": [p.dim() < 2 for p in params]}
    layer = [".layers." in name for name, _ in shapes]
    records = []
    for label, moment_dtype in MOMENTS:
        start = time.perf_counter()
        opt = selopt.MoFO(params, lr=1e-5, fraction=0.15, moment_dtype=moment_dtype)
        opt.step()
        counted = state_bytes(opt, params)
        record = {"moments": label, "moment_dtype": str(moment_dtype), "seconds": round(time.perf_counter() - start, 2)}
        for kind, members in kinds.items():
            numel = sum(p.numel() for p, member in zip(params, members) if member)
            total = sum(b for b, member in zip(counted, members) if member)
            record[kind] = {"params": numel, "state_bytes": total, "bytes_per_param": total / numel}
        per_layer = sum(b for b, inside in zip(counted, layer) if inside)
        outside = sum(b for b, inside in zip(counted, layer) if not inside)
        params_7b = LAYERS_7B * sum(p.numel() for p, inside in zip(params, layer) if inside) + sum(
            p.numel() for p, inside in zip(params, layer) if not inside)
        record["model_of_32_layers"] = {"params": params_7b, "state_bytes": LAYERS_7B * per_layer + outside,
                                        "bytes_per_param": (LAYERS_7B * per_layer + outside) / params_7b}
        records.append(record)
        del opt
    return {"shapes": {name: list(shape) for name, shape in shapes}, "records": records}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"dims {QUICK_DIMS}: seconds")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    dims = QUICK_DIMS if args.quick else common.LLAMA2_7B
    report = {
        "command": " ".join(shlex.quote(a) for a in ["python", "-m", "bench.memory", *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "dims": dataclasses.asdict(dims),
        **measure(dims),
    }
    print(f"{'moments':<14} {'matrices B/param':>17} {'1-D B/param':>12} {'32-layer model GB':>18} {'B/param':>8}")
    for record in report["records"]:
        whole = record["model_of_32_layers"]
        print(f"{record['moments']:<14} {record['matrices']['bytes_per_param']:>17.3f} "
              f"{record['1-D']['bytes_per_param']:>12.3f} {whole['state_bytes'] / 1e9:>18.2f} {whole['bytes_per_param']:>8.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
