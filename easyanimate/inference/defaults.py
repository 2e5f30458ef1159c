"""A model's own recommended settings, read from ``generation_defaults.json`` beside ``model_index.json``.

Every front end starts from them, so a first generation with any model is one it can draw: the small demo model
wants 64 x 64 pixels, 16 frames, guidance 3 and no negative prompt, while the released model wants 672 x 384, 144
frames, guidance 7 and a long negative prompt. A folder without the file (the released checkpoint) gets the
released model's settings. The file is plain JSON with any of the keys of :class:`ModelDefaults`, e.g.::

    {"prompt": "a red circle moving to the right", "negative_prompt": "", "guidance_scale": 3.0,
     "steps": 25, "width": 64, "height": 64, "frames": 16}
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from easyanimate.inference.request import GenerationRequest

DEFAULTS_FILE = "generation_defaults.json"
DEMO_MODEL_NAME = "EasyAnimateV4-demo"  # the small shipped demo under models/: the front ends' first choice
_RELEASED = GenerationRequest()


@dataclass(frozen=True)
class ModelDefaults:
    """Recommended settings of one model (the released model's where its folder says nothing)."""

    prompt: str = _RELEASED.prompt
    negative_prompt: str = _RELEASED.negative_prompt
    guidance_scale: float = _RELEASED.guidance_scale
    steps: int = _RELEASED.steps
    width: int = _RELEASED.width
    height: int = _RELEASED.height
    frames: int = _RELEASED.frames

    def request(self, **settings) -> GenerationRequest:
        """A request that starts from these settings; ``settings`` (any :class:`GenerationRequest` field) win."""
        return GenerationRequest(**{**dataclasses.asdict(self), **settings})

    def write(self, folder: str | Path) -> Path:
        """Write these settings as ``folder/generation_defaults.json``; returns its path."""
        path = Path(folder) / DEFAULTS_FILE
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2, ensure_ascii=False) + "\n")
        return path


def read_model_defaults(folder: str | Path | None) -> ModelDefaults:
    """The recommended settings of the model in ``folder``: its ``generation_defaults.json`` over the released
    model's. A file that is not valid JSON, or has keys or values of the wrong kind, is a ``ValueError`` naming it
    (a silently ignored file would bring back the settings it was written to replace)."""
    path = Path(folder) / DEFAULTS_FILE if folder is not None else None
    if path is None or not path.is_file():
        return ModelDefaults()
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from exc
    fields = {f.name: f for f in dataclasses.fields(ModelDefaults)}
    if not isinstance(values, dict) or set(values) - set(fields):
        unknown = sorted(set(values) - set(fields)) if isinstance(values, dict) else values
        raise ValueError(f"{path}: unknown settings {unknown}; it may hold {sorted(fields)}")
    for name, value in values.items():
        kind = type(getattr(ModelDefaults(), name))
        if not isinstance(value, (int, float) if kind is float else kind) or isinstance(value, bool):
            raise ValueError(f"{path}: {name} must be a {kind.__name__}, got {value!r}")
    return ModelDefaults(**values)
