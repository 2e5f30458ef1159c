"""2D rotary position embedding (RoPE) of the EasyAnimate V4 / HunyuanDiT transformer.

Every resolution is mapped onto a fixed square "base canvas" (512 px -> 32 x 32 patches for patch size 2):
the patch grid is fitted into the canvas keeping its aspect ratio and centred, and patch positions are
fractional coordinates on that canvas. The same per-frame table is used for every frame of a video (time
is encoded additively inside the transformer blocks).

This re-implements the original's formula (numpy ``linspace(endpoint=False)`` positions in float32). It is not
diffusers' ``get_2d_rotary_pos_embed``: since diffusers 0.41 that function computes different positions
whenever the crop region does not start at 0 (every non-square size), which would change every output of the
released model.

Table layout (``head_dim`` = D):

* channels ``0 .. D/2-1`` encode the **column** position, channels ``D/2 .. D-1`` the **row** position;
* within each half there are ``D/4`` frequencies ``theta^(-2k/(D/2))``, each angle repeated twice
  (interleaved pairs), matching the pairwise rotation ``(a, b) -> (a cos - b sin, b cos + a sin)``
  of ``diffusers.models.embeddings.apply_rotary_emb(use_real=True, use_real_unbind_dim=-1)``;
* rows are the patches of one frame in row-major order (``row * grid_w + col``).
"""

from __future__ import annotations

import torch

CropRegion = tuple[tuple[int, int], tuple[int, int]]

ROPE_THETA = 10000.0


def resize_crop_region_for_grid(grid_hw: tuple[int, int], base: int) -> CropRegion:
    """Fit a ``(grid_h, grid_w)`` patch grid into a ``base x base`` square keeping its aspect ratio, centred.

    Returns ``((top, left), (bottom, right))`` in base-canvas units. The longer side spans the whole canvas;
    the shorter side and the centring offset use Python's ``round`` (half to even), as the original does,
    e.g. a 24 x 42 grid (384 x 672 px) on a 32 canvas gives ``((7, 0), (25, 32))``.
    """
    grid_h, grid_w = (int(v) for v in grid_hw)
    if grid_h <= 0 or grid_w <= 0 or base <= 0:
        raise ValueError(f"grid {grid_hw} and base {base} must be positive")
    if grid_h > grid_w:
        rows, cols = base, int(round(base / grid_h * grid_w))
    else:
        rows, cols = int(round(base / grid_w * grid_h)), base
    top = int(round((base - rows) / 2.0))
    left = int(round((base - cols) / 2.0))
    return (top, left), (top + rows, left + cols)


def _linspace_no_endpoint(start: float, stop: float, num: int) -> torch.Tensor:
    """``numpy.linspace(start, stop, num, endpoint=False, dtype=float32)``: computed in float64, then rounded.

    (diffusers >= 0.41 uses ``stop * (n - 1) / n`` as the last point, which is wrong unless ``start == 0``.)
    """
    step = (stop - start) / num
    return (torch.arange(num, dtype=torch.float64) * step + start).to(torch.float32)


def _rope_1d(dim: int, positions: torch.Tensor, theta: float = ROPE_THETA) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of ``positions x freqs`` for one axis, each angle repeated twice (interleaved): ``(n, dim)``."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32)[: dim // 2] / dim))
    angles = torch.outer(positions.to(torch.float32), freqs)
    return angles.cos().repeat_interleave(2, dim=1), angles.sin().repeat_interleave(2, dim=1)


def rope_2d_table(head_dim: int, crop_region: CropRegion, grid_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-frame 2D RoPE table: ``(cos, sin)``, each ``(grid_h * grid_w, head_dim)`` float32 on the CPU."""
    if head_dim % 4 != 0:
        raise ValueError(f"2D RoPE needs head_dim divisible by 4 (two axes of cos/sin pairs); got {head_dim}")
    (top, left), (bottom, right) = crop_region
    grid_h, grid_w = (int(v) for v in grid_hw)
    rows = _linspace_no_endpoint(top, bottom, grid_h)
    cols = _linspace_no_endpoint(left, right, grid_w)
    # Token t = r * grid_w + c. First half of the channels: column position, second half: row position.
    col_pos = cols.repeat(grid_h)
    row_pos = rows.repeat_interleave(grid_w)
    cos_c, sin_c = _rope_1d(head_dim // 2, col_pos)
    cos_r, sin_r = _rope_1d(head_dim // 2, row_pos)
    return torch.cat([cos_c, cos_r], dim=1), torch.cat([sin_c, sin_r], dim=1)


def rope_for_latent_grid(
    grid_h: int, grid_w: int, head_dim: int, base_grid: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE table for a patch grid, fitted into the ``base_grid`` canvas (32 = 512 px / 8 / patch 2)."""
    region = resize_crop_region_for_grid((grid_h, grid_w), base_grid)
    return rope_2d_table(head_dim, region, (grid_h, grid_w))


def rope_for_size(
    height_px: int,
    width_px: int,
    head_dim: int,
    patch_size: int = 2,
    vae_scale: int = 8,
    base_size_px: int = 512,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE table for a video of ``height_px x width_px`` pixels, as the V4 pipeline computes it.

    Returns ``(cos, sin)`` float32, each ``(grid_h * grid_w, head_dim)`` with ``grid = px / vae_scale / patch``,
    for one frame (the transformer tiles it over frames).
    """
    unit = vae_scale * patch_size
    if height_px % unit or width_px % unit:
        raise ValueError(
            f"height and width must be multiples of {unit} (VAE scale {vae_scale} x patch {patch_size}); "
            f"got {height_px}x{width_px}. Round them down to a multiple of {unit}."
        )
    return rope_for_latent_grid(height_px // unit, width_px // unit, head_dim, base_size_px // unit)
