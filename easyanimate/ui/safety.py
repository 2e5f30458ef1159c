"""What the web server may read and write.

The original UI binds to 0.0.0.0 and its HTTP routes take arbitrary filesystem paths (and load them with pickle).
Here every file the server touches is chosen *by name* from a listing of an allowed folder and re-checked by its
real path (so ``..``, absolute paths and symlinks that leave the folder are refused), LoRA and transformer weights
are only ``.safetensors``, uploads are checked for size, type and decoded dimensions before any model sees them, and
results are written only below the output folder.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from easyanimate.inference.request import RequestError
from easyanimate.utils.video_io import IMAGE_SUFFIXES, VIDEO_SUFFIXES, MediaError, probe_video

NONE_CHOICE = "none"
SAFETENSORS_SUFFIX = ".safetensors"
# Files whose presence marks a folder as a model folder in the released layout.
MODEL_MARKERS = ("model_index.json", "transformer/config.json")


# A request the server will not carry out; the message names the problem and what to do instead. The same class as
# the request layer's errors, so every refusal reaches the page and the API the same way.
RefusedError = RequestError


@dataclass(frozen=True)
class UploadLimits:
    """Bounds on uploaded reference images and videos (checked before decoding them fully)."""

    max_bytes: int = 200 * 1024 * 1024
    max_side: int = 4096
    max_video_frames: int = 2000


def is_within(path: Path, root: Path) -> bool:
    """True when ``path``'s real location is ``root`` or below it (both resolved through symlinks)."""
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    return os.path.commonpath([real, real_root]) == real_root


def _is_model_folder(folder: Path) -> bool:
    return any((folder / marker).is_file() for marker in MODEL_MARKERS)


def list_model_folders(models_dir: str | os.PathLike) -> list[str]:
    """Names of the model folders directly under ``models_dir`` whose real path stays inside it."""
    root = Path(models_dir)
    if not root.is_dir():
        return []
    return sorted(
        entry.name
        for entry in root.iterdir()
        if not entry.name.startswith(".") and entry.is_dir() and is_within(entry, root) and _is_model_folder(entry)
    )


def list_safetensors_files(folder: str | os.PathLike) -> list[str]:
    """``.safetensors`` files under ``folder`` (relative POSIX paths) whose real path stays inside it."""
    root = Path(folder)
    if not root.is_dir():
        return []
    names = []
    for path in root.rglob(f"*{SAFETENSORS_SUFFIX}"):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file() or not is_within(path, root):
            continue
        names.append(rel.as_posix())
    return sorted(names)


def resolve_model_folder(models_dir: str | os.PathLike, name: str | None) -> Path:
    """The real path of the model folder ``name`` listed under ``models_dir``; anything else is refused."""
    if not name or name == NONE_CHOICE:
        raise RefusedError("no model selected: choose a model folder from the list (press refresh after adding one)")
    available = list_model_folders(models_dir)
    if name not in available:
        raise RefusedError(
            f"model {name!r} is not one of the model folders in {models_dir}; choose one of {available} "
            "(the server only loads models from its models directory)"
        )
    return Path(os.path.realpath(Path(models_dir) / name))


def resolve_safetensors_file(folder: str | os.PathLike, name: str | None, what: str = "LoRA") -> Path | None:
    """The real path of the file ``name`` listed under ``folder`` (LoRAs, transformer weights), or None for
    "none"."""
    if not name or name == NONE_CHOICE:
        return None
    available = list_safetensors_files(folder)
    if name not in available:
        raise RefusedError(
            f"{what} {name!r} is not one of the .safetensors files in {folder}; choose one of {available} or 'none' "
            f"(the server only loads {what} from its own folder, and only as safetensors)"
        )
    return Path(os.path.realpath(Path(folder) / name))


def _check_upload_file(path: str | os.PathLike, what: str, suffixes: tuple[str, ...], limits: UploadLimits) -> Path:
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise RefusedError(f"the {what} must be one of {', '.join(suffixes)} files, got {path.name!r}")
    if not path.is_file():
        raise RefusedError(f"the {what} upload {path.name!r} is missing; upload it again")
    size = path.stat().st_size
    if size > limits.max_bytes:
        raise RefusedError(
            f"the {what} is {size / 2**20:.1f} MiB; the limit is {limits.max_bytes / 2**20:.0f} MiB"
        )
    return path


def open_image_upload(path: str | os.PathLike, limits: UploadLimits, what: str = "image") -> Image.Image:
    """Open an uploaded image as RGB after checking its type, file size and pixel dimensions."""
    path = _check_upload_file(path, what, IMAGE_SUFFIXES, limits)
    try:
        with Image.open(path) as img:
            width, height = img.size  # from the header, before decoding the pixels
            if max(width, height) > limits.max_side:
                raise RefusedError(
                    f"the {what} is {width}x{height}; the largest side allowed is {limits.max_side} pixels"
                )
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise RefusedError(f"the {what} {path.name!r} is not a readable image ({exc})") from exc


def check_video_upload(path: str | os.PathLike, limits: UploadLimits, what: str = "video") -> tuple[int, int, int]:
    """Check an uploaded video's type, file size, frame count and size; returns (frames, height, width)."""
    path = _check_upload_file(path, what, VIDEO_SUFFIXES, limits)
    try:
        frames, height, width = probe_video(path)
    except MediaError as exc:
        raise RefusedError(f"the {what} {path.name!r} is not a readable video ({exc})") from exc
    if frames > limits.max_video_frames or max(height, width) > limits.max_side:
        raise RefusedError(
            f"the {what} has {frames} frames of {width}x{height}; the limits are {limits.max_video_frames} frames "
            f"and {limits.max_side} pixels per side"
        )
    return frames, height, width


class OutputFolder:
    """The one folder results are written to; hands out fresh, never-reused file stems inside it."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(os.path.realpath(root))
        self.root.mkdir(parents=True, exist_ok=True)

    def new_stem(self, kind: str) -> Path:
        """A new ``<root>/<time>-<kind>-<NNN>`` path (no suffix); numbers count up past existing files."""
        slug = re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-")
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        index = len(list(self.root.glob("*.json"))) + 1
        while True:
            stem = self.root / f"{stamp}-{slug}-{index:03d}"
            if not any(stem.with_suffix(s).exists() for s in (".json", ".mp4", ".png")):
                return stem
            index += 1

    def check(self, path: str | os.PathLike) -> Path:
        """Refuse to write ``path`` unless it lies inside the output folder."""
        if not is_within(Path(path).parent, self.root):
            raise RefusedError(f"refusing to write {path}: outside the output folder {self.root}")
        return Path(path)
