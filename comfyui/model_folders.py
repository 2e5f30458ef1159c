"""Where the nodes find models and LoRAs in ComfyUI, and the model handle that flows between nodes.

Model folders in the released layout live in ComfyUI's model folders under ``EasyAnimate/``
(``ComfyUI/models/EasyAnimate/<name>``, or any path registered for ``EasyAnimate`` in ComfyUI's
``extra_model_paths.yaml``); LoRA files are ComfyUI's own ``loras`` list.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import folder_paths

from easyanimate.inference import GenerationRequest
from easyanimate.ui.safety import MODEL_MARKERS

FOLDER_NAME = "EasyAnimate"


def register_model_folder() -> None:
    """Make ``models/EasyAnimate`` one of ComfyUI's model folders (after any the user configured)."""
    folder_paths.add_model_folder_path(FOLDER_NAME, os.path.join(folder_paths.models_dir, FOLDER_NAME))


def _roots() -> list[Path]:
    return [Path(root) for root in folder_paths.get_folder_paths(FOLDER_NAME)]


def model_names() -> list[str]:
    """Names of the sub-folders of every registered EasyAnimate folder that hold a model in the released layout
    (a ``model_index.json`` or ``transformer/config.json``), sorted; links are followed, so a model can live
    elsewhere. Whether a listed folder is complete is the loader's check, which names what is missing."""
    names = set()
    for root in _roots():
        if root.is_dir():
            names.update(entry.name for entry in root.iterdir() if not entry.name.startswith(".") and
                         entry.is_dir() and any((entry / marker).is_file() for marker in MODEL_MARKERS))
    return sorted(names)


def model_path(name: str) -> Path:
    """The folder of the listed model ``name``: in the first registered EasyAnimate folder that has it (where none
    has it, the path it would have in the first, for the request layer to report as missing). ComfyUI only passes
    names from :func:`model_names`' list."""
    roots = _roots()
    return next((root / name for root in roots if (root / name).is_dir()), roots[0] / name)


@dataclass(frozen=True)
class EasyAnimateModel:
    """What an ``EASYANIMATE_MODEL`` link carries: a loaded pipeline, the folder and options it was loaded with,
    and the LoRA to merge for each generation (merged for that generation only; None: no LoRA)."""

    pipe: Any
    folder: Path
    memory_mode: str
    dtype: str
    device: str
    lora: Path | None = None
    lora_strength: float = 0.0

    def with_lora(self, path: Path, strength: float) -> "EasyAnimateModel":
        """This model with ``path`` merged at ``strength`` for each generation. One LoRA per generation: a second
        is a ``ValueError`` naming both (a silently replaced LoRA would be a surprise)."""
        if self.lora is not None:
            raise ValueError(f"this model already has the LoRA {self.lora.name}; EasyAnimate merges one LoRA per "
                             f"generation, so {Path(path).name} cannot be added: use one LoRA loader")
        return dataclasses.replace(self, lora=Path(path), lora_strength=strength)

    def request(self, **settings) -> GenerationRequest:
        """A generation request for this model (its folder, options and LoRA) with ``settings``."""
        return GenerationRequest(model=str(self.folder), memory_mode=self.memory_mode, dtype=self.dtype,
                                 device=self.device, lora=None if self.lora is None else str(self.lora),
                                 lora_strength=self.lora_strength, **settings)
