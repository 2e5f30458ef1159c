"""Aspect-ratio buckets, token-length arithmetic, the bucket batch sampler and the batch collate function.

Every batch has one shape: the sampler groups entries of one type (image or video) whose height/width ratio is
closest to the same bucket, and the collate function resizes/crops all of them to that bucket at the batch's base
size and cuts them to a common frame count.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .dataset import DataConfig, SampleRef, probe_size
from .masks import random_mask
from .seeding import BATCH, MASK, ROUND_BUDGET, keyed_rng

logger = logging.getLogger(__name__)

# height/width ratio -> (height, width) at base size 512 (40 buckets)
ASPECT_RATIO_512: dict[float, tuple[int, int]] = {
    0.25: (256, 1024), 0.26: (256, 992), 0.27: (256, 960), 0.28: (256, 928), 0.32: (288, 896), 0.33: (288, 864),
    0.35: (288, 832), 0.4: (320, 800), 0.42: (320, 768), 0.48: (352, 736), 0.5: (352, 704), 0.52: (352, 672),
    0.57: (384, 672), 0.6: (384, 640), 0.68: (416, 608), 0.72: (416, 576), 0.78: (448, 576), 0.82: (448, 544),
    0.88: (480, 544), 0.94: (480, 512), 1.0: (512, 512), 1.07: (512, 480), 1.13: (544, 480), 1.21: (544, 448),
    1.29: (576, 448), 1.38: (576, 416), 1.46: (608, 416), 1.67: (640, 384), 1.75: (672, 384), 2.0: (704, 352),
    2.09: (736, 352), 2.4: (768, 320), 2.5: (800, 320), 2.89: (832, 288), 3.0: (864, 288), 3.11: (896, 288),
    3.62: (928, 256), 3.75: (960, 256), 3.88: (992, 256), 4.0: (1024, 256),
}
# --random_ratio_crop: 15 buckets drawn with these weights instead of matching the input's ratio
RANDOM_CROP_RATIOS = (0.42, 0.5, 0.57, 0.68, 0.78, 0.88, 0.94, 1.0, 1.07, 1.13, 1.29, 1.46, 1.75, 2.0, 2.4)
RANDOM_CROP_WEIGHTS = (1, 2, 4, 4, 4, 4, 8, 8, 8, 4, 4, 4, 4, 2, 1)


def closest_ratio(height: float, width: float, ratios: Sequence[float] = tuple(ASPECT_RATIO_512)) -> float:
    """The bucket key nearest to ``height / width`` (first one on ties, like ``argmin``)."""
    target = height / width
    return min(ratios, key=lambda r: abs(r - target))


def bucket_crop_size(ratio: float, base_size: float) -> tuple[int, int]:
    """``(height, width)`` of bucket ``ratio`` scaled to ``base_size``, each side floored to a multiple of 16."""
    height, width = ASPECT_RATIO_512[ratio]
    scale = base_size / 512
    return int(height * scale / 16) * 16, int(width * scale / 16) * 16


# ----------------------------------------------------------------------------------------- token arithmetic
def pixel_budget(n_frames: int, token_sample_size: int) -> int:
    """The per-sample pixel budget ``n_frames * token_sample_size**2`` that fixes the token length."""
    return n_frames * token_sample_size**2


def latent_tokens(frames: int, height: int, width: int) -> int:
    """Transformer tokens of a clip: temporal /4, spatial /8 (VAE) and /2 (patch)."""
    return max(frames // 4, 1) * (height // 16) * (width // 16)


def candidate_sizes(video_sample_size: int, image_sample_size: int) -> list[int]:
    """Base sizes a video batch may be trained at: ``video_sample_size`` up to ``image_sample_size`` in steps of
    128 (``image_sample_size`` appended when the step misses it)."""
    if image_sample_size <= video_sample_size:
        return [video_sample_size]
    sizes = list(range(video_sample_size, image_sample_size + 1, 128))
    if sizes[-1] != image_sample_size:
        sizes.append(image_sample_size)
    return sizes


def frames_for_size(size: int, budget: int, n_frames: int, interval: int) -> int:
    """Frames a ``size x size`` clip may have within ``budget``, floored to the VAE chunk ``interval``."""
    return frames_for_area(size**2, budget, n_frames, interval)


def frames_for_area(area: int, budget: int, n_frames: int, interval: int) -> int:
    """Frames of ``area`` pixels each that fit in ``budget``, at most ``n_frames``, floored to ``interval``."""
    return int(min(budget / area, n_frames) // interval) * interval


def round_budgets(token_sample_size: int, n_frames: int) -> list[int]:
    """``--keep_all_node_same_token_length``: the pixel budgets a training round draws from, ``s * s * n_frames``
    for s = 256, 384, ... up to ``token_sample_size`` (appended when the step misses it); only s = 256 when
    ``token_sample_size <= 256``."""
    sizes = [256]
    if token_sample_size > 256:
        sizes = list(range(256, token_sample_size + 1, 128))
        if sizes[-1] != token_sample_size:
            sizes.append(token_sample_size)
    return [s * s * n_frames for s in sizes]


def replication_factor(budget: int, frames: int, height: int, width: int) -> int:
    """How often each sample of a batch is repeated under ``--training_with_video_token_length`` so the batch
    fills its token budget: ×4 when it uses at most 1/16 of the pixel budget, ×2 when at most 1/4, else 1."""
    pixels = frames * height * width
    if budget // 16 >= pixels:
        return 4
    if budget // 4 >= pixels:
        return 2
    return 1


def downsample_choices(size: int, extra: Sequence[float] = ()) -> tuple[list[float], list[float]]:
    """``pick_downsample`` of the original: ratios and probabilities (first 0.75, the rest share 0.25)."""
    if size >= 1536:
        ratios = [1, 1.25, 1.5, 2, 2.5, 3]
    elif size >= 1024:
        ratios = [1, 1.25, 1.5, 2]
    elif size >= 768:
        ratios = [1, 1.25, 1.5]
    else:
        ratios = [1]
    ratios = ratios + list(extra)
    if len(ratios) == 1:
        return ratios, [1.0]
    return ratios, [0.75] + [0.25 / (len(ratios) - 1)] * (len(ratios) - 1)


def frame_crop_choices(n_frames: int, interval: int) -> tuple[list[int], list[float]]:
    """``--random_frame_crop``: ``interval, 2*interval, ..., n``; the full length has probability 0.9."""
    choices = list(range(interval, n_frames, interval)) + [n_frames]
    if len(choices) == 1:
        return choices, [1.0]
    return choices, [0.1 / (len(choices) - 1)] * (len(choices) - 1) + [0.9]


# ----------------------------------------------------------------------------------------- batch sampler
class BucketBatchSampler:
    """Groups a seeded random permutation of the entries into global batches of one type and one aspect-ratio
    bucket, and gives this process its share of each.

    Each pass (epoch ``e``) permutes the entries with ``torch.randperm`` seeded ``seed + e``; an entry joins the
    bucket of its type and closest ratio, and a bucket holding ``batch_size * world_size`` entries becomes the
    global batch of the next round (one optimizer micro-step of every process); rank ``r`` gets its entries
    ``r * batch_size`` to ``(r + 1) * batch_size - 1``. The global batches, and every sample's position in the
    epoch, are therefore the same for N processes at ``batch_size`` as for one process at ``N * batch_size``
    (with one process: each full bucket is a batch). Partial buckets are dropped. Every rank computes the same
    sequence, so ranks never disagree on the number of steps. ``set_epoch(e, skip_rounds=k)`` resumes mid-epoch
    without reading any data. Entries whose size cannot be read are skipped and listed in ``failures``.
    """

    def __init__(
        self,
        entries: Sequence[dict],
        batch_size: int,
        *,
        seed: int = 0,
        ratios: Sequence[float] | None = tuple(ASPECT_RATIO_512),
        rank: int = 0,
        world_size: int = 1,
        size_fn: Callable[[dict], tuple[int, int]] = probe_size,
    ):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.entries = list(entries)
        self.batch_size = batch_size
        self.seed = int(seed)
        self.ratios = tuple(ratios) if ratios else (1.0,)
        self.rank, self.world_size = rank, world_size
        self.size_fn = size_fn
        self.epoch, self.skip_rounds = 0, 0
        self._ratio_cache: dict[int, float | None] = {}
        self.failures: list[tuple[str, str]] = []

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def set_epoch(self, epoch: int, skip_rounds: int = 0) -> None:
        self.epoch, self.skip_rounds = int(epoch), int(skip_rounds)

    def __len__(self) -> int:
        """An upper bound of the batches this rank gets per epoch (partial buckets are dropped)."""
        return len(self.entries) // self.global_batch_size

    def _ratio(self, index: int) -> float | None:
        if index not in self._ratio_cache:
            entry = self.entries[index]
            try:
                height, width = self.size_fn(entry)
                self._ratio_cache[index] = closest_ratio(height, width, self.ratios)
            except Exception as exc:
                self._ratio_cache[index] = None
                self.failures.append((entry["file_path"], f"{type(exc).__name__}: {exc}"))
                logger.warning("skipping %s: cannot read its size (%s)", entry["file_path"], exc)
        return self._ratio_cache[index]

    def global_batches(self) -> Iterator[list[int]]:
        """The entry indices of each global batch of this epoch, in training order (every rank computes the same)."""
        order = torch.randperm(len(self.entries), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        buckets: dict[tuple[str, float], list[int]] = {}
        for index in order.tolist():
            ratio = self._ratio(index)
            if ratio is None:
                continue
            bucket = buckets.setdefault((self.entries[index]["type"], ratio), [])
            bucket.append(index)
            if len(bucket) == self.global_batch_size:
                yield list(bucket)
                bucket.clear()

    def __iter__(self) -> Iterator[list[SampleRef]]:
        for round_number, indices in enumerate(self.global_batches()):
            if round_number < self.skip_rounds:
                continue
            start = round_number * self.global_batch_size  # position of the global batch's first sample
            mine = range(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
            yield [SampleRef(indices[k], self.epoch, start + k, round_number, start) for k in mine]
        self.skip_rounds = 0


# ----------------------------------------------------------------------------------------- collate
def _resize_cover_crop(frames: torch.Tensor, crop: tuple[int, int]) -> torch.Tensor:
    """uint8 ``(F, H, W, 3)`` -> float ``(F, 3, cropH, cropW)`` in [-1, 1]: resize (bilinear) so the frame
    covers the crop, centre-crop, normalise."""
    crop_h, crop_w = crop
    x = frames.permute(0, 3, 1, 2).float() / 255.0
    height, width = x.shape[-2:]
    if crop_h / height > crop_w / width:
        size = (crop_h, max(int(width * crop_h / height), crop_w))
    else:
        size = (max(int(height * crop_w / width), crop_h), crop_w)
    if size != (height, width):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    top, left = (size[0] - crop_h) // 2, (size[1] - crop_w) // 2
    x = x[:, :, top : top + crop_h, left : left + crop_w]
    return (x.clamp(0, 1) - 0.5) / 0.5


class BucketCollate:
    """Turns a list of dataset samples into one batch of one shape.

    Output keys: ``pixel_values`` float ``(B, F, 3, H, W)`` in [-1, 1], ``text`` (list), ``data_type``,
    ``positions``/``epoch`` (the samples' randomness keys), ``replicas`` (token-length ×1/×2/×4 replication for the
    training loop), ``failures``; in inpaint mode also ``mask`` ``(B, F, 1, H, W)`` (1 = generate),
    ``mask_pixel_values`` (masked pixels set to -1) and ``clip_pixel_values`` uint8 ``(B, H, W, 3)``.

    The batch's shared draws (base size, random crop ratio, clip length) are keyed by its global batch
    (``batch_position``), the rest by sample. So N processes train what one process trains on the same global
    batch, except where a batch depends on its samples' content: clips are cut to the shortest clip of this
    process's share, and under ``training_with_video_token_length`` the sizes offered depend on the share's
    smallest frame.

    Unlike the original, the inpaint mask is drawn on the final (frame-cropped) clip, so head-and-tail masks keep
    their tail frames, and the CLIP frame is one of the frames actually trained on.
    """

    def __init__(self, config: DataConfig, seed: int = 0):
        self.config = config
        self.seed = int(seed)
        self.budget = pixel_budget(config.video_sample_n_frames, config.token_sample_size)
        self.sizes = candidate_sizes(config.video_sample_size, config.image_sample_size)
        self.round_budgets = round_budgets(config.token_sample_size, config.video_sample_n_frames)

    def _base_size_and_frame_cap(self, data_type: str, samples: list[dict], rng: np.random.Generator):
        """The batch's base size (its bucket is scaled to it) and the most frames it may keep: the configured size,
        or with ``random_hw_adapt`` a smaller one drawn from ``rng`` (videos under a token budget: a size below
        1.25x the samples' smallest side, with the frames that fit the budget)."""
        cfg = self.config
        default_cap = cfg.video_sample_n_frames + cfg.frame_interval
        if data_type == "image":
            if not cfg.random_hw_adapt:
                return cfg.image_sample_size, default_cap
            ratios, probs = downsample_choices(cfg.image_sample_size, [cfg.image_sample_size / cfg.video_sample_size])
            return cfg.image_sample_size / ratios[rng.choice(len(ratios), p=probs)], default_cap
        if cfg.random_hw_adapt and cfg.training_with_video_token_length:
            smallest = min((s["pixels"].shape[1] + s["pixels"].shape[2]) / 2 for s in samples)
            choices = [size for size in self.sizes if size < 1.25 * smallest] or self.sizes
            size = choices[int(rng.integers(len(choices)))]
            return size, frames_for_size(size, self.budget, cfg.video_sample_n_frames, cfg.frame_interval)
        if cfg.random_hw_adapt:
            ratios, probs = downsample_choices(cfg.video_sample_size)
            return cfg.video_sample_size / ratios[rng.choice(len(ratios), p=probs)], default_cap
        return cfg.video_sample_size, default_cap

    def __call__(self, samples: list[dict]) -> dict:
        cfg = self.config
        first = samples[0]
        data_type = first["data_type"]
        # keyed by the global batch, not this process's share of it: every process draws the size, crop and clip
        # length one process would draw for the whole global batch
        rng = keyed_rng(self.seed, BATCH, first["epoch"], first["batch_position"])
        base_size, frame_cap = self._base_size_and_frame_cap(data_type, samples, rng)

        height, width = first["pixels"].shape[1:3]
        if not cfg.enable_bucket:
            side = int(base_size / 16) * 16
            crop = (side, side)
        elif cfg.random_ratio_crop:
            weights = np.asarray(RANDOM_CROP_WEIGHTS, dtype=np.float64)
            crop = bucket_crop_size(RANDOM_CROP_RATIOS[rng.choice(len(weights), p=weights / weights.sum())], base_size)
        else:
            crop = bucket_crop_size(closest_ratio(height, width), base_size)

        interval = cfg.frame_interval
        frames = min(frame_cap, min(s["pixels"].shape[0] // interval * interval for s in samples)) or 1
        replicas = 1
        if cfg.training_with_video_token_length:
            replicas = replication_factor(self.budget, frames, *crop)
        if cfg.random_frame_crop and data_type == "video":
            choices, probs = frame_crop_choices(cfg.video_sample_n_frames, interval)
            frames = min(frames, choices[rng.choice(len(choices), p=probs)])
        if cfg.keep_all_node_same_token_length:
            # keyed by the round, not the batch: every process draws the same budget for this step, so no process
            # waits for one that drew a longer clip (images keep their single frame)
            draw = keyed_rng(self.seed, ROUND_BUDGET, first["epoch"], first["round"]).integers(len(self.round_budgets))
            budget = self.round_budgets[int(draw)]
            cap = frames_for_area(crop[0] * crop[1], budget, cfg.video_sample_n_frames, interval)
            frames = min(frames, max(1, cap))

        pixel_values = torch.stack([_resize_cover_crop(s["pixels"][:frames], crop) for s in samples])
        batch = {
            "pixel_values": pixel_values,
            "text": [s["text"] for s in samples],
            "data_type": data_type,
            "epoch": first["epoch"],
            "positions": torch.tensor([s["position"] for s in samples], dtype=torch.long),
            "replicas": replicas,
            "failures": [f for s in samples for f in s["failures"]],
            "reads": len(samples),
        }
        if cfg.enable_inpaint:
            masks, clip_frames = [], []
            for sample, pixels in zip(samples, pixel_values):
                sample_rng = keyed_rng(self.seed, MASK, sample["epoch"], sample["position"])
                masks.append(random_mask(frames, crop[0], crop[1], sample_rng, cfg.video_mask_probs))
                clip_index = 0 if frames == 1 or sample_rng.random() < 0.5 else int(sample_rng.integers(1, frames))
                clip_frames.append(((pixels[clip_index] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0))
            mask = torch.stack(masks).float()
            batch["mask"] = mask
            batch["mask_pixel_values"] = pixel_values * (1 - mask) - mask
            batch["clip_pixel_values"] = torch.stack(clip_frames)
        return batch


def bucket_ratios(config: DataConfig) -> tuple[float, ...]:
    """Ratios the sampler groups by: the 40-bucket table, or a single square bucket without ``enable_bucket``."""
    return tuple(ASPECT_RATIO_512) if config.enable_bucket else (1.0,)
