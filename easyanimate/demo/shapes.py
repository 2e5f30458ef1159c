"""The synthetic bilingual dataset of the demo model: one coloured shape on a black background, moving left, right,
up or down, or standing still, captioned from English and Chinese templates.

Everything is drawn with numpy (4x supersampled, so edges are anti-aliased like a real camera's) from a
:class:`Clip` description, so the same description always gives the same pixels. Some colour x shape x motion
combinations are held out (:data:`HELD_OUT`): :func:`training_combinations` never yields them, and they are used
only to evaluate whether the model composes attributes it learned separately.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

# name -> RGB. Saturated and far apart, so the colour survives the VAE and chroma-subsampled mp4.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
}
SHAPES = ("circle", "square", "triangle")
MOTIONS = ("left", "right", "up", "down", "still")
BACKGROUND = (0, 0, 0)

# (colour, shape, motion) combinations that never appear in the training data. Every colour, shape and motion
# still appears in training with other partners, so the held-out set tests composition, not unseen words.
HELD_OUT: tuple[tuple[str, str, str], ...] = (
    ("red", "triangle", "up"),
    ("red", "square", "still"),
    ("green", "circle", "left"),
    ("green", "triangle", "down"),
    ("blue", "square", "down"),
    ("blue", "circle", "right"),
    ("yellow", "triangle", "right"),
    ("yellow", "square", "left"),
)

# (height, width) of the two aspect ratios. Both are exact aspect-ratio buckets of the training code at base sizes
# 64 and 80 (48 x 96 is the 0.5 bucket at 80), so no training crop cuts the shape off.
SIZES: tuple[tuple[int, int], ...] = ((64, 64), (48, 96))
NUM_FRAMES = 16  # frames the model generates
FILE_FRAMES = 20  # frames per dataset video: training samples 16 inside the 10 %-90 % window of a clip
SHAPE_SIZE = (18, 24)  # side of the shape's bounding box, pixels: at least one 16x16 transformer patch, so a
# square's corners are not lost inside a single token (at 14-18 px most generated squares came out rounded)
SPEED = (1.5, 2.2)  # pixels per frame of the moving shapes

COLOR_ZH = {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色"}
SHAPE_ZH = {"circle": "圆形", "square": "正方形", "triangle": "三角形"}
MOTION_ZH = {"left": "向左移动", "right": "向右移动", "up": "向上移动", "down": "向下移动", "still": "静止不动"}
MOTION_EN = {"left": "moving to the left", "right": "moving to the right", "up": "moving up", "down": "moving down",
             "still": "standing still"}
MOTION_EN_ALT = {"left": "moves to the left", "right": "moves to the right", "up": "moves up", "down": "moves down",
                 "still": "stays still"}

# Caption templates. Video templates name the motion; image templates describe a still frame.
VIDEO_TEMPLATES_EN = (
    "a {color} {shape} {motion}",
    "the {color} {shape} is {motion} on a black background",
    "a {color} {shape} {motion_alt}",
)
VIDEO_TEMPLATES_ZH = (
    "一个{color}的{shape}{motion}",
    "{color}的{shape}在黑色背景上{motion}",
    "一个{color}{shape}{motion}",
)
IMAGE_TEMPLATES_EN = ("a {color} {shape}", "a {color} {shape} on a black background")
IMAGE_TEMPLATES_ZH = ("一个{color}的{shape}", "黑色背景上的一个{color}的{shape}")
LANGUAGES = ("en", "zh")
# The Chinese captions cut into words. The tiny mT5 tokenizer keeps each as one piece: a unigram model trained on
# so few captions otherwise learns pieces such as "红色的圆形" that fuse colour and shape, so a held-out pairing
# would be tokenized unlike anything seen in training (a real mT5 vocabulary does not fuse them either).
CHINESE_WORDS = (*COLOR_ZH.values(), *SHAPE_ZH.values(), "向左", "向右", "向上", "向下", "移动", "静止", "不动",
                 "一个", "黑色", "背景")


def all_combinations() -> list[tuple[str, str, str]]:
    return list(itertools.product(COLORS, SHAPES, MOTIONS))


def training_combinations() -> list[tuple[str, str, str]]:
    """Every (colour, shape, motion) except the held-out ones."""
    held = set(HELD_OUT)
    return [c for c in all_combinations() if c not in held]


def caption(color: str, shape: str, motion: str | None, language: str = "en", template: int = 0) -> str:
    """The caption of a clip (``motion`` None: of an image) in ``language`` ("en" or "zh") from template
    number ``template`` (taken modulo the number of templates)."""
    if color not in COLORS or shape not in SHAPES or (motion is not None and motion not in MOTIONS):
        raise ValueError(f"unknown attribute in ({color!r}, {shape!r}, {motion!r}); colours {list(COLORS)}, "
                         f"shapes {list(SHAPES)}, motions {list(MOTIONS)}")
    if language == "en":
        templates = IMAGE_TEMPLATES_EN if motion is None else VIDEO_TEMPLATES_EN
        words = dict(color=color, shape=shape)
        if motion is not None:
            words.update(motion=MOTION_EN[motion], motion_alt=MOTION_EN_ALT[motion])
    elif language == "zh":
        templates = IMAGE_TEMPLATES_ZH if motion is None else VIDEO_TEMPLATES_ZH
        words = dict(color=COLOR_ZH[color], shape=SHAPE_ZH[shape])
        if motion is not None:
            words.update(motion=MOTION_ZH[motion])
    else:
        raise ValueError(f"language must be 'en' or 'zh', got {language!r}")
    return templates[template % len(templates)].format(**words)


@dataclass(frozen=True)
class Clip:
    """Everything that determines a clip's pixels: attributes, frame size, shape size, start centre, speed."""

    color: str
    shape: str
    motion: str
    height: int
    width: int
    size: float
    start: tuple[float, float]  # (y, x) of the shape's centre in the first frame
    speed: float
    num_frames: int = NUM_FRAMES

    def centers(self) -> np.ndarray:
        """(num_frames, 2) centre (y, x) in every frame."""
        dy, dx = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0), "still": (0, 0)}[self.motion]
        t = np.arange(self.num_frames, dtype=np.float64)[:, None]
        return np.asarray(self.start, dtype=np.float64)[None] + t * self.speed * np.array([[dy, dx]])


def random_clip(color: str, shape: str, motion: str, height: int, width: int, rng: np.random.Generator,
                num_frames: int = NUM_FRAMES) -> Clip:
    """A clip whose shape stays entirely inside the frame, with random size, speed and start."""
    size = float(rng.uniform(*SHAPE_SIZE))
    speed = 0.0 if motion == "still" else float(rng.uniform(*SPEED))
    margin = size / 2 + 1
    dy, dx = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0), "still": (0, 0)}[motion]
    if num_frames > 1:  # a short frame side limits the speed (48 px leave ~28 px of vertical travel)
        room = (height if dy else width) - 2 * margin
        speed = min(speed, room / (num_frames - 1) - 1e-6)
    travel = speed * (num_frames - 1)
    starts = []
    for extent, direction in ((height, dy), (width, dx)):
        lo, hi = margin, extent - margin
        if direction > 0:
            hi -= travel
        elif direction < 0:
            lo += travel
        if hi < lo:  # too far for this frame: slow down so the path fits
            raise ValueError(f"a {motion} path of {travel:.1f} px does not fit a {height}x{width} frame")
        starts.append(float(rng.uniform(lo, hi)))
    return Clip(color, shape, motion, height, width, size, (starts[0], starts[1]), speed, num_frames)


SUPERSAMPLE = 4


def shape_coverage(shape: str, center: tuple[float, float], size: float, height: int, width: int) -> np.ndarray:
    """(height, width) float in [0, 1]: how much of each pixel the shape covers (4x4 supersampling).

    circle: diameter ``size``; square: side ``size``; triangle: pointing up, base and height ``size``."""
    s = SUPERSAMPLE
    ys = (np.arange(height * s) + 0.5) / s
    xs = (np.arange(width * s) + 0.5) / s
    y, x = ys[:, None] - center[0], xs[None, :] - center[1]
    half = size / 2
    if shape == "circle":
        inside = y**2 + x**2 <= half**2
    elif shape == "square":
        inside = (np.abs(y) <= half) & (np.abs(x) <= half)
    elif shape == "triangle":
        depth = y + half  # 0 at the apex, size at the base
        inside = (depth >= 0) & (depth <= size) & (np.abs(x) <= depth / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return inside.reshape(height, s, width, s).mean(axis=(1, 3))


def render_clip(clip: Clip) -> np.ndarray:
    """(num_frames, height, width, 3) uint8 frames of ``clip``."""
    color = np.asarray(COLORS[clip.color], dtype=np.float64)
    background = np.asarray(BACKGROUND, dtype=np.float64)
    frames = np.empty((clip.num_frames, clip.height, clip.width, 3), dtype=np.uint8)
    for i, (cy, cx) in enumerate(clip.centers()):
        cover = shape_coverage(clip.shape, (cy, cx), clip.size, clip.height, clip.width)[..., None]
        frames[i] = np.round(background + cover * (color - background)).astype(np.uint8)
    return frames


def render_image(color: str, shape: str, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """(height, width, 3) uint8: one still shape at a random place."""
    clip = random_clip(color, shape, "still", height, width, rng, num_frames=1)
    return render_clip(clip)[0]
