"""``python -m bench.cpu --quick`` runs every variant side by side and writes its results as data."""

import json

from bench import cpu


def test_quick_run_times_every_variant_at_both_thread_counts(tmp_path):
    out = tmp_path / "cpu.json"
    cpu.main(["--quick", "--out", str(out)])  # the exit code says whether the targets were met: not asserted
    result = json.loads(out.read_text())
    variants = {name for name, _, _ in cpu.VARIANTS}
    for case, _, _ in cpu.cases(quick=True):
        for threads in (1, 2):
            timed = {r["variant"] for r in result["records"] if r["case"] == case and r["threads"] == threads}
            assert timed == variants
    assert all(r["ms"] > 0 and r["ratio"] > 0 for r in result["records"])
    assert "select: numpy.partition (copy)" in result["primitives_us_per_2e16_fp32"]
    assert result["table"].count("\n") == len(cpu.VARIANTS) + 1
