"""The ComfyUI nodes (``comfyui/``) inside a real ComfyUI server.

The server is the ComfyUI source snapshot in ``shared/vendor/comfyui/`` (see its README), unpacked into a temporary
folder with our nodes linked into ``custom_nodes/EasyAnimate`` and the demo model into ``models/EasyAnimate/``, and
started on 127.0.0.1 with ``--cpu``. The shipped workflows (``comfyui/workflows/*.json``, ComfyUI's UI format) are
turned into API prompts with the server's own ``/object_info`` and submitted through ``POST /prompt``; their videos
are written by ComfyUI's own CreateVideo -> SaveVideo nodes and checked on disk.

Skipped with the reason where the snapshot or ComfyUI's extra requirements are missing
(``scripts/install_comfyui_test_deps.sh`` installs them; ``.ci/run`` calls it).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EASYANIMATE_SHARED", REPO.parent / "shared"))  # as tests/conftest.py finds it

SNAPSHOT_DIR = SHARED / "vendor" / "comfyui"
WORKFLOWS = REPO / "comfyui" / "workflows"
DEMO = REPO / "models" / "EasyAnimateV4-demo"
START_IMAGE = REPO / "easyanimate" / "assets" / "templates" / "1.png"  # a red circle with room to move right
# What ComfyUI needs beyond this project's requirements (import names), installed by the script named above.
COMFYUI_PACKAGES = ("aiohttp", "av", "comfyui_frontend_package", "requests", "scipy", "torchsde", "yarl")
STANDIN_ENV = "EASYANIMATE_TEST_TORCHVISION_STANDIN"
START_TIMEOUT = 180  # seconds until the server answers (~10 s on these machines)
PROMPT_TIMEOUT = 300  # seconds for one prompt (the first loads the model)

# The registry's torchvision cannot load beside the CPU torch, but ComfyUI's core imports it at start (only a few
# built-in nodes use it). An importable stand-in on PYTHONPATH lets the server start (see the vendor README).
TORCHVISION_STANDIN = {
    "torchvision/__init__.py": '"""Test stand-in: importable, nothing works."""\nfrom . import transforms\n',
    "torchvision/transforms/__init__.py": "",
}
# ...but transformers takes an importable torchvision for a working one and then needs its API. This single-file
# "custom node" runs after ComfyUI's core has imported the stand-in and before any prompt: it hides the stand-in
# again and drops the availability answers transformers cached meanwhile, so our nodes run as in the project's own
# environment, which has no torchvision.
HIDE_STANDIN_NODE = '''"""Test infrastructure written by tests/test_comfyui.py: hide the torchvision stand-in again."""
import importlib, os, sys

standin = os.path.realpath(os.environ["%s"])
sys.path[:] = [p for p in sys.path if os.path.realpath(p) != standin]
for name in [n for n in sys.modules if n.split(".")[0] == "torchvision"]:
    del sys.modules[name]
importlib.invalidate_caches()
import transformers.utils.import_utils as availability
for value in list(vars(availability).values()):
    if hasattr(value, "cache_clear"):
        value.cache_clear()
NODE_CLASS_MAPPINGS = {}
''' % STANDIN_ENV


def _snapshot() -> Path:
    snapshots = sorted(SNAPSHOT_DIR.glob("ComfyUI-*.tar.gz"))
    if not snapshots:
        pytest.skip(f"no ComfyUI snapshot in {SNAPSHOT_DIR} (set EASYANIMATE_SHARED to the shared/ folder)")
    missing = [name for name in COMFYUI_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"ComfyUI's requirements are not installed (missing {', '.join(missing)}): run "
                    "scripts/install_comfyui_test_deps.sh")
    return snapshots[-1]


# ---------------------------------------------------------------------------- without a server (always run)
def _frames_module():
    """``comfyui/frames.py`` alone (the package's ``__init__`` needs ComfyUI)."""
    spec = importlib.util.spec_from_file_location("easyanimate_comfyui_frames", REPO / "comfyui" / "frames.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_image_batches_become_the_requests_images_and_videos_and_back():
    frames = _frames_module()
    batch = torch.rand(5, 32, 48, 3)
    assert frames.images_to_pil(batch[:1]).size == (48, 32)  # one image: kept on the first frames
    assert [image.size for image in frames.images_to_pil(batch[:2])] == [(48, 32)] * 2  # several: that many frames
    video = frames.images_to_video(batch)
    assert video.shape == (3, 5, 32, 48) and torch.equal(video[:, 2], batch[2].permute(2, 0, 1))
    assert torch.equal(frames.video_to_images(video[None]), batch)
    with pytest.raises(ValueError, match=r"\[frames, height, width, 3\]"):
        frames.images_to_video(torch.rand(5, 3, 32, 48))


def test_an_in_memory_video_of_another_size_is_resized_to_the_request():
    from easyanimate.inference import GenerationRequest, LocalFiles, RequestError, prepare

    video = torch.rand(3, 24, 96, 80)
    request = GenerationRequest(kind="Video to Video", video=video, width=64, height=48, frames=16)
    prepared = prepare(request, LocalFiles())
    assert prepared.video.shape == (1, 3, 16, 48, 64) and 0 <= prepared.video.min() <= prepared.video.max() <= 1
    with pytest.raises(RequestError, match="input video tensor must be"):
        prepare(request.replace(video=video.permute(1, 2, 3, 0)), LocalFiles())


# ------------------------------------------------------------------------------------------------- the server
@dataclass
class ComfyServer:
    """A running ComfyUI server: its address, its folder and its log."""

    url: str
    root: Path
    process: subprocess.Popen
    log: Path

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as reply:
            return json.loads(reply.read())

    def post(self, path: str, payload: dict):
        request = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as reply:
                return json.loads(reply.read() or b"{}")
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"POST {path} answered {exc.code}: {exc.read().decode(errors='replace')}") from exc

    def run(self, prompt: dict, timeout: float = PROMPT_TIMEOUT) -> dict:
        """Submit an API-format prompt and wait for its history entry (outputs and status)."""
        prompt_id = self.post("/prompt", {"prompt": prompt})["prompt_id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry is not None and (entry["status"]["completed"] or entry["status"]["status_str"] == "error"):
                return entry
            assert self.process.poll() is None, f"the server died:\n{self.log_tail()}"
            time.sleep(0.5)
        raise AssertionError(f"prompt {prompt_id} did not finish in {timeout} s:\n{self.log_tail()}")

    def run_ok(self, prompt: dict) -> dict:
        entry = self.run(prompt)
        assert entry["status"]["status_str"] == "success", f"{error_of(entry)}\n{self.log_tail()}"
        return entry

    def output_file(self, entry: dict, node_id: str) -> Path:
        """The file an output node (SaveVideo, SaveImage) of the prompt wrote."""
        (saved,) = entry["outputs"][node_id]["images"]
        assert saved["type"] == "output"
        return self.root / "output" / saved["subfolder"] / saved["filename"]


def error_of(entry: dict) -> dict:
    """The execution_error message of a history entry ({} when there is none)."""
    return next((data for kind, data in entry["status"]["messages"] if kind == "execution_error"), {})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _unpack(snapshot: Path, into: Path) -> Path:
    with tarfile.open(snapshot) as archive:
        if hasattr(tarfile, "data_filter"):
            archive.extractall(into, filter="data")
        else:  # Python without extraction filters: the snapshot is our own shared file
            archive.extractall(into)
    return into / "ComfyUI"


def _write_files(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def _install(root: Path) -> None:
    """Our nodes, the demo model, a folder that is not a V4 model, two LoRAs and the workflows' input files."""
    (root / "custom_nodes" / "EasyAnimate").symlink_to(REPO / "comfyui", target_is_directory=True)
    (root / "custom_nodes" / "easyanimate_test_hide_torchvision_standin.py").write_text(HIDE_STANDIN_NODE)
    models = root / "models" / "EasyAnimate"
    models.mkdir(parents=True)
    (models / DEMO.name).symlink_to(DEMO, target_is_directory=True)
    (models / "NotAV4Model").mkdir()
    (models / "NotAV4Model" / "model_index.json").write_text('{"_class_name": "SomethingElse"}')
    _write_loras(root / "models" / "loras")
    shutil.copy(START_IMAGE, root / "input" / "easyanimate-demo-start.png")
    _write_input_video(root / "input" / "easyanimate-demo-input.mp4")


def _write_loras(folder: Path) -> None:
    """``easyanimate-zero.safetensors`` fits the demo's first attention query (and changes nothing);
    ``easyanimate-misfit.safetensors`` names a layer the model does not have."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(DEMO / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as weights:
        out_features, in_features = weights.get_slice("blocks.0.attn1.to_q.weight").get_shape()
    layer = "lora_unet__blocks_0_attn1_to_q"
    folder.mkdir(parents=True, exist_ok=True)
    save_file({f"{layer}.lora_down.weight": torch.randn(2, in_features),
               f"{layer}.lora_up.weight": torch.zeros(out_features, 2)}, str(folder / "easyanimate-zero.safetensors"))
    save_file({"lora_unet__no_such_layer.lora_down.weight": torch.randn(2, 8),
               "lora_unet__no_such_layer.lora_up.weight": torch.zeros(8, 2)},
              str(folder / "easyanimate-misfit.safetensors"))


def _write_input_video(path: Path) -> None:
    """24 frames of a demo-world clip at 96 x 96 (the workflows generate 64 x 64 from its first 16)."""
    from easyanimate.demo.shapes import random_clip, render_clip
    from easyanimate.utils.video_io import save_video

    frames = render_clip(random_clip("red", "circle", "right", 96, 96, np.random.default_rng(0), num_frames=24))
    save_video(torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 255, path, fps=24)


def _wait_until_serving(server: ComfyServer) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise AssertionError(f"ComfyUI exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            nodes = server.get("/object_info/EasyAnimateLoadModel")
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
            continue
        assert nodes, f"ComfyUI started without the EasyAnimate nodes:\n{server.log_tail()}"
        return
    raise AssertionError(f"ComfyUI did not answer within {START_TIMEOUT} s:\n{server.log_tail()}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A ComfyUI server with our nodes and the demo model; stopped at the end, also when a test fails."""
    snapshot = _snapshot()
    work = tmp_path_factory.mktemp("comfyui")
    root = _unpack(snapshot, work)
    _write_files(work / "standin", TORCHVISION_STANDIN)
    _install(root)
    port = _free_port()
    log = work / "server.log"
    env = {**os.environ, "PYTHONPATH": str(work / "standin"), STANDIN_ENV: str(work / "standin")}
    command = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
               "--disable-auto-launch", "--disable-api-nodes"]
    with open(log, "wb") as log_file:
        process = subprocess.Popen(command, cwd=root, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
    running = ComfyServer(f"http://127.0.0.1:{port}", root, process, log)
    try:
        _wait_until_serving(running)
        yield running
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=20)


# ------------------------------------------------------------------------------------------------ workflows
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def to_api(workflow: dict, object_info: dict) -> dict:
    """A UI-format workflow (what ComfyUI's page saves and loads) as an API prompt, read the way the page reads it:
    each node's inputs in the server's ``input_order``; a linked input takes its link, a widget the next of the
    node's ``widgets_values`` (a seed with ``control_after_generate`` is followed by that control's value, an
    upload button by its own). Values left over or missing mean the workflow no longer matches the nodes."""
    links = {link[0]: [str(link[1]), link[2]] for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        info = object_info[node["type"]]
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values", []))
        inputs = {}
        for section in ("required", "optional"):
            for name in info["input_order"].get(section, []):
                kind, options = (info["input"][section][name] + [{}])[:2]
                if name in linked:
                    inputs[name] = linked[name]
                elif isinstance(kind, list) or kind in WIDGET_TYPES:
                    assert values, f"{node['type']} (node {node['id']}): no widget value for {name}"
                    inputs[name] = values.pop(0)
                    followers = ("control_after_generate", "image_upload", "video_upload")  # widgets of their own
                    del values[:sum(bool(options.get(key)) for key in followers)]
        assert not values, f"{node['type']} (node {node['id']}): widget values {values} match no input"
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def workflow_prompt(server: ComfyServer, name: str) -> dict:
    workflow = json.loads((WORKFLOWS / name).read_text())
    return to_api(workflow, server.get("/object_info"))


def node_of(prompt: dict, class_type: str) -> tuple[str, dict]:
    (found,) = [(node_id, node) for node_id, node in prompt.items() if node["class_type"] == class_type]
    return found


def read_result(path: Path) -> torch.Tensor:
    from easyanimate.utils.video_io import read_video

    assert path.is_file(), f"no result at {path}"
    return read_video(path)  # (3, F, H, W)


# -------------------------------------------------------------------------------------------------- tests
@pytest.mark.slow
def test_text_to_video_workflow_draws_the_prompt(server):
    from easyanimate.demo.judge import judge_frames
    from easyanimate.inference import read_model_defaults

    prompt = workflow_prompt(server, "easyanimate_t2v.json")
    _, sampler = node_of(prompt, "EasyAnimateTextToVideo")
    demo = read_model_defaults(DEMO)  # the workflow carries the demo's recommended settings
    assert {k: sampler["inputs"][k] for k in ("prompt", "negative_prompt", "steps", "cfg", "width", "height",
                                              "frames")} == {
        "prompt": demo.prompt, "negative_prompt": demo.negative_prompt, "steps": demo.steps,
        "cfg": demo.guidance_scale, "width": demo.width, "height": demo.height, "frames": demo.frames}
    entry = server.run_ok(prompt)
    video = read_result(server.output_file(entry, node_of(prompt, "SaveVideo")[0]))
    assert video.shape == (3, 16, 64, 64)
    verdict = judge_frames(video)
    assert (verdict.color, verdict.shape) == ("red", "circle"), f"{demo.prompt!r} drawn as {verdict}"


@pytest.mark.slow
def test_image_to_video_workflow_starts_from_the_image(server):
    from easyanimate.demo.judge import judge_frames

    prompt = workflow_prompt(server, "easyanimate_i2v.json")
    assert node_of(prompt, "LoadImage")[1]["inputs"]["image"] == "easyanimate-demo-start.png"
    entry = server.run_ok(prompt)
    video = read_result(server.output_file(entry, node_of(prompt, "SaveVideo")[0]))
    assert video.shape == (3, 16, 64, 64)
    assert judge_frames(video).color == "red"  # the start image's circle


@pytest.mark.slow
def test_video_to_video_workflow_redraws_a_video_of_another_size(server):
    from easyanimate.demo.judge import judge_frames

    prompt = workflow_prompt(server, "easyanimate_v2v.json")
    assert node_of(prompt, "LoadVideo")[1]["inputs"]["file"] == "easyanimate-demo-input.mp4"  # 24 frames, 96 x 96
    assert "blue" in node_of(prompt, "EasyAnimateVideoToVideo")[1]["inputs"]["prompt"]  # the input's circle is red
    entry = server.run_ok(prompt)
    video = read_result(server.output_file(entry, node_of(prompt, "SaveVideo")[0]))
    assert video.shape == (3, 16, 64, 64)
    assert judge_frames(video).color == "blue"


@pytest.mark.slow
def test_long_video_continues_chunks_between_start_and_end_images(server):
    prompt = workflow_prompt(server, "easyanimate_i2v.json")
    sampler_id, sampler = node_of(prompt, "EasyAnimateImageToVideo")
    sampler["class_type"] = "EasyAnimateLongVideo"
    sampler["inputs"].update(frames=24, chunk_frames=16, overlap_frames=4, steps=5,  # two passes of 16 frames
                             end_image=sampler["inputs"]["start_image"])
    entry = server.run_ok(prompt)
    video = read_result(server.output_file(entry, node_of(prompt, "SaveVideo")[0]))
    assert video.shape == (3, 24, 64, 64)


def _settings_lora_image_prompt(lora: str) -> dict:
    """Text to image (1 frame) with a LoRA and the step cache, its settings linked from the model's Recommended
    Settings node, saved by ComfyUI's SaveImage."""
    return {
        "1": {"class_type": "EasyAnimateLoadModel",
              "inputs": {"model": DEMO.name, "memory_mode": "model_cpu_offload", "precision": "auto"}},
        "2": {"class_type": "EasyAnimateLoadLoRA", "inputs": {"model": ["1", 0], "lora_name": lora, "strength": 1.0}},
        "3": {"class_type": "EasyAnimateRecommendedSettings", "inputs": {"model": ["1", 0]}},
        "4": {"class_type": "EasyAnimateTextToVideo", "inputs": {
            "model": ["2", 0], "prompt": ["3", 0], "negative_prompt": ["3", 1], "sampler_name": "DDIM",
            "steps": 5, "cfg": ["3", 3], "seed": 1, "width": ["3", 4], "height": ["3", 5], "frames": 1,
            "step_cache": 0.1}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "EasyAnimate-t2i"}},
    }


@pytest.mark.slow
def test_recommended_settings_lora_and_step_cache_in_text_to_image(server):
    from PIL import Image

    entry = server.run_ok(_settings_lora_image_prompt("easyanimate-zero.safetensors"))
    with Image.open(server.output_file(entry, "5")) as image:
        assert image.size == (64, 64)  # the demo's recommended size, from its generation_defaults.json


def _with(prompt: dict, class_type: str, **inputs) -> dict:
    prompt = json.loads(json.dumps(prompt))
    node_of(prompt, class_type)[1]["inputs"].update(inputs)
    return prompt


@pytest.mark.slow
def test_bad_inputs_are_errors_and_the_server_keeps_serving(server):
    t2v = workflow_prompt(server, "easyanimate_t2v.json")
    v2v = workflow_prompt(server, "easyanimate_v2v.json")
    cases = {
        "width must be a positive multiple of 16, got 72": _with(t2v, "EasyAnimateTextToVideo", width=72),
        "frames must be 1 or a multiple of 8, got 12": _with(t2v, "EasyAnimateTextToVideo", frames=12),
        "is not an EasyAnimate V4 model folder: missing": _with(t2v, "EasyAnimateLoadModel", model="NotAV4Model"),
        "does not fit this model": _settings_lora_image_prompt("easyanimate-misfit.safetensors"),
        "the input video has 24 frames, fewer than the 32 requested": _with(v2v, "EasyAnimateVideoToVideo",
                                                                            frames=32),
    }
    for message, prompt in cases.items():
        entry = server.run(prompt)
        error = error_of(entry)
        assert entry["status"]["status_str"] == "error" and message in error.get("exception_message", ""), (
            f"expected an error with {message!r}, got {error or entry['status']}")
    assert server.get("/system_stats")["system"]  # still answering...
    server.run_ok(_with(t2v, "EasyAnimateTextToVideo", frames=1, steps=2))  # ...and still generating


async def _interrupt_while_sampling(server: ComfyServer, prompt: dict, timeout: float) -> tuple[dict, float]:
    """Submit ``prompt``, wait for its first progress message, interrupt, and wait until the server reports the
    prompt interrupted. Returns that progress message's data and the seconds from interrupt to report."""
    import aiohttp

    client_id = uuid.uuid4().hex

    async def next_message(ws, wanted) -> dict:
        while True:
            message = await ws.receive()
            if message.type == aiohttp.WSMsgType.TEXT and wanted(data := json.loads(message.data)):
                return data["data"]
            assert message.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY), f"websocket: {message}"

    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{server.url}/ws?clientId={client_id}") as ws:
            async with session.post(f"{server.url}/prompt", json={"prompt": prompt, "client_id": client_id}) as reply:
                answer = await reply.json()
                assert "prompt_id" in answer, f"prompt refused: {answer}"
                prompt_id = answer["prompt_id"]

            def ours(kind: str):
                return lambda message: message["type"] == kind and message["data"].get("prompt_id") == prompt_id

            progress = await asyncio.wait_for(next_message(ws, ours("progress")), timeout)
            interrupted = time.monotonic()
            async with session.post(f"{server.url}/interrupt", json={}) as reply:
                assert reply.status == 200
            await asyncio.wait_for(next_message(ws, ours("execution_interrupted")), timeout)
            return progress, time.monotonic() - interrupted


@pytest.mark.slow
def test_progress_bar_follows_the_steps_and_cancel_stops_sampling(server):
    steps = 1000  # minutes of sampling unless the interrupt reaches the sampling loop
    prompt = _with(workflow_prompt(server, "easyanimate_t2v.json"), "EasyAnimateTextToVideo", steps=steps, seed=7)
    progress, seconds = asyncio.run(_interrupt_while_sampling(server, prompt, timeout=PROMPT_TIMEOUT))
    assert progress["max"] == steps and progress["value"] >= 1
    assert seconds < 30, f"sampling went on for {seconds:.0f} s after the interrupt"
    deadline = time.monotonic() + 30
    while server.get("/queue")["queue_running"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert server.get("/queue")["queue_running"] == [], "the interrupted prompt is still running"
