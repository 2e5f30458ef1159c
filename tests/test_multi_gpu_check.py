"""benchmarks/multi_gpu_check.py: its dry run (2 gloo processes on the CPU, a tiny model in fp32) gives the parity,
padding, ring-refusal and speed rows, so the script that the first multi-GPU session runs once cannot rot. The
degrees and the padding size it picks for N GPUs are checked without processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.multi_gpu_check import padded_case, parallel_configs

REPO = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT_S = 120


@pytest.mark.slow
def test_dry_run_on_two_processes_gives_every_row(tmp_path):
    out = tmp_path / "multi.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", "EASYANIMATE_CPU_DTYPE": "float32",
           "EASYANIMATE_DIST_TIMEOUT_S": "60", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "benchmarks.multi_gpu_check", "--dry-run", "--json", str(out)]
    try:
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"2-process dry run did not finish in {LAUNCH_TIMEOUT_S}s (a hung collective?):\n{exc.stderr}")
    assert result.returncode == 0, f"dry run failed:\n{result.stdout}\n{result.stderr[-6000:]}"
    assert result.stdout.count("multi_gpu_check:") == 1  # rank 0 alone prints the table

    report = json.loads(out.read_text())
    rows = report["rows"]
    assert report["dry_run"] and report["environment"]["backend"] == "gloo"
    assert report["settings"]["dtype"] == "fp32"
    assert [r for r in rows if r["status"] not in ("ok", "skipped")] == []

    def row(section, ulysses, ring, case="main"):
        found = [r for r in rows if (r["section"], r["ulysses"], r["ring"], r["case"]) == (section, ulysses, ring, case)
                 and not r["name"].startswith("ring refuses")]
        assert len(found) == 1, (section, ulysses, ring, case, found)
        return found[0]

    parity = row("parity", 2, 1)
    assert parity["status"] == "ok" and parity["max_abs"] <= 1e-5 and parity["tolerance"] == 1e-5
    padded = row("parity", 2, 1, "padded")  # 45 tokens: Ulysses pads one
    assert padded["status"] == "ok" and padded["max_abs"] <= 1e-5 and padded["tokens"] % 2 == 1
    assert "padded to" in padded["note"]
    for section in ("parity", "speed"):  # ring attention: CUDA only, with the project's reason
        ring = row(section, 1, 2)
        assert ring["status"] == "skipped" and "needs CUDA GPUs" in ring["note"]
    refusal = [r for r in rows if r["name"].startswith("ring refuses")]
    assert len(refusal) == 1 and refusal[0]["status"] == "ok"
    assert "ring attention needs the token count to divide" in refusal[0]["note"]

    speed = {r["gpus"]: r for r in rows if r["section"] == "speed" and r["status"] == "ok"}
    assert set(speed) == {1, 2}
    assert all(r["seconds"] > 0 for r in speed.values())
    split = speed[2]
    assert split["all_to_all_bytes"] > 0 and split["gather_bytes"] > 0 and split["bandwidth_gbs"] > 0
    assert "= bench_parallel's formula" in split["note"]
    assert [r["rank"] for r in split["per_rank"]] == [0, 1] and len(split["peak_gib"]) == 2


def test_degrees_for_n_gpus_include_ring_combinations():
    assert parallel_configs(2) == [(2, 1), (1, 2)]
    assert parallel_configs(4) == [(4, 1), (2, 2), (1, 4), (2, 1), (1, 2)]
    assert parallel_configs(8)[:4] == [(8, 1), (4, 2), (2, 4), (1, 8)] and len(parallel_configs(8)) == 9


def test_padding_size_has_a_token_count_no_degree_divides():
    # 384x672x49 is 13 latent frames x 24 x 42 tokens; 368x656 gives 13 x 23 x 41 = 12259 tokens
    assert padded_case(384, 672, 49, [2, 4, 8]) == (368, 656, 49)
    height, width, frames = padded_case(384, 672, 49, [2, 3, 6])  # also for 6 GPUs
    tokens = 13 * (height // 16) * (width // 16)
    assert frames == 49 and all(tokens % d for d in (2, 3, 6))
