"""The request layer every front end shares: one validator (front ends only rename settings and narrow ranges), a
model folder's recommended settings, and one runner, so the command line and the web server turn the same settings
into the same video."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from easyanimate import cli
from easyanimate.inference import (
    IMAGE_TO_VIDEO,
    LONG_VIDEO,
    TEXT_TO_IMAGE,
    TEXT_TO_VIDEO,
    VIDEO_TO_VIDEO,
    GenerationRequest,
    ModelDefaults,
    RequestError,
    check_request,
    prepare,
    read_model_defaults,
)
from easyanimate.inference.long_video import generate_long_video
from easyanimate.inference.request import long_video_chunks
from easyanimate.inference.runner import total_steps
from easyanimate.ui.generation import PAGE_LIMITS, Studio
from easyanimate.utils.video_io import read_video, save_video


def test_one_validator_speaks_each_front_ends_language():
    """The same wrong setting is refused by the same rule, named as the command line or the page names it; the page's
    narrower ranges are checked where it passes its limits."""
    wrong = GenerationRequest(height=100)
    with pytest.raises(RequestError, match=r"^--height must be a positive multiple of 16, got 100; try 96 or 112$"):
        check_request(wrong, labels=cli.LABELS)
    with pytest.raises(RequestError, match=r"^height must be between 16 and 2048 and a multiple of 16, got 100$"):
        check_request(wrong, limits=PAGE_LIMITS)
    assert check_request(GenerationRequest(steps=500)).steps == 500  # any positive count for Python callers
    with pytest.raises(RequestError, match="sampling steps must be between 1 and 100, got 500"):
        check_request(GenerationRequest(steps=500), limits=PAGE_LIMITS)
    with pytest.raises(RequestError, match="--strength 0.01 with 25 --steps runs no step"):
        check_request(GenerationRequest(kind=VIDEO_TO_VIDEO, video="v.mp4", denoise_strength=0.01), labels=cli.LABELS)
    with pytest.raises(RequestError, match="unknown memory mode 'fast'"):
        check_request(GenerationRequest(memory_mode="fast"))
    # text to video of one frame is text to image; the old command-line name of the "gpu" memory mode still works
    assert check_request(GenerationRequest(frames=1, memory_mode="none")).kind == TEXT_TO_IMAGE


def test_model_defaults_come_from_the_model_folder(tmp_path):
    released = read_model_defaults(tmp_path)  # no generation_defaults.json: the released model's settings
    assert (released.width, released.height, released.frames, released.guidance_scale) == (672, 384, 144, 7.0)
    assert released.request() == GenerationRequest()
    ModelDefaults(prompt="a blue square", negative_prompt="", guidance_scale=2.5, width=96, height=48,
                  frames=16, steps=12).write(tmp_path)
    request = read_model_defaults(tmp_path).request(prompt="a red circle", steps=3)
    assert (request.prompt, request.negative_prompt, request.guidance_scale, request.steps) == ("a red circle", "",
                                                                                                2.5, 3)
    assert (request.width, request.height, request.frames) == (96, 48, 16)
    (tmp_path / "generation_defaults.json").write_text(json.dumps({"guidance": 3}))
    with pytest.raises(ValueError, match=r"unknown settings \['guidance'\]"):
        read_model_defaults(tmp_path)
    (tmp_path / "generation_defaults.json").write_text(json.dumps({"steps": "many"}))
    with pytest.raises(ValueError, match="steps must be a int, got 'many'"):
        read_model_defaults(tmp_path)


def test_shipped_demo_recommends_what_it_was_evaluated_with():
    from easyanimate.demo.evaluate import EVAL_NEGATIVE_PROMPT, EvalSettings
    from easyanimate.demo.examples import DEMO_DEFAULTS

    shipped = read_model_defaults(Path(__file__).resolve().parents[1] / "models" / "EasyAnimateV4-demo")
    assert shipped == DEMO_DEFAULTS
    evaluated = EvalSettings()
    assert (evaluated.width, evaluated.height, evaluated.num_frames, evaluated.steps, evaluated.guidance,
            EVAL_NEGATIVE_PROMPT) == (shipped.width, shipped.height, shipped.frames, shipped.steps,
                                      shipped.guidance_scale, shipped.negative_prompt)


def test_command_line_starts_from_the_models_recommended_settings(tiny_model_dir, tmp_path):
    parser = cli.build_parser("t2v")
    job = cli.validate("t2v", parser.parse_args(["--model", str(tiny_model_dir), "--prompt", "a red circle",
                                                 "--output", str(tmp_path / "a.mp4")]))
    recommended = read_model_defaults(tiny_model_dir)
    request = job.prepared.request
    assert (request.width, request.height, request.frames, request.steps) == (
        recommended.width, recommended.height, recommended.frames, recommended.steps)
    assert (request.negative_prompt, request.guidance_scale) == (recommended.negative_prompt, recommended.guidance_scale)
    job = cli.validate("t2v", parser.parse_args(["--model", str(tiny_model_dir), "--prompt", "x", "--width", "32",
                                                 "--negative-prompt", "blurry", "--output", str(tmp_path / "b.mp4")]))
    assert (job.prepared.width, job.prepared.request.negative_prompt) == (32, "blurry")


def test_page_starts_from_the_preselected_models_recommended_settings(tmp_path, tiny_model_dir):
    from easyanimate.ui.app import DEFAULT_MODEL_NAME, page_setup

    models = tmp_path / "models"
    (models / "released-like" / "transformer").mkdir(parents=True)
    (models / "released-like" / "model_index.json").write_text("{}")
    studio = Studio(models, tmp_path / "loras", tmp_path / "samples")
    setup = page_setup(studio)
    assert setup.preselected == "released-like"
    assert (setup.start["width"], setup.start["guidance_scale"]) == (672, 7.0)
    (models / DEFAULT_MODEL_NAME).mkdir()
    (models / DEFAULT_MODEL_NAME / "model_index.json").write_text("{}")
    ModelDefaults(prompt="a green star", negative_prompt="", guidance_scale=3.0, width=64, height=48, frames=16,
                  steps=20).write(models / DEFAULT_MODEL_NAME)
    setup = page_setup(studio)  # the demo is preselected when offered, and the page starts where it draws well
    assert setup.preselected == DEFAULT_MODEL_NAME
    assert {k: setup.start[k] for k in ("prompt", "negative_prompt", "guidance_scale", "width", "height", "frames",
                                        "steps")} == dict(prompt="a green star", negative_prompt="",
                                                          guidance_scale=3.0, width=64, height=48, frames=16, steps=20)


def test_long_video_runs_as_many_passes_as_progress_counts():
    """The chunk count progress reports is the number of pipeline calls the long-video loop makes."""
    calls = []

    def call(prompt, video_length, image=None, end_image=None, **kwargs):
        calls.append(video_length)
        return SimpleNamespace(videos=torch.rand(1, 3, video_length, 8, 8))

    pipe = _Callable(call, frame_multiple=8, is_inpaint=True)
    for frames, chunk, overlap in [(8, 8, 4), (12, 8, 4), (30, 16, 4), (100, 24, 1), (64, 64, 3), (65, 64, 3)]:
        calls.clear()
        video = generate_long_video(pipe, "p", frames, chunk, overlap).videos
        assert video.shape[2] == frames
        assert len(calls) == long_video_chunks(frames, chunk, overlap), (frames, chunk, overlap)
        assert all(n % 8 == 0 for n in calls)
        prepared = prepare(GenerationRequest(kind=LONG_VIDEO, frames=frames, partial_frames=chunk,
                                             overlap_frames=overlap, steps=5))
        assert total_steps(prepared) == 5 * len(calls)


class _Callable:
    """A stand-in pipeline: ``attributes`` as attributes, calls go to ``call``."""

    def __init__(self, call, **attributes):
        self.__dict__.update(attributes)
        self._call = call

    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)


def test_command_line_and_web_server_make_the_same_video_from_the_same_settings(tiny_model_dir, tmp_path):
    """Front ends only translate: the same image-to-video settings through the command line and through the web
    server's Studio give the same frames, and both write the settings used beside the result."""
    start = save_video(torch.rand(3, 1, 32, 48, generator=torch.Generator().manual_seed(0)), tmp_path / "start.png")
    settings = dict(prompt="a blue square moving up", width=32, height=32, frames=8, steps=2, guidance_scale=4.0,
                    seed=11, sampler="DDIM")
    path = cli.main("i2v", ["--model", str(tiny_model_dir), "--prompt", settings["prompt"], "--image", str(start),
                            "--width", "32", "--height", "32", "--frames", "8", "--steps", "2", "--guidance", "4",
                            "--seed", "11", "--sampler", "DDIM", "--memory-mode", "gpu",
                            "--output", str(tmp_path / "cli.mp4")])
    from_cli = json.loads(path.with_suffix(".json").read_text())

    models = tmp_path / "models"
    shutil.copytree(tiny_model_dir, models / "tiny")  # the server refuses links that leave its models folder
    studio = Studio(models, tmp_path / "loras", tmp_path / "samples")
    result = studio.generate(GenerationRequest(model="tiny", kind=IMAGE_TO_VIDEO, start_image=str(start),
                                               negative_prompt=from_cli["negative_prompt"], **settings))
    assert torch.equal(read_video(result.path), read_video(path))
    for key in ("kind", "prompt", "negative_prompt", "width", "height", "frames", "steps", "guidance_scale", "seed",
                "sampler", "start_image", "output"):
        assert key in from_cli and key in result.settings
    assert from_cli["output"] == "cli.mp4" and from_cli["start_image"] == "start.png" == result.settings["start_image"]
    assert from_cli["kind"] == result.settings["kind"] == IMAGE_TO_VIDEO
