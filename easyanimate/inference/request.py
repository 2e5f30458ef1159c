"""One generation request, whichever front end it comes from, and the one validator for it.

A :class:`GenerationRequest` holds every setting of one generation: the model and the weights put into it, the kind
(text/image/video to video, text to image, long video), prompts, size, frame count, sampler, steps, guidance, seed,
the start/end images or input video, LoRA, long-video chunking, memory mode and dtype. The command lines, the web
page, its API, the original's HTTP routes and training's validation samples each translate their input into one and
hand it to :func:`~easyanimate.inference.runner.prepare`, which calls :func:`check_request` (the settings alone) and
then opens the files it names.

Errors are :class:`RequestError` messages that name the setting, the rule and a fix. Front ends name settings their
own way (``--height`` on a command line, "frame count" on the page) by passing ``labels``; a front end that offers
only part of the valid range (the page's sliders) passes :class:`RequestLimits`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Union

from easyanimate.models.step_cache import RECOMMENDED_SKIP_START_STEPS

TEXT_TO_VIDEO = "Text to Video"
TEXT_TO_IMAGE = "Text to Image"
IMAGE_TO_VIDEO = "Image to Video"
VIDEO_TO_VIDEO = "Video to Video"
LONG_VIDEO = "Long Video"
KINDS = (TEXT_TO_VIDEO, TEXT_TO_IMAGE, IMAGE_TO_VIDEO, VIDEO_TO_VIDEO, LONG_VIDEO)
IMAGE_KINDS = (IMAGE_TO_VIDEO, LONG_VIDEO)  # the kinds that take start / end images (and need the InP model)

# The original's sampler names; ``easyanimate.pipeline.SAMPLERS`` maps them to scheduler classes (a test keeps the
# two in sync; this list needs no heavy imports, so --help and input checks stay fast).
SAMPLER_NAMES = ("Euler", "Euler A", "DPM++", "PNDM", "DDIM", "LCM")
# Where the weights live while generating; only matters on an accelerator. "gpu": all on the GPU;
# "model_cpu_offload": each model moves to the GPU while it runs; "model_cpu_offload_and_fp8": the same with the
# transformer's large weights stored in fp8 (half their bytes; on a CPU the fp8 storage applies alone);
# "sequential_cpu_offload": every layer streams in.
MEMORY_MODES = ("model_cpu_offload", "model_cpu_offload_and_fp8", "sequential_cpu_offload", "gpu")
# "none": the command lines' earlier name for "gpu"; "model_cpu_offload_and_qfloat8": the original's name.
MEMORY_MODE_ALIASES = {"none": "gpu", "model_cpu_offload_and_qfloat8": "model_cpu_offload_and_fp8"}
FP8_MEMORY_MODES = ("model_cpu_offload_and_fp8",)  # the modes that store the transformer's weights in fp8
DTYPES = ("auto", "float32", "bfloat16", "float16")


def memory_mode_name(name: str) -> str:
    """A memory mode by its one name (an older or the original's name maps to it; unknown names pass through)."""
    return MEMORY_MODE_ALIASES.get(name, name)

SIZE_MULTIPLE = 16  # the transformer's patch (2) times the VAE's spatial downsampling (8)
FRAME_MULTIPLE = 8  # the VAE's temporal chunk (mini_batch_encoder): a video has a multiple of 8 frames
START_FRAMES = 3  # frames one start (or end) image is kept on, as the original's image-to-video helper does
BASE_RESOLUTIONS = (512, 768, 960)  # "resize to the reference": the bucket table scaled to one of these
RANDOM_SEED_MAX = 10**8  # seed -1 draws one in [1, RANDOM_SEED_MAX], as the original's dice button
SEED_MAX = 2**63 - 1

ImageInput = Union[str, os.PathLike, Any]  # a path or a PIL image
VideoInput = Union[str, os.PathLike, Any]  # a path or a (3, F, H, W) / (1, 3, F, H, W) float tensor in [0, 1]


class RequestError(ValueError):
    """A request that cannot run as given; the message names the setting, the rule and how to fix it."""


@dataclass(frozen=True)
class RequestLimits:
    """The ranges a front end offers, narrower than what the pipeline accepts (the web page's sliders): sizes,
    frames of one pass and of a long video, long-video chunk and overlap, steps, guidance, denoise and LoRA
    strength."""

    size: tuple[int, int] = (16, 2048)
    frames: tuple[int, int] = (8, 144)
    long_frames_max: int = 1440
    overlap: tuple[int, int] = (1, 4)
    steps: tuple[int, int] = (1, 100)
    guidance_scale: tuple[float, float] = (0.0, 20.0)
    denoise_strength: tuple[float, float] = (0.05, 1.0)
    lora_strength: tuple[float, float] = (0.0, 2.0)


# How settings are named in messages unless a front end passes its own names.
DEFAULT_LABELS = {
    "steps": "sampling steps",
    "frames": "frame count",
    "partial_frames": "partial length",
    "overlap_frames": "overlap",
    "guidance_scale": "guidance scale",
    "denoise_strength": "denoise strength",
    "lora_strength": "LoRA strength",
    "seed": "seed",
    "start_image": "start image",
    "end_image": "end image",
    "video": "input video",
    "lora": "LoRA",
    "transformer_weights": "transformer weights",
    "vae_weights": "VAE weights",
    "base_resolution": "base resolution",
    "step_cache": "step cache threshold",
    "step_cache_skip_start": "step cache start steps",
    "ulysses_degree": "Ulysses degree",
    "ring_degree": "ring degree",
}

# The released model's recommended settings, used for any model folder that brings none of its own
# (``generation_defaults.json``, read by :mod:`easyanimate.inference.defaults`).
RELEASED_PROMPT = (
    "A young woman with beautiful, clear eyes and blonde hair stands in the forest, wearing a white dress and a "
    "crown. Her expression is serene. The camera slowly zooms in. High quality, masterpiece, best quality."
)
RELEASED_NEGATIVE_PROMPT = (
    "Blurring, mutation, deformation, distortion, dark and solid, comics, text subtitles, line art, static, "
    "ugly, error, messy code, low quality."
)
DEFAULT_LORA_STRENGTH = 0.55


@dataclass
class GenerationRequest:
    """Every setting of one generation.

    ``model`` is a model folder (a path for the command lines and Python; a name the server resolves inside its
    models folder for the web UI and HTTP routes); ``lora`` / ``transformer_weights`` / ``vae_weights`` likewise
    name files (None: none). ``frames`` is ignored for text to image (one frame). ``start_image`` / ``end_image``
    are one image (kept on the first / last 3 frames) or a list of images (kept as that many first / last frames);
    ``video`` is the input of video to video. ``partial_frames`` / ``overlap_frames`` chunk a long video.
    ``seed`` -1 draws a random seed, recorded with the result. ``step_cache`` > 0 lets steps whose transformer output
    barely changes reuse the last full step's (:mod:`easyanimate.models.step_cache`). ``ulysses_degree`` x
    ``ring_degree`` > 1 splits the transformer's tokens across that many processes, which must have been launched
    together (torchrun; see :mod:`easyanimate.inference.distributed`). Defaults are the released model's recommended
    settings; :meth:`ModelDefaults.request <easyanimate.inference.defaults.ModelDefaults.request>` starts from
    a model folder's own.
    """

    model: str = ""
    kind: str = TEXT_TO_VIDEO
    prompt: str = RELEASED_PROMPT
    negative_prompt: str = RELEASED_NEGATIVE_PROMPT
    sampler: str = "Euler"
    steps: int = 25
    width: int = 672
    height: int = 384
    frames: int = 144
    guidance_scale: float = 7.0
    seed: int = 43
    lora: str | None = None
    lora_strength: float = DEFAULT_LORA_STRENGTH
    transformer_weights: str | None = None
    vae_weights: str | None = None
    denoise_strength: float = 0.70
    partial_frames: int = 72
    overlap_frames: int = 4
    resize_to_reference: bool = False
    base_resolution: int = 512
    start_image: ImageInput | list[ImageInput] | None = None
    end_image: ImageInput | list[ImageInput] | None = None
    video: VideoInput | None = None
    memory_mode: str = "model_cpu_offload"
    compile: bool = False  # torch.compile each transformer block (regional compilation; see inference/loading.py)
    dtype: str = "auto"
    device: str | None = None
    vae_tiling: bool = False
    fps: int = 24
    color_transfer: bool = False
    step_cache: float = 0.0  # threshold of the adaptive step cache; 0 runs every transformer block at every step
    step_cache_skip_start: int = RECOMMENDED_SKIP_START_STEPS  # steps at the start that always run in full
    # Sequence parallelism (models/sequence_parallel.py): one video's tokens split across ulysses x ring processes.
    ulysses_degree: int = 1  # all-to-all over heads: must divide the attention heads
    ring_degree: int = 1  # k, v passed around a ring (CUDA only)

    @property
    def parallel_degree(self) -> int:
        """Processes one generation is split across (1: not split)."""
        return self.ulysses_degree * self.ring_degree

    def replace(self, **changes) -> "GenerationRequest":
        """A copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    @property
    def is_image(self) -> bool:
        """True when one frame is generated (text to image, or text to video of one frame)."""
        return self.kind == TEXT_TO_IMAGE or (self.kind == TEXT_TO_VIDEO and self.frames == 1)

    @property
    def frames_generated(self) -> int:
        return 1 if self.is_image else self.frames


def _image_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


class _Checker:
    """The rules of :func:`check_request`, with the front end's names and ranges."""

    def __init__(self, labels: Mapping[str, str] | None, limits: RequestLimits | None):
        self.labels = {**DEFAULT_LABELS, **(labels or {})}
        self.limits = limits

    def label(self, field: str) -> str:
        return self.labels.get(field, field)

    def fail(self, message: str):
        raise RequestError(message)

    def in_range(self, field: str, value, bounds, step: int | None = None) -> None:
        low, high = bounds
        if not low <= value <= high or (step and value % step):
            rule = f"between {low} and {high}" + (f" and a multiple of {step}" if step else "")
            self.fail(f"{self.label(field)} must be {rule}, got {value}")

    def at_least(self, field: str, value, low) -> None:
        if value < low:
            self.fail(f"{self.label(field)} must be at least {low}, got {value}")


def check_request(request: GenerationRequest, *, labels: Mapping[str, str] | None = None,
                  limits: RequestLimits | None = None) -> GenerationRequest:
    """Check every setting that can be checked without opening a file; raise :class:`RequestError` for the first
    that is wrong. ``labels`` maps setting names to the front end's names for them; ``limits`` narrows the ranges.
    Returns the request with text to video of one frame made text to image."""
    c = _Checker(labels, limits)
    if request.kind not in KINDS:
        c.fail(f"unknown generation kind {request.kind!r}; choose one of {list(KINDS)}")
    if request.sampler not in SAMPLER_NAMES:
        c.fail(f"unknown sampler {request.sampler!r}; choose one of {list(SAMPLER_NAMES)}")
    if not isinstance(request.prompt, str) or not isinstance(request.negative_prompt, str):
        c.fail("the prompt and the negative prompt must be text")
    if request.memory_mode not in MEMORY_MODES and request.memory_mode not in MEMORY_MODE_ALIASES:
        c.fail(f"unknown memory mode {request.memory_mode!r}; choose one of {list(MEMORY_MODES)}")
    if request.dtype not in DTYPES:
        c.fail(f"unknown dtype {request.dtype!r}; choose one of {list(DTYPES)}")
    memory_mode = MEMORY_MODE_ALIASES.get(request.memory_mode, request.memory_mode)
    if request.compile and memory_mode == "sequential_cpu_offload":
        # Its hooks swap every layer's weights in and out inside the forward, which a compiled block cannot trace.
        c.fail(f"{c.label('compile')} does not work with memory mode sequential_cpu_offload; for a small GPU use "
               "model_cpu_offload_and_fp8 with it, or turn compile off")
    if request.kind == TEXT_TO_VIDEO and request.frames == 1:
        request = request.replace(kind=TEXT_TO_IMAGE)
    _check_parallel(c, request)
    _check_numbers(c, request)
    _check_size(c, request)
    _check_frames(c, request)
    _check_inputs(c, request)
    return request


def _check_parallel(c: _Checker, r: GenerationRequest) -> None:
    """The sequence-parallel degrees alone; :func:`~easyanimate.inference.distributed.check_parallel_request` checks
    them against the launch, the model, the device and the size."""
    for field in ("ulysses_degree", "ring_degree"):
        value = getattr(r, field)
        if not isinstance(value, int) or value < 1:
            c.fail(f"{c.label(field)} must be a whole number >= 1 (1: not split), got {value!r}")
    if r.compile and r.parallel_degree > 1:
        # the attention's all-to-all inside a block would break the compiled block's single graph
        c.fail(f"{c.label('compile')} does not work with sequence parallelism ({c.label('ulysses_degree')} / "
               f"{c.label('ring_degree')} > 1) yet; turn one of them off")


def _check_numbers(c: _Checker, r: GenerationRequest) -> None:
    limits = c.limits
    if limits is not None:
        c.in_range("steps", r.steps, limits.steps)
        c.in_range("guidance_scale", r.guidance_scale, limits.guidance_scale)
        c.in_range("lora_strength", r.lora_strength, limits.lora_strength)
    else:
        c.at_least("steps", r.steps, 1)
        if not math.isfinite(r.guidance_scale) or r.guidance_scale < 0:
            c.fail(f"{c.label('guidance_scale')} must be a number >= 0 (<= 1 turns guidance off), "
                   f"got {r.guidance_scale}")
    if r.seed != -1 and not 0 <= r.seed <= SEED_MAX:
        c.fail(f"{c.label('seed')} must be between 0 and {SEED_MAX} (or -1 for a random one), got {r.seed}")
    c.at_least("fps", r.fps, 1)
    if not (math.isfinite(r.step_cache) and r.step_cache >= 0):
        c.fail(f"{c.label('step_cache')} must be a number >= 0 (0 turns step caching off), got {r.step_cache}")
    c.at_least("step_cache_skip_start", r.step_cache_skip_start, 0)
    if r.kind == VIDEO_TO_VIDEO:
        if limits is not None:
            c.in_range("denoise_strength", r.denoise_strength, limits.denoise_strength)
        elif not 0.0 < r.denoise_strength <= 1.0:
            c.fail(f"{c.label('denoise_strength')} must be in (0, 1], got {r.denoise_strength}")
        if int(r.steps * r.denoise_strength) < 1:
            c.fail(f"{c.label('denoise_strength')} {r.denoise_strength} with {r.steps} {c.label('steps')} runs no "
                   "step; raise either")


def _check_size(c: _Checker, r: GenerationRequest) -> None:
    if r.resize_to_reference:
        if r.base_resolution not in BASE_RESOLUTIONS:
            c.fail(f"{c.label('base_resolution')} must be one of {BASE_RESOLUTIONS}, got {r.base_resolution}")
        return
    for field in ("width", "height"):
        value = getattr(r, field)
        if c.limits is not None:
            c.in_range(field, value, c.limits.size, SIZE_MULTIPLE)
        elif value < SIZE_MULTIPLE or value % SIZE_MULTIPLE:
            lower = max(SIZE_MULTIPLE, value // SIZE_MULTIPLE * SIZE_MULTIPLE)
            c.fail(f"{c.label(field)} must be a positive multiple of {SIZE_MULTIPLE}, got {value}; "
                   f"try {lower} or {lower + SIZE_MULTIPLE}")


def _check_frames(c: _Checker, r: GenerationRequest) -> None:
    m, limits = FRAME_MULTIPLE, c.limits
    if r.kind == TEXT_TO_IMAGE:
        return
    if r.kind == LONG_VIDEO:
        if limits is not None:
            c.in_range("frames", r.frames, (limits.frames[0], limits.long_frames_max), m)
            c.in_range("partial_frames", r.partial_frames, limits.frames, m)
            c.in_range("overlap_frames", r.overlap_frames, limits.overlap)
        else:
            c.at_least("frames", r.frames, 1)
            if r.partial_frames < m or r.partial_frames % m:
                c.fail(f"{c.label('partial_frames')} must be a positive multiple of {m}, got {r.partial_frames}")
        if not 1 <= r.overlap_frames < r.partial_frames:
            c.fail(f"{c.label('overlap_frames')} must be between 1 and {c.label('partial_frames')} - 1, "
                   f"got {r.overlap_frames}")
        return
    if r.kind == IMAGE_TO_VIDEO and r.frames == 1:
        c.fail(f"image to video needs more than one frame ({c.label('frames')})")
    if limits is not None:
        c.in_range("frames", r.frames, limits.frames, m)
    elif r.frames < 1 or r.frames % m:
        one = "1 or " if r.kind == TEXT_TO_VIDEO else ""
        c.fail(f"{c.label('frames')} must be {one}a multiple of {m}, got {r.frames}")


def _check_inputs(c: _Checker, r: GenerationRequest) -> None:
    starts, ends = _image_list(r.start_image), _image_list(r.end_image)
    if r.kind == VIDEO_TO_VIDEO and r.video is None:
        c.fail("video to video needs an input video: upload one")
    if r.kind == IMAGE_TO_VIDEO and not starts:
        c.fail("image to video needs a start image: upload one")
    if ends and not starts:
        c.fail("an end image needs a start image too: upload a start image")
    if r.kind not in IMAGE_KINDS and (starts or ends):
        c.fail(f"{r.kind.lower()} takes no start or end image; choose image to video or long video")
    if r.kind != VIDEO_TO_VIDEO and r.video is not None:
        c.fail(f"{r.kind.lower()} takes no input video; choose video to video")
    if r.resize_to_reference and not (starts or (r.kind == VIDEO_TO_VIDEO and r.video is not None)):
        c.fail("resize to the reference needs a start image or an input video; upload one or set the size")
    if r.kind in IMAGE_KINDS:
        _check_known_frames(c, r, starts, ends)


def _check_known_frames(c: _Checker, r: GenerationRequest, starts: list, ends: list) -> None:
    """Several start (end) images are the first (last) frames of the first (last) pass: they must fit in it."""
    one_pass = r.kind == IMAGE_TO_VIDEO or r.frames <= r.partial_frames
    pass_frames, where = (r.frames, "") if one_pass else (r.partial_frames, " per chunk")
    known = {field: len(images) for field, images in (("start_image", starts), ("end_image", ends))
             if len(images) > 1}
    for field, count in known.items():
        if count > pass_frames:
            c.fail(f"{c.label(field)}: {count} images but only {pass_frames} frames are generated{where}")
    if one_pass and len(known) == 2 and sum(known.values()) > pass_frames:
        c.fail(f"{known['start_image']} start and {known['end_image']} end images overlap in {pass_frames} frames: "
               f"give fewer images or more {c.label('frames')}")


def round_frames(frames: int) -> int:
    """The frame count rounded down to a multiple of 8 (the VAE's chunk), as the original's scripts do; 1 (an
    image) and counts below 8 are returned unchanged (:func:`check_request` names them)."""
    if frames == 1 or frames < FRAME_MULTIPLE:
        return frames
    return frames // FRAME_MULTIPLE * FRAME_MULTIPLE


def reference_size(ref_height: int, ref_width: int, base_resolution: int) -> tuple[int, int]:
    """(height, width) for a reference of the given size: the closest aspect-ratio bucket scaled to
    ``base_resolution``, each side floored to a multiple of 16 (the original's "Resize according to Reference")."""
    from easyanimate.data.buckets import bucket_crop_size, closest_ratio

    return bucket_crop_size(closest_ratio(ref_height, ref_width), base_resolution)


def long_video_chunks(frames: int, partial: int, overlap: int) -> int:
    """Pipeline passes for a long video of ``frames`` in chunks of ``partial`` frames that share ``overlap``."""
    if frames <= partial:
        return 1
    return 1 + -(-(frames - partial) // (partial - overlap))


def media_name(value) -> str | list[str] | None:
    """How an image or video input is recorded in a settings file: the file name (not a server's temporary path),
    ``"<image>"`` / ``"<video>"`` for one given in memory, a list for several."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        names = [media_name(v) for v in value]
        return names[0] if len(names) == 1 else names
    if isinstance(value, (str, os.PathLike)):
        return Path(value).name
    return "<video>" if hasattr(value, "ndim") else "<image>"
