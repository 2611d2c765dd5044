"""How often the exact path's candidate window holds the threshold, in a real fine-tuning run.

The exact path (:mod:`selopt.kernels.exact`) moves 36 B per fp32 entry when
the k-th largest ``|m|`` of a tensor falls inside the window around the last
step's threshold and its candidate list held every key of the window, and
44 B when it does not. How often that happens depends on how fast the
threshold moves, so this measures it where it matters: the forgetting study's
model (:mod:`bench.forgetting`: a small Llama pre-trained on task A) fine-tuned
on task B with ``selopt.MoFO`` per tensor, on the Triton kernels. Each step
reads the kernels' select state for every matrix: whether the refinement read
the list, the window's width, and the share of the entries the list held.

It runs the kernels themselves, so without a GPU it needs Triton's
interpreter (slow; bench/NOTES.md §4 gives the time per step)::

    TRITON_INTERPRET=1 python -m bench.window            # writes bench/results/window.json
    python -m bench.window --device cuda --steps 600

Reported per step over all matrices (weighted by entries): the share of
entries whose threshold came from the list, the list's fill (the bytes it
adds: 4 written + 2 x 4 read per listed key), and the predicted bytes per
entry: 36 + 12 x fill + 8 x (share refined from m).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path
from unittest import mock

import torch

import selopt
from bench.forgetting import FactStream, Tasks, next_token_loss
from bench.tiny_llama import TinyLlama, TinyLlamaConfig
from selopt import functional, selection
from selopt.kernels import exact, select_state

RESULTS = Path(__file__).parent / "results" / "window.json"
BASE_BYTES, REREAD_BYTES, LIST_BYTES = 36, 8, 12


def pretrained_model(args, tasks: Tasks, table: torch.Tensor, device: torch.device) -> TinyLlama:
    torch.manual_seed(args.seed)
    model = TinyLlama(TinyLlamaConfig(vocab_size=tasks.vocab_size, dim=args.dim, n_layers=args.layers,
                                      n_heads=args.heads, ffn_dim=args.ffn_dim, max_seq_len=tasks.max_seq_len))
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.pretrain_lr, weight_decay=0.0)
    facts = FactStream(tasks.n_facts, args.batch * tasks.facts_per_sequence,
                       torch.Generator().manual_seed(args.seed + 1))
    for _ in range(args.pretrain_steps):
        tokens, targets = tasks.task_a_batch(table, facts.next())
        next_token_loss(model, tokens.to(device), targets.to(device)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model


def window_of(state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's window [low, low + width) as the kernels compute it (exact._window)."""
    bits = state[:, select_state.STATE_WINDOW_BITS.value]
    width = torch.where(bits > 0, 1 << bits, 0)
    low = (state[:, select_state.STATE_THRESHOLD.value] - width // 2).clamp(0, 2**31 - 1 - (1 << exact.FIRST_SHIFT))
    return low, width


def measure(args) -> dict:
    device = torch.device(args.device)
    tasks = Tasks(args.entities, args.relations, args.values, args.facts_per_sequence, "add", 6, args.modulus)
    table = tasks.fact_table(torch.Generator().manual_seed(args.seed))
    model = pretrained_model(args, tasks, table, device)
    groups = selopt.param_groups(model, weight_decay=0.0, fraction=args.fraction)
    # The kernels on this device even where "auto" would choose the reference (CPU, interpreter).
    with mock.patch.object(functional, "AUTO_KERNEL_DEVICES", (device.type,)):
        opt = selopt.MoFO(groups, lr=args.lr)
        generator = torch.Generator().manual_seed(args.seed + 5)
        steps = []
        for step in range(1, args.steps + 1):
            tokens, targets = tasks.task_b_batch(args.batch, generator)
            loss = next_token_loss(model, tokens.to(device), targets.to(device))
            loss.backward()
            states = opt.caches[functional.TRITON.name].selection_states() if step > 1 else []
            windows = {addresses: window_of(state.clone()) for addresses, state in states}
            opt.step()
            opt.zero_grad(set_to_none=True)
            steps.append(dict(step=step, loss=round(loss.item(), 4), **step_report(opt, windows)))
            if step % args.log_every == 0:
                print(f"step {step}: loss {loss.item():.3f}, from list {steps[-1]['from_list']:.3f}, "
                      f"list fill {steps[-1]['list_fill']:.4f}, {steps[-1]['bytes_per_entry']:.2f} B/entry", flush=True)
    settled = steps[args.settle:]
    mean = {key: sum(s[key] for s in settled) / len(settled) for key in ("from_list", "list_fill", "bytes_per_entry")}
    return dict(
        command="TRITON_INTERPRET=1 python -m bench.window" if device.type == "cpu" else "python -m bench.window",
        device=str(device), machine=platform.processor() or platform.machine(), torch=torch.__version__,
        matrices=sum(p.dim() >= 2 for p in model.parameters()),
        mean_after_settle=mean, steps=steps,
    )


def step_report(opt, windows: dict) -> dict:
    """Shares over the matrices' entries: refined from the list, held in the list; predicted bytes."""
    by_address = {p.data_ptr(): p for group in opt.param_groups for p in group["params"]}
    from_list = listed = total = 0
    for addresses, state in opt.caches[functional.TRITON.name].selection_states():
        for row, address in enumerate(addresses):  # one row per tensor (block_size=None)
            m = opt.state[by_address[address]]["exp_avg"]
            total += m.numel()
            from_list += m.numel() * int(state[row, select_state.STATE_FROM_LIST.value])
            if addresses in windows:
                low, width = (int(x[row]) for x in windows[addresses])
                keys = selection.magnitude_keys(m)
                inside = int(((keys >= low) & (keys - low < width)).sum())
                listed += min(inside, select_state.candidate_capacity(m.numel()))
    share, fill = from_list / max(total, 1), listed / max(total, 1)
    return dict(from_list=round(share, 4), list_fill=round(fill, 5),
                bytes_per_entry=round(BASE_BYTES + LIST_BYTES * fill + REREAD_BYTES * (1 - share), 3))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.window", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--settle", type=int, default=20, help="steps left out of the mean (the window's warm-up)")
    parser.add_argument("--lr", type=float, default=1e-3, help="MoFO's middle lr in the forgetting study")
    parser.add_argument("--fraction", type=float, default=0.15)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--pretrain-steps", type=int, default=200)
    parser.add_argument("--pretrain-lr", type=float, default=3e-3)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--ffn-dim", type=int, default=352)
    parser.add_argument("--entities", type=int, default=128)
    parser.add_argument("--relations", type=int, default=4)
    parser.add_argument("--values", type=int, default=48)
    parser.add_argument("--facts-per-sequence", type=int, default=8)
    parser.add_argument("--modulus", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--out", default=str(RESULTS), help="the JSON to write ('' writes nothing)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("the kernels need a GPU, or TRITON_INTERPRET=1 on CPU")
    report = measure(args)
    print(json.dumps(report["mean_after_settle"]))
    if args.out:
        config = {k: str(v) for k, v in vars(args).items()}
        Path(args.out).write_text(json.dumps({**report, "config": config}, indent=1))
    return report


if __name__ == "__main__":
    main()
