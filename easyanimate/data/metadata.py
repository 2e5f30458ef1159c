"""Training metadata: a JSON list (or JSON-lines) or a CSV table of ``file_path``, ``text``, ``type`` and optional
``width``/``height`` entries, as the original's ``--train_data_meta``.

Every row is checked when the file is read, so a typo in row 12 031 is reported before any GPU time is spent,
with the row number and what to fix, instead of surfacing as a ``KeyError`` inside a dataloader worker.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
VIDEO_EXTENSIONS = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".flv", ".mpeg", ".mpg", ".wmv"}
DATA_TYPES = ("image", "video")


class MetadataError(ValueError):
    """The metadata file is missing, unparsable, or has a malformed row."""


def resolve_path(file_path: str, data_root: str | os.PathLike | None) -> str:
    """``file_path`` joined to ``data_root``; absolute paths and an empty/None root give the path itself."""
    if not data_root or os.path.isabs(file_path):
        return file_path
    return os.path.join(os.fspath(data_root), file_path)


def _guess_type(file_path: str) -> str:
    # The original treats a missing ``type`` as "image", which makes every untyped .mp4 a broken image.
    # Guess from the extension instead, and fall back to the original's "image" for unknown extensions.
    return "video" if Path(file_path).suffix.lower() in VIDEO_EXTENSIONS else "image"


def _parse_size(value: Any, name: str, where: str) -> int | None:
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise MetadataError(f"{where}: '{name}' must be a positive integer, got {value!r}") from None
    if number != int(number) or number <= 0:
        raise MetadataError(f"{where}: '{name}' must be a positive integer, got {value!r}")
    return int(number)


def normalize_entry(row: Any, where: str, data_root: str | os.PathLike | None = None, *,
                    require_text: bool = True) -> dict:
    """Check one raw row and return ``{"file_path", "text", "type", ["width", "height"], ...extra keys}``; without
    ``require_text`` a missing ``text`` becomes ``""``."""
    if not isinstance(row, dict):
        raise MetadataError(f"{where}: expected an object with 'file_path' and 'text', got {type(row).__name__}")
    file_path = row.get("file_path")
    if not isinstance(file_path, str) or not file_path.strip():
        raise MetadataError(f"{where}: missing or empty 'file_path' (keys present: {sorted(row)})")
    text = row.get("text")
    if text is None and not require_text:
        text = ""
    if text is None:
        raise MetadataError(f"{where}: missing 'text' for {file_path!r} (use an empty string for no caption)")
    if not isinstance(text, str):
        raise MetadataError(f"{where}: 'text' must be a string, got {type(text).__name__} for {file_path!r}")
    data_type = row.get("type")
    if data_type is None or (isinstance(data_type, str) and not data_type.strip()):
        data_type = _guess_type(file_path)
    if data_type not in DATA_TYPES:
        raise MetadataError(f"{where}: 'type' must be 'image' or 'video', got {data_type!r} for {file_path!r}")
    entry = dict(row)
    entry.update(file_path=resolve_path(file_path.strip(), data_root), text=text, type=data_type)
    width = _parse_size(row.get("width"), "width", where)
    height = _parse_size(row.get("height"), "height", where)
    entry.pop("width", None)
    entry.pop("height", None)
    if width is not None and height is not None:
        entry.update(width=width, height=height)
    return entry


def read_rows(path: Path) -> list:
    """The raw rows of a .json / .jsonl / .csv metadata file, unchecked (see :func:`load_metadata`)."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            rows = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(rows, list):
                raise MetadataError(f"{path}: a JSON metadata file must hold a list of objects, got {type(rows).__name__}")
            return rows
        if suffix == ".jsonl":
            lines = path.read_text(encoding="utf-8").splitlines()
            return [json.loads(line) for line in lines if line.strip()]
        if suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as handle:
                reader = csv.DictReader(handle)
                if not reader.fieldnames or "file_path" not in reader.fieldnames:
                    raise MetadataError(
                        f"{path}: the CSV header must name the columns 'file_path,text[,type,width,height]', "
                        f"got {reader.fieldnames}"
                    )
                return list(reader)
    except json.JSONDecodeError as exc:
        raise MetadataError(f"{path} is not valid JSON: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise MetadataError(f"{path} is not UTF-8 text: {exc}") from exc
    raise MetadataError(f"{path}: unknown metadata format '{suffix}'; use .json, .jsonl or .csv")


def load_metadata(path: str | os.PathLike, data_root: str | os.PathLike | None = None, *,
                  require_text: bool = True) -> list[dict]:
    """Read a metadata file and return one checked dict per entry.

    Each dict has ``file_path`` (joined to ``data_root`` unless absolute), ``text`` (``str``, may be empty; a row
    without one is an error unless ``require_text`` is False, for data that needs no caption such as a VAE's, where
    it reads as ``""``),
    ``type`` (``"image"`` or ``"video"``; when missing, guessed from the file extension) and, when both are given,
    integer ``width`` and ``height``. Other columns are kept as they are. Raises :class:`MetadataError` naming the
    row and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise MetadataError(f"metadata file not found: {path}")
    rows = read_rows(path)
    # CSV rows are 1-based with the header on line 1; JSON-lines are 1-based; JSON rows are list indices.
    offset = {".csv": 2, ".jsonl": 1}.get(path.suffix.lower(), 0)
    label = "line" if path.suffix.lower() in (".csv", ".jsonl") else "entry"
    entries = [normalize_entry(row, f"{path} {label} {i + offset}", data_root, require_text=require_text)
               for i, row in enumerate(rows)]
    if not entries:
        raise MetadataError(f"{path} has no entries")
    return entries
