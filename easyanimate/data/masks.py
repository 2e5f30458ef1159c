"""The five random inpaint masks of V4 image-to-video training.

A mask has shape ``(F, 1, H, W)``, value 1 where the model must generate and 0 where the pixels are given.
Randomness comes from an explicit ``numpy.random.Generator`` so a sample's mask depends only on its seed.
"""

from __future__ import annotations

import numpy as np
import torch

RANDOM_BOX, FULL, KEEP_HEAD, KEEP_HEAD_AND_TAIL, SPATIOTEMPORAL_BOX = range(5)
MASK_TYPE_NAMES = ("random_box", "full", "keep_head", "keep_head_and_tail", "spatiotemporal_box")
VIDEO_MASK_PROBS = (0.05, 0.30, 0.30, 0.30, 0.05)
IMAGE_MASK_PROBS = (0.2, 0.8)  # images only use the random box and the full mask


def _box(height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A box centred uniformly in the frame, each side a random 1/4..3/4 of the frame, clipped to it."""
    center_y, center_x = rng.integers(0, height), rng.integers(0, width)
    box_h = rng.integers(height // 4, max(height * 3 // 4, height // 4 + 1))
    box_w = rng.integers(width // 4, max(width * 3 // 4, width // 4 + 1))
    top, left = max(center_y - box_h // 2, 0), max(center_x - box_w // 2, 0)
    return top, min(center_y + box_h // 2, height), left, min(center_x + box_w // 2, width)


def make_mask(kind: int, num_frames: int, height: int, width: int, rng: np.random.Generator) -> torch.Tensor:
    """The mask of one type (``RANDOM_BOX`` ... ``SPATIOTEMPORAL_BOX``) as a ``(F, 1, H, W)`` uint8 tensor."""
    mask = torch.zeros(num_frames, 1, height, width, dtype=torch.uint8)
    if kind == RANDOM_BOX:
        top, bottom, left, right = _box(height, width, rng)
        mask[:, :, top:bottom, left:right] = 1
    elif kind == FULL:
        mask[:] = 1
    elif kind == KEEP_HEAD:
        kept = int(rng.integers(1, 5))
        mask[kept:] = 1
    elif kind == KEEP_HEAD_AND_TAIL:
        kept = int(rng.integers(1, 5))
        mask[kept : max(num_frames - kept, kept)] = 1
    elif kind == SPATIOTEMPORAL_BOX:
        half = max(num_frames // 2, 1)
        start = int(rng.integers(0, half))
        end = int(rng.integers(half, max(num_frames, half + 1)))
        top, bottom, left, right = _box(height, width, rng)
        mask[start:end, :, top:bottom, left:right] = 1
    else:
        raise ValueError(f"unknown mask type {kind}; expected 0..4 ({', '.join(MASK_TYPE_NAMES)})")
    return mask


def check_mask_probs(probs) -> tuple[float, ...]:
    """``probs`` as a tuple of five non-negative floats summing to 1, or a ValueError naming the problem."""
    probs = tuple(float(p) for p in probs)
    if len(probs) != len(MASK_TYPE_NAMES) or min(probs) < 0 or abs(sum(probs) - 1) > 1e-6:
        raise ValueError(
            f"video mask probabilities must be {len(MASK_TYPE_NAMES)} non-negative numbers summing to 1, one per "
            f"type ({', '.join(MASK_TYPE_NAMES)}); got {list(probs)}"
        )
    return probs


def random_mask(num_frames: int, height: int, width: int, rng: np.random.Generator,
                video_probs: tuple[float, ...] = VIDEO_MASK_PROBS) -> torch.Tensor:
    """Draw a mask type: videos with ``video_probs`` (V4: 5/30/30/30/5 %), images 20 % box, 80 % full."""
    probs = video_probs if num_frames > 1 else IMAGE_MASK_PROBS
    kind = int(rng.choice(len(probs), p=probs))
    return make_mask(kind, num_frames, height, width, rng)
