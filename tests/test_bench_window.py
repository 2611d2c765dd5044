"""bench.window runs the kernels on a real fine-tune at a tiny size and reads their select state right."""

import json
import os

import pytest
import torch

pytest.importorskip("triton", reason="bench.window runs the Triton kernels (pip install 'selopt[triton]')")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA device: bench.window needs TRITON_INTERPRET=1 on CPU", allow_module_level=True)

from bench import window  # noqa: E402

TINY = ["--steps", "6", "--settle", "2", "--pretrain-steps", "3", "--layers", "1", "--dim", "16", "--heads", "2",
        "--ffn-dim", "24", "--batch", "4", "--log-every", "100"]


def test_tiny_run_reports_each_step_and_the_mean(tmp_path):
    out = tmp_path / "window.json"
    threads = torch.get_num_threads()
    try:
        report = window.main([*TINY, "--device", "cuda" if torch.cuda.is_available() else "cpu", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    saved = json.loads(out.read_text())
    assert saved["mean_after_settle"] == report["mean_after_settle"]
    assert [s["step"] for s in saved["steps"]] == list(range(1, 7))
    first = saved["steps"][0]
    # No window before the first threshold: every matrix refines from m, nothing is listed.
    assert first["from_list"] == 0 and first["list_fill"] == 0 and first["bytes_per_entry"] == 44
    for s in saved["steps"]:
        assert 0 <= s["from_list"] <= 1 and 0 <= s["list_fill"] <= 1 / 16
        assert s["bytes_per_entry"] == pytest.approx(36 + 12 * s["list_fill"] + 8 * (1 - s["from_list"]), abs=1e-3)


def test_window_matches_the_kernels_rule():
    from selopt.kernels import select_state

    state = torch.zeros(3, select_state.STATE_COLUMNS.value, dtype=torch.int64)
    state[:, select_state.STATE_WINDOW_BITS.value] = torch.tensor([0, 20, 21])
    state[:, select_state.STATE_THRESHOLD.value] = torch.tensor([5, 10, 2**31 - 1])
    low, width = window.window_of(state)
    assert width.tolist() == [0, 2**20, 2**21]
    assert low.tolist() == [5, 0, 2**31 - 1 - 2**21]  # clamped at 0 and below the largest key
