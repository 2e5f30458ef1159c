"""Sequence-parallel inference (easyanimate/models/sequence_parallel.py, easyanimate/inference/distributed.py).

The end-to-end tests launch 2 gloo processes with torchrun (each with a timeout: a process that fails in the middle
of a collective leaves the others waiting) and compare with one process: every kind, sampler, CFG rows, a LoRA and
the step cache, in fp32 to 1e-5. The rest checks, without processes, the token arithmetic and that wrong degrees are
refused before any model loads.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from easyanimate.inference import GenerationRequest, RequestError, check_request
from easyanimate.inference.distributed import _check_ring_tokens, check_degrees
from easyanimate.models.sequence_parallel import SequenceParallelError, TokenShard, check_heads, check_ring_support

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
import sequence_parallel_cases as cases  # noqa: E402

LAUNCH_TIMEOUT_S = 300


def torchrun(*args: str, timeout: int = LAUNCH_TIMEOUT_S) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 ARGS`` on the CPU (gloo), from the repository root; fails the test with its
    output on a non-zero exit or after ``timeout`` seconds (a hung collective)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", "EASYANIMATE_DIST_TIMEOUT_S": "120",
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    try:
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"2-process launch did not finish in {timeout}s (a hung collective?):\n{exc.stderr}")
    assert result.returncode == 0, f"2-process launch failed:\n{result.stdout}\n{result.stderr[-6000:]}"
    return result


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory) -> Path:
    return cases.write_lora(tmp_path_factory.mktemp("lora") / "lora.safetensors")


def test_two_processes_make_the_single_process_videos(tiny_model_dir, lora_file, tmp_path):
    """t2v and i2v with the step cache off and on, text to image with token padding and a LoRA, video to video and a
    long video, over several samplers with CFG rows: 2 processes (Ulysses degree 2) give one process's videos."""
    torchrun("tests/sequence_parallel_cases.py", str(tiny_model_dir), str(lora_file), str(tmp_path))
    single = cases.run_cases(str(tiny_model_dir), str(lora_file))
    for name, (videos, evaluations) in single.items():
        split = torch.load(tmp_path / f"{name}.pt")
        assert split["videos"].shape == videos.shape, name
        error = (split["videos"] - videos).abs().max().item()
        assert error <= 1e-5, f"{name}: max abs error {error}"
        assert split["evaluations"] == evaluations, f"{name}: the processes' step cache decided otherwise"
    for name in ("t2v_cache", "i2v_cache"):  # the cache did reuse steps, so its shared decision was exercised
        assert single[name][1] < cases.STEPS, name


def test_torchrun_command_line_writes_once(tiny_model_dir, tmp_path):
    """``torchrun --nproc_per_node 2 predict_t2v.py ... --ulysses-degree 2``: one video and one settings file,
    one path printed."""
    output = tmp_path / "t2v.mp4"
    result = torchrun("predict_t2v.py", "--model", str(tiny_model_dir), "--prompt", "a red square", "--frames", "8",
                      "--steps", "2", "--dtype", "float32", "--device", "cpu", "--ulysses-degree", "2",
                      "--output", str(output))
    assert result.stdout.strip().splitlines() == [str(output)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t2v.json", "t2v.mp4"]
    settings = json.loads((tmp_path / "t2v.json").read_text())
    assert (settings["ulysses_degree"], settings["ring_degree"]) == (2, 1)


# ------------------------------------------------------------------------------------------ without processes
def test_token_shards_cover_the_sequence_with_global_positions():
    """3 processes, 2 frames of 5 tokens: 4 tokens each (2 of them padding on the last), every token's global
    frame, its RoPE rows, and the keys mask that hides the padding."""
    shards = [TokenShard(10, 12, 4 * r, 4 * (r + 1), 5) for r in range(3)]
    tokens = torch.arange(2 * 10 * 3, dtype=torch.float32).view(2, 10, 3)
    table = torch.arange(10, dtype=torch.float32)[:, None].expand(10, 4)
    assert [s.valid for s in shards] == [4, 4, 2]
    assert torch.equal(torch.cat([s.split(tokens) for s in shards], dim=1)[:, :10], tokens)
    assert torch.equal(shards[2].split(tokens)[:, 2:], torch.zeros(2, 2, 3))
    assert torch.equal(torch.cat([s.split_rows(table) for s in shards])[:10], table)
    assert [s.frame_index().tolist() for s in shards] == [[0, 0, 0, 0], [0, 1, 1, 1], [1, 1, 1, 1]]
    assert shards[0].key_mask(torch.device("cpu")).flatten().tolist() == [True] * 10 + [False] * 2
    assert TokenShard(12, 12, 0, 4, 6).key_mask(torch.device("cpu")) is None


def test_frame_index_encoding_of_a_slice_equals_the_whole():
    from easyanimate.models.transformer import FrameIndexEncoding

    encoding = FrameIndexEncoding(8, max_frames=4)
    tokens = torch.randn(2, 3 * 5, 8)
    whole = encoding(tokens, 3)
    shard = TokenShard(15, 15, 4, 11, 5)
    assert torch.equal(encoding(shard.split(tokens), 3, shard.frame_index()), whole[:, 4:11])


@pytest.mark.parametrize("world, ulysses, ring, message", [
    (1, 2, 1, "launch it with torchrun --nproc_per_node 2"),
    (2, 1, 1, "2 processes were launched but"),
    (4, 2, 1, "the product must equal the process count"),
])
def test_degrees_must_match_the_launch(world, ulysses, ring, message):
    with pytest.raises(RequestError, match=message):
        check_degrees(ulysses, ring, world)


def test_model_device_and_size_rules_name_the_allowed_values():
    with pytest.raises(SequenceParallelError, match=r"16 attention heads, got 3; allowed: \[1, 2, 4, 8, 16\]"):
        check_heads(16, 3)
    with pytest.raises(SequenceParallelError, match="needs CUDA GPUs"):
        check_ring_support("cpu", torch.float32)
    with pytest.raises(SequenceParallelError, match="bfloat16 or float16"):
        check_ring_support("cuda", torch.float32)
    check_ring_support("cuda", torch.bfloat16)
    _check_ring_tokens(384, 672, 8)  # 24 x 42 tokens per frame
    with pytest.raises(SequenceParallelError, match=r"3 x 3 = 9, .* e\.g\. 48x64 or 48x128"):
        _check_ring_tokens(48, 48, 4)
    with pytest.raises(RequestError, match="compile does not work with sequence parallelism"):
        check_request(GenerationRequest(compile=True, ulysses_degree=2))
    with pytest.raises(RequestError, match="must be a whole number >= 1"):
        check_request(GenerationRequest(ring_degree=0))


@pytest.mark.parametrize("world, flags, message", [
    (1, ["--ulysses-degree", "2"], "launch it with torchrun --nproc_per_node 2"),
    (2, [], "2 processes were launched but --ulysses-degree 1 x --ring-degree 1 = 1"),
    (4, ["--ulysses-degree", "4"], r"2 attention heads, got 4; allowed: \[1, 2\]"),
    (2, ["--ring-degree", "2"], "ring attention .* needs CUDA GPUs"),
])
def test_command_line_refuses_wrong_degrees_before_loading(tiny_model_dir, tmp_path, capsys, monkeypatch, world,
                                                           flags, message):
    """predict_t2v's main in this process, as if launched with ``world`` processes: exit 2 with the message."""
    from easyanimate import cli

    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setattr(cli, "load_pipeline", lambda job: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main("t2v", ["--model", str(tiny_model_dir), "--prompt", "a", "--device", "cpu", "--output",
                         str(tmp_path / "x.mp4"), *flags])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_help_explains_the_launch():
    from easyanimate.cli import build_parser

    text = " ".join(build_parser("t2v").format_help().split())
    assert "torchrun --nproc_per_node N predict_t2v.py ... --ulysses-degree N" in text
    assert "--ring-degree" in text and "rank 0 decodes and writes" in text
