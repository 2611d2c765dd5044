"""Continual fine-tuning: three new tasks one after another, and how much of every earlier task each method keeps.

The single-task forgetting study (:mod:`bench.forgetting`) fine-tunes once.
The papers claim their advantage over a *sequence* of stages (TRACE's tasks,
one after another), so this study runs one, at the same small size: the same
Llama-style model and the same task A pre-training (fact recall), then three
stages, each on a new task written in the same token format:

- **B**, addition mod 16 of value tokens (the single-task study's task B);
- **C**, new facts in task A's exact format, under a relation token that task
  A never uses: new knowledge that competes head-on with the old;
- **D**, reversing a sequence of value tokens, a string transformation.

Each method runs the whole sequence, with the learning rate its single-task
sweep chose (:data:`METHODS` says which; nothing is retuned here):

- ``adamw_torch``: full fine-tuning, a fresh ``torch.optim.AdamW`` per stage;
- ``mofo``: ``selopt.MoFO``, a fresh optimizer per stage;
- ``hft``: :func:`selopt.hft.freeze_half` for stage 1 and
  :func:`selopt.hft.next_stage` for every later one (a new half per stage,
  HFT's intended use), stepped by ``selopt.AdamW``;
- ``hft_mofo``: the same halves, stepped by MoFO;
- ``lora``: a fresh peft LoRA adapter per stage, merged into the weights
  (``merge_and_unload``) at its end.

CoFiTune is left out: in the single-task study it reached task B at no
learning rate (bench/results/forgetting.json), so it would not learn the
stages either.

After every stage, every task is scored, seen or not: R[i][j] is task j
after stage i (row 0: the pre-trained model). Per seed, as TRACE reports:

- **average accuracy**: the mean over all four tasks, A included, at the end;
- **backward transfer**: the mean over the new tasks but the last of
  (accuracy at the end - accuracy right after its own stage); negative is forgetting;
- **task A kept**: task A at the end;
- **learned**: the mean of each new task right after its own stage, so a
  method that cannot learn a stage at its lr shows it.

Mean ± std over seeds, in ``continual.json`` (with the matrices and the
curves) and ``continual.png`` (every task along the sequence, per method).

    python -m bench.continual          # the demo: 1 seed, 300 steps per stage; writes bench/results/runs/<time>-demo/
    python -m bench.continual --full   # the committed study: 3 seeds, 600 steps per stage, 2 processes; writes bench/results/
    python -m bench.continual --tiny   # CI smoke run, seconds
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import selopt
from bench import common, forgetting
from bench.forgetting import FactStream, Tasks, accuracy, log, next_token_loss
from bench.tiny_llama import TinyLlama
from selopt import hft


@dataclass(frozen=True)
class Method:
    label: str
    lr: float


# Each lr is the one the single-task study chose (matched skill, most task A kept):
# bench/results/forgetting.json for the first four, bench/results/forgetting-hft-mofo/forgetting.json
# for HFT + MoFO, whose sweep was run for this study. tests/test_continual.py reads both files.
METHODS = {
    "adamw_torch": Method("full fine-tuning (torch AdamW)", 2.5e-4),
    "mofo": Method("MoFO (15% per tensor)", 5e-4),
    "hft": Method("HFT (new half per stage)", 2e-3),
    "hft_mofo": Method("HFT + MoFO", 1e-3),
    "lora": Method("LoRA, merged per stage", 2e-3),
}
TASKS = {"A": "fact recall (pre-training)", "B": "modular addition", "C": "new facts", "D": "reversal"}
STAGES = ("B", "C", "D")
RESULTS = forgetting.RESULTS


class Curriculum:
    """Every task of one seed: its training batches and its fixed evaluation set."""

    def __init__(self, tasks: Tasks, seed: int, new_facts: int, eval_sequences: int):
        self.tasks = tasks
        self.table_a = tasks.fact_table(torch.Generator().manual_seed(seed))
        # Task C: one value per entity under the one new relation token; drawn apart from task A's table.
        values = torch.randint(0, tasks.n_values, (new_facts, 1), generator=torch.Generator().manual_seed(seed + 7))
        self.table_c = tasks.value0 + values
        order_c = torch.randperm(new_facts, generator=torch.Generator().manual_seed(12346))
        self.evals = {
            "A": forgetting.task_a_eval(tasks, self.table_a),
            "B": tasks.add_batch(eval_sequences, torch.Generator().manual_seed(54321)),
            "C": tasks.facts_batch(self.table_c, order_c, tasks.new_relation0),
            "D": tasks.reverse_batch(eval_sequences, torch.Generator().manual_seed(54322)),
        }

    def stream(self, task: str, batch: int, seed: int):
        """The training batches of ``task``: the same for every method of a seed."""
        generator = torch.Generator().manual_seed(seed)
        if task == "B":
            return lambda: self.tasks.add_batch(batch, generator)
        if task == "D":
            return lambda: self.tasks.reverse_batch(batch, generator)
        if task == "C":
            facts = FactStream(self.table_c.shape[0], batch * self.tasks.facts_per_sequence, generator)
            return lambda: self.tasks.facts_batch(self.table_c, facts.next(), self.tasks.new_relation0)
        raise ValueError(f"task must be one of {STAGES}, got {task!r}")

    def scores(self, model) -> dict[str, float]:
        return {task: accuracy(model, *data) for task, data in self.evals.items()}


def make_tasks(args) -> Tasks:
    return Tasks(args.entities, args.relations, args.values, args.facts_per_sequence, "add", args.reverse_length,
                 args.modulus, new_relations=1)


def begin_stage(method: str, model, optimizer, stage: int, seed: int, args):
    """The model to train in ``stage`` (1-based) and its optimizer, for ``method``; a description."""
    lr, fraction = METHODS[method].lr, args.mofo_fraction
    if method == "adamw_torch":
        return model, torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0), "a new torch.optim.AdamW"
    if method == "mofo":
        groups = selopt.param_groups(model, weight_decay=0.0, fraction=fraction)
        return model, selopt.MoFO(groups, lr=lr), f"a new MoFO, fraction {fraction} per tensor"
    if method in ("hft", "hft_mofo"):
        draw = 1000 * seed + stage  # a new half per stage and seed
        if optimizer is None:
            report = hft.freeze_half(model, seed=draw)
            if method == "hft":
                optimizer = selopt.AdamW(selopt.param_groups(model, weight_decay=0.0, fraction=1.0), lr=lr)
            else:
                optimizer = selopt.MoFO(selopt.param_groups(model, weight_decay=0.0, fraction=fraction), lr=lr)
        else:
            report = hft.next_stage(model, optimizer, seed=draw)  # the optimizer follows, with fresh state
        return model, optimizer, f"HFT draw {draw}: {report.fraction_by_count:.1%} of entries train"
    if method == "lora":
        import peft  # the demo extra; imported here so that the other methods run without it

        config = peft.LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.0,
                                 target_modules=list(forgetting.LORA_TARGETS))
        wrapped = peft.get_peft_model(model, config)
        trainable = [p for p in wrapped.parameters() if p.requires_grad]
        return wrapped, torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0), f"a new LoRA adapter r {args.lora_rank}"
    raise ValueError(f"method must be one of {tuple(METHODS)}, got {method!r}")


def end_stage(method: str, model):
    """The plain model after a stage: LoRA's adapter merged into the weights it amounts to."""
    return model.merge_and_unload() if method == "lora" else model


def set_up_process(args) -> None:
    """The same torch settings in every process, so a result does not depend on --jobs."""
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)


def pretrain(args, seed: int) -> dict[str, torch.Tensor]:
    """Task A pre-training of one seed (as the single-task study's), as a state dict a worker can send back."""
    set_up_process(args)
    tasks = make_tasks(args)
    curriculum = Curriculum(tasks, seed, args.new_facts, args.eval_b)
    model = forgetting.pretrain(args, seed, tasks, curriculum.table_a, torch.device("cpu"))
    log(f"[seed {seed} pretrain] {curriculum.scores(model)}")
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def run_sequence(method: str, seed: int, pretrained: dict[str, torch.Tensor], args) -> dict:
    """One method through every stage from one seed's pre-trained weights: R, the curves and the step time."""
    set_up_process(args)
    tasks = make_tasks(args)
    curriculum = Curriculum(tasks, seed, args.new_facts, args.eval_b)
    model = TinyLlama(forgetting.model_config(args, tasks))
    model.load_state_dict(pretrained)
    torch.manual_seed(seed + 2)
    tag = f"[seed {seed} {method} lr {METHODS[method].lr:g}]"
    matrix = [curriculum.scores(model)]
    curve = {"steps": [0], **{task: [score] for task, score in matrix[0].items()}}
    optimizer, details, train_seconds = None, [], 0.0
    for stage, task in enumerate(STAGES, 1):
        trained, optimizer, detail = begin_stage(method, model, optimizer, stage, seed, args)
        details.append(detail)
        next_batch = curriculum.stream(task, args.batch, 100 * seed + stage)
        for step in range(1, args.stage_steps + 1):
            start = time.perf_counter()
            loss = next_token_loss(trained, *next_batch())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            train_seconds += time.perf_counter() - start
            if step % args.eval_every == 0 or step == args.stage_steps:
                curve["steps"].append((stage - 1) * args.stage_steps + step)
                for name, score in curriculum.scores(trained).items():
                    curve[name].append(score)
        model = end_stage(method, trained)
        matrix.append(curriculum.scores(model))
        log(f"{tag} stage {stage} (task {task}, {detail}): " + ", ".join(f"{t} {s:.3f}" for t, s in matrix[-1].items()))
    return {"R": matrix, "curve": curve, "stages": details,
            "ms_per_step": 1e3 * train_seconds / (len(STAGES) * args.stage_steps)}


# ---------------------------------------------------------------------------------------------
# Metrics: pure functions of the accuracy matrix


def sequence_metrics(matrix: list[dict[str, float]]) -> dict[str, float]:
    """TRACE's summary of one run; ``matrix[i][task]`` is the task after stage i, row 0 the pre-trained model.

    >>> R = [{"A": 1.0, "B": 0.0, "C": 0.0}, {"A": 0.8, "B": 0.9, "C": 0.1}, {"A": 0.6, "B": 0.5, "C": 1.0}]
    >>> {k: round(v, 3) for k, v in sequence_metrics(R).items()}
    {'average': 0.7, 'backward_transfer': -0.4, 'task_a_kept': 0.6, 'learned': 0.95}
    """
    stages = list(matrix[0])[1:]  # the new tasks, in stage order
    end = matrix[-1]
    return {
        "average": statistics.fmean(end.values()),
        "backward_transfer": statistics.fmean(end[t] - matrix[i][t] for i, t in enumerate(stages[:-1], 1)),
        "task_a_kept": end["A"],
        "learned": statistics.fmean(matrix[i][t] for i, t in enumerate(stages, 1)),
    }


def summarise(runs: dict[str, dict]) -> dict:
    """Mean and std over seeds of each metric, the mean matrix and each seed's metrics."""
    per_seed = {seed: sequence_metrics(run["R"]) for seed, run in runs.items()}
    rows = [run["R"] for run in runs.values()]
    summary = {"seeds": len(runs), "per_seed": per_seed}
    for key in next(iter(per_seed.values())):
        values = [metrics[key] for metrics in per_seed.values()]
        summary[key] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None}
    summary["R_mean"] = [{task: statistics.fmean(r[i][task] for r in rows) for task in rows[0][i]} for i in range(len(rows[0]))]
    return summary


# ---------------------------------------------------------------------------------------------
# Output


TASK_COLORS = {"A": "tab:red", "B": "tab:blue", "C": "tab:green", "D": "tab:purple"}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config, methods = report["config"], list(report["summary"])
    columns = min(3, len(methods))
    rows = -(-len(methods) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.4 * columns, 3.5 * rows), dpi=110, sharey=True, squeeze=False)
    axes = axes.flatten()
    for ax, method in zip(axes, methods):
        curves = [run["curve"] for run in report["runs"][method].values()]
        steps = curves[0]["steps"]
        for task, color in TASK_COLORS.items():
            mean = [statistics.fmean(c[task][i] for c in curves) for i in range(len(steps))]
            spread = [statistics.pstdev(c[task][i] for c in curves) for i in range(len(steps))]
            ax.plot(steps, mean, color=color, linewidth=1.4, label=f"{task}: {TASKS[task]}")
            ax.fill_between(steps, [m - s for m, s in zip(mean, spread)], [m + s for m, s in zip(mean, spread)],
                            color=color, alpha=0.15, linewidth=0)
        for stage in range(1, len(STAGES)):
            ax.axvline(stage * config["stage_steps"], color="grey", linestyle=":", linewidth=1)
        row = report["summary"][method]
        ax.set_title(f"{METHODS[method].label}, lr {METHODS[method].lr:g}\n"
                     f"avg {row['average']['mean']:.2f}, BWT {row['backward_transfer']['mean']:+.2f}, "
                     f"A {row['task_a_kept']['mean']:.2f}", fontsize=8)
        ax.set_xlabel("fine-tuning step (stages B | C | D)", fontsize=8)
        ax.set_ylim(-0.02, 1.04)
        ax.grid(alpha=0.3)
    for ax in axes[::columns]:
        ax.set_ylabel(f"accuracy (mean of {len(config['seeds'])} seeds; band: std)", fontsize=8)
    handles, labels = axes[0].get_legend_handles_labels()
    if len(methods) < len(axes):  # the spare panel holds the legend
        for spare in axes[len(methods):]:
            spare.axis("off")
        axes[len(methods)].legend(handles, labels, loc="center", fontsize=9, title="task")
    else:
        axes[0].legend(handles, labels, loc="center left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def format_table(report: dict) -> str:
    def cell(stat: dict, signed: bool = False) -> str:
        text = f"{stat['mean']:+.3f}" if signed else f"{stat['mean']:.3f}"
        return text + (f" ± {stat['std']:.3f}" if stat["std"] is not None else "")

    lines = ["| method | lr | average accuracy | backward transfer | task A kept | learned | ms/step |",
             "|---|---|---|---|---|---|---|"]
    for method, row in report["summary"].items():
        ms = statistics.fmean(run["ms_per_step"] for run in report["runs"][method].values())
        lines.append(f"| {METHODS[method].label} | {METHODS[method].lr:g} | {cell(row['average'])} | "
                     f"{cell(row['backward_transfer'], signed=True)} | {cell(row['task_a_kept'])} | {cell(row['learned'])} | {ms:.0f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line


@dataclass(frozen=True)
class Preset:
    seeds: tuple[int, ...]
    stage_steps: int
    eval_every: int
    jobs: int


PRESETS = {
    "demo": Preset((0,), 300, 50, 1),
    "full": Preset((0, 1, 2), 600, 50, 2),  # two processes of one thread: the 2-core machine's budget
    "tiny": Preset((0, 1), 20, 10, 1),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=forgetting.HelpFormatter)
    size, train, run = forgetting.add_shared_arguments(parser, f"seeds {PRESETS['full'].seeds}")
    size.add_argument("--new-facts", type=int, default=64, help="task C: facts under the new relation (entities 0..N-1)")
    train.add_argument("--stage-steps", type=int, help="steps per stage; default: 300 (demo), 600 (--full)")
    train.add_argument("--eval-every", type=int, help="score every task every this many steps; default: 50")
    run.add_argument("--methods", nargs="+", choices=tuple(METHODS), help=f"default: {' '.join(METHODS)}")
    run.add_argument("--jobs", type=int, help="processes running (method, seed) sequences side by side; default: 1, 2 with --full")
    args = parser.parse_args(argv)

    args.preset = "full" if args.full else "tiny" if args.tiny else "demo"
    preset = PRESETS[args.preset]
    if args.tiny:
        vars(args).update(forgetting.TINY_MODEL)
        args.new_facts, args.lora_rank, args.log_every = 16, 2, 20
    args.seeds = args.seeds or list(preset.seeds)
    args.methods = args.methods or list(METHODS)
    for name in ("stage_steps", "eval_every", "jobs"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(preset, name))
    forgetting.check_shared_arguments(parser, args, ("new_facts", "stage_steps", "eval_every", "jobs"))
    if args.new_facts > args.entities or args.new_facts % args.facts_per_sequence:
        parser.error(f"--new-facts must be <= --entities ({args.entities}) and a multiple of --facts-per-sequence "
                     f"({args.facts_per_sequence}), got {args.new_facts}")
    return args


def run_all(args) -> tuple[dict, dict]:
    """Pre-train every seed, then run every (method, seed) sequence, in ``args.jobs`` processes."""
    if args.jobs == 1:
        pretrained = {seed: pretrain(args, seed) for seed in args.seeds}
        runs = {m: {str(s): run_sequence(m, s, pretrained[s], args) for s in args.seeds} for m in args.methods}
        return pretrained, runs
    # spawn: a fresh interpreter per worker (no forked torch thread pools); each result is a plain dict.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
        pretrained = dict(zip(args.seeds, pool.map(pretrain, [args] * len(args.seeds), args.seeds)))
        jobs = {(m, s): pool.submit(run_sequence, m, s, pretrained[s], args) for s in args.seeds for m in args.methods}
        runs = {m: {str(s): jobs[m, s].result() for s in args.seeds} for m in args.methods}
    return pretrained, runs


def main(argv=None) -> dict:
    started = time.perf_counter()
    load_before = common.load_average()
    args = parse_args(argv)
    set_up_process(args)
    tasks = make_tasks(args)
    log(f"[setup] stages {' -> '.join(STAGES)} after task A, {args.stage_steps} steps each; {len(args.methods)} methods x "
        f"{len(args.seeds)} seeds in {args.jobs} process(es)")
    _, runs = run_all(args)

    config = {
        **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("out", "full", "tiny")},
        "lrs": {m: METHODS[m].lr for m in args.methods},
        "weight_decay": 0.0,
        "tasks": {
            "A": f"fact recall: the value after 'entity relation', over all {tasks.n_facts} facts (pre-training)",
            "B": f"add two value tokens mod {args.modulus}: the sum token, over {args.eval_b} fixed sequences",
            "C": f"{args.new_facts} new facts in task A's format under a relation token task A never uses: all of them",
            "D": f"reverse {args.reverse_length} value tokens: token accuracy over {args.eval_b} fixed sequences",
        },
        "stages": list(STAGES),
        "vocab_size": tasks.vocab_size,
        "n_params": sum(t.numel() for t in TinyLlama(forgetting.model_config(args, tasks)).parameters()),
        **forgetting.run_environment(args.methods, torch.device("cpu")),
        "command": "python -m bench.continual " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    report = {"config": config, "summary": {m: summarise(by_seed) for m, by_seed in runs.items()}, "runs": runs}
    print(format_table(report))
    forgetting.save_report(report, args.out / "continual", plot, started, load_before)
    return report


if __name__ == "__main__":
    main()
