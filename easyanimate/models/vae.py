"""The EasyAnimate V4 video VAE: the "slice VAE" with a causal feature cache in the decoder.

Tensors are ``(B, C, T, H, W)``; pixels are in [-1, 1]. Space is compressed 8x (three stride-2 convs) and time
4x (two stride-2 convs in the encoder, two x2 interpolations in the decoder). The released checkpoint runs in the
``cache_compression_vae`` mode:

* Encoder: frame 0 alone when F is odd, then independent chunks of ``mini_batch_encoder`` (8) frames. Every
  temporal conv pads one zero frame on each side, so a chunk sees nothing outside itself (and is not causal within).
* Decoder: one latent decodes as an image (1 frame). Otherwise chunks of ``mini_batch_decoder`` (2) latents run
  through the whole decoder in order; each temporal conv replicate-pads frame 0 twice in the first chunk and
  prepends the last two *input* frames it saw in the previous chunk after that. GroupNorm statistics, the mid-block
  attention and the temporal interpolation stay chunk-local: only the convs are stitched causally.

The cache is explicit data (:class:`CausalCache`) created for each decode call and handed to every conv, as in
Wan2.1's ``feat_cache``; no module keeps state between calls. The older V3 ``slice_compression_vae`` mode is also
implemented (its decoder gives each chunk's first stage one neighbouring chunk of context on each side). The V2
``slice_mag_vae`` and "full" modes are not part of V4 and are refused.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.activations import get_activation
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from diffusers.utils.accelerate_utils import apply_forward_hook
from torch import nn

from ..utils.weights import load_model_from_folder, read_model_config

logger = logging.getLogger(__name__)

V4_DOWN_BLOCKS = ("SpatialDownBlock3D", "SpatialTemporalDownBlock3D", "SpatialTemporalDownBlock3D",
                  "SpatialTemporalDownBlock3D")
V4_UP_BLOCKS = ("SpatialUpBlock3D", "SpatialTemporalUpBlock3D", "SpatialTemporalUpBlock3D", "SpatialTemporalUpBlock3D")
DOWN_BLOCK_TEMPORAL = {"SpatialDownBlock3D": False, "SpatialTemporalDownBlock3D": True}
UP_BLOCK_TEMPORAL = {"SpatialUpBlock3D": False, "SpatialTemporalUpBlock3D": True}

# The original class's defaults where they differ from ours (ours are the reconstructed released V4 values).
# A config.json that lacks one of these keys makes the original use these values, so from_pretrained does too.
ORIGINAL_CLASS_DEFAULTS = {
    "scaling_factor": 0.1825,
    "slice_mag_vae": True,
    "cache_compression_vae": False,
    "mini_batch_encoder": 9,
    "mini_batch_decoder": 3,
}


# ----------------------------------------------------------------------------------------------------------------
# Per-call state
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class CausalCache:
    """The causal-conv state of one decoder chunk.

    ``previous`` maps each :class:`CausalConv3d` to the last two input frames it received in the previous chunk
    (empty for the first chunk); the convs fill ``current`` with the same for this chunk. ``next()`` starts the
    following chunk. A fresh object per chunk (rather than one mutated object) keeps a chunk's inputs fixed, so
    gradient checkpointing can recompute a chunk later and see exactly what it saw the first time. Without
    autograd (inference) each conv pops its entry from ``previous`` as it uses it, so at most about one set of
    cached frames is alive at any time.
    """

    previous: dict = field(default_factory=dict)
    current: dict = field(default_factory=dict)

    def next(self) -> "CausalCache":
        return CausalCache(previous=self.current)


class DiagonalGaussian(DiagonalGaussianDistribution):
    """The encoder posterior: diffusers' diagonal Gaussian (logvar clamped to [-30, 20]; ``sample(generator)``,
    ``mode()``), with ``kl()`` and ``nll()`` summed over every non-batch dimension as the VAE training loss
    expects (diffusers sums only dims 1-3, which for video would leave the width axis unsummed)."""

    def kl(self, other: "DiagonalGaussian | None" = None) -> torch.Tensor:
        dims = list(range(1, self.mean.ndim))
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=dims)
        return 0.5 * torch.sum(
            (self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar,
            dim=dims,
        )

    def nll(self, sample: torch.Tensor, dims=None) -> torch.Tensor:
        dims = list(range(1, self.mean.ndim)) if dims is None else dims
        return 0.5 * torch.sum(math.log(2.0 * math.pi) + self.logvar + (sample - self.mean).pow(2) / self.var, dim=dims)


@dataclass
class AutoencoderOutput(BaseOutput):
    """``forward``'s result: the reconstruction and the posterior it was decoded from."""

    sample: torch.Tensor
    latent_dist: DiagonalGaussian


# ----------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------


class CausalConv3d(nn.Conv3d):
    """A 3x3x3 convolution whose temporal padding is decided per call.

    Without a cache it pads one zero frame on each side: chunk-local and non-causal (encoder, images, V3 slices).
    With a :class:`CausalCache` it is causal: it prepends the two input frames it kept from the previous chunk
    (for the first chunk, two copies of frame 0) and keeps its last two input frames for the next chunk. Kept are
    the conv's *inputs*, so chunked decoding equals one causal pass over the whole sequence for each conv.
    """

    def __init__(self, in_channels: int, out_channels: int, stride=1, spatial_padding: int = 1):
        super().__init__(in_channels, out_channels, kernel_size=3, stride=stride, padding=0)
        self.spatial_padding = spatial_padding

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        p = self.spatial_padding
        if cache is None:
            return F.conv3d(x, self.weight, self.bias, self.stride, (1, p, p))
        if torch.is_grad_enabled():
            previous = cache.previous.get(self)  # kept: gradient checkpointing may recompute this chunk
        else:
            previous = cache.previous.pop(self, None)  # inference: free it as soon as it is used
        if previous is None:
            previous = x[:, :, :1].expand(-1, -1, 2, -1, -1)
        x = torch.cat([previous, x], dim=2)
        # clone: a view would keep the whole padded chunk alive until the next chunk.
        cache.current[self] = x[:, :, -2:].clone()
        return F.conv3d(x, self.weight, self.bias, self.stride, (0, p, p))


class GroupNorm3D(nn.GroupNorm):
    """GroupNorm (eps 1e-6) of a ``(B, C, T, H, W)`` chunk. Statistics span the chunk's frames, or each frame
    alone when ``per_frame`` (the config's ``spatial_group_norm``)."""

    def __init__(self, num_groups: int, num_channels: int, per_frame: bool):
        super().__init__(num_groups, num_channels, eps=1e-6)
        self.per_frame = per_frame

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.per_frame:
            return super().forward(x)
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        return super().forward(frames).reshape(b, t, c, h, w).transpose(1, 2)


class ResidualBlock3D(nn.Module):
    """``conv2(act(norm2(conv1(act(norm1(x)))))) + shortcut(x)``; the shortcut is a 1x1x1 conv when the width
    changes (plain, not causal: it has no temporal extent)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, per_frame_norm: bool, act_fn: str):
        super().__init__()
        self.norm1 = GroupNorm3D(groups, in_channels, per_frame_norm)
        self.conv1 = CausalConv3d(in_channels, out_channels)
        self.norm2 = GroupNorm3D(groups, out_channels, per_frame_norm)
        self.conv2 = CausalConv3d(out_channels, out_channels)
        self.act = get_activation(act_fn)
        self.shortcut = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)), cache)
        h = self.conv2(self.act(self.norm2(h)), cache)
        return h + self.shortcut(x)


class Attention3D(nn.Module):
    """Self-attention over all T*H*W positions of a chunk (single head of the full width in the release).
    The GroupNorm always spans the whole chunk, even with ``spatial_group_norm``."""

    def __init__(self, channels: int, num_heads: int, groups: int):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"mid_block_num_attention_heads={num_heads} must divide the width {channels}")
        self.num_heads = num_heads
        self.group_norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, T*H*W, C)

        def heads(proj: nn.Linear) -> torch.Tensor:
            return proj(tokens).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.to_q), heads(self.to_k), heads(self.to_v))
        out = self.to_out(out.transpose(1, 2).flatten(2))
        return x + out.transpose(1, 2).reshape(b, c, t, h, w)


class MidBlock3D(nn.Module):
    """Residual block, attention, residual block (at the narrowest resolution)."""

    def __init__(self, channels: int, groups: int, per_frame_norm: bool, act_fn: str, use_attention: bool,
                 num_heads: int):
        super().__init__()
        self.convs = nn.ModuleList(
            [ResidualBlock3D(channels, channels, groups, per_frame_norm, act_fn) for _ in range(2)]
        )
        self.attentions = nn.ModuleList([Attention3D(channels, num_heads, groups)] if use_attention else [])

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        x = self.convs[0](x, cache)
        for attention in self.attentions:
            x = attention(x)
        return self.convs[1](x, cache)


class Downsampler3D(nn.Module):
    """Zero-pad one row and column at the bottom/right, then a stride-2 conv (stride 2 in time too when
    ``temporal``) with no spatial padding."""

    def __init__(self, channels: int, temporal: bool):
        super().__init__()
        self.conv = CausalConv3d(channels, channels, stride=(2 if temporal else 1, 2, 2), spatial_padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsampler3D(nn.Module):
    """Nearest x2 in space, a conv, then (when ``temporal`` and not decoding an image) x2 in time over the chunk's
    frames: trilinear (align_corners=False, so edge frames are clamped), or nearest with ``spatial_group_norm``."""

    def __init__(self, channels: int, temporal: bool, temporal_mode: str):
        super().__init__()
        self.conv = CausalConv3d(channels, channels)
        self.temporal = temporal
        self.temporal_mode = temporal_mode

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None, image: bool = False) -> torch.Tensor:
        x = self.conv(F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest"), cache)
        if self.temporal and not image:
            x = F.interpolate(x, scale_factor=(2, 1, 1), mode=self.temporal_mode)
        return x


class DownBlock3D(nn.Module):
    """Residual blocks, then an optional downsampler (``SpatialDownBlock3D`` / ``SpatialTemporalDownBlock3D``)."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, downsample: bool, temporal: bool,
                 groups: int, per_frame_norm: bool, act_fn: str):
        super().__init__()
        self.convs = nn.ModuleList([
            ResidualBlock3D(in_channels if i == 0 else out_channels, out_channels, groups, per_frame_norm, act_fn)
            for i in range(num_layers)
        ])
        self.downsampler = Downsampler3D(out_channels, temporal) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = conv(x)
        return self.downsampler(x) if self.downsampler is not None else x


class UpBlock3D(nn.Module):
    """Residual blocks, then an optional upsampler (``SpatialUpBlock3D`` / ``SpatialTemporalUpBlock3D``)."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, upsample: bool, temporal: bool,
                 temporal_mode: str, groups: int, per_frame_norm: bool, act_fn: str):
        super().__init__()
        self.convs = nn.ModuleList([
            ResidualBlock3D(in_channels if i == 0 else out_channels, out_channels, groups, per_frame_norm, act_fn)
            for i in range(num_layers)
        ])
        self.upsampler = Upsampler3D(out_channels, temporal, temporal_mode) if upsample else None

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None, image: bool = False) -> torch.Tensor:
        for conv in self.convs:
            x = conv(x, cache)
        return self.upsampler(x, cache, image) if self.upsampler is not None else x


class Encoder(nn.Module):
    """Pixels of one chunk -> ``2 * latent_channels`` moments (before ``quant_conv``)."""

    def __init__(self, in_channels, latent_channels, widths, down_block_types, layers_per_block, groups,
                 per_frame_norm, act_fn, mid_attention, mid_heads):
        super().__init__()
        self.conv_in = CausalConv3d(in_channels, widths[0])
        self.down_blocks = nn.ModuleList([
            DownBlock3D(widths[max(i - 1, 0)], widths[i], layers_per_block, downsample=i < len(widths) - 1,
                        temporal=DOWN_BLOCK_TEMPORAL[kind], groups=groups, per_frame_norm=per_frame_norm,
                        act_fn=act_fn)
            for i, kind in enumerate(down_block_types)
        ])
        self.mid_block = MidBlock3D(widths[-1], groups, per_frame_norm, act_fn, mid_attention, mid_heads)
        self.conv_norm_out = GroupNorm3D(groups, widths[-1], per_frame_norm)
        self.conv_act = get_activation(act_fn)
        self.conv_out = CausalConv3d(widths[-1], 2 * latent_channels)
        self.gradient_checkpointing = False

    def _run(self, block: nn.Module, *args):
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(block, *args)
        return block(*args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = self._run(block, x)
        x = self._run(self.mid_block, x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """Latents of one chunk -> pixels. ``stem`` (conv_in + mid block) and ``head`` (up blocks + output) are
    separate because the V3 slice mode gives the stem extra context frames and crops before the head."""

    def __init__(self, latent_channels, out_channels, widths, up_block_types, layers_per_block, groups,
                 per_frame_norm, act_fn, mid_attention, mid_heads):
        super().__init__()
        widths = list(reversed(widths))
        temporal_mode = "nearest" if per_frame_norm else "trilinear"
        self.conv_in = CausalConv3d(latent_channels, widths[0])
        self.mid_block = MidBlock3D(widths[0], groups, per_frame_norm, act_fn, mid_attention, mid_heads)
        self.up_blocks = nn.ModuleList([
            UpBlock3D(widths[max(i - 1, 0)], widths[i], layers_per_block + 1, upsample=i < len(widths) - 1,
                      temporal=UP_BLOCK_TEMPORAL[kind], temporal_mode=temporal_mode, groups=groups,
                      per_frame_norm=per_frame_norm, act_fn=act_fn)
            for i, kind in enumerate(up_block_types)
        ])
        self.conv_norm_out = GroupNorm3D(groups, widths[-1], per_frame_norm)
        self.conv_act = get_activation(act_fn)
        self.conv_out = CausalConv3d(widths[-1], out_channels)
        self.gradient_checkpointing = False

    def _run(self, block: nn.Module, *args):
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(block, *args)
        return block(*args)

    def stem(self, z: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        return self._run(self.mid_block, self.conv_in(z, cache), cache)

    def head(self, x: torch.Tensor, cache: CausalCache | None = None, image: bool = False) -> torch.Tensor:
        for block in self.up_blocks:
            x = self._run(block, x, cache, image)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)), cache)

    def forward(self, z: torch.Tensor, cache: CausalCache | None = None, image: bool = False) -> torch.Tensor:
        return self.head(self.stem(z, cache), cache, image)


def _blend(a: torch.Tensor, b: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """Cross-fade the last ``extent`` slices of tile ``a`` into the first ``extent`` of tile ``b`` along ``dim``."""
    extent = min(a.shape[dim], b.shape[dim], extent)
    if extent == 0:
        return b
    shape = [1] * b.ndim
    shape[dim] = extent
    ramp = (torch.arange(extent, dtype=torch.float64) / extent).reshape(shape)
    mixed = a.narrow(dim, a.shape[dim] - extent, extent) * (1 - ramp).to(b) + b.narrow(dim, 0, extent) * ramp.to(b)
    return torch.cat([mixed, b.narrow(dim, extent, b.shape[dim] - extent)], dim=dim)


def _stitch_tiles(rows: list[list[torch.Tensor]], extent: int, keep: int) -> torch.Tensor:
    """Blend each tile with its upper and left neighbours, crop to ``keep`` x ``keep`` and concatenate. Blended
    tiles replace the originals in ``rows``, so later neighbours blend with already-blended tiles (as upstream,
    which blends in place)."""
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            if i > 0:
                tile = _blend(rows[i - 1][j], tile, extent, dim=-2)
            if j > 0:
                tile = _blend(row[j - 1], tile, extent, dim=-1)
            row[j] = tile
    return torch.cat([torch.cat([t[..., :keep, :keep] for t in row], dim=-1) for row in rows], dim=-2)


# ----------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------


class AutoencoderKLMagvit(ModelMixin, ConfigMixin):
    """The EasyAnimate V4 video VAE (``vae/`` of the released checkpoint).

    The constructor takes the keys of the released ``vae/config.json``; the defaults are the released V4 values as
    far as they are known (the file itself is unpublished: they are reconstructed from the V4 YAML and the V2/V3
    VAE configs; ``spatial_group_norm`` and ``use_tiling`` are unknown and default to off).
    ``num_attention_heads`` is recorded for config compatibility only (no block of this model uses it);
    ``use_gc_blocks`` must stay off (no GC blocks exist in V4). Raises ``ValueError`` for modes and block layouts
    that V4 does not have.
    """

    _supports_gradient_checkpointing = True
    # Keys of the released vae/config.json that no argument takes (nor did the original class): block_out_channels
    # (the original pipeline reads it for its x8 scale factor), force_upcast and sample_size (diffusers AutoencoderKL
    # leftovers). They stay in the config and are saved again; naming them only spares users diffusers' warning
    # "... are not expected and will be ignored. Please verify your config.json".
    config_only_keys = ("block_out_channels", "force_upcast", "sample_size")

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        kept = {k: v for k, v in config_dict.items() if k in cls.config_only_keys}
        rest = {k: v for k, v in config_dict.items() if k not in kept}
        init_dict, unused_kwargs, hidden = super().extract_init_dict(rest, **kwargs)
        return init_dict, unused_kwargs, {**hidden, **kept}

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        ch: int = 128,
        ch_mult: tuple[int, ...] = (1, 2, 4, 4),
        use_gc_blocks=None,
        down_block_types: tuple[str, ...] = V4_DOWN_BLOCKS,
        up_block_types: tuple[str, ...] = V4_UP_BLOCKS,
        mid_block_type: str = "MidBlock3D",
        mid_block_use_attention: bool = True,
        mid_block_attention_type: str = "3d",
        mid_block_num_attention_heads: int = 1,
        layers_per_block: int = 2,
        act_fn: str = "silu",
        num_attention_heads: int = 1,
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        scaling_factor: float = 0.18215,
        slice_mag_vae: bool = False,
        slice_compression_vae: bool = False,
        cache_compression_vae: bool = True,
        use_tiling: bool = False,
        use_tiling_encoder: bool = False,
        use_tiling_decoder: bool = False,
        mini_batch_encoder: int = 8,
        mini_batch_decoder: int = 2,
        upcast_vae: bool = False,
        spatial_group_norm: bool = False,
        tile_sample_min_size: int = 384,
        tile_overlap_factor: float = 0.25,
    ):
        super().__init__()
        # How decoder chunks see each other: "cache" (V4, causal conv cache) or "slice" (V3, neighbour context).
        # The original checks the flags in this order; the first true one wins.
        if cache_compression_vae:
            self.mode = "cache"
        elif slice_compression_vae:
            self.mode = "slice"
        else:
            which = "slice_mag_vae (EasyAnimate V2)" if slice_mag_vae else "full (all mode flags false)"
            raise ValueError(
                f"AutoencoderKLMagvit: the {which} mode is not supported. Set cache_compression_vae: true (the V4 "
                "release mode) or slice_compression_vae: true (V3) in the VAE config.json."
            )
        if use_gc_blocks and any(use_gc_blocks):
            raise ValueError("use_gc_blocks: GC blocks are not part of EasyAnimate V4; remove the key or set it to null")
        n = len(ch_mult)
        for name, kinds, known in (("down_block_types", down_block_types, DOWN_BLOCK_TEMPORAL),
                                   ("up_block_types", up_block_types, UP_BLOCK_TEMPORAL)):
            unknown = [k for k in kinds if k not in known]
            if unknown or len(kinds) != n:
                raise ValueError(f"{name} must be {n} entries (one per ch_mult entry) from {sorted(known)}; got "
                                 f"{list(kinds)}")
        temporal_down = sum(DOWN_BLOCK_TEMPORAL[k] for k in down_block_types[:-1])
        temporal_up = sum(UP_BLOCK_TEMPORAL[k] for k in up_block_types[:-1])
        if temporal_down != temporal_up:
            raise ValueError(f"the encoder halves time {temporal_down}x but the decoder doubles it {temporal_up}x "
                             "(count the Spatial*Temporal* blocks except the last one of each list); they must match")
        if mid_block_type != "MidBlock3D" or mid_block_attention_type != "3d":
            raise ValueError(f"only mid_block_type 'MidBlock3D' with mid_block_attention_type '3d' exists in V4; got "
                             f"{mid_block_type!r} / {mid_block_attention_type!r}")
        widths = [ch * m for m in ch_mult]
        if any(w % norm_num_groups for w in widths):
            raise ValueError(f"norm_num_groups={norm_num_groups} must divide every block width {widths}")
        if mini_batch_encoder < 1 or mini_batch_decoder < 1:
            raise ValueError("mini_batch_encoder and mini_batch_decoder must be >= 1")
        if not 0 <= tile_overlap_factor < 1:
            raise ValueError(f"tile_overlap_factor must be in [0, 1); got {tile_overlap_factor}")

        common = dict(layers_per_block=layers_per_block, groups=norm_num_groups, per_frame_norm=spatial_group_norm,
                      act_fn=act_fn, mid_attention=mid_block_use_attention, mid_heads=mid_block_num_attention_heads)
        self.encoder = Encoder(in_channels, latent_channels, widths, down_block_types, **common)
        self.decoder = Decoder(latent_channels, out_channels, widths, up_block_types, **common)
        self.quant_conv = nn.Conv3d(2 * latent_channels, 2 * latent_channels, 1)
        self.post_quant_conv = nn.Conv3d(latent_channels, latent_channels, 1)

        # User switches (settings, not per-call state). Set upcast_vae = True to run an fp16 model in float32.
        self.upcast_vae = upcast_vae
        self.use_slicing = False
        self.use_tiling = use_tiling
        self.use_tiling_encoder = use_tiling_encoder
        self.use_tiling_decoder = use_tiling_decoder
        self.tile_sample_min_size = tile_sample_min_size
        self.tile_latent_min_size = int(tile_sample_min_size / 2 ** (n - 1))
        self.tile_overlap_factor = tile_overlap_factor

    # -- properties and frame bookkeeping ------------------------------------------------------------------------

    @property
    def spatial_compression_ratio(self) -> int:
        """Pixels per latent along height and width (8 for V4): one x2 downsampler per block but the last."""
        return 2 ** (len(self.config.ch_mult) - 1)

    @property
    def temporal_compression_ratio(self) -> int:
        """Pixel frames per latent frame within a chunk (4 for V4): x2 per temporal downsampler."""
        temporal_downsamplers = sum(DOWN_BLOCK_TEMPORAL[k] for k in self.config.down_block_types[:-1])
        return 2**temporal_downsamplers

    def num_latent_frames(self, num_frames: int) -> int:
        """Latent frames the encoder makes from ``num_frames`` pixel frames: frame 0 alone when odd, then chunks
        of ``mini_batch_encoder`` frames, each shortened by the temporal ratio (rounding up)."""
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1; got {num_frames}")
        ratio, chunk = self.temporal_compression_ratio, self.config.mini_batch_encoder
        first = num_frames % 2
        full, tail = divmod(num_frames - first, chunk)
        return first + full * math.ceil(chunk / ratio) + math.ceil(tail / ratio)

    def num_decoded_frames(self, num_latent_frames: int) -> int:
        """Pixel frames the decoder makes from ``num_latent_frames`` latents. Cache mode: 1 latent is an image,
        otherwise every latent gives ``temporal_compression_ratio`` frames. Slice mode: an odd count decodes
        latent 0 as an image."""
        if num_latent_frames < 1:
            raise ValueError(f"num_latent_frames must be >= 1; got {num_latent_frames}")
        ratio = self.temporal_compression_ratio
        if num_latent_frames == 1:
            return 1
        if self.mode == "slice" and num_latent_frames % 2:
            return 1 + ratio * (num_latent_frames - 1)
        return ratio * num_latent_frames

    # -- switches ------------------------------------------------------------------------------------------------

    def enable_tiling(self) -> None:
        """Encode/decode frames wider or taller than ``tile_sample_min_size`` in overlapping spatial tiles."""
        self.use_tiling = True

    def disable_tiling(self) -> None:
        self.use_tiling = self.use_tiling_encoder = self.use_tiling_decoder = False

    def enable_slicing(self) -> None:
        """Encode/decode a batch one sample at a time (less memory, same result)."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    # -- loading -------------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, subfolder: str | None = None, torch_dtype: torch.dtype | None = None,
                        **config_overrides) -> "AutoencoderKLMagvit":
        """Load ``path[/subfolder]`` (config.json + weights) strictly; ``loss.*`` training keys are ignored.

        Keys absent from config.json take the *original* class defaults where those differ from ours (e.g.
        ``scaling_factor`` 0.1825, ``slice_mag_vae`` true), because that is what the original computes with
        such a file; a warning names them. ``config_overrides`` win over both.
        """
        folder = Path(path) / subfolder if subfolder else Path(path)
        present = read_model_config(cls, folder)
        overrides = {k: v for k, v in ORIGINAL_CLASS_DEFAULTS.items() if k not in present}
        if overrides:
            logger.warning("%s/config.json has no %s; using the original's class defaults %s",
                           folder, sorted(overrides), overrides)
        overrides.update(config_overrides)
        return load_model_from_folder(cls, path, subfolder, torch_dtype=torch_dtype, config_overrides=overrides,
                                      ignore_prefixes=("loss.",))

    # -- input checks --------------------------------------------------------------------------------------------

    def _check_video(self, x, channels: int, what: str, multiple: int) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{what} must be a torch.Tensor; got {type(x).__name__}")
        if x.ndim != 5:
            raise ValueError(f"{what} must be 5-D (B, {channels}, F, H, W); got shape {tuple(x.shape)}. "
                             "For images use F = 1 (x.unsqueeze(2)).")
        if not x.is_floating_point():
            raise ValueError(f"{what} must be a floating-point tensor; got {x.dtype}")
        b, c, f, h, w = x.shape
        if c != channels:
            raise ValueError(f"{what} must have {channels} channels in dim 1 (B, C, F, H, W); got shape "
                             f"{tuple(x.shape)}")
        if min(b, f, h, w) == 0:
            raise ValueError(f"{what} is empty: shape {tuple(x.shape)}")
        if h % multiple or w % multiple:
            raise ValueError(f"{what}: height and width must be multiples of {multiple}; got {h}x{w}. Resize or crop "
                             f"to e.g. {h // multiple * multiple or multiple}x{w // multiple * multiple or multiple}.")

    def _compute_input(self, x: torch.Tensor, modules: tuple[nn.Module, ...]) -> torch.Tensor:
        """Cast ``x`` to the dtype the modules compute in. With ``upcast_vae`` (fp16 inference) the modules are
        converted to float32 once, as the original does, and so is ``x``."""
        if self.upcast_vae:
            for module in modules:
                if next(module.parameters()).dtype != torch.float32:
                    module.float()
            return x.float()
        return x.to(next(modules[0].parameters()).dtype)

    # -- encoding ------------------------------------------------------------------------------------------------

    def _encode_frames(self, x: torch.Tensor) -> torch.Tensor:
        """Moments of the whole clip: frame 0 alone when F is odd, then independent chunks."""
        num_frames, chunk = x.shape[2], self.config.mini_batch_encoder
        starts = ([0] if num_frames % 2 else []) + list(range(num_frames % 2, num_frames, chunk))
        ends = starts[1:] + [num_frames]
        moments = [self.quant_conv(self.encoder(x[:, :, a:b])) for a, b in zip(starts, ends)]
        return torch.cat(moments, dim=2)

    def _tiled_encode(self, x: torch.Tensor) -> torch.Tensor:
        """Moments of overlapping ``tile_sample_min_size`` pixel tiles, cross-faded over the overlap."""
        size, latent_size = self.tile_sample_min_size, self.tile_latent_min_size
        stride = int(size * (1 - self.tile_overlap_factor))
        extent = int(latent_size * self.tile_overlap_factor)
        rows = [[self._encode_frames(x[..., i:i + size, j:j + size]) for j in range(0, x.shape[-1], stride)]
                for i in range(0, x.shape[-2], stride)]
        return _stitch_tiles(rows, extent, latent_size - extent)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        size = self.tile_sample_min_size
        if (self.use_tiling or self.use_tiling_encoder) and (x.shape[-1] > size or x.shape[-2] > size):
            return self._tiled_encode(x)
        return self._encode_frames(x)

    @apply_forward_hook
    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """Pixels ``(B, 3, F, H, W)`` in [-1, 1] -> the posterior over latents ``(B, 4, f, H/8, W/8)``.

        F = 1 is an image; videos should have F a multiple of ``mini_batch_encoder`` (8), giving F/4 latents.
        Other F are encoded as the original does (frame 0 alone when odd, a shorter last chunk), with a warning
        when the latents will not decode back to F frames (e.g. 9 -> 3 latents -> 12 frames in cache mode).
        """
        self._check_video(x, self.config.in_channels, "encode input", self.spatial_compression_ratio)
        num_frames = x.shape[2]
        decoded = self.num_decoded_frames(self.num_latent_frames(num_frames))
        if decoded != num_frames:
            logger.warning("encoding %d frames gives %d latent frames, which decode to %d frames; use F = 1 or a "
                           "multiple of %d frames for an exact round trip", num_frames,
                           self.num_latent_frames(num_frames), decoded, self.config.mini_batch_encoder)
        x = self._compute_input(x, (self.encoder, self.quant_conv))
        if self.use_slicing and x.shape[0] > 1:
            moments = torch.cat([self._encode(sample) for sample in x.split(1)])
        else:
            moments = self._encode(x)
        posterior = DiagonalGaussian(moments)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    # -- decoding ------------------------------------------------------------------------------------------------

    def _decode_frames(self, z: torch.Tensor) -> torch.Tensor:
        """Pixels of the whole clip, decoded chunk by chunk."""
        z = self.post_quant_conv(z)
        if z.shape[2] == 1:
            return self.decoder(z, image=True)
        chunks = self._decode_chunks(z)
        if torch.is_grad_enabled():
            return torch.cat(list(chunks), dim=2)
        # Inference: write each chunk into the preallocated output and drop it, so that memory beyond the output
        # is one chunk's activations whatever the length.
        out, end = None, 0
        for piece in chunks:
            if out is None:
                size = (*piece.shape[:2], self.num_decoded_frames(z.shape[2]), *piece.shape[3:])
                out = piece.new_empty(size)
            out[:, :, end:end + piece.shape[2]] = piece
            end += piece.shape[2]
        return out

    def _decode_chunks(self, z: torch.Tensor):
        """Yield the decoded pixel frames of each latent chunk in order (``mode`` decides how chunks see each
        other)."""
        f, chunk = z.shape[2], self.config.mini_batch_decoder
        if self.mode == "cache":
            cache = CausalCache()
            for start in range(0, f, chunk):
                yield self.decoder(z[:, :, start:start + chunk], cache)
                cache = cache.next()
            return
        # V3 slice: latent 0 alone when f is odd; each chunk's stem also sees one chunk before and after it.
        first = f % 2
        if first:
            yield self.decoder(z[:, :, :1], image=True)
        for start in range(first, f, chunk):
            lo, hi = max(first, start - chunk), min(f, start + 2 * chunk)
            h = self.decoder.stem(z[:, :, lo:hi])
            yield self.decoder.head(h[:, :, start - lo:start - lo + min(chunk, f - start)])

    def _tiled_decode(self, z: torch.Tensor) -> torch.Tensor:
        """Pixels of overlapping ``tile_latent_min_size`` latent tiles, cross-faded over the overlap."""
        size, latent_size = self.tile_sample_min_size, self.tile_latent_min_size
        stride = int(latent_size * (1 - self.tile_overlap_factor))
        extent = int(size * self.tile_overlap_factor)
        rows = [[self._decode_frames(z[..., i:i + latent_size, j:j + latent_size])
                 for j in range(0, z.shape[-1], stride)] for i in range(0, z.shape[-2], stride)]
        out = _stitch_tiles(rows, extent, size - extent)
        # V4 addition: decode the bottom-right corner tile once more and fade it in towards the corner, with
        # weight min(x ramp, y ramp) over its area.
        corner = self._decode_frames(z[..., -latent_size:, -latent_size:])
        h, w = corner.shape[-2:]
        weight = torch.minimum(torch.linspace(0, 1, w)[None, :], torch.linspace(0, 1, h)[:, None]).to(corner)
        out[..., -h:, -w:] = out[..., -h:, -w:] * (1 - weight) + corner * weight
        return out

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        size = self.tile_latent_min_size
        if (self.use_tiling or self.use_tiling_decoder) and (z.shape[-1] > size or z.shape[-2] > size):
            return self._tiled_decode(z)
        return self._decode_frames(z)

    @apply_forward_hook
    def decode(self, z: torch.Tensor, return_dict: bool = True):
        """Latents ``(B, 4, f, h, w)`` (unscaled: divide pipeline latents by ``scaling_factor`` first) -> pixels
        ``(B, 3, num_decoded_frames(f), 8h, 8w)``, raw (not clamped)."""
        self._check_video(z, self.config.latent_channels, "decode input", 1)
        z = self._compute_input(z, (self.decoder, self.post_quant_conv))
        if self.use_slicing and z.shape[0] > 1:
            sample = torch.cat([self._decode(latent) for latent in z.split(1)])
        else:
            sample = self._decode(z)
        return DecoderOutput(sample=sample) if return_dict else (sample,)

    def forward(self, sample: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None,
                return_dict: bool = True):
        """Encode, sample the posterior (or take its mean) and decode: the VAE training step's forward."""
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        reconstruction = self.decode(z).sample
        return AutoencoderOutput(sample=reconstruction, latent_dist=posterior) if return_dict else (
            reconstruction, posterior)
