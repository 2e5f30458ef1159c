"""The request layer between every front end and the pipeline.

A front end (the predict command lines, the web page and its API, the original's HTTP routes, training's validation
samples) translates its input into a :class:`GenerationRequest`; everything after that is shared:

* :mod:`.request` — the request, its one validator (:func:`check_request`), kinds, samplers, memory modes;
* :mod:`.defaults` — a model folder's recommended settings (``generation_defaults.json``);
* :mod:`.loading` — a model folder into a pipeline (replacement weights, memory mode, dtype for the device);
* :mod:`.runner` — :func:`prepare` (check and open the files a request names), :func:`generate` (the pipeline
  calls, long video, LoRA, progress) and :func:`write_result` (the video and its settings JSON);
* :mod:`.long_video` — chunked continuation for videos longer than one pass.

See ``docs/architecture.md`` for how a request flows from each front end to a video.
"""

from easyanimate.inference.defaults import DEFAULTS_FILE, ModelDefaults, read_model_defaults
from easyanimate.inference.request import (
    DTYPES,
    IMAGE_TO_VIDEO,
    KINDS,
    LONG_VIDEO,
    MEMORY_MODES,
    SAMPLER_NAMES,
    TEXT_TO_IMAGE,
    TEXT_TO_VIDEO,
    VIDEO_TO_VIDEO,
    GenerationRequest,
    RequestError,
    RequestLimits,
    check_request,
)
from easyanimate.inference.runner import (
    Generation,
    LocalFiles,
    PreparedRequest,
    generate,
    load_for,
    prepare,
    run,
    write_result,
)

__all__ = [
    "DEFAULTS_FILE", "DTYPES", "IMAGE_TO_VIDEO", "KINDS", "LONG_VIDEO", "MEMORY_MODES", "SAMPLER_NAMES",
    "TEXT_TO_IMAGE", "TEXT_TO_VIDEO", "VIDEO_TO_VIDEO", "Generation", "GenerationRequest", "LocalFiles",
    "ModelDefaults", "PreparedRequest", "RequestError", "RequestLimits", "check_request", "generate", "load_for",
    "prepare", "read_model_defaults", "run", "write_result",
]
