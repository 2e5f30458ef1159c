"""Generation requests of the web UI, independent of Gradio: validate settings, hold the loaded model, run the
pipeline one request at a time, and save every result with the settings that made it.

The :class:`Studio` owns the one loaded pipeline. A lock covers both model switching and generation, so a model
switch waits for the running generation to finish instead of swapping weights under it (the Gradio queue also
serialises them; the lock keeps that true for any other caller).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from easyanimate.cli import SAMPLER_NAMES
from easyanimate.data.buckets import bucket_crop_size, closest_ratio
from easyanimate.ui.safety import (
    NONE_CHOICE,
    OutputFolder,
    RefusedError,
    UploadLimits,
    check_video_upload,
    list_model_folders,
    list_safetensors_files,
    open_image_upload,
    resolve_model_folder,
    resolve_safetensors_file,
)
from easyanimate.utils.atomic import write_text_atomic

logger = logging.getLogger(__name__)

TEXT_TO_VIDEO = "Text to Video"
TEXT_TO_IMAGE = "Text to Image"
IMAGE_TO_VIDEO = "Image to Video"
VIDEO_TO_VIDEO = "Video to Video"
LONG_VIDEO = "Long Video"
KINDS = (TEXT_TO_VIDEO, TEXT_TO_IMAGE, IMAGE_TO_VIDEO, VIDEO_TO_VIDEO, LONG_VIDEO)
SAMPLERS = SAMPLER_NAMES
BASE_RESOLUTIONS = (512, 768, 960)

SIZE_RANGE = (16, 2048)  # pixels, multiples of 16 (the demo model makes 48 x 96 videos)
FRAMES_RANGE = (8, 144)  # one pass, multiples of 8 (the VAE's frame chunk)
LONG_FRAMES_MAX = 1440
OVERLAP_RANGE = (1, 4)
STEPS_RANGE = (1, 100)
GUIDANCE_RANGE = (0.0, 20.0)
STRENGTH_RANGE = (0.05, 1.0)
SEED_MAX = 10**8
FPS = 24

DEFAULT_PROMPT = (
    "A young woman with beautiful, clear eyes and blonde hair stands in the forest, wearing a white dress and a "
    "crown. Her expression is serene. The camera slowly zooms in. High quality, masterpiece, best quality."
)
DEFAULT_NEGATIVE_PROMPT = (
    "Blurring, mutation, deformation, distortion, dark and solid, comics, text subtitles, line art, static, "
    "ugly, error, messy code, low quality."
)

def reference_size(ref_height: int, ref_width: int, base_resolution: int) -> tuple[int, int]:
    """(height, width) for a reference of the given size: the closest aspect-ratio bucket scaled to
    ``base_resolution``, each side floored to a multiple of 16 (the original's "Resize according to Reference")."""
    return bucket_crop_size(closest_ratio(ref_height, ref_width), base_resolution)


@dataclass
class GenerationSettings:
    """Everything a user chooses for one generation (the settings JSON saved next to each result)."""

    model: str
    kind: str = TEXT_TO_VIDEO
    prompt: str = DEFAULT_PROMPT
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    sampler: str = "Euler"
    steps: int = 30
    width: int = 672
    height: int = 384
    frames: int = 144
    guidance_scale: float = 7.0
    seed: int = 43
    lora: str = NONE_CHOICE
    lora_strength: float = 0.55
    transformer_weights: str = NONE_CHOICE  # a fine-tuned transformer from the weights folder, or the model's own
    denoise_strength: float = 0.70
    partial_frames: int = 72
    overlap_frames: int = 4
    resize_to_reference: bool = False
    base_resolution: int = 512
    start_image: str | None = None
    end_image: str | None = None
    video: str | None = None

    def check(self) -> None:
        """Raise :class:`RefusedError` naming the first setting that is out of range or inconsistent."""

        def in_range(name: str, value: float, bounds: tuple[float, float], step: int | None = None) -> None:
            low, high = bounds
            if not low <= value <= high or (step and value % step):
                rule = f"between {low} and {high}" + (f" and a multiple of {step}" if step else "")
                raise RefusedError(f"{name} must be {rule}, got {value}")

        if self.kind not in KINDS:
            raise RefusedError(f"unknown generation kind {self.kind!r}; choose one of {list(KINDS)}")
        if self.sampler not in SAMPLERS:
            raise RefusedError(f"unknown sampler {self.sampler!r}; choose one of {list(SAMPLERS)}")
        if not self.resize_to_reference:
            in_range("width", self.width, SIZE_RANGE, 16)
            in_range("height", self.height, SIZE_RANGE, 16)
        elif self.base_resolution not in BASE_RESOLUTIONS:
            raise RefusedError(f"base resolution must be one of {BASE_RESOLUTIONS}, got {self.base_resolution}")
        if self.kind == LONG_VIDEO:
            in_range("frame count", self.frames, (FRAMES_RANGE[0], LONG_FRAMES_MAX), 8)
            in_range("partial length", self.partial_frames, FRAMES_RANGE, 8)
            in_range("overlap", self.overlap_frames, OVERLAP_RANGE)
        elif self.kind != TEXT_TO_IMAGE:
            in_range("frame count", self.frames, FRAMES_RANGE, 8)
        in_range("sampling steps", self.steps, STEPS_RANGE)
        in_range("guidance scale", self.guidance_scale, GUIDANCE_RANGE)
        in_range("LoRA strength", self.lora_strength, (0.0, 2.0))
        if self.seed != -1:
            in_range("seed (or -1 for a random one)", self.seed, (0, 2**63 - 1))
        if self.kind == VIDEO_TO_VIDEO:
            in_range("denoise strength", self.denoise_strength, STRENGTH_RANGE)
            if not self.video:
                raise RefusedError("video to video needs an input video: upload one")
        if self.kind == IMAGE_TO_VIDEO and not self.start_image:
            raise RefusedError("image to video needs a start image: upload one")
        if self.end_image and not self.start_image:
            raise RefusedError("an end image needs a start image too: upload a start image")
        if self.kind not in (IMAGE_TO_VIDEO, LONG_VIDEO) and (self.start_image or self.end_image):
            raise RefusedError(f"{self.kind.lower()} takes no start or end image; choose image to video or long video")
        if self.kind != VIDEO_TO_VIDEO and self.video:
            raise RefusedError(f"{self.kind.lower()} takes no input video; choose video to video")
        if self.resize_to_reference and not (self.start_image or (self.kind == VIDEO_TO_VIDEO and self.video)):
            raise RefusedError(
                "resize to the reference needs a start image or an input video; upload one or set the size"
            )


@dataclass(frozen=True)
class HostedLimits:
    """Limits for a page open to the public (the original's "modelscope" UI mode): one model, loaded at start and
    never switched; no LoRA, no other transformer weights, no long videos; at most ``max_steps`` sampling steps,
    ``max_frames`` frames and ``max_pixels`` pixels per frame. The :class:`Studio` enforces them, so API clients
    meet the same limits as the page."""

    model: str
    max_steps: int = 30
    max_frames: int = 48
    max_pixels: int = 672 * 384

    def __post_init__(self):
        if self.max_steps < 1 or self.max_frames < FRAMES_RANGE[0] or self.max_pixels < 16 * 16:
            raise ValueError(f"hosted limits too small to generate anything: {self}")
        if self.max_frames % 8:
            raise ValueError(f"the most frames must be a multiple of 8 (the VAE's frame chunk), got {self.max_frames}")

    def check(self, settings: "GenerationSettings", height: int | None, width: int | None) -> None:
        """Refuse what this server does not offer; ``height`` x ``width`` is the size that would be generated
        (None when another server decides it)."""
        if settings.model != self.model:
            raise RefusedError(f"this server serves only the model {self.model!r}")
        if settings.lora != NONE_CHOICE or settings.transformer_weights != NONE_CHOICE:
            raise RefusedError("this server takes no LoRA and no other transformer weights: choose 'none'")
        if settings.kind == LONG_VIDEO:
            raise RefusedError("this server makes no long videos: choose a video of at most "
                               f"{self.max_frames} frames")
        if settings.steps > self.max_steps:
            raise RefusedError(f"this server runs at most {self.max_steps} sampling steps, got {settings.steps}")
        if settings.kind != TEXT_TO_IMAGE and settings.frames > self.max_frames:
            raise RefusedError(f"this server makes at most {self.max_frames} frames, got {settings.frames}")
        if height is not None and width is not None and height * width > self.max_pixels:
            raise RefusedError(f"this server makes frames of at most {self.max_pixels} pixels (e.g. 672 x 384 "
                               f"for {672 * 384}), got {width} x {height}")


@dataclass
class GenerationResult:
    """A saved result: the media file, its settings JSON, and the settings as a dict."""

    path: Path
    settings_path: Path
    is_image: bool
    settings: dict[str, Any]


MEMORY_MODES = ("model_cpu_offload", "sequential_cpu_offload", "gpu")


def easyanimate_loader(memory_mode: str = "model_cpu_offload") -> Callable[[Path, Path | None], Any]:
    """A function loading a model folder with the project's pipeline, optionally with other transformer weights
    (a fine-tuned ``.safetensors``; strict). On CPU everything runs in fp32; on a GPU ``memory_mode`` keeps the
    weights on the CPU and moves each model in when it runs (the original's default), streams every layer
    ("sequential_cpu_offload", for small GPUs), or keeps all of it on the GPU ("gpu")."""
    if memory_mode not in MEMORY_MODES:
        raise ValueError(f"unknown memory mode {memory_mode!r}; choose one of {MEMORY_MODES}")

    def load(model_dir: Path, transformer_weights: Path | None = None) -> Any:
        from easyanimate.pipeline import EasyAnimatePipeline, default_dtype
        from easyanimate.utils.weights import load_weights_into

        offload = torch.cuda.is_available() and memory_mode != "gpu"
        if offload:
            pipe = EasyAnimatePipeline.from_pretrained(model_dir, torch_dtype=default_dtype(torch.device("cuda")),
                                                       device="cpu")
        else:
            pipe = EasyAnimatePipeline.from_pretrained(model_dir)
        if transformer_weights is not None:  # before the offload hooks, which move the weights
            load_weights_into(pipe.transformer, transformer_weights)
        if not offload:
            return pipe
        if memory_mode == "sequential_cpu_offload":
            pipe.enable_sequential_cpu_offload()
        else:
            pipe.enable_model_cpu_offload()
        return pipe

    return load


def _is_inpaint_model(pipe: Any) -> bool:
    """The InP model takes mask + masked-video latents (transformer in_channels != VAE latent channels)."""
    return pipe.transformer.config.in_channels != pipe.vae.config.latent_channels


class Studio:
    """Holds the loaded pipeline and runs generations one at a time, saving each under the output folder."""

    def __init__(
        self,
        models_dir: str | os.PathLike,
        lora_dir: str | os.PathLike,
        output_dir: str | os.PathLike,
        *,
        load_pipeline: Callable[[Path, Path | None], Any] | None = None,
        limits: UploadLimits = UploadLimits(),
        weights_dir: str | os.PathLike | None = None,
        hosted: HostedLimits | None = None,
    ):
        self.models_dir = Path(models_dir)
        self.lora_dir = Path(lora_dir)
        # fine-tuned transformer weights (.safetensors) that replace a model's own, e.g. train.py's results
        self.weights_dir = Path(weights_dir) if weights_dir is not None else self.models_dir / "transformer_weights"
        self.output = OutputFolder(output_dir)
        self.limits = limits
        self.hosted = hosted
        if hosted is not None:
            resolve_model_folder(self.models_dir, hosted.model)  # the one model must exist
        self._load_pipeline = load_pipeline or easyanimate_loader()
        self._lock = threading.Lock()
        self._pipe: Any = None
        self._model_name: str | None = None
        self._weights_name: str = NONE_CHOICE

    # -- choices ---------------------------------------------------------------------------------------------
    def model_choices(self) -> list[str]:
        return [self.hosted.model] if self.hosted else list_model_folders(self.models_dir)

    def lora_choices(self) -> list[str]:
        return [NONE_CHOICE] if self.hosted else [NONE_CHOICE, *list_safetensors_files(self.lora_dir)]

    def weights_choices(self) -> list[str]:
        return [NONE_CHOICE] if self.hosted else [NONE_CHOICE, *list_safetensors_files(self.weights_dir)]

    @property
    def loaded_model(self) -> str | None:
        return self._model_name

    # -- model ---------------------------------------------------------------------------------------------
    def load_model(self, name: str) -> str:
        """Load the model folder ``name`` (waits for a running generation); returns a status line."""
        if self.hosted and name != self.hosted.model:
            raise RefusedError(f"this server serves only the model {self.hosted.model!r}")
        folder = resolve_model_folder(self.models_dir, name)
        with self._lock:
            self._ensure_model(name, folder, NONE_CHOICE, None)
        return f"model {name} loaded"

    def _ensure_model(self, name: str, folder: Path, weights_name: str, weights: Path | None) -> Any:
        """The pipeline of model ``name`` with transformer ``weights`` (None: its own), loaded if it is not the one
        in memory. Choosing "none" again reloads the folder, so its own weights come back."""
        if (self._model_name, self._weights_name) != (name, weights_name):
            self._pipe, self._model_name = None, None  # free the old model before loading the next
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            logger.info("loading model %s%s", folder, f" with transformer weights {weights}" if weights else "")
            self._pipe = self._load_pipeline(folder, weights)
            self._model_name, self._weights_name = name, weights_name
        return self._pipe

    # -- generation ----------------------------------------------------------------------------------------
    def generate(
        self, settings: GenerationSettings, on_step: Callable[[int, int], None] | None = None
    ) -> GenerationResult:
        """Validate, run the pipeline, save the result and its settings; raises RefusedError for bad requests."""
        settings.check()
        folder = resolve_model_folder(self.models_dir, settings.model)
        lora_path = resolve_safetensors_file(self.lora_dir, settings.lora)
        weights = resolve_safetensors_file(self.weights_dir, settings.transformer_weights, what="transformer weights")
        start = open_image_upload(settings.start_image, self.limits, "start image") if settings.start_image else None
        end = open_image_upload(settings.end_image, self.limits, "end image") if settings.end_image else None
        video_frames = video_size = None
        if settings.video:
            video_frames, *video_size = check_video_upload(settings.video, self.limits, "input video")

        height, width = settings.height, settings.width
        if settings.resize_to_reference:
            ref_h, ref_w = (start.height, start.width) if start is not None else video_size
            height, width = reference_size(ref_h, ref_w, settings.base_resolution)
        if self.hosted:
            self.hosted.check(settings, height, width)
        frames = 1 if settings.kind == TEXT_TO_IMAGE else settings.frames
        if settings.kind == VIDEO_TO_VIDEO and video_frames < frames:
            raise RefusedError(
                f"the input video has {video_frames} frames but {frames} were asked for; "
                f"choose a frame count of at most {video_frames // 8 * 8}"
            )
        if settings.kind == LONG_VIDEO and settings.partial_frames <= settings.overlap_frames:
            raise RefusedError("the partial length must be longer than the overlap")
        seed = random.randint(1, SEED_MAX) if settings.seed == -1 else settings.seed

        with self._lock:
            pipe = self._ensure_model(settings.model, folder, settings.transformer_weights or NONE_CHOICE, weights)
            if settings.kind in (IMAGE_TO_VIDEO, LONG_VIDEO) and not _is_inpaint_model(pipe):
                raise RefusedError(f"{settings.kind.lower()} needs an InP model; {settings.model} is a text-only model")
            pipe.set_sampler(settings.sampler)
            began = time.time()
            if lora_path is not None:
                pipe.load_lora(lora_path, settings.lora_strength)
            try:
                videos = self._run(pipe, settings, height, width, frames, seed, start, end, on_step)
            finally:
                if lora_path is not None:
                    pipe.unload_lora()
            used = dataclasses.asdict(settings)
            used.update(seed=seed, height=height, width=width, frames=frames, seconds=round(time.time() - began, 2))
            for key in ("start_image", "end_image", "video"):  # the upload's name, not the server's temp path
                used[key] = Path(used[key]).name if used[key] else None
            return self._save(videos, settings.kind, used)  # inside the lock: output numbers are never shared

    def _run(self, pipe, settings, height, width, frames, seed, start, end, on_step) -> torch.Tensor:
        steps = settings.steps
        if settings.kind == VIDEO_TO_VIDEO:
            steps = max(1, int(steps * settings.denoise_strength))
        calls = 1
        if settings.kind == LONG_VIDEO:
            calls = _long_video_chunks(settings.frames, settings.partial_frames, settings.overlap_frames)
        total = steps * calls
        done = 0

        def step_end(pipeline, step, timestep, kwargs):
            nonlocal done
            done += 1
            if on_step is not None:
                on_step(min(done, total), total)
            return kwargs

        common = dict(
            prompt=settings.prompt,
            negative_prompt=settings.negative_prompt,
            height=height,
            width=width,
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance_scale,
            generator=torch.Generator("cpu").manual_seed(seed),
            callback_on_step_end=step_end,
        )
        if settings.kind == VIDEO_TO_VIDEO:
            from easyanimate.utils.video_io import read_video

            video = read_video(settings.video, num_frames=frames, size=(height, width))[None]
            out = pipe(video_length=frames, video=video, strength=settings.denoise_strength, **common)
        elif settings.kind == LONG_VIDEO:
            out = pipe.generate_long_video(
                video_length=frames,
                chunk_length=settings.partial_frames,
                overlap=settings.overlap_frames,
                image=start,
                end_image=end,
                **common,
            )
        else:
            out = pipe(video_length=frames, image=start, end_image=end, **common)
        return out.videos

    def _save(self, videos: torch.Tensor, kind: str, settings: dict[str, Any]) -> GenerationResult:
        from easyanimate.utils.video_io import save_video

        is_image = videos.shape[2] == 1
        return save_result(self.output, kind, is_image, lambda media: save_video(videos, media, fps=FPS),
                           {**settings, "fps": None if is_image else FPS})


def save_result(output: OutputFolder, kind: str, is_image: bool, write_media: Callable[[Path], Any],
                settings: dict[str, Any]) -> GenerationResult:
    """Write a result under a fresh name in ``output`` (``write_media(path)`` writes it, atomically) and its settings
    JSON beside it, with the result's file name as ``output``."""
    stem = output.new_stem(kind)
    media = output.check(stem.with_suffix(".png" if is_image else ".mp4"))
    write_media(media)
    settings = {**settings, "output": media.name}
    settings_path = output.check(stem.with_suffix(".json"))
    write_text_atomic(settings_path, json.dumps(settings, indent=2, ensure_ascii=False))
    logger.info("saved %s and %s", media, settings_path.name)
    return GenerationResult(path=media, settings_path=settings_path, is_image=is_image, settings=settings)


def _long_video_chunks(frames: int, partial: int, overlap: int) -> int:
    """Pipeline passes for a long video of ``frames`` in chunks of ``partial`` that overlap by ``overlap``
    (the count ``EasyAnimatePipeline.generate_long_video`` makes)."""
    if frames <= partial:
        return 1
    return 1 + -(-(frames - partial) // (partial - overlap))
