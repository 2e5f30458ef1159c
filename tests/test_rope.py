"""2D RoPE of the V4 transformer: golden tables, crop regions, and the original (numpy) formula."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from easyanimate.models.rope import resize_crop_region_for_grid, rope_2d_table, rope_for_size

GOLDEN_CASES = [
    ("transformer_t2v", "case_video_f3_8x8"),
    ("transformer_t2v", "case_image_f1_8x12"),
    ("transformer_inpaint", "case_video_f3_8x8"),
    ("transformer_inpaint", "case_image_f1_8x12"),
]


@pytest.mark.parametrize("variant,case", GOLDEN_CASES)
def test_golden_rope_tables_reproduced(golden_dir, variant, case):
    path = golden_dir / variant / f"{case}.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["case"])
    tensors = load_file(str(path))
    head_dim = tensors["input.image_rotary_emb_cos"].shape[1]
    grid = (meta["pixel_height"] // 16, meta["pixel_width"] // 16)

    region = resize_crop_region_for_grid(grid, meta["rotary_base_size"])
    assert [list(corner) for corner in region] == meta["rotary_crop_region"]

    cos, sin = rope_for_size(meta["pixel_height"], meta["pixel_width"], head_dim)
    assert cos.dtype == sin.dtype == torch.float32
    torch.testing.assert_close(cos, tensors["input.image_rotary_emb_cos"], rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, tensors["input.image_rotary_emb_sin"], rtol=0, atol=1e-6)
    torch.testing.assert_close(rope_2d_table(head_dim, region, grid)[0], cos, rtol=0, atol=0)


@pytest.mark.parametrize(
    "size,region",
    [
        ((384, 672), ((7, 0), (25, 32))),
        ((672, 384), ((0, 7), (32, 25))),
        ((512, 512), ((0, 0), (32, 32))),
        ((1024, 1024), ((0, 0), (32, 32))),
        ((256, 256), ((0, 0), (32, 32))),
        ((576, 1008), ((7, 0), (25, 32))),
        ((768, 1344), ((7, 0), (25, 32))),
        ((960, 1680), ((7, 0), (25, 32))),
        ((512, 896), ((7, 0), (25, 32))),
    ],
)
def test_crop_regions_of_the_spec(size, region):
    """Crop regions the original computes (with banker's rounding) for the V4 sizes."""
    assert resize_crop_region_for_grid((size[0] // 16, size[1] // 16), 32) == region


def test_crop_region_uses_bankers_rounding():
    # 5 x 64 grid: rows = round(32 / 64 * 5) = round(2.5) = 2 (half to even, not 3), offset 15.
    assert resize_crop_region_for_grid((5, 64), 32) == ((15, 0), (17, 32))
    # 7 x 64 grid: rows = round(3.5) = 4, offset 14.
    assert resize_crop_region_for_grid((7, 64), 32) == ((14, 0), (18, 32))


def _original_numpy_rope(head_dim, crop_region, grid_hw):
    """Independent re-statement of the original formula (numpy linspace + meshgrid(w, h) + interleaved pairs)."""
    (top, left), (bottom, right) = crop_region
    grid_h = np.linspace(top, bottom, grid_hw[0], endpoint=False, dtype=np.float32)
    grid_w = np.linspace(left, right, grid_hw[1], endpoint=False, dtype=np.float32)
    mesh = np.stack(np.meshgrid(grid_w, grid_h), axis=0)  # [2, H, W]; mesh[0] = column positions

    def axis(dim, pos):
        freqs = 1.0 / (10000.0 ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
        angles = torch.outer(torch.from_numpy(pos.reshape(-1)), freqs)
        return angles.cos().repeat_interleave(2, 1), angles.sin().repeat_interleave(2, 1)

    cos_w, sin_w = axis(head_dim // 2, mesh[0])
    cos_h, sin_h = axis(head_dim // 2, mesh[1])
    return torch.cat([cos_w, cos_h], 1), torch.cat([sin_w, sin_h], 1)


@pytest.mark.parametrize("size", [(384, 672), (672, 384), (512, 896), (256, 256)])
def test_release_size_tables_match_the_original_formula(size):
    grid = (size[0] // 16, size[1] // 16)
    cos, sin = rope_for_size(*size, head_dim=88)
    ref_cos, ref_sin = _original_numpy_rope(88, resize_crop_region_for_grid(grid, 32), grid)
    assert cos.shape == (grid[0] * grid[1], 88)
    torch.testing.assert_close(cos, ref_cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, ref_sin, rtol=0, atol=1e-6)


def test_positions_are_fractional_on_the_base_canvas():
    """384x672: rows span 7..25 in 24 steps of 0.75, so the last row is at 24.25 (diffusers>=0.41 gives 23.96)."""
    cos, sin = rope_for_size(384, 672, head_dim=88)
    # Channel 44 is the row axis at frequency 1: angle = row position. Last token = last row, last column.
    angle = torch.atan2(sin[-1, 44], cos[-1, 44])
    expected = torch.tensor(24.25) - 8 * torch.pi  # wrapped into (-pi, pi]
    torch.testing.assert_close(angle, expected, rtol=0, atol=1e-4)


def test_bad_sizes_raise_clear_errors():
    with pytest.raises(ValueError, match="multiples of 16"):
        rope_for_size(384, 670, head_dim=88)
    with pytest.raises(ValueError, match="divisible by 4"):
        rope_2d_table(90, ((0, 0), (32, 32)), (4, 4))
