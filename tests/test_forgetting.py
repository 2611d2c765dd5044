"""The forgetting experiment runs end to end at a tiny size, writes its outputs, and repeats exactly."""

import json

import pytest
import torch

from bench import forgetting


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("forgetting")
    threads = torch.get_num_threads()
    try:
        report = forgetting.main(["--tiny", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)
    return out, report


def test_outputs_and_schema(tiny_run):
    out, report = tiny_run
    saved = json.loads((out / "forgetting.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert (out / "forgetting.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(saved["methods"]) == list(forgetting.METHODS)
    assert saved["config"]["tiny"] and saved["config"]["lr"] > 0
    for name, row in saved["methods"].items():
        for key in ("task_a_before", "task_a_after", "task_b", "changed_fraction"):
            assert 0.0 <= row[key] <= 1.0, (name, key)
        assert row["l2_from_pretrained"] > 0 and row["seconds"] > 0


def test_methods_behave_as_designed(tiny_run):
    _, report = tiny_run
    rows = report["methods"]
    # selopt.AdamW (torch backend on CPU) is torch.optim.AdamW.
    for key in ("task_a_after", "task_b", "changed_fraction", "l2_from_pretrained"):
        assert rows["selopt_adamw"][key] == pytest.approx(rows["adamw_torch"][key], rel=1e-6)
    # Frozen tensors never move: HFT and CoFiTune change at most what they train.
    assert rows["hft"]["changed_fraction"] < 0.7
    assert rows["cofi_coarse"]["changed_fraction"] < 0.3
    assert rows["cofi_softmask"]["changed_fraction"] <= rows["cofi_coarse"]["changed_fraction"]
    # Full fine-tuning moves (almost) every entry; the selective ones move fewer, by less.
    assert rows["adamw_torch"]["changed_fraction"] > 0.9
    for name in ("mofo", "mofo_block", "hft", "cofi_coarse", "cofi_softmask"):
        assert rows[name]["l2_from_pretrained"] < rows["adamw_torch"]["l2_from_pretrained"], name
    assert rows["adamw_torch"]["task_a_after"] < rows["adamw_torch"]["task_a_before"]


def test_same_seed_same_numbers(tiny_run, tmp_path):
    _, report = tiny_run
    threads = torch.get_num_threads()
    try:
        again = forgetting.main(["--tiny", "--out", str(tmp_path), "--methods", "mofo", "cofi_softmask"])
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)
    for name in ("mofo", "cofi_softmask"):
        for key in ("task_a_after", "task_b", "changed_fraction", "l2_from_pretrained"):
            assert again["methods"][name][key] == report["methods"][name][key], (name, key)


def test_bad_flags_are_refused(capsys):
    with pytest.raises(SystemExit):
        forgetting.parse_args(["--layers", "0"])
    with pytest.raises(SystemExit):
        forgetting.parse_args(["--modulus", "99"])
    assert "--modulus must be <=" in capsys.readouterr().err
