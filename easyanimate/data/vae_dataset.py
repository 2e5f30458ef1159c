"""Data for VAE training: images and video clips as random square crops resized to a fixed size, in batches of
one kind (all images or all clips).

Same metadata format as the transformer training (:func:`easyanimate.data.metadata.load_metadata`); captions
are not used. Every random choice (clip window, crop) is drawn from a generator keyed by the sample's position in
the sample stream (:mod:`easyanimate.data.seeding`), so a resumed run reads exactly what the uninterrupted run
would have read, whatever the number of dataloader workers.
"""

from __future__ import annotations

import logging
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .seeding import BATCH, FRAMES, REPLACE, keyed_rng

logger = logging.getLogger(__name__)


def check_video_len(video_len: int, frame_multiple: int = 8) -> None:
    """The V4 VAE reconstructs a clip exactly only when its length is a multiple of its encoder chunk
    (``mini_batch_encoder`` = 8); 25 frames, the original's default, comes back as 28 and cannot be trained on."""
    if video_len < frame_multiple or video_len % frame_multiple != 0:
        suggestion = max(frame_multiple, video_len // frame_multiple * frame_multiple)
        raise ValueError(
            f"video_len={video_len}: video clips must have a multiple of {frame_multiple} frames (the VAE encodes "
            f"{frame_multiple}-frame chunks and its cache decoder returns 4 frames per latent, so other lengths do "
            f"not round-trip, e.g. 25 -> 28). Use video_len={suggestion}."
        )


class VAEDataset(Dataset):
    """Images and videos from metadata entries (``file_path``, ``type``) as float tensors (C, T, H, W) in
    [-1, 1]; images have T = 1, videos ``video_len`` frames.

    A random square with side ``U(min_crop, max_crop) * min(height, width)`` is cut out (the same square for all
    frames of a clip) and resized to ``size`` x ``size``. A clip covers ``(video_len - 1) * frame_interval + 1``
    frames (fewer if the video is shorter) from a random start, sampled evenly to ``video_len`` frames.

    Items are addressed by ``(index, sample_key)``: ``sample_key`` seeds the random choices. A file that cannot be
    read is logged and replaced by another random entry of the same kind, at most ``max_retries`` times.
    """

    def __init__(
        self,
        entries: Sequence[dict],
        size: int = 256,
        video_len: int = 24,
        frame_interval: int = 1,
        frame_multiple: int = 8,
        min_crop: float = 0.25,
        max_crop: float = 1.0,
        seed: int = 0,
        max_retries: int = 10,
    ):
        if not entries:
            raise ValueError("VAEDataset: no metadata entries")
        check_video_len(video_len, frame_multiple)
        if size <= 0 or size % 8 != 0:
            raise ValueError(f"size={size}: the VAE needs a positive multiple of 8 pixels")
        if not 0 < min_crop <= max_crop <= 1:
            raise ValueError(f"crop fractions must satisfy 0 < min_crop <= max_crop <= 1, got {min_crop}, {max_crop}")
        if frame_interval < 1:
            raise ValueError(f"frame_interval must be >= 1, got {frame_interval}")
        self.entries = list(entries)
        self.size = size
        self.video_len = video_len
        self.frame_interval = frame_interval
        self.min_crop, self.max_crop = min_crop, max_crop
        self.seed = seed
        self.max_retries = max_retries
        self.kinds = [entry["type"] for entry in self.entries]
        self._by_kind = {kind: [i for i, k in enumerate(self.kinds) if k == kind] for kind in set(self.kinds)}

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, sample_key = key
        kind = self.kinds[index]
        failures = []
        for attempt in range(self.max_retries + 1):
            entry = self.entries[index]
            try:
                pixels = self._load(entry, keyed_rng(self.seed, FRAMES, sample_key, attempt))
                return {"pixels": pixels, "type": kind, "index": index}
            except Exception as exc:  # noqa: BLE001 - any unreadable file is replaced, and reported
                logger.warning("skipping unreadable %s %s: %s", kind, entry["file_path"], exc)
                failures.append(f"{entry['file_path']}: {exc}")
                same_kind = self._by_kind[kind]
                index = same_kind[int(keyed_rng(self.seed, REPLACE, sample_key, attempt).integers(len(same_kind)))]
        raise RuntimeError(
            f"{len(failures)} {kind} files in a row could not be read; check the data and the metadata paths:\n  "
            + "\n  ".join(failures)
        )

    def _load(self, entry: dict, rng: np.random.Generator) -> torch.Tensor:
        if entry["type"] == "image":
            frames = read_image(entry["file_path"])
        else:
            frames = read_clip(entry["file_path"], self.video_len, self.frame_interval, rng)
        frames = random_square_crop(frames, self.min_crop, self.max_crop, rng)
        frames = resize_square(frames, self.size)
        return (frames / 127.5 - 1.0).permute(1, 0, 2, 3).contiguous()  # (T, C, H, W) -> (C, T, H, W)


def read_image(path: str) -> torch.Tensor:
    """An image file as a float tensor (1, 3, H, W) in [0, 255]."""
    from PIL import Image

    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1)[None].float()


def read_clip(path: str, video_len: int, frame_interval: int, rng: np.random.Generator) -> torch.Tensor:
    """``video_len`` frames (T, 3, H, W) in [0, 255] evenly spread over a random window of
    ``(video_len - 1) * frame_interval + 1`` frames (the whole video if it is shorter)."""
    import decord

    reader = decord.VideoReader(path, num_threads=1)
    total = len(reader)
    if total == 0:
        raise ValueError("the video has no frames")
    window = min(total, (video_len - 1) * frame_interval + 1)
    start = int(rng.integers(0, total - window + 1))
    indices = np.linspace(start, start + window - 1, video_len).round().astype(int).tolist()
    frames = reader.get_batch(indices).asnumpy()
    del reader
    return torch.from_numpy(frames).permute(0, 3, 1, 2).float()


def random_square_crop(
    frames: torch.Tensor, min_crop: float, max_crop: float, rng: np.random.Generator
) -> torch.Tensor:
    """The same random square of side ``U(min_crop, max_crop) * min(H, W)`` from every frame of (T, C, H, W)."""
    height, width = frames.shape[-2:]
    side = max(1, int(min(height, width) * rng.uniform(min_crop, max_crop)))
    top = int(rng.integers(0, height - side + 1))
    left = int(rng.integers(0, width - side + 1))
    return frames[..., top : top + side, left : left + side]


def resize_square(frames: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (T, C, s, s) to (T, C, size, size): area averaging when shrinking (the original uses cv2's
    INTER_AREA), bilinear when enlarging."""
    if frames.shape[-1] == size:
        return frames
    if frames.shape[-1] > size:
        return F.interpolate(frames, size=(size, size), mode="area")
    return F.interpolate(frames, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 255)


class HomogeneousBatchSampler:
    """An endless stream of batches of dataset keys ``(index, sample_key)``, each batch all images or all videos.

    Like the original's ``ImageVideoSampler``: walk a random permutation of the dataset and put each index in the
    bucket of its kind; a full bucket is emitted as a batch. The proportion of image and video batches follows the
    data. Buckets carry over from one pass to the next, so nothing is dropped. With ``num_replicas`` processes,
    global batch ``g`` goes to process ``g % num_replicas``. ``start_batch`` skips the first batches of this
    process (resume) without reading any data.
    """

    def __init__(
        self,
        kinds: Sequence[str],
        batch_size: int,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        start_batch: int = 0,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.kinds = list(kinds)
        self.batch_size = batch_size
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        n = len(self.kinds)
        buckets: dict[str, list[tuple[int, int]]] = {}
        global_batch, own_batch, epoch = 0, 0, 0
        while True:
            order = keyed_rng(self.seed, BATCH, epoch).permutation(n)
            for position, index in enumerate(order.tolist()):
                bucket = buckets.setdefault(self.kinds[index], [])
                bucket.append((index, epoch * n + position))
                if len(bucket) < self.batch_size:
                    continue
                batch, buckets[self.kinds[index]] = bucket, []
                mine = global_batch % self.num_replicas == self.rank
                global_batch += 1
                if mine:
                    if own_batch >= self.start_batch:
                        yield batch
                    own_batch += 1
            epoch += 1


def collate_clips(samples: list[dict]) -> dict:
    """Stack one homogeneous batch into ``pixels`` (B, C, T, H, W)."""
    kinds = {s["type"] for s in samples}
    if len(kinds) != 1:
        raise ValueError(f"a VAE batch must be all images or all videos, got {sorted(kinds)}")
    return {
        "pixels": torch.stack([s["pixels"] for s in samples]),
        "type": kinds.pop(),
        "index": torch.tensor([s["index"] for s in samples]),
    }
