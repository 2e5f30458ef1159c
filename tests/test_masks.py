import numpy as np
import pytest
import torch

from easyanimate.data.masks import (
    FULL, IMAGE_MASK_PROBS, KEEP_HEAD, KEEP_HEAD_AND_TAIL, RANDOM_BOX, SPATIOTEMPORAL_BOX, VIDEO_MASK_PROBS,
    make_mask, random_mask,
)


def test_each_mask_type_has_its_shape():
    rng = np.random.default_rng(0)
    for _ in range(50):
        box = make_mask(RANDOM_BOX, 16, 32, 48, rng)
        assert box.shape == (16, 1, 32, 48) and box.dtype == torch.uint8
        assert torch.equal(box, box[:1].expand_as(box)), "random box must be the same on every frame"
        rows, cols = box[0, 0].any(1).sum().item(), box[0, 0].any(0).sum().item()
        assert 1 <= rows <= 3 * 32 // 4 and 1 <= cols <= 3 * 48 // 4
        assert torch.equal(make_mask(FULL, 16, 32, 48, rng), torch.ones(16, 1, 32, 48, dtype=torch.uint8))

        head = make_mask(KEEP_HEAD, 16, 8, 8, rng)
        kept = int((head.flatten(1).amax(1) == 0).sum())
        assert 1 <= kept <= 4 and head[:kept].sum() == 0 and head[kept:].all()

        both = make_mask(KEEP_HEAD_AND_TAIL, 16, 8, 8, rng)
        per_frame = both.flatten(1).amax(1)
        k = int(per_frame.tolist().index(1))
        assert 1 <= k <= 4 and per_frame[:k].sum() == 0 and per_frame[-k:].sum() == 0 and per_frame[k:-k].all()

        st = make_mask(SPATIOTEMPORAL_BOX, 16, 32, 32, rng)
        active = st.flatten(1).amax(1).nonzero().flatten()
        if len(active):
            assert active[0] <= 7 and active[-1] <= 14 and len(active) == active[-1] - active[0] + 1


def test_mask_type_frequencies_match_v4():
    def kind(mask):
        f = mask.shape[0]
        per_frame = mask.flatten(1).amax(1)
        if mask.all():
            return FULL
        if f == 1 or torch.equal(mask, mask[:1].expand_as(mask)) and mask.sum() > 0 and per_frame.all():
            return RANDOM_BOX
        frame_full = mask.flatten(1).amin(1) == 1
        if per_frame.sum() > 0 and torch.equal(per_frame, frame_full.to(per_frame.dtype)):
            return KEEP_HEAD if per_frame[-1] == 1 else KEEP_HEAD_AND_TAIL
        return SPATIOTEMPORAL_BOX

    rng = np.random.default_rng(1)
    n = 2000
    counts = np.bincount([kind(random_mask(16, 8, 8, rng)) for _ in range(n)], minlength=5) / n
    assert np.allclose(counts, VIDEO_MASK_PROBS, atol=0.035), counts
    image_counts = np.bincount([kind(random_mask(1, 8, 8, rng)) for _ in range(n)], minlength=5) / n
    assert np.allclose(image_counts[:2], IMAGE_MASK_PROBS, atol=0.035), image_counts


def test_unknown_mask_type_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown mask type"):
        make_mask(7, 4, 8, 8, np.random.default_rng(0))


def test_video_mask_probabilities_are_configurable_and_checked():
    from easyanimate.data.masks import check_mask_probs
    from easyanimate.training.config import parse_args

    rng = np.random.default_rng(1)
    only_full = (0.0, 1.0, 0.0, 0.0, 0.0)
    assert all(bool(random_mask(16, 8, 8, rng, only_full).all()) for _ in range(50))
    cfg = parse_args(["--pretrained_model_name_or_path", "m", "--train_data_meta", "d",
                      "--video_mask_probs", "0.1", "0.6", "0.2", "0.05", "0.05"])
    assert cfg.data_config().video_mask_probs == (0.1, 0.6, 0.2, 0.05, 0.05)
    with pytest.raises(ValueError, match="summing to 1"):
        check_mask_probs((0.5, 0.5, 0.5, 0.0, 0.0))
    with pytest.raises(ValueError, match="5 non-negative"):
        check_mask_probs((0.5, 0.5))
