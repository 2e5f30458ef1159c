"""The web page as a front end of another server (the original's ``eas`` UI mode): this machine runs only the page;
each generation is posted to ``<url>/easyanimate/infer_forward`` of a server that has the model (this project's
``app.py`` or the original's, e.g. on a GPU machine or behind Alibaba Cloud EAS), and the returned video is saved here.

:class:`RemoteStudio` has the methods of :class:`~easyanimate.ui.generation.Studio` that the page uses, so the same
page serves both. Like the original it sends ``Authorization: <token>`` (or, for a ``user:password`` credential, HTTP
basic auth) and waits up to 300 s by default. Uploads are checked here before they are sent; results are written
only to the local output folder.
"""

from __future__ import annotations

import base64
import binascii
import threading
from pathlib import Path
from typing import Callable

from easyanimate.inference.defaults import ModelDefaults
from easyanimate.inference.request import GenerationRequest
from easyanimate.inference.runner import prepare, request_settings
from easyanimate.ui.generation import (
    PAGE_LIMITS,
    GenerationResult,
    HostedLimits,
    ServerFiles,
    none_to_null,
    save_result,
)
from easyanimate.ui.original_api import infer_request
from easyanimate.ui.safety import NONE_CHOICE, OutputFolder, RefusedError, UploadLimits, authorization_header
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
        self.files = RemoteFiles(upload_limits)
        headers = {"Authorization": authorization_header(token)} if token else {}
        self._client = httpx.Client(headers=headers, timeout=timeout)
        self._lock = threading.Lock()
        self._model_name: str | None = None

    def model_choices(self) -> list[str]:
        return [self.hosted.model]

    def lora_choices(self) -> list[str]:
        return [NONE_CHOICE]

    def weights_choices(self) -> list[str]:
        return [NONE_CHOICE]

    def model_defaults(self, name: str | None) -> ModelDefaults:
        """The released model's recommended settings: the original's routes do not tell another model's."""
        return ModelDefaults()

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

    def generate(self, request: GenerationRequest, on_step: Callable[[int, int], None] | None = None,
                 cancelled: Callable[[], bool] | None = None) -> GenerationResult:
        """Check the request and its uploads here (the page's ranges and hosted limits), post it, save the returned
        file and the settings (no step progress, and ``cancelled`` is not asked: the original's route reports no
        steps and has no way to stop a generation)."""
        request = request.replace(lora=none_to_null(request.lora),
                                  transformer_weights=none_to_null(request.transformer_weights))
        self.hosted.check(request, None, None)  # the model, LoRA and kind; the size once the reference is known
        prepared = prepare(request.replace(model=""), self.files, limits=PAGE_LIMITS)
        self.hosted.check(request, prepared.height, prepared.width)
        if self._model_name != request.model:
            self.load_model(request.model)
        with self._lock:
            answer = self._post("infer_forward", infer_request(request))
            try:
                media = base64.b64decode(answer["base64_encoding"], validate=True)
            except (KeyError, TypeError, binascii.Error, ValueError) as exc:
                raise RefusedError(f"the server at {self.url} sent no result file ({exc})") from exc
            is_image = request.is_image or Path(str(answer.get("save_sample_path"))).suffix == ".png"
            reported = answer.get("settings")  # ours sends what it used (the drawn seed); the original does not
            asked = request_settings(request)
            used = {**asked, **(reported if isinstance(reported, dict) else {}), "server": self.url}
            for key in ("start_image", "end_image", "video"):  # the upload's name, not a temporary path
                used[key] = asked[key]
            return save_result(self.output, request.kind, is_image, lambda path: write_bytes_atomic(path, media),
                               used)


class RemoteFiles(ServerFiles):
    """Uploads are checked here against this page's limits; the model, the input video's frames and their decoding
    are the server's to judge (its refusals come back with the reason)."""

    def __init__(self, limits: UploadLimits):
        super().__init__(None, None, None, limits)

    def probe_video(self, value, label: str) -> tuple[None, int, int]:
        _, height, width = super().probe_video(value, label)
        return None, height, width

    def read_video(self, value, frames: int, size: tuple[int, int], label: str) -> None:
        return None
