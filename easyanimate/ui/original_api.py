"""The original EasyAnimate's HTTP routes, so that clients written against it (its ``post_infer.py``, its ``eas``
front end) work with this server: ``POST /easyanimate/update_edition``, ``/easyanimate/update_diffusion_transformer``
and ``/easyanimate/infer_forward``, with the original's JSON keys, defaults and base64 media, and its replies
(``{"message": "Success" | "Error: ..."}``, plus ``save_sample_path`` and ``base64_encoding`` for a result).

They go through the same :class:`~easyanimate.ui.generation.Studio` as the web page and keep its rules, which the
original's routes did not have: a model is a folder of the models directory (named, or by a path that leads there;
anything else is refused), LoRA and base-model (transformer) weights come only from their folders and only as
safetensors, uploads are checked before they are decoded, and results are written only to the output folder. Only
the V4 edition exists here; a request naming a motion module (EasyAnimate V1) is refused with that reason.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from fastapi import Depends, HTTPException, Request

from easyanimate.inference.request import RELEASED_NEGATIVE_PROMPT
from easyanimate.ui.generation import (
    IMAGE_TO_VIDEO,
    LONG_VIDEO,
    TEXT_TO_IMAGE,
    TEXT_TO_VIDEO,
    VIDEO_TO_VIDEO,
    GenerationSettings,
    Studio,
    none_to_null,
)
from easyanimate.ui.safety import NONE_CHOICE, RefusedError, ServerAuth, is_within

logger = logging.getLogger(__name__)
SUCCESS = {"message": "Success"}
RESIZE_TO_REFERENCE = "Resize according to Reference"
IMAGE_GENERATION, LONG_VIDEO_GENERATION = "Image Generation", "Long Video Generation"

# infer_forward's keys and the original's defaults for keys a client leaves out (part of its protocol)
INFER_DEFAULTS: dict[str, Any] = {
    "base_model_path": "none",
    "motion_module_path": "none",
    "lora_model_path": "none",
    "lora_alpha_slider": 0.55,
    "prompt_textbox": None,
    "negative_prompt_textbox": RELEASED_NEGATIVE_PROMPT,
    "sampler_dropdown": "Euler",
    "sample_step_slider": 30,
    "resize_method": "Generate by",
    "width_slider": 672,
    "height_slider": 384,
    "base_resolution": 512,
    "is_image": False,
    "generation_method": "Video Generation",
    "length_slider": 144,
    "overlap_video_length": 4,
    "partial_video_length": 72,
    "cfg_scale_slider": 6.0,
    "start_image": None,
    "end_image": None,
    "validation_video": None,
    "denoise_strength": 0.70,
    "seed_textbox": 43,
    # ours (the original has no step cache): the adaptive step cache's threshold (0 = off) and full start steps
    "step_cache_threshold": 0.0,
    "step_cache_skip_start_steps": GenerationSettings.step_cache_skip_start,
}

def _error(exc: Exception | str) -> dict[str, str]:
    return {"message": f"Error: {exc}"}


def _name_in(folder: Path, value: str, choices: list[str], what: str) -> str:
    """``value`` as one of ``choices``: a name as listed, or a path whose real location is that entry of
    ``folder`` (the original's clients send paths such as ``models/Diffusion_Transformer/EasyAnimateV4-XL-2-InP``)."""
    if value in choices:
        return value
    if is_within(Path(value), folder):
        relative = Path(os.path.relpath(os.path.realpath(value), os.path.realpath(folder))).as_posix()
        if relative in choices:
            return relative
    raise RefusedError(f"{what} {value!r} is not in {folder}; this server offers {choices}")


def _decode_upload(data: Any, folder: Path, name: str, what: str, max_bytes: int) -> str:
    """Write one base64 upload (a string, or a one-element list as the original's client may send) to
    ``folder/name`` and return its path; the Studio then checks it like any upload."""
    if isinstance(data, list):
        if len(data) != 1:
            raise RefusedError(f"{what}: send one base64 string, got a list of {len(data)}")
        data = data[0]
    if not isinstance(data, str):
        raise RefusedError(f"{what} must be a base64 string, got {type(data).__name__}")
    if len(data) > max_bytes * 4 // 3 + 4:
        raise RefusedError(f"{what} is larger than the upload limit of {max_bytes / 2**20:.0f} MiB")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RefusedError(f"{what} is not valid base64 ({exc})") from exc
    path = folder / name
    path.write_bytes(raw)
    return str(path)


class OriginalAPI:
    """The three routes over one :class:`Studio`; the model a client loaded is the one its requests use."""

    def __init__(self, studio: Studio):
        self.studio = studio

    def update_edition(self, body: dict) -> dict:
        edition = body.get("edition", "v2")  # the original's default
        if edition != "v4":
            return _error(f"edition {edition!r} is not available: this server implements only EasyAnimate V4; "
                          'send {"edition": "v4"}')
        return SUCCESS

    def update_diffusion_transformer(self, body: dict) -> dict:
        try:
            path = body.get("diffusion_transformer_path")
            if not isinstance(path, str) or not path:
                raise RefusedError("send the model as 'diffusion_transformer_path'")
            name = _name_in(self.studio.models_dir, path, self.studio.model_choices(), "model folder")
            self.studio.load_model(name)
        except RefusedError as exc:
            return _error(exc)
        return SUCCESS

    def infer_forward(self, body: dict) -> dict:
        unknown = sorted(set(body) - set(INFER_DEFAULTS))
        values = {**INFER_DEFAULTS, **{k: v for k, v in body.items() if k in INFER_DEFAULTS}}
        try:
            if unknown:
                raise RefusedError(f"unknown keys {unknown}; infer_forward takes {sorted(INFER_DEFAULTS)}")
            with tempfile.TemporaryDirectory(prefix="easyanimate-api-") as uploads:
                try:
                    settings = self._settings(values, Path(uploads))
                except RefusedError:
                    raise
                except (TypeError, ValueError) as exc:  # int("abc") and the like: the request's fault
                    raise RefusedError(f"a setting has the wrong type: {exc}") from exc
                result = self.studio.generate(settings)
        except RefusedError as exc:
            return _error(exc)
        except Exception as exc:  # the original answers every failure with a message; the log keeps the traceback
            logger.exception("infer_forward failed")
            return _error(f"generation failed: {type(exc).__name__}: {exc}")
        # "settings" (what was used, e.g. the seed drawn for -1) is ours; the original's clients ignore it
        return {"message": "Success", "save_sample_path": str(result.path),
                "base64_encoding": base64.b64encode(result.path.read_bytes()).decode("ascii"),
                "settings": result.settings}

    def _settings(self, v: dict, uploads: Path) -> GenerationSettings:
        studio = self.studio
        if v["motion_module_path"] not in (None, "", NONE_CHOICE):
            raise RefusedError(f"motion_module_path {v['motion_module_path']!r}: motion modules belong to EasyAnimate "
                               "V1 and are not supported by this V4 server; send 'none'")
        if studio.loaded_model is None:
            raise RefusedError("no model loaded: POST /easyanimate/update_diffusion_transformer first")
        if not isinstance(v["prompt_textbox"], str) or not v["prompt_textbox"].strip():
            raise RefusedError("prompt_textbox is required")
        lora, weights = v["lora_model_path"], v["base_model_path"]
        if lora not in (None, "", NONE_CHOICE):
            lora = _name_in(studio.lora_dir, lora, studio.lora_choices()[1:], "LoRA")
        if weights not in (None, "", NONE_CHOICE):  # the original's Dreambooth base model: transformer weights
            weights = _name_in(studio.weights_dir, weights, studio.weights_choices()[1:], "base model")
        limit = studio.limits.max_bytes
        start = end = video = None
        if v["start_image"]:
            start = _decode_upload(v["start_image"], uploads, "start.png", "start_image", limit)
        if v["end_image"]:
            end = _decode_upload(v["end_image"], uploads, "end.png", "end_image", limit)
        if v["validation_video"]:
            video = _decode_upload(v["validation_video"], uploads, "video.mp4", "validation_video", limit)

        method = IMAGE_GENERATION if v["is_image"] else v["generation_method"]
        if video is not None:
            kind = LONG_VIDEO if method == LONG_VIDEO_GENERATION else VIDEO_TO_VIDEO  # long + video: refused below
        elif method == IMAGE_GENERATION:
            kind = TEXT_TO_IMAGE
        elif method == LONG_VIDEO_GENERATION:
            kind = LONG_VIDEO
        else:
            kind = IMAGE_TO_VIDEO if start is not None else TEXT_TO_VIDEO
        return GenerationSettings(
            model=studio.loaded_model,
            kind=kind,
            prompt=v["prompt_textbox"],
            negative_prompt=v["negative_prompt_textbox"] or "",
            sampler=v["sampler_dropdown"],
            steps=int(v["sample_step_slider"]),
            width=int(v["width_slider"]),
            height=int(v["height_slider"]),
            frames=int(v["length_slider"]),
            guidance_scale=float(v["cfg_scale_slider"]),
            seed=int(v["seed_textbox"]),
            lora=none_to_null(lora),
            transformer_weights=none_to_null(weights),
            lora_strength=float(v["lora_alpha_slider"]),
            denoise_strength=float(v["denoise_strength"]),
            partial_frames=int(v["partial_video_length"]),
            overlap_frames=int(v["overlap_video_length"]),
            resize_to_reference=v["resize_method"] == RESIZE_TO_REFERENCE,
            base_resolution=int(v["base_resolution"]),
            start_image=start,
            end_image=end,
            video=video,
            step_cache=float(v["step_cache_threshold"]),
            step_cache_skip_start=int(v["step_cache_skip_start_steps"]),
        )


def _encode_file(path: str | None) -> str | None:
    return None if not path else base64.b64encode(Path(path).read_bytes()).decode("ascii")


def infer_request(settings: GenerationSettings) -> dict[str, Any]:
    """The ``infer_forward`` body that asks a server for ``settings`` (what the original's ``eas`` front end
    posts; the inverse of :meth:`OriginalAPI._settings`). Uploads are read and base64-encoded."""
    long = settings.kind == LONG_VIDEO
    return {
        "base_model_path": settings.transformer_weights or NONE_CHOICE,
        "motion_module_path": NONE_CHOICE,
        "lora_model_path": settings.lora or NONE_CHOICE,
        "lora_alpha_slider": settings.lora_strength,
        "prompt_textbox": settings.prompt,
        "negative_prompt_textbox": settings.negative_prompt,
        "sampler_dropdown": settings.sampler,
        "sample_step_slider": settings.steps,
        "resize_method": RESIZE_TO_REFERENCE if settings.resize_to_reference else "Generate by",
        "width_slider": settings.width,
        "height_slider": settings.height,
        "base_resolution": settings.base_resolution,
        "is_image": settings.kind == TEXT_TO_IMAGE,
        "generation_method": LONG_VIDEO_GENERATION if long else (
            IMAGE_GENERATION if settings.kind == TEXT_TO_IMAGE else "Video Generation"),
        "length_slider": settings.frames,
        "overlap_video_length": settings.overlap_frames,
        "partial_video_length": settings.partial_frames,
        "cfg_scale_slider": settings.guidance_scale,
        "start_image": _encode_file(settings.start_image),
        "end_image": _encode_file(settings.end_image),
        "validation_video": _encode_file(settings.video),
        "denoise_strength": settings.denoise_strength,
        "seed_textbox": settings.seed,
        "step_cache_threshold": settings.step_cache,
        "step_cache_skip_start_steps": settings.step_cache_skip_start,
    }


def require_credentials(auth: ServerAuth):
    """A FastAPI dependency that answers 401 to a request whose ``Authorization`` header does not hold one of
    ``auth``'s credentials (HTTP basic, a bearer token, or the bare token that the original's EAS clients send)."""

    def check(request: Request) -> None:
        if not auth.check_header(request.headers.get("authorization")):
            raise HTTPException(status_code=401, detail="Error: this server needs credentials: send HTTP basic "
                                "auth (user:password) or a token ('Authorization: Bearer <token>')",
                                headers={"WWW-Authenticate": 'Basic realm="EasyAnimate"'})

    return check


def add_original_routes(app, studio: Studio, auth: ServerAuth | None = None) -> OriginalAPI:
    """Register the three routes on the server's FastAPI ``app`` (plain ``def`` handlers: FastAPI runs them in
    its thread pool, and the Studio's lock serialises them with the web page's generations); with ``auth``, only
    for requests that carry its credentials."""
    api = OriginalAPI(studio)
    dependencies = [Depends(require_credentials(auth))] if auth else None
    for route, handler in [("update_edition", api.update_edition),
                           ("update_diffusion_transformer", api.update_diffusion_transformer),
                           ("infer_forward", api.infer_forward)]:
        app.add_api_route(f"/easyanimate/{route}", handler, methods=["POST"], dependencies=dependencies)
    return api
