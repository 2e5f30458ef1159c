"""Loading a model folder in the released ``EasyAnimateV4-XL-2-InP`` layout into an :class:`EasyAnimatePipeline`.

Layout: ``transformer/``, ``vae/``, ``text_encoder/`` (BERT) + ``tokenizer/``, ``text_encoder_2/`` (mT5) +
``tokenizer_2/``, ``scheduler/`` and, for the image-to-video ("InP") transformer, ``image_encoder/`` (a full CLIP
checkpoint of which only the vision half runs). ``model_index.json`` is informational only: the released one names
HunyuanDiT / AutoencoderKL classes that are not what the folder holds.

Every component is loaded strictly (no missing, unexpected or wrongly shaped key); a missing or broken part raises
:class:`CheckpointError` naming its folder. Weights are read with safetensors, or ``torch.load(weights_only=True)``
for ``.bin`` files, so no pickled code runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
from pathlib import Path

import torch

from easyanimate.inference.request import FP8_MEMORY_MODES, MEMORY_MODE_ALIASES, MEMORY_MODES, RequestError
from easyanimate.utils.weights import CheckpointError

logger = logging.getLogger(__name__)

# The subfolders every model folder has (image_encoder/ only the InP model).
MODEL_SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")

# The released transformer/config.json lacks the V4 inference switches; the original applied them from its V4 yaml.
V4_TRANSFORMER_OVERRIDES = {"basic_block_type": "basic", "after_norm": False, "time_position_encoding": True}

# The released image_encoder/ is a full CLIP checkpoint; only its vision half is run.
CLIP_UNUSED_PREFIXES = ("text_model.", "text_projection.", "logit_scale", "vision_model.embeddings.position_ids")

# The memory modes from the most GPU memory to the least: what an out-of-memory error suggests next.
MEMORY_MODES_BY_GPU_MEMORY = ("gpu", "model_cpu_offload", "model_cpu_offload_and_fp8", "sequential_cpu_offload")
OUT_OF_MEMORY_ERRORS = tuple({getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),
                              torch.cuda.OutOfMemoryError})


class OutOfGPUMemory(RequestError):
    """The GPU ran out of memory; the message names the memory mode, frame count or size to try instead."""


# Overrides the CPU's automatic dtype choice (float32 or bfloat16), e.g. to reproduce a fp32 result on a bf16 CPU.
CPU_DTYPE_ENV = "EASYANIMATE_CPU_DTYPE"


def default_dtype(device: torch.device) -> torch.dtype:
    """The compute dtype for ``device``. GPUs: bf16 where supported, else fp16 (the VAE then stays in fp32, as the
    original's ``upcast_vae``). CPUs: :func:`cpu_default_dtype`."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return cpu_default_dtype() if device.type == "cpu" else torch.float32


def cpu_default_dtype() -> torch.dtype:
    """bf16 on CPUs that multiply bf16 matrices in hardware (AMX or AVX-512 BF16), fp32 on the others, unless
    ``EASYANIMATE_CPU_DTYPE`` says ``float32`` or ``bfloat16``.

    Why: where the instructions exist a whole generation runs ~1.2x (the demo) to ~2x (a hidden-512 model) faster
    in bf16, and the demo's judged accuracy holds (see the README's "bf16 on a CPU"); without them oneDNN emulates
    bf16 and it is up to ~100x slower. The choice follows the CPU's flags rather than a timing at start-up, so the
    same machine always picks the same dtype and the same seed gives the same video.
    """
    from easyanimate.utils.system import cpu_native_bf16

    choice = os.environ.get(CPU_DTYPE_ENV, "auto").strip().lower()
    if choice in ("float32", "fp32"):
        return torch.float32
    if choice in ("bfloat16", "bf16"):
        return torch.bfloat16
    if choice != "auto":
        raise RequestError(f"{CPU_DTYPE_ENV}={choice!r} is not a dtype this project runs on a CPU: set it to float32, "
                         "bfloat16 or auto (or unset it)")
    return torch.bfloat16 if cpu_native_bf16() else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """A torch dtype by the name requests and settings use: ``torch.bfloat16`` -> "bfloat16"."""
    return str(dtype).removeprefix("torch.")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a torch device; None means CUDA when available, else the CPU."""
    return torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))


def check_model_folder(folder: str | Path) -> Path:
    """Raise :class:`CheckpointError` unless ``folder`` exists and has the released layout's subfolders; a cheap
    check (no file is read) so a front end can refuse a wrong folder before minutes of loading."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"model folder not found: {folder}")
    missing = [name for name in MODEL_SUBFOLDERS if not (folder / name).is_dir()]
    if missing:
        raise CheckpointError(f"{folder} is not an EasyAnimate V4 model folder: missing {', '.join(missing)}")
    return folder


def folder_is_inpaint(folder: str | Path) -> bool | None:
    """Whether the folder's transformer is the image-to-video (InP) model, read from its config.json alone (the same
    rule as ``HunyuanTransformer3DModel.is_inpaint``); None when that file cannot be read (loading will say why)."""
    from easyanimate.models.transformer import config_is_inpaint

    try:
        return config_is_inpaint(_read_json(Path(folder) / "transformer" / "config.json", "transformer config"))
    except CheckpointError:
        return None


def check_device(name: str) -> torch.device:
    """``name`` as a torch device that exists here; ``ValueError`` naming the problem otherwise."""
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"{name!r} is not a torch device ({exc})") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name}: CUDA is not available on this machine; use cpu")
    return device


def load_components(model_dir: str | Path, dtype: torch.dtype, sampler: str = "Euler") -> dict:
    """Every component of a model folder, on the CPU, as keyword arguments of ``EasyAnimatePipeline(...)``.

    The transformer, text encoders and image encoder are in ``dtype``; the VAE too, except that fp16 keeps it in
    fp32 (an fp16 VAE overflows). The scheduler is ``sampler`` built from ``scheduler/scheduler_config.json``.
    """
    from transformers import BertModel, BertTokenizer, CLIPVisionModelWithProjection, T5EncoderModel, T5Tokenizer

    from easyanimate.models.transformer import HunyuanTransformer3DModel
    from easyanimate.models.vae import AutoencoderKLMagvit
    from easyanimate.pipeline import make_scheduler

    try:  # transformers 5: the PIL backend is what the original (transformers 4.44) computed; pin it
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor

    root = Path(model_dir)
    if not root.is_dir():
        raise CheckpointError(f"model folder not found: {root}")
    index_file = root / "model_index.json"
    if index_file.is_file():
        logger.info("model_index.json names %s (informational only)", _read_json(index_file, "model index").get(
            "_class_name"))
    vae_dtype = torch.float32 if dtype == torch.float16 else dtype
    scheduler_config = read_scheduler_config(root)
    # Models are built in fp32; cast only when needed (diffusers warns on every dtype cast).
    transformer = HunyuanTransformer3DModel.from_pretrained(
        root, subfolder="transformer", torch_dtype=None if dtype == torch.float32 else dtype,
        **V4_TRANSFORMER_OVERRIDES,
    )
    if not (root / "vae" / "config.json").is_file():
        raise CheckpointError(f"VAE: no config.json in {root / 'vae'}")
    vae = AutoencoderKLMagvit.from_pretrained(
        root, subfolder="vae", torch_dtype=None if vae_dtype == torch.float32 else vae_dtype
    ).eval()
    components = dict(
        transformer=transformer,
        vae=vae,
        text_encoder=_load_hf_model(BertModel, root / "text_encoder", dtype, allowed_unused=("pooler.",),
                                    add_pooling_layer=False),
        tokenizer=_load_tokenizer(BertTokenizer, root / "tokenizer"),
        text_encoder_2=_load_hf_model(T5EncoderModel, root / "text_encoder_2", dtype),
        tokenizer_2=_load_tokenizer(T5Tokenizer, root / "tokenizer_2"),
        scheduler=make_scheduler(sampler, scheduler_config),
        image_encoder=None,
        image_processor=None,
    )
    if transformer.is_inpaint:
        folder = root / "image_encoder"
        if not folder.is_dir():
            raise CheckpointError(f"the transformer is an InP (image-to-video) model but {folder} is missing")
        components["image_encoder"] = _load_hf_model(CLIPVisionModelWithProjection, folder, dtype,
                                                     allowed_unused=CLIP_UNUSED_PREFIXES)
        components["image_processor"] = _load_tokenizer(CLIPImageProcessor, folder)
    return components


def read_scheduler_config(model_dir: str | Path) -> dict:
    """``scheduler/scheduler_config.json``: every sampler is built from it (keys a sampler does not know are
    dropped then, so it must be kept whole, not as the first sampler's filtered config)."""
    return _read_json(Path(model_dir) / "scheduler" / "scheduler_config.json", "scheduler")


def load_pipeline(
    model_dir: str | Path,
    transformer_weights: str | Path | None = None,
    *,
    vae_weights: str | Path | None = None,
    memory_mode: str = "model_cpu_offload",
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    sampler: str = "Euler",
    vae_tiling: bool = False,
    compile: bool = False,
    ulysses_degree: int = 1,
    ring_degree: int = 1,
):
    """The pipeline of a model folder, ready to run on ``device`` (default: CUDA when available, else the CPU).

    ``transformer_weights`` / ``vae_weights`` replace the folder's weights (a ``.safetensors`` file or a folder such
    as train.py's ``OUTPUT_DIR/transformer``; strict). ``dtype`` ("auto"/None, "float32", "bfloat16", "float16" or a
    torch dtype) defaults to :func:`default_dtype` of the device the models run on. ``memory_mode`` (see
    :func:`apply_memory_mode`): "gpu", "model_cpu_offload", "model_cpu_offload_and_fp8" (or the original's name
    "model_cpu_offload_and_qfloat8") or "sequential_cpu_offload"; only the fp8 storage of the fp8 mode applies on a
    CPU. ``compile`` compiles each transformer block (:mod:`easyanimate.models.compiled`) on its first call.
    ``ulysses_degree x ring_degree`` > 1 splits the transformer's tokens across the processes of this launch
    (:mod:`easyanimate.models.sequence_parallel`), connecting them first
    (:func:`easyanimate.inference.distributed.setup_sequence_parallel`; a CUDA device becomes ``cuda:LOCAL_RANK``).

    Raises :class:`~easyanimate.inference.request.RequestError` naming what to use instead, before anything is
    loaded, when this torch or device cannot store fp8 weights or compile, and :class:`OutOfGPUMemory` when the
    models do not fit the GPU (``memory_mode`` "gpu").
    """
    from easyanimate.pipeline import EasyAnimatePipeline
    from easyanimate.utils.weights import load_weights_into

    memory_mode = canonical_memory_mode(memory_mode)
    check_model_folder(model_dir)
    parallel = ulysses_degree * ring_degree > 1
    if parallel:
        from easyanimate.inference.distributed import setup_sequence_parallel

        device = setup_sequence_parallel(ulysses_degree, ring_degree, device)  # this process's device
    device = resolve_device(device)
    check_model_options(memory_mode, compile, device)
    if isinstance(dtype, str):
        dtype = None if dtype == "auto" else getattr(torch, dtype)
    offload = device.type == "cuda" and memory_mode != "gpu"
    # With offload the models load on the CPU, so the dtype is picked for the GPU they will run on.
    with advise_on_out_of_memory(memory_mode):
        pipe = EasyAnimatePipeline.from_pretrained(model_dir, torch_dtype=dtype or default_dtype(device),
                                                   sampler=sampler, device="cpu" if offload else device)
    if transformer_weights is not None:
        load_weights_into(pipe.transformer, transformer_weights)
    if vae_weights is not None:
        load_weights_into(pipe.vae, vae_weights, ignore_prefixes=("loss.",))  # train_vae.py saves its loss nets
    apply_memory_mode(pipe, memory_mode, device)
    if compile:
        from easyanimate.models.compiled import compile_blocks

        compile_blocks(pipe.transformer)
    if parallel:
        from easyanimate.models.sequence_parallel import enable_sequence_parallel

        if enable_sequence_parallel(pipe.transformer, ulysses_degree, ring_degree).rank != 0:
            pipe.set_progress_bar_config(disable=True)  # one progress bar per launch, rank 0's
    if vae_tiling:
        pipe.enable_vae_tiling()
    return pipe


def canonical_memory_mode(memory_mode: str) -> str:
    """``memory_mode`` with aliases resolved ("none" -> "gpu", "model_cpu_offload_and_qfloat8" ->
    "model_cpu_offload_and_fp8"); ``ValueError`` for an unknown one."""
    memory_mode = MEMORY_MODE_ALIASES.get(memory_mode, memory_mode)
    if memory_mode not in MEMORY_MODES:
        raise ValueError(f"unknown memory mode {memory_mode!r}; choose one of {', '.join(MEMORY_MODES)}")
    return memory_mode


def check_model_options(memory_mode: str, compile: bool, device: torch.device) -> None:
    """Raise :class:`~easyanimate.inference.request.RequestError` naming what to use instead when ``memory_mode``
    stores fp8 weights that this torch or ``device`` cannot cast, or when ``compile`` cannot run here (no
    torch.compile for this Python, no Triton on the GPU, no C++ compiler for the CPU, sequential offload). Cheap:
    nothing is loaded."""
    from easyanimate.models.compiled import CompileUnavailable, check_compile_support
    from easyanimate.models.fp8 import Fp8Unavailable, check_fp8_support

    memory_mode = canonical_memory_mode(memory_mode)
    if memory_mode in FP8_MEMORY_MODES:
        try:
            check_fp8_support(device)
        except Fp8Unavailable as exc:
            raise RequestError(f"memory mode {memory_mode}: {exc}") from exc
    if compile:
        try:
            check_compile_support(device, memory_mode=memory_mode)
        except CompileUnavailable as exc:
            raise RequestError(f"compile: {exc}") from exc


def apply_memory_mode(pipe, memory_mode: str, device: torch.device | str) -> None:
    """Put a loaded pipeline in ``memory_mode`` for ``device``: "model_cpu_offload_and_fp8" first stores the
    transformer's large Linear weights in fp8 (:func:`easyanimate.models.fp8.enable_fp8_weights`; on any device);
    then, on a CUDA device, "model_cpu_offload" and the fp8 mode move each model to the GPU while it runs,
    "sequential_cpu_offload" streams every layer (least memory, slowest), and "gpu" leaves everything where it was
    loaded. Call it once, after replacement weights are loaded (offload hooks move weights)."""
    memory_mode = canonical_memory_mode(memory_mode)
    device = torch.device(device)
    if memory_mode in FP8_MEMORY_MODES:
        from easyanimate.models.fp8 import enable_fp8_weights

        # the rounding runs on the GPU when there is one, layer by layer, while the weights stay on the CPU
        enable_fp8_weights(pipe.transformer, work_device=device if device.type == "cuda" else None)
    if device.type != "cuda" or memory_mode == "gpu":
        return
    if memory_mode == "sequential_cpu_offload":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.enable_model_cpu_offload(device=device)


def out_of_memory_advice(memory_mode: str, height: int | None = None, width: int | None = None,
                         frames: int | None = None, vae_tiling: bool = False) -> str:
    """What to try after the GPU ran out of memory: the next memory mode that needs less GPU memory, fewer frames
    (half, kept a multiple of 8) or a smaller size (both sides scaled by ~0.7, so half the pixels, multiples of
    16), and VAE tiling when it is off (decoding large frames is often the peak)."""
    memory_mode = canonical_memory_mode(memory_mode)
    tries = []
    order = MEMORY_MODES_BY_GPU_MEMORY
    if order.index(memory_mode) + 1 < len(order):
        tries.append(f"memory mode {order[order.index(memory_mode) + 1]}")
    if frames is not None and frames > 8:
        tries.append(f"{max(8, frames // 2 // 8 * 8)} frames instead of {frames}")
    if height is not None and width is not None and max(height, width) > 256:
        smaller = [max(16, int(side * 0.707) // 16 * 16) for side in (height, width)]
        tries.append(f"a size of {smaller[0]}x{smaller[1]} instead of {height}x{width}")
    if not vae_tiling:
        tries.append("VAE tiling")
    if not tries:
        return "the GPU is too small for this model"
    return "try " + ", or ".join(tries)


@contextlib.contextmanager
def advise_on_out_of_memory(memory_mode: str, height: int | None = None, width: int | None = None,
                            frames: int | None = None, vae_tiling: bool = False):
    """Inside the block, a CUDA out-of-memory error becomes :class:`OutOfGPUMemory` whose message names what to try
    instead (:func:`out_of_memory_advice`); the cached GPU memory is released first so that the next try can use
    it."""
    try:
        yield
    except OUT_OF_MEMORY_ERRORS as exc:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        size = f" at {height}x{width}, {frames} frames" if height and width and frames else ""
        raise OutOfGPUMemory(f"out of GPU memory{size} in memory mode {canonical_memory_mode(memory_mode)}: "
                             f"{out_of_memory_advice(memory_mode, height, width, frames, vae_tiling)}") from exc


# ------------------------------------------------------------------------------------------------- helpers
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
    checkpoint); :func:`_load_hf_model` checks the report itself, so silence it while loading."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _load_hf_model(cls, folder: Path, torch_dtype, allowed_unused: tuple[str, ...] = (), **kwargs):
    """A transformers model loaded strictly: every model key must come from the checkpoint, and checkpoint keys may
    be left over only if they start with one of ``allowed_unused`` (the parts of a bigger checkpoint not run)."""
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


def _load_tokenizer(cls, folder: Path):
    if not folder.is_dir():
        raise CheckpointError(f"{cls.__name__}: folder {folder} is missing")
    try:
        return cls.from_pretrained(folder)
    except (OSError, ValueError, RuntimeError, TypeError) as exc:
        hint = " (the T5 tokenizer needs the sentencepiece and protobuf packages)" if "T5" in cls.__name__ else ""
        raise CheckpointError(f"cannot load {cls.__name__} from {folder}: {exc}{hint}") from exc
