"""An analytic judge of demo videos: which colour, which shape, which motion, read from the frames alone.

The foreground is every pixel clearly brighter than the black background. Per frame, the judge measures

* colour: the mean colour of the foreground, matched to the nearest palette colour by its chroma (RGB minus the
  grey part), so a dimmer or washed-out reproduction still matches;
* shape: the fraction of the foreground's bounding box the shape fills (square ~1.0, circle ~pi/4, triangle ~1/2)
  and how far below the box's middle its centre of mass lies (an upward triangle's: 1/6 of the height);
* position: the foreground's centroid.

Colour and shape are majority votes over frames; the motion is the least-squares slope of the centroid over time:
below :data:`STILL_PX` of displacement over the clip it is "still", otherwise the dominant axis and its sign.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from .shapes import COLORS

FOREGROUND_LEVEL = 70  # a pixel is foreground when its brightest channel exceeds this (background is 0)
MIN_PIXELS = 8  # frames with fewer foreground pixels carry no shape
STILL_PX = 6.0  # total displacement below this (pixels over the clip) counts as standing still
# Shape rules, set on the dataset's frames and on their reconstructions by the demo VAE (which rounds corners):
# a triangle (pointing up) has its centre of mass clearly below the middle of its bounding box (+1/6 of the height
# when sharp, >= +0.025 after the VAE) and fills at most ~0.8 of the box; a square fills >= 0.86, a circle less.
SQUARE_FILL = 0.86
TRIANGLE_FILL = 0.68  # below this fill a shape is a triangle whatever its centre of mass
TRIANGLE_OFFSET, TRIANGLE_OFFSET_STRONG = 0.02, 0.04
ATTRIBUTES = ("color", "shape", "motion")


@dataclass
class Verdict:
    """What the judge saw in one video. ``None`` for an attribute it could not read (e.g. an empty video)."""

    color: str | None
    shape: str | None
    motion: str | None
    displacement: tuple[float, float] = (0.0, 0.0)  # (dy, dx) pixels over the clip
    fill: float = float("nan")
    details: dict = field(default_factory=dict)

    def score(self, color: str, shape: str, motion: str | None) -> dict[str, bool]:
        """Per-attribute correctness against the intended attributes (``motion`` None: not judged)."""
        result = {"color": self.color == color, "shape": self.shape == shape}
        if motion is not None:
            result["motion"] = self.motion == motion
        return result


def _as_frames(video) -> np.ndarray:
    """Accept (F, H, W, 3) uint8, or a float tensor/array (3, F, H, W) in [0, 1] as the pipeline returns."""
    array = np.asarray(video.detach().cpu() if hasattr(video, "detach") else video)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4:
        raise ValueError(f"expected a video (F, H, W, 3) or (3, F, H, W), got shape {array.shape}")
    if array.shape[-1] != 3 and array.shape[0] == 3:
        array = np.moveaxis(array, 0, -1)  # (3, F, H, W) -> (F, H, W, 3)
    if array.shape[-1] != 3:
        raise ValueError(f"expected 3 colour channels, got shape {array.shape}")
    if array.dtype != np.uint8:
        array = np.clip(np.asarray(array, dtype=np.float64) * 255.0, 0, 255)
    return array.astype(np.float64)


def _chroma(rgb: np.ndarray) -> np.ndarray:
    """RGB minus its grey part (the smallest channel), unit length: the hue direction, unaffected by how dim or
    washed-out a reproduction is."""
    chroma = rgb - rgb.min(axis=-1, keepdims=True)
    return chroma / (np.linalg.norm(chroma, axis=-1, keepdims=True) + 1e-9)


def classify_color(pixels: np.ndarray) -> str:
    """Nearest palette colour (cosine of chroma directions) to the mean of ``pixels`` (N, 3)."""
    names = list(COLORS)
    palette = _chroma(np.asarray([COLORS[n] for n in names], dtype=np.float64))
    return names[int(np.argmax(palette @ _chroma(pixels.mean(axis=0))))]


def classify_shape(fill: float, offset: float) -> str:
    """Shape from the fill of the bounding box and the vertical offset of the centre of mass (fraction of the box
    height, positive = below the middle)."""
    if fill < TRIANGLE_FILL or offset > TRIANGLE_OFFSET_STRONG or (offset > TRIANGLE_OFFSET and fill < 0.8):
        return "triangle"
    return "square" if fill >= SQUARE_FILL else "circle"


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (generated frames may have specks): every pixel takes
    the largest label among itself and its masked neighbours until nothing changes."""
    labels = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), 0)
    while True:
        padded = np.pad(labels, 1)
        grown = np.maximum.reduce([labels, padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]])
        grown = np.where(mask, grown, 0)
        if np.array_equal(grown, labels):
            break
        labels = grown
    values, counts = np.unique(labels[mask], return_counts=True)
    return labels == values[int(np.argmax(counts))] if len(values) > 1 else mask


def judge_frames(video) -> Verdict:
    """Judge one video (or a single image, which gets ``motion`` None)."""
    frames = _as_frames(video)
    colors, fills, offsets, centers, times = [], [], [], [], []
    for t, frame in enumerate(frames):
        brightness = frame.max(axis=-1)
        mask = brightness > FOREGROUND_LEVEL
        if mask.sum() < MIN_PIXELS:
            continue
        mask = _largest_component(mask)
        if mask.sum() < MIN_PIXELS:
            continue
        # half of the shape's own brightness is its edge (anti-aliased / blurred edges count half)
        level = 0.5 * np.percentile(brightness[mask], 90)
        solid = _largest_component(brightness > max(level, FOREGROUND_LEVEL * 0.5))
        ys, xs = np.nonzero(solid)
        top, bottom = ys.min(), ys.max()
        box = (bottom - top + 1) * (xs.max() - xs.min() + 1)
        fills.append(solid.sum() / box)
        colors.append(classify_color(frame[mask]))
        weights = brightness * solid
        total = weights.sum()
        grid_y, grid_x = np.indices(brightness.shape)
        center_y = (grid_y * weights).sum() / total
        offsets.append((center_y - (top + bottom) / 2) / (bottom - top + 1))
        centers.append((center_y, (grid_x * weights).sum() / total))
        times.append(t)
    if not fills:
        return Verdict(None, None, None, details={"frames_with_shape": 0})
    color = Counter(colors).most_common(1)[0][0]
    shape_votes = Counter(classify_shape(f, o) for f, o in zip(fills, offsets))
    shape = shape_votes.most_common(1)[0][0]
    fill = float(np.median(fills))
    motion, displacement = None, (0.0, 0.0)
    if len(frames) > 1:
        if len(times) >= 2:
            t = np.asarray(times, dtype=np.float64)
            c = np.asarray(centers)
            slope = np.polyfit(t, c, 1)[0]  # (2,) pixels per frame for y and x
            dy, dx = slope * (len(frames) - 1)
            displacement = (float(dy), float(dx))
            if max(abs(dy), abs(dx)) < STILL_PX:
                motion = "still"
            elif abs(dx) >= abs(dy):
                motion = "right" if dx > 0 else "left"
            else:
                motion = "down" if dy > 0 else "up"
    return Verdict(color, shape, motion, displacement, fill,
                   details={"frames_with_shape": len(times), "shape_votes": dict(shape_votes)})


def accuracy(results: list[dict[str, bool]]) -> dict[str, float]:
    """Per-attribute and overall accuracy of a list of :meth:`Verdict.score` results (overall = mean over all
    judged attributes of all videos)."""
    summary = {}
    flat = []
    for attribute in ATTRIBUTES:
        values = [r[attribute] for r in results if attribute in r]
        if values:
            summary[attribute] = float(np.mean(values))
            flat += values
    summary["overall"] = float(np.mean(flat)) if flat else float("nan")
    return summary


