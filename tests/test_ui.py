"""The web UI: path confinement, upload checks, settings validation, one-at-a-time generation, and the Gradio API
driven with gradio_client against a server on a free local port.

The concurrency and race tests use a stand-in pipeline whose speed they control; the API tests use the real tiny
model folder (``tiny_model_dir``) and the real pipeline.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from easyanimate.data.buckets import ASPECT_RATIO_512
from easyanimate.inference import check_request
from easyanimate.ui.generation import (
    PAGE_LIMITS,
    IMAGE_TO_VIDEO,
    LONG_VIDEO,
    SAMPLERS,
    TEXT_TO_IMAGE,
    TEXT_TO_VIDEO,
    VIDEO_TO_VIDEO,
    GenerationSettings,
    HostedLimits,
    Studio,
    reference_size,
)
from easyanimate.ui.safety import (
    RefusedError,
    UploadLimits,
    check_video_upload,
    list_model_folders,
    list_safetensors_files,
    open_image_upload,
    resolve_model_folder,
    resolve_safetensors_file,
)
from easyanimate.utils.video_io import save_video


# --------------------------------------------------------------------------------------------------------------
# helpers


def make_model_folder(path: Path) -> Path:
    """A folder that looks like a model folder to the listing (the stand-in pipeline reads nothing else)."""
    path.mkdir(parents=True)
    (path / "model_index.json").write_text("{}")
    return path


def write_test_video(path: Path, frames: int = 8, height: int = 64, width: int = 96) -> Path:
    """A smooth moving-gradient clip (smooth so that mp4 compression keeps it close to the source)."""
    t = torch.linspace(0, 1, frames)[:, None, None]
    y = torch.linspace(0, 1, height)[None, :, None]
    x = torch.linspace(0, 1, width)[None, None, :]
    shape = (frames, height, width)
    video = torch.stack([((x + t) % 1).expand(shape), y.expand(shape), (x * y + 0.5 * t).clamp(0, 1)])
    return save_video(video, path, fps=8)


def write_test_image(path: Path, height: int = 64, width: int = 96) -> Path:
    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.stack([xx * 255 // width, yy * 255 // height, np.full_like(xx, 128)], -1).astype(np.uint8)
    Image.fromarray(rgb).save(path)
    return path


class StandInPipeline:
    """Test double with the pipeline's interface: records what it was asked, sleeps ``delay`` per step, and
    returns frames of the requested shape in random flat colours drawn from the given generator. ``peak`` counts
    how many runs (of any instance) were ever sampling at the same time."""

    running = 0
    peak = 0
    counter_lock = threading.Lock()

    def __init__(self, folder: Path, delay: float = 0.0):
        self.folder = folder
        self.delay = delay
        self.is_inpaint = True  # takes start and end images
        self.sampler = "Euler"
        self.lora = None
        self.calls = []

    def set_sampler(self, name):
        if name not in SAMPLERS:
            raise ValueError(name)
        self.sampler = name

    def load_lora(self, path, strength):
        self.lora = (Path(path), strength)

    def unload_lora(self):
        self.lora = None

    def _sample(self, kwargs, frames):
        self.calls.append({**kwargs, "lora": self.lora, "sampler": self.sampler})
        with self.counter_lock:
            StandInPipeline.running += 1
            StandInPipeline.peak = max(StandInPipeline.peak, StandInPipeline.running)
        try:
            for step in range(kwargs["num_inference_steps"]):
                time.sleep(self.delay)
                kwargs["callback_on_step_end"](self, step, 1000 - step, {})
        finally:
            with self.counter_lock:
                StandInPipeline.running -= 1
        self.finished = time.monotonic()
        colours = torch.rand((1, 3, frames, 1, 1), generator=kwargs["generator"])  # flat frames encode fast
        return SimpleNamespace(videos=colours.expand(-1, -1, -1, kwargs["height"], kwargs["width"]))

    def __call__(self, video_length, **kwargs):
        if kwargs.get("prompt") == "fail":
            raise RuntimeError("stand-in failure")
        return self._sample(kwargs, video_length)

    def generate_long_video(self, video_length, chunk_length, overlap, **kwargs):
        return self._sample(kwargs, video_length)


@pytest.fixture
def folders(tmp_path):
    models, loras, outside = tmp_path / "models", tmp_path / "loras", tmp_path / "outside"
    make_model_folder(models / "model-a")
    make_model_folder(models / "model-b")
    make_model_folder(outside / "secret-model")
    (models / "not-a-model").mkdir()
    make_model_folder(models / ".hidden")
    os.symlink(outside / "secret-model", models / "escape")  # a link that leaves the models folder
    (loras / "styles").mkdir(parents=True)
    (loras / "style.safetensors").write_bytes(b"x")
    (loras / "styles" / "ink.safetensors").write_bytes(b"x")
    (loras / "pickled.ckpt").write_bytes(b"x")
    (outside / "evil.safetensors").write_bytes(b"x")
    os.symlink(outside / "evil.safetensors", loras / "linked.safetensors")
    (models / "transformer_weights").mkdir()
    (models / "transformer_weights" / "finetuned.safetensors").write_bytes(b"x")
    os.symlink(outside / "evil.safetensors", models / "transformer_weights" / "linked.safetensors")
    return SimpleNamespace(models=models, loras=loras, outside=outside, out=tmp_path / "samples")


# --------------------------------------------------------------------------------------------------------------
# safety layer


def test_model_and_lora_choices_stay_inside_their_folders(folders):
    assert list_model_folders(folders.models) == ["model-a", "model-b"]
    assert list_safetensors_files(folders.loras) == ["style.safetensors", "styles/ink.safetensors"]
    assert resolve_model_folder(folders.models, "model-a") == (folders.models / "model-a").resolve()
    ink = folders.loras / "styles" / "ink.safetensors"
    assert resolve_safetensors_file(folders.loras, "styles/ink.safetensors") == ink.resolve()
    assert resolve_safetensors_file(folders.loras, "none") is None
    bad_models = ["escape", "../outside/secret-model", str(folders.outside / "secret-model"), "not-a-model", "", None]
    for name in bad_models:
        with pytest.raises(RefusedError, match="model"):
            resolve_model_folder(folders.models, name)
    for name in ["linked.safetensors", "../outside/evil.safetensors", str(folders.outside / "evil.safetensors"),
                 "pickled.ckpt", "styles/../../outside/evil.safetensors"]:
        with pytest.raises(RefusedError, match="not one of the .safetensors files"):
            resolve_safetensors_file(folders.loras, name)


def test_uploads_are_checked_for_type_size_and_content(tmp_path):
    limits = UploadLimits(max_bytes=200_000, max_side=256, max_video_frames=16)
    image = write_test_image(tmp_path / "start.png")
    assert open_image_upload(image, limits).size == (96, 64)
    (tmp_path / "fake.png").write_bytes(b"not an image at all")
    with pytest.raises(RefusedError, match="not a readable image"):
        open_image_upload(tmp_path / "fake.png", limits)
    with pytest.raises(RefusedError, match="must be one of"):
        open_image_upload(tmp_path / "start.exe", limits)
    write_test_image(tmp_path / "huge.png", height=300, width=40)
    with pytest.raises(RefusedError, match="largest side"):
        open_image_upload(tmp_path / "huge.png", limits)
    (tmp_path / "big.png").write_bytes(b"\0" * 200_001)
    with pytest.raises(RefusedError, match="MiB"):
        open_image_upload(tmp_path / "big.png", limits)

    video = write_test_video(tmp_path / "clip.mp4", frames=8)
    assert check_video_upload(video, limits) == (8, 64, 96)
    (tmp_path / "broken.mp4").write_bytes(b"\0" * 1000)
    with pytest.raises(RefusedError, match="not a readable video"):
        check_video_upload(tmp_path / "broken.mp4", limits)
    long_clip = write_test_video(tmp_path / "long.mp4", frames=24)
    with pytest.raises(RefusedError, match="24 frames"):
        check_video_upload(long_clip, limits)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(width=100), "width must be between 16 and 2048 and a multiple of 16"),
        (dict(frames=12), "frame count"),
        (dict(frames=152), "frame count"),
        (dict(sampler="Heun"), "unknown sampler"),
        (dict(kind="Sound to Video"), "unknown generation kind"),
        (dict(kind=IMAGE_TO_VIDEO), "needs a start image"),
        (dict(kind=IMAGE_TO_VIDEO, end_image="end.png"), "needs a start image"),
        (dict(kind=VIDEO_TO_VIDEO), "needs an input video"),
        (dict(kind=VIDEO_TO_VIDEO, video="v.mp4", denoise_strength=1.5), "denoise strength"),
        (dict(kind=LONG_VIDEO, frames=2000), "frame count"),
        (dict(kind=LONG_VIDEO, overlap_frames=9), "overlap"),
        (dict(start_image="start.png"), "takes no start or end image"),
        (dict(kind=VIDEO_TO_VIDEO, video="v.mp4", end_image="end.png", start_image="s.png"), "takes no start"),
        (dict(kind=LONG_VIDEO, video="v.mp4"), "takes no input video"),
        (dict(resize_to_reference=True), "needs a start image or an input video"),
        (dict(steps=0), "sampling steps"),
    ],
)
def test_bad_settings_are_refused_with_the_reason(change, message):
    settings = GenerationSettings(model="m", width=64, height=64, frames=8, steps=2)
    check_request(settings, limits=PAGE_LIMITS)  # the base settings are fine
    with pytest.raises(RefusedError, match=message):
        check_request(GenerationSettings(**{**vars(settings), **change}), limits=PAGE_LIMITS)


def test_reference_size_picks_the_closest_bucket_floored_to_16():
    # A 1080p frame (ratio 0.5625) falls in the 0.57 bucket; the original's bucket table lists it as [384, 672] at base 512.
    assert reference_size(1080, 1920, 512) == tuple(ASPECT_RATIO_512[0.57]) == (384, 672)
    # At base 768 each side is scaled by 1.5 and floored to 16: 576, 1008.
    assert reference_size(1080, 1920, 768) == (576, 1008)
    # Portrait 2:3 -> ratio 1.5 -> bucket 1.46 [608, 416]; at 960: 1140 -> 1136, 780 -> 768.
    assert reference_size(900, 600, 960) == (1136, 768)


# --------------------------------------------------------------------------------------------------------------
# the studio: one generation at a time, results saved with their settings


def make_studio(folders, delay=0.0, hosted=None):
    loaded = []

    def load(folder, transformer_weights=None):
        loaded.append(folder.name if transformer_weights is None else (folder.name, transformer_weights.name))
        load_times.append(time.monotonic())
        return StandInPipeline(folder, delay)

    load_times = []
    studio = Studio(folders.models, folders.loras, folders.out, load_pipeline=load, hosted=hosted)
    studio.load_times = load_times
    return studio, loaded


def test_results_are_saved_with_their_settings(folders, tmp_path):
    studio, loaded = make_studio(folders)
    progress = []
    result = studio.generate(
        GenerationSettings(model="model-a", width=96, height=64, frames=8, steps=3, seed=-1, lora="style.safetensors",
                           lora_strength=0.8),
        on_step=lambda done, total: progress.append((done, total)),
    )
    assert progress == [(1, 3), (2, 3), (3, 3)]
    assert result.path.parent == folders.out.resolve() and result.path.suffix == ".mp4"
    saved = json.loads(result.settings_path.read_text())
    assert saved == result.settings
    assert saved["output"] == result.path.name and saved["lora"] == "style.safetensors"
    assert 1 <= saved["seed"] <= 10**8  # -1 became a concrete, recorded seed
    pipe = studio._pipe
    assert pipe.calls[0]["lora"] == ((folders.loras / "style.safetensors").resolve(), 0.8)
    assert pipe.lora is None  # unloaded after the generation

    from easyanimate.utils.video_io import read_video

    video = read_video(result.path)
    assert video.shape == (3, 8, 64, 96)
    # the same recorded seed reproduces the same frames
    again = studio.generate(GenerationSettings(**{**vars(GenerationSettings(model="model-a")), **{
        k: saved[k] for k in ("width", "height", "frames", "steps", "seed", "lora", "lora_strength")}}))
    assert torch.equal(read_video(again.path), video)
    assert again.path != result.path and loaded == ["model-a"]  # no reload for the same model

    image = studio.generate(GenerationSettings(model="model-a", kind=TEXT_TO_IMAGE, width=64, height=64, steps=1))
    assert image.is_image and image.path.suffix == ".png"
    assert Image.open(image.path).size == (64, 64)
    assert json.loads(image.settings_path.read_text())["frames"] == 1

    with pytest.raises(RuntimeError, match="stand-in failure"):
        studio.generate(GenerationSettings(model="model-a", prompt="fail", lora="style.safetensors", width=64,
                                           height=64, frames=8, steps=1))
    assert pipe.lora is None  # unloaded on failure too


def test_inputs_reach_the_pipeline_for_each_kind(folders, tmp_path):
    studio, _ = make_studio(folders)
    start = write_test_image(tmp_path / "start.png", height=90, width=160)
    clip = write_test_video(tmp_path / "clip.mp4", frames=16, height=64, width=96)
    base = dict(model="model-a", width=64, height=64, frames=8, steps=2)

    studio.generate(GenerationSettings(**base, kind=IMAGE_TO_VIDEO, start_image=str(start), end_image=str(start)))
    call = studio._pipe.calls[-1]
    assert call["image"].size == (160, 90) and call["end_image"].size == (160, 90)

    result = studio.generate(GenerationSettings(**base, kind=VIDEO_TO_VIDEO, video=str(clip), denoise_strength=0.5))
    call = studio._pipe.calls[-1]
    assert call["video"].shape == (1, 3, 8, 64, 64) and call["strength"] == 0.5
    assert result.settings["video"] == "clip.mp4"  # the upload's name, not a server path

    # resize to the reference: a 16:9 image at base 512 -> bucket 0.57 -> 384 x 672
    studio.generate(GenerationSettings(**base, kind=IMAGE_TO_VIDEO, start_image=str(start), resize_to_reference=True))
    assert (studio._pipe.calls[-1]["height"], studio._pipe.calls[-1]["width"]) == (384, 672)

    with pytest.raises(RefusedError, match="input video has 16 frames"):
        studio.generate(GenerationSettings(**{**base, "frames": 24}, kind=VIDEO_TO_VIDEO, video=str(clip)))
    with pytest.raises(RefusedError, match="not one of the model folders"):
        studio.generate(GenerationSettings(**{**base, "model": "escape"}))


def test_model_switch_waits_for_the_running_generation(folders):
    studio, loaded = make_studio(folders, delay=0.05)
    studio.load_model("model-a")
    first_pipe = studio._pipe
    events = []

    def run():
        result = studio.generate(GenerationSettings(model="model-a", width=64, height=64, frames=8, steps=10))
        events.append(("generated", result.settings["model"]))

    worker = threading.Thread(target=run)
    worker.start()
    while not first_pipe.calls:  # the generation has started sampling
        time.sleep(0.005)
    studio.load_model("model-b")  # blocks until the generation has finished sampling
    worker.join()
    assert events == [("generated", "model-a")]
    assert studio.loaded_model == "model-b" and loaded == ["model-a", "model-b"]
    assert studio.load_times[1] >= first_pipe.finished  # model-b was loaded only after model-a's run ended
    assert len(first_pipe.calls) == 1 and studio._pipe is not first_pipe


# --------------------------------------------------------------------------------------------------------------
# the served app, driven through gradio_client


def test_command_line_defaults_are_local_and_safe():
    from easyanimate.ui.app import parse_args

    args = parse_args([])
    assert (args.host, args.port, args.share) == ("127.0.0.1", 7860, False)
    assert (args.models_dir, args.output_dir) == ("models", "samples")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve(studio: Studio, queue_size: int = 8):
    from easyanimate.ui.app import launch

    demo = launch(studio, host="127.0.0.1", port=free_port(), queue_size=queue_size, prevent_thread_lock=True)
    return demo


@pytest.fixture
def stand_in_server(folders):
    studio, _ = make_studio(folders, delay=0.02)
    StandInPipeline.peak = 0
    demo = serve(studio)
    yield demo, studio
    demo.close()


def api_kwargs(**change):
    settings = dict(
        model="model-a", lora="none", lora_strength=0.55, prompt="a red ball", negative_prompt="", kind=TEXT_TO_VIDEO,
        sampler="Euler", steps=2, width=64, height=64, frames=8, guidance_scale=6.0, seed=7,
        resize_to_reference=False, base_resolution=512, start_image=None, end_image=None, video=None,
        denoise_strength=0.7, partial_frames=8, overlap_frames=4,
    )
    settings.update(change)
    return settings


def test_server_refuses_paths_outside_the_allowed_folders_and_serves_concurrent_requests(stand_in_server, folders):
    from gradio_client import Client

    demo, studio = stand_in_server
    assert demo.local_url.startswith("http://127.0.0.1:")
    client = Client(demo.local_url, verbose=False)
    for change in [dict(model="escape"), dict(model="../outside/secret-model"),
                   dict(model=str(folders.outside / "secret-model")), dict(lora="../outside/evil.safetensors"),
                   dict(lora="linked.safetensors")]:
        with pytest.raises(Exception, match="not one of the"):
            client.predict(**api_kwargs(**change), api_name="/generate")
    with pytest.raises(Exception, match="not one of the model folders"):
        client.predict("../outside/secret-model", api_name="/load_model")

    # the reference-resize switch and its base resolution arrive intact through the API
    from gradio_client import handle_file

    start = write_test_image(folders.outside / "start.png", height=90, width=160)
    _, _, settings, _ = client.predict(**api_kwargs(kind=IMAGE_TO_VIDEO, start_image=handle_file(str(start)),
                                                    resize_to_reference=True, base_resolution=768, frames=8),
                                       api_name="/generate")
    assert (settings["height"], settings["width"]) == reference_size(90, 160, 768) == (576, 1008)

    jobs = [client.submit(**api_kwargs(seed=seed, model=f"model-{'ab'[seed % 2]}"), api_name="/generate")
            for seed in range(4)]
    results = [job.result(timeout=120) for job in jobs]
    assert sorted(r[2]["seed"] for r in results) == [0, 1, 2, 3]
    assert len({r[2]["output"] for r in results}) == 4
    assert len(list(studio.output.root.glob("*.mp4"))) == 5
    assert StandInPipeline.peak == 1  # never two generations at once


def test_server_reports_progress_and_bounds_its_queue(folders):
    from gradio_client import Client
    from gradio_client.utils import Status

    studio, _ = make_studio(folders, delay=0.1)
    demo = serve(studio, queue_size=1)
    try:
        client = Client(demo.local_url, verbose=False)

        def wait_for(job, condition, what):
            deadline = time.monotonic() + 60
            while not condition(job.status()):
                assert time.monotonic() < deadline, f"timed out waiting for {what}"
                time.sleep(0.02)

        def sampling(status):
            return bool(status.progress_data) and status.progress_data[0].desc == "Sampling"

        running = client.submit(**api_kwargs(seed=0, steps=20), api_name="/generate")
        wait_for(running, sampling, "the first request to start sampling")
        waiting = client.submit(**api_kwargs(seed=1, steps=1), api_name="/generate")
        wait_for(waiting, lambda status: status.code == Status.IN_QUEUE, "the second request to queue")
        # the running request is out of the queue; the waiting one fills its single slot: the rest are turned away
        for seed in (2, 3):
            with pytest.raises(Exception, match="Queue is full"):
                client.predict(**api_kwargs(seed=seed), api_name="/generate")

        progress = []
        while not running.done():
            status = running.status()
            if sampling(status):
                progress.append((status.progress_data[0].index, status.progress_data[0].length))
            time.sleep(0.02)
        assert running.result(timeout=60)[2]["seed"] == 0 and waiting.result(timeout=60)[2]["seed"] == 1
        steps = [index for index, length in progress if length == 20]
        assert len(steps) == len(progress) and len(set(steps)) > 3 and steps == sorted(steps)  # a moving bar
    finally:
        demo.close()


@pytest.fixture(scope="module")
def tiny_server(tiny_model_dir, tmp_path_factory):
    """The real app on a free local port, serving a copy of the tiny model folder and one LoRA file for it."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("ui")
    shutil.copytree(tiny_model_dir, root / "models" / "tiny")
    (root / "loras").mkdir()
    generator = torch.Generator().manual_seed(0)  # a rank-2 LoRA on the output projection, original key format
    save_file(
        {
            "lora_unet__proj_out.lora_down.weight": torch.randn(2, 32, generator=generator),
            "lora_unet__proj_out.lora_up.weight": torch.randn(32, 2, generator=generator),
            "lora_unet__proj_out.alpha": torch.tensor(2.0),
        },
        root / "loras" / "style.safetensors",
    )
    from easyanimate.utils.weights import read_folder_weights

    (root / "models" / "transformer_weights").mkdir()  # a "fine-tuned" transformer: the tiny one, scaled
    scaled = {k: v * 0.9 for k, v in read_folder_weights(tiny_model_dir / "transformer").items()}
    save_file(scaled, root / "models" / "transformer_weights" / "scaled.safetensors")
    studio = Studio(root / "models", root / "loras", root / "samples")
    demo = serve(studio)
    yield SimpleNamespace(url=demo.local_url, studio=studio, root=root, scaled=scaled)
    demo.close()


def test_tiny_model_every_kind_through_the_api(tiny_server):
    from gradio_client import Client, handle_file

    from easyanimate.utils.video_io import read_video

    root = tiny_server.root
    client = Client(tiny_server.url, verbose=False)
    start = write_test_image(root / "start.png", height=64, width=96)
    end = write_test_image(root / "end.png", height=96, width=64)
    clip = write_test_video(root / "clip.mp4", frames=16, height=64, width=96)
    cases = {
        TEXT_TO_VIDEO: dict(height=64, width=96),
        IMAGE_TO_VIDEO: dict(start_image=handle_file(str(start)), end_image=handle_file(str(end)), height=64,
                             width=64, frames=16),
        VIDEO_TO_VIDEO: dict(video=handle_file(str(clip)), height=64, width=96, denoise_strength=0.5,
                             steps=4),
        LONG_VIDEO: dict(start_image=handle_file(str(start)), height=64, width=64, frames=24, partial_frames=16,
                         overlap_frames=4),
    }
    for kind, change in cases.items():
        video, image, settings, status = client.predict(**api_kwargs(model="tiny", kind=kind, **change),
                                                        api_name="/generate")
        frames = read_video(video)
        assert image is None and settings["kind"] == kind and "Saved" in status
        assert frames.shape == (3, settings["frames"], change["height"], change["width"]), kind
        saved = tiny_server.studio.output.root / settings["output"]
        assert torch.equal(read_video(saved), frames)  # what the client got is the saved file

    video, image, settings, _ = client.predict(**api_kwargs(model="tiny", kind=TEXT_TO_IMAGE, height=64, width=96),
                                               api_name="/generate")
    assert video is None and Image.open(image).size == (96, 64) and settings["frames"] == 1


def test_tiny_model_lora_is_applied_and_removed(tiny_server):
    from gradio_client import Client

    from easyanimate.utils.video_io import read_video

    client = Client(tiny_server.url, verbose=False)
    outputs = []
    for lora in ["none", "style.safetensors", "none"]:
        video, *_ = client.predict(**api_kwargs(model="tiny", lora=lora, lora_strength=1.0, height=64, width=64),
                                   api_name="/generate")
        outputs.append(read_video(video))
    assert (outputs[0] - outputs[1]).abs().max() > 0.05  # the LoRA changed the result
    assert torch.equal(outputs[0], outputs[2])  # and was removed afterwards


# --------------------------------------------------------------------------------------------------------------
# the original's HTTP routes


def _b64(path: Path) -> str:
    import base64

    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def test_original_http_routes_follow_the_original_protocol_within_the_servers_folders(stand_in_server, folders):
    """``/easyanimate/update_edition``, ``update_diffusion_transformer`` and ``infer_forward`` with the original's
    keys and base64 media, as its post_infer.py sends them; models and LoRAs only from the server's folders."""
    import base64

    import httpx

    demo, studio = stand_in_server

    def post(route, **body):
        reply = httpx.post(f"{demo.local_url}easyanimate/{route}", json=body, timeout=120)
        assert reply.status_code == 200, reply.text
        return reply.json()

    assert post("update_edition", edition="v4") == {"message": "Success"}
    assert "only EasyAnimate V4" in post("update_edition", edition="v3")["message"]
    assert "no model loaded" in post("infer_forward", prompt_textbox="a red ball")["message"]
    for outside in ("escape", str(folders.models / "escape"), str(folders.outside / "secret-model"),
                    "../outside/secret-model"):
        assert post("update_diffusion_transformer", diffusion_transformer_path=outside)["message"].startswith("Error")
    assert studio.loaded_model is None
    assert post("update_diffusion_transformer", diffusion_transformer_path=str(folders.models / "model-b")) == {
        "message": "Success"}
    assert studio.loaded_model == "model-b"

    small = dict(prompt_textbox="a red ball", width_slider=64, height_slider=64, length_slider=8, sample_step_slider=2,
                 seed_textbox=5)
    reply = post("infer_forward", **small)
    assert reply["message"] == "Success"
    saved = Path(reply["save_sample_path"])
    assert saved.parent == studio.output.root and saved.suffix == ".mp4"
    assert base64.b64decode(reply["base64_encoding"]) == saved.read_bytes()
    settings = json.loads(saved.with_suffix(".json").read_text())
    assert (settings["kind"], settings["guidance_scale"], settings["seed"]) == (TEXT_TO_VIDEO, 6.0, 5)

    start = write_test_image(folders.outside / "start.png", height=64, width=96)
    clip = write_test_video(folders.outside / "clip.mp4", frames=16, height=64, width=96)
    cases = [
        (dict(start_image=_b64(start), lora_model_path="style.safetensors", lora_alpha_slider=0.8), IMAGE_TO_VIDEO),
        (dict(is_image=True), TEXT_TO_IMAGE),
        (dict(validation_video=_b64(clip), denoise_strength=0.5), VIDEO_TO_VIDEO),
        (dict(generation_method="Long Video Generation", length_slider=24, partial_video_length=16,
              start_image=[_b64(start)]), LONG_VIDEO),
    ]
    for change, kind in cases:
        reply = post("infer_forward", **{**small, **change})
        assert reply["message"] == "Success", (kind, reply["message"])
        saved = Path(reply["save_sample_path"])
        assert json.loads(saved.with_suffix(".json").read_text())["kind"] == kind
        call = studio._pipe.calls[-1]
        if kind == IMAGE_TO_VIDEO:
            assert call["image"].size == (96, 64) and call["lora"] == (folders.loras / "style.safetensors", 0.8)
        assert saved.suffix == (".png" if kind == TEXT_TO_IMAGE else ".mp4")

    refusals = [
        (dict(lora_model_path="linked.safetensors"), "not in"),
        (dict(lora_model_path=str(folders.outside / "evil.safetensors")), "not in"),
        (dict(base_model_path="dreambooth.safetensors"), "not in"),
        (dict(motion_module_path="mm_v1.ckpt"), "not supported"),
        (dict(start_image="not base64!"), "not valid base64"),
        (dict(start_image=base64.b64encode(b"not an image").decode()), "not a readable image"),
        (dict(validation_video=_b64(clip), generation_method="Long Video Generation"), "takes no input video"),
        (dict(width_slider=100), "multiple of 16"),
        (dict(prompt="a typo'd key"), "unknown keys ['prompt']"),
        (dict(seed_textbox="lucky"), "wrong type"),
    ]
    outputs = len(list(studio.output.root.iterdir()))
    for change, message in refusals:
        reply = post("infer_forward", **{**small, **change})
        assert reply["message"].startswith("Error") and message in reply["message"], (change, reply)
        assert message == "wrong type" or "wrong type" not in reply["message"]
        assert "base64_encoding" not in reply
    assert len(list(studio.output.root.iterdir())) == outputs  # nothing written for a refused request


def test_tiny_model_through_the_original_http_routes(tiny_server, tmp_path):
    import base64

    import httpx

    from easyanimate.utils.video_io import read_video

    def post(route, **body):
        return httpx.post(f"{tiny_server.url}easyanimate/{route}", json=body, timeout=300).json()

    models = tiny_server.root / "models"
    assert post("update_diffusion_transformer", diffusion_transformer_path=str(models / "tiny")) == {"message": "Success"}
    reply = post("infer_forward", prompt_textbox="a red circle moving to the left", width_slider=96, height_slider=64,
                 length_slider=8, sample_step_slider=2, seed_textbox=3)
    assert reply["message"] == "Success", reply["message"]
    received = tmp_path / "received.mp4"
    received.write_bytes(base64.b64decode(reply["base64_encoding"]))
    assert read_video(received).shape == (3, 8, 64, 96)
    assert torch.equal(read_video(received), read_video(reply["save_sample_path"]))


def test_transformer_weights_reload_the_model_with_them_and_none_brings_its_own_back(folders):
    """Fine-tuned transformer weights are picked by name from the weights folder (never through a link that leaves
    it); choosing them reloads the model with them, choosing "none" again reloads the model's own weights (the
    original kept the fine-tuned ones), and the settings JSON records which were used."""
    studio, loaded = make_studio(folders)
    assert studio.weights_choices() == ["none", "finetuned.safetensors"]
    assert "transformer_weights" not in studio.model_choices()
    base = dict(model="model-a", prompt="a red ball", frames=8, steps=1, width=64, height=64)
    for weights in ("linked.safetensors", "../../outside/evil.safetensors", str(folders.outside / "evil.safetensors")):
        with pytest.raises(RefusedError, match="not one of the .safetensors files"):
            studio.generate(GenerationSettings(**base, transformer_weights=weights))
    assert loaded == []
    first = studio.generate(GenerationSettings(**base, transformer_weights="finetuned.safetensors"))
    studio.generate(GenerationSettings(**base, transformer_weights="finetuned.safetensors"))
    studio.generate(GenerationSettings(**base))
    assert loaded == [("model-a", "finetuned.safetensors"), "model-a"]
    assert json.loads(first.settings_path.read_text())["transformer_weights"] == "finetuned.safetensors"


def test_tiny_model_with_fine_tuned_transformer_weights(tiny_server):
    from gradio_client import Client

    from easyanimate.utils.video_io import read_video

    client = Client(tiny_server.url, verbose=False)
    common = api_kwargs(model="tiny", height=64, width=64)
    plain, *_ = client.predict(**common, api_name="/generate")
    tuned, _, settings, _ = client.predict(**common, transformer_weights="scaled.safetensors", api_name="/generate")
    loaded = tiny_server.studio._pipe.transformer.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in tiny_server.scaled.items())
    assert settings["transformer_weights"] == "scaled.safetensors"
    assert not torch.equal(read_video(plain), read_video(tuned))
    again, *_ = client.predict(**common, api_name="/generate")  # "none": the model's own weights are back
    assert torch.equal(read_video(again), read_video(plain))


def test_hosted_mode_serves_one_model_within_its_limits_to_the_page_and_every_api(folders, tmp_path):
    """The original's "modelscope" mode: one model, small jobs, no LoRA / weights / long videos; the limits hold for
    the Studio, the page's controls, the Gradio API and the original's routes alike."""
    import httpx
    from gradio_client import Client

    limits = HostedLimits("model-a", max_steps=5, max_frames=16, max_pixels=64 * 96)
    studio, loaded = make_studio(folders, hosted=limits)
    assert studio.model_choices() == ["model-a"] and studio.lora_choices() == studio.weights_choices() == ["none"]
    ok = dict(model="model-a", steps=5, frames=16, width=96, height=64)
    assert studio.generate(GenerationSettings(**ok)).settings["steps"] == 5
    start = write_test_image(tmp_path / "wide.png", height=90, width=160)
    for change, message in [
        (dict(model="model-b"), "serves only the model 'model-a'"),
        (dict(lora="style.safetensors"), "no LoRA"),
        (dict(transformer_weights="finetuned.safetensors"), "no LoRA and no other transformer weights"),
        (dict(kind=LONG_VIDEO), "no long videos"),
        (dict(steps=6), "at most 5 sampling steps"),
        (dict(frames=24), "at most 16 frames"),
        (dict(width=96, height=96), "at most 6144 pixels"),
        (dict(kind=IMAGE_TO_VIDEO, start_image=str(start), resize_to_reference=True), "got 672 x 384"),
    ]:
        with pytest.raises(RefusedError, match=message):
            studio.generate(GenerationSettings(**{**ok, **change}))
    with pytest.raises(RefusedError, match="serves only the model"):
        studio.load_model("model-b")
    assert loaded == ["model-a"]
    with pytest.raises(RefusedError, match="not one of the model folders"):
        Studio(folders.models, folders.loras, folders.out, hosted=HostedLimits("missing"))
    with pytest.raises(ValueError, match="multiple of 8"):
        HostedLimits("model-a", max_frames=20)

    demo = serve(studio)
    try:
        controls = {c.get("props", {}).get("elem_id") or c.get("props", {}).get("label"): c["props"]
                    for c in demo.config["components"]}
        assert controls["steps"]["maximum"] == 5 and controls["frames"]["maximum"] == 16
        assert LONG_VIDEO not in [choice[0] for choice in controls["Generation kind"]["choices"]]
        assert controls["Model folder"]["interactive"] is False and controls["LoRA"]["visible"] is False
        assert "prompt-examples" not in controls and "image-templates" not in controls  # no demo model: no examples
        client = Client(demo.local_url, verbose=False)
        with pytest.raises(Exception, match="greater than maximum value 5"):  # the slider's own bound
            client.predict(**api_kwargs(steps=6), api_name="/generate")
        with pytest.raises(Exception, match="no LoRA"):  # past the page's pickers, the Studio refuses
            client.predict(**api_kwargs(lora="style.safetensors"), api_name="/generate")
        with pytest.raises(Exception, match="serves only the model"):
            client.predict("model-b", api_name="/load_model")
        reply = httpx.post(f"{demo.local_url}easyanimate/update_diffusion_transformer",
                           json={"diffusion_transformer_path": "model-b"}, timeout=60).json()
        assert "this server offers ['model-a']" in reply["message"]
        reply = httpx.post(f"{demo.local_url}easyanimate/infer_forward", timeout=60,
                           json={"prompt_textbox": "a red ball", "sample_step_slider": 5, "length_slider": 16,
                                 "width_slider": 64, "height_slider": 64}).json()
        assert reply["message"] == "Success"
    finally:
        demo.close()


def test_hosted_and_remote_modes_from_the_command_line_name_what_is_missing(folders):
    from easyanimate.ui.app import main

    with pytest.raises(SystemExit, match="--model: model 'nowhere' is not one of the model folders"):
        main(["--ui-mode", "hosted", "--model", "nowhere", "--models-dir", str(folders.models),
              "--output-dir", str(folders.out)])
    with pytest.raises(SystemExit, match="multiple of 8"):
        main(["--ui-mode", "hosted", "--model", "model-a", "--max-frames", "20", "--models-dir", str(folders.models)])
    with pytest.raises(SystemExit, match="--ui-mode remote needs --remote-url"):
        main(["--ui-mode", "remote", "--output-dir", str(folders.out)])
    with pytest.raises(SystemExit, match="must be an http"):
        main(["--ui-mode", "remote", "--remote-url", "gpu-box:7860", "--output-dir", str(folders.out)])


@pytest.mark.parametrize("kind", [TEXT_TO_VIDEO, TEXT_TO_IMAGE, IMAGE_TO_VIDEO, VIDEO_TO_VIDEO, LONG_VIDEO])
def test_infer_request_is_what_the_original_routes_read_back(folders, tmp_path, kind):
    """The remote front end's request body and the server's reading of it are inverses, for every kind."""
    from easyanimate.ui.original_api import INFER_DEFAULTS, OriginalAPI, infer_request

    studio, _ = make_studio(folders)
    studio.load_model("model-a")
    start = write_test_image(tmp_path / "start.png")
    clip = write_test_video(tmp_path / "clip.mp4")
    uploads = dict(start_image=str(start), end_image=str(start)) if kind in (IMAGE_TO_VIDEO, LONG_VIDEO) else {}
    if kind == VIDEO_TO_VIDEO:
        uploads = dict(video=str(clip))
    asked = GenerationSettings(model="model-a", kind=kind, prompt="一个红色的圆形", negative_prompt="blur",
                               sampler="DPM++", steps=7, width=96, height=48, frames=40, guidance_scale=4.5, seed=-1,
                               lora="style.safetensors", lora_strength=0.8, denoise_strength=0.4, partial_frames=24,
                               overlap_frames=3, resize_to_reference=kind == IMAGE_TO_VIDEO, base_resolution=768,
                               transformer_weights="finetuned.safetensors", **uploads)
    received = tmp_path / "received"
    received.mkdir()
    assert set(infer_request(asked)) == set(INFER_DEFAULTS)
    read = OriginalAPI(studio)._settings(infer_request(asked), received)
    for name, value in dataclasses.asdict(asked).items():
        if name in ("start_image", "end_image", "video"):
            assert (getattr(read, name) is None) == (value is None), name
            if value is not None:
                assert Path(getattr(read, name)).read_bytes() == Path(value).read_bytes()
        else:
            assert getattr(read, name) == value, name


def test_remote_mode_sends_generations_to_a_server_and_keeps_the_results_here(stand_in_server, folders, tmp_path):
    """The original's "eas" mode: this page posts to another server's infer_forward and saves what comes back."""
    from gradio_client import Client, handle_file

    from easyanimate.ui.remote import RemoteStudio

    backend, server_studio = stand_in_server
    limits = HostedLimits("model-a", max_steps=10, max_frames=16, max_pixels=96 * 64)
    front = RemoteStudio(backend.local_url, tmp_path / "front", limits, token="secret-token", timeout=60)
    assert front._client.headers["Authorization"] == "secret-token"
    assert "model-a loaded" in front.load_model("model-a") and server_studio.loaded_model == "model-a"

    result = front.generate(GenerationSettings(model="model-a", prompt="a red ball", steps=3, width=96, height=64,
                                               frames=8, seed=-1))
    assert result.path.parent == front.output.root and result.path.suffix == ".mp4"
    (server_file,) = server_studio.output.root.glob("*.mp4")
    assert result.path.read_bytes() == server_file.read_bytes()
    saved = json.loads(result.settings_path.read_text())
    assert saved["seed"] == json.loads(server_file.with_suffix(".json").read_text())["seed"] != -1  # the drawn one
    assert saved["server"] == backend.local_url.rstrip("/") and saved["output"] == result.path.name

    start = write_test_image(tmp_path / "start.png", height=90, width=160)
    front.generate(GenerationSettings(model="model-a", kind=IMAGE_TO_VIDEO, start_image=str(start), steps=2,
                                      width=64, height=64, frames=8))
    assert server_studio._pipe.calls[-1]["image"].size == (160, 90)
    clip = write_test_video(tmp_path / "clip.mp4", frames=8)
    with pytest.raises(RefusedError, match="the server at .*input video has 8 frames"):  # the server's own refusal
        front.generate(GenerationSettings(model="model-a", kind=VIDEO_TO_VIDEO, video=str(clip), steps=2, width=64,
                                          height=64, frames=16))
    with pytest.raises(RefusedError, match="at most 10 sampling steps"):  # the page's limit, before any request
        front.generate(GenerationSettings(model="model-a", steps=20, width=64, height=64, frames=8))

    page = serve(front)  # the page itself, on the remote studio
    try:
        _, _, settings, _ = Client(page.local_url, verbose=False).predict(
            **api_kwargs(kind=IMAGE_TO_VIDEO, start_image=handle_file(str(start))), api_name="/generate")
        assert settings["server"] == backend.local_url.rstrip("/") and settings["start_image"] == "start.png"
        assert (front.output.root / settings["output"]).is_file()
    finally:
        page.close()

    unreachable = RemoteStudio(f"http://127.0.0.1:{free_port()}", tmp_path / "nowhere", limits, timeout=5)
    with pytest.raises(RefusedError, match="did not answer"):
        unreachable.load_model("model-a")
