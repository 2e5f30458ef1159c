"""The web server's side of a generation, independent of Gradio: which files a request may name, the one loaded
model, one generation at a time, and every result saved with the settings that made it.

A request from the page, its API or the original's HTTP routes is a :class:`~easyanimate.inference.GenerationRequest`
checked by the request layer within the page's ranges (:data:`PAGE_LIMITS`). :class:`ServerFiles` is this server's
policy for the files it names: models, LoRAs and transformer weights only from their folders (by name, never by a
path that leaves them), uploads only within :class:`~easyanimate.ui.safety.UploadLimits`.

The :class:`Studio` owns the one loaded pipeline. A lock covers both model switching and generation, so a model
switch waits for the running generation to finish instead of swapping weights under it (the Gradio queue also
serialises them; the lock keeps that true for any other caller).

Several processes (``torchrun --nproc_per_node N app.py --ulysses-degree N``): every process builds a Studio with
the launch's :class:`~easyanimate.inference.distributed.ControlChannel`. Rank 0's serves; the others call
:meth:`Studio.follow`. Each job rank 0 accepts -- a model switch, or a generation checked and prepared on rank 0 --
is handed to every process (:meth:`Studio._lead`) and run by all of them through the same code (:meth:`Studio._run`):
the same model, LoRA and weights, the same prepared request (seed drawn, uploads opened), together in the
transformer's collectives; rank 0 alone saves the result. A cancel is agreed at every step, so all processes stop at
the same one. :meth:`Studio.close` stops the followers.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from easyanimate.inference.defaults import ModelDefaults, read_model_defaults
from easyanimate.inference.request import (  # noqa: F401  (re-exported for the page)
    BASE_RESOLUTIONS,
    IMAGE_TO_VIDEO,
    KINDS,
    LONG_VIDEO,
    MEMORY_MODES,
    RANDOM_SEED_MAX,
    SAMPLER_NAMES,
    TEXT_TO_IMAGE,
    TEXT_TO_VIDEO,
    VIDEO_TO_VIDEO,
    GenerationRequest,
    RequestLimits,
    reference_size,
)
from easyanimate.inference.distributed import ControlChannel, ProcessesOutOfStep, check_model_heads
from easyanimate.inference.runner import (
    Generation,
    LocalFiles,
    PreparedRequest,
    generate,
    prepare,
    write_result,
    write_settings,
)
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

logger = logging.getLogger(__name__)

PAGE_LIMITS = RequestLimits()  # the ranges of the page's sliders; the server enforces them for API clients too
GenerationSettings = GenerationRequest  # what the page, its API and the HTTP routes send
SAMPLERS = SAMPLER_NAMES
SEED_MAX = RANDOM_SEED_MAX


class GenerationCancelled(RefusedError):
    """A generation stopped at a step because its user cancelled it (or the server is closing)."""


@dataclass(frozen=True)
class Job:
    """What every process of the server runs for one request: hold model ``model`` (folder ``folder``, transformer
    weights ``weights`` named ``weights_name``, None: its own) and, unless this is only a model switch, generate
    ``prepared``. Rank 0 builds it; in a sequence-parallel launch it is pickled to the other processes."""

    model: str
    folder: Path
    weights_name: str | None = None
    weights: Path | None = None
    prepared: PreparedRequest | None = None


STOP = "stop"  # the message that ends the followers' loop


def none_to_null(name: str | None) -> str | None:
    """A picker's choice as a request's file name: "none" (or nothing) is None."""
    return None if name in (None, "", NONE_CHOICE) else name


class ServerFiles(LocalFiles):
    """The server's rules for the files a request names: a model is a folder of ``models_dir``, a LoRA or transformer
    weights a ``.safetensors`` file of ``lora_dir`` / ``weights_dir`` (named as listed; real paths must stay inside),
    images and videos are uploads within ``limits``. VAE weights are not offered."""

    def __init__(self, models_dir: Path, lora_dir: Path, weights_dir: Path, limits: UploadLimits):
        self.models_dir, self.lora_dir, self.weights_dir, self.limits = models_dir, lora_dir, weights_dir, limits

    def model_folder(self, name: str) -> Path:
        return resolve_model_folder(self.models_dir, name)

    def lora_file(self, name: str) -> Path:
        return resolve_safetensors_file(self.lora_dir, name)

    def transformer_weights(self, name: str, label: str) -> Path:
        return resolve_safetensors_file(self.weights_dir, name, what="transformer weights")

    def vae_weights(self, name: str, label: str) -> Path:
        raise RefusedError("this server takes no VAE weights")

    def open_image(self, value, label: str):
        if not isinstance(value, (str, os.PathLike)):
            return super().open_image(value, label)
        return open_image_upload(value, self.limits, label)

    def probe_video(self, value, label: str) -> tuple[int, int, int]:
        if not isinstance(value, (str, os.PathLike)):
            return super().probe_video(value, label)
        return check_video_upload(value, self.limits, label)


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
        if self.max_steps < 1 or self.max_frames < PAGE_LIMITS.frames[0] or self.max_pixels < 16 * 16:
            raise ValueError(f"hosted limits too small to generate anything: {self}")
        if self.max_frames % 8:
            raise ValueError(f"the most frames must be a multiple of 8 (the VAE's frame chunk), got {self.max_frames}")

    def check(self, request: GenerationRequest, height: int | None, width: int | None) -> None:
        """Refuse what this server does not offer; ``height`` x ``width`` is the size that would be generated
        (None when another server decides it)."""
        if request.model != self.model:
            raise RefusedError(f"this server serves only the model {self.model!r}")
        if none_to_null(request.lora) or none_to_null(request.transformer_weights):
            raise RefusedError("this server takes no LoRA and no other transformer weights: choose 'none'")
        if request.kind == LONG_VIDEO:
            raise RefusedError("this server makes no long videos: choose a video of at most "
                               f"{self.max_frames} frames")
        if request.steps > self.max_steps:
            raise RefusedError(f"this server runs at most {self.max_steps} sampling steps, got {request.steps}")
        if request.kind != TEXT_TO_IMAGE and request.frames > self.max_frames:
            raise RefusedError(f"this server makes at most {self.max_frames} frames, got {request.frames}")
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


def easyanimate_loader(memory_mode: str = "model_cpu_offload", compile: bool = False, *, ulysses_degree: int = 1,
                       ring_degree: int = 1) -> Callable[[Path, Path | None], Any]:
    """A function loading a model folder (with other transformer weights, or None for its own) with the project's
    loader in ``memory_mode``, with compiled transformer blocks when ``compile``, its transformer split across the
    ``ulysses_degree x ring_degree`` processes of this launch (see
    :func:`easyanimate.inference.loading.load_pipeline`)."""
    from easyanimate.inference.loading import load_pipeline

    if memory_mode not in MEMORY_MODES:
        raise ValueError(f"unknown memory mode {memory_mode!r}; choose one of {MEMORY_MODES}")
    return functools.partial(load_pipeline, memory_mode=memory_mode, compile=compile, ulysses_degree=ulysses_degree,
                             ring_degree=ring_degree)


class Studio:
    """Holds the loaded pipeline and runs generations one at a time, saving each under the output folder. With a
    ``channel`` it is one process of a sequence-parallel server (see the module docstring): rank 0's leads, the
    others :meth:`follow`."""

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
        channel: ControlChannel | None = None,
    ):
        self.models_dir = Path(models_dir)
        self.lora_dir = Path(lora_dir)
        # fine-tuned transformer weights (.safetensors) that replace a model's own, e.g. train.py's results
        self.weights_dir = Path(weights_dir) if weights_dir is not None else self.models_dir / "transformer_weights"
        self.output = OutputFolder(output_dir)
        self.limits = limits
        self.files = ServerFiles(self.models_dir, self.lora_dir, self.weights_dir, limits)
        self.hosted = hosted
        if hosted is not None:
            resolve_model_folder(self.models_dir, hosted.model)  # the one model must exist
        self._load_pipeline = load_pipeline or easyanimate_loader()
        self._lock = threading.Lock()
        self._pipe: Any = None
        self._model_name: str | None = None
        self._weights_name: str | None = None
        self._channel = channel
        self._closing = threading.Event()  # set by close(): the running generation stops at its next step
        self.stopped = threading.Event()  # set when this server can no longer generate (closed, or out of step)
        self.stop_reason: str | None = None  # why, when it was not closed on purpose

    # -- choices ---------------------------------------------------------------------------------------------
    def model_choices(self) -> list[str]:
        return [self.hosted.model] if self.hosted else list_model_folders(self.models_dir)

    def lora_choices(self) -> list[str]:
        return [NONE_CHOICE] if self.hosted else [NONE_CHOICE, *list_safetensors_files(self.lora_dir)]

    def weights_choices(self) -> list[str]:
        return [NONE_CHOICE] if self.hosted else [NONE_CHOICE, *list_safetensors_files(self.weights_dir)]

    def model_defaults(self, name: str | None) -> ModelDefaults:
        """The recommended settings of model ``name`` (the released model's for an unknown or unreadable one: the
        page must open whatever a models folder holds)."""
        try:
            return read_model_defaults(resolve_model_folder(self.models_dir, name) if name else None)
        except (RefusedError, ValueError) as exc:
            logger.warning("no recommended settings for %s: %s", name, exc)
            return ModelDefaults()

    @property
    def loaded_model(self) -> str | None:
        return self._model_name

    # -- model ---------------------------------------------------------------------------------------------
    def load_model(self, name: str) -> str:
        """Load the model folder ``name`` (waits for a running generation); returns a status line."""
        if self.hosted and name != self.hosted.model:
            raise RefusedError(f"this server serves only the model {self.hosted.model!r}")
        folder = resolve_model_folder(self.models_dir, name)
        if self._channel is not None:  # refused here, before the other processes hear of it
            check_model_heads(folder, self._channel.ulysses_degree)
        with self._lock:
            self._lead(Job(name, folder))
        return f"model {name} loaded"

    def _ensure_model(self, name: str, folder: Path, weights_name: str | None, weights: Path | None) -> Any:
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

    def _drop_model(self) -> None:
        self._pipe, self._model_name, self._weights_name = None, None, None

    # -- generation ----------------------------------------------------------------------------------------
    def generate(self, request: GenerationRequest, on_step: Callable[[int, int], None] | None = None,
                 cancelled: Callable[[], bool] | None = None) -> GenerationResult:
        """Check the request within the page's ranges (and hosted limits), run it, save the result and its
        settings; raises :class:`RefusedError` for a bad request. ``on_step(done, total)`` follows the steps;
        when ``cancelled()`` turns true the generation stops at the next step (:class:`GenerationCancelled`)."""
        request = request.replace(lora=none_to_null(request.lora),
                                  transformer_weights=none_to_null(request.transformer_weights))
        if self._channel is not None:  # the launch's degrees: prepare checks them against the model and size
            request = request.replace(ulysses_degree=self._channel.ulysses_degree,
                                      ring_degree=self._channel.ring_degree)
        # every refusal happens here, on rank 0 alone, before anything reaches the other processes
        prepared = prepare(request, self.files, limits=PAGE_LIMITS)
        if self.hosted:
            self.hosted.check(prepared.request, prepared.height, prepared.width)
        job = Job(request.model, prepared.model_path, request.transformer_weights, prepared.transformer_weights_path,
                  prepared)
        with self._lock:
            generation = self._lead(job, on_step, cancelled)
            return self._save(generation, prepared.request.kind)  # inside the lock: output numbers are never shared

    def _lead(self, job: Job, on_step=None, cancelled=None) -> Generation | None:
        """Run ``job`` here, handing it to the other processes of a sequence-parallel launch first. Call with the
        lock held: jobs reach the followers in the order they run here."""
        if self.stopped.is_set():
            raise RefusedError(f"this server has stopped generating: {self.stop_reason or 'it is closing'}")
        if self._channel is not None:
            self._in_step(lambda: self._channel.share(job))
        return self._run(job, on_step, cancelled)

    def _run(self, job: Job, on_step=None, cancelled=None) -> Generation | None:
        """What every process does for a job: hold its model, then generate its prepared request (None for a model
        switch). In a sequence-parallel launch each part ends with every process agreeing how it went (a failure
        anywhere raises everywhere), so all of them go on to the next job together."""
        try:
            pipe = self._together(lambda: self._ensure_model(job.model, job.folder, job.weights_name, job.weights))
        except Exception:
            self._drop_model()  # some process may lack it: all load it again next time
            raise
        if job.prepared is None:
            return None
        return self._together(lambda: generate(pipe, job.prepared, self._step_hook(on_step, cancelled)))

    def _together(self, action: Callable[[], Any]) -> Any:
        """``action()`` here alone, or on every process with the outcome agreed
        (:meth:`~easyanimate.inference.distributed.ControlChannel.run_together`)."""
        if self._channel is None:
            return action()
        return self._in_step(lambda: self._channel.run_together(action))

    def _in_step(self, action: Callable[[], Any]) -> Any:
        """``action()``; a :class:`ProcessesOutOfStep` stops this server for good (no collective can be trusted
        after one failed) before it is raised."""
        try:
            return action()
        except ProcessesOutOfStep as exc:
            logger.critical("%s; the server stops (restart it)", exc)
            self.stop_reason = str(exc)
            self.stopped.set()
            raise

    def _step_hook(self, on_step, cancelled) -> Callable[[int, int], None]:
        """The runner's ``on_step``: report progress, then stop (:class:`GenerationCancelled`) when the user
        cancelled or the server is closing. Across processes the decision is agreed at every step (as the step
        cache's), so all of them stop at the same step and none waits in a collective the others left."""
        def step(done: int, total: int) -> None:
            if on_step is not None:
                on_step(done, total)
            stop = self._closing.is_set() or (cancelled is not None and bool(cancelled()))
            if self._channel is not None:
                stop = self._channel.any(stop)
            if stop:
                logger.info("generation cancelled after step %d of %d", done, total)
                raise GenerationCancelled(f"cancelled after step {done} of {total}")
        return step

    # -- several processes ---------------------------------------------------------------------------------
    def follow(self) -> None:
        """The loop of every process but rank 0 in a sequence-parallel server: run each job rank 0 hands over, until
        it says stop. A failed job was reported on rank 0 (every process learns of it); this one goes on to the next.
        Raises :class:`~easyanimate.inference.distributed.ProcessesOutOfStep` when the processes can no longer work
        together (a collective failed, rank 0 is gone)."""
        while True:
            job = self._in_step(self._channel.share)
            if job == STOP:
                logger.info("rank 0 stopped the server")
                return
            try:
                self._run(job)
            except ProcessesOutOfStep:
                raise
            except GenerationCancelled:
                pass  # logged at the step
            except Exception as exc:  # agreed with rank 0, which reports it
                logger.warning("the job failed (rank 0 reports it): %s", exc)

    def close(self) -> None:
        """Stop generating: the running generation stops at its next step, later ones are refused, and in a
        sequence-parallel server the other processes are told to exit (unless they are out of step)."""
        self._closing.set()
        with self._lock:
            already = self.stopped.is_set()
            self.stopped.set()
            if self._channel is not None and self._channel.is_leader and not already:
                try:
                    self._channel.share(STOP)
                except ProcessesOutOfStep as exc:
                    logger.warning("could not tell the other processes to stop: %s", exc)

    def _save(self, generation: Generation, kind: str) -> GenerationResult:
        media = self.output.check(self.output.new_stem(kind).with_suffix(".png" if generation.is_image else ".mp4"))
        path, settings_path = write_result(generation, media)
        return GenerationResult(path, settings_path, generation.is_image, generation.settings)


def save_result(output: OutputFolder, kind: str, is_image: bool, write_media: Callable[[Path], Any],
                settings: dict[str, Any]) -> GenerationResult:
    """Write a result made elsewhere under a fresh name in ``output`` (``write_media(path)`` writes it, atomically)
    and its settings JSON beside it, with the result's file name as ``output``."""
    media = output.check(output.new_stem(kind).with_suffix(".png" if is_image else ".mp4"))
    write_media(media)
    settings = {**settings, "output": media.name}
    return GenerationResult(media, write_settings(settings, output.check(media)), is_image, settings)
