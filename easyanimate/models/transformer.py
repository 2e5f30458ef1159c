"""The EasyAnimate V4 diffusion transformer (``HunyuanTransformer3DModel``).

A HunyuanDiT transformer run over all frames of a video at once (full 3D attention):

* every frame is patchified on its own (2D conv); tokens are ordered frame-major ``(f, row, col)``;
* every block adds a fixed sinusoidal *frame-index* encoding to the residual stream, then does
  self-attention with a per-frame 2D RoPE, cross-attention to BERT + mT5 text tokens and, for the
  image-to-video ("InP") model, cross-attention to 16 CLIP image tokens;
* U-ViT long skips connect the first and the second half of the blocks;
* the conditioning vector mixes timestep, pooled mT5 text, image size and style (HunyuanDiT v1.0 style).

Module names are the released checkpoint's key names (also what LoRA files address). The numerics are the
original's, including quirks the released weights were trained with (each is noted where it is kept).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention, HunyuanAttnProcessor2_0
from diffusers.models.embeddings import (
    HunyuanCombinedTimestepTextSizeStyleEmbedding,
    PatchEmbed,
    PixArtAlphaTextProjection,
)
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import AdaLayerNormContinuous, FP32LayerNorm
from diffusers.models.transformers.hunyuan_transformer_2d import AdaLayerNormShift
from torch import nn

from ..utils.weights import load_model_from_folder
from .rope import rope_for_latent_grid
from .step_cache import StepCache

logger = logging.getLogger(__name__)

MAX_LATENT_FRAMES = 512  # rows of the frame-index table ``t_embed.pe`` stored in the checkpoint
NORM_EPS = 1e-6


class FrameIndexEncoding(nn.Module):
    """Adds a fixed sinusoid of the latent-frame index to every token of that frame: the tokens' only signal of
    their frame (RoPE is the same for every frame).

    ``pe[p, 2i] = sin(p * 10000^(-2i/dim))``, ``pe[p, 2i+1] = cos(...)`` (interleaved). It is a persistent
    buffer, so it is part of the checkpoint (``blocks.N.t_embed.pe``) and follows the model dtype.
    ``forward`` takes tokens ``(B, F*S, dim)`` ordered frame-major and returns them with frame ``f``'s row added;
    given ``frame_index`` ``(T,)`` (sequence parallelism: a slice of the tokens), token ``i`` gets row
    ``frame_index[i]`` instead.
    """

    def __init__(self, dim: int, max_frames: int = MAX_LATENT_FRAMES):
        super().__init__()
        position = torch.arange(max_frames, dtype=torch.float32)[:, None]
        inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
        pe = torch.zeros(1, max_frames, dim)
        pe[0, :, 0::2] = torch.sin(position * inv_freq)
        pe[0, :, 1::2] = torch.cos(position * inv_freq)
        self.register_buffer("pe", pe, persistent=True)

    def forward(self, x: torch.Tensor, num_frames: int, frame_index: torch.Tensor | None = None) -> torch.Tensor:
        if frame_index is not None:
            return x + self.pe[0, frame_index].to(x.dtype)
        batch, tokens, dim = x.shape
        x = x.reshape(batch, num_frames, tokens // num_frames, dim) + self.pe[0, :num_frames, None, :].to(x.dtype)
        return x.reshape(batch, tokens, dim)


class ClipGate(nn.Module):
    """GEGLU gate on the CLIP cross-attention output: LayerNorm -> Linear(dim -> 2 dim) -> a * gelu(g)."""

    def __init__(self, dim: int):
        super().__init__()
        # eps = dim is a slip in the original (the width was passed where eps goes), but the released weights
        # were trained with it, so it is kept: with eps = 1408 this "norm" mostly rescales by ~1/sqrt(1408).
        self.norm = FP32LayerNorm(dim, eps=float(dim), elementwise_affine=True)
        self.proj = nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(self.norm(x)).chunk(2, dim=-1)
        return value * F.gelu(gate)  # exact (erf) GELU


class Resampler(nn.Module):
    """Qwen-VL style resampler (``clip_projection``): ``num_queries`` learned queries attend to the CLIP patch
    tokens ``(B, T, kv_dim)``, giving ``(B, num_queries, embed_dim)``.

    Keys get a 2D sin-cos table bicubically resized from the stored query grid (4x4) to the token grid; queries get
    the stored table as is. No key padding mask. Uses ``nn.MultiheadAttention`` because the checkpoint stores its
    packed ``in_proj`` (q, k, v).
    """

    def __init__(self, num_queries: int, embed_dim: int, num_heads: int, kv_dim: int):
        super().__init__()
        self.grid_size = math.isqrt(num_queries)
        if self.grid_size**2 != num_queries:
            raise ValueError(f"n_query must be a square number (a grid of queries); got {num_queries}")
        # A fixed table saved in the checkpoint; the original keeps it frozen.
        self.pos_embed = nn.Parameter(_sincos_2d_table(embed_dim, self.grid_size), requires_grad=False)
        self.query = nn.Parameter(torch.empty(num_queries, embed_dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        # Only present when the CLIP width differs from the cross-attention width (not in the release).
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False) if kv_dim != embed_dim else nn.Identity()
        self.attn = nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)
        self.ln_q = nn.LayerNorm(embed_dim)
        self.ln_kv = nn.LayerNorm(embed_dim)

    def key_pos_embed(self, num_tokens: int) -> torch.Tensor:
        """The ``(num_tokens, embed_dim)`` key table for a square token grid, resized in float32 as the original."""
        size = math.isqrt(num_tokens)
        if size == self.grid_size:
            return self.pos_embed
        table = self.pos_embed.float().reshape(1, self.grid_size, self.grid_size, -1).permute(0, 3, 1, 2)
        table = F.interpolate(table, size=(size, size), mode="bicubic", align_corners=False)
        return table.permute(0, 2, 3, 1).flatten(0, 2).to(self.pos_embed.dtype)

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
        kv = self.ln_kv(self.kv_proj(image_tokens))
        query = (self.ln_q(self.query) + self.pos_embed).expand(kv.shape[0], -1, -1)
        out, _ = self.attn(query, kv + self.key_pos_embed(kv.shape[1]), kv, need_weights=False)
        return out


def _sincos_2d_table(dim: int, grid: int) -> torch.Tensor:
    """``(grid*grid, dim)`` 2D sin-cos table: first half encodes the column, second the row; [sin | cos] each."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    coords = torch.arange(grid, dtype=torch.float64)
    cols, rows = coords.repeat(grid), coords.repeat_interleave(grid)

    def axis(pos: torch.Tensor) -> torch.Tensor:
        angles = torch.outer(pos, omega)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([axis(cols), axis(rows)], dim=1).float()


def _attention(dim: int, heads: int, cross_attention_dim: int | None) -> Attention:
    """Attention with biases and a LayerNorm (eps 1e-6, one weight shared by the heads) on each head's q and k;
    the Hunyuan SDPA processor applies RoPE to q always and to k only in self-attention."""
    return Attention(
        query_dim=dim,
        cross_attention_dim=cross_attention_dim,
        dim_head=dim // heads,
        heads=heads,
        qk_norm="layer_norm",
        eps=NORM_EPS,
        bias=True,
        processor=HunyuanAttnProcessor2_0(),
    )


class HunyuanDiTBlock3D(nn.Module):
    """One V4 block: [long skip] -> frame-index encoding -> self-attn -> text cross-attn -> [CLIP cross-attn] -> FFN.

    Self-attention is over all frames' tokens; RoPE goes on q and k there, and on q only in cross-attentions.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        cross_attention_dim: int,
        ff_inner_dim: int,
        activation_fn: str,
        skip: bool,
        clip_branch: bool,
    ):
        super().__init__()
        if skip:
            self.skip_norm = FP32LayerNorm(2 * dim, NORM_EPS, elementwise_affine=True)
            self.skip_linear = nn.Linear(2 * dim, dim)
        self.t_embed = FrameIndexEncoding(dim)
        self.norm1 = AdaLayerNormShift(dim, elementwise_affine=True, eps=NORM_EPS)
        self.attn1 = _attention(dim, num_heads, None)
        self.norm2 = FP32LayerNorm(dim, NORM_EPS, elementwise_affine=True)
        self.attn2 = _attention(dim, num_heads, cross_attention_dim)
        self.clip_branch = clip_branch
        if clip_branch:
            self.norm_clip = FP32LayerNorm(dim, NORM_EPS, elementwise_affine=True)
            self.attn_clip = _attention(dim, num_heads, cross_attention_dim)
            self.gate_clip = ClipGate(dim)
            self.norm_clip_out = FP32LayerNorm(dim, NORM_EPS, elementwise_affine=True)
        self.norm3 = FP32LayerNorm(dim, NORM_EPS, elementwise_affine=True)
        self.ff = FeedForward(dim, activation_fn=activation_fn, inner_dim=ff_inner_dim, bias=True)

    def forward(
        self,
        hidden_states: torch.Tensor,
        temb: torch.Tensor,
        text_tokens: torch.Tensor,
        image_tokens: torch.Tensor | None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor],
        num_frames: int,
        skip: torch.Tensor | None = None,
        frame_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``frame_index``: each token's latent frame when the tokens are a slice (sequence parallelism)."""
        if skip is not None:
            hidden_states = self.skip_linear(self.skip_norm(torch.cat([hidden_states, skip], dim=-1)))
        if num_frames > 1:
            hidden_states = self.t_embed(hidden_states, num_frames, frame_index)

        hidden_states = hidden_states + self.attn1(self.norm1(hidden_states, temb), image_rotary_emb=rotary_emb)
        hidden_states = hidden_states + self.attn2(
            self.norm2(hidden_states), encoder_hidden_states=text_tokens, image_rotary_emb=rotary_emb
        )
        if self.clip_branch:
            image_out = self.attn_clip(
                self.norm_clip(hidden_states), encoder_hidden_states=image_tokens, image_rotary_emb=rotary_emb
            )
            hidden_states = hidden_states + self.norm_clip_out(self.gate_clip(image_out))
        return hidden_states + self.ff(self.norm3(hidden_states))


@dataclass
class ChannelAdaptation:
    """What :meth:`HunyuanTransformer3DModel.from_pretrained` with ``adapt_channels=True`` changed."""

    zero_filled: list[str] = field(default_factory=list)  # new input channels set to 0
    left_random: list[str] = field(default_factory=list)  # new output channels left at random init
    truncated: list[str] = field(default_factory=list)  # checkpoint channels dropped
    left_at_init: list[str] = field(default_factory=list)  # keys absent from the checkpoint

    def __bool__(self) -> bool:
        return bool(self.zero_filled or self.left_random or self.truncated or self.left_at_init)

    def summary(self) -> str:
        lines = [f"zero-filled: {item}" for item in self.zero_filled]
        lines += [f"left at random init: {item}" for item in self.left_random]
        lines += [f"truncated: {item}" for item in self.truncated]
        if self.left_at_init:
            shown = ", ".join(self.left_at_init[:8]) + (" ..." if len(self.left_at_init) > 8 else "")
            lines.append(f"{len(self.left_at_init)} keys not in the checkpoint, left at init: {shown}")
        return "\n".join(lines) or "nothing adapted: the checkpoint fits the model"


def _check_config(basic_block_type: str, time_position_encoding: bool, after_norm: bool, norm_type: str,
                  num_attention_heads: int, attention_head_dim: int, hidden_size: int, num_layers: int) -> None:
    """Raise ``ValueError`` for a config this class cannot build: anything but the V4 block variant, or sizes
    that do not fit together."""
    if basic_block_type != "basic":
        raise ValueError(
            f"basic_block_type={basic_block_type!r} is not supported: EasyAnimate V4 uses 'basic' blocks "
            "(full 3D attention). The V3 motion-module and hybrid (Mamba) variants are not implemented; "
            "remove basic_block_type from the config or set it to 'basic'."
        )
    if not time_position_encoding or after_norm:
        raise ValueError(
            f"time_position_encoding={time_position_encoding}, after_norm={after_norm} are not V4 values; "
            "the V4 model uses time_position_encoding=True and after_norm=False."
        )
    if norm_type != "layer_norm":
        raise ValueError(f"norm_type={norm_type!r} is not supported; V4 uses 'layer_norm'")
    if num_attention_heads * attention_head_dim != hidden_size:
        raise ValueError(
            f"hidden_size ({hidden_size}) must equal num_attention_heads x attention_head_dim "
            f"({num_attention_heads} x {attention_head_dim})"
        )
    if num_layers % 2:
        raise ValueError(
            f"num_layers must be even (long skips pair block L with block num_layers-1-L); got {num_layers}"
        )


class TimestepSizeStyleEmbedding(HunyuanCombinedTimestepTextSizeStyleEmbedding):
    """HunyuanDiT v1.0's time embedding (which V4 keeps): MLP(sinusoid(t)) + MLP([pooled mT5 states, sinusoids of
    the six size numbers, style embedding]). The second half does not change between denoising steps, so it is
    computed once per generation (:meth:`extra_embedding`) and :meth:`forward` adds it to the timestep's part. Same
    modules and weights as diffusers' class; the result is bit-identical to its forward."""

    def extra_embedding(self, t5_states: torch.Tensor, image_meta_size: torch.Tensor, style: torch.Tensor,
                        dtype: torch.dtype) -> torch.Tensor:
        """The step-invariant part ``(B, hidden)`` from the mT5 states, ``(B, 6)`` sizes and ``(B,)`` style ids."""
        pooled = self.pooler(t5_states)
        sizes = self.size_proj(image_meta_size.to(dtype).contiguous().view(-1)).to(dtype=dtype).view(-1, 6 * 256)
        return self.extra_embedder(torch.cat([pooled, sizes, self.style_embedder(style)], dim=1))

    def forward(self, timestep: torch.Tensor, extra_embedding: torch.Tensor, hidden_dtype=None) -> torch.Tensor:
        """``temb`` ``(B, hidden)``: the timestep's sinusoid (fp32) through the MLP in ``hidden_dtype``, plus
        ``extra_embedding``."""
        return self.timestep_embedder(self.time_proj(timestep).to(dtype=hidden_dtype)) + extra_embedding


@dataclass
class StepConditioning:
    """The transformer's inputs that stay the same through the denoising steps of one generation, prepared once
    by :meth:`HunyuanTransformer3DModel.prepare_conditioning`: the size / style / pooled-text part of the time
    embedding ``(B, hidden)``, the text tokens ``(B, text_len + text_len_t5, cross_attention_dim)``, the CLIP image
    tokens ``(B, n_query, cross_attention_dim)`` (None for the text-to-video model) and the RoPE ``(cos, sin)``
    tiled over the frames ``(F*S, head_dim)``."""

    extra_embedding: torch.Tensor
    text_tokens: torch.Tensor
    image_tokens: torch.Tensor | None
    rotary_emb: tuple[torch.Tensor, torch.Tensor]
    padding_image_tokens: torch.Tensor | None = None  # what image_tokens are with no CLIP image (all clip_padding)

    def without_clip(self) -> "StepConditioning":
        """The same conditioning with no CLIP image: every image token is the learned ``clip_padding`` row, as
        zero CLIP states with mask 0 give (without running the Resampler again)."""
        if self.padding_image_tokens is None:
            return self
        return dataclasses.replace(self, image_tokens=self.padding_image_tokens)

    def check_fits(self, batch: int, frames: int, tokens_per_frame: int) -> None:
        """``ValueError`` unless this was prepared for latents of ``batch`` samples and this frame and patch grid."""
        if self.text_tokens.shape[0] != batch or self.rotary_emb[0].shape[0] != frames * tokens_per_frame:
            raise ValueError(
                f"conditioning was prepared for {self.text_tokens.shape[0]} samples and "
                f"{self.rotary_emb[0].shape[0]} tokens, but the latents have {batch} samples and "
                f"{frames * tokens_per_frame} tokens: prepare it with their latent_shape"
            )


def config_is_inpaint(config) -> bool:
    """Whether a transformer config (a dict or a model's ``config``) describes the image-to-video (InP) model: its
    output is not twice its input channels (``2 * in_channels != out_channels``, ``out_channels`` None meaning
    ``in_channels`` times 2 with learned sigma, else times 1)."""
    get = config.get if isinstance(config, dict) else lambda key, default: getattr(config, key, default)
    in_channels = get("in_channels", 12)
    out_channels = get("out_channels", 8)
    if out_channels is None:
        out_channels = in_channels * (2 if get("learn_sigma", True) else 1)
    return in_channels * 2 != out_channels


class HunyuanTransformer3DModel(ModelMixin, ConfigMixin):
    """EasyAnimate V4 diffusion transformer (``EasyAnimateV4-XL-2-InP/transformer``).

    Arguments are the released ``config.json`` keys; the defaults are the released InP model's values. That
    includes the V4 inference keys ``basic_block_type="basic"``, ``time_position_encoding=True`` and
    ``after_norm=False``, which the original applied from its V4 YAML over config.json, so a config.json without
    them builds the V4 model. Variants:

    * image-to-video "InP" (``in_channels=12, out_channels=8``): noisy latents + 8 inpaint channels, and a CLIP
      image branch (Resampler, ``clip_padding``, CLIP cross-attention in every block);
    * text-to-video (``in_channels=4, out_channels=None`` -> 8).

    The CLIP branch exists when ``2 * in_channels != out_channels`` (``is_inpaint``), as in the original.
    Output: ``out_channels`` = 2 x latent channels (learned sigma); the pipeline uses the first half.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["HunyuanDiTBlock3D"]

    @register_to_config
    def __init__(
        self,
        num_attention_heads: int = 16,
        attention_head_dim: int = 88,
        in_channels: int = 12,
        out_channels: int | None = 8,
        patch_size: int = 2,
        n_query: int = 16,
        projection_dim: int = 1024,
        activation_fn: str = "gelu-approximate",
        sample_size: int = 128,
        hidden_size: int = 1408,
        num_layers: int = 40,
        mlp_ratio: float = 4.3637,
        learn_sigma: bool = True,
        cross_attention_dim: int = 1024,
        norm_type: str = "layer_norm",
        cross_attention_dim_t5: int = 2048,
        pooled_projection_dim: int = 1024,
        text_len: int = 77,
        text_len_t5: int = 256,
        basic_block_type: str = "basic",
        time_position_encoding: bool = True,
        after_norm: bool = False,
        # Recorded because the released config.json carries them; they only configure block types other
        # than "basic" (rejected below), so they have no effect.
        motion_module_type: str | None = "VanillaGrid",
        motion_module_kwargs: dict | None = None,
        motion_module_kwargs_odd: dict | None = None,
        motion_module_kwargs_even: dict | None = None,
    ):
        super().__init__()
        _check_config(basic_block_type, time_position_encoding, after_norm, norm_type, num_attention_heads,
                      attention_head_dim, hidden_size, num_layers)
        self.out_channels = out_channels if out_channels is not None else in_channels * (2 if learn_sigma else 1)
        self.gradient_checkpointing = False
        dim = hidden_size

        self.text_embedder = PixArtAlphaTextProjection(
            in_features=cross_attention_dim_t5,
            hidden_size=cross_attention_dim_t5 * 4,
            out_features=cross_attention_dim,
            act_fn="silu_fp32",
        )
        # Padded text positions are replaced by these position-specific learned vectors (no attention mask).
        self.text_embedding_padding = nn.Parameter(torch.randn(text_len + text_len_t5, cross_attention_dim))
        self.pos_embed = PatchEmbed(
            height=sample_size,
            width=sample_size,
            in_channels=in_channels,
            embed_dim=dim,
            patch_size=patch_size,
            pos_embed_type=None,
        )
        self.time_extra_emb = TimestepSizeStyleEmbedding(
            dim,
            pooled_projection_dim=pooled_projection_dim,
            seq_len=text_len_t5,
            cross_attention_dim=cross_attention_dim_t5,
            # HunyuanDiT v1.0 conditioning, as V4: image meta size and style always enter temb.
            use_style_cond_and_image_meta_size=True,
        )
        if self.is_inpaint:
            self.clip_projection = Resampler(n_query, cross_attention_dim, num_attention_heads, projection_dim)
            self.clip_padding = nn.Parameter(torch.randn(n_query, cross_attention_dim) * 0.02)

        # Blocks 0 .. L/2-2 push their output, blocks L/2+1 .. L-1 pop it (LIFO), the two middle ones neither.
        self.blocks = nn.ModuleList(
            HunyuanDiTBlock3D(
                dim,
                num_attention_heads,
                cross_attention_dim,
                ff_inner_dim=int(dim * mlp_ratio),
                activation_fn=activation_fn,
                skip=layer > num_layers // 2,
                clip_branch=self.is_inpaint,
            )
            for layer in range(num_layers)
        )
        self.norm_out = AdaLayerNormContinuous(dim, dim, elementwise_affine=False, eps=NORM_EPS)
        self.proj_out = nn.Linear(dim, patch_size * patch_size * self.out_channels)
        # Set by easyanimate.models.sequence_parallel.enable_sequence_parallel: tokens split across processes.
        self.sequence_parallel = None

    @property
    def is_inpaint(self) -> bool:
        """True for the image-to-video model (CLIP branch, inpaint latents): ``2 * in_channels != out_channels``."""
        return config_is_inpaint(self.config)

    @property
    def latent_channels(self) -> int:
        """Channels of the noisy latents (the rest of ``in_channels`` are inpaint latents)."""
        return self.out_channels // 2 if self.config.learn_sigma else self.out_channels

    # ------------------------------------------------------------------------------------------------ forward

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor | None = None,
        text_embedding_mask: torch.Tensor | None = None,
        encoder_hidden_states_t5: torch.Tensor | None = None,
        text_embedding_mask_t5: torch.Tensor | None = None,
        image_meta_size: torch.Tensor | None = None,
        style: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        inpaint_latents: torch.Tensor | None = None,
        clip_encoder_hidden_states: torch.Tensor | None = None,
        clip_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
        conditioning: "StepConditioning | None" = None,
        step_cache: StepCache | None = None,
        conditioning_for: tuple[int, int, int, int] | None = None,
    ):
        """Predict ``(B, out_channels, F, H, W)`` from noisy latents ``hidden_states`` ``(B, C, F, H, W)``.

        Args:
            timestep: ``(B,)`` or a scalar. Cast to the model dtype first, as the V4 pipeline does (in bf16 this
                rounds t >= 256, e.g. 961 -> 960); the sinusoid is then computed in fp32 from that value.
            encoder_hidden_states / text_embedding_mask: BERT states ``(B, text_len, cross_attention_dim)``
                and mask ``(B, text_len)`` (1 = token, 0 = padding).
            encoder_hidden_states_t5 / text_embedding_mask_t5: mT5 states ``(B, text_len_t5, d_t5)`` and mask.
            image_meta_size: ``(B, 6)`` ``[orig_h, orig_w, target_h, target_w, crop_top, crop_left]``.
            style: ``(B,)`` long, always 0.
            image_rotary_emb: per-frame RoPE ``(cos, sin)``, each ``(H/p * W/p, attention_head_dim)``
                (see :func:`easyanimate.models.rope.rope_for_size`). ``None`` computes it for this latent grid
                with the V4 base canvas (512 px = 32 patches).
            inpaint_latents: InP model: ``(B, in_channels - C, F, H, W)`` [mask latents | masked-video latents].
            clip_encoder_hidden_states: InP model: ``(B, T, projection_dim)`` CLIP patch tokens (CLS dropped),
                T a square number.
            clip_attention_mask: InP model: ``(B, n_query)``; 0 replaces a Resampler token by ``clip_padding``.
            conditioning: everything above but the latents, inpaint latents and timestep, prepared once per
                generation by :meth:`prepare_conditioning` (then those arguments are not given); the result is
                bit-identical to passing them.
            step_cache: a :class:`~easyanimate.models.step_cache.StepCache` that may let this step reuse the
                residual of the blocks after the first from an earlier step.

        Returns ``Transformer2DModelOutput(sample=...)``, or ``(sample,)`` when ``return_dict`` is false. Raises
        ``ValueError`` naming the fix when a shape does not fit the config. (``conditioning_for`` is how
        :meth:`prepare_conditioning` runs: through ``forward``, so that offload hooks load the weights it reads.)
        """
        if conditioning_for is not None:
            return self._prepare_conditioning(
                encoder_hidden_states, text_embedding_mask, encoder_hidden_states_t5, text_embedding_mask_t5,
                image_meta_size, style, clip_encoder_hidden_states, clip_attention_mask, image_rotary_emb,
                conditioning_for,
            )
        self._check_latents(hidden_states, inpaint_latents)
        batch, _, frames, height, width = hidden_states.shape
        grid_h, grid_w = height // self.config.patch_size, width // self.config.patch_size
        if conditioning is None:
            conditioning = self._prepare_conditioning(
                encoder_hidden_states, text_embedding_mask, encoder_hidden_states_t5, text_embedding_mask_t5,
                image_meta_size, style, clip_encoder_hidden_states, clip_attention_mask, image_rotary_emb,
                (batch, frames, height, width),
            )
        conditioning.check_fits(batch, frames, grid_h * grid_w)
        dtype = self.pos_embed.proj.weight.dtype
        timestep = torch.as_tensor(timestep, device=hidden_states.device).reshape(-1)
        if timestep.numel() not in (1, batch):
            raise ValueError(f"timestep must be a scalar or have one value per sample ({batch}); got {timestep.numel()}")

        tokens = self._patchify(hidden_states, inpaint_latents, dtype)
        # The V4 pipeline hands the timestep over in the model dtype (bf16 rounds 961 -> 960): do the same here.
        temb = self.time_extra_emb(timestep.to(dtype).expand(batch), conditioning.extra_embedding, hidden_dtype=dtype)
        rotary_emb, shard, frame_index, measure = conditioning.rotary_emb, None, None, None
        if self.sequence_parallel is not None:
            # Sequence parallelism (models/sequence_parallel.py): keep this process's slice of the tokens, with their
            # global RoPE rows and frame indices; attn1 attends over every process's tokens, the step cache measures
            # over all of them, and the slices are gathered once, after proj_out.
            shard = self.sequence_parallel.shard(tokens.shape[1], grid_h * grid_w)
            tokens, rotary_emb = shard.split(tokens), tuple(shard.split_rows(t) for t in rotary_emb)
            frame_index, measure = shard.frame_index(tokens.device), shard.relative_change
        args = (temb, conditioning.text_tokens, conditioning.image_tokens, rotary_emb, frames)
        if step_cache is None:
            tokens = self._run_blocks(tokens, *args, frame_index=frame_index)
        else:
            tokens = self._run_blocks_cached(tokens, *args, step_cache, frame_index=frame_index, measure=measure)
        tokens = self.proj_out(self.norm_out(tokens, temb.to(torch.float32)))
        if shard is not None:
            # Gathered after proj_out rather than before norm_out (both act per token): p*p*out_channels values per
            # token (32 in the release) instead of the hidden size (1408), 44x fewer bytes.
            tokens = shard.gather(tokens, self.sequence_parallel.stats)
        output = self._unpatchify(tokens, batch, frames, grid_h, grid_w)
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)

    def prepare_conditioning(
        self,
        encoder_hidden_states: torch.Tensor,
        text_embedding_mask: torch.Tensor,
        encoder_hidden_states_t5: torch.Tensor,
        text_embedding_mask_t5: torch.Tensor,
        image_meta_size: torch.Tensor,
        style: torch.Tensor,
        clip_encoder_hidden_states: torch.Tensor | None = None,
        clip_attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        *,
        latent_shape: tuple[int, int, int, int],
    ) -> "StepConditioning":
        """What every denoising step of one generation is given besides the latents and the timestep, computed
        once: the text tokens (BERT and projected mT5, padding replaced), the size / style / pooled-text part of the
        time embedding, the CLIP image tokens (InP model) and the RoPE table tiled over the frames.
        ``latent_shape`` is ``(batch, frames, height, width)`` of the latents; the other arguments are those of
        :meth:`forward`. Pass the result to every step's :meth:`forward` as ``conditioning``.
        """
        return self.forward(None, None, encoder_hidden_states, text_embedding_mask, encoder_hidden_states_t5,
                            text_embedding_mask_t5, image_meta_size, style, image_rotary_emb,
                            clip_encoder_hidden_states=clip_encoder_hidden_states,
                            clip_attention_mask=clip_attention_mask, conditioning_for=latent_shape)

    def _prepare_conditioning(self, encoder_hidden_states, text_embedding_mask, encoder_hidden_states_t5,
                              text_embedding_mask_t5, image_meta_size, style, clip_encoder_hidden_states,
                              clip_attention_mask, image_rotary_emb, latent_shape) -> "StepConditioning":
        batch, frames, height, width = latent_shape
        self._check_conditioning(batch, encoder_hidden_states, text_embedding_mask, encoder_hidden_states_t5,
                                 text_embedding_mask_t5, image_meta_size, clip_encoder_hidden_states,
                                 clip_attention_mask)
        grid_h, grid_w = height // self.config.patch_size, width // self.config.patch_size
        dtype = self.pos_embed.proj.weight.dtype
        encoder_hidden_states_t5 = encoder_hidden_states_t5.to(dtype)
        image_tokens = padding_image_tokens = None
        if self.is_inpaint:
            image_tokens = self._image_tokens(clip_encoder_hidden_states.to(dtype), clip_attention_mask)
            padding_image_tokens = self.clip_padding.to(image_tokens).expand_as(image_tokens).contiguous()
        return StepConditioning(
            extra_embedding=self.time_extra_emb.extra_embedding(encoder_hidden_states_t5, image_meta_size, style, dtype),
            text_tokens=self._text_tokens(encoder_hidden_states.to(dtype), text_embedding_mask,
                                          encoder_hidden_states_t5, text_embedding_mask_t5),
            image_tokens=image_tokens,
            padding_image_tokens=padding_image_tokens,
            rotary_emb=self._rotary_emb_for_frames(image_rotary_emb, grid_h, grid_w, frames,
                                                   encoder_hidden_states.device),
        )

    def _patchify(
        self, latents: torch.Tensor, inpaint_latents: torch.Tensor | None, dtype: torch.dtype
    ) -> torch.Tensor:
        """``(B, C, F, H, W)`` latents (with the inpaint latents appended as channels) -> ``(B, F*S, hidden)``
        tokens ordered ``(f, row, col)``; each frame is patchified on its own."""
        batch, _, frames, height, width = latents.shape
        latents = latents.to(dtype)
        if inpaint_latents is not None:
            latents = torch.cat([latents, inpaint_latents.to(dtype)], dim=1)
        frames_first = latents.transpose(1, 2).reshape(batch * frames, -1, height, width)
        patches = self.pos_embed(frames_first)  # (B*F, S, hidden)
        return patches.reshape(batch, -1, patches.shape[-1])

    def _text_tokens(self, bert_states: torch.Tensor, bert_mask: torch.Tensor, t5_states: torch.Tensor,
                     t5_mask: torch.Tensor) -> torch.Tensor:
        """BERT tokens then projected mT5 tokens, ``(B, text_len + text_len_t5, cross_attention_dim)``. Padded
        positions are replaced by the position's learned ``text_embedding_padding`` row instead of being masked."""
        text_tokens = torch.cat([bert_states, self.text_embedder(t5_states)], dim=1)
        text_mask = torch.cat([bert_mask, t5_mask], dim=-1).bool()
        return torch.where(text_mask[..., None], text_tokens, self.text_embedding_padding.to(text_tokens))

    def _image_tokens(self, clip_states: torch.Tensor, clip_mask: torch.Tensor) -> torch.Tensor:
        """The Resampler's ``(B, n_query, cross_attention_dim)`` tokens; where ``clip_mask`` is 0 the learned
        ``clip_padding`` row takes the token's place (with no reference image all of them do)."""
        image_tokens = self.clip_projection(clip_states)
        return torch.where(clip_mask.bool()[..., None], image_tokens, self.clip_padding.to(image_tokens))

    def _rotary_emb_for_frames(self, image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None, grid_h: int,
                               grid_w: int, frames: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-frame RoPE table (given, or computed for this grid) checked and tiled over ``frames``, float32:
        every frame gets the same spatial table."""
        head_dim = self.config.attention_head_dim
        if image_rotary_emb is None:
            image_rotary_emb = rope_for_latent_grid(grid_h, grid_w, head_dim)
        cos, sin = (t.to(device, torch.float32) for t in image_rotary_emb)
        if cos.shape != (grid_h * grid_w, head_dim) or sin.shape != cos.shape:
            raise ValueError(
                f"image_rotary_emb must be a per-frame (cos, sin) pair of shape ({grid_h * grid_w}, "
                f"{head_dim}) for a {grid_h}x{grid_w} patch grid; got {tuple(cos.shape)}, "
                f"{tuple(sin.shape)}. Compute it with easyanimate.models.rope.rope_for_size(height_px, width_px, "
                f"{head_dim})."
            )
        return cos.repeat(frames, 1), sin.repeat(frames, 1)

    def _run_blocks(self, tokens: torch.Tensor, temb: torch.Tensor, text_tokens: torch.Tensor,
                    image_tokens: torch.Tensor | None, rotary_emb: tuple[torch.Tensor, torch.Tensor],
                    frames: int, start: int = 0, end: int | None = None,
                    skips: list[torch.Tensor] | None = None, frame_index: torch.Tensor | None = None) -> torch.Tensor:
        """Blocks ``start .. end - 1`` (default: all) with the U-ViT long skips: blocks ``0 .. L/2-2`` push their
        output onto ``skips``, blocks ``L/2+1 .. L-1`` pop one each (last in, first out), so block ``L-1-i``
        receives block ``i``'s output. ``skips`` holds what the blocks before ``start`` pushed. ``frame_index``: each
        token's latent frame when ``tokens`` are a slice (sequence parallelism)."""
        skips = [] if skips is None else skips
        num_layers = len(self.blocks)
        for layer in range(start, num_layers if end is None else end):
            block = self.blocks[layer]
            skip = skips.pop() if layer > num_layers // 2 else None
            args = (tokens, temb, text_tokens, image_tokens, rotary_emb, frames, skip, frame_index)
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                tokens = self._gradient_checkpointing_func(block, *args)
            else:
                tokens = block(*args)
            if layer < num_layers // 2 - 1:
                skips.append(tokens)
        return tokens

    def _run_blocks_cached(self, tokens: torch.Tensor, temb: torch.Tensor, text_tokens: torch.Tensor,
                           image_tokens: torch.Tensor | None, rotary_emb: tuple[torch.Tensor, torch.Tensor],
                           frames: int, cache: StepCache, frame_index: torch.Tensor | None = None,
                           measure=None) -> torch.Tensor:
        """The first block, then either every other block (refreshing the cache) or the cached residual.
        ``measure``: the cache's change measure (sequence parallelism: over every process's tokens)."""
        skips: list[torch.Tensor] = []
        first = self._run_blocks(tokens, temb, text_tokens, image_tokens, rotary_emb, frames, end=1, skips=skips,
                                 frame_index=frame_index)
        if cache.reuse(first, measure):
            return cache.cached_output(first)
        output = self._run_blocks(first, temb, text_tokens, image_tokens, rotary_emb, frames, start=1, skips=skips,
                                  frame_index=frame_index)
        cache.store(first, output)
        return output

    def _unpatchify(self, tokens: torch.Tensor, batch: int, frames: int, grid_h: int, grid_w: int) -> torch.Tensor:
        """``(B, F*S, p*p*out_channels)`` with each token's vector ordered ``(p_row, p_col, channel)`` ->
        ``(B, out_channels, F, grid_h*p, grid_w*p)``."""
        p = self.config.patch_size
        tokens = tokens.reshape(batch, frames, grid_h, grid_w, p, p, self.out_channels)
        return tokens.permute(0, 6, 1, 2, 4, 3, 5).reshape(batch, self.out_channels, frames, grid_h * p, grid_w * p)

    def _check_latents(self, hidden_states, inpaint_latents) -> None:
        """``ValueError`` naming the fix when the latents (and inpaint latents) do not fit the config."""
        cfg = self.config
        if hidden_states.ndim != 5:
            raise ValueError(
                f"hidden_states must be a 5D latent video (B, C, F, H, W); got shape {tuple(hidden_states.shape)}. "
                "For a single image use F = 1."
            )
        batch, channels, frames, height, width = hidden_states.shape
        if height % cfg.patch_size or width % cfg.patch_size:
            raise ValueError(
                f"latent height and width ({height}x{width}) must be multiples of patch_size {cfg.patch_size}: "
                f"use pixel sizes that are multiples of {8 * cfg.patch_size}."
            )
        if frames > MAX_LATENT_FRAMES:
            raise ValueError(f"at most {MAX_LATENT_FRAMES} latent frames are supported; got {frames}")
        extra = 0 if inpaint_latents is None else inpaint_latents.shape[1]
        if self.is_inpaint and inpaint_latents is None:
            raise ValueError(
                f"this is the image-to-video (InP) model (in_channels={cfg.in_channels}): pass inpaint_latents "
                f"(B, {cfg.in_channels - channels}, F, H, W) = [mask latents | masked-video latents]; for plain "
                "text-to-video pass zeros."
            )
        if channels + extra != cfg.in_channels:
            raise ValueError(
                f"the model takes {cfg.in_channels} input channels, got {channels} latent channels"
                + (f" + {extra} inpaint channels" if extra else "")
                + (" (the text-to-video model takes no inpaint_latents)" if not self.is_inpaint and extra else "")
            )
        if inpaint_latents is not None and (inpaint_latents.shape[0] != batch
                                            or inpaint_latents.shape[2:] != hidden_states.shape[2:]):
            raise ValueError(
                f"inpaint_latents {tuple(inpaint_latents.shape)} must match hidden_states "
                f"{tuple(hidden_states.shape)} in batch, frames, height and width"
            )

    def _check_conditioning(self, batch, encoder_hidden_states, text_embedding_mask, encoder_hidden_states_t5,
                            text_embedding_mask_t5, image_meta_size, clip_encoder_hidden_states,
                            clip_attention_mask) -> None:
        """``ValueError`` naming the fix when a conditioning input is missing or does not fit the config."""
        cfg = self.config
        for name, value in (("encoder_hidden_states", encoder_hidden_states), ("text_embedding_mask",
                            text_embedding_mask), ("encoder_hidden_states_t5", encoder_hidden_states_t5),
                            ("text_embedding_mask_t5", text_embedding_mask_t5), ("image_meta_size", image_meta_size)):
            if value is None:
                raise ValueError(f"{name} is required (or pass conditioning= from prepare_conditioning)")
        for name, states, mask, length, width_expected in (
            ("encoder_hidden_states", encoder_hidden_states, text_embedding_mask, cfg.text_len,
             cfg.cross_attention_dim),
            ("encoder_hidden_states_t5", encoder_hidden_states_t5, text_embedding_mask_t5, cfg.text_len_t5,
             cfg.cross_attention_dim_t5),
        ):
            if states.ndim != 3 or tuple(states.shape) != (batch, length, width_expected):
                raise ValueError(
                    f"{name} must have shape (B={batch}, {length}, {width_expected}); got {tuple(states.shape)}. "
                    f"The text length is fixed by the checkpoint: pad/truncate the tokenizer output to {length}."
                )
            if tuple(mask.shape) != (batch, length):
                raise ValueError(
                    f"the attention mask of {name} must have shape ({batch}, {length}); got {tuple(mask.shape)}"
                )
        if tuple(image_meta_size.shape) != (batch, 6):
            raise ValueError(
                f"image_meta_size must have shape ({batch}, 6) [orig_h, orig_w, target_h, target_w, crop_top, "
                f"crop_left]; got {tuple(image_meta_size.shape)}"
            )
        if self.is_inpaint:
            self._check_clip_inputs(batch, clip_encoder_hidden_states, clip_attention_mask)

    def _check_clip_inputs(self, batch, clip_encoder_hidden_states, clip_attention_mask) -> None:
        cfg = self.config
        if clip_encoder_hidden_states is None or clip_attention_mask is None:
            raise ValueError(
                "the image-to-video (InP) model needs clip_encoder_hidden_states (B, 256, 1024 for CLIP ViT-L/14) "
                f"and clip_attention_mask (B, {cfg.n_query}); with no reference image pass zeros for both."
            )
        tokens = clip_encoder_hidden_states.shape[1] if clip_encoder_hidden_states.ndim == 3 else 0
        if (
            clip_encoder_hidden_states.ndim != 3
            or clip_encoder_hidden_states.shape[0] != batch
            or clip_encoder_hidden_states.shape[2] != cfg.projection_dim
            or math.isqrt(tokens) ** 2 != tokens
        ):
            raise ValueError(
                f"clip_encoder_hidden_states must be (B={batch}, T, {cfg.projection_dim}) with T a square number "
                f"of patch tokens (CLS dropped); got {tuple(clip_encoder_hidden_states.shape)}"
            )
        if tuple(clip_attention_mask.shape) != (batch, cfg.n_query):
            raise ValueError(
                f"clip_attention_mask must have shape ({batch}, {cfg.n_query}); got {tuple(clip_attention_mask.shape)}"
            )

    # ------------------------------------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls,
        path,
        subfolder: str | None = None,
        torch_dtype: torch.dtype | None = None,
        adapt_channels: bool = False,
        **config_overrides,
    ) -> "HunyuanTransformer3DModel":
        """Load ``path[/subfolder]`` (``config.json`` + ``diffusion_pytorch_model.safetensors`` or ``.bin``) strictly.

        ``config_overrides`` replace config.json values. A config without the V4 inference keys gives the V4
        model (they default to the V4 values). Any missing, unexpected or wrongly shaped key is a
        :class:`CheckpointError` listing them.

        ``adapt_channels=True`` loads a checkpoint made for other input/output channel counts, e.g. a 4-channel
        HunyuanDiT or text-to-video checkpoint into the 12-channel InP model, to start training (the original's
        ``from_pretrained_2d`` does this):

        * extra *input* channels of ``pos_embed.proj`` are zero-filled (the new inputs start with no effect);
          fewer input channels keep the first ones;
        * extra *output* channels of ``proj_out`` keep their random init; fewer keep the first ones. This is done
          per patch position (rows are ordered ``(p_row, p_col, channel)``); the original copied a flat row
          prefix, which mixes patch positions when the counts differ;
        * keys absent from the checkpoint are allowed only for the CLIP image branch and the fixed
          ``t_embed.pe`` tables, and keep their init.

        What was changed is logged as a warning and stored in ``model.channel_adaptation``
        (:class:`ChannelAdaptation`).
        """
        reports = []

        def adapt(model, state_dict):
            state_dict, report = adapt_checkpoint_channels(model, state_dict)
            reports.append(report)
            return state_dict

        model = load_model_from_folder(
            cls, path, subfolder, torch_dtype=torch_dtype, config_overrides=config_overrides,
            adapt=adapt if adapt_channels else None,
        )
        if adapt_channels:
            logger.warning("%s: adapted checkpoint %s to the model:\n%s", cls.__name__, path, reports[0].summary())
            model.channel_adaptation = reports[0]
        return model


def _is_init_only_key(key: str) -> bool:
    """Keys a checkpoint made for another variant may lack: the CLIP image branch and fixed frame tables."""
    parts = key.split(".")
    if parts[0] in ("clip_padding", "clip_projection"):
        return True
    return parts[0] == "blocks" and (
        parts[2] in ("norm_clip", "attn_clip", "gate_clip", "norm_clip_out") or key.endswith(".t_embed.pe")
    )


def adapt_checkpoint_channels(
    model: HunyuanTransformer3DModel, state_dict: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], ChannelAdaptation]:
    """Fit ``state_dict`` to ``model``'s input/output channel counts (see ``from_pretrained(adapt_channels=True)``).

    Returns the adapted state dict (complete for ``model`` where allowed) and what was changed. Mismatches other
    than these channel counts are left in place, so the strict load that follows reports them.
    """
    report = ChannelAdaptation()
    own = model.state_dict()
    state_dict = dict(state_dict)

    key = "pos_embed.proj.weight"
    if key in state_dict and state_dict[key].ndim == 4 and state_dict[key].shape[1] != own[key].shape[1]:
        ckpt, target = state_dict[key], own[key]
        have, want = ckpt.shape[1], target.shape[1]
        if want > have:
            adapted = torch.zeros(target.shape, dtype=ckpt.dtype)
            adapted[:, :have] = ckpt
            report.zero_filled.append(f"{key} input channels {have}..{want - 1}")
        else:
            adapted = ckpt[:, :want].clone()
            report.truncated.append(f"{key} input channels {want}..{have - 1}")
        state_dict[key] = adapted

    p = model.config.patch_size
    for key in ("proj_out.weight", "proj_out.bias"):
        if key not in state_dict or state_dict[key].shape[0] == own[key].shape[0]:
            continue
        ckpt, target = state_dict[key], own[key]
        if ckpt.shape[0] % (p * p) or ckpt.shape[1:] != target.shape[1:]:
            continue  # not a channel-count difference: the strict load reports it
        have, want = ckpt.shape[0] // (p * p), target.shape[0] // (p * p)
        shared = min(have, want)
        adapted = target.clone().reshape(p * p, want, *target.shape[1:])
        adapted[:, :shared] = ckpt.reshape(p * p, have, *ckpt.shape[1:])[:, :shared].to(adapted.dtype)
        state_dict[key] = adapted.reshape(target.shape)
        if want > have:
            report.left_random.append(f"{key} output channels {have}..{want - 1} (at every patch position)")
        else:
            report.truncated.append(f"{key} output channels {want}..{have - 1}")

    for key in sorted(set(own) - set(state_dict)):
        if _is_init_only_key(key):
            state_dict[key] = own[key]
            report.left_at_init.append(key)
    return state_dict, report
