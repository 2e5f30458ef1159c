"""The EasyAnimate V4 pipeline: text-to-video, text-to-image, image-to-video and video-to-video in one class.

    pipe = EasyAnimatePipeline.from_pretrained("models/EasyAnimateV4-XL-2-InP")
    video = pipe("a cat", height=384, width=672, video_length=48).videos      # (B, 3, F, H, W) in [0, 1]

The V4 "InP" model runs every kind through one inpainting call: text-to-video is an all-zero conditioning video with
an all-255 ("generate everything") mask, image-to-video keeps the start (and end) frames, video-to-video noises an
encoded video part of the way (``strength``). One call: check the inputs -> encode the prompts (BERT, mT5) ->
timesteps (cut by ``strength``) -> initial latents -> step-invariant conditioning (inpaint latents, CLIP image tokens,
rotary tables, size and style) -> the denoising loop, the classifier-free-guidance rows in one transformer call per
step -> VAE decode to [0, 1]. Loading a model folder lives in :mod:`easyanimate.inference.loading`, long videos in
:mod:`easyanimate.inference.long_video`, the request layer every front end uses in :mod:`easyanimate.inference`.

Where this differs from the original, a one-line note says so at the place: seeded VAE posterior samples, ``latents``
with ``strength < 1``, sizes and frame counts that are rejected instead of floored, offload of the CLIP Resampler.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import PIL.Image
import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    PNDMScheduler,
)
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from easyanimate.models.step_cache import StepCache, StepCacheSettings
from easyanimate.models.transformer import StepConditioning

logger = logging.getLogger(__name__)

# Sampler names as the original's scripts and UI spell them.
SAMPLERS = {
    "Euler": EulerDiscreteScheduler,
    "Euler A": EulerAncestralDiscreteScheduler,
    "DPM++": DPMSolverMultistepScheduler,
    "PNDM": PNDMScheduler,
    "DDIM": DDIMScheduler,
    "LCM": LCMScheduler,  # for a model with an LCM-LoRA (train.py --lcm_distillation): 2-8 steps, guidance 1
}

# Modules that read their children's weights without calling them; sequential offload must load them as a whole.
PRELOAD_MODULE_CLASSES = ["MultiheadAttention", "HunyuanDiTAttentionPool"]

# The original decodes the first 140 mT5 ids back to text and tokenizes that text again: it caps a prompt at ~140
# pieces and normalises it (e.g. full-width punctuation). The released weights were trained on such tokens.
T5_ROUND_TRIP_LENGTH = 140
KNOWN_FRAMES = 3  # frames the image-to-video helper marks as known for a start (and an end) image


def text_lengths(transformer) -> tuple[int, int]:
    """Token counts the transformer's text inputs must have: BERT ``text_len`` and mT5 ``text_len_t5``."""
    return int(transformer.config.text_len), int(transformer.config.text_len_t5)


@dataclass
class EasyAnimatePipelineOutput(BaseOutput):
    """``videos``: (B, 3, F, H, W) float32 in [0, 1] on the CPU (or the final latents for ``output_type="latent"``);
    ``transformer_evaluations``: the denoising steps that ran every transformer block (all of them unless the step
    cache reused some; summed over the chunks of a long video)."""

    videos: torch.Tensor
    transformer_evaluations: int | None = None


@dataclass
class StepInputs:
    """What the transformer is given at every step besides the latents and the timestep, computed once per call.

    Rows are [unconditional, conditional] under classifier-free guidance. ``conditioning`` carries the CLIP image
    tokens (InP model); ``conditioning_without_clip`` the all-padding image tokens of the steps before
    ``clip_apply_ratio`` takes effect. ``embeds`` are the BERT states, for callbacks.
    """

    embeds: torch.Tensor
    conditioning: StepConditioning
    inpaint_latents: torch.Tensor | None = None
    conditioning_without_clip: StepConditioning | None = None

    def transformer_kwargs(self, use_clip: bool) -> dict[str, Any]:
        """Keyword arguments of one step's transformer call."""
        conditioning = self.conditioning
        if not use_clip and self.conditioning_without_clip is not None:
            conditioning = self.conditioning_without_clip
        kwargs: dict[str, Any] = dict(conditioning=conditioning)
        if self.inpaint_latents is not None:
            kwargs["inpaint_latents"] = self.inpaint_latents
        return kwargs


def _load_pil(image) -> PIL.Image.Image:
    if isinstance(image, (str, os.PathLike)):
        if not Path(image).is_file():
            raise FileNotFoundError(f"image file not found: {image}")
        image = PIL.Image.open(image)
    if not isinstance(image, PIL.Image.Image):
        raise TypeError(f"expected a PIL image or an image path, got {type(image).__name__}")
    return image.convert("RGB")


def _pil_to_frame(image: PIL.Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, H, W) uint8


def build_image_to_video_inputs(image, end_image, video_length: int, height: int, width: int):
    """The conditioning of image-to-video, as the original's ``get_image_to_video_latent`` builds it.

    ``image`` is one start image (PIL or path) or a list of k start frames; ``end_image`` likewise (optional).
    Returns ``(video, mask_video, clip_image)``: video (1, 3, F, H, W) float32 in [0, 1] with the start image tiled
    over all frames (a list fills frames 0..k-1 and tiles its first image), the end image(s) on the last 3 (or k)
    frames; mask (1, 1, F, H, W) uint8 with 0 on known frames and 255 elsewhere; the CLIP image is the first start
    image resized to the sample size. Images are resized with PIL's default filter to (width, height).
    """

    starts = [_load_pil(i).resize((width, height)) for i in _image_list(image)]
    n_start = min(len(starts) if isinstance(image, (list, tuple)) else KNOWN_FRAMES, video_length)
    frames = [_pil_to_frame(starts[0])] * video_length
    known = torch.zeros(video_length, dtype=torch.bool)
    for i in range(n_start):
        frames[i] = _pil_to_frame(starts[min(i, len(starts) - 1)])
        known[i] = True
    if end_image is not None:
        ends = [_load_pil(i).resize((width, height)) for i in _image_list(end_image)]
        n_end = min(len(ends) if isinstance(end_image, (list, tuple)) else KNOWN_FRAMES, video_length)
        for j in range(n_end):
            frames[video_length - n_end + j] = _pil_to_frame(ends[min(j, len(ends) - 1)])
            known[video_length - n_end + j] = True
    video = torch.stack(frames, dim=1)[None].float() / 255.0  # (1, 3, F, H, W)
    mask = torch.where(known, 0, 255).to(torch.uint8).view(1, 1, video_length, 1, 1)
    return video, mask.expand(1, 1, video_length, height, width).contiguous(), starts[0]


def _image_list(images) -> list:
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    if not images:
        raise ValueError("image/end_image: got an empty list of images")
    return images


class EasyAnimatePipeline(DiffusionPipeline):
    """EasyAnimate V4 generation: text/image/video to video (and image) with the Hunyuan-DiT based 3D transformer.

    Components: ``transformer`` (HunyuanTransformer3DModel), ``vae`` (AutoencoderKLMagvit), ``text_encoder``
    (BertModel) + ``tokenizer``, ``text_encoder_2`` (T5EncoderModel) + ``tokenizer_2``, ``scheduler`` and, for
    the image-to-video "InP" model, ``image_encoder`` (CLIPVisionModelWithProjection) + ``image_processor``.
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->image_encoder->transformer->vae"
    _optional_components = ["image_encoder", "image_processor"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        vae,
        transformer,
        text_encoder,
        tokenizer,
        text_encoder_2,
        tokenizer_2,
        scheduler,
        image_encoder=None,
        image_processor=None,
    ):
        super().__init__()
        self.register_modules(
            vae=vae,
            transformer=transformer,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            scheduler=scheduler,
            image_encoder=image_encoder,
            image_processor=image_processor,
        )
        # the scheduler's own config keys; set_sampler builds every other sampler from them
        self._sampler_config = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
        self.sampler = next((n for n, c in SAMPLERS.items() if isinstance(scheduler, c)), type(scheduler).__name__)
        self.vae_posterior = "sample"  # "sample" (the original) or "mode" (posterior mean) for conditioning encodes
        self.step_cache: StepCacheSettings | None = None  # the default of every call; see enable_step_cache

    # ------------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, model_dir, torch_dtype: torch.dtype | None = None, sampler: str = "Euler", device=None):
        """Load a model folder in the released layout (see :mod:`easyanimate.inference.loading`).

        ``torch_dtype=None`` picks bf16 on GPUs that support it, else fp16 (with the VAE kept in fp32); on a CPU
        bf16 where it has bf16 matrix instructions, else fp32 (:func:`~easyanimate.inference.loading.default_dtype`).
        ``device`` defaults to CUDA when available. Every component is loaded strictly; a missing or broken one
        raises :class:`~easyanimate.utils.weights.CheckpointError` naming its folder.
        """
        from easyanimate.inference.loading import default_dtype, load_components, read_scheduler_config, resolve_device

        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; valid samplers: {', '.join(map(repr, SAMPLERS))}")
        device = resolve_device(device)
        pipe = cls(**load_components(model_dir, torch_dtype or default_dtype(device), sampler))
        pipe._sampler_config = read_scheduler_config(model_dir)
        return pipe if device.type == "cpu" else pipe.to(device)  # components are loaded on the CPU

    # ------------------------------------------------------------------------------------------------ samplers
    def set_sampler(self, name: str) -> None:
        """Choose the sampler by the original's name: "Euler", "Euler A", "DPM++", "PNDM" or "DDIM", or "LCM" for
        a model with an LCM-LoRA. Each is built from the folder's scheduler config; keys a class does not know take
        that class's defaults."""
        self.scheduler = make_scheduler(name, self._sampler_config)
        self.sampler = name

    # ------------------------------------------------------------------------------------------ memory / speed
    def enable_sequential_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str | None = None):
        """Keep every weight on the CPU and stream each leaf module to the accelerator for its forward.

        The Resampler's ``nn.MultiheadAttention`` reads ``out_proj.weight`` directly instead of calling
        ``out_proj``, and the T5 attention pool (diffusers ``HunyuanDiTAttentionPool``) reads its q/k/v/c
        projection weights the same way, so per-leaf hooks never load them; these modules are hooked to load all
        their weights at once (accelerate's ``preload_module_classes``) instead of being pinned to the GPU as the
        original does for the Resampler."""
        from accelerate import cpu_offload
        from accelerate.hooks import remove_hook_from_module

        super().enable_sequential_cpu_offload(gpu_id=gpu_id, device=device)
        execution_device = self._offload_device
        if execution_device.type == "cpu":
            # diffusers names the device "cpu:0", which accelerate's parameter re-wrapping rejects; with plain "cpu"
            # the hooks work, which lets the offload path be exercised on machines without an accelerator.
            execution_device = torch.device("cpu")
        for name, module in self.components.items():
            if not isinstance(module, torch.nn.Module):
                continue
            if name != "transformer" and execution_device == self._offload_device:
                continue  # diffusers' hooks are fine for models without weight-reading parents
            remove_hook_from_module(module, recurse=True)
            cpu_offload(module, execution_device, offload_buffers=len(module._parameters) > 0,
                        preload_module_classes=PRELOAD_MODULE_CLASSES)

    def enable_step_cache(self, threshold: float | None = None, skip_start_steps: int | None = None) -> None:
        """Let later calls skip the transformer blocks after the first on steps where the first block's output has
        changed little since the last full step (accumulated relative change below ``threshold``); the first
        ``skip_start_steps`` steps and the last always run in full. Without arguments: the recommended values
        (:mod:`easyanimate.models.step_cache`). Each call starts with an empty cache and reports how many steps ran
        every block (``transformer_evaluations`` of its output)."""
        from easyanimate.models.step_cache import RECOMMENDED_SKIP_START_STEPS, RECOMMENDED_THRESHOLD

        self.step_cache = StepCacheSettings(
            RECOMMENDED_THRESHOLD if threshold is None else threshold,
            RECOMMENDED_SKIP_START_STEPS if skip_start_steps is None else skip_start_steps,
        )

    def disable_step_cache(self) -> None:
        """Run every transformer block at every step (the default)."""
        self.step_cache = None

    def _new_step_cache(self, settings: StepCacheSettings | bool | None, num_steps: int) -> StepCache | None:
        """A fresh cache for one call (nothing is carried over between calls), or None when caching is off."""
        if settings is None:
            settings = self.step_cache
        if settings is False or settings is None:
            return None
        if not isinstance(settings, StepCacheSettings):
            raise TypeError(f"step_cache must be StepCacheSettings, False or None, got {type(settings).__name__}")
        return StepCache(settings, num_steps)

    def enable_vae_tiling(self) -> None:
        """Encode/decode in overlapping spatial tiles (lower peak memory for large frames)."""
        self.vae.enable_tiling()

    def disable_vae_tiling(self) -> None:
        self.vae.disable_tiling()

    def _release(self, *modules) -> None:
        """Under model CPU offload, move finished models back to the CPU now. The hook chain only offloads a model
        when the *next* one in the chain runs, so a model that is skipped (no CLIP image) or run out of order (the
        VAE encodes conditioning before the transformer) would otherwise stay on the accelerator."""
        for module in modules:
            hook = getattr(module, "_hf_hook", None)
            if hook is not None and type(hook).__name__ == "CpuOffload":
                module.to("cpu")

    # -------------------------------------------------------------------------------------------------- LoRA
    def load_lora(self, path, strength: float = 1.0) -> None:
        """Merge a LoRA file (the original's ``lora_unet__…``/``lora_te_…`` format) into the weights."""
        from easyanimate import lora

        lora.merge_lora(self, path, strength)
        self._loras = getattr(self, "_loras", []) + [(path, strength)]

    def unload_lora(self) -> None:
        """Subtract every merged LoRA again, newest first."""
        from easyanimate import lora

        for path, strength in reversed(getattr(self, "_loras", [])):
            lora.unmerge_lora(self, path, strength)
        self._loras = []

    # ---------------------------------------------------------------------------------------------- prompts
    @property
    def is_inpaint(self) -> bool:
        """True for the image-to-video (InP) model: it takes inpaint latents and CLIP image tokens."""
        return bool(self.transformer.is_inpaint)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def frame_multiple(self) -> int:
        """Frames per VAE encoder chunk: a video must have 1 frame or a multiple of this many."""
        return int(getattr(self.vae.config, "mini_batch_encoder", 8))

    def tokenize_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Token ids and masks for both encoders, as the original builds them.

        Lengths are the transformer's ``text_len`` / ``text_len_t5`` (its padding table is built for them; the
        released model: 77 and 256, which the original hard-codes). BERT: padded and truncated. mT5: the original
        decodes the first 140 ids (special tokens skipped) and tokenizes that text again, which caps a 256-token
        prompt at ~140 pieces and normalises the text (e.g. full-width punctuation). Returns ``input_ids``,
        ``attention_mask``, ``input_ids_2``, ``attention_mask_2`` and ``input_ids_2_first_pass``."""
        padded = dict(padding="max_length", truncation=True, return_tensors="pt")
        bert_length, t5_length = text_lengths(self.transformer)
        bert = self.tokenizer(prompts, max_length=bert_length, **padded)
        first = self.tokenizer_2(prompts, max_length=t5_length, **padded)
        texts = self.tokenizer_2.batch_decode(first.input_ids[:, :T5_ROUND_TRIP_LENGTH], skip_special_tokens=True)
        t5 = self.tokenizer_2(texts, max_length=t5_length, **padded)
        return {
            "input_ids": bert.input_ids,
            "attention_mask": bert.attention_mask,
            "input_ids_2": t5.input_ids,
            "attention_mask_2": t5.attention_mask,
            "input_ids_2_first_pass": first.input_ids,
        }

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], device: torch.device):
        """Last hidden states of BERT (B, 77, D1) and mT5 (B, 256, D2) in the transformer dtype, with the masks."""
        tokens = self.tokenize_prompts(prompts)
        ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
        ids_2, mask_2 = tokens["input_ids_2"].to(device), tokens["attention_mask_2"].to(device)
        dtype = self.transformer.dtype
        embeds = self.text_encoder(ids, attention_mask=mask)[0].to(dtype)
        embeds_2 = self.text_encoder_2(ids_2, attention_mask=mask_2)[0].to(dtype)
        return embeds, mask, embeds_2, mask_2

    # ------------------------------------------------------------------------------------------- validation
    def check_inputs(self, prompts, negative_prompts, height, width, video_length, num_inference_steps, strength,
                     video, mask_video, clip_image, clip_apply_ratio, output_type):
        """Raise ``ValueError`` (``TypeError`` for a wrong type) naming the first argument of a call that cannot
        work, and how to fix it, before any model runs. Sizes and frame counts the original silently floors are
        refused with the nearest valid values, and a ``video`` the call would ignore is an error."""
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompt must be a string or a non-empty list of strings")
        if negative_prompts is not None and len(negative_prompts) != len(prompts):
            raise ValueError(
                f"negative_prompt: got {len(negative_prompts)} for {len(prompts)} prompts; give one or one per prompt"
            )
        for name, size in (("height", height), ("width", width)):
            if not isinstance(size, int) or size <= 0 or size % 16:
                near = max(16, int(size) // 16 * 16) if isinstance(size, (int, float)) and size > 0 else 16
                raise ValueError(f"{name} must be a positive multiple of 16, got {size!r} (try {near} or {near + 16})")
        m = self.frame_multiple
        if not isinstance(video_length, int) or video_length < 1 or (video_length != 1 and video_length % m):
            near = max(m, int(video_length) // m * m) if isinstance(video_length, (int, float)) else m
            raise ValueError(
                f"video_length must be 1 (an image) or a multiple of {m} (the VAE's temporal chunk), "
                f"got {video_length!r} (try {near} or {near + m})"
            )
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        if strength < 1.0 and int(num_inference_steps * strength) < 1:
            raise ValueError(
                f"strength {strength} with {num_inference_steps} steps runs no step; "
                "raise strength or num_inference_steps"
            )
        if not 0.0 <= clip_apply_ratio <= 1.0:
            raise ValueError(f"clip_apply_ratio must be in [0, 1], got {clip_apply_ratio}")
        if output_type not in ("pt", "np", "latent"):
            raise ValueError(f"output_type must be 'pt', 'np' or 'latent', got {output_type!r}")
        if strength < 1.0 and video is None:
            raise ValueError("strength < 1 (video-to-video) needs a video= to start from")
        if strength == 1.0 and video is not None and mask_video is None:
            raise ValueError(
                "video= with strength 1 and no mask_video would be ignored: pass strength < 1 for video-to-video, or a "
                "mask_video marking the pixels to keep (0) and to generate (255)"
            )
        batch = len(prompts)
        for name, value, channels in (("video", video, 3), ("mask_video", mask_video, 1)):
            if value is None:
                continue
            if not isinstance(value, torch.Tensor):
                raise TypeError(
                    f"{name} must be a torch.Tensor of shape (B, {channels}, F, H, W), got {type(value).__name__}"
                )
            expected = (channels, video_length, height, width)
            if value.ndim != 5 or tuple(value.shape[1:]) != expected or value.shape[0] not in (1, batch):
                raise ValueError(
                    f"{name} must have shape (1 or {batch}, {channels}, {video_length}, {height}, {width}) "
                    f"(batch, channels, frames, height, width), got {tuple(value.shape)}; "
                    "resize it to the requested size and frame count first"
                )
        if mask_video is not None and video is None:
            raise ValueError("mask_video was given without video=; the mask marks which pixels of the video to keep")
        if video is not None and video.is_floating_point() and (video.min() < 0 or video.max() > 1):
            raise ValueError(f"video values must lie in [0, 1], got [{video.min():.3g}, {video.max():.3g}]")
        if not self.is_inpaint:
            if clip_image is not None:
                raise ValueError("clip_image needs the image-to-video (InP) model; this transformer has no CLIP branch")
            if mask_video is not None and bool((mask_video < 0.5).any()):
                raise ValueError(
                    "keeping known frames (mask_video with zeros, image=/end_image=) needs the image-to-video (InP) "
                    "model; this transformer only does text-to-video and video-to-video"
                )
        if clip_image is not None and self.image_encoder is None:
            raise ValueError("clip_image was given but the pipeline has no image_encoder (image_encoder/ folder)")

    def latent_shape(self, batch: int, height: int, width: int, video_length: int) -> tuple[int, ...]:
        frames = 1 if video_length == 1 else video_length // int(self.vae.temporal_compression_ratio)
        s = int(self.vae.spatial_compression_ratio)
        return (batch, self.latent_channels, frames, height // s, width // s)

    # ------------------------------------------------------------------------------------------ conditioning
    def _encode_video(self, pixels: torch.Tensor, generator) -> torch.Tensor:
        """VAE-encode (B, 3, F, H, W) pixels in [-1, 1], one sample at a time as the original, × scaling_factor.
        ``vae_posterior`` chooses the posterior mean ("mode") or a sample drawn from ``generator``."""
        if self.vae_posterior not in ("sample", "mode"):
            raise ValueError(f"vae_posterior must be 'sample' or 'mode', got {self.vae_posterior!r}")
        out = []
        for i in range(pixels.shape[0]):
            dist = self.vae.encode(pixels[i : i + 1].to(self.vae.dtype)).latent_dist
            if self.vae_posterior == "mode":
                out.append(dist.mode())
            else:
                out.append(dist.sample(generator[i] if isinstance(generator, list) else generator))
        return torch.cat(out) * self.vae.config.scaling_factor

    def prepare_latents(self, shape, dtype, device, generator, latents, video, latent_timestep):
        """Initial latents. Pure noise (or the given ``latents``) × ``init_noise_sigma``; with a ``latent_timestep``
        (strength < 1) the encoded video noised to that timestep instead, without the sigma factor.

        With strength < 1 and explicit ``latents`` the original ignores the video (a bug); here ``latents`` is
        used as the noise that is added to the encoded video."""
        if latent_timestep is None:
            if latents is None:
                latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
            return latents.to(device, dtype) * self.scheduler.init_noise_sigma
        noise = latents.to(device, torch.float32) if latents is not None else randn_tensor(
            shape, generator=generator, device=device, dtype=torch.float32
        )
        video_latents = self._encode_video(video.to(device) * 2 - 1, generator).to(torch.float32)
        if video_latents.shape[0] != shape[0]:
            video_latents = video_latents.expand(shape[0], *video_latents.shape[1:])
        self._release(self.vae)
        return self.scheduler.add_noise(video_latents, noise, latent_timestep.reshape(1)).to(dtype)

    def prepare_inpaint_latents(self, video, mask_video, shape, dtype, device, generator):
        """The 8 extra input channels of the InP transformer: [mask latents (4) ‖ masked-video latents (4)].

        Mask values are binarised at 0.5 (so 0/255 and 0/1 masks both work; 1 = generate, 0 = keep). If nothing is
        kept (text-to-video, video-to-video) the channels are zeros and the VAE is not run, as in the original.
        Otherwise the {0, 1} mask itself (tiled to 3 channels, not rescaled) and the video with generated pixels set
        to -1 are VAE-encoded."""
        batch, _, frames, h, w = shape
        if video is None or mask_video is None or bool((mask_video >= 0.5).all()):
            return torch.zeros(batch, 2 * self.latent_channels, frames, h, w, device=device, dtype=dtype)
        n = max(video.shape[0], mask_video.shape[0])
        mask = (mask_video.to(device) >= 0.5).to(torch.float32).expand(n, -1, -1, -1, -1)
        pixels = video.to(device, torch.float32).expand(n, -1, -1, -1, -1) * 2 - 1
        masked_video = torch.where(mask > 0.5, torch.full_like(pixels, -1.0), pixels)
        mask_latents = self._encode_video(mask.expand(-1, 3, -1, -1, -1), generator)
        video_latents = self._encode_video(masked_video, generator)
        self._release(self.vae)
        inpaint = torch.cat([mask_latents, video_latents], dim=1).to(dtype)
        return inpaint.expand(batch, *inpaint.shape[1:]) if inpaint.shape[0] != batch else inpaint

    @torch.no_grad()
    def encode_clip_image(self, clip_image, batch: int, device, dtype):
        """CLIP vision patch tokens (B, N, D) of the conditioning image (``last_hidden_state`` without CLS), or
        None. One image is shared by the whole batch; a list gives one per prompt."""
        if clip_image is None:
            return None
        images = clip_image if isinstance(clip_image, (list, tuple)) else [clip_image]
        images = [_load_pil(i) for i in images]
        if len(images) not in (1, batch):
            raise ValueError(f"clip_image: got {len(images)} images for {batch} prompts; give one or one per prompt")
        pixels = self.image_processor(images=images, return_tensors="pt").pixel_values
        pixels = pixels.to(device, self.image_encoder.dtype)
        tokens = self.image_encoder(pixels).last_hidden_state[:, 1:].to(dtype)
        return tokens.expand(batch, -1, -1) if tokens.shape[0] != batch else tokens

    def _clip_token_count(self) -> int:
        if self.image_encoder is not None:
            cfg = self.image_encoder.config
            return (cfg.image_size // cfg.patch_size) ** 2
        return 256  # CLIP ViT-L/14 at 224 px; only shapes the all-padding input of models without an image encoder

    # ----------------------------------------------------------------------------------------------- the call
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        height: int = 384,
        width: int = 672,
        video_length: int = 144,
        num_inference_steps: int = 25,
        guidance_scale: float = 7.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        video: torch.Tensor | None = None,
        mask_video: torch.Tensor | None = None,
        clip_image=None,
        strength: float = 1.0,
        image=None,
        end_image=None,
        num_videos_per_prompt: int = 1,
        eta: float = 0.0,
        guidance_rescale: float = 0.0,
        clip_apply_ratio: float = 0.4,
        original_size: tuple[int, int] = (1024, 1024),
        crops_coords_top_left: tuple[int, int] = (0, 0),
        output_type: str = "pt",
        callback_on_step_end: Callable[["EasyAnimatePipeline", int, Any, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        step_cache: StepCacheSettings | bool | None = None,
    ) -> EasyAnimatePipelineOutput:
        """Generate videos (or, with ``video_length=1``, images).

        Args:
            prompt / negative_prompt: text (English or Chinese); a list for a batch. The negative prompt defaults
                to "" and is used when ``guidance_scale > 1`` (classifier-free guidance, [negative, positive]).
            height, width: pixels, multiples of 16. video_length: 1 or a multiple of the VAE chunk (8).
            num_inference_steps, guidance_scale, eta (DDIM), guidance_rescale: as in diffusers.
            generator: seeds the initial noise, ancestral sampler noise and (``vae_posterior="sample"``) VAE samples.
            latents: initial noise of the latent shape, multiplied by the sampler's ``init_noise_sigma``.
            video: conditioning video (B or 1, 3, F, H, W), float in [0, 1] or uint8. With ``strength < 1`` it is
                encoded and noised (video-to-video, ``int(steps * strength)`` steps run). With ``mask_video`` its
                kept pixels condition the InP model.
            mask_video: (B or 1, 1, F, H, W); values < 0.5 keep the pixel, >= 0.5 (e.g. 255) generate it.
            clip_image: PIL image (or path) whose CLIP features condition the InP model in the last
                ``clip_apply_ratio`` of the steps.
            image / end_image: convenience for image-to-video: builds video, mask and clip_image as the original's
                helper (start image on the first 3 frames, end image on the last 3).
            num_videos_per_prompt: videos per prompt (the prompt list is repeated).
            original_size, crops_coords_top_left: the meta-size conditioning (default as the original).
            output_type: "pt" (tensor), "np" (numpy array), or "latent" (final latents, not decoded).
            callback_on_step_end: ``fn(pipe, step, timestep, kwargs) -> dict`` after each step; ``kwargs`` holds
                the tensors named in ``callback_on_step_end_tensor_inputs``; returned entries replace them.
            step_cache: :class:`~easyanimate.models.step_cache.StepCacheSettings` to let steps whose transformer
                output barely changes reuse the last full step's (see :meth:`enable_step_cache`); False for none;
                None (default) as set by :meth:`enable_step_cache` / :meth:`disable_step_cache`.

        Every input is checked before any model runs; a bad one raises ``ValueError`` naming it and the fix.
        """
        prompts, negatives = _as_prompt_lists(prompt, negative_prompt)
        if num_videos_per_prompt < 1:
            raise ValueError(f"num_videos_per_prompt must be >= 1, got {num_videos_per_prompt}")
        video, mask_video, clip_image = self._conditioning_video(image, end_image, video, mask_video, clip_image,
                                                                 video_length, height, width)
        for name in callback_on_step_end_tensor_inputs:
            if name not in self._callback_tensor_inputs:
                raise ValueError(
                    f"callback_on_step_end_tensor_inputs: {name!r} is not one of {self._callback_tensor_inputs}"
                )
        self.check_inputs(prompts, negatives, height, width, video_length, num_inference_steps, strength, video,
                          mask_video, clip_image, clip_apply_ratio, output_type)
        if num_videos_per_prompt > 1:
            prompts, negatives, video, mask_video = _repeat_per_prompt(num_videos_per_prompt, prompts, negatives,
                                                                       video, mask_video)
        batch = len(prompts)
        shape = self.latent_shape(batch, height, width, video_length)
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(
                f"latents must have shape {shape} for this size and frame count, got {tuple(latents.shape)}"
            )
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"generator: got a list of {len(generator)} for a batch of {batch}")

        device, dtype, do_cfg = self._execution_device, self.transformer.dtype, guidance_scale > 1.0
        # under classifier-free guidance the rows are [negative, positive], encoded in one call per encoder; without
        # a negative prompt the unconditional row encodes the empty text
        texts = ((negatives or [""] * batch) + prompts) if do_cfg else prompts
        embeds, mask, embeds_2, mask_2 = self.encode_prompt(texts, device)
        self._release(self.text_encoder, self.text_encoder_2)
        timesteps, latent_timestep = self._timesteps(num_inference_steps, strength, device)
        latents = self.prepare_latents(shape, dtype, device, generator, latents, video, latent_timestep)
        inpaint_latents = clip_tokens = clip_mask = None
        if self.is_inpaint:  # after the latents: both draw from ``generator``, in the original's order
            inpaint_latents = self.prepare_inpaint_latents(video, mask_video, shape, dtype, device, generator)
            inpaint_latents = torch.cat([inpaint_latents] * 2) if do_cfg else inpaint_latents
            clip_tokens, clip_mask = self._clip_inputs(clip_image, batch, device, dtype, do_cfg)
            self._release(self.image_encoder)
        rows = 2 * batch if do_cfg else batch
        meta, style = self._size_and_style(rows, height, width, original_size, crops_coords_top_left, device, dtype)
        prepare = functools.partial(
            self.transformer.prepare_conditioning, embeds, mask, embeds_2, mask_2, meta, style,
            image_rotary_emb=self._rotary_embedding(height, width, device), latent_shape=(rows, *shape[2:]),
        )
        inputs = StepInputs(embeds, prepare(clip_tokens, clip_mask), inpaint_latents)
        inputs.conditioning_without_clip = inputs.conditioning.without_clip()

        cache = self._new_step_cache(step_cache, len(timesteps))
        latents = self._denoise(latents, timesteps, inputs, guidance_scale, guidance_rescale, clip_apply_ratio,
                                self._extra_step_kwargs(generator, eta), callback_on_step_end,
                                callback_on_step_end_tensor_inputs, cache)
        self._release(self.transformer)
        evaluations = cache.full_evaluations if cache is not None else len(timesteps)
        if cache is not None:
            logger.info("step cache: %d of %d steps ran every transformer block", evaluations, len(timesteps))
        if output_type == "latent":
            self.maybe_free_model_hooks()
            return EasyAnimatePipelineOutput(videos=latents, transformer_evaluations=evaluations)
        videos = self.decode_latents(latents)
        self.maybe_free_model_hooks()
        return EasyAnimatePipelineOutput(videos=videos.numpy() if output_type == "np" else videos,
                                         transformer_evaluations=evaluations)

    def _conditioning_video(self, image, end_image, video, mask_video, clip_image, video_length, height, width):
        """``(video, mask_video, clip_image)``: built from ``image`` / ``end_image`` for image-to-video (see
        :func:`build_image_to_video_inputs`), else as given, with an 8-bit video scaled to [0, 1]."""
        if image is not None or end_image is not None:
            if image is None:
                raise ValueError("end_image needs a start image= as well")
            if video is not None or mask_video is not None or clip_image is not None:
                raise ValueError("give either image=/end_image= or video=/mask_video=/clip_image=, not both")
            if not self.is_inpaint:
                raise ValueError("image-to-video (image=) needs the InP model; this transformer has no image input")
            video, mask_video, clip_image = build_image_to_video_inputs(image, end_image, video_length, height, width)
        if isinstance(video, torch.Tensor) and video.dtype == torch.uint8:
            video = video.float() / 255.0
        return video, mask_video, clip_image

    def _timesteps(self, num_inference_steps: int, strength: float, device):
        """The sampler's timesteps, and with ``strength < 1`` only the last ``int(steps * strength)`` of them plus
        the timestep the input video is noised to (None otherwise)."""
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        if strength >= 1.0:
            return timesteps, None
        kept = min(int(num_inference_steps * strength), num_inference_steps)
        start = (num_inference_steps - kept) * self.scheduler.order
        timesteps = timesteps[start:]
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(start)
        return timesteps, timesteps[:1]

    @staticmethod
    def _size_and_style(rows: int, height: int, width: int, original_size, crops_coords_top_left, device, dtype):
        """The size conditioning (original size, target size, crop corner) and the style id 0, per row."""
        meta = list(original_size) + [height, width] + list(crops_coords_top_left)
        return (torch.tensor([meta] * rows, device=device, dtype=dtype),
                torch.zeros(rows, device=device, dtype=torch.long))

    def _denoise(self, latents, timesteps, inputs: StepInputs, guidance_scale: float, guidance_rescale: float,
                 clip_apply_ratio: float, step_kwargs: dict, callback, callback_tensor_inputs,
                 cache: StepCache | None = None) -> torch.Tensor:
        """The sampling loop: one transformer call per step for all rows (which ``cache`` may shorten), guidance,
        one sampler step; the CLIP image tokens are given only in the last ``clip_apply_ratio`` of the steps, as in
        the original."""
        do_cfg = guidance_scale > 1.0
        batch = latents.shape[0]
        rows = 2 * batch if do_cfg else batch
        use_clip_from = len(timesteps) * (1 - clip_apply_ratio)
        with self.progress_bar(total=len(timesteps)) as progress:
            for i, t in enumerate(timesteps):
                model_input = torch.cat([latents] * 2) if do_cfg else latents
                model_input = self.scheduler.scale_model_input(model_input, t)
                t_model = t.reshape(1).expand(rows).to(model_input.dtype)  # the original casts t to the latent dtype
                if cache is not None:
                    cache.begin_step(i)
                output = self.transformer(model_input, t_model, step_cache=cache,
                                          **inputs.transformer_kwargs(i >= use_clip_from)).sample
                if output.shape[1] == 2 * self.latent_channels:  # learn_sigma: the second half is the variance
                    output = output.chunk(2, dim=1)[0]
                noise_pred = output
                if do_cfg:
                    uncond, cond = output.chunk(2)
                    noise_pred = uncond + guidance_scale * (cond - uncond)
                    if guidance_rescale > 0:
                        noise_pred = _rescale_noise_cfg(noise_pred, cond, guidance_rescale)
                latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
                if callback is not None:
                    local = {"latents": latents,
                             "prompt_embeds": inputs.embeds[batch:] if do_cfg else inputs.embeds,
                             "negative_prompt_embeds": inputs.embeds[:batch] if do_cfg else None}
                    result = callback(self, i, t, {k: local[k] for k in callback_tensor_inputs}) or {}
                    latents = result.get("latents", latents)
                progress.update()
        return latents

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> (B, 3, F, H, W) float32 in [0, 1] on the CPU, one sample at a time (bounded memory)."""
        videos = []
        for i in range(latents.shape[0]):
            z = latents[i : i + 1].to(self.vae.dtype) / self.vae.config.scaling_factor
            video = self.vae.decode(z).sample.clamp(-1, 1)
            videos.append((video.float() / 2 + 0.5).clamp(0, 1).cpu())
        return torch.cat(videos)

    # --------------------------------------------------------------------------------------------- helpers
    def _clip_inputs(self, clip_image, batch, device, dtype, do_cfg):
        """CLIP tokens (rows, N, D) and per-query masks (rows, n_query) for the transformer rows [uncond, cond].
        The uncond rows always get zero tokens and mask 0 (-> the learned ``clip_padding``); the cond rows get the
        image tokens and mask 1 when an image is given, else zeros and mask 0."""
        n_query = int(self.transformer.config.n_query)
        tokens = self.encode_clip_image(clip_image, batch, device, dtype)
        if tokens is None:
            rows = 2 * batch if do_cfg else batch
            width = int(self.transformer.config.projection_dim)
            return (torch.zeros(rows, self._clip_token_count(), width, device=device, dtype=dtype),
                    torch.zeros(rows, n_query, device=device, dtype=dtype))
        ones = torch.ones(batch, n_query, device=device, dtype=dtype)
        if do_cfg:
            return torch.cat([torch.zeros_like(tokens), tokens]), torch.cat([torch.zeros_like(ones), ones])
        return tokens, ones

    def _rotary_embedding(self, height: int, width: int, device):
        from easyanimate.models.rope import rope_for_size

        cfg = self.transformer.config
        cos, sin = rope_for_size(
            height, width, int(cfg.attention_head_dim), patch_size=int(cfg.patch_size),
            vae_scale=int(self.vae.spatial_compression_ratio),
        )
        return cos.to(device), sin.to(device)

    def _extra_step_kwargs(self, generator, eta):
        params = set(inspect.signature(self.scheduler.step).parameters)
        kwargs = {}
        if "eta" in params:
            kwargs["eta"] = eta
        if "generator" in params:
            kwargs["generator"] = generator
        return kwargs

    # ------------------------------------------------------------------------------------------- long video
    def generate_long_video(self, prompt: str, video_length: int, chunk_length: int = 72, overlap: int = 4,
                            image=None, end_image=None, **call_kwargs) -> EasyAnimatePipelineOutput:
        """``video_length`` frames (more than one pass can hold) by chunked continuation with a linear cross-fade
        over ``overlap`` frames; see :func:`easyanimate.inference.long_video.generate_long_video`. Needs the InP
        model; other keyword arguments go to every chunk's call."""
        from easyanimate.inference.long_video import generate_long_video

        long_video = generate_long_video(self, prompt, video_length, chunk_length, overlap, image=image,
                                         end_image=end_image, **call_kwargs)
        return EasyAnimatePipelineOutput(long_video.videos, long_video.transformer_evaluations)


def _as_prompt_lists(prompt, negative_prompt) -> tuple[list[str], list[str] | None]:
    """Prompts as a list; negative prompts as a list of the same length (one is repeated), or None."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    negatives = [negative_prompt] if isinstance(negative_prompt, str) else negative_prompt
    negatives = None if negatives is None else list(negatives)
    if negatives is not None and len(negatives) == 1 and len(prompts) > 1:
        negatives = negatives * len(prompts)
    return prompts, negatives


def _repeat_per_prompt(count: int, prompts, negatives, video, mask_video):
    """Every prompt (and its negative prompt, video and mask when given per prompt) repeated ``count`` times."""
    prompts = [p for p in prompts for _ in range(count)]
    negatives = None if negatives is None else [p for p in negatives for _ in range(count)]
    if video is not None and video.shape[0] > 1:
        video = video.repeat_interleave(count, dim=0)
        mask_video = None if mask_video is None else mask_video.repeat_interleave(count, dim=0)
    return prompts, negatives, video, mask_video


def _rescale_noise_cfg(noise_cfg: torch.Tensor, noise_cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed"): match the std of the guided prediction to the conditional one."""
    dims = list(range(1, noise_cond.ndim))
    rescaled = noise_cfg * (noise_cond.std(dim=dims, keepdim=True) / noise_cfg.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * noise_cfg


def make_scheduler(name: str, config: dict):
    """The sampler ``name`` (a key of :data:`SAMPLERS`) built from a scheduler config; keys the class does not know
    (the DDPM file's ``variance_type``, ...) are dropped so the class defaults apply, as the original does."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid samplers: {', '.join(map(repr, SAMPLERS))}")
    cls = SAMPLERS[name]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    return cls.from_config({k: v for k, v in config.items() if k in accepted})
