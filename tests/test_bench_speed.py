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
