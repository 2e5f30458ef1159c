"""ComfyUI's IMAGE batches to and from the request layer's images and videos.

ComfyUI passes images and videos alike as an IMAGE batch: a float tensor ``[frames, height, width, 3]`` in 0..1.
The request layer takes PIL images (one start image, or a list of them: the first frames in order) and videos as
``(3, frames, height, width)`` tensors, and the pipeline returns ``(1, 3, frames, height, width)``. Nothing here
imports ComfyUI.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def images_to_pil(images: torch.Tensor) -> Image.Image | list[Image.Image]:
    """An IMAGE batch as the request's start or end image: one image for a batch of one (kept on the first or last
    3 frames), a list for a longer batch (that many first or last frames, in order)."""
    pictures = [Image.fromarray(frame) for frame in _to_uint8(images)]
    return pictures[0] if len(pictures) == 1 else pictures


def images_to_video(images: torch.Tensor) -> torch.Tensor:
    """An IMAGE batch ``[F, H, W, 3]`` as the request's input video ``(3, F, H, W)`` in 0..1."""
    _check_batch(images)
    return images.float().permute(3, 0, 1, 2).contiguous()


def video_to_images(videos: torch.Tensor) -> torch.Tensor:
    """A generated video ``(1, 3, F, H, W)`` in 0..1 as an IMAGE batch ``[F, H, W, 3]`` (float32, on the CPU)."""
    return videos[0].permute(1, 2, 3, 0).float().clamp(0, 1).cpu().contiguous()


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    _check_batch(images)
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def _check_batch(images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] < 1:
        raise ValueError(f"expected an IMAGE batch [frames, height, width, 3], got shape {tuple(images.shape)}")
