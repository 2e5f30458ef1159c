"""From a request to a saved video: open what the request names, run the pipeline, write the result and its settings.

    prepared = prepare(request, LocalFiles())          # every check, and the images / video opened
    pipe = load_pipeline(prepared.model_path, ...)     # or a pipeline already in memory
    generation = generate(pipe, prepared, on_step)     # the pipeline calls (long video too), progress
    write_result(generation, "samples/out.mp4")        # the video (or png) and its settings JSON

:func:`run` does all four for one request. Where files come from is the front end's policy, given as a
:class:`LocalFiles` (paths on this machine, for the command lines and Python) or a subclass (the web server's, which
resolves names inside its folders and checks uploads).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from easyanimate.inference.request import (
    DEFAULT_LABELS,
    IMAGE_KINDS,
    LONG_VIDEO,
    RANDOM_SEED_MAX,
    VIDEO_TO_VIDEO,
    GenerationRequest,
    RequestError,
    RequestLimits,
    check_request,
    long_video_chunks,
    media_name,
    reference_size,
)
from easyanimate.models.step_cache import StepCacheSettings
from easyanimate.utils.atomic import write_text_atomic

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]  # (steps done, steps in all)


class LocalFiles:
    """Files named by a request are paths on this machine (the command lines and Python callers). Subclasses change
    where names point and what is accepted; each method raises :class:`RequestError` with the reason."""

    def model_folder(self, name: str) -> Path:
        from easyanimate.inference.loading import check_model_folder
        from easyanimate.utils.weights import CheckpointError

        try:
            return check_model_folder(name)
        except CheckpointError as exc:
            raise RequestError(str(exc)) from exc

    def lora_file(self, name: str) -> Path:
        if not Path(name).is_file():
            raise RequestError(f"LoRA file not found: {name}")
        return Path(name)

    def transformer_weights(self, name: str, label: str) -> Path:
        """Replacement transformer weights: a weights file or a model folder."""
        return self._weights(name, label)

    def vae_weights(self, name: str, label: str) -> Path:
        """Replacement VAE weights: a weights file or a model folder."""
        return self._weights(name, label)

    def _weights(self, name: str, label: str) -> Path:
        if not Path(name).exists():
            raise RequestError(f"{label} {name}: no such file or folder")
        return Path(name)

    def open_image(self, value, label: str):
        """A PIL image (RGB) from a path or a PIL image."""
        from easyanimate.utils.video_io import MediaError, read_image

        if not isinstance(value, (str, Path)):
            return value.convert("RGB")
        try:
            return read_image(value)
        except MediaError as exc:
            raise RequestError(str(exc)) from exc

    def probe_video(self, value, label: str) -> tuple[int, int, int]:
        """(frames, height, width) of a video file or tensor, without decoding every frame."""
        from easyanimate.utils.video_io import MediaError, probe_video

        if isinstance(value, torch.Tensor):
            return tuple(value.shape[-3:])
        try:
            return probe_video(value)
        except MediaError as exc:
            raise RequestError(str(exc)) from exc

    def read_video(self, value, frames: int, size: tuple[int, int], label: str) -> torch.Tensor | None:
        """The first ``frames`` frames as (3, F, H, W) in [0, 1], resized to ``size`` (height, width); None where
        the video is not needed here (it is generated elsewhere)."""
        from easyanimate.utils.video_io import MediaError, read_video

        if isinstance(value, torch.Tensor):
            video = value[0] if value.ndim == 5 else value
            if video.ndim != 4 or video.shape[0] != 3:
                raise RequestError(f"the {label} tensor must be (3, F, H, W) or (1, 3, F, H, W), got "
                                   f"{tuple(value.shape)}")
            video = video[:, :frames].float()
            if tuple(video.shape[2:]) != tuple(size):  # resized like a file's frames (bicubic, antialiased as PIL)
                video = torch.nn.functional.interpolate(video.transpose(0, 1), size=tuple(size), mode="bicubic",
                                                        antialias=True).clamp(0, 1).transpose(0, 1)
            return video
        try:
            return read_video(value, num_frames=frames, size=size)
        except MediaError as exc:
            raise RequestError(str(exc)) from exc


@dataclass
class PreparedRequest:
    """A checked request with everything it names opened: the size to generate (after "resize to the reference"),
    the frame count, the seed (drawn for -1), the images, the input video (1, 3, F, H, W) and the resolved paths."""

    request: GenerationRequest
    height: int
    width: int
    frames: int
    seed: int
    model_path: Path | None = None
    lora_path: Path | None = None
    transformer_weights_path: Path | None = None
    vae_weights_path: Path | None = None
    start_image: Any = None
    end_image: Any = None
    video: torch.Tensor | None = None

    def settings(self) -> dict[str, Any]:
        """The settings used, as JSON-able data: :func:`request_settings` with the size, frame count and seed
        actually used."""
        return {**request_settings(self.request), "height": self.height, "width": self.width, "frames": self.frames,
                "seed": self.seed}


def request_settings(request: GenerationRequest) -> dict[str, Any]:
    """Every field of ``request`` as JSON-able data, with file names for images and videos (not a server's
    temporary paths)."""
    settings = {f.name: getattr(request, f.name) for f in dataclasses.fields(request)}
    for key in ("start_image", "end_image", "video"):
        settings[key] = media_name(settings[key])
    return settings


def prepare(request: GenerationRequest, files: LocalFiles | None = None, *, labels: Mapping[str, str] | None = None,
            limits: RequestLimits | None = None, is_inpaint: bool | None = None) -> PreparedRequest:
    """Check ``request`` (:func:`check_request`) and open what it names through ``files``; raises
    :class:`RequestError`. ``is_inpaint`` (when the model is known) refuses image kinds for a text-only model.
    Nothing here loads a model, so a front end can call it before minutes of loading."""
    files = files or LocalFiles()
    r = check_request(request, labels=labels, limits=limits)
    names = {**DEFAULT_LABELS, **(labels or {})}
    label = lambda field: names.get(field, field.replace("_", " "))  # noqa: E731  (how the front end names it)
    prepared = PreparedRequest(r, r.height, r.width, r.frames_generated, r.seed)
    if r.model:
        prepared.model_path = files.model_folder(r.model)
    if r.lora:
        prepared.lora_path = files.lora_file(r.lora)
    if r.transformer_weights:
        prepared.transformer_weights_path = files.transformer_weights(r.transformer_weights,
                                                                      label("transformer_weights"))
    if r.vae_weights:
        prepared.vae_weights_path = files.vae_weights(r.vae_weights, label("vae_weights"))
    if is_inpaint is not None:
        check_model_fits(r, is_inpaint)
    if r.device is not None:
        from easyanimate.inference.loading import check_device

        try:
            check_device(r.device)
        except ValueError as exc:
            raise RequestError(f"{label('device')} {exc}") from exc
    prepared.start_image = _open_images(files, r.start_image, label("start_image"))
    prepared.end_image = _open_images(files, r.end_image, label("end_image"))
    video_shape = files.probe_video(r.video, label("video")) if r.video is not None else None
    if r.resize_to_reference:
        if prepared.start_image is not None:
            first = prepared.start_image[0] if isinstance(prepared.start_image, list) else prepared.start_image
            ref_height, ref_width = first.height, first.width
        else:
            ref_height, ref_width = video_shape[1:]
        prepared.height, prepared.width = reference_size(ref_height, ref_width, r.base_resolution)
    if r.parallel_degree > 1:
        from easyanimate.inference.distributed import check_parallel_request

        check_parallel_request(r, prepared.height, prepared.width, prepared.model_path, labels=names)
    if video_shape is not None:
        if video_shape[0] is not None and video_shape[0] < prepared.frames:  # None: not known here
            raise RequestError(f"the input video has {video_shape[0]} frames, fewer than the {prepared.frames} "
                               f"requested; choose a frame count of at most {video_shape[0] // 8 * 8}")
        video = files.read_video(r.video, prepared.frames, (prepared.height, prepared.width), label("video"))
        prepared.video = None if video is None else video[None]
    if r.seed == -1:
        prepared.seed = random.randint(1, RANDOM_SEED_MAX)
    return prepared


def _open_images(files: LocalFiles, value, label: str):
    """One image stays one image (kept on 3 frames); a list stays a list (one frame each)."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return [files.open_image(v, label) for v in value]
    return files.open_image(value, label)


def check_model_fits(request: GenerationRequest, is_inpaint: bool, model_name: str | None = None) -> None:
    """Refuse image to video and long video for a text-only (non-InP) model."""
    if request.kind in IMAGE_KINDS and not is_inpaint:
        name = model_name or request.model or "this model"
        raise RequestError(f"{request.kind.lower()} needs an InP (image-to-video) model; {name} is a text-only model")


@dataclass
class Generation:
    """A generated video (1, 3, F, H, W) in [0, 1] on the CPU and the settings that made it (JSON-able). ``videos``
    is None on the processes of a sequence-parallel launch other than rank 0: they neither decode nor write."""

    videos: torch.Tensor | None
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def is_image(self) -> bool:
        return self.videos.shape[2] == 1


def total_steps(prepared: PreparedRequest) -> int:
    """Denoising steps a generation runs in all (video to video runs ``int(steps * strength)``; a long video runs
    the steps once per chunk), for progress reporting."""
    r = prepared.request
    steps = max(1, int(r.steps * r.denoise_strength)) if r.kind == VIDEO_TO_VIDEO else r.steps
    if r.kind == LONG_VIDEO:
        steps *= long_video_chunks(prepared.frames, r.partial_frames, r.overlap_frames)
    return steps


def generate(pipe, prepared: PreparedRequest, on_step: ProgressCallback | None = None) -> Generation:
    """Run ``pipe`` for a prepared request: its sampler, its LoRA merged for this call only (removed again, also on
    failure), the pipeline call its kind needs. ``on_step(done, total)`` follows the denoising steps. Running out
    of GPU memory raises :class:`~easyanimate.inference.loading.OutOfGPUMemory` naming what to try instead."""
    from easyanimate.inference.loading import advise_on_out_of_memory

    r = prepared.request
    check_model_fits(r, pipe.is_inpaint)
    total, done = total_steps(prepared), 0

    def step_end(pipeline, step, timestep, tensors):
        nonlocal done
        done += 1
        if on_step is not None:
            on_step(min(done, total), total)
        return tensors

    pipe.set_sampler(r.sampler)
    began = time.time()
    if prepared.lora_path is not None:
        pipe.load_lora(prepared.lora_path, r.lora_strength)
    try:
        # a CUDA out-of-memory error becomes an OutOfGPUMemory (a RequestError) naming the memory mode or size to try
        with advise_on_out_of_memory(r.memory_mode, prepared.height, prepared.width, prepared.frames, r.vae_tiling):
            videos, evaluations = _call_pipeline(pipe, prepared, step_end)
    finally:
        if prepared.lora_path is not None:
            pipe.unload_lora()
    settings = prepared.settings()
    settings.update(seconds=round(time.time() - began, 2), transformer_evaluations=evaluations,
                    compute_dtype=_compute_dtype(pipe))
    return Generation(videos if _decodes(pipe, r) else None, settings)


def _compute_dtype(pipe) -> str | None:
    """The dtype the pipeline computed in (what ``dtype="auto"`` resolved to), e.g. "bfloat16"; None if unknown."""
    from easyanimate.inference.loading import dtype_name

    text_encoder = getattr(pipe, "text_encoder", None)  # never fp8-stored, unlike the transformer's linear layers
    dtype = getattr(text_encoder, "dtype", None)
    return dtype_name(dtype) if isinstance(dtype, torch.dtype) else None


def _decodes(pipe, request: GenerationRequest) -> bool:
    """Whether this process decodes the video: always, except under sequence parallelism, where rank 0 alone does
    (the others hold the same latents and write nothing; splitting the causal VAE's decode would need halo exchanges
    in every 3D convolution) -- but every process decodes the chunks of a long video, whose next chunk starts from
    the decoded frames (no slower: rank 0 decodes them meanwhile)."""
    parallel = getattr(getattr(pipe, "transformer", None), "sequence_parallel", None)
    return parallel is None or parallel.rank == 0 or request.kind == LONG_VIDEO


def _call_pipeline(pipe, prepared: PreparedRequest, step_end) -> tuple[torch.Tensor, int | None]:
    """The pipeline call the request's kind needs; returns the videos and the steps that ran every transformer
    block (None when the pipeline does not say)."""
    r = prepared.request
    common = dict(
        prompt=r.prompt,
        negative_prompt=r.negative_prompt,
        height=prepared.height,
        width=prepared.width,
        num_inference_steps=r.steps,
        guidance_scale=r.guidance_scale,
        generator=torch.Generator("cpu").manual_seed(prepared.seed),
        callback_on_step_end=step_end,
        step_cache=StepCacheSettings(r.step_cache, r.step_cache_skip_start) if r.step_cache > 0 else False,
    )
    if not _decodes(pipe, r):
        common["output_type"] = "latent"
    if r.kind == VIDEO_TO_VIDEO:
        # every pixel is generated (mask 255), as the original passes it; strength decides how far from the video
        mask = torch.full((1, 1, *prepared.video.shape[2:]), 255.0)
        out = pipe(video_length=prepared.frames, video=prepared.video, mask_video=mask,
                   strength=r.denoise_strength, **common)
    elif r.kind == LONG_VIDEO:
        out = pipe.generate_long_video(video_length=prepared.frames, chunk_length=r.partial_frames,
                                       overlap=r.overlap_frames, image=prepared.start_image,
                                       end_image=prepared.end_image, **common)
    else:
        out = pipe(video_length=prepared.frames, image=prepared.start_image, end_image=prepared.end_image, **common)
    return out.videos, getattr(out, "transformer_evaluations", None)


def write_result(generation: Generation, path: str | Path, *, fps: int | None = None,
                 color_transfer: bool | None = None) -> tuple[Path, Path]:
    """Write the video (mp4/gif; a png for one frame) to ``path`` and its settings beside it as ``<stem>.json``
    (with the result's file name as ``output``), each through a temporary file, so a crash never leaves a
    half-written result. ``fps`` / ``color_transfer`` default to the request's. Returns both paths."""
    from easyanimate.utils.video_io import save_video

    settings = generation.settings
    fps = fps if fps is not None else settings.get("fps", 24)
    color_transfer = color_transfer if color_transfer is not None else settings.get("color_transfer", False)
    media = save_video(generation.videos, path, fps=fps, color_transfer=color_transfer)
    generation.settings = {**settings, "fps": None if generation.is_image else fps, "output": media.name}
    return media, write_settings(generation.settings, media)


def write_settings(settings: Mapping[str, Any], media: Path) -> Path:
    """Write ``settings`` (with the result's file name as ``output``) as ``<media stem>.json`` beside the result,
    through a temporary file; returns its path."""
    settings_path = Path(media).with_suffix(".json")
    text = json.dumps({**settings, "output": Path(media).name}, indent=2, ensure_ascii=False, default=str)
    write_text_atomic(settings_path, text)
    logger.info("saved %s and %s", media, settings_path.name)
    return settings_path


def run(request: GenerationRequest, output: str | Path, *, files: LocalFiles | None = None,
        on_step: ProgressCallback | None = None) -> tuple[Path, Path] | None:
    """Check, load, generate and write one request (the command lines' whole job); returns the result's and its
    settings file's paths (None on the processes of a sequence-parallel launch that write nothing)."""
    from easyanimate.inference.loading import folder_is_inpaint

    prepared = prepare(request, files, is_inpaint=folder_is_inpaint(request.model))
    generation = generate(load_for(prepared), prepared, on_step)
    return None if generation.videos is None else write_result(generation, output)


def load_for(prepared: PreparedRequest):
    """The pipeline a prepared request asks for: its model folder, replacement weights, memory mode, dtype,
    device, sampler, VAE tiling, compiled blocks and sequence-parallel degrees (connecting the processes of the
    launch first)."""
    from easyanimate.inference.loading import load_pipeline

    r = prepared.request
    return load_pipeline(prepared.model_path, prepared.transformer_weights_path,
                         vae_weights=prepared.vae_weights_path, memory_mode=r.memory_mode, dtype=r.dtype,
                         device=r.device, sampler=r.sampler, vae_tiling=r.vae_tiling, compile=r.compile,
                         ulysses_degree=r.ulysses_degree, ring_degree=r.ring_degree)
