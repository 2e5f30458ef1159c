"""Ready-made inputs for trying the demo model: text-to-video prompts and image-to-video template start images.

The web UI offers them as clickable examples (the original offers five template start images that also fill the
prompt). They are in the demo model's world: its two frame sizes, 16 frames, one coloured shape per picture. The
template images are rendered by :func:`render_template` from the dataset's own drawing code, with the shape
placed where its motion keeps it inside the frame, and shipped in ``easyanimate/assets/templates/``; rewrite them
with ``python -m easyanimate.demo.examples``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from easyanimate.demo.shapes import NUM_FRAMES, caption, random_clip, render_clip
from easyanimate.inference.defaults import ModelDefaults

TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "assets" / "templates"


@dataclass(frozen=True)
class Example:
    """One example: a prompt at a size, with a start image (a file in :data:`TEMPLATES_DIR`) or without."""

    color: str
    shape: str
    motion: str
    language: str
    height: int = 64
    width: int = 64
    image: str | None = None  # template file name (image-to-video)
    seed: int = 0  # places the shape in a template image

    @property
    def prompt(self) -> str:
        return caption(self.color, self.shape, self.motion, self.language)

    @property
    def image_path(self) -> Path | None:
        return None if self.image is None else TEMPLATES_DIR / self.image


TEXT_EXAMPLES = (
    Example("red", "circle", "right", "en"),
    Example("blue", "triangle", "up", "zh"),
    Example("yellow", "square", "still", "en", 48, 96),
    Example("green", "circle", "down", "zh", 48, 96),
    Example("red", "triangle", "up", "en"),  # held out of training: a composition the model never saw
)

# The demo model's recommended settings, shipped beside its model_index.json (generation_defaults.json) so that
# every front end starts from them. Guidance was chosen on the *training* combinations (t2v, seed 0): 2 / 3 / 5 / 8
# -> 90.1 / 90.7 / 85.6 / 83.7 % (stronger guidance draws rounder squares); re-checked after demo stage 4: 2 / 3 / 4
# -> 93.6 / 93.9 / 91.7 %. The model was trained without negative prompts.
DEMO_DEFAULTS = ModelDefaults(prompt=TEXT_EXAMPLES[0].prompt, negative_prompt="", guidance_scale=3.0, steps=25,
                              width=64, height=64, frames=NUM_FRAMES)

IMAGE_TEMPLATES = (
    Example("red", "circle", "right", "en", image="1.png", seed=1),
    Example("blue", "square", "up", "zh", image="2.png", seed=2),
    Example("green", "triangle", "left", "en", 48, 96, image="3.png", seed=3),
    Example("yellow", "circle", "down", "zh", image="4.png", seed=4),
    Example("blue", "circle", "still", "en", 48, 96, image="5.png", seed=5),
)


def render_template(example: Example) -> np.ndarray:
    """(height, width, 3) uint8: the first frame of a dataset-style clip of the example, so the described motion
    has room to happen."""
    clip = random_clip(example.color, example.shape, example.motion, example.height, example.width,
                       np.random.default_rng(example.seed), num_frames=NUM_FRAMES)
    return render_clip(clip)[0]


def write_templates(folder: str | Path = TEMPLATES_DIR) -> list[Path]:
    """Render every template image into ``folder`` as PNG; returns the written paths."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for example in IMAGE_TEMPLATES:
        path = folder / example.image
        Image.fromarray(render_template(example)).save(path)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Render the demo's template start images (shipped in the package).")
    parser.add_argument("--out", type=Path, default=TEMPLATES_DIR, help="folder to write them to")
    for path in write_templates(parser.parse_args(argv).out):
        print(path)


if __name__ == "__main__":
    main()
