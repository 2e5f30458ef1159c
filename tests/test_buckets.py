"""Bucket tables and token-length arithmetic against the original's values, the bucket batch sampler."""

import pytest
import torch

from easyanimate.data.buckets import (
    ASPECT_RATIO_512, RANDOM_CROP_RATIOS, RANDOM_CROP_WEIGHTS, BucketBatchSampler, BucketCollate, bucket_crop_size,
    candidate_sizes, closest_ratio, downsample_choices, frame_crop_choices, frames_for_size, latent_tokens,
    pixel_budget, replication_factor, round_budgets,
)
from easyanimate.data.dataset import DataConfig, SampleRef


def test_aspect_ratio_table():
    assert len(ASPECT_RATIO_512) == 40
    assert ASPECT_RATIO_512[1.0] == (512, 512) and ASPECT_RATIO_512[0.57] == (384, 672)
    assert ASPECT_RATIO_512[4.0] == (1024, 256) and ASPECT_RATIO_512[0.25] == (256, 1024)
    for ratio, (h, w) in ASPECT_RATIO_512.items():
        assert h % 32 == 0 and w % 32 == 0
        assert abs(h / w - ratio) < 0.03
    assert set(RANDOM_CROP_RATIOS) <= set(ASPECT_RATIO_512) and sum(RANDOM_CROP_WEIGHTS) == 62


def test_closest_bucket_and_crop_size():
    assert closest_ratio(384, 672) == 0.57
    assert closest_ratio(1080, 1920) == 0.57
    assert closest_ratio(1920, 1080) == 1.75
    assert closest_ratio(100, 100) == 1.0
    assert closest_ratio(10, 1000) == 0.25 and closest_ratio(1000, 10) == 4.0
    assert bucket_crop_size(1.0, 512) == (512, 512)
    assert bucket_crop_size(0.57, 256) == (192, 336)
    # 384*768/512 = 576, 672*1.5 = 1008
    assert bucket_crop_size(0.57, 768) == (576, 1008)
    # flooring to 16: 288 * 200/512 = 112.5 -> 112, 896 * 200/512 = 350 -> 336
    assert bucket_crop_size(0.32, 200) == (112, 336)


@pytest.mark.parametrize(
    "token_size,budget,tokens", [(256, 9_437_184, 9_216), (512, 37_748_736, 36_864), (768, 84_934_656, 82_944),
                                 (1024, 150_994_944, 147_456)],
)
def test_token_budget_table(token_size, budget, tokens):
    assert pixel_budget(144, token_size) == budget
    assert budget // 1024 == tokens
    assert latent_tokens(144, token_size, token_size) == tokens


def test_frames_per_size_worked_example():
    budget = pixel_budget(144, 256)
    sizes = candidate_sizes(256, 1024)
    assert sizes == [256, 384, 512, 640, 768, 896, 1024]
    assert [frames_for_size(s, budget, 144, 8) for s in sizes] == [144, 64, 32, 16, 16, 8, 8]
    assert candidate_sizes(512, 512) == [512]
    assert candidate_sizes(512, 700) == [512, 640, 700]


def test_replication_and_random_choices():
    budget = pixel_budget(144, 256)
    assert replication_factor(budget, 1, 256, 256) == 4        # an image: 1/144 of the budget
    assert replication_factor(budget, 32, 256, 256) == 2       # 32/144 <= 1/4
    assert replication_factor(budget, 144, 256, 256) == 1
    assert downsample_choices(512) == ([1], [1.0])
    ratios, probs = downsample_choices(1024, [2.0])
    assert ratios == [1, 1.25, 1.5, 2, 2.0] and probs[0] == 0.75 and abs(sum(probs) - 1) < 1e-12
    choices, probs = frame_crop_choices(144, 8)
    assert choices == list(range(8, 145, 8)) and probs[-1] == 0.9 and abs(sum(probs) - 1) < 1e-12


def _entries(shapes):
    return [{"file_path": f"f{i}", "text": str(i), "type": t, "height": h, "width": w}
            for i, (t, h, w) in enumerate(shapes)]


def test_sampler_groups_by_type_and_bucket():
    shapes = [("image", 512, 512), ("video", 512, 512), ("video", 384, 672), ("image", 384, 672)] * 12
    entries = _entries(shapes)
    sampler = BucketBatchSampler(entries, 4, seed=3)
    batches = list(sampler)
    assert len(batches) == len(entries) // 4 == len(sampler)
    for batch in batches:
        kinds = {(entries[r.index]["type"], entries[r.index]["height"]) for r in batch}
        assert len(kinds) == 1
    positions = [r.position for b in batches for r in b]
    assert positions == list(range(len(positions)))
    # a new epoch is a different order, the same epoch the same
    sampler.set_epoch(1)
    again = list(sampler)
    assert [r.index for b in again for r in b] != [r.index for b in batches for r in b]
    sampler.set_epoch(1)
    assert [r.index for b in list(sampler) for r in b] == [r.index for b in again for r in b]


def test_sampler_skips_unreadable_entries_and_resumes_and_shards():
    entries = _entries([("video", 64, 64)] * 21)
    entries[5].pop("height")
    entries[5]["file_path"] = "/nonexistent/broken.mp4"
    sampler = BucketBatchSampler(entries, 2, seed=0)
    batches = list(sampler)
    assert len(batches) == 10 and all(r.index != 5 for b in batches for r in b)
    assert [p for p, _ in sampler.failures] == ["/nonexistent/broken.mp4"]
    sampler.set_epoch(0, skip_rounds=4)
    assert list(sampler) == batches[4:]
    # two ranks with batch 1 deal the batches of one process with batch 2 in rounds
    one = [r for b in BucketBatchSampler(entries, 2, seed=0) for r in b]
    ranks = [list(BucketBatchSampler(entries, 1, seed=0, rank=k, world_size=2)) for k in range(2)]
    interleaved = [r for pair in zip(*ranks) for b in pair for r in b]
    assert interleaved == one
    # a round is one training step of every process
    assert [r.round for r in one] == [r.position // 2 for r in one] and one[-1].round > 0


def test_processes_share_global_batches_of_one_bucket():
    """Mixed images and videos of two ratios: two ranks at batch 2 get, round by round, the halves of the batches
    one process at batch 4 gets (same entries, positions, rounds and batch keys), with a resumed epoch too."""
    shapes = [("image", 512, 512), ("video", 512, 512), ("video", 384, 672), ("image", 384, 672)] * 10
    entries = _entries(shapes)
    one = list(BucketBatchSampler(entries, 4, seed=5))
    ranks = [list(BucketBatchSampler(entries, 2, seed=5, rank=k, world_size=2)) for k in range(2)]
    assert len(one) == len(ranks[0]) == len(ranks[1]) >= 8
    assert [a + b for a, b in zip(*ranks)] == one
    for batch in one:
        assert len({(entries[r.index]["type"], entries[r.index]["height"]) for r in batch}) == 1
        assert {r.batch_position for r in batch} == {batch[0].position}
    resumed = BucketBatchSampler(entries, 2, seed=5, rank=1, world_size=2)
    resumed.set_epoch(0, skip_rounds=3)
    assert list(resumed) == ranks[1][3:]


def test_collate_draws_the_same_for_every_share_of_a_global_batch():
    """With every per-batch random choice on (downsampled sizes, random crop ratios, random clip lengths) and
    inpaint masks, each rank's collated share of a global batch is its slice of the one-process batch."""
    cfg = DataConfig(image_sample_size=64, video_sample_size=32, token_sample_size=32, video_sample_n_frames=16,
                     random_hw_adapt=True, random_ratio_crop=True, random_frame_crop=True, enable_inpaint=True)
    collate = BucketCollate(cfg, seed=0)
    generator = torch.Generator().manual_seed(0)
    clips = {i: torch.randint(0, 256, (16, 72, 128, 3), generator=generator, dtype=torch.uint8) for i in range(4)}
    clips.update({i + 4: clips[i][:1] for i in range(4)})  # images
    for round, (kind, first) in enumerate([("video", 0), ("image", 4)] * 3):
        refs = [SampleRef(first + k, 0, 4 * round + k, round, 4 * round) for k in range(4)]
        samples = [_sample(clips[r.index], r.position, kind, r.round, r.batch_position) for r in refs]
        whole = collate(samples)
        shares = [collate(samples[:2]), collate(samples[2:])]
        for key in ("pixel_values", "mask", "mask_pixel_values", "clip_pixel_values", "positions"):
            assert torch.equal(torch.cat([share[key] for share in shares]), whole[key]), (round, key)


def _sample(pixels, position=0, kind="video", round=0, batch_position=None):
    return {"pixels": pixels, "text": "t", "data_type": kind, "index": 0, "epoch": 0, "position": position,
            "round": round, "batch_position": position if batch_position is None else batch_position,
            "failures": []}


def test_collate_one_shape_per_batch():
    cfg = DataConfig(image_sample_size=64, video_sample_size=64, token_sample_size=64, video_sample_n_frames=16,
                     enable_inpaint=True)
    collate = BucketCollate(cfg, seed=0)
    a = torch.randint(0, 256, (16, 72, 128, 3), dtype=torch.uint8)
    b = torch.randint(0, 256, (13, 80, 120, 3), dtype=torch.uint8)
    batch = collate([_sample(a, 0), _sample(b, 1)])
    # ratio 72/128 = 0.5625 -> bucket 0.57 (384x672) at 64: 48x84 -> 48x80
    assert batch["pixel_values"].shape == (2, 8, 3, 48, 80)
    assert batch["mask"].shape == (2, 8, 1, 48, 80) and batch["clip_pixel_values"].shape == (2, 48, 80, 3)
    pv = batch["pixel_values"]
    assert pv.min() >= -1 and pv.max() <= 1
    m = batch["mask"]
    assert torch.equal(batch["mask_pixel_values"], pv * (1 - m) - m)
    image = collate([_sample(torch.full((1, 64, 64, 3), 255, dtype=torch.uint8), 0, "image")])
    assert image["pixel_values"].shape == (1, 1, 3, 64, 64) and torch.allclose(image["pixel_values"], torch.ones(1))


def test_collate_token_length_mode():
    cfg = DataConfig(image_sample_size=64, video_sample_size=32, token_sample_size=32, video_sample_n_frames=16,
                     random_hw_adapt=True, training_with_video_token_length=True)
    collate = BucketCollate(cfg, seed=0)
    seen = set()
    for position in range(40):
        batch = collate([_sample(torch.zeros(16, 64, 64, 3, dtype=torch.uint8), position)])
        f, _, h, w = batch["pixel_values"].shape[1:]
        seen.add((f, h, w))
        # the budget 16*32*32 = 16384 pixels: 32 px -> 16 frames, 64 px -> 4 -> floored to 0 -> 1 frame
        assert (f, h, w) in {(16, 32, 32), (1, 64, 64)}
        assert batch["replicas"] == (2 if f == 1 else 1)  # 4096 px <= budget // 4
    assert len(seen) == 2


def test_round_budgets():
    n = 144
    assert round_budgets(512, n) == [256**2 * n, 384**2 * n, 512**2 * n]
    assert round_budgets(600, n) == [256**2 * n, 384**2 * n, 512**2 * n, 600**2 * n]  # the last size appended
    assert round_budgets(256, n) == round_budgets(64, n) == [256**2 * n]


def test_collate_keeps_one_budget_per_round():
    """``--keep_all_node_same_token_length``: the batches of one round (one per process, different positions)
    get the same frame cap, drawn from the round budgets: at 512x512 and 16 frames, 256^2 x 16 -> 4 frames,
    floored to the VAE chunk of 8 -> 0 -> 1 frame; 384^2 x 16 -> 9 -> 8; 512^2 x 16 -> 16."""
    clip = torch.zeros(16, 512, 512, 3, dtype=torch.uint8)
    options = dict(image_sample_size=512, video_sample_size=512, token_sample_size=512, video_sample_n_frames=16)
    plain = BucketCollate(DataConfig(**options), seed=0)
    kept = BucketCollate(DataConfig(**options, keep_all_node_same_token_length=True), seed=0)
    frames_per_round = []
    for round in range(12):
        frames = {kept([_sample(clip, 2 * round + rank, round=round)])["pixel_values"].shape[1] for rank in range(2)}
        assert len(frames) == 1, f"round {round}: the two processes train {frames} frames"
        frames_per_round.append(frames.pop())
        assert plain([_sample(clip, 2 * round, round=round)])["pixel_values"].shape[1] == 16
    assert set(frames_per_round) == {1, 8, 16}
    image = kept([_sample(torch.zeros(1, 512, 512, 3, dtype=torch.uint8), 0, "image", round=0)])
    assert image["pixel_values"].shape[1] == 1
