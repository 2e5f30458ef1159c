"""The predict command lines: ``predict_t2v.py``, ``predict_i2v.py`` and ``predict_v2v.py``.

Each turns its flags into a :class:`~easyanimate.inference.GenerationRequest` and hands it to the request layer,
which checks every input *before* any model is loaded (that takes minutes for the released model): sizes, frame
counts, sampler names, and that the model folder, weights, LoRA, image and video files exist and can be read.
Settings not given on the command line are the model folder's recommended ones. The result is written as mp4 (png
for one frame) with its settings JSON beside it, each through a temporary file, and its path is printed.

Under ``torchrun --nproc_per_node N ... --ulysses-degree N`` the N processes split the transformer's tokens
(:mod:`easyanimate.inference.distributed`); rank 0 alone prints, decodes and writes.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from easyanimate.inference.defaults import DEMO_MODEL_NAME, read_model_defaults
from easyanimate.models.step_cache import RECOMMENDED_SKIP_START_STEPS, RECOMMENDED_THRESHOLD
from easyanimate.inference.request import (
    DEFAULT_LORA_STRENGTH,
    DTYPES,
    FRAME_MULTIPLE,
    IMAGE_TO_VIDEO,
    LONG_VIDEO,
    MEMORY_MODES,
    SAMPLER_NAMES,
    SIZE_MULTIPLE,
    TEXT_TO_VIDEO,
    VIDEO_TO_VIDEO,
    RequestError,
    memory_mode_name,
    round_frames,
)
from easyanimate.utils.video_io import IMAGE_SUFFIXES, VIDEO_SUFFIXES

DEFAULT_MODEL = f"models/{DEMO_MODEL_NAME}"  # the small shipped demo; pass the released folder for V4
TASKS = {
    "t2v": ("text-to-video (or text-to-image with --frames 1)", "samples/easyanimate-videos"),
    "i2v": ("image-to-video from a start image (and optionally an end image)", "samples/easyanimate-videos_i2v"),
    "v2v": ("video-to-video: noise an input video and denoise it towards the prompt", "samples/easyanimate-videos_v2v"),
}
# How the request's settings are called on the command line (used in error messages).
LABELS = {
    "height": "--height", "width": "--width", "frames": "--frames", "steps": "--steps", "guidance_scale": "--guidance",
    "seed": "--seed", "fps": "--fps", "partial_frames": "--chunk-frames", "overlap_frames": "--overlap",
    "denoise_strength": "--strength", "start_image": "--image", "end_image": "--end-image", "video": "--video",
    "lora": "--lora", "lora_strength": "--lora-weight", "transformer_weights": "--transformer-path",
    "vae_weights": "--vae-path", "device": "--device", "step_cache": "--step-cache", "compile": "--compile",
    "step_cache_skip_start": "--step-cache-skip-start", "ulysses_degree": "--ulysses-degree",
    "ring_degree": "--ring-degree",
}
RECOMMENDED = "the model's recommended setting (its generation_defaults.json; the released model: {})"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default only when there is one."""

    def _get_help_string(self, action):
        if action.default in (None, False) or action.required:
            return action.help
        return super()._get_help_string(action)


class InputError(ValueError):
    """Bad command-line input, reported before any model is loaded."""


def build_parser(task: str) -> argparse.ArgumentParser:
    description, default_dir = TASKS[task]
    parser = argparse.ArgumentParser(
        prog=f"predict_{task}.py",
        description=f"EasyAnimate V4 {description}. Writes an mp4 (a png for one frame) with its settings as JSON "
                    "beside it, and prints its path.",
        formatter_class=_HelpFormatter,
    )
    model = parser.add_argument_group("model")
    model.add_argument("--model", default=DEFAULT_MODEL, help="model folder in the released EasyAnimateV4 layout")
    model.add_argument("--dtype", choices=DTYPES, default="auto",
                       help="compute dtype; auto = bfloat16 on GPUs that support it, else float16; on a CPU "
                            "bfloat16 where it has bf16 matrix instructions (AMX or AVX-512 BF16), else float32 "
                            "(the EASYANIMATE_CPU_DTYPE variable overrides the CPU's choice)")
    model.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    model.add_argument("--memory-mode", type=memory_mode_name, choices=MEMORY_MODES, default="model_cpu_offload",
                       help="GPU memory saving: model_cpu_offload keeps idle models on the CPU (the original's "
                            "default); model_cpu_offload_and_fp8 (or the original's model_cpu_offload_and_qfloat8) "
                            "also stores the transformer's large weights in fp8, half their memory (on a CPU only "
                            "that part applies); sequential_cpu_offload streams every layer (slowest, least "
                            "memory); gpu keeps everything on the GPU; offload is ignored on CPU")
    model.add_argument("--compile", action="store_true",
                       help="compile each transformer block with torch.compile: the first call takes longer "
                            "(compiling), later steps and calls of the same size run faster; same results")
    model.add_argument("--transformer-path", default=None,
                       help="transformer weights to use instead of the model folder's: a .safetensors file or a "
                            "folder, e.g. train.py's OUTPUT_DIR/transformer (all keys must match)")
    model.add_argument("--vae-path", default=None,
                       help="VAE weights to use instead of the model folder's: a .safetensors file or a folder, "
                            "e.g. train_vae.py's OUTPUT_DIR/vae (all keys must match)")
    model.add_argument("--vae-tiling", action="store_true", help="decode in spatial tiles to save memory")
    model.add_argument("--lora", default=None, help="LoRA file (.safetensors) to merge into the model")
    model.add_argument("--lora-weight", type=float, default=DEFAULT_LORA_STRENGTH, help="strength of the LoRA")

    parallel = parser.add_argument_group(
        "multi-GPU (sequence parallel)",
        "Split one video's transformer tokens across N processes started together by torchrun, one per GPU (NCCL) "
        "or on CPUs (gloo): torchrun --nproc_per_node N predict_%s.py ... --ulysses-degree N. Every process loads "
        "the whole model; rank 0 decodes and writes the result. --ulysses-degree x --ring-degree must equal N." % task)
    parallel.add_argument("--ulysses-degree", type=int, default=1, metavar="N",
                          help="processes that exchange attention heads (all-to-all; yunchang's Ulysses); must "
                               "divide the model's attention heads (16 for the released model)")
    parallel.add_argument("--ring-degree", type=int, default=1, metavar="N",
                          help="processes that pass keys and values around a ring (yunchang's ring attention): "
                               "CUDA GPUs and bf16/fp16 only, and (height/16) x (width/16) must divide by "
                               "ulysses x ring")

    gen = parser.add_argument_group("generation")
    gen.add_argument("--prompt", required=True, help="what to generate (English or Chinese)")
    gen.add_argument("--negative-prompt", default=None, help="what to avoid; default: " + RECOMMENDED.format(
        "a list of defects"))
    gen.add_argument("--sampler", default="Euler", choices=SAMPLER_NAMES, metavar="{" + ",".join(SAMPLER_NAMES) + "}",
                     help="sampler (scheduler) by the original's name")
    gen.add_argument("--steps", type=int, default=None, help="denoising steps; default: " + RECOMMENDED.format(25))
    gen.add_argument("--guidance", type=float, default=None,
                     help="classifier-free guidance scale (<= 1 disables it); default: " + RECOMMENDED.format(7))
    gen.add_argument("--seed", type=int, default=43, help="random seed (-1: a random one, recorded in the JSON)")
    gen.add_argument("--height", type=int, default=None,
                     help=f"height in pixels, a multiple of {SIZE_MULTIPLE}; default: " + RECOMMENDED.format(384))
    gen.add_argument("--width", type=int, default=None,
                     help=f"width in pixels, a multiple of {SIZE_MULTIPLE}; default: " + RECOMMENDED.format(672))
    gen.add_argument("--frames", type=int, default=None,
                     help=f"number of frames: 1 (an image) or a multiple of {FRAME_MULTIPLE}; other counts are "
                          "rounded down with a notice, as the original does; default: " + RECOMMENDED.format(144))
    gen.add_argument("--step-cache", type=float, nargs="?", const=RECOMMENDED_THRESHOLD, default=0.0,
                     metavar="THRESHOLD",
                     help="reuse the transformer's work on steps where its first block's output changed little "
                          "(accumulated relative change below THRESHOLD; alone: the recommended "
                          f"{RECOMMENDED_THRESHOLD}); 0 = off. Fewer full transformer evaluations, slightly "
                          "different videos; the JSON records how many ran")
    gen.add_argument("--step-cache-skip-start", type=int, default=RECOMMENDED_SKIP_START_STEPS, metavar="N",
                     help="with --step-cache: the first N steps always run in full")
    if task == "i2v":
        gen.add_argument("--image", nargs="+", required=True,
                         help="start image, kept as the first 3 frames; several images are the first frames in "
                              "order (e.g. the end of a video to continue)")
        gen.add_argument("--end-image", nargs="+", default=None,
                         help="optional end image, kept as the last 3 frames; several images are the last frames "
                              "in order")
        gen.add_argument("--chunk-frames", type=int, default=None,
                         help="long video: generate in chunks of this many frames (a multiple of "
                              f"{FRAME_MULTIPLE}), each continuing from the end of the previous one; then --frames "
                              "may be any length")
        gen.add_argument("--overlap", type=int, default=4, help="long video: frames shared (cross-faded) by chunks")
    if task == "v2v":
        gen.add_argument("--video", required=True, help="input video (its first --frames frames are used, resized "
                                                        "to --height x --width)")
        gen.add_argument("--strength", type=float, default=0.7,
                         help="denoising strength in (0, 1]: how far from the input video the result may go")

    out = parser.add_argument_group("output")
    out.add_argument("--output", type=Path, default=None,
                     help=f"output file (.mp4, .gif; .png for one frame); default: {default_dir}/NNNNNNNN.mp4, the "
                          "next free number. The settings go beside it as .json")
    out.add_argument("--overwrite", action="store_true", help="replace --output if it exists (default: refuse)")
    out.add_argument("--fps", type=int, default=24, help="frames per second of the written video")
    out.add_argument("--color-transfer", action="store_true",
                     help="match every frame's colour statistics (CIELAB mean and spread) to the first frame's, "
                          "the original's optional fix for colour drift")
    return parser


@dataclass
class Job:
    """A checked predict run: the prepared request (images and video opened), where the result goes, and notices
    for the user (e.g. a rounded frame count)."""

    prepared: object  # easyanimate.inference.PreparedRequest
    output: Path
    notices: list[str] = field(default_factory=list)


def to_request(task: str, args: argparse.Namespace):
    """The request the flags describe, starting from the model folder's recommended settings; returns
    ``(request, notices)``."""
    try:
        defaults = read_model_defaults(args.model)  # a missing folder is named when the request is prepared
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    long_video = task == "i2v" and args.chunk_frames is not None
    kind = {"t2v": TEXT_TO_VIDEO, "i2v": LONG_VIDEO if long_video else IMAGE_TO_VIDEO, "v2v": VIDEO_TO_VIDEO}[task]
    given = dict(prompt=args.prompt, negative_prompt=args.negative_prompt, steps=args.steps,
                 guidance_scale=args.guidance, height=args.height, width=args.width, frames=args.frames)
    request = defaults.request(
        **{k: v for k, v in given.items() if v is not None},
        model=str(args.model), kind=kind, sampler=args.sampler, seed=args.seed, lora=args.lora,
        lora_strength=args.lora_weight, transformer_weights=args.transformer_path, vae_weights=args.vae_path,
        memory_mode=args.memory_mode, compile=args.compile, dtype=args.dtype, device=args.device,
        vae_tiling=args.vae_tiling,
        fps=args.fps, color_transfer=args.color_transfer, step_cache=args.step_cache,
        step_cache_skip_start=args.step_cache_skip_start, ulysses_degree=args.ulysses_degree,
        ring_degree=args.ring_degree,
    )
    if task == "i2v":  # one image as itself (the pipeline keeps it on 3 frames), several as frames
        request = request.replace(start_image=_one_or_list(args.image), end_image=_one_or_list(args.end_image),
                                  partial_frames=args.chunk_frames or request.partial_frames,
                                  overlap_frames=args.overlap)
    if task == "v2v":
        request = request.replace(video=args.video, denoise_strength=args.strength)
    notices = []
    if not long_video:
        rounded = round_frames(request.frames)
        if rounded != request.frames:
            notices.append(f"--frames {request.frames} is not a multiple of {FRAME_MULTIPLE}; using {rounded}")
            request = request.replace(frames=rounded)
    return request, notices


def _one_or_list(paths):
    if not paths:
        return None
    return paths[0] if len(paths) == 1 else list(paths)


def validate(task: str, args: argparse.Namespace) -> Job:
    """Check every input without loading a model; returns the :class:`Job` or raises :class:`InputError`."""
    from easyanimate.inference.loading import folder_is_inpaint
    from easyanimate.inference.runner import prepare

    from easyanimate.inference.distributed import check_degrees

    request, notices = to_request(task, args)
    try:
        # also with degree 1: N processes launched without a degree would each write the same video
        check_degrees(request.ulysses_degree, request.ring_degree, labels=LABELS)
        prepared = prepare(request, labels=LABELS, is_inpaint=folder_is_inpaint(request.model))
    except RequestError as exc:
        raise InputError(str(exc)) from exc
    return Job(prepared, _output_path(task, args, prepared.frames, notices), notices)


def _output_path(task: str, args: argparse.Namespace, frames: int, notices: list[str]) -> Path:
    """``--output`` checked (a png for one frame, never over an existing file without --overwrite), or the next
    free ``NNNNNNNN`` name in the task's samples folder."""
    suffix = ".png" if frames == 1 else ".mp4"
    if args.output is None:
        folder = Path(TASKS[task][1])
        taken = {int(p.stem) for p in folder.glob("*") if p.stem.isdigit()} if folder.is_dir() else set()
        return folder / f"{max(taken, default=-1) + 1:08d}{suffix}"
    output = Path(args.output)
    if output.suffix.lower() not in VIDEO_SUFFIXES + IMAGE_SUFFIXES:
        raise InputError(f"--output {output}: use a .mp4, .gif or .png file name")
    if suffix == ".png" and output.suffix.lower() in VIDEO_SUFFIXES:
        notices.append(f"one frame is an image: writing {output.with_suffix('.png')} instead of {output}")
        output = output.with_suffix(".png")
    elif suffix == ".mp4" and output.suffix.lower() in IMAGE_SUFFIXES:
        raise InputError(f"--output {output} is an image file name but {frames} frames are generated; "
                         "use .mp4 or .gif")
    for path in (output, output.with_suffix(".json")):
        if path.exists() and not args.overwrite:
            raise InputError(f"--output {output}: {path} already exists; choose another name or pass --overwrite")
    return output


def load_pipeline(job: Job):
    """The pipeline the job asks for (model folder, replacement weights, memory mode, dtype, device)."""
    from easyanimate.inference.runner import load_for

    return load_for(job.prepared)


def main(task: str, argv: list[str] | None = None) -> Path | None:
    """Parse, validate, load, generate and save; returns the written file's path (also printed), or None on the
    processes of a sequence-parallel launch other than rank 0 (they print and write nothing)."""
    from easyanimate.inference.distributed import is_output_rank, shutdown
    from easyanimate.inference.runner import generate, write_result
    from easyanimate.utils.weights import CheckpointError

    parser = build_parser(task)
    args = parser.parse_args(argv)
    speaks = is_output_rank()  # under torchrun every process fails alike; one message is enough

    def fail(message: str, usage: bool = False):
        if not speaks:
            sys.exit(2)
        parser.error(message) if usage else parser.exit(2, f"{parser.prog}: error: {message}\n")

    try:
        job = validate(task, args)
    except InputError as exc:
        fail(str(exc), usage=True)
    for notice in job.notices if speaks else ():
        print(f"note: {notice}", file=sys.stderr)
    start = time.time()
    try:
        pipe = load_pipeline(job)
    except (CheckpointError, RequestError) as exc:
        # a corrupt or mismatched weights file, or fp8 / compile / GPU memory this machine lacks: say which and
        # what to use instead, no traceback
        fail(str(exc))
    if speaks:
        print(f"loaded {args.model} in {time.time() - start:.1f}s", file=sys.stderr)
    try:
        generation = generate(pipe, job.prepared)
    except RequestError as exc:  # out of GPU memory: the message names the memory mode or size to try
        fail(str(exc))
    finally:
        shutdown()
    if generation.videos is None:  # another process of a sequence-parallel launch writes the result
        return None
    path, _ = write_result(generation, job.output)
    print(path)
    return path
