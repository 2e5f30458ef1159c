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
import pickle
from pathlib import Path

import torch

from easyanimate.inference.request import MEMORY_MODE_ALIASES, MEMORY_MODES
from easyanimate.utils.weights import CheckpointError

logger = logging.getLogger(__name__)

# The subfolders every model folder has (image_encoder/ only the InP model).
MODEL_SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")

# The released transformer/config.json lacks the V4 inference switches; the original applied them from its V4 yaml.
V4_TRANSFORMER_OVERRIDES = {"basic_block_type": "basic", "after_norm": False, "time_position_encoding": True}

# The released image_encoder/ is a full CLIP checkpoint; only its vision half is run.
CLIP_UNUSED_PREFIXES = ("text_model.", "text_projection.", "logit_scale", "vision_model.embeddings.position_ids")


def default_dtype(device: torch.device) -> torch.dtype:
    """The compute dtype for ``device``: fp32 on a CPU; bf16 on GPUs that support it, fp16 on others (the VAE then
    stays in fp32, as the original's ``upcast_vae``)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


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
):
    """The pipeline of a model folder, ready to run on ``device`` (default: CUDA when available, else the CPU).

    ``transformer_weights`` / ``vae_weights`` replace the folder's weights (a ``.safetensors`` file or a folder such
    as train.py's ``OUTPUT_DIR/transformer``; strict). ``dtype`` ("auto"/None, "float32", "bfloat16", "float16" or a
    torch dtype) defaults to :func:`default_dtype` of the device the models run on. ``memory_mode`` matters only on
    an accelerator: "gpu" keeps everything there, "model_cpu_offload" moves each model in while it runs,
    "sequential_cpu_offload" streams every layer (least memory, slowest). Replacement weights are loaded before the
    offload hooks, which move weights.
    """
    from easyanimate.pipeline import EasyAnimatePipeline
    from easyanimate.utils.weights import load_weights_into

    memory_mode = MEMORY_MODE_ALIASES.get(memory_mode, memory_mode)
    if memory_mode not in MEMORY_MODES:
        raise ValueError(f"unknown memory mode {memory_mode!r}; choose one of {', '.join(MEMORY_MODES)}")
    check_model_folder(model_dir)
    device = resolve_device(device)
    if isinstance(dtype, str):
        dtype = None if dtype == "auto" else getattr(torch, dtype)
    offload = device.type == "cuda" and memory_mode != "gpu"
    # With offload the models load on the CPU, so the dtype is picked for the GPU they will run on.
    pipe = EasyAnimatePipeline.from_pretrained(model_dir, torch_dtype=dtype or default_dtype(device), sampler=sampler,
                                               device="cpu" if offload else device)
    if transformer_weights is not None:
        load_weights_into(pipe.transformer, transformer_weights)
    if vae_weights is not None:
        load_weights_into(pipe.vae, vae_weights, ignore_prefixes=("loss.",))  # train_vae.py saves its loss nets
    if memory_mode == "model_cpu_offload" and offload:
        pipe.enable_model_cpu_offload(device=device)
    elif memory_mode == "sequential_cpu_offload" and offload:
        pipe.enable_sequential_cpu_offload(device=device)
    if vae_tiling:
        pipe.enable_vae_tiling()
    return pipe


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
