"""The speed benchmark runs end to end (quick mode) and measures what it says it measures."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import selopt
from bench import common, speed
from bench.official_mofo import OfficialMoFO

ROOT = Path(__file__).resolve().parents[1]
TOP_KEYS = {"device", "torch", "triton", "date", "command", "copy_bandwidth_gbps", "records"}
RECORD_KEYS = {
    "variant", "dtype", "numel", "n_tensors", "time_ms", "gbps", "pct_copy_bw", "ratio_vs_torch_fused",
    "cpu_ms_per_step",
}


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    run = subprocess.run(
        [sys.executable, "-m", "bench.speed", "--quick", "--device", "cpu", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads(out.read_text())


def test_quick_run_writes_the_schema(quick_result):
    assert TOP_KEYS <= quick_result.keys()
    assert quick_result["device"].startswith("cpu-") and "/" not in quick_result["device"]
    assert "--quick" in quick_result["command"]
    assert math.isfinite(quick_result["copy_bandwidth_gbps"]) and quick_result["copy_bandwidth_gbps"] > 0
    records = quick_result["records"]
    assert records
    for record in records:
        assert RECORD_KEYS <= record.keys(), record
        for key in ("time_ms", "gbps", "pct_copy_bw", "cpu_ms_per_step"):
            assert math.isfinite(record[key]) and record[key] > 0, (key, record)
        ratio = record["ratio_vs_torch_fused"]
        assert ratio is None or (math.isfinite(ratio) and ratio > 0)


def test_quick_run_covers_every_variant_and_dtype(quick_result):
    measured = {(r["variant"], r["block_size"], r["dtype"]) for r in quick_result["records"]}
    for variant in common.variants_for(torch.device("cpu")):
        for dtype in common.DTYPES:
            assert (variant.name, variant.block_size, dtype) in measured, (variant.label, dtype)
    fused = [r for r in quick_result["records"] if r["variant"] == "torch_adamw_fused"]
    available = common.torch_fused_available(torch.device("cpu"), torch.float32)[0]
    assert all((r["ratio_vs_torch_fused"] == 1.0) == available for r in fused)
    hft = [r for r in quick_result["records"] if r["variant"] == "selopt_hft"]
    assert hft and all(0 < r["numel_stepped"] < r["numel"] for r in hft)


def test_markdown_tables_list_every_record(quick_result):
    text = speed.markdown_tables(quick_result)
    for record in quick_result["records"]:
        assert f"| {record['variant']}" in text
    assert text.count("\n| single |") + text.count("\n| llama-mini") == len(quick_result["records"])


@pytest.mark.parametrize("dtype, moments, expected", [
    (torch.float32, torch.float32, 28),
    (torch.bfloat16, torch.float32, 22),
    (torch.bfloat16, torch.bfloat16, 14),
])
def test_bytes_model(dtype, moments, expected):
    assert common.element_bytes(dtype, moments) == expected


@pytest.mark.parametrize("shape", [(7,), (33, 5), (128, 64)])
@pytest.mark.parametrize("fraction", [0.1, 0.5])
def test_official_mofo_loop_computes_selopt_mofo(shape, fraction):
    # The baseline must run the same algorithm, or the speed-up would compare different work.
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(shape, generator=generator)
    grads = [torch.randn(shape, generator=generator) for _ in range(4)]
    official = torch.nn.Parameter(start.clone())
    ours = torch.nn.Parameter(start.clone())
    options = dict(lr=1e-2, weight_decay=0.1, fraction=fraction)
    opt_official = OfficialMoFO([official], **options)
    opt_ours = selopt.MoFO([ours], backend="torch", **options)
    for g in grads:
        official.grad, ours.grad = g.clone(), g.clone()
        opt_official.step()
        opt_ours.step()
    torch.testing.assert_close(official, ours, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(opt_official.state[official]["exp_avg"], opt_ours.state[ours]["exp_avg"])


def test_hft_draw_freezes_about_half_of_each_layer():
    shapes = common.llama_shapes(4, common.LLAMA_MINI)
    params = [torch.nn.Parameter(torch.zeros(shape)) for _, shape in shapes]
    trainable = common.hft_trainable([name for name, _ in shapes], params)
    per_layer = {}
    for (name, _), train in zip(shapes, trainable):
        if ".layers." in name:
            per_layer.setdefault(int(name.split(".")[2]), []).append(train)
        else:
            assert train, name  # embeddings, final norm and lm_head train
    assert sorted(sum(flags) for flags in per_layer.values()) == [4, 4, 5, 5]  # 2 attn + 1|2 ffn + 1 norm


@pytest.mark.parametrize("argv", [["--sizes", "99"], ["--repeats", "0"], ["--llama-layers", "two"]])
def test_bad_flags_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        speed.parse_args(argv)
    assert argv[0] in capsys.readouterr().err


def _record(variant, time_ms, ratio, dtype="fp32", numel=1 << 20, block_size=None):
    return dict(variant=variant, time_ms=time_ms, ratio_vs_torch_fused=ratio, dtype=dtype, numel=numel,
                case="single", block_size=block_size)


def test_targets_pass_only_when_every_case_meets_them():
    records = [
        _record("torch_adamw_fused", 1.0, 1.0), _record("torch_adamw_fused", 4.0, 1.0, numel=1 << 22),
        _record("selopt_adamw", 0.9, 0.9), _record("selopt_adamw", 4.4, 1.1, numel=1 << 22),
        _record("selopt_mofo_block", 1.05, 1.05, block_size=1024),
        _record("selopt_mofo_exact", 1.4, 1.4), _record("official_mofo", 20.0, 20.0),
    ]
    rows = {row["target"]: row for row in speed.evaluate_targets(records)}
    dense = rows["dense AdamW <= 1.0x torch fused"]
    assert (dense["status"], dense["passed"], dense["measured"], dense["worst"]) == ("MISS", 1, 2, 1.1)
    assert rows["one-pass MoFO <= 1.1x torch fused"]["status"] == "PASS"
    assert rows["exact MoFO <= 1.5x torch fused"]["status"] == "PASS"
    speedup = rows["exact MoFO >= 10x faster than official_mofo"]
    assert speedup["status"] == "PASS" and speedup["worst"] == pytest.approx(20.0 / 1.4)
    text = speed.format_targets(speed.evaluate_targets(records))
    assert "MISS" in text and "PASS" in text


def test_targets_without_measurements_say_so():
    rows = speed.evaluate_targets([_record("torch_adamw_fused", 1.0, 1.0)])
    assert {row["status"] for row in rows} == {"NOT MEASURED"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama_layers_fit_the_memory_budget(dtype):
    per_layer = common.llama_layer_numel() * (common.resident_bytes_per_element(dtype) + 4)
    assert speed.llama_layers_that_fit(dtype, 1 << 30, embeddings=True) == 1  # never fewer than one
    assert speed.llama_layers_that_fit(dtype, 1 << 50, embeddings=True) == 32  # never more than the model
    budget = 48 << 30
    layers = speed.llama_layers_that_fit(dtype, budget, embeddings=False)
    assert 1 < layers < 32 and layers * per_layer <= budget < (layers + 2) * per_layer


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="times CUDA events and prints the targets: needs a GPU")
def test_quick_run_on_cuda_prints_targets(tmp_path):
    out = tmp_path / "cuda.json"
    run = subprocess.run(
        [sys.executable, "-m", "bench.speed", "--quick", "--device", "cuda", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Performance targets" in run.stdout
    result = json.loads(out.read_text())
    assert result["device"] == common.slug(torch.cuda.get_device_name(0))
    assert result["targets"] and all(r["time_ms"] > 0 for r in result["records"])
