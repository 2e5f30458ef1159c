"""Long videos by chunked continuation: more frames than one pass of the transformer can hold.

Chunk 1 is a normal call of ``chunk_length`` frames (from the start image if one is given, else text to video).
Every next chunk keeps the last ``overlap`` frames of the video so far as its known start frames, and the chunks are
stitched with a linear cross-fade over the overlap (the new chunk weighs ``k / overlap`` on overlap frame ``k``), as
the original web UI's "Long Video Generation" does. The end image goes on the last chunk. The last chunk is rounded
*up* to a multiple of the VAE's frame chunk and the result trimmed, so exactly the requested frame count comes back
(the original rounds down and may return fewer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import PIL.Image
import torch

from easyanimate.inference.request import long_video_chunks

@dataclass
class LongVideo:
    """A long video (1, 3, F, H, W) in [0, 1] and the steps of all its chunks that ran every transformer block."""

    videos: torch.Tensor
    transformer_evaluations: int | None


# Settings a long video decides itself for every chunk; a caller may not pass them.
CHUNK_DECIDED = ("video", "mask_video", "clip_image", "latents", "strength", "output_type", "video_length")


def check_long_video(pipe, prompt, video_length: int, chunk_length: int, overlap: int, call_kwargs: dict) -> None:
    """Raise ``ValueError`` naming the first argument of :func:`generate_long_video` that cannot work."""
    m = pipe.frame_multiple
    if not pipe.is_inpaint:
        raise ValueError("long video generation continues from the previous chunk's frames: needs the InP model")
    if chunk_length < m or chunk_length % m:
        raise ValueError(f"chunk_length must be a positive multiple of {m}, got {chunk_length}")
    if not 1 <= overlap < chunk_length:
        raise ValueError(f"overlap must be in [1, chunk_length), got {overlap}")
    if video_length < 1:
        raise ValueError(f"video_length must be positive, got {video_length}")
    for key in CHUNK_DECIDED:
        if key in call_kwargs:
            raise ValueError(f"generate_long_video does not take {key}=")
    if not isinstance(prompt, str):
        raise ValueError("generate_long_video takes one prompt (a string)")


@torch.no_grad()
def generate_long_video(pipe, prompt: str, video_length: int, chunk_length: int = 72, overlap: int = 4, image=None,
                        end_image=None, **call_kwargs) -> "LongVideo":
    """(1, 3, ``video_length``, H, W) in [0, 1] (``.videos``), with the transformer evaluations of every chunk
    summed (``.transformer_evaluations``): ``video_length`` frames in chunks of ``chunk_length`` that share
    ``overlap`` frames (see the module docstring). ``image`` / ``end_image`` as for one pipeline call; other keyword
    arguments (height, width, num_inference_steps, guidance_scale, generator, negative_prompt, ...) go to every
    call. Needs the InP model."""
    check_long_video(pipe, prompt, video_length, chunk_length, overlap, call_kwargs)
    m = pipe.frame_multiple
    chunks = long_video_chunks(video_length, chunk_length, overlap)
    result, start_frames, evaluations = None, image, []
    for index in range(chunks):
        last = index == chunks - 1
        remaining = video_length - index * (chunk_length - overlap)  # frames not yet covered before the overlap
        frames = math.ceil(remaining / m) * m if last else chunk_length
        out = pipe(prompt, video_length=frames, image=start_frames, end_image=end_image if last else None,
                   **call_kwargs)
        evaluations.append(getattr(out, "transformer_evaluations", None))
        chunk = out.videos
        result = chunk if result is None else _cross_fade(result, chunk, overlap)
        if not last:
            start_frames = _last_frames_as_images(result, overlap)
    total = None if None in evaluations else sum(evaluations)
    return LongVideo(result[:, :, :video_length], total)


def _cross_fade(video: torch.Tensor, chunk: torch.Tensor, overlap: int) -> torch.Tensor:
    """``video`` continued by ``chunk``, whose first ``overlap`` frames fade in over the last ones of ``video``."""
    weight = (torch.arange(overlap, dtype=torch.float32) / overlap).view(1, 1, overlap, 1, 1)
    video[:, :, -overlap:] = video[:, :, -overlap:] * (1 - weight) + chunk[:, :, :overlap] * weight
    return torch.cat([video, chunk[:, :, overlap:]], dim=2)


def _last_frames_as_images(video: torch.Tensor, count: int) -> list[PIL.Image.Image]:
    """The last ``count`` frames of the first video as 8-bit images (truncated, as a saved video would be)."""
    return [PIL.Image.fromarray((video[0, :, k].permute(1, 2, 0) * 255).to(torch.uint8).numpy())
            for k in range(video.shape[2] - count, video.shape[2])]
