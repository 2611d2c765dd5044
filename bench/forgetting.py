"""End-to-end forgetting experiment: pre-train on task A, fine-tune on task B, measure what A keeps.

Phase 1 trains a small Llama-style decoder (:mod:`bench.tiny_llama`) from
scratch on task A, its "pre-training": a synthetic language of facts
``entity relation -> value`` to recall. Phase 2 fine-tunes a copy of it on
task B, a new skill (by default addition mod 16 written with the same value
tokens, in the same "x y -> z" shape as a fact; ``--task-b reverse`` reverses
a sequence instead), once per method, with the same learning rate (1e-3, no
weight decay), steps (300) and batches for all:

- ``adamw_torch``: ``torch.optim.AdamW``, full fine-tuning;
- ``selopt_adamw``: ``selopt.AdamW`` (dense, must match the above);
- ``mofo``: ``selopt.MoFO`` per tensor (the paper's partition);
- ``mofo_block``: ``selopt.MoFO`` with fixed-size blocks;
- ``hft``: :func:`selopt.hft.freeze_half`, then AdamW on the trainable half;
- ``cofi_coarse``: :func:`selopt.cofi.freeze_coarse` (``bottom2``, up/down);
- ``cofi_softmask``: the same plus soft masks from :func:`selopt.cofi.importance`
  computed on task A data (CoFiTune's coarse + fine).

Printed: task-B score, task-A score before and after, the fraction of
parameter entries changed, the L2 distance from the pre-trained weights and
the wall time; written: ``bench/results/forgetting.json`` and a plot of task A
against task B, ``bench/results/forgetting.png``.

    python -m bench.forgetting                # default size, ~3.5 min on 2 CPU cores
    python -m bench.forgetting --tiny         # CI smoke run
    python -m bench.forgetting --device cuda --layers 8 --dim 256 --finetune-steps 1000
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import selopt
from bench.tiny_llama import TinyLlama, TinyLlamaConfig
from selopt import cofi, hft

METHODS = ("adamw_torch", "selopt_adamw", "mofo", "mofo_block", "hft", "cofi_coarse", "cofi_softmask")
RESULTS = Path(__file__).resolve().parent / "results"

# Token layout: specials, then entities, relations and values. Task B reuses
# the value tokens, so learning it moves the same embedding and head rows that
# the facts answer with: the new skill competes with the old knowledge.
PAD, BOS, SEP, REVERSE, ADD = 0, 1, 2, 3, 4
N_SPECIAL = 5
TASK_B_KINDS = ("add", "reverse")


@dataclass(frozen=True)
class Tasks:
    n_entities: int
    n_relations: int
    n_values: int
    facts_per_sequence: int
    task_b: str
    reverse_length: int
    modulus: int

    @property
    def entity0(self) -> int:
        return N_SPECIAL

    @property
    def relation0(self) -> int:
        return self.entity0 + self.n_entities

    @property
    def value0(self) -> int:
        return self.relation0 + self.n_relations

    @property
    def vocab_size(self) -> int:
        return self.value0 + self.n_values

    @property
    def n_facts(self) -> int:
        return self.n_entities * self.n_relations

    @property
    def max_seq_len(self) -> int:
        return max(2 + 3 * self.facts_per_sequence, 3 + 2 * self.reverse_length)

    def fact_table(self, generator: torch.Generator) -> torch.Tensor:
        """value token of each (entity, relation): the knowledge of task A."""
        return self.value0 + torch.randint(0, self.n_values, (self.n_entities, self.n_relations), generator=generator)

    def task_a_batch(self, table: torch.Tensor, fact_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequences ``BOS (e r v)*``; targets are -100 except at the value positions."""
        fact_ids = fact_ids.view(-1, self.facts_per_sequence)
        entity, relation = fact_ids // self.n_relations, fact_ids % self.n_relations
        triples = torch.stack([self.entity0 + entity, self.relation0 + relation, table[entity, relation]], dim=-1)
        tokens = torch.cat([torch.full((fact_ids.shape[0], 1), BOS), triples.flatten(1)], dim=1)
        targets = torch.full_like(tokens, -100)
        targets[:, 2::3] = tokens[:, 3::3]  # the token after "e r" is its value
        return tokens, targets

    def task_b_batch(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.add_batch if self.task_b == "add" else self.reverse_batch)(batch, generator)

    def add_batch(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequences ``BOS ADD (a b c)*`` with ``c = a + b mod modulus`` over the first value tokens.

        The same shape as a fact (two tokens, then the answer), so the skill
        competes with the facts for the same circuits.
        """
        a, b = torch.randint(0, self.modulus, (2, batch, self.facts_per_sequence), generator=generator)
        triples = self.value0 + torch.stack([a, b, (a + b) % self.modulus], dim=-1)
        head = torch.tensor([BOS, ADD]).expand(batch, 2)
        tokens = torch.cat([head, triples.flatten(1)], dim=1)
        targets = torch.full_like(tokens, -100)
        targets[:, 3::3] = tokens[:, 4::3]
        return tokens, targets

    def reverse_batch(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequences ``BOS REVERSE x1..xn SEP xn..x1``; targets are the reversed half."""
        x = self.value0 + torch.randint(0, self.n_values, (batch, self.reverse_length), generator=generator)
        head = torch.tensor([BOS, REVERSE]).expand(batch, 2)
        tokens = torch.cat([head, x, torch.full((batch, 1), SEP), x.flip(1)], dim=1)
        targets = torch.full_like(tokens, -100)
        n = self.reverse_length
        targets[:, 2 + n : 2 + 2 * n] = tokens[:, 3 + n :]
        return tokens, targets


class FactStream:
    """Fact ids in epochs: every fact once per epoch, in a new random order each time."""

    def __init__(self, n_facts: int, per_batch: int, generator: torch.Generator):
        self.n_facts, self.per_batch, self.generator = n_facts, per_batch, generator
        self.pending = torch.empty(0, dtype=torch.long)

    def next(self) -> torch.Tensor:
        while self.pending.numel() < self.per_batch:
            self.pending = torch.cat([self.pending, torch.randperm(self.n_facts, generator=self.generator)])
        batch, self.pending = self.pending[: self.per_batch], self.pending[self.per_batch :]
        return batch


def next_token_loss(model, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model(tokens)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


@torch.no_grad()
def accuracy(model, tokens: torch.Tensor, targets: torch.Tensor, batch: int = 512) -> float:
    """Share of target positions whose argmax prediction is right."""
    model.eval()
    right = total = 0
    for start in range(0, tokens.shape[0], batch):
        t, y = tokens[start : start + batch], targets[start : start + batch]
        keep = y != -100
        right += int((model(t).argmax(-1)[keep] == y[keep]).sum())
        total += int(keep.sum())
    model.train()
    return right / total


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def pretrain(args, tasks: Tasks, table: torch.Tensor, device: torch.device) -> TinyLlama:
    torch.manual_seed(args.seed)
    config = TinyLlamaConfig(
        vocab_size=tasks.vocab_size, dim=args.dim, n_layers=args.layers, n_heads=args.heads,
        ffn_dim=args.ffn_dim, max_seq_len=tasks.max_seq_len,
    )
    model = TinyLlama(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.pretrain_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.pretrain_lr, total_steps=args.pretrain_steps, pct_start=0.1)
    facts = FactStream(tasks.n_facts, args.batch * tasks.facts_per_sequence, torch.Generator().manual_seed(args.seed + 1))
    start = time.perf_counter()
    for step in range(1, args.pretrain_steps + 1):
        tokens, targets = tasks.task_a_batch(table, facts.next())
        loss = next_token_loss(model, tokens.to(device), targets.to(device))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        schedule.step()
        if step % args.log_every == 0 or step == args.pretrain_steps:
            log(f"[pretrain] step {step}/{args.pretrain_steps} loss {loss.item():.3f} ({time.perf_counter() - start:.0f}s)")
    return model


def task_a_eval(tasks: Tasks, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every fact, each at a fixed random position of a fixed sequence."""
    order = torch.randperm(tasks.n_facts, generator=torch.Generator().manual_seed(12345))
    return tasks.task_a_batch(table, order)


def build_optimizer(method: str, model, args, device, tasks: Tasks, table: torch.Tensor):
    """Freeze what the method freezes and return its optimizer and a description of the choice."""
    lr, wd = args.lr, 0.0
    if method == "adamw_torch":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd), "torch.optim.AdamW, all parameters"
    if method == "selopt_adamw":
        return selopt.AdamW(model.parameters(), lr=lr, weight_decay=wd), "selopt.AdamW, all parameters"
    if method == "mofo":
        groups = selopt.param_groups(model, weight_decay=wd, fraction=args.mofo_fraction)
        return selopt.MoFO(groups, lr=lr), f"MoFO fraction {args.mofo_fraction} per tensor (1-D tensors dense)"
    if method == "mofo_block":
        groups = selopt.param_groups(model, weight_decay=wd, fraction=args.mofo_fraction, block_size=args.mofo_block)
        return selopt.MoFO(groups, lr=lr), f"MoFO fraction {args.mofo_fraction}, blocks of {args.mofo_block} (1-D tensors dense)"
    if method == "hft":
        report = hft.freeze_half(model, seed=args.seed)
        return selopt.AdamW(selopt.param_groups(model, weight_decay=wd, fraction=1.0), lr=lr), f"HFT seed {args.seed}: {report.fraction_by_count:.1%} of entries train"
    if method in ("cofi_coarse", "cofi_softmask"):
        report = cofi.freeze_coarse(model, layers=args.cofi_layers, modules=tuple(args.cofi_modules))
        opt = selopt.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=wd)
        detail = f"CoFiTune {args.cofi_layers} {'/'.join(args.cofi_modules)}: layers {sorted(report.layers)}, {report.fraction_by_count:.1%} of entries train"
        if method == "cofi_softmask":
            # Importance for general ability comes from pre-training data (task A).
            facts = FactStream(tasks.n_facts, args.batch * tasks.facts_per_sequence, torch.Generator().manual_seed(args.seed + 3))
            batches = [tasks.task_a_batch(table, facts.next())[0].to(device) for _ in range(args.importance_batches)]
            torch.manual_seed(args.seed + 4)
            scores = cofi.importance(model, batches)
            cofi.attach_soft_masks(opt, model, scores, mode="update")
            masks = [1 - scores.ffn[i] for i in report.layers] + [1 - scores.hidden[i] for i in report.layers]
            mean_mask = float(torch.cat(masks).mean())
            detail += f", soft masks ('update' mode) from {args.importance_batches} task-A batches, mean mask {mean_mask:.2f}"
        return opt, detail
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def finetune(method: str, pretrained: TinyLlama, args, device, tasks, table, eval_a, eval_b) -> dict:
    model = copy.deepcopy(pretrained)
    for p in model.parameters():
        p.requires_grad_(True)
    torch.manual_seed(args.seed + 2)
    start = time.perf_counter()
    opt, detail = build_optimizer(method, model, args, device, tasks, table)
    log(f"[{method}] {detail}")
    generator = torch.Generator().manual_seed(args.seed + 5)  # the same task-B batches for every method
    for step in range(1, args.finetune_steps + 1):
        tokens, targets = tasks.task_b_batch(args.batch, generator)
        loss = next_token_loss(model, tokens.to(device), targets.to(device))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % args.log_every == 0 or step == args.finetune_steps:
            log(f"[{method}] step {step}/{args.finetune_steps} loss {loss.item():.3f} ({time.perf_counter() - start:.0f}s)")
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start

    changed = total = 0
    squared = 0.0
    before = dict(pretrained.named_parameters())
    for name, param in model.named_parameters():
        diff = param.detach().double() - before[name].detach().double()
        changed += int((diff != 0).sum())
        total += diff.numel()
        squared += float(diff.pow(2).sum())
    return {
        "task_a_after": accuracy(model, *eval_a),
        "task_b": accuracy(model, *eval_b),
        "changed_fraction": changed / total,
        "l2_from_pretrained": squared**0.5,
        "seconds": seconds,
        "detail": detail,
    }


def plot(results: dict, task_a_before: float, task_b_before: float, task_b: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    ax.axhline(task_a_before, color="grey", linestyle="--", linewidth=1, label=f"task A before fine-tuning ({task_a_before:.2f})")
    ax.scatter([task_b_before], [task_a_before], marker="*", s=140, color="black", label=f"pre-trained (task B {task_b_before:.2f})")
    # Methods that land on the same point (torch and selopt AdamW) share one label.
    points: dict[tuple[float, float], list[str]] = {}
    for name, row in results.items():
        points.setdefault((round(row["task_b"], 4), round(row["task_a_after"], 4)), []).append(name)
    for (task_b_score, task_a_score), names in points.items():
        ax.scatter(task_b_score, task_a_score, s=50)
        ax.annotate(" = ".join(names), (task_b_score, task_a_score), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel(f"task B accuracy (new skill: {task_b})")
    ax.set_ylabel("task A accuracy after fine-tuning (fact recall)")
    ax.set_title("Forgetting: what each method learns and keeps")
    ax.set_xlim(-0.02, 1.05)
    ax.set_ylim(-0.02, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    size = parser.add_argument_group("model and tasks")
    size.add_argument("--layers", type=int, default=4)
    size.add_argument("--dim", type=int, default=128)
    size.add_argument("--heads", type=int, default=4)
    size.add_argument("--ffn-dim", type=int, default=352)
    size.add_argument("--entities", type=int, default=128)
    size.add_argument("--relations", type=int, default=4)
    size.add_argument("--values", type=int, default=48)
    size.add_argument("--facts-per-sequence", type=int, default=8)
    size.add_argument("--task-b", choices=TASK_B_KINDS, default="add", help="the new skill of phase 2")
    size.add_argument("--modulus", type=int, default=16, help="task B 'add': a + b mod this, over the first value tokens")
    size.add_argument("--reverse-length", type=int, default=6, help="task B 'reverse': tokens to reverse")
    train = parser.add_argument_group("training")
    train.add_argument("--batch", type=int, default=32, help="sequences per step, both phases")
    train.add_argument("--pretrain-steps", type=int, default=400)
    train.add_argument("--pretrain-lr", type=float, default=3e-3)
    train.add_argument("--finetune-steps", type=int, default=300)
    train.add_argument("--lr", type=float, default=1e-3, help="fine-tuning lr, the same for every method")
    train.add_argument("--mofo-fraction", type=float, default=0.15)
    train.add_argument("--mofo-block", type=int, default=256)
    train.add_argument("--cofi-layers", default="bottom2")
    train.add_argument("--cofi-modules", nargs="+", default=["up_proj", "down_proj"])
    train.add_argument("--importance-batches", type=int, default=8)
    run = parser.add_argument_group("run")
    run.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--threads", type=int, default=1, help="torch CPU threads, fixed so results repeat (more threads on a busy machine spin and slow down)")
    run.add_argument("--device", default="cpu")
    run.add_argument("--log-every", type=int, default=100)
    run.add_argument("--out", type=Path, default=RESULTS, help="folder for forgetting.json and forgetting.png")
    run.add_argument("--tiny", action="store_true", help="a seconds-long run for CI (overrides the sizes)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.layers, args.dim, args.heads, args.ffn_dim = 2, 32, 2, 64
        args.entities, args.values, args.modulus = 16, 16, 8
        args.pretrain_steps, args.finetune_steps, args.importance_batches, args.log_every = 60, 20, 2, 20
        args.mofo_block = 64
    for name in ("layers", "dim", "heads", "ffn_dim", "entities", "relations", "values", "facts_per_sequence",
                 "reverse_length", "modulus", "batch", "pretrain_steps", "finetune_steps", "importance_batches", "threads", "log_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.modulus > args.values:
        parser.error(f"--modulus must be <= --values ({args.values}), got {args.modulus}")
    if (args.entities * args.relations) % args.facts_per_sequence:
        parser.error("--entities * --relations must be a multiple of --facts-per-sequence")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    torch.set_num_threads(args.threads)
    # warn_only: a few CUDA kernels (embedding backward) have no deterministic variant.
    torch.use_deterministic_algorithms(True, warn_only=True)

    tasks = Tasks(args.entities, args.relations, args.values, args.facts_per_sequence, args.task_b, args.reverse_length, args.modulus)
    table = tasks.fact_table(torch.Generator().manual_seed(args.seed))
    eval_a = tuple(t.to(device) for t in task_a_eval(tasks, table))
    eval_b = tuple(t.to(device) for t in tasks.task_b_batch(512, torch.Generator().manual_seed(54321)))

    log(f"[setup] {tasks.n_facts} facts, vocab {tasks.vocab_size}, {args.layers} layers x dim {args.dim} on {device}")
    start = time.perf_counter()
    pretrained = pretrain(args, tasks, table, device)
    pretrain_seconds = time.perf_counter() - start
    task_a_before, task_b_before = accuracy(pretrained, *eval_a), accuracy(pretrained, *eval_b)
    log(f"[pretrain] task A {task_a_before:.3f}, task B {task_b_before:.3f} ({pretrain_seconds:.0f}s)")

    results = {}
    for method in args.methods:
        row = finetune(method, pretrained, args, device, tasks, table, eval_a, eval_b)
        results[method] = {"task_a_before": task_a_before, **row}
        log(f"[{method}] task A {task_a_before:.3f} -> {row['task_a_after']:.3f}, task B {row['task_b']:.3f} ({row['seconds']:.1f}s)")

    n_params = sum(p.numel() for p in pretrained.parameters())
    config = {
        **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"},
        "weight_decay": 0.0,
        "vocab_size": tasks.vocab_size,
        "n_facts": tasks.n_facts,
        "n_params": n_params,
        "task_b_before": task_b_before,
        "pretrain_seconds": pretrain_seconds,
        "task_a_description": "fact recall: accuracy of the value token after 'entity relation', over all facts",
        "task_b_description": (
            f"add two value tokens mod {args.modulus}: accuracy of the sum token" if args.task_b == "add"
            else f"reverse {args.reverse_length} value tokens: token accuracy"
        ) + " over 512 held-out sequences",
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "selopt": selopt.__version__},
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "command": "python -m bench.forgetting " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    report = {"config": config, "methods": results}

    header = f"{'method':<14} {'task B':>7} {'A before':>9} {'A after':>8} {'changed':>8} {'L2':>7} {'seconds':>8}"
    print(header)
    print("-" * len(header))
    for name, row in results.items():
        print(
            f"{name:<14} {row['task_b']:>7.3f} {row['task_a_before']:>9.3f} {row['task_a_after']:>8.3f} "
            f"{row['changed_fraction']:>8.3f} {row['l2_from_pretrained']:>7.2f} {row['seconds']:>8.1f}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "forgetting.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(results, task_a_before, task_b_before, "modular addition" if args.task_b == "add" else "reversal", args.out / "forgetting.png")
    print(f"wrote {args.out / 'forgetting.json'} and {args.out / 'forgetting.png'}")
    return report


if __name__ == "__main__":
    main()
