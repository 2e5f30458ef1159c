"""The predict command lines: ``predict_t2v.py``, ``predict_i2v.py`` and ``predict_v2v.py``.

The original's predict scripts are edited as constants at the top of each file; here every one of those settings is a
flag. All input is checked *before* any model is loaded (which takes minutes for the released model): sizes,
frame counts, sampler names, and that the model folder, LoRA, image and video files exist and can be read. The
result is written as mp4 (png when one frame is generated) through a temporary file, and its path is printed.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from easyanimate.utils.video_io import IMAGE_SUFFIXES, VIDEO_SUFFIXES, MediaError, read_image, read_video

# The original's sampler names (easyanimate.pipeline.SAMPLERS has the classes; kept here so --help and input checks
# need no heavy imports; a test keeps the two in sync).
SAMPLER_NAMES = ("Euler", "Euler A", "DPM++", "PNDM", "DDIM", "LCM")
MEMORY_MODES = ("none", "model_cpu_offload", "sequential_cpu_offload")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEFAULT_MODEL = "models/EasyAnimateV4-demo"  # the small shipped demo (scripts/train_demo.sh); pass the released folder for V4
DEFAULT_NEGATIVE = "Low quality, blurry, deformed video, distortion, bad hands, strange motion."
SIZE_MULTIPLE = 16  # the transformer's patch (2) times the VAE's downsampling (8)
FRAME_MULTIPLE = 8  # the VAE's temporal chunk (mini_batch_encoder)
MODEL_SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
TASKS = {
    "t2v": ("text-to-video (or text-to-image with --frames 1)", "samples/easyanimate-videos"),
    "i2v": ("image-to-video from a start image (and optionally an end image)", "samples/easyanimate-videos_i2v"),
    "v2v": ("video-to-video: noise an input video and denoise it towards the prompt", "samples/easyanimate-videos_v2v"),
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default only when there is one."""

    def _get_help_string(self, action):
        if action.default in (None, False) or action.required:
            return action.help
        return super()._get_help_string(action)


class InputError(ValueError):
    """Bad command-line input, reported before any model is loaded."""


@dataclass
class Job:
    """Validated inputs of one predict run."""

    args: argparse.Namespace
    output: Path
    notices: list[str] = field(default_factory=list)
    image: object = None  # PIL start image, or a list of start frames (i2v)
    end_image: object = None  # PIL end image, or a list of end frames (i2v)
    video: object = None  # (1, 3, F, H, W) tensor in [0, 1] (v2v)


def build_parser(task: str) -> argparse.ArgumentParser:
    description, default_dir = TASKS[task]
    parser = argparse.ArgumentParser(
        prog=f"predict_{task}.py",
        description=f"EasyAnimate V4 {description}. Writes an mp4 (a png for one frame) and prints its path.",
        formatter_class=_HelpFormatter,
    )
    model = parser.add_argument_group("model")
    model.add_argument("--model", default=DEFAULT_MODEL, help="model folder in the released EasyAnimateV4 layout")
    model.add_argument("--dtype", choices=DTYPES, default="auto",
                       help="weight dtype; auto = float32 on CPU, bfloat16 on GPUs that support it, else float16")
    model.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    model.add_argument("--memory-mode", choices=MEMORY_MODES, default="model_cpu_offload",
                       help="GPU memory saving: model_cpu_offload keeps idle models on the CPU (the original's "
                            "default); sequential_cpu_offload streams every layer (slowest, least memory); "
                            "ignored on CPU")
    model.add_argument("--transformer-path", type=Path, default=None,
                       help="transformer weights to use instead of the model folder's: a .safetensors file or a "
                            "folder, e.g. train.py's OUTPUT_DIR/transformer (all keys must match)")
    model.add_argument("--vae-path", type=Path, default=None,
                       help="VAE weights to use instead of the model folder's: a .safetensors file or a folder, "
                            "e.g. train_vae.py's OUTPUT_DIR/vae (all keys must match)")
    model.add_argument("--vae-tiling", action="store_true", help="decode in spatial tiles to save memory")
    model.add_argument("--lora", type=Path, default=None, help="LoRA file (.safetensors) to merge into the model")
    model.add_argument("--lora-weight", type=float, default=0.6, help="strength of the LoRA")

    gen = parser.add_argument_group("generation")
    gen.add_argument("--prompt", required=True, help="what to generate (English or Chinese)")
    gen.add_argument("--negative-prompt", default=DEFAULT_NEGATIVE, help="what to avoid")
    gen.add_argument("--sampler", default="Euler", choices=SAMPLER_NAMES, metavar="{" + ",".join(SAMPLER_NAMES) + "}",
                     help="sampler (scheduler) by the original's name")
    gen.add_argument("--steps", type=int, default=25, help="number of denoising steps")
    gen.add_argument("--guidance", type=float, default=7.0, help="classifier-free guidance scale (<= 1 disables it)")
    gen.add_argument("--seed", type=int, default=43, help="random seed")
    gen.add_argument("--height", type=int, default=384, help=f"height in pixels, a multiple of {SIZE_MULTIPLE}")
    gen.add_argument("--width", type=int, default=672, help=f"width in pixels, a multiple of {SIZE_MULTIPLE}")
    gen.add_argument("--frames", type=int, default=144,
                     help=f"number of frames: 1 (an image) or a multiple of {FRAME_MULTIPLE}; other counts are "
                          "rounded down with a notice, as the original does")
    if task == "i2v":
        gen.add_argument("--image", type=Path, nargs="+", required=True,
                         help="start image, kept as the first 3 frames; several images are the first frames in "
                              "order (e.g. the end of a video to continue)")
        gen.add_argument("--end-image", type=Path, nargs="+", default=None,
                         help="optional end image, kept as the last 3 frames; several images are the last frames "
                              "in order")
        gen.add_argument("--chunk-frames", type=int, default=None,
                         help="long video: generate in chunks of this many frames (a multiple of "
                              f"{FRAME_MULTIPLE}), each continuing from the end of the previous one; then --frames "
                              "may be any length")
        gen.add_argument("--overlap", type=int, default=4, help="long video: frames shared (cross-faded) by chunks")
    if task == "v2v":
        gen.add_argument("--video", type=Path, required=True, help="input video (its first --frames frames are used, "
                                                                   "resized to --height x --width)")
        gen.add_argument("--strength", type=float, default=0.7,
                         help="denoising strength in (0, 1]: how far from the input video the result may go")

    out = parser.add_argument_group("output")
    out.add_argument("--output", type=Path, default=None,
                     help=f"output file (.mp4, .gif; .png for one frame); default: {default_dir}/NNNNNNNN.mp4, the "
                          "next free number")
    out.add_argument("--overwrite", action="store_true", help="replace --output if it exists (default: refuse)")
    out.add_argument("--fps", type=int, default=24, help="frames per second of the written video")
    out.add_argument("--color-transfer", action="store_true",
                     help="match every frame's colour statistics (CIELAB mean and spread) to the first frame's, "
                          "the original's optional fix for colour drift")
    return parser


def _next_free_output(folder: Path, suffix: str) -> Path:
    taken = {int(p.stem) for p in folder.glob("*") if p.stem.isdigit()} if folder.is_dir() else set()
    index = max(taken, default=-1) + 1
    return folder / f"{index:08d}{suffix}"


def validate(task: str, args: argparse.Namespace) -> Job:
    """Check every input without loading a model; returns the :class:`Job` or raises :class:`InputError`."""
    notices = []
    if args.steps < 1:
        raise InputError(f"--steps must be at least 1, got {args.steps}")
    if args.fps < 1:
        raise InputError(f"--fps must be at least 1, got {args.fps}")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value < SIZE_MULTIPLE or value % SIZE_MULTIPLE:
            lower = max(SIZE_MULTIPLE, value // SIZE_MULTIPLE * SIZE_MULTIPLE)
            raise InputError(f"--{name} must be a positive multiple of {SIZE_MULTIPLE}, got {value}; "
                             f"try {lower} or {lower + SIZE_MULTIPLE}")
    if args.sampler not in SAMPLER_NAMES:  # argparse checks too; this covers programmatic use
        raise InputError(f"unknown sampler {args.sampler!r}; valid samplers: {', '.join(SAMPLER_NAMES)}")

    long_video = task == "i2v" and args.chunk_frames is not None
    if args.frames < 1:
        raise InputError(f"--frames must be at least 1, got {args.frames}")
    if long_video:
        if args.chunk_frames < FRAME_MULTIPLE or args.chunk_frames % FRAME_MULTIPLE:
            raise InputError(f"--chunk-frames must be a positive multiple of {FRAME_MULTIPLE}, got {args.chunk_frames}")
        if not 1 <= args.overlap < args.chunk_frames:
            raise InputError(f"--overlap must be between 1 and --chunk-frames - 1, got {args.overlap}")
    elif args.frames != 1 and args.frames % FRAME_MULTIPLE:
        rounded = args.frames // FRAME_MULTIPLE * FRAME_MULTIPLE
        if rounded == 0:
            raise InputError(f"--frames must be 1 or a multiple of {FRAME_MULTIPLE}, got {args.frames}")
        notices.append(f"--frames {args.frames} is not a multiple of {FRAME_MULTIPLE}; using {rounded}")
        args.frames = rounded

    if args.device is not None:
        import torch

        try:
            device = torch.device(args.device)
        except RuntimeError as exc:
            raise InputError(f"--device {args.device!r} is not a torch device ({exc})") from exc
        if device.type == "cuda" and not torch.cuda.is_available():
            raise InputError(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")

    model = Path(args.model)
    if not model.is_dir():
        raise InputError(f"model folder not found: {model} (pass --model with the EasyAnimateV4 folder)")
    missing = [s for s in MODEL_SUBFOLDERS if not (model / s).is_dir()]
    if missing:
        raise InputError(f"{model} is not an EasyAnimate V4 model folder: missing {', '.join(missing)}")
    if args.lora is not None and not args.lora.is_file():
        raise InputError(f"LoRA file not found: {args.lora}")
    for flag, path in (("--transformer-path", args.transformer_path), ("--vae-path", args.vae_path)):
        if path is not None and not path.exists():
            raise InputError(f"{flag} {path}: no such file or folder")

    if task == "v2v" and not 0.0 < args.strength <= 1.0:
        raise InputError(f"--strength must be in (0, 1], got {args.strength}")

    job = Job(args=args, output=Path(), notices=notices)
    try:
        if task == "i2v":
            if args.frames == 1 and not long_video:
                raise InputError("image-to-video needs more than one frame (--frames)")
            # Several images are frames of the first pass (start) and the last (end): they must fit in it.
            one_pass = not long_video or args.frames <= args.chunk_frames
            pass_frames, where = (args.frames, "") if one_pass else (args.chunk_frames, " per chunk")
            known = {flag: len(paths) for flag, paths in (("--image", args.image), ("--end-image", args.end_image))
                     if paths is not None and len(paths) > 1}
            for flag, count in known.items():
                if count > pass_frames:
                    raise InputError(f"{flag}: {count} images but only {pass_frames} frames are generated{where}")
            if one_pass and len(known) == 2 and sum(known.values()) > pass_frames:
                raise InputError(f"{known['--image']} start and {known['--end-image']} end images overlap in "
                                 f"{pass_frames} frames: give fewer images or more --frames")
            job.image = _read_images(args.image)
            if args.end_image is not None:
                job.end_image = _read_images(args.end_image)
        if task == "v2v":
            video = read_video(args.video, num_frames=args.frames, size=(args.height, args.width))
            job.video = video[None]
    except MediaError as exc:
        raise InputError(str(exc)) from exc

    suffix = ".png" if args.frames == 1 and not long_video else ".mp4"
    if args.output is None:
        job.output = _next_free_output(Path(TASKS[task][1]), suffix)
    else:
        output = Path(args.output)
        if output.suffix.lower() not in VIDEO_SUFFIXES + IMAGE_SUFFIXES:
            raise InputError(f"--output {output}: use a .mp4, .gif or .png file name")
        if suffix == ".png" and output.suffix.lower() in VIDEO_SUFFIXES:
            notices.append(f"one frame is an image: writing {output.with_suffix('.png')} instead of {output}")
            output = output.with_suffix(".png")
        elif suffix == ".mp4" and output.suffix.lower() in IMAGE_SUFFIXES:
            raise InputError(f"--output {output} is an image file name but {args.frames} frames are generated; "
                             "use .mp4 or .gif")
        if output.exists() and not args.overwrite:
            raise InputError(f"--output {output} already exists; choose another name or pass --overwrite")
        job.output = output
    return job


def _read_images(paths: list[Path]):
    """One image as itself (the pipeline spreads it over 3 frames, as the original), several as a list of frames."""
    images = [read_image(path) for path in paths]
    return images[0] if len(images) == 1 else images


def _torch_dtype(name: str):
    import torch

    return None if name == "auto" else getattr(torch, name)


def load_pipeline(args: argparse.Namespace):
    """Load the pipeline with replacement weights loaded, the LoRA merged and the memory mode applied (weights
    first: offload hooks move them)."""
    import torch

    from easyanimate.pipeline import EasyAnimatePipeline, default_dtype
    from easyanimate.utils.weights import load_weights_into

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    offload = args.memory_mode != "none" and device.type == "cuda"
    # With offload the models load on the CPU, so pick the dtype for the GPU they will run on.
    dtype = _torch_dtype(args.dtype) or default_dtype(device)
    pipe = EasyAnimatePipeline.from_pretrained(
        args.model, torch_dtype=dtype, sampler=args.sampler, device="cpu" if offload else device
    )
    if args.transformer_path is not None:
        load_weights_into(pipe.transformer, args.transformer_path)
    if args.vae_path is not None:
        load_weights_into(pipe.vae, args.vae_path, ignore_prefixes=("loss.",))
    if args.lora is not None:
        pipe.load_lora(args.lora, args.lora_weight)
    if offload:
        if args.memory_mode == "model_cpu_offload":
            pipe.enable_model_cpu_offload(device=device)
        else:
            pipe.enable_sequential_cpu_offload(device=device)
    if args.vae_tiling:
        pipe.enable_vae_tiling()
    return pipe


def generate(task: str, job: Job, pipe):
    """Run the pipeline for a validated job; returns the video tensor (1, 3, F, H, W) in [0, 1]."""
    import torch

    args = job.args
    common = dict(
        negative_prompt=args.negative_prompt,
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        generator=torch.Generator("cpu").manual_seed(args.seed),
    )
    if task == "i2v" and args.chunk_frames is not None:
        return pipe.generate_long_video(
            args.prompt, video_length=args.frames, chunk_length=args.chunk_frames, overlap=args.overlap,
            image=job.image, end_image=job.end_image, **common,
        ).videos
    if task == "i2v":
        return pipe(args.prompt, video_length=args.frames, image=job.image, end_image=job.end_image, **common).videos
    if task == "v2v":
        mask = torch.full((1, 1, *job.video.shape[2:]), 255.0)  # generate everywhere, as the original passes it
        return pipe(args.prompt, video_length=args.frames, video=job.video, mask_video=mask, strength=args.strength,
                    **common).videos
    return pipe(args.prompt, video_length=args.frames, **common).videos


def main(task: str, argv: list[str] | None = None) -> Path:
    """Parse, validate, load, generate and save; returns the written file's path (also printed)."""
    parser = build_parser(task)
    args = parser.parse_args(argv)
    try:
        job = validate(task, args)
    except InputError as exc:
        parser.error(str(exc))
    for notice in job.notices:
        print(f"note: {notice}", file=sys.stderr)

    from easyanimate.utils.video_io import save_video

    from easyanimate.utils.weights import CheckpointError

    start = time.time()
    try:
        pipe = load_pipeline(args)
    except CheckpointError as exc:  # a corrupt or mismatched weights file: say which and why, no traceback
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    print(f"loaded {args.model} in {time.time() - start:.1f}s", file=sys.stderr)
    videos = generate(task, job, pipe)
    path = save_video(videos, job.output, fps=args.fps, color_transfer=args.color_transfer)
    print(path)
    return path
