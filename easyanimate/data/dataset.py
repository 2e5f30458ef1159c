"""Image/video training data: reading, frame sampling and bounded replacement of broken files.

The dataset returns raw ``uint8`` frames ``(F, H, W, 3)`` (short side already reduced to the largest training
size); resizing to the batch's bucket, cropping and normalising to [-1, 1] happen in the collate function
(:mod:`easyanimate.data.buckets`) because only there is the batch's shape known.

Broken files (unreadable, too short, decode timeout) are replaced by a random entry of the same type, at most
``max_retries`` times. Every failure travels with the sample to the training loop, where
:class:`DataHealth` logs each path once, counts failures and stops training with a clear error when more than
``max_failure_fraction`` of the files read so far were broken.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .masks import VIDEO_MASK_PROBS, check_mask_probs
from .seeding import FRAMES, REPLACE, TEXT_DROP, keyed_rng

logger = logging.getLogger(__name__)


class DataError(RuntimeError):
    """Training data is unusable: too many broken files, or no readable replacement found."""


@dataclass
class DataConfig:
    """Sizes and sampling options of the training data (names follow the original's CLI flags)."""

    image_sample_size: int = 512
    video_sample_size: int = 512
    token_sample_size: int = 512
    video_sample_n_frames: int = 144
    video_sample_stride: int = 1
    # pixel frames per VAE encoder chunk; frame counts of video batches are multiples of it
    frame_interval: int = 8
    video_length_drop_start: float = 0.1
    video_length_drop_end: float = 0.9
    # how often each video entry is listed (the original's default 0 silently drops every video)
    video_repeat: int = 1
    enable_bucket: bool = True
    random_hw_adapt: bool = False
    training_with_video_token_length: bool = False
    random_ratio_crop: bool = False
    random_frame_crop: bool = False
    # every process trains the same step at the same pixel budget (equal step times across nodes)
    keep_all_node_same_token_length: bool = False
    enable_inpaint: bool = False
    # probabilities of the five inpaint mask types for videos (masks.MASK_TYPE_NAMES order)
    video_mask_probs: tuple[float, ...] = VIDEO_MASK_PROBS
    text_drop_ratio: float = 0.0
    max_retries: int = 10
    decode_timeout_s: float = 20.0

    def __post_init__(self):
        for name in ("image_sample_size", "video_sample_size", "token_sample_size"):
            value = getattr(self, name)
            if value < 16 or value % 16:
                raise ValueError(f"{name}={value}: must be a positive multiple of 16")
        if self.video_sample_n_frames < 1 or self.video_sample_stride < 1 or self.frame_interval < 1:
            raise ValueError("video_sample_n_frames, video_sample_stride and frame_interval must be >= 1")
        if not 0 <= self.video_length_drop_start < self.video_length_drop_end <= 1:
            raise ValueError("need 0 <= video_length_drop_start < video_length_drop_end <= 1")
        if self.video_repeat < 0:
            raise ValueError("video_repeat must be >= 0")
        if not 0 <= self.text_drop_ratio <= 1:
            raise ValueError("text_drop_ratio must be in [0, 1]")
        self.video_mask_probs = check_mask_probs(self.video_mask_probs)

    @property
    def max_side(self) -> int:
        """Frames are never kept larger than this on their short side (the largest size any batch may use)."""
        return max(self.image_sample_size, self.video_sample_size)

    def replace(self, **changes) -> "DataConfig":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class SampleRef:
    """What the batch sampler hands to the dataset: the metadata index plus the key of the sample's randomness
    (``epoch`` and its global ``position`` in that epoch's batch sequence), the ``round`` of its batch (the
    batches of one round are trained at the same step, one per process) and ``batch_position``, the position of
    the first sample of its global batch: the key of the draws its whole global batch shares (size, crop, clip
    length), so every process's share of one global batch is drawn alike."""

    index: int
    epoch: int = 0
    position: int = 0
    round: int = 0
    batch_position: int = 0


def compose_entries(entries: Sequence[dict], video_repeat: int) -> list[dict]:
    """Images once, videos ``video_repeat`` times (the original's balancing)."""
    images = [e for e in entries if e["type"] != "video"]
    videos = [e for e in entries if e["type"] == "video"]
    composed = images + videos * video_repeat
    if not composed:
        raise DataError("no training entries left (all entries are videos and video_repeat=0?)")
    return composed


def _run_with_timeout(fn, timeout_s: float, what: str):
    """Run ``fn`` in a daemon thread; raise ``TimeoutError`` if it does not return in time (the stuck decoder
    thread is abandoned, it cannot block the worker or interpreter exit)."""
    result: dict = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as exc:  # re-raised in the caller
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"decoding {what} took longer than {timeout_s:g} s")
    if "error" in result:
        raise result["error"]
    return result["value"]


def frame_indices(total: int, config: DataConfig, rng: np.random.Generator) -> np.ndarray:
    """Frame indices of a clip of ``total`` frames: ``n = min(video_sample_n_frames, frames in the window)``
    indices spread evenly over ``(n - 1) * video_sample_stride + 1`` frames (fewer when the video is short), from a
    random start inside the ``video_length_drop_start``-``video_length_drop_end`` window (10 %-90 % by default).
    Raises ValueError when the window holds no frame."""
    n_frames = min(config.video_sample_n_frames, int(total * (config.video_length_drop_end - config.video_length_drop_start)))
    if n_frames <= 0:
        raise ValueError(f"video too short: {total} frames leave none inside the {config.video_length_drop_start:g}-"
                         f"{config.video_length_drop_end:g} window")
    usable = int(config.video_length_drop_end * total)
    clip = min(usable, (n_frames - 1) * config.video_sample_stride + 1)
    # a window start past the last possible start moves back (the original drops such videos)
    last_start = usable - clip
    first_start = min(int(config.video_length_drop_start * usable), last_start)
    start = int(rng.integers(first_start, last_start + 1))
    return np.linspace(start, start + clip - 1, n_frames).astype(int)


def _shrink(frames: torch.Tensor, max_short_side: int) -> torch.Tensor:
    """``(F, H, W, 3)`` uint8 -> downscaled (bilinear, antialiased) so the short side is ``max_short_side``;
    never upscales."""
    height, width = frames.shape[1:3]
    if min(height, width) <= max_short_side:
        return frames
    scale = max_short_side / min(height, width)
    size = (max_short_side, int(width * scale)) if height <= width else (int(height * scale), max_short_side)
    x = frames.permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def read_video(path: str, config: DataConfig, rng: np.random.Generator) -> torch.Tensor:
    """Sampled frames of a video as ``(F, H, W, 3)`` uint8."""
    from decord import VideoReader

    def decode():
        reader = VideoReader(path, num_threads=2)
        try:
            indices = frame_indices(len(reader), config, rng)
            return reader.get_batch(list(indices)).asnumpy()
        finally:
            del reader  # close the file now (the original also ran gc.collect(), which costs ~0.5 s per read)

    frames = torch.from_numpy(_run_with_timeout(decode, config.decode_timeout_s, path))
    return _shrink(frames, config.max_side)


def read_image(path: str, config: DataConfig) -> torch.Tensor:
    """An image as a 1-frame video ``(1, H, W, 3)`` uint8."""
    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"))
    return _shrink(torch.from_numpy(array.copy())[None], config.max_side)


def probe_size(entry: dict) -> tuple[int, int]:
    """``(height, width)`` of an entry: from the metadata when given, else from the image header or the first
    decoded video frame."""
    if "width" in entry and "height" in entry:
        return int(entry["height"]), int(entry["width"])
    if entry["type"] == "video":
        from decord import VideoReader

        reader = VideoReader(entry["file_path"], num_threads=1)
        try:
            if len(reader) == 0:
                raise ValueError("video has no frames")
            height, width = reader[0].shape[:2]
        finally:
            del reader
        return int(height), int(width)
    with Image.open(entry["file_path"]) as image:
        width, height = image.size
    return int(height), int(width)


class VideoImageDataset(torch.utils.data.Dataset):
    """Metadata entries -> raw frames. Indexed by :class:`SampleRef` (or a plain int for epoch 0 / position 0).

    Returns ``{"pixels": uint8 (F,H,W,3), "text", "data_type", "index", "epoch", "position", "round",
    "batch_position", "failures"}`` where
    ``failures`` lists ``(path, error)`` for every file that had to be replaced to produce this sample.
    """

    def __init__(self, entries: Sequence[dict], config: DataConfig, seed: int = 0):
        self.entries = list(entries)
        self.config = config
        self.seed = int(seed)
        self._by_type = {
            kind: [i for i, e in enumerate(self.entries) if e["type"] == kind] for kind in ("image", "video")
        }

    def __len__(self) -> int:
        return len(self.entries)

    def load(self, index: int, rng: np.random.Generator) -> torch.Tensor:
        """The frames of entry ``index`` as uint8 ``(F, H, W, 3)`` (``rng`` picks a video's frames); raises on any
        read or decode problem."""
        entry = self.entries[index]
        if entry["type"] == "video":
            frames = read_video(entry["file_path"], self.config, rng)
        else:
            frames = read_image(entry["file_path"], self.config)
        if frames.ndim != 4 or frames.shape[0] == 0 or frames.shape[-1] != 3:
            raise ValueError(f"decoded to an unusable array of shape {tuple(frames.shape)}")
        return frames

    def __getitem__(self, ref) -> dict:
        ref = ref if isinstance(ref, SampleRef) else SampleRef(int(ref))
        data_type = self.entries[ref.index]["type"]
        index, failures = ref.index, []
        for attempt in range(self.config.max_retries + 1):
            entry = self.entries[index]
            try:
                pixels = self.load(index, keyed_rng(self.seed, FRAMES, ref.epoch, ref.position, attempt))
                break
            except Exception as exc:  # any decode problem: replace the file, keep the batch's type
                failures.append((entry["file_path"], f"{type(exc).__name__}: {exc}"))
                logger.warning("unreadable %s %s (%s); replacing it", data_type, entry["file_path"], failures[-1][1])
                pool = self._by_type[data_type]
                index = pool[int(keyed_rng(self.seed, REPLACE, ref.epoch, ref.position, attempt).integers(len(pool)))]
        else:
            listing = "\n  ".join(f"{p}: {e}" for p, e in failures)
            raise DataError(
                f"{len(failures)} {data_type} files in a row could not be read while replacing a broken one; "
                f"run scripts/check_dataset.py on the metadata to find the broken entries:\n  {listing}"
            )
        text = entry["text"]
        if self.config.text_drop_ratio > 0 and keyed_rng(self.seed, TEXT_DROP, ref.epoch, ref.position).random() < self.config.text_drop_ratio:
            text = ""
        return {
            "pixels": pixels,
            "text": text,
            "data_type": data_type,
            "index": index,
            "epoch": ref.epoch,
            "position": ref.position,
            "round": ref.round,
            "batch_position": ref.batch_position,
            "failures": failures,
        }


class DataHealth:
    """Counts files read and broken ones across the whole run; logs every broken path once and raises
    :class:`DataError` once more than ``max_failure_fraction`` of the files read so far were broken (checked only
    after ``min_reads`` reads, so one bad file at step 1 does not stop a run)."""

    def __init__(self, max_failure_fraction: float = 0.05, min_reads: int = 50):
        self.max_failure_fraction = max_failure_fraction
        self.min_reads = min_reads
        self.reads = 0
        self.broken: dict[str, str] = {}
        self.failures = 0

    def record(self, failures: Sequence[tuple[str, str]], successes: int) -> None:
        """Count one batch's reads; log each broken path the first time it is seen."""
        self.reads += successes + len(failures)
        self.failures += len(failures)
        for path, error in failures:
            if path not in self.broken:
                self.broken[path] = error
                logger.warning("broken training file %s: %s", path, error)

    def check(self, reads: int, failures: int) -> None:
        """Raise :class:`DataError` when ``failures`` of ``reads`` (e.g. summed over processes) is too many."""
        if reads >= self.min_reads and failures > self.max_failure_fraction * reads:
            raise DataError(
                f"{failures} of {reads} file reads failed ({failures / reads:.1%} > --max_failure_fraction "
                f"{self.max_failure_fraction:.1%}); training stopped. Broken files seen here:\n  "
                + "\n  ".join(f"{p}: {e}" for p, e in list(self.broken.items())[:20])
                + "\nRun scripts/check_dataset.py on the metadata and remove or fix them."
            )

    def update(self, failures: Sequence[tuple[str, str]], successes: int) -> None:
        """:meth:`record` then :meth:`check` on this process's counts."""
        self.record(failures, successes)
        self.check(self.reads, self.failures)

    def summary(self) -> str:
        if not self.failures:
            return f"data: {self.reads} file reads, none broken"
        return (f"data: {self.failures} of {self.reads} file reads failed ({len(self.broken)} distinct files): "
                + ", ".join(list(self.broken)[:10]) + (" ..." if len(self.broken) > 10 else ""))


def check_entries(entries: Sequence[dict], config: DataConfig, *, progress: bool = True) -> tuple[list, list]:
    """Read every entry as training would. Returns ``(problems, sizes)``: ``(index, path, error)`` for each
    unreadable entry and ``(height, width)`` (or ``None``) per entry."""
    from tqdm.auto import tqdm

    dataset = VideoImageDataset(entries, config)
    problems, sizes = [], []
    for index, entry in enumerate(tqdm(entries, desc="checking", unit="file", disable=not progress)):
        try:
            if not os.path.isfile(entry["file_path"]):
                raise FileNotFoundError("no such file")
            frames = dataset.load(index, np.random.default_rng(index))
            del frames
            sizes.append(probe_size({k: v for k, v in entry.items() if k not in ("width", "height")}))
        except Exception as exc:
            problems.append((index, entry["file_path"], f"{type(exc).__name__}: {exc}"))
            sizes.append(None)
    return problems, sizes
