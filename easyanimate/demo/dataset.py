"""Writing the demo dataset to disk in the training metadata format (``metadata.json``: file_path, text, type,
width, height; paths relative to the dataset folder).

Each training combination gets ``videos_per_combination`` clips at every size in :data:`~.shapes.SIZES`, captions
cycling through the English and Chinese templates, plus ``images_per_combination`` still images per colour x
shape. Held-out combinations are never written. The folder is built under a temporary name and renamed at the
end, so an interrupted run never leaves a dataset that looks complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..utils.atomic import building_directory
from .shapes import (
    COLORS, FILE_FRAMES, HELD_OUT, LANGUAGES, SHAPES, SIZES, caption, random_clip, render_clip, render_image,
    training_combinations,
)

METADATA_NAME = "metadata.json"
VAE_METADATA_NAME = "metadata_vae.json"  # the videos plus many more still images, for train_vae.py
VAE_IMAGES_METADATA_NAME = "metadata_vae_images.json"  # only the still images: the VAE's first phase


def write_mp4(frames: np.ndarray, path: Path, fps: int = 8) -> None:
    """Near-lossless H.264 (crf 10, yuv420p), so colours and edges survive the round trip."""
    import imageio.v2 as imageio

    with imageio.get_writer(path, format="FFMPEG", fps=fps, codec="libx264", macro_block_size=16,
                            output_params=["-crf", "10", "-preset", "veryfast"], pixelformat="yuv420p") as writer:
        for frame in frames:
            writer.append_data(frame)


def _write_still_images(work: Path, folder: str, per_combination: int, first_number: int, rng):
    """Render ``per_combination`` still images of every colour x shape into ``work/folder`` (sizes alternating),
    yielding ``(k, color, shape, height, width, relative_name)``; files are numbered from ``first_number``."""
    from PIL import Image

    number = first_number
    for color in COLORS:
        for shape in SHAPES:
            for k in range(per_combination):
                height, width = SIZES[k % len(SIZES)]
                name = f"{folder}/{number:05d}_{color}_{shape}_{height}x{width}.png"
                Image.fromarray(render_image(color, shape, height, width, rng)).save(work / name)
                yield k, color, shape, height, width, name
                number += 1


def make_dataset(out_dir: str | os.PathLike, videos_per_combination: int = 6, images_per_combination: int = 4,
                 seed: int = 0, *, vae_images_per_combination: int = 0, max_combinations: int | None = None,
                 overwrite: bool = False, progress: bool = True) -> Path:
    """Write the dataset to ``out_dir`` and return the path of its ``metadata.json``. ``max_combinations``
    keeps that many training combinations, evenly spread (small datasets for tests).

    ``vae_images_per_combination`` more still images per colour x shape go only into the VAE's metadata:
    ``metadata_vae_images.json`` (all still images) and ``metadata_vae.json`` (those plus every video). An image
    step of the VAE costs a sixteenth of a clip step, and colour and shape are learned from single frames: trained
    on clips alone, the small VAE still reproduced every shape as a grey blob after 1 600 steps, while 500
    image-only steps (batch 8) already separated the colours."""
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; choose another folder or pass --overwrite")
    rng = np.random.default_rng(seed)
    rows = []
    with building_directory(out_dir) as work:
        (work / "videos").mkdir()
        (work / "images").mkdir()
        combos = training_combinations()
        if max_combinations is not None:
            picks = np.linspace(0, len(combos) - 1, max(1, min(max_combinations, len(combos)))).round().astype(int)
            combos = [combos[i] for i in picks]
        jobs = [(c, size, k) for c in combos for size in SIZES for k in range(videos_per_combination)]
        for n, ((color, shape, motion), (height, width), k) in enumerate(
            tqdm(jobs, desc="videos", unit="clip", disable=not progress)
        ):
            clip = random_clip(color, shape, motion, height, width, rng, num_frames=FILE_FRAMES)
            name = f"videos/{n:05d}_{color}_{shape}_{motion}_{height}x{width}.mp4"
            write_mp4(render_clip(clip), work / name)
            language = LANGUAGES[k % 2]
            rows.append({"file_path": name, "text": caption(color, shape, motion, language, k // 2),
                         "type": "video", "width": width, "height": height,
                         "color": color, "shape": shape, "motion": motion, "language": language})
        for k, color, shape, height, width, name in _write_still_images(work, "images", images_per_combination, 0, rng):
            language = LANGUAGES[k % 2]
            rows.append({"file_path": name, "text": caption(color, shape, None, language, k // 2),
                         "type": "image", "width": width, "height": height,
                         "color": color, "shape": shape, "motion": None, "language": language})
        vae_rows = [r for r in rows if r["type"] == "video"]
        if vae_images_per_combination:
            (work / "vae_images").mkdir()
        for _, _, _, height, width, name in _write_still_images(work, "vae_images", vae_images_per_combination,
                                                                len(vae_rows), rng):
            vae_rows.append({"file_path": name, "text": "", "type": "image", "width": width, "height": height})
        vae_rows += [r for r in rows if r["type"] == "image"]
        (work / VAE_IMAGES_METADATA_NAME).write_text(
            json.dumps([r for r in vae_rows if r["type"] == "image"], ensure_ascii=False, indent=1) + "\n",
            encoding="utf-8")
        (work / METADATA_NAME).write_text(json.dumps(rows, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        (work / VAE_METADATA_NAME).write_text(json.dumps(vae_rows, ensure_ascii=False, indent=1) + "\n",
                                              encoding="utf-8")
        (work / "held_out.json").write_text(json.dumps([list(c) for c in HELD_OUT]) + "\n", encoding="utf-8")
    return out_dir / METADATA_NAME
