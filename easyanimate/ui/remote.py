"""The web page as a front end of another server (the original's ``eas`` UI mode): this machine runs only the page;
each generation is posted to ``<url>/easyanimate/infer_forward`` of a server that has the model (this project's
``app.py`` or the original's, e.g. on a GPU machine or behind Alibaba Cloud EAS), and the returned video is saved here.

:class:`RemoteStudio` has the methods of :class:`~easyanimate.ui.generation.Studio` that the page uses, so the same
page serves both. Like the original it sends ``Authorization: <token>`` and waits up to 300 s by default. Uploads are
checked here before they are sent; results are written only to the local output folder.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import threading
from pathlib import Path
from typing import Callable

from easyanimate.ui.generation import (
    TEXT_TO_IMAGE,
    GenerationResult,
    GenerationSettings,
    HostedLimits,
    save_result,
)
from easyanimate.ui.original_api import infer_request
from easyanimate.ui.safety import (
    NONE_CHOICE,
    OutputFolder,
    RefusedError,
    UploadLimits,
    check_video_upload,
    open_image_upload,
)
from easyanimate.utils.atomic import write_bytes_atomic


class RemoteStudio:
    """Generations run on the server at ``url``, one at a time; results are saved in ``output_dir``. The page is
    locked to ``limits.model`` (the model the server is asked to load) and ``limits``' sizes, as in hosted mode;
    the server applies its own rules on top."""

    models_dir = lora_dir = weights_dir = None  # nothing is loaded from this machine

    def __init__(self, url: str, output_dir: str | Path, limits: HostedLimits, *, token: str | None = None,
                 timeout: float = 300.0, upload_limits: UploadLimits = UploadLimits()):
        import httpx

        if not url.startswith(("http://", "https://")):
            raise ValueError(f"the remote server must be an http:// or https:// URL, got {url!r}")
        self.url = url.rstrip("/")
        self.hosted = limits
        self.limits = upload_limits
        self.output = OutputFolder(output_dir)
        headers = {"Authorization": token} if token else {}
        self._client = httpx.Client(headers=headers, timeout=timeout)
        self._lock = threading.Lock()
        self._model_name: str | None = None

    def model_choices(self) -> list[str]:
        return [self.hosted.model]

    def lora_choices(self) -> list[str]:
        return [NONE_CHOICE]

    def weights_choices(self) -> list[str]:
        return [NONE_CHOICE]

    @property
    def loaded_model(self) -> str | None:
        return self._model_name

    def _post(self, route: str, body: dict) -> dict:
        import httpx

        try:
            reply = self._client.post(f"{self.url}/easyanimate/{route}", json=body)
        except httpx.HTTPError as exc:
            raise RefusedError(f"the server at {self.url} did not answer ({type(exc).__name__}: {exc})") from exc
        if reply.status_code != 200:
            raise RefusedError(f"the server at {self.url} answered HTTP {reply.status_code}: {reply.text[:300]}")
        try:
            answer = reply.json()
        except ValueError as exc:
            raise RefusedError(f"the server at {self.url} sent no JSON: {reply.text[:300]}") from exc
        if answer.get("message") != "Success":
            raise RefusedError(f"the server at {self.url}: {answer.get('message')}")
        return answer

    def load_model(self, name: str) -> str:
        """Ask the server for the V4 edition and the model ``name`` (a folder name or path on the server)."""
        if name != self.hosted.model:
            raise RefusedError(f"this page serves only the model {self.hosted.model!r}")
        with self._lock:
            self._post("update_edition", {"edition": "v4"})
            self._post("update_diffusion_transformer", {"diffusion_transformer_path": name})
            self._model_name = name
        return f"model {name} loaded on {self.url}"

    def generate(self, settings: GenerationSettings,
                 on_step: Callable[[int, int], None] | None = None) -> GenerationResult:
        """Check the settings and uploads, post them, save the returned file and the settings (no step progress:
        the original's route reports none)."""
        settings.check()
        if settings.resize_to_reference:  # the server picks the size from the reference, within its own limits
            self.hosted.check(settings, None, None)
        else:
            self.hosted.check(settings, settings.height, settings.width)
        for path, what in ((settings.start_image, "start image"), (settings.end_image, "end image")):
            if path:
                open_image_upload(path, self.limits, what)
        if settings.video:
            check_video_upload(settings.video, self.limits, "input video")
        if self._model_name != settings.model:
            self.load_model(settings.model)
        with self._lock:
            answer = self._post("infer_forward", infer_request(settings))
            try:
                media = base64.b64decode(answer["base64_encoding"], validate=True)
            except (KeyError, TypeError, binascii.Error, ValueError) as exc:
                raise RefusedError(f"the server at {self.url} sent no result file ({exc})") from exc
            is_image = settings.kind == TEXT_TO_IMAGE or Path(str(answer.get("save_sample_path"))).suffix == ".png"
            asked = dataclasses.asdict(settings)
            reported = answer.get("settings")  # ours sends what it used (the drawn seed); the original does not
            used = {**asked, **(reported if isinstance(reported, dict) else {}), "server": self.url}
            for key in ("start_image", "end_image", "video"):  # the upload's name, not a temporary path
                used[key] = Path(asked[key]).name if asked[key] else None
            return save_result(self.output, settings.kind, is_image, lambda path: write_bytes_atomic(path, media),
                               used)
