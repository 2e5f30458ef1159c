"""The web server as a sequence-parallel launch: ``torchrun --nproc_per_node 2 app.py --ulysses-degree 2``.

One test launches 2 gloo processes of the real server (tests/parallel_server_app.py: app.py keeping each saved
video's tensor) and talks to rank 0 over HTTP, through the Gradio API and the original's routes: two generations
with different models and settings equal one process's (fp32, 1e-5), a refused request leaves the processes in
step, and Ctrl-C on rank 0 during a generation stops it on both processes and makes the follower exit
(tests/test_control_channel.py measures the channel under it). The launch has a timeout: a hung collective fails
the test instead of hanging it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch

from easyanimate.ui.app import page_request
from easyanimate.ui.generation import Studio

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from test_control_channel import launch_env, torchrun_command  # noqa: E402
from test_ui import free_port, make_studio, write_test_image  # noqa: E402

DEMO_MODEL = REPO / "models" / "EasyAnimateV4-demo"


# ------------------------------------------------------------------------------------------------ the server
def generate_values(model: str, **change) -> dict:
    """The page's /generate inputs for a small fp32-comparable generation of ``model``."""
    values = dict(model=model, lora="none", lora_strength=0.55, prompt="a red square moving down",
                  negative_prompt="", kind="Text to Video", sampler="Euler", steps=3, width=64, height=64, frames=8,
                  guidance_scale=3.0, seed=11, resize_to_reference=False, base_resolution=512, start_image=None,
                  end_image=None, video=None, denoise_strength=0.7, partial_frames=8, overlap_frames=4,
                  transformer_weights="none", step_cache=0.0, step_cache_skip_start=2)
    values.update(change)
    return values


def single_process_videos(models: Path, requests: list[dict], tmp_path: Path, monkeypatch) -> list[torch.Tensor]:
    """What one process's server makes of each page request (its saved videos, exactly)."""
    videos = []
    monkeypatch.setattr(Studio, "_save", lambda self, generation, kind: videos.append(generation.videos))
    studio = Studio(models, tmp_path / "loras", tmp_path / "single")
    for values in requests:
        studio.generate(page_request(values))
    return videos


def wait_for_server(url: str, process: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited with {process.returncode} before serving:\n{log.read_text()[-6000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"the server did not answer within {timeout} s:\n{log.read_text()[-6000:]}")


def wait_until_sampling(job, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not (job.status().progress_data and job.status().progress_data[0].desc == "Sampling"):
        assert not job.done() and time.monotonic() < deadline, "the long generation never started sampling"
        time.sleep(0.05)


def test_two_process_server_matches_one_process_stays_in_step_and_stops_with_rank_0(tiny_model_dir, tmp_path,
                                                                                    monkeypatch):
    from gradio_client import Client, handle_file

    models = tmp_path / "models"
    shutil.copytree(tiny_model_dir, models / "tiny")
    shutil.copytree(DEMO_MODEL, models / "demo")
    start_image = write_test_image(tmp_path / "start.png", height=64, width=64)
    requests = [
        # image to video: the uploaded image, opened on rank 0, reaches the follower inside the prepared request
        generate_values("tiny", kind="Image to Video", start_image=str(start_image)),
        # another model folder, sampler, size and seed; the step cache decides on both processes' tokens
        generate_values("demo", sampler="DPM++", width=48, height=48, frames=16, seed=5, steps=6, step_cache=0.5,
                        step_cache_skip_start=1),
    ]
    port, pid_dir, log = free_port(), tmp_path / "pids", tmp_path / "server.log"
    pid_dir.mkdir()
    with log.open("w") as log_file:
        server = subprocess.Popen(
            torchrun_command("tests/parallel_server_app.py", "--ulysses-degree", "2", "--models-dir", str(models),
                             "--output-dir", str(tmp_path / "samples"), "--port", str(port)),
            cwd=REPO, env=launch_env(EASYANIMATE_TEST_PID_DIR=str(pid_dir), EASYANIMATE_DIST_TIMEOUT_S="120"),
            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_for_server(url, server, log)
        client = Client(url, verbose=False)
        first = dict(requests[0], start_image=handle_file(str(start_image)))
        samples = tmp_path / "samples"  # where rank 0 saves (the client gets copies)
        saved = [samples / Path(client.predict(**first, api_name="/generate")[0]).name]

        # refused on rank 0 (a width that is not a multiple of 16) through the original's route: never handed over
        refused = httpx.post(url + "easyanimate/infer_forward", timeout=60, json={
            "prompt_textbox": "a red square", "width_slider": 50, "height_slider": 64, "length_slider": 8,
            "sample_step_slider": 2}).json()
        assert refused["message"].startswith("Error") and "multiple of 16" in refused["message"]
        assert client.predict("demo", api_name="/load_model") == "model demo loaded"  # a model switch: both load
        saved.append(samples / Path(client.predict(**requests[1], api_name="/generate")[0]).name)

        # Ctrl-C on rank 0 in the middle of a long generation: it stops on both processes at the same step, rank 0
        # tells the follower to stop, and both exit cleanly (torchrun returns 0)
        long_job = client.submit(**generate_values("tiny", steps=100, frames=16, seed=3), api_name="/generate")
        wait_until_sampling(long_job)
        os.kill(int((pid_dir / "rank0.pid").read_text()), signal.SIGINT)
        returncode = server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the server's processes did not exit after Ctrl-C:\n{log.read_text()[-6000:]}")
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
    output = log.read_text()
    assert returncode == 0, output[-6000:]
    stopped_at = re.findall(r"generation cancelled after step (\d+) of 100", output)
    assert len(stopped_at) == 2 and stopped_at[0] == stopped_at[1], output[-6000:]  # both processes, the same step
    assert int(stopped_at[0]) < 50  # at once, not after the generation
    assert "rank 0 stopped the server" in output  # the follower's last words
    assert "fell out of step" not in output

    single = single_process_videos(models, requests, tmp_path, monkeypatch)
    for path, expected in zip(saved, single):
        split = torch.load(path.with_suffix(".pt"))
        assert split.shape == expected.shape
        assert (split - expected).abs().max().item() <= 1e-5, path.name
    settings = json.loads(saved[1].with_suffix(".json").read_text())
    assert (settings["model"], settings["ulysses_degree"], settings["sampler"]) == ("demo", 2, "DPM++")
    assert settings["transformer_evaluations"] < 6  # the step cache did skip steps, on both processes alike


# ------------------------------------------------------------------------------------------------ without processes
@pytest.mark.parametrize("world, flags, message", [
    (1, ["--ulysses-degree", "2"], "launch it with torchrun --nproc_per_node 2"),
    (2, [], "2 processes were launched but --ulysses-degree 1 x --ring-degree 1 = 1"),
    (2, ["--ulysses-degree", "2", "--compile"], "--compile does not work with sequence parallelism"),
    (2, ["--ulysses-degree", "2", "--ui-mode", "remote", "--remote-url", "http://gpu-box:7860"],
     "--ui-mode remote generates on another server"),
    (2, ["--ring-degree", "2"], "ring attention .* needs CUDA GPUs"),
])
def test_app_refuses_wrong_degrees_before_anything_connects_or_loads(monkeypatch, tmp_path, world, flags, message):
    from easyanimate.inference.distributed import ControlChannel
    from easyanimate.ui import app

    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setattr(ControlChannel, "connect", lambda *a, **k: pytest.fail("the processes were connected"))
    monkeypatch.setattr(app, "launch", lambda *a, **k: pytest.fail("the server was started"))
    with pytest.raises(SystemExit, match=message):
        app.main(["--models-dir", str(tmp_path / "models"), *flags])


def test_help_explains_the_launch(capsys):
    from easyanimate.ui.app import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "torchrun --nproc_per_node N app.py --ulysses-degree N [--ring-degree R]" in text
    assert "rank 0 serves the page" in text and "One machine only" in text


def test_a_process_that_generates_can_be_cancelled_at_a_step(tmp_path):
    """Studio.generate's ``cancelled`` stops the generation at the step where it turns true (one process; across
    processes the same hook's decision is agreed, tested above through Ctrl-C); the next generation runs."""
    from easyanimate.ui.generation import GenerationCancelled

    folders = SimpleNamespace(models=tmp_path / "models", loras=tmp_path / "loras", out=tmp_path / "samples")
    (folders.models / "model-a").mkdir(parents=True)
    (folders.models / "model-a" / "model_index.json").write_text("{}")
    studio, _ = make_studio(folders)
    steps = []
    with pytest.raises(GenerationCancelled, match="cancelled after step 3 of 10"):
        studio.generate(page_request(generate_values("model-a", steps=10)),
                        on_step=lambda done, total: steps.append(done), cancelled=lambda: len(steps) >= 3)
    assert steps == [1, 2, 3] and not list(studio.output.root.glob("*.mp4"))
    assert studio.generate(page_request(generate_values("model-a", steps=2))).path.is_file()
    studio.close()
    with pytest.raises(Exception, match="stopped generating"):
        studio.generate(page_request(generate_values("model-a", steps=2)))


def test_a_failed_collective_stops_the_server_for_good(tmp_path, monkeypatch):
    """When the processes fall out of step (ProcessesOutOfStep from the channel), rank 0's Studio refuses every later
    job with the reason, the serving loop ends (main then exits with it), and no stop message is sent."""
    from easyanimate.inference.distributed import ProcessesOutOfStep
    from easyanimate.ui.app import serve_until_stopped

    class BrokenChannel:
        """Rank 0's channel in a launch whose collective has just failed."""
        ulysses_degree, ring_degree, rank, is_leader = 2, 1, 0, True
        shared = []

        def share(self, message=None):
            self.shared.append(message)

        def run_together(self, action):
            raise ProcessesOutOfStep("the processes of this launch fell out of step: process 1: RuntimeError: lost")

    monkeypatch.setenv("WORLD_SIZE", "2")
    folders = SimpleNamespace(models=tmp_path / "models", loras=tmp_path / "loras", out=tmp_path / "samples")
    (folders.models / "model-a").mkdir(parents=True)
    (folders.models / "model-a" / "model_index.json").write_text("{}")
    studio = Studio(folders.models, folders.loras, folders.out, load_pipeline=lambda *a: None,
                    channel=BrokenChannel())
    with pytest.raises(ProcessesOutOfStep):
        studio.generate(page_request(generate_values("model-a")))
    assert studio.stopped.is_set() and "fell out of step: process 1" in studio.stop_reason
    with pytest.raises(Exception, match="stopped generating: the processes of this launch fell out of step"):
        studio.generate(page_request(generate_values("model-a")))
    closed = []
    serve_until_stopped(SimpleNamespace(is_running=True, close=lambda: closed.append(True)), studio)
    assert closed == [True]
    assert len(BrokenChannel.shared) == 1  # the one job; no stop message to processes out of step
