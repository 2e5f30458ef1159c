"""The EasyAnimate nodes: ComfyUI's inputs into a generation request, the request layer's result into an IMAGE batch.

Every node is a translation: the loader calls ``load_pipeline``; the samplers build a
:class:`~easyanimate.inference.GenerationRequest`, check and open it with ``prepare`` (``LocalFiles``: the images
and videos are in memory) and run it with ``generate``. The checks, the defaults of a request and the pipeline calls
are the request layer's, so a wrong setting fails here with the same message as on the command line, naming the
node's input. ComfyUI shows a node's exception as that prompt's error and goes on serving.

Widgets need static defaults: they start at the released model's recommended settings (the request layer's
``ModelDefaults()``); the shipped workflows carry the demo model's, and the *Recommended Settings* node gives any
model folder's own (its ``generation_defaults.json``) as outputs to link into a sampler.
"""

from __future__ import annotations

from typing import Callable

import comfy.model_management
import comfy.utils
import folder_paths

from easyanimate.inference import (
    DTYPES,
    IMAGE_TO_VIDEO,
    LONG_VIDEO,
    MEMORY_MODES,
    SAMPLER_NAMES,
    TEXT_TO_VIDEO,
    VIDEO_TO_VIDEO,
    GenerationRequest,
    LocalFiles,
    ModelDefaults,
    generate,
    prepare,
    read_model_defaults,
)
from easyanimate.inference.loading import load_pipeline
from easyanimate.inference.request import DEFAULT_LORA_STRENGTH, FRAME_MULTIPLE, SEED_MAX, SIZE_MULTIPLE
from easyanimate.models.step_cache import RECOMMENDED_THRESHOLD

from .frames import images_to_pil, images_to_video, video_to_images
from .model_folders import EasyAnimateModel, model_names, model_path

MODEL = "EASYANIMATE_MODEL"
CATEGORY = "EasyAnimate"
RELEASED = ModelDefaults()  # the widgets' static defaults (see the module docstring)
_REQUEST = GenerationRequest()  # the request layer's defaults for what ModelDefaults does not cover

# Error messages name a setting as the node's input is named.
LABELS = {
    "guidance_scale": "cfg",
    "steps": "steps",
    "frames": "frames",
    "seed": "seed",
    "denoise_strength": "denoise",
    "partial_frames": "chunk_frames",
    "overlap_frames": "overlap_frames",
    "start_image": "start_image",
    "end_image": "end_image",
    "video": "video",
    "lora_strength": "strength",
    "step_cache": "step_cache",
    "step_cache_skip_start": "step_cache_start_steps",
}


def comfy_device() -> str:
    """The device ComfyUI runs models on (the CPU under ``--cpu``), so the pipeline follows ComfyUI's choice."""
    return str(comfy.model_management.get_torch_device())


def comfy_progress() -> Callable[[int, int], None]:
    """An ``on_step(done, total)`` for ``generate`` that moves ComfyUI's progress bar and, when the user cancels,
    raises ComfyUI's interrupt exception out of the sampling loop (checked after every step)."""
    bar = None

    def on_step(done: int, total: int) -> None:
        nonlocal bar
        bar = bar or comfy.utils.ProgressBar(total)
        bar.update_absolute(done, total)
        # The server's progress hook checks too; checking here keeps cancelling working where no hook is set.
        comfy.model_management.throw_exception_if_processing_interrupted()

    return on_step


def describe(docstring: str) -> str:
    """A node's docstring as its description in ComfyUI: one paragraph of plain text."""
    return " ".join(docstring.replace("``", "").split())


# ------------------------------------------------------------------------------------------------- widgets
def _int(default: int, low: int, high: int, step: int = 1, **extra) -> tuple:
    return ("INT", {"default": default, "min": low, "max": high, "step": step, **extra})


def _float(default: float, low: float, high: float, step: float = 0.01, **extra) -> tuple:
    return ("FLOAT", {"default": default, "min": low, "max": high, "step": step, "round": 0.001, **extra})


def _text(default: str, tooltip: str) -> tuple:
    return ("STRING", {"default": default, "multiline": True, "tooltip": tooltip})


def _size(default: int, side: str) -> tuple:
    tooltip = f"{side} in pixels, a multiple of {SIZE_MULTIPLE}"
    return _int(default, SIZE_MULTIPLE, 2048, SIZE_MULTIPLE, tooltip=tooltip)


def _frames(default: int, low: int, step: int, tooltip: str) -> tuple:
    return _int(default, low, 1440, step, tooltip=tooltip)


def sampling_inputs(frames: tuple) -> dict:
    """The inputs every sampler has, in widget order, with ``frames`` (its frame count widget)."""
    return {
        "model": (MODEL,),
        "prompt": _text(RELEASED.prompt, "what the video shows"),
        "negative_prompt": _text(RELEASED.negative_prompt, "what it should not show"),
        "sampler_name": (list(SAMPLER_NAMES), {"default": _REQUEST.sampler}),
        "steps": _int(RELEASED.steps, 1, 1000),
        "cfg": _float(RELEASED.guidance_scale, 0.0, 100.0, 0.1, tooltip="guidance scale; <= 1 turns guidance off"),
        "seed": _int(_REQUEST.seed, 0, SEED_MAX, control_after_generate=True),
        "width": _size(RELEASED.width, "width"),
        "height": _size(RELEASED.height, "height"),
        "frames": frames,
    }


def step_cache_inputs() -> dict:
    """The step cache's inputs, optional so that prompts written without them keep working (off by default)."""
    return {
        "step_cache": _float(_REQUEST.step_cache, 0.0, 1.0, tooltip=f"faster: steps whose transformer output "
                             f"barely changes reuse the last full step's; 0 = off, {RECOMMENDED_THRESHOLD} is "
                             "the recommended value"),
        "step_cache_start_steps": _int(_REQUEST.step_cache_skip_start, 0, 1000,
                                       tooltip="steps always run in full at the start"),
    }


# --------------------------------------------------------------------------------------------------- nodes
class LoadModel:
    """A model folder in the released layout from ``models/EasyAnimate/``, with a memory mode (on a GPU) and a
    precision ("auto": bf16 or fp16 on a GPU; on a CPU bf16 where it has bf16 matrix instructions, else fp32)."""

    CATEGORY = CATEGORY
    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"
    DESCRIPTION = describe(__doc__)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (model_names(), {"tooltip": "a folder in ComfyUI/models/EasyAnimate/"}),
            "memory_mode": (list(MEMORY_MODES), {"default": _REQUEST.memory_mode}),
            "precision": (list(DTYPES), {"default": _REQUEST.dtype}),
        }}

    def load(self, model: str, memory_mode: str, precision: str):
        folder = LocalFiles().model_folder(str(model_path(model)))  # names what a folder lacks, before loading
        device = comfy_device()
        pipe = load_pipeline(folder, memory_mode=memory_mode, dtype=precision, device=device)
        return (EasyAnimateModel(pipe, folder, memory_mode, precision, device),)


class LoadLoRA:
    """A LoRA from ComfyUI's ``loras`` folder, merged at ``strength`` for each generation with this model (and
    taken out again after it). Whether it fits the model is checked when a sampler runs."""

    CATEGORY = CATEGORY
    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"
    DESCRIPTION = describe(__doc__)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (MODEL,),
            "lora_name": (folder_paths.get_filename_list("loras"),),
            "strength": _float(DEFAULT_LORA_STRENGTH, -10.0, 10.0),
        }}

    def load(self, model: EasyAnimateModel, lora_name: str, strength: float):
        path = LocalFiles().lora_file(folder_paths.get_full_path("loras", lora_name) or lora_name)
        return (model.with_lora(path, strength),)


class RecommendedSettings:
    """A model folder's recommended settings (its ``generation_defaults.json``; the released model's where it has
    none), as outputs to link into a sampler's inputs."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING", "STRING", "INT", "FLOAT", "INT", "INT", "INT")
    RETURN_NAMES = ("prompt", "negative_prompt", "steps", "cfg", "width", "height", "frames")
    FUNCTION = "read"
    DESCRIPTION = describe(__doc__)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": (MODEL,)}}

    def read(self, model: EasyAnimateModel):
        d = read_model_defaults(model.folder)
        return (d.prompt, d.negative_prompt, d.steps, d.guidance_scale, d.width, d.height, d.frames)


class _Sampler:
    """Shared by the samplers: one request of ``KIND`` from the node's inputs, run with ComfyUI's progress bar."""

    KIND = TEXT_TO_VIDEO
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    FUNCTION = "sample"

    def sample(self, model: EasyAnimateModel, prompt: str, negative_prompt: str, sampler_name: str, steps: int,
               cfg: float, seed: int, step_cache: float = _REQUEST.step_cache,
               step_cache_start_steps: int = _REQUEST.step_cache_skip_start, **settings):
        """Run the request; ``settings`` are the request fields the node adds (size, frames, images, video...)."""
        request = model.request(kind=self.KIND, prompt=prompt, negative_prompt=negative_prompt, sampler=sampler_name,
                                steps=steps, guidance_scale=cfg, seed=seed, step_cache=step_cache,
                                step_cache_skip_start=step_cache_start_steps, **settings)
        prepared = prepare(request, LocalFiles(), labels=LABELS, is_inpaint=model.pipe.is_inpaint)
        comfy.model_management.throw_exception_if_processing_interrupted()
        generation = generate(model.pipe, prepared, comfy_progress())
        return (video_to_images(generation.videos),)


def _images(batch):
    return None if batch is None else images_to_pil(batch)


class TextToVideo(_Sampler):
    """Text to video; ``frames`` 1 makes one image."""

    KIND = TEXT_TO_VIDEO
    DESCRIPTION = describe(__doc__)

    @classmethod
    def INPUT_TYPES(cls):
        frames = _frames(RELEASED.frames, 1, 1, f"1 (an image) or a multiple of {FRAME_MULTIPLE}")
        return {"required": sampling_inputs(frames), "optional": step_cache_inputs()}


class ImageToVideo(_Sampler):
    """Image to video (an InP model): the video starts at ``start_image`` and, if given, ends at ``end_image``.
    One image is kept on the first (last) 3 frames; a batch of several gives that many first (last) frames."""

    KIND = IMAGE_TO_VIDEO
    DESCRIPTION = describe(__doc__)

    @classmethod
    def INPUT_TYPES(cls):
        frames = _frames(RELEASED.frames, FRAME_MULTIPLE, FRAME_MULTIPLE, f"a multiple of {FRAME_MULTIPLE}")
        return {"required": {**sampling_inputs(frames), "start_image": ("IMAGE",)},
                "optional": {"end_image": ("IMAGE",), **step_cache_inputs()}}

    def sample(self, start_image, end_image=None, **inputs):
        return super().sample(start_image=_images(start_image), end_image=_images(end_image), **inputs)


class VideoToVideo(_Sampler):
    """Video to video: the first ``frames`` frames of ``video`` (an IMAGE batch, resized to the size) redrawn;
    ``denoise`` 1 keeps nothing of it, lower keeps more (it runs int(steps * denoise) steps)."""

    KIND = VIDEO_TO_VIDEO
    DESCRIPTION = describe(__doc__)

    @classmethod
    def INPUT_TYPES(cls):
        frames = _frames(RELEASED.frames, FRAME_MULTIPLE, FRAME_MULTIPLE, f"a multiple of {FRAME_MULTIPLE}, at "
                                                                          "most the video's length")
        return {"required": {**sampling_inputs(frames), "video": ("IMAGE",),
                             "denoise": _float(_REQUEST.denoise_strength, 0.01, 1.0)},
                "optional": step_cache_inputs()}

    def sample(self, video, denoise: float, **inputs):
        return super().sample(video=images_to_video(video), denoise_strength=denoise, **inputs)


class LongVideo(_Sampler):
    """A video longer than one pass (an InP model): chunks of ``chunk_frames`` frames, each continued from the last
    ``overlap_frames`` of the one before and cross-faded there; optional start and end images."""

    KIND = LONG_VIDEO
    DESCRIPTION = describe(__doc__)

    @classmethod
    def INPUT_TYPES(cls):
        frames = _frames(RELEASED.frames, 1, 1, "frames in all")
        return {"required": {**sampling_inputs(frames),
                             "chunk_frames": _frames(_REQUEST.partial_frames, FRAME_MULTIPLE, FRAME_MULTIPLE,
                                                     "frames of one pass"),
                             "overlap_frames": _int(_REQUEST.overlap_frames, 1, 64)},
                "optional": {"start_image": ("IMAGE",), "end_image": ("IMAGE",), **step_cache_inputs()}}

    def sample(self, chunk_frames: int, overlap_frames: int, start_image=None, end_image=None, **inputs):
        return super().sample(partial_frames=chunk_frames, overlap_frames=overlap_frames,
                              start_image=_images(start_image), end_image=_images(end_image), **inputs)


NODE_CLASS_MAPPINGS = {
    "EasyAnimateLoadModel": LoadModel,
    "EasyAnimateLoadLoRA": LoadLoRA,
    "EasyAnimateRecommendedSettings": RecommendedSettings,
    "EasyAnimateTextToVideo": TextToVideo,
    "EasyAnimateImageToVideo": ImageToVideo,
    "EasyAnimateVideoToVideo": VideoToVideo,
    "EasyAnimateLongVideo": LongVideo,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "EasyAnimateLoadModel": "EasyAnimate Load Model",
    "EasyAnimateLoadLoRA": "EasyAnimate Load LoRA",
    "EasyAnimateRecommendedSettings": "EasyAnimate Recommended Settings",
    "EasyAnimateTextToVideo": "EasyAnimate Text to Video",
    "EasyAnimateImageToVideo": "EasyAnimate Image to Video",
    "EasyAnimateVideoToVideo": "EasyAnimate Video to Video",
    "EasyAnimateLongVideo": "EasyAnimate Long Video",
}
