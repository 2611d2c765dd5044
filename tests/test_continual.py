"""The continual study runs end to end at a tiny size, uses the lrs the single-task study chose, and repeats exactly."""

import doctest
import json

import pytest

from bench import continual, forgetting
from tests.bench_runs import run_main, tiny_study


def run(argv):
    return run_main(continual.main, argv)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return tiny_study(continual.main, tmp_path_factory, "continual")


def test_outputs_and_schema(tiny_run):
    out, report = tiny_run
    assert json.loads((out / "continual.json").read_text()) == json.loads(json.dumps(report))
    assert (out / "continual.png").stat().st_size > 10_000
    assert list(report["summary"]) == list(report["runs"]) == list(continual.METHODS)
    for method, by_seed in report["runs"].items():
        assert list(by_seed) == ["0", "1"]
        for run_ in by_seed.values():
            # Row 0 is the pre-trained model, then one row per stage; every task is scored in every row.
            assert len(run_["R"]) == 1 + len(continual.STAGES)
            assert all(list(row) == list(continual.TASKS) for row in run_["R"])
            assert len(run_["curve"]["steps"]) == 1 + len(continual.STAGES) * 2  # every 10 of 20 steps per stage
        row = report["summary"][method]
        assert row["seeds"] == 2 and row["average"]["std"] is not None
    # Each seed starts every method from the same pre-trained model.
    for seed in ("0", "1"):
        assert len({json.dumps(report["runs"][m][seed]["R"][0]) for m in continual.METHODS}) == 1


def test_rows_are_the_model_at_the_end_of_each_stage(tiny_run):
    _, report = tiny_run
    for method, by_seed in report["runs"].items():
        for run_ in by_seed.values():
            curve, matrix = run_["curve"], run_["R"]
            ends = [curve["steps"].index(stage * 20) for stage in range(1, len(continual.STAGES) + 1)]
            for stage, at in enumerate(ends, 1):
                for task in continual.TASKS:
                    # LoRA's row is scored after merging its adapter: the same function up to rounding.
                    assert curve[task][at] == pytest.approx(matrix[stage][task], abs=0.05 if method == "lora" else 0), (method, stage, task)


def test_methods_behave_as_designed(tiny_run):
    _, report = tiny_run
    runs = report["runs"]
    # HFT draws a new half for every stage (hft.next_stage), from the seed.
    assert [s.split(":")[0] for s in runs["hft"]["1"]["stages"]] == ["HFT draw 1001", "HFT draw 1002", "HFT draw 1003"]
    assert runs["hft_mofo"]["1"]["stages"] == runs["hft"]["1"]["stages"]
    # LoRA and MoFO start each stage with a new adapter or optimizer.
    assert runs["lora"]["0"]["stages"] == ["a new LoRA adapter r 2"] * 3
    assert runs["mofo"]["0"]["stages"] == ["a new MoFO, fraction 0.15 per tensor"] * 3


def test_a_seed_repeats_alone_in_other_processes(tiny_run, tmp_path):
    # Seed 1 alone, in two worker processes, gives what it gave after seed 0 in this one.
    _, report = tiny_run
    again = run(["--tiny", "--out", str(tmp_path), "--seeds", "1", "--methods", "mofo", "hft", "lora", "--jobs", "2"])
    for method in again["runs"]:
        first, second = (dict(r[method]["1"]) for r in (report["runs"], again["runs"]))
        del first["ms_per_step"], second["ms_per_step"]  # a timing
        assert first == second, method


def test_lrs_are_the_single_task_choices():
    # Each method keeps the lr its single-task sweep chose at matched skill; nothing is retuned for the sequence.
    chosen = json.loads((forgetting.RESULTS / "forgetting.json").read_text())["matched"]
    chosen |= json.loads((forgetting.RESULTS / "forgetting-hft-mofo" / "forgetting.json").read_text())["matched"]
    assert {m: method.lr for m, method in continual.METHODS.items()} == {m: chosen[m]["lr"] for m in continual.METHODS}
    # CoFiTune is left out because it reached task B at no lr of its single-task sweep.
    assert not chosen["cofi_softmask"]["reached"]


def test_metrics_and_their_doctests():
    for module in (continual, forgetting):
        assert doctest.testmod(module).failed == 0, module.__name__
    one = {"A": 1.0, "B": 0.0, "C": 0.0, "D": 0.0}
    runs = {"0": {"R": [one, {**one, "B": 1.0}, {**one, "C": 1.0}, {**one, "A": 0.5, "D": 1.0}]},
            "1": {"R": [one, {**one, "B": 0.5}, {**one, "B": 0.5, "C": 0.5}, {**one, "B": 0.5, "C": 0.5, "D": 1.0}]}}
    summary = continual.summarise(runs)
    # Seed 0 forgets B and C fully (BWT -1), seed 1 keeps both (0).
    assert summary["backward_transfer"]["mean"] == -0.5
    assert summary["task_a_kept"]["mean"] == 0.75 and summary["learned"]["mean"] == pytest.approx((1 + 2 / 3) / 2)
    assert summary["average"]["mean"] == pytest.approx((0.375 + 0.75) / 2)
    assert summary["R_mean"][3] == {"A": 0.75, "B": 0.25, "C": 0.25, "D": 1.0}


def test_output_folders():
    demo = continual.parse_args([])
    assert demo.out.parent == continual.RESULTS / "runs" and demo.seeds == [0] and demo.jobs == 1
    full = continual.parse_args(["--full"])
    assert full.out == continual.RESULTS and full.seeds == [0, 1, 2] and full.jobs == 2 and full.stage_steps == 600


@pytest.mark.parametrize("argv, message", [
    (["--layers", "0"], "--layers must be >= 1"),
    (["--jobs", "0"], "--jobs must be >= 1"),
    (["--new-facts", "12"], "--new-facts must be <="),
    (["--mofo-fraction", "0"], "--mofo-fraction must be in (0, 1]"),
    (["--seeds", "1", "1"], "--seeds must be distinct"),
    (["--methods", "sgd"], "invalid choice"),
    (["--full", "--tiny"], "not allowed with"),
])
def test_bad_flags_are_refused(capsys, argv, message):
    with pytest.raises(SystemExit):
        continual.parse_args(argv)
    assert message in capsys.readouterr().err
