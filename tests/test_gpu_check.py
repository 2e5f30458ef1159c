"""benchmarks/gpu_check.py: its dry run (the same code at tiny sizes on the CPU) gives every row, and its guards turn
an out-of-memory error into a row with advice and skip rows the time budget cannot take."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import gpu_check

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.slow
def test_dry_run_gives_every_row(tmp_path, golden_dir):
    result = gpu_check.main(["--dry-run", "--json", str(tmp_path / "check.json")])
    rows = result["rows"]
    assert json.loads((tmp_path / "check.json").read_text())["rows"] == rows
    assert [r for r in rows if r["status"] != "ok"] == []
    golden = {(r["name"].split()[0], r["setting"]) for r in rows if r["section"] == "golden"}
    assert golden == {(kind, dtype) for kind in ("transformer", "vae", "pipeline") for dtype in ("fp32", "bf16")}
    steps = {(r["name"], r["setting"]) for r in rows if r["section"] == "step"}
    expected = {(f"32x48 {frames} frames", name) for frames in (9, 16)
                for name, _, _, compiled in gpu_check.STEP_SETTINGS if frames == 9 or not compiled}
    assert steps == expected  # the dry run compiles at 9 frames only (dynamo tracing is most of its time)
    assert all(r["seconds"] > 0 for r in rows if r["section"] in ("step", "vae"))
    assert {r["setting"] for r in rows if r["section"] == "vae"} == {"bf16", "bf16 tiled"}


def test_out_of_memory_becomes_a_row_with_advice_and_the_next_row_runs():
    check = gpu_check.Check(torch.device("cpu"), budget_s=60)

    def out_of_memory(row):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 30.00 GiB")

    def fine(row):
        row.seconds = 1.0

    check.run("step", "384x672 144 frames", "model_cpu_offload", out_of_memory)
    check.run("step", "384x672 144 frames", "sequential_cpu_offload", fine)
    oom, ok = check.rows
    assert oom.status == "OOM" and "memory mode model_cpu_offload_and_fp8" in oom.note
    assert ok.status == "ok" and ok.seconds == 1.0


def test_rows_beyond_the_time_budget_are_skipped_and_errors_are_rows():
    check = gpu_check.Check(torch.device("cpu"), budget_s=5)
    ran = []
    check.run("step", "a", "bf16", lambda row: ran.append(1), estimate_s=10)
    check.run("step", "b", "bf16", lambda row: 1 / 0, estimate_s=1)
    assert not ran and check.rows[0].status == "skipped" and "time budget" in check.rows[0].note
    assert check.rows[1].status == "error" and "ZeroDivisionError" in check.rows[1].note
