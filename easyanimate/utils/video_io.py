"""Reading and writing videos and images.

Videos are float tensors in [0, 1] shaped (3, F, H, W), or (B, 3, F, H, W) for a batch, as the pipeline returns them.
Writing follows the original's ``save_videos_grid``: each frame is multiplied by 255 and *truncated* to uint8, an
mp4 goes through imageio-ffmpeg with its defaults, a gif gets ``duration = 1000 / fps`` ms per frame, and a
single frame is saved as png. A batch is tiled into a grid of up to 6 videos per row. Files are written to a
temporary name next to the target and renamed at the end, so a crash never leaves a half-written file that
looks complete. Reading uses decord (videos) and PIL (images).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".gif", ".webm", ".mov", ".mkv", ".avi")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class MediaError(ValueError):
    """A video or image file cannot be read or written."""


def _as_batch(videos: torch.Tensor | np.ndarray) -> torch.Tensor:
    videos = torch.as_tensor(videos)
    if videos.ndim == 4:
        videos = videos[None]
    if videos.ndim != 5 or videos.shape[1] != 3:
        raise MediaError(f"expected a video tensor (B, 3, F, H, W) or (3, F, H, W), got shape {tuple(videos.shape)}")
    return videos.detach().float().cpu()


def frames_to_uint8(videos: torch.Tensor | np.ndarray, nrow: int = 6, padding: int = 2) -> np.ndarray:
    """(B, 3, F, H, W) in [0, 1] -> (F, H', W', 3) uint8 frames. A batch of one passes through untouched; larger
    batches are tiled ``nrow`` videos per row with ``padding`` black pixels between and around tiles (like
    torchvision's ``make_grid``). Values are clamped to [0, 1] and ``x * 255`` is truncated, as the original does."""
    videos = _as_batch(videos).clamp(0, 1)
    b, _, f, h, w = videos.shape
    if b == 1:
        grid = videos[0]
    else:
        cols = min(nrow, b)
        rows = -(-b // cols)
        grid = torch.zeros(3, f, rows * (h + padding) + padding, cols * (w + padding) + padding)
        for i in range(b):
            top, left = (i // cols) * (h + padding) + padding, (i % cols) * (w + padding) + padding
            grid[:, :, top : top + h, left : left + w] = videos[i]
    return (grid * 255).to(torch.uint8).permute(1, 2, 3, 0).contiguous().numpy()


def match_colours_to_first_frame(frames: np.ndarray) -> np.ndarray:
    """The original's optional ``color_transfer`` post-process: give every frame after the first the per-channel
    mean and standard deviation of the first frame in CIELAB (OpenCV's 8-bit LAB), which undoes a slow colour drift
    over a video. (F, H, W, 3) uint8 in and out. A channel that is flat in some frame keeps its spread (the
    original divides by its zero deviation)."""
    import cv2

    lab = np.stack([cv2.cvtColor(frame, cv2.COLOR_RGB2LAB) for frame in frames]).astype(np.float64)
    target_mean, target_std = lab[0].mean(axis=(0, 1)), lab[0].std(axis=(0, 1))
    out = [frames[0]]
    for frame in lab[1:]:
        mean, std = frame.mean(axis=(0, 1)), frame.std(axis=(0, 1))
        scale = np.divide(target_std, std, out=np.ones_like(std), where=std > 0)
        matched = np.clip(np.rint((frame - mean) * scale + target_mean), 0, 255).astype(np.uint8)
        out.append(cv2.cvtColor(matched, cv2.COLOR_LAB2RGB))
    return np.stack(out)


def _atomic_target(path: Path) -> Path:
    """A temporary file next to ``path`` with the same suffix (writers pick the format from it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".partial{path.suffix}", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def save_video(videos: torch.Tensor | np.ndarray, path: str | os.PathLike, fps: int = 24,
               color_transfer: bool = False) -> Path:
    """Save a video tensor in [0, 1] ((B, 3, F, H, W) or (3, F, H, W)) to ``path`` and return the path.
    ``color_transfer`` matches every frame's colours to the first one's (:func:`match_colours_to_first_frame`).

    ``.mp4`` (and other ffmpeg containers) and ``.gif`` write all frames; an image suffix (``.png``, ``.jpg``)
    writes the first frame, which is what a one-frame generation is. mp4 frames need even sizes for the default
    yuv420p encoding; the pipeline's sizes (multiples of 16) always are.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in VIDEO_SUFFIXES + IMAGE_SUFFIXES:
        raise MediaError(f"cannot tell the format of {path}: use one of {', '.join(VIDEO_SUFFIXES + IMAGE_SUFFIXES)}")
    if fps <= 0:
        raise MediaError(f"fps must be positive, got {fps}")
    frames = frames_to_uint8(videos)
    if color_transfer:
        frames = match_colours_to_first_frame(frames)
    tmp = _atomic_target(path)
    try:
        if suffix in IMAGE_SUFFIXES:
            Image.fromarray(frames[0]).save(tmp)
        else:
            import imageio.v2 as imageio

            if suffix == ".gif":
                imageio.mimsave(tmp, list(frames), duration=1000 / fps, loop=0)
            else:
                imageio.mimsave(tmp, list(frames), fps=fps)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def save_image(image: torch.Tensor | np.ndarray, path: str | os.PathLike) -> Path:
    """Save one image tensor in [0, 1], (3, H, W), truncated to uint8 like the videos."""
    image = torch.as_tensor(image)
    if image.ndim != 3 or image.shape[0] != 3:
        raise MediaError(f"expected an image tensor (3, H, W), got shape {tuple(image.shape)}")
    return save_video(image[:, None], path)


def _check_readable(path: Path, kind: str) -> None:
    if not path.exists():
        raise MediaError(f"{kind} file not found: {path}")
    if not path.is_file():
        raise MediaError(f"{kind} path is not a file: {path}")


def _parse_size(size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int):
        return size, size
    height, width = size
    if height <= 0 or width <= 0:
        raise MediaError(f"size must be positive, got {size}")
    return int(height), int(width)


def read_video(
    path: str | os.PathLike, num_frames: int | None = None, size: int | tuple[int, int] | None = None
) -> torch.Tensor:
    """Read a video with decord (a gif with PIL) into a float tensor (3, F, H, W) in [0, 1].

    ``num_frames`` keeps the first frames (an error if the video is shorter). ``size`` = (height, width) resizes
    every frame with PIL bicubic (the original resizes with cv2 bilinear; the two differ slightly).
    """
    path = Path(path)
    _check_readable(path, "video")
    if num_frames is not None and num_frames < 1:
        raise MediaError(f"num_frames must be at least 1, got {num_frames}")
    frames = _read_gif_frames(path) if path.suffix.lower() == ".gif" else _read_decord_frames(path, num_frames)
    if len(frames) == 0:
        raise MediaError(f"video {path} has no frames")
    if num_frames is not None:
        if num_frames > len(frames):
            raise MediaError(f"video {path} has {len(frames)} frames, fewer than the {num_frames} requested")
        frames = frames[:num_frames]
    hw = _parse_size(size)
    if hw is not None and frames.shape[1:3] != hw:
        frames = np.stack([np.asarray(Image.fromarray(f).resize((hw[1], hw[0]), Image.BICUBIC)) for f in frames])
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 255.0


def probe_video(path: str | os.PathLike) -> tuple[int, int, int]:
    """(frames, height, width) of a video file, from its header and first frame (no full decode)."""
    path = Path(path)
    _check_readable(path, "video")
    if path.suffix.lower() == ".gif":
        try:
            with Image.open(path) as gif:
                return getattr(gif, "n_frames", 1), gif.height, gif.width
        except Exception as exc:
            raise MediaError(f"cannot read gif {path} ({exc}); is it a valid gif file?") from exc
    import decord

    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
        frames = len(reader)
        height, width = reader[0].shape[:2] if frames else (0, 0)
    except Exception as exc:  # decord raises its own DECORDError and RuntimeError
        raise MediaError(f"cannot read video {path} ({str(exc).strip()}); is it a valid video file?") from exc
    if frames == 0:
        raise MediaError(f"video {path} has no frames")
    return frames, height, width


def _read_decord_frames(path: Path, num_frames: int | None) -> np.ndarray:
    import decord

    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
        total = len(reader) if num_frames is None else min(num_frames, len(reader))
    except Exception as exc:  # decord raises its own DECORDError and RuntimeError
        raise MediaError(f"cannot read video {path} ({str(exc).strip()}); is it a valid video file?") from exc
    try:
        return reader.get_batch(list(range(total))).asnumpy()  # (F, H, W, 3) uint8
    except Exception as exc:
        # decord 0.6 fails to copy frames of some small widths (e.g. 16 or 48 pixels: a row-padding bug); ffmpeg
        # through imageio reads them.
        logger.info("decord could not decode %s (%s); reading it with imageio-ffmpeg", path, str(exc).strip()[-120:])
        return _read_ffmpeg_frames(path, total)


def _read_ffmpeg_frames(path: Path, num_frames: int) -> np.ndarray:
    import imageio.v2 as imageio

    try:
        with imageio.get_reader(path, "ffmpeg") as reader:
            frames = []
            for frame in reader:
                frames.append(np.asarray(frame)[..., :3])
                if len(frames) == num_frames:
                    break
    except Exception as exc:
        raise MediaError(f"cannot read video {path} ({exc}); is it a valid video file?") from exc
    return np.stack(frames)


def _read_gif_frames(path: Path) -> np.ndarray:
    """decord cannot read gifs (no duration metadata); PIL can."""
    from PIL import ImageSequence

    try:
        with Image.open(path) as gif:
            return np.stack([np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(gif)])
    except Exception as exc:
        raise MediaError(f"cannot read gif {path} ({exc}); is it a valid gif file?") from exc


def read_image(
    path: str | os.PathLike, size: int | tuple[int, int] | None = None, as_tensor: bool = False
) -> Image.Image | torch.Tensor:
    """Read an image as RGB. ``size`` = (height, width) resizes it with PIL ``resize`` (bicubic, the PIL default
    the original's image-to-video helper uses). Returns a PIL image, or with ``as_tensor`` a float tensor
    (3, H, W) in [0, 1]."""
    path = Path(path)
    _check_readable(path, "image")
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, ...
        raise MediaError(f"cannot read image {path} ({exc}); is it a valid image file?") from exc
    hw = _parse_size(size)
    if hw is not None and (image.height, image.width) != hw:
        image = image.resize((hw[1], hw[0]))
    if as_tensor:
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255.0
    return image
