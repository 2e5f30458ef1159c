"""One EasyAnimate V4 pipeline for text-to-video, text-to-image, image-to-video and video-to-video.

The original ships four pipeline classes; the V4 "InP" model only ever runs the inpaint one, and text-to-video is
the inpaint pipeline with an all-zero conditioning video and an all-255 ("generate everything") mask. This module
reproduces that pipeline's numerics (spec ``transformer_pipeline.md`` §4) with one class:

    pipe = EasyAnimatePipeline.from_pretrained("models/EasyAnimateV4-XL-2-InP")
    video = pipe("a cat", height=384, width=672, video_length=48).videos      # (B, 3, F, H, W) in [0, 1]

Order of work in ``__call__`` (each step is a method below so it can be checked on its own):
validate inputs -> encode prompts (BERT 77 tokens, mT5 256 tokens with the 140-token round trip) -> timesteps
(truncated by ``strength``) -> initial latents -> inpaint latents (VAE encodes of mask and masked video) -> CLIP
image tokens -> RoPE / meta-size / style -> denoising loop with classifier-free guidance, all conditioning batched
with the CFG halves in one transformer call -> VAE decode to [0, 1].

Deliberate differences from the original (each is documented where it happens):

* ``vae_posterior="sample"`` draws the VAE posterior noise from ``generator`` (the original uses the global RNG),
  so a seeded call is reproducible.
* ``strength < 1`` together with explicit ``latents``: the original silently ignores the video. Here the video is
  encoded and noised as usual and the given ``latents`` are used as that noise (see :meth:`prepare_latents`).
* Sizes and frame counts that the original silently floors are rejected with a message naming the nearest valid
  values (the CLIs round with a notice before calling); a ``video`` that would be silently ignored is an error.
* Long videos (:meth:`generate_long_video`) come back with exactly the requested frame count.
* Sequential CPU offload keeps the Resampler (and the T5 attention pool) offloaded too, instead of pinning it to
  the GPU; model CPU offload moves each model off the GPU as soon as its stage is done.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import os
import pickle
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

from easyanimate.utils.weights import CheckpointError

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

# The original applies these from its V4 yaml on top of transformer/config.json (spec §1.1, §3).
V4_TRANSFORMER_OVERRIDES = {"basic_block_type": "basic", "after_norm": False, "time_position_encoding": True}

# Modules that read their children's weights without calling them; sequential offload must load them as a whole.
PRELOAD_MODULE_CLASSES = ["MultiheadAttention", "HunyuanDiTAttentionPool"]

# The released image_encoder/ is a full CLIP checkpoint; only its vision half is run.
CLIP_UNUSED_PREFIXES = ("text_model.", "text_projection.", "logit_scale", "vision_model.embeddings.position_ids")

T5_ROUND_TRIP_LENGTH = 140  # the original decodes the first 140 T5 ids and tokenizes that text again (spec §4.2)
KNOWN_FRAMES = 3  # frames the image-to-video helper marks as known for a start (and an end) image
DEFAULT_NEGATIVE_PROMPT = ""


def text_lengths(transformer) -> tuple[int, int]:
    """Token counts the transformer's text inputs must have: BERT ``text_len`` and mT5 ``text_len_t5``."""
    return int(transformer.config.text_len), int(transformer.config.text_len_t5)


@dataclass
class EasyAnimatePipelineOutput(BaseOutput):
    """``videos``: (B, 3, F, H, W) float32 in [0, 1] on the CPU (or the final latents for ``output_type="latent"``)."""

    videos: torch.Tensor


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{what}: {path} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{what}: {path} is not valid JSON ({exc})") from exc


@contextlib.contextmanager
def _quiet_transformers():
    """transformers 5 prints a load report for every expected unused key (the BERT pooler, the text half of the CLIP
    checkpoint); we check the report ourselves, so silence it while loading."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _load_hf_model(cls, folder: Path, torch_dtype, allowed_unused: tuple[str, ...] = (), **kwargs):
    """Load a transformers model strictly: every model key must come from the checkpoint, and checkpoint keys may
    only be left over if they start with one of ``allowed_unused`` (the parts of a bigger checkpoint we do not run).
    ``.bin`` files are read by transformers with ``weights_only=True``."""
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{cls.__name__}: no config.json in {folder} (is the model folder complete?)")
    try:
        with _quiet_transformers():
            model, info = cls.from_pretrained(folder, torch_dtype=torch_dtype, output_loading_info=True, **kwargs)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refusing to load {folder}: its .bin file holds pickled objects other than tensors, which could run "
            "code. Convert it to .safetensors with a tool you trust."
        ) from exc
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot load {cls.__name__} from {folder}: {exc}") from exc
    unused = [k for k in info.get("unexpected_keys", ()) if not k.startswith(allowed_unused)]
    problems = []
    if info.get("missing_keys"):
        problems.append(f"missing keys {sorted(info['missing_keys'])[:10]}")
    if info.get("mismatched_keys"):
        problems.append(f"keys with the wrong shape {sorted(map(str, info['mismatched_keys']))[:10]}")
    if unused:
        problems.append(f"unexpected keys {sorted(unused)[:10]}")
    if info.get("error_msgs"):
        problems.append("; ".join(info["error_msgs"]))
    if problems:
        raise CheckpointError(f"{folder} does not match {cls.__name__}: " + "; ".join(problems))
    return model.eval()


def default_dtype(device: torch.device) -> torch.dtype:
    """fp32 on CPU; bf16 on GPUs that support it; fp16 otherwise (the VAE then stays fp32, as the original's
    ``upcast_vae``)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


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
    """The conditioning the original's image-to-video helper builds (spec §4.5, ``get_image_to_video_latent``).

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
        self._sampler_config = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
        self.sampler = next((n for n, c in SAMPLERS.items() if isinstance(scheduler, c)), type(scheduler).__name__)
        self.vae_posterior = "sample"  # "sample" (the original) or "mode" (posterior mean) for conditioning encodes

    # ------------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, model_dir, torch_dtype: torch.dtype | None = None, sampler: str = "Euler", device=None):
        """Load a model folder in the released layout (spec §1.3).

        ``model_index.json`` is read for information only: the released one names HunyuanDiT/AutoencoderKL classes
        that are not what the folder holds. ``torch_dtype=None`` picks fp32 on CPU, bf16 on GPUs that support it,
        else fp16 (with the VAE kept in fp32). ``device`` defaults to CUDA when available. Every component is
        loaded strictly; a missing or broken one raises :class:`CheckpointError` naming its folder.
        """
        from easyanimate.models.transformer import HunyuanTransformer3DModel
        from easyanimate.models.vae import AutoencoderKLMagvit
        from transformers import BertModel, BertTokenizer, CLIPVisionModelWithProjection, T5EncoderModel, T5Tokenizer

        try:  # transformers 5: the PIL backend is what the original (transformers 4.44) computed; pin it
            from transformers import CLIPImageProcessorPil as CLIPImageProcessor
        except ImportError:
            from transformers import CLIPImageProcessor

        root = Path(model_dir)
        if not root.is_dir():
            raise CheckpointError(f"model folder not found: {root}")
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; valid samplers: {', '.join(map(repr, SAMPLERS))}")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        dtype = torch_dtype or default_dtype(device)
        vae_dtype = torch.float32 if dtype == torch.float16 else dtype  # fp16 VAE overflows; the original upcasts
        index_file = root / "model_index.json"
        if index_file.is_file():
            names = _read_json(index_file, "model index").get("_class_name")
            logger.info("model_index.json names %s (informational only)", names)

        # Models are built in fp32; only cast when needed (diffusers warns on every dtype cast).
        transformer = _load_transformer(HunyuanTransformer3DModel, root, None if dtype == torch.float32 else dtype)
        vae = _load_vae(AutoencoderKLMagvit, root, None if vae_dtype == torch.float32 else vae_dtype)
        text_encoder = _load_hf_model(
            BertModel, root / "text_encoder", dtype, allowed_unused=("pooler.",), add_pooling_layer=False
        )
        text_encoder_2 = _load_hf_model(T5EncoderModel, root / "text_encoder_2", dtype)
        tokenizer = _load_tokenizer(BertTokenizer, root / "tokenizer")
        tokenizer_2 = _load_tokenizer(T5Tokenizer, root / "tokenizer_2")
        scheduler_config = _read_json(root / "scheduler" / "scheduler_config.json", "scheduler")
        scheduler = _make_scheduler(sampler, scheduler_config)

        image_encoder = image_processor = None
        if getattr(transformer, "is_inpaint", False):
            folder = root / "image_encoder"
            if not folder.is_dir():
                raise CheckpointError(f"the transformer is an InP (image-to-video) model but {folder} is missing")
            # The released folder holds a full CLIP checkpoint (model_type "clip"); only its vision half is run.
            image_encoder = _load_hf_model(
                CLIPVisionModelWithProjection,
                folder,
                dtype,
                allowed_unused=CLIP_UNUSED_PREFIXES,
            )
            image_processor = _load_tokenizer(CLIPImageProcessor, folder)

        pipe = cls(
            vae, transformer, text_encoder, tokenizer, text_encoder_2, tokenizer_2, scheduler,
            image_encoder, image_processor,
        )
        pipe._sampler_config = scheduler_config
        return pipe if device.type == "cpu" else pipe.to(device)  # components are loaded on the CPU

    # ------------------------------------------------------------------------------------------------ samplers
    def set_sampler(self, name: str) -> None:
        """Choose the sampler by the original's name: "Euler", "Euler A", "DPM++", "PNDM" or "DDIM", or "LCM" for
        a model with an LCM-LoRA. Each is built from the folder's scheduler config; keys a class does not know take
        that class's defaults."""
        self.scheduler = _make_scheduler(name, self._sampler_config)
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
    def _is_inpaint(self) -> bool:
        return bool(getattr(self.transformer, "is_inpaint", False))

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def frame_multiple(self) -> int:
        """Frames per VAE encoder chunk: a video must have 1 frame or a multiple of this many."""
        return int(getattr(self.vae.config, "mini_batch_encoder", 8))

    def tokenize_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Token ids and masks for both encoders, as the original builds them (spec §4.2).

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
        if not self._is_inpaint:
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
        (strength < 1) the encoded video noised to that timestep instead, without the sigma factor (spec §4.5).

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
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = [negative_prompt] if isinstance(negative_prompt, str) else negative_prompt
        negatives = None if negatives is None else list(negatives)
        if negatives is not None and len(negatives) == 1 and len(prompts) > 1:
            negatives = negatives * len(prompts)
        if num_videos_per_prompt < 1:
            raise ValueError(f"num_videos_per_prompt must be >= 1, got {num_videos_per_prompt}")
        if image is not None or end_image is not None:
            if image is None:
                raise ValueError("end_image needs a start image= as well")
            if video is not None or mask_video is not None or clip_image is not None:
                raise ValueError("give either image=/end_image= or video=/mask_video=/clip_image=, not both")
            if not self._is_inpaint:
                raise ValueError("image-to-video (image=) needs the InP model; this transformer has no image input")
            video, mask_video, clip_image = build_image_to_video_inputs(image, end_image, video_length, height, width)
        if isinstance(video, torch.Tensor) and video.dtype == torch.uint8:
            video = video.float() / 255.0  # 8-bit frames
        for name in callback_on_step_end_tensor_inputs:
            if name not in self._callback_tensor_inputs:
                raise ValueError(
                    f"callback_on_step_end_tensor_inputs: {name!r} is not one of {self._callback_tensor_inputs}"
                )
        self.check_inputs(prompts, negatives, height, width, video_length, num_inference_steps, strength, video,
                          mask_video, clip_image, clip_apply_ratio, output_type)
        if num_videos_per_prompt > 1:
            prompts = [p for p in prompts for _ in range(num_videos_per_prompt)]
            negatives = None if negatives is None else [p for p in negatives for _ in range(num_videos_per_prompt)]
            if video is not None and video.shape[0] > 1:
                video = video.repeat_interleave(num_videos_per_prompt, dim=0)
                mask_video = None if mask_video is None else mask_video.repeat_interleave(num_videos_per_prompt, dim=0)
        batch = len(prompts)
        shape = self.latent_shape(batch, height, width, video_length)
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(
                f"latents must have shape {shape} for this size and frame count, got {tuple(latents.shape)}"
            )
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"generator: got a list of {len(generator)} for a batch of {batch}")

        device = self._execution_device
        dtype = self.transformer.dtype
        do_cfg = guidance_scale > 1.0

        # 1. text; under CFG the rows are [negative, positive], encoded in one call per encoder
        texts = ((negatives or [DEFAULT_NEGATIVE_PROMPT] * batch) + prompts) if do_cfg else prompts
        embeds, mask, embeds_2, mask_2 = self.encode_prompt(texts, device)
        self._release(self.text_encoder, self.text_encoder_2)

        # 2. timesteps (strength < 1 keeps the last int(N * strength) steps)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        latent_timestep = None
        if strength < 1.0:
            kept = min(int(num_inference_steps * strength), num_inference_steps)
            start = (num_inference_steps - kept) * self.scheduler.order
            timesteps = timesteps[start:]
            if hasattr(self.scheduler, "set_begin_index"):
                self.scheduler.set_begin_index(start)
            latent_timestep = timesteps[:1]

        # 3. latents and conditioning
        latents = self.prepare_latents(shape, dtype, device, generator, latents, video, latent_timestep)
        inpaint_latents = None
        if self._is_inpaint:
            inpaint_latents = self.prepare_inpaint_latents(video, mask_video, shape, dtype, device, generator)
            inpaint_latents = torch.cat([inpaint_latents] * 2) if do_cfg else inpaint_latents
            clip_tokens, clip_mask = self._clip_inputs(clip_image, batch, device, dtype, do_cfg)
            self._release(self.image_encoder)
        cos, sin = self._rotary_embedding(height, width, device)
        rows = 2 * batch if do_cfg else batch
        meta = list(original_size) + [height, width] + list(crops_coords_top_left)
        image_meta_size = torch.tensor([meta] * rows, device=device, dtype=dtype)
        style = torch.zeros(rows, device=device, dtype=torch.long)

        # 4. denoising loop; all conditioning rows go through one transformer call with the CFG halves
        extra_step_kwargs = self._extra_step_kwargs(generator, eta)
        use_clip_from = len(timesteps) * (1 - clip_apply_ratio)
        with self.progress_bar(total=len(timesteps)) as progress:
            for i, t in enumerate(timesteps):
                model_input = torch.cat([latents] * 2) if do_cfg else latents
                model_input = self.scheduler.scale_model_input(model_input, t)
                t_model = t.reshape(1).expand(rows).to(model_input.dtype)  # the original casts t to the latent dtype
                extra = {}
                if self._is_inpaint:
                    use_clip = i >= use_clip_from  # image features only in the last clip_apply_ratio of the steps
                    extra = dict(
                        inpaint_latents=inpaint_latents,
                        clip_encoder_hidden_states=clip_tokens if use_clip else torch.zeros_like(clip_tokens),
                        clip_attention_mask=clip_mask if use_clip else torch.zeros_like(clip_mask),
                    )
                output = self.transformer(
                    model_input,
                    t_model,
                    encoder_hidden_states=embeds,
                    text_embedding_mask=mask,
                    encoder_hidden_states_t5=embeds_2,
                    text_embedding_mask_t5=mask_2,
                    image_meta_size=image_meta_size,
                    style=style,
                    image_rotary_emb=(cos, sin),
                    **extra,
                ).sample
                if output.shape[1] == 2 * self.latent_channels:  # learn_sigma: the second half is the variance
                    output = output.chunk(2, dim=1)[0]
                if do_cfg:
                    uncond, cond = output.chunk(2)
                    noise_pred = uncond + guidance_scale * (cond - uncond)
                    if guidance_rescale > 0:
                        noise_pred = _rescale_noise_cfg(noise_pred, cond, guidance_rescale)
                else:
                    noise_pred = output
                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
                if callback_on_step_end is not None:
                    local = {"latents": latents, "prompt_embeds": embeds[batch:] if do_cfg else embeds,
                             "negative_prompt_embeds": embeds[:batch] if do_cfg else None}
                    chosen = {k: local[k] for k in callback_on_step_end_tensor_inputs}
                    result = callback_on_step_end(self, i, t, chosen) or {}
                    latents = result.get("latents", latents)
                progress.update()

        # 5. decode
        self._release(self.transformer)
        if output_type == "latent":
            self.maybe_free_model_hooks()
            return EasyAnimatePipelineOutput(videos=latents)
        videos = self.decode_latents(latents)
        self.maybe_free_model_hooks()
        return EasyAnimatePipelineOutput(videos=videos.numpy() if output_type == "np" else videos)

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
    @torch.no_grad()
    def generate_long_video(
        self,
        prompt: str,
        video_length: int,
        chunk_length: int = 72,
        overlap: int = 4,
        image=None,
        end_image=None,
        **call_kwargs,
    ) -> EasyAnimatePipelineOutput:
        """Generate ``video_length`` frames (more than one pass can hold) by chunked continuation, as the original
        web UI's "Long Video Generation" does (spec training_data_ui.md §6.4):

        chunk 1 is a normal call of ``chunk_length`` frames (from ``image`` if given, else text-to-video); every
        next chunk starts from the last ``overlap`` frames of the video so far as its known start frames, and the
        chunks are stitched with a linear cross-fade over the overlap (weight of the new chunk ``k / overlap`` for
        overlap frame k). ``end_image`` goes on the last chunk. The last chunk is rounded *up* to a multiple of the
        VAE chunk and the result trimmed, so exactly ``video_length`` frames come back (the original rounds it down
        and may return fewer). Needs the InP model. Other keyword arguments go to every call (height, width,
        num_inference_steps, guidance_scale, generator, negative_prompt, ...)."""
        m = self.frame_multiple
        if not self._is_inpaint:
            raise ValueError("long video generation continues from the previous chunk's frames: needs the InP model")
        if chunk_length < m or chunk_length % m:
            raise ValueError(f"chunk_length must be a positive multiple of {m}, got {chunk_length}")
        if not 1 <= overlap < chunk_length:
            raise ValueError(f"overlap must be in [1, chunk_length), got {overlap}")
        if video_length < 1:
            raise ValueError(f"video_length must be positive, got {video_length}")
        for key in ("video", "mask_video", "clip_image", "latents", "strength", "output_type", "video_length"):
            if key in call_kwargs:
                raise ValueError(f"generate_long_video does not take {key}=")
        if not isinstance(prompt, str):
            raise ValueError("generate_long_video takes one prompt (a string)")

        result = None
        start_frames = image
        done = 0  # frames of the final video already covered (before the overlap of the next chunk)
        while True:
            remaining = video_length - done
            last = remaining <= chunk_length
            n = math.ceil(remaining / m) * m if last else chunk_length
            chunk = self(
                prompt,
                video_length=n,
                image=start_frames,
                end_image=end_image if last else None,
                **call_kwargs,
            ).videos
            if result is None:
                result = chunk
            else:
                weight = (torch.arange(overlap, dtype=torch.float32) / overlap).view(1, 1, overlap, 1, 1)
                result[:, :, -overlap:] = result[:, :, -overlap:] * (1 - weight) + chunk[:, :, :overlap] * weight
                result = torch.cat([result, chunk[:, :, overlap:]], dim=2)
            if last:
                break
            start_frames = [
                PIL.Image.fromarray((result[0, :, k].permute(1, 2, 0) * 255).to(torch.uint8).numpy())
                for k in range(result.shape[2] - overlap, result.shape[2])
            ]
            done = result.shape[2] - overlap
        return EasyAnimatePipelineOutput(videos=result[:, :, :video_length])


def _rescale_noise_cfg(noise_cfg: torch.Tensor, noise_cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2023, §3.4): match the std of the guided prediction to the conditional one."""
    dims = list(range(1, noise_cond.ndim))
    rescaled = noise_cfg * (noise_cond.std(dim=dims, keepdim=True) / noise_cfg.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * noise_cfg


def _make_scheduler(name: str, config: dict):
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid samplers: {', '.join(map(repr, SAMPLERS))}")
    cls = SAMPLERS[name]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    # Keys the class does not know (the DDPM file's variance_type, ...) are dropped so the class defaults apply.
    return cls.from_config({k: v for k, v in config.items() if k in accepted})


def _load_tokenizer(cls, folder: Path):
    if not folder.is_dir():
        raise CheckpointError(f"{cls.__name__}: folder {folder} is missing")
    try:
        return cls.from_pretrained(folder)
    except (OSError, ValueError, RuntimeError, TypeError) as exc:
        hint = " (the T5 tokenizer needs the sentencepiece and protobuf packages)" if "T5" in cls.__name__ else ""
        raise CheckpointError(f"cannot load {cls.__name__} from {folder}: {exc}{hint}") from exc


def _load_transformer(cls, root: Path, dtype):
    # The released config.json may lack the V4 inference switches; the original applied them from its yaml.
    return cls.from_pretrained(root, subfolder="transformer", torch_dtype=dtype, **V4_TRANSFORMER_OVERRIDES)


def _load_vae(cls, root: Path, dtype):
    folder = root / "vae"
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"VAE: no config.json in {folder}")
    return cls.from_pretrained(root, subfolder="vae", torch_dtype=dtype).eval()
