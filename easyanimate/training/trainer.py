"""The transformer training loop (full fine-tune or LoRA) on accelerate.

Read :func:`train` top to bottom: build the data, load the model folder and choose what trains, build the
optimiser, resume, then train epoch by epoch (:func:`train_epochs`), and every N steps log, checkpoint and render
validation samples. One micro-batch's loss (:func:`compute_loss`) encodes the batch with the frozen VAE / text
encoders / CLIP image encoder and regresses the transformer's output on the v-prediction target
(:mod:`easyanimate.training.objective`), or with ``--lcm_distillation`` distils the frozen model into an LCM-LoRA
(:mod:`easyanimate.training.lcm`).

Randomness (frame windows, masks, noise, timesteps, VAE posterior samples, CLIP drop) is keyed per sample, so a
resumed run reproduces the uninterrupted one and N processes reproduce one process with the same global batch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..data.buckets import BucketBatchSampler, BucketCollate, bucket_ratios
from ..data.dataset import DataError, DataHealth, VideoImageDataset, compose_entries
from ..data.metadata import load_metadata
from ..data.seeding import POSTERIOR, keyed_randn
from ..utils.weights import CheckpointError, load_weights_into
from .checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from .config import TrainConfig
from .lcm import LCMDistillation
from .objective import DiffusionObjective, clip_keep_mask, inpaint_condition_flags

logger = logging.getLogger(__name__)

LORA_STATE_FILE = "lora_diffusion_pytorch_model.safetensors"


# ------------------------------------------------------------------------------------------------ models
@dataclass
class FrozenModels:
    """The conditioning models, frozen and in the compute dtype, plus the pipeline (for validation)."""

    pipeline: object
    vae: nn.Module
    text_encoder: nn.Module
    text_encoder_2: nn.Module
    tokenizer: object
    tokenizer_2: object
    image_encoder: nn.Module | None
    image_processor: object | None
    text_lengths: tuple[int, int] = (77, 256)  # BERT and mT5 token counts (the transformer's text_len, text_len_t5)
    text_cache: dict | None = None  # caption -> embeddings, when precomputed


@contextlib.contextmanager
def on_device(modules: Sequence[nn.Module | None], device, enabled: bool = True):
    """``--low_vram``: move ``modules`` (parked on the CPU) to ``device`` for the block and back afterwards,
    emptying the CUDA cache, so only the transformer stays resident. Does nothing when not ``enabled``."""
    modules = [m for m in modules if m is not None]
    if not enabled or not modules:
        yield
        return
    for module in modules:
        module.to(device)
    try:
        yield
    finally:
        for module in modules:
            module.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class TrainableTransformer(nn.Module):
    """What the optimizer and DDP see: the transformer and, in LoRA mode, the LoRA network whose adapters hook
    into the transformer's Linears (calling ``forward`` here runs them, so DDP syncs their gradients)."""

    def __init__(self, transformer: nn.Module, lora_network: nn.Module | None = None):
        super().__init__()
        self.transformer = transformer
        self.lora_network = lora_network

    def forward(self, **inputs):
        return self.transformer(**inputs, return_dict=False)[0]


def load_models(cfg: TrainConfig, device: torch.device, weight_dtype: torch.dtype):
    """The transformer (fp32 master weights) and the frozen models from the released folder layout."""
    from ..pipeline import EasyAnimatePipeline, text_lengths

    pipe = EasyAnimatePipeline.from_pretrained(cfg.pretrained_model_name_or_path, torch_dtype=torch.float32, device="cpu")
    transformer = pipe.transformer
    if cfg.transformer_path:
        try:
            load_weights_into(transformer, cfg.transformer_path,
                              adapt=_adapt_channels(cfg.transformer_path) if cfg.adapt_transformer_channels else None)
        except CheckpointError as exc:
            if cfg.adapt_transformer_channels or "pos_embed.proj.weight" not in str(exc):
                raise
            raise CheckpointError(f"{exc}\n  weights made for other input channels (e.g. a 4-channel HunyuanDiT or "
                                  "text-to-video model) load with --adapt_transformer_channels") from None
    if cfg.vae_path:
        load_weights_into(pipe.vae, cfg.vae_path, ignore_prefixes=("loss.",))
    if cfg.train_mode == "inpaint" and not transformer.is_inpaint:
        raise ValueError(
            f"--train_mode inpaint needs the image-to-video (InP) transformer, but {cfg.pretrained_model_name_or_path} "
            f"has in_channels={transformer.config.in_channels}; use --train_mode normal for a text-to-video model"
        )
    if cfg.train_mode == "normal" and transformer.is_inpaint:
        raise ValueError("--train_mode normal with an InP transformer leaves its inpaint inputs untrained; use inpaint")
    frozen = [pipe.vae, pipe.text_encoder, pipe.text_encoder_2] + ([pipe.image_encoder] if pipe.image_encoder else [])
    for module in frozen:
        parked = cfg.low_vram and module is not pipe.image_encoder  # moved in by on_device() when they encode
        module.requires_grad_(False).eval().to("cpu" if parked else device, weight_dtype)
    frozen_models = FrozenModels(
        pipeline=pipe, vae=pipe.vae, text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2,
        tokenizer=pipe.tokenizer, tokenizer_2=pipe.tokenizer_2,
        image_encoder=pipe.image_encoder if cfg.train_mode == "inpaint" else None,
        image_processor=pipe.image_processor if cfg.train_mode == "inpaint" else None,
        text_lengths=text_lengths(transformer),
    )
    return transformer.to(device), frozen_models


def _adapt_channels(source: str):
    """Fit a transformer checkpoint with other input/output channel counts to the model (a 4-channel HunyuanDiT
    or text-to-video checkpoint into the 12-channel InP model: the new inputs zero-filled), saying what changed."""
    from ..models.transformer import adapt_checkpoint_channels

    def adapt(model, state_dict):
        state_dict, report = adapt_checkpoint_channels(model, state_dict)
        if report:
            logger.warning("adapted %s to the model:\n%s", source, report.summary())
        return state_dict

    return adapt


def select_trainable(transformer: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Parameter groups: names containing a ``trainable_modules`` string at lr, ``…_low_learning_rate`` at lr/2."""
    normal, low = [], []
    for name, param in transformer.named_parameters():
        if any(s in name for s in cfg.trainable_modules_low_learning_rate):
            low.append(param)
        elif any(s in name for s in cfg.trainable_modules):
            normal.append(param)
        else:
            param.requires_grad_(False)
    if not normal and not low:
        raise ValueError(f"--trainable_modules {cfg.trainable_modules} matches no transformer parameter name")
    groups = [{"params": normal, "lr": cfg.learning_rate}]
    if low:
        groups.append({"params": low, "lr": cfg.learning_rate / 2})
    return [g for g in groups if g["params"]]


def make_optimizer(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over ``groups`` (bitsandbytes' AdamW8bit with ``--use_8bit_adam``, CAME with ``--use_came``); each
    group keeps its own learning rate."""
    if cfg.use_came:
        from came_pytorch.CAME import CAME  # the package's __init__ exports nothing

        # the original's CAME settings; each group keeps its own learning rate
        return CAME(groups, lr=cfg.learning_rate, betas=(0.9, 0.999, 0.9999), eps=(1e-30, 1e-16), weight_decay=0.0)
    kwargs = dict(betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes
        except ImportError as exc:
            raise ImportError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes (CUDA only)") from exc
        return bitsandbytes.optim.AdamW8bit(groups, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


def adaptive_clip_norm(step: int, grad_norm: float, cfg: TrainConfig) -> float:
    """The original's clip value: from ``initial_grad_norm_ratio * max_grad_norm`` down to ``max_grad_norm`` over the
    first ``abnormal_norm_clip_start`` steps; afterwards an abnormally large norm (> 5x) is damped further."""
    base = cfg.max_grad_norm
    start = cfg.abnormal_norm_clip_start
    if step < start:
        ratio = cfg.initial_grad_norm_ratio
        return base * (ratio - (ratio - 1) * step / max(start, 1))
    excess = grad_norm / base
    return base / min(excess, 10.0) if excess > 5 else base


def largest_grad_norms(params: Sequence[nn.Parameter], names: Sequence[str], count: int = 10) -> dict[str, float]:
    """The ``count`` largest gradient L2 norms by parameter name, largest first (``--report_model_info``)."""
    norms = [(float(p.grad.detach().float().norm()), n) for p, n in zip(params, names) if p.grad is not None]
    return {name: norm for norm, name in sorted(norms, reverse=True)[:count]}


# ------------------------------------------------------------------------------------------------ encoding
def sample_posterior(vae, pixels: torch.Tensor, keys: Sequence[tuple], replicas: int, seed: int, tag: int,
                     mini_batch: int) -> torch.Tensor:
    """VAE-encode ``(B, 3, F, H, W)`` in chunks of ``mini_batch`` samples and draw ``replicas`` posterior samples of
    each, every one with its own keyed noise (``keys`` has ``B * replicas`` entries, sample-major). Returns the
    latents × ``scaling_factor``."""
    out = []
    for start in range(0, pixels.shape[0], mini_batch):
        dist = vae.encode(pixels[start : start + mini_batch].to(vae.dtype)).latent_dist
        mean, std = dist.mean.float(), dist.std.float()
        for i in range(mean.shape[0]):
            for r in range(replicas):
                key = keys[(start + i) * replicas + r]
                noise = keyed_randn(mean.shape[1:], (seed, POSTERIOR, tag, *key), device=mean.device)
                out.append(mean[i] + std[i] * noise)
    return torch.stack(out) * vae.config.scaling_factor


@torch.no_grad()
def encode_text(frozen: FrozenModels, texts: Sequence[str], device, dtype):
    """BERT and mT5 last hidden states (``frozen.text_lengths`` tokens: 77 and 256 for V4) with their masks,
    padded/truncated as the original's training does. With ``frozen.text_cache`` (precomputed embeddings) cached
    captions are not re-encoded."""
    cache = frozen.text_cache
    missing = [t for t in dict.fromkeys(texts) if cache is None or t not in cache]
    rows = {}
    if missing:
        if frozen.text_encoder is None:
            raise RuntimeError(f"caption {missing[0]!r} is not among the precomputed text embeddings")
        enc_device = next(frozen.text_encoder.parameters()).device
        bert = frozen.tokenizer(missing, padding="max_length", max_length=frozen.text_lengths[0], truncation=True,
                                return_tensors="pt")
        t5 = frozen.tokenizer_2(missing, padding="max_length", max_length=frozen.text_lengths[1], truncation=True,
                                return_tensors="pt")
        emb = frozen.text_encoder(bert.input_ids.to(enc_device), attention_mask=bert.attention_mask.to(enc_device))[0]
        emb_2 = frozen.text_encoder_2(t5.input_ids.to(enc_device), attention_mask=t5.attention_mask.to(enc_device))[0]
        for i, text in enumerate(missing):
            rows[text] = (emb[i], bert.attention_mask[i], emb_2[i], t5.attention_mask[i])
            if cache is not None:
                cache[text] = tuple(x.cpu() for x in rows[text])
    rows = [rows[t] if t in rows else cache[t] for t in texts]
    return tuple(torch.stack([r[k].to(device) for r in rows]).to(dtype if k in (0, 2) else torch.long)
                 for k in range(4))


@torch.no_grad()
def encode_clip(frozen: FrozenModels, clip_pixels: torch.Tensor, device, dtype) -> torch.Tensor:
    """CLIP vision patch tokens (``last_hidden_state`` without CLS) of uint8 ``(B, H, W, 3)`` frames."""
    images = [frame.cpu().numpy() for frame in clip_pixels]
    pixels = frozen.image_processor(images=images, return_tensors="pt").pixel_values
    encoder_dtype = next(frozen.image_encoder.parameters()).dtype
    tokens = frozen.image_encoder(pixels.to(device, encoder_dtype)).last_hidden_state[:, 1:]
    return tokens.to(dtype)


def prepare_batch(transformer: nn.Module, frozen: FrozenModels, objective: DiffusionObjective, batch: dict,
                  cfg: TrainConfig, device, weight_dtype) -> tuple[torch.Tensor, list, dict]:
    """The clean latents ``(B * replicas, C, F, h, w)``, the per-sample randomness keys, and the transformer's
    conditioning keyword arguments (text, image meta size, style, RoPE and in inpaint mode the mask / masked-video
    latents and CLIP tokens) of one batch. Every sample appears ``replicas`` times in a row (token-length
    replication), each copy with its own key and so its own noise."""
    replicas = int(batch["replicas"])
    base_keys = [(int(batch["epoch"]), int(p)) for p in batch["positions"]]
    keys = [(*k, r) for k in base_keys for r in range(replicas)]  # x2/x4 token-length replication, sample-major

    pixels = batch["pixel_values"].to(device, weight_dtype).transpose(1, 2)  # B, 3, F, H, W
    with torch.no_grad(), on_device([frozen.vae], device, cfg.low_vram):
        latents = sample_posterior(frozen.vae, pixels, keys, replicas, objective.seed, 0, cfg.vae_mini_batch)
        texts = [t for t in batch["text"] for _ in range(replicas)]
        with on_device([frozen.text_encoder, frozen.text_encoder_2], device, cfg.low_vram):
            bert, bert_mask, t5, t5_mask = encode_text(frozen, texts, device, weight_dtype)
        extra = {}
        if cfg.train_mode == "inpaint":
            extra = inpaint_conditioning(transformer, frozen, batch, latents, keys, objective.seed, cfg, device,
                                         weight_dtype)

    from ..models.rope import rope_for_size

    height, width = pixels.shape[-2:]
    rows = latents.shape[0]
    conditioning = dict(
        encoder_hidden_states=bert,
        text_embedding_mask=bert_mask,
        encoder_hidden_states_t5=t5,
        text_embedding_mask_t5=t5_mask,
        image_meta_size=torch.tensor([[1024, 1024, height, width, 0, 0]] * rows, device=device, dtype=weight_dtype),
        style=torch.zeros(rows, dtype=torch.long, device=device),
        image_rotary_emb=rope_for_size(height, width, transformer.config.attention_head_dim,
                                       patch_size=transformer.config.patch_size),
        **extra,
    )
    return latents, keys, conditioning


def inpaint_conditioning(transformer: nn.Module, frozen: FrozenModels, batch: dict, latents: torch.Tensor,
                         keys: list, seed: int, cfg: TrainConfig, device, weight_dtype) -> dict:
    """Inpaint mode's transformer inputs for the latents of :func:`prepare_batch` (with the VAE on ``device``):
    ``inpaint_latents``, the VAE-encoded mask and masked video, zeroed for the samples trained as text-to-video;
    the CLIP tokens of each sample's reference frame; and ``clip_attention_mask``, which drops them per sample."""
    replicas = int(batch["replicas"])
    mask = batch["mask"].to(device, weight_dtype).transpose(1, 2)  # B, 1, F, H, W; 1 = generate
    masked = batch["mask_pixel_values"].to(device, weight_dtype).transpose(1, 2)
    flags = inpaint_condition_flags(batch["mask"].repeat_interleave(replicas, 0), keys, seed)
    inpaint = torch.zeros(latents.shape[0], 2 * latents.shape[1], *latents.shape[2:], device=device)
    # samples whose condition is zeroed (text-to-video) skip the two VAE encodes: a pure saving, since all
    # noise is keyed per sample the other samples' latents are unchanged
    used = flags.view(-1, replicas).amax(dim=1) > 0
    if used.any():
        idx = used.nonzero().flatten().tolist()
        rows = [i * replicas + r for i in idx for r in range(replicas)]
        sub_keys = [keys[row] for row in rows]
        # the {0, 1} mask is encoded as if it were an image (tiled to 3 channels), as the original does
        mask_latents = sample_posterior(frozen.vae, mask[idx].expand(-1, 3, -1, -1, -1), sub_keys, replicas,
                                        seed, 1, cfg.vae_mini_batch)
        masked_latents = sample_posterior(frozen.vae, masked[idx], sub_keys, replicas, seed, 2, cfg.vae_mini_batch)
        inpaint[rows] = torch.cat([mask_latents, masked_latents], dim=1).float()
    flags = flags.to(device)[:, None, None, None, None]
    clip_tokens = encode_clip(frozen, batch["clip_pixel_values"], device, weight_dtype)
    return {
        "inpaint_latents": (inpaint * flags).to(weight_dtype),
        "clip_encoder_hidden_states": clip_tokens.repeat_interleave(replicas, 0),
        "clip_attention_mask": clip_keep_mask(keys, seed, transformer.config.n_query).to(device, weight_dtype),
    }


def compute_lcm_loss(model: nn.Module, transformer: nn.Module, lora_network, frozen: FrozenModels,
                     distillation: LCMDistillation, batch: dict, cfg: TrainConfig, device, weight_dtype) -> torch.Tensor:
    """The LCM distillation loss of one batch: the LoRA student against the guided, frozen teacher (the same
    transformer with the LoRA detached). The unconditional input has empty captions and no CLIP image tokens; the
    inpaint latents stay."""
    latents, keys, conditioning = prepare_batch(transformer, frozen, distillation.objective, batch, cfg, device,
                                                weight_dtype)
    with torch.no_grad():
        bert, bert_mask, t5, t5_mask = encode_text(frozen, [""] * latents.shape[0], device, weight_dtype)
    unconditional = {**conditioning, "encoder_hidden_states": bert, "text_embedding_mask": bert_mask,
                     "encoder_hidden_states_t5": t5, "text_embedding_mask_t5": t5_mask}
    for key in ("clip_encoder_hidden_states", "clip_attention_mask"):
        if key in unconditional:
            unconditional[key] = torch.zeros_like(unconditional[key])

    def student(x, t, inputs):
        return model(hidden_states=x, timestep=t, **inputs)

    def teacher(x, t, inputs):
        with lora_network.detached():
            return transformer(hidden_states=x, timestep=t, **inputs, return_dict=False)[0]

    return distillation.loss(student, teacher, latents, keys, conditioning, unconditional, weight_dtype)


def compute_loss(model: nn.Module, transformer: nn.Module, frozen: FrozenModels, objective: DiffusionObjective,
                 batch: dict, cfg: TrainConfig, device, weight_dtype) -> torch.Tensor:
    """The diffusion loss of one batch: the batch's latents noised with keyed noise at keyed logit-normal
    timesteps, and the fp32 MSE of the transformer's prediction against the scheduler's target (v for V4)."""
    latents, keys, conditioning = prepare_batch(transformer, frozen, objective, batch, cfg, device, weight_dtype)
    noise = objective.sample_noise(latents.shape[1:], keys, device=device)
    timesteps = objective.sample_timesteps(keys, device=device)
    noisy, target = objective.noisy_latents_and_target(latents, noise, timesteps)
    output = model(hidden_states=noisy.to(weight_dtype), timestep=timesteps.to(weight_dtype), **conditioning)
    return objective.loss(output, target)


# ------------------------------------------------------------------------------------------------ the run
@dataclass
class TrainResult:
    """What :func:`train` returns: the optimizer steps done, each step's loss, the output folder and the
    data-health summary."""

    global_step: int
    losses: list = field(default_factory=list)  # (step, loss averaged over processes and accumulation)
    output_dir: str = ""
    data_summary: str = ""


@dataclass
class TrainingData:
    """The data of a run: the composed metadata entries, this process's batch sampler and loader, the read and
    failure counts, and the run's length in optimizer steps."""

    entries: list[dict]
    sampler: BucketBatchSampler
    loader: torch.utils.data.DataLoader
    health: DataHealth
    max_train_steps: int


@dataclass
class TrainingModels:
    """The models of a run: the transformer (trained, or frozen under ``lora_network``), the frozen conditioning
    models, the objective (wrapped by ``distillation`` with ``--lcm_distillation``) and the parameter groups the
    optimizer updates."""

    transformer: nn.Module
    frozen: FrozenModels
    objective: DiffusionObjective
    distillation: LCMDistillation | None
    lora_network: nn.Module | None
    param_groups: list[dict]


@dataclass
class TrainingRun:
    """Everything the steps of a run share, and where the run stands: ``global_step`` optimizer steps done, and
    ``rounds`` batches of epoch ``epoch`` consumed (where a resumed sampler continues). ``loss_sum`` and
    ``micro_batches`` accumulate the losses of the optimizer step in progress; accumulation carries over epoch
    ends, as accelerate's does."""

    cfg: TrainConfig
    accelerator: object
    output_dir: Path
    data: TrainingData
    models: TrainingModels
    model: nn.Module  # the TrainableTransformer as accelerate prepared it (wrapped for DDP or DeepSpeed)
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    ema: object | None  # diffusers EMAModel of the transformer (full fine-tunes with --use_ema)
    trainable: list[nn.Parameter]
    trainable_names: list[str]  # parameter names of ``trainable``, for --report_model_info
    use_deepspeed: bool
    global_step: int = 0
    epoch: int = 0
    rounds: int = 0
    resumed: bool = False
    loss_sum: float = 0.0
    micro_batches: int = 0

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def weight_dtype(self) -> torch.dtype:
        return _weight_dtype(self.accelerator)


def _weight_dtype(accelerator) -> torch.dtype:
    """The dtype of the frozen models and of the transformer's inputs: accelerate's mixed precision, else fp32."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def train(cfg: TrainConfig) -> TrainResult:
    """Train the transformer (or a LoRA on it) as ``cfg`` says, continuing from ``--resume_from_checkpoint`` when
    given. Writes checkpoints, ``train_log.jsonl``, tracker logs and validation samples under ``cfg.output_dir``.
    Returns the loss of every step; with ``--use_ema`` the transformer holds the EMA weights afterwards."""
    accelerator = make_accelerator(cfg)
    data = build_data(cfg, accelerator)  # first, so a bad metadata file fails before minutes of model loading
    models = build_models(cfg, accelerator)
    if cfg.precompute_text_embeddings:
        precompute_text_embeddings(cfg, accelerator, models.frozen, data.entries)
    run = build_run(cfg, accelerator, data, models)
    resume_from_checkpoint(run)
    if accelerator.is_main_process and cfg.report_to != "none":
        accelerator.init_trackers(cfg.tracker_project_name, config={k: str(v) for k, v in asdict(cfg).items()})
    if accelerator.is_main_process:
        run.output_dir.mkdir(parents=True, exist_ok=True)
    result = TrainResult(run.global_step, output_dir=str(run.output_dir))
    train_epochs(run, result)
    return finish(run, result)


def make_accelerator(cfg: TrainConfig):
    """The run's ``Accelerator`` (gradient accumulation, mixed precision, tracker under ``output_dir``), with
    logging configured and TF32 matmuls allowed when ``--allow_tf32``."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    output_dir = Path(cfg.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir),
                                            logging_dir=str(output_dir / cfg.logging_dir)),
        kwargs_handlers=deepspeed_cpu_process_group(),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    check_process_count(accelerator)
    if cfg.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    return accelerator


def check_process_count(accelerator) -> None:
    """Raise RuntimeError when the launcher started more processes (``WORLD_SIZE``) than accelerate counts: each
    would train the whole run alone. This happens with ``torchrun`` on a machine without GPUs unless
    ``ACCELERATE_USE_CPU=1`` is set."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise RuntimeError(
            f"{launched} processes were launched but accelerate counts {accelerator.num_processes}, so each would "
            "train alone; on a machine without GPUs set ACCELERATE_USE_CPU=1 for torchrun")


def deepspeed_cpu_process_group() -> list:
    """accelerate's process-group settings for ``accelerate launch --use_deepspeed`` on a machine without GPUs:
    DeepSpeed's CPU backend (gloo) by name; elsewhere none. Without the name, accelerate (1.x) sets no backend there
    and counts one process however many run, so every process would train rank 0's batches, write the same files,
    and the loss gather would fail."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return []
    from accelerate.utils import InitProcessGroupKwargs
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return []
    return [InitProcessGroupKwargs(backend=get_accelerator().communication_backend_name())]


def build_data(cfg: TrainConfig, accelerator) -> TrainingData:
    """The metadata entries (videos repeated ``video_repeat`` times), this process's bucket sampler and loader,
    and the run's length: ``--max_train_steps``, else ``num_train_epochs`` epochs of optimizer steps. Raises
    ValueError when the entries fill no batch on every process."""
    entries = compose_entries(load_metadata(cfg.train_data_meta, cfg.train_data_dir), cfg.video_repeat)
    data_config = cfg.data_config()
    dataset = VideoImageDataset(entries, data_config, seed=cfg.seed)
    sampler = BucketBatchSampler(entries, cfg.train_batch_size, seed=cfg.seed, ratios=bucket_ratios(data_config),
                                 rank=accelerator.process_index, world_size=accelerator.num_processes)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=BucketCollate(data_config, cfg.seed),
                                         num_workers=cfg.dataloader_num_workers)
    if len(sampler) == 0:
        raise ValueError(f"{len(entries)} entries make no full batch of {cfg.train_batch_size} per process on "
                         f"{accelerator.num_processes} processes; lower --train_batch_size")
    steps_per_epoch = max(math.ceil(len(sampler) / cfg.gradient_accumulation_steps), 1)
    max_train_steps = cfg.max_train_steps or cfg.num_train_epochs * steps_per_epoch
    return TrainingData(entries, sampler, loader, DataHealth(cfg.max_failure_fraction), max_train_steps)


def build_models(cfg: TrainConfig, accelerator) -> TrainingModels:
    """Load the model folder, set up the objective from its scheduler (and the LCM distillation around it) and
    choose what trains."""
    transformer, frozen = load_models(cfg, accelerator.device, _weight_dtype(accelerator))
    objective = DiffusionObjective.from_model_folder(
        cfg.pretrained_model_name_or_path, seed=cfg.seed,
        motion_sub_loss_ratio=cfg.motion_sub_loss_ratio if cfg.motion_sub_loss else 0.0,
        noise_share_in_frames_ratio=cfg.noise_share_in_frames_ratio if cfg.noise_share_in_frames else 0.0,
        timestep_logit_mean=cfg.timestep_logit_mean, timestep_logit_std=cfg.timestep_logit_std,
    )
    distillation = None
    if cfg.lcm_distillation:
        distillation = LCMDistillation(
            objective, num_ddim_timesteps=cfg.lcm_num_ddim_timesteps, w_min=cfg.lcm_w_min, w_max=cfg.lcm_w_max,
            timestep_scaling=cfg.lcm_timestep_scaling, loss_type=cfg.lcm_loss_type, huber_c=cfg.lcm_huber_c)
        frozen.pipeline.set_sampler("LCM")  # validation samples: few steps, no classifier-free guidance
    if cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    lora_network, param_groups = trainable_parameters(cfg, accelerator, transformer)
    return TrainingModels(transformer, frozen, objective, distillation, lora_network, param_groups)


def trainable_parameters(cfg: TrainConfig, accelerator,
                         transformer: nn.Module) -> tuple[nn.Module | None, list[dict]]:
    """With ``--lora``: a new LoRA network hooked into the transformer (which is frozen and cast to the compute
    dtype) and its parameter groups; else None and the ``trainable_modules`` groups of the transformer. With
    ``--scale_lr`` every group's learning rate is multiplied by the global batch size."""
    lora_network = None
    if cfg.lora:
        from ..lora import LoRANetwork

        transformer.requires_grad_(False).to(_weight_dtype(accelerator))
        lora_network = LoRANetwork(transformer, rank=cfg.rank, alpha=cfg.network_alpha)
        lora_network = lora_network.to(accelerator.device).apply_to()
        param_groups = lora_network.param_groups(cfg.learning_rate)
    else:
        param_groups = select_trainable(transformer, cfg)
    if cfg.scale_lr:
        factor = cfg.gradient_accumulation_steps * cfg.train_batch_size * accelerator.num_processes
        for group in param_groups:
            group["lr"] *= factor
    return lora_network, param_groups


def precompute_text_embeddings(cfg: TrainConfig, accelerator, frozen: FrozenModels, entries: list[dict]) -> None:
    """``--precompute_text_embeddings``: encode every caption of ``entries`` once into ``frozen.text_cache`` (on
    the CPU), plus the empty caption when captions are dropped or the LCM teacher needs an unconditional input;
    then park the text encoders on the CPU and take them out of ``frozen`` to free accelerator memory (validation
    moves them back for its prompts)."""
    from tqdm.auto import tqdm

    frozen.text_cache = {}
    uses_empty = cfg.text_drop_ratio > 0 or cfg.lcm_distillation
    captions = sorted({e["text"] for e in entries} | ({""} if uses_empty else set()))
    with on_device([frozen.text_encoder, frozen.text_encoder_2], accelerator.device, cfg.low_vram):
        for start in tqdm(range(0, len(captions), 64), desc="text embeddings",
                          disable=not accelerator.is_main_process):
            encode_text(frozen, captions[start : start + 64], "cpu", _weight_dtype(accelerator))
    frozen.text_encoder.to("cpu")
    frozen.text_encoder_2.to("cpu")
    frozen.text_encoder = frozen.text_encoder_2 = None


def build_run(cfg: TrainConfig, accelerator, data: TrainingData, models: TrainingModels) -> TrainingRun:
    """The run at step 0: optimizer and LR schedule, the model and optimizer prepared by accelerate, the EMA
    (full fine-tunes with ``--use_ema``), all registered for checkpointing, and the checkpoint hooks."""
    from accelerate.utils import DistributedType
    from diffusers.optimization import get_scheduler

    transformer, lora_network = models.transformer, models.lora_network
    optimizer = make_optimizer(models.param_groups, cfg)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=data.max_train_steps)
    use_deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if use_deepspeed:
        # no dataloader goes through prepare(), so fill in what DeepSpeed would otherwise read from it; DeepSpeed
        # clips gradients itself at max_grad_norm
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        ds_config["train_micro_batch_size_per_gpu"] = cfg.train_batch_size
        ds_config["gradient_clipping"] = cfg.max_grad_norm
    model, optimizer = accelerator.prepare(TrainableTransformer(transformer, lora_network), optimizer)
    accelerator.register_for_checkpointing(lr_scheduler)
    ema = None
    if cfg.use_ema and not cfg.lora:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(transformer.parameters(), decay=cfg.ema_decay)
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    trainable = [p for g in models.param_groups for p in g["params"]]
    names = {id(p): n for n, p in (lora_network or transformer).named_parameters()}
    trainable_names = [names.get(id(p), f"param{i}") for i, p in enumerate(trainable)]
    _register_state_hooks(accelerator, transformer, lora_network)
    return TrainingRun(cfg, accelerator, Path(cfg.output_dir), data, models, model, optimizer, lr_scheduler, ema,
                       trainable, trainable_names, use_deepspeed)


def resume_from_checkpoint(run: TrainingRun) -> None:
    """With ``--resume_from_checkpoint``: restore everything the checkpoint holds (weights, optimizer, schedule,
    EMA, RNG states) and the run's position and data-health counts; without one, or with ``latest`` and no
    checkpoint yet, leave the run at step 0."""
    checkpoint = resolve_resume(run.output_dir, run.cfg.resume_from_checkpoint)
    if checkpoint is None:
        return
    state = load_checkpoint(run.accelerator, checkpoint)
    run.global_step, run.epoch, run.rounds = state["step"], state["epoch"], state["rounds_in_epoch"]
    run.data.health.reads, run.data.health.failures = state.get("data_reads", 0), state.get("data_failures", 0)
    run.resumed = True
    run.accelerator.print(f"resumed from {checkpoint} at step {run.global_step} (epoch {run.epoch}, "
                          f"batch {run.rounds})")


def save_training_checkpoint(run: TrainingRun) -> None:
    """Write ``checkpoint-{global_step}`` (call on every process): accelerate's state, the trained weights in the
    released format (``transformer/`` and, with EMA, ``transformer_ema/``; or the LoRA file, plus a copy in the
    compute dtype as ``output_dir/checkpoint-{step}.safetensors``) and the run's position."""
    models, health, step = run.models, run.data.health, run.global_step

    def write_model(folder: Path) -> None:
        unwrapped = run.accelerator.unwrap_model(run.model)
        if models.lora_network is not None:
            models.lora_network.save(folder / LORA_STATE_FILE)
            models.lora_network.save(run.output_dir / f"checkpoint-{step}.safetensors", dtype=run.weight_dtype)
            return
        unwrapped.transformer.save_pretrained(folder / "transformer", safe_serialization=True)
        if run.ema is not None:
            with _ema_weights(run.ema, models.transformer):
                models.transformer.save_pretrained(folder / "transformer_ema", safe_serialization=True)

    extra = {"epoch": run.epoch, "rounds_in_epoch": run.rounds, "data_reads": health.reads,
             "data_failures": health.failures}
    save_checkpoint(run.accelerator, run.output_dir, step, extra=extra, keep_last=run.cfg.checkpoints_total_limit,
                    save_model_fn=write_model)


def train_epochs(run: TrainingRun, result: TrainResult) -> None:
    """Train epoch after epoch until ``max_train_steps`` optimizer steps (without ``--max_train_steps``: until
    ``num_train_epochs`` epochs); render validation samples after every ``validation_epochs``-th epoch."""
    from tqdm.auto import tqdm

    cfg, accelerator = run.cfg, run.accelerator
    progress = tqdm(total=run.data.max_train_steps, initial=run.global_step, desc="steps",
                    disable=not accelerator.is_main_process)
    while run.global_step < run.data.max_train_steps and (cfg.max_train_steps or run.epoch < cfg.num_train_epochs):
        if not train_epoch(run, result, progress):
            break  # max_train_steps reached inside the epoch
        run.epoch, run.rounds = run.epoch + 1, 0
        if (cfg.validation_prompts and cfg.validation_epochs and run.epoch % cfg.validation_epochs == 0
                and accelerator.is_main_process):
            render_validation(run.models.frozen, run.models.transformer, run.ema, cfg, run.global_step,
                              run.output_dir)


def train_epoch(run: TrainingRun, result: TrainResult, progress) -> bool:
    """The rest of epoch ``run.epoch``, from its batch ``run.rounds`` on. Returns False when the run reached
    ``max_train_steps`` inside it, True when its batches ran out. Raises DataError when a whole epoch yields no
    batch."""
    sampler, accelerator = run.data.sampler, run.accelerator
    sampler.set_epoch(run.epoch, skip_rounds=run.rounds)
    batches_this_pass = 0
    for batch in run.data.loader:
        batches_this_pass += 1
        track_data_health(run, batch)
        if run.global_step == 0 and batches_this_pass == 1 and not run.resumed and accelerator.is_main_process:
            write_sanity_check(batch, run.output_dir / "sanity_check")
        grad_stats = train_micro_batch(run, batch)
        if not accelerator.sync_gradients:
            continue  # more micro-batches to accumulate before the optimizer step
        complete_optimizer_step(run, result, grad_stats, progress)
        if run.global_step >= run.data.max_train_steps:
            return False
    if batches_this_pass == 0 and run.rounds == 0:
        raise DataError(f"epoch {run.epoch} produced no batch: no bucket of the readable entries fills a batch of "
                        f"{run.cfg.train_batch_size}; {run.data.health.summary()}")
    return True


def track_data_health(run: TrainingRun, batch: dict) -> None:
    """Count the batch's file reads and failures (and the entries the sampler could not size); raise DataError
    when too many reads failed. The decision uses the counts of all processes, so every rank stops together."""
    health, sampler = run.data.health, run.data.sampler
    health.record(batch["failures"] + sampler.failures, successes=batch["reads"])
    sampler.failures.clear()
    totals = run.accelerator.reduce(torch.tensor([health.reads, health.failures], device=run.device), "sum")
    health.check(int(totals[0]), int(totals[1]))


def train_micro_batch(run: TrainingRun, batch: dict) -> dict:
    """Forward and backward of one micro-batch under accelerate's gradient accumulation; on the micro-batch that
    completes an optimizer step, clip the gradients (DeepSpeed clips them itself, at ``max_grad_norm``) and step
    the optimizer. Adds the loss, averaged over processes, to ``run.loss_sum``. Returns the gradient statistics to
    log: empty unless this call completed a step."""
    accelerator, models = run.accelerator, run.models
    grad_stats = {}
    run.model.train()
    with accelerator.accumulate(run.model):
        if models.distillation is not None:
            loss = compute_lcm_loss(run.model, models.transformer, models.lora_network, models.frozen,
                                    models.distillation, batch, run.cfg, run.device, run.weight_dtype)
        else:
            loss = compute_loss(run.model, models.transformer, models.frozen, models.objective, batch, run.cfg,
                                run.device, run.weight_dtype)
        accelerator.backward(loss)  # under DeepSpeed, on a step's last micro-batch, also the engine's clip and step
        if accelerator.sync_gradients and run.use_deepspeed:
            grad_stats = {"grad_norm": float(run.model.get_global_grad_norm())}  # measured before its clip
        elif accelerator.sync_gradients:
            grad_stats = clip_gradients(run)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    run.rounds += 1
    run.loss_sum += accelerator.gather(loss.detach()[None]).mean().item()
    run.micro_batches += 1
    return grad_stats


def clip_gradients(run: TrainingRun) -> dict:
    """Clip the accumulated gradients: full fine-tunes at the adaptive clip value, LoRA at ``max_grad_norm``.
    Returns ``grad_norm`` (measured before clipping) and, with ``--report_model_info``, ``grad_clip`` and, for a
    norm over 1 after the clip warm-up, the 10 largest per-parameter norms as ``grad_norms``."""
    cfg = run.cfg
    norm = float(run.accelerator.clip_grad_norm_(run.trainable, float("inf")))  # unscale + measure only
    clip = cfg.max_grad_norm if cfg.lora else adaptive_clip_norm(run.global_step, norm, cfg)
    grad_stats = {"grad_norm": norm}
    if cfg.report_model_info:
        grad_stats["grad_clip"] = clip
        if norm > 1 and run.global_step >= cfg.abnormal_norm_clip_start:
            grad_stats["grad_norms"] = largest_grad_norms(run.trainable, run.trainable_names)
    torch.nn.utils.clip_grad_norm_(run.trainable, clip)
    return grad_stats


def complete_optimizer_step(run: TrainingRun, result: TrainResult, grad_stats: dict, progress) -> None:
    """After the optimizer stepped: advance the LR schedule, the step counter and the EMA, record and log the
    step's loss (the mean of its micro-batches), and every ``checkpointing_steps`` / ``validation_steps`` save a
    checkpoint / render validation samples."""
    cfg = run.cfg
    run.lr_scheduler.step()
    run.global_step += 1
    if run.ema is not None:
        run.ema.step(run.models.transformer.parameters())
    step_loss = run.loss_sum / run.micro_batches
    run.loss_sum, run.micro_batches = 0.0, 0
    result.losses.append((run.global_step, step_loss))
    log_step(run, step_loss, grad_stats, progress)
    if run.global_step % cfg.checkpointing_steps == 0:
        save_training_checkpoint(run)
    if cfg.validation_prompts and run.global_step % cfg.validation_steps == 0 and run.accelerator.is_main_process:
        render_validation(run.models.frozen, run.models.transformer, run.ema, cfg, run.global_step, run.output_dir)


def log_step(run: TrainingRun, step_loss: float, grad_stats: dict, progress) -> None:
    """One line of ``train_log.jsonl`` (step, loss, learning rate and ``grad_stats``; main process), the same as
    tracker scalars, and the progress bar."""
    accelerator = run.accelerator
    lr = run.lr_scheduler.get_last_lr()[0]
    record = {"step": run.global_step, "loss": step_loss, "lr": lr, **grad_stats}
    scalars = {k: v for k, v in record.items() if k in ("lr", "grad_norm", "grad_clip")}
    scalars.update({f"grad_norm/{k}": v for k, v in record.get("grad_norms", {}).items()})
    accelerator.log({"train_loss": step_loss, **scalars}, step=run.global_step)
    if accelerator.is_main_process:
        with open(run.output_dir / "train_log.jsonl", "a") as log_file:
            log_file.write(json.dumps(record) + "\n")
    progress.update(1)
    progress.set_postfix(step_loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")


def finish(run: TrainingRun, result: TrainResult) -> TrainResult:
    """The end of the run: a final checkpoint unless the last step just wrote one, the EMA weights into the
    transformer, the data-health summary into ``result``, the trackers closed."""
    if run.global_step % run.cfg.checkpointing_steps:
        save_training_checkpoint(run)
    if run.ema is not None:
        run.ema.copy_to(run.models.transformer.parameters())
    result.global_step = run.global_step
    result.data_summary = run.data.health.summary()
    run.accelerator.print(result.data_summary)
    run.accelerator.end_training()
    return result


def write_sanity_check(batch: dict, folder: Path) -> None:
    """The first batch as the model sees it: ``{i}-{caption}.gif`` (pixels), ``…-masked.gif`` and ``…-clip.png``
    (inpaint mode), so crops, frame sampling and masks can be checked by eye before a long run."""
    import re

    from PIL import Image

    from ..utils.video_io import save_video

    for i, text in enumerate(batch["text"]):
        stem = f"{i}-" + (re.sub(r"[^\w]+", "_", " ".join(text.split()[:10])).strip("_") or "no_caption")[:80]
        save_video((batch["pixel_values"][i].transpose(0, 1) + 1) / 2, folder / f"{stem}.gif", fps=8)
        if "mask_pixel_values" in batch:
            save_video((batch["mask_pixel_values"][i].transpose(0, 1) + 1) / 2, folder / f"{stem}-masked.gif", fps=8)
            Image.fromarray(batch["clip_pixel_values"][i].numpy()).save(folder / f"{stem}-clip.png")


def _register_state_hooks(accelerator, transformer: nn.Module, lora_network) -> None:
    """Checkpoints hold the trained weights once, in the released format (``transformer/`` folder or the LoRA
    safetensors file, written by ``save_model_fn``); accelerate's own copy of the model is skipped."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return  # DeepSpeed saves its sharded engine state itself

    def skip_model_weights(models, weights, output_dir):
        weights.clear()

    def load_model_weights(models, input_dir):
        models.clear()
        if lora_network is not None:
            load_weights_into(lora_network, os.path.join(input_dir, LORA_STATE_FILE))
        else:
            load_weights_into(transformer, os.path.join(input_dir, "transformer"))

    accelerator.register_save_state_pre_hook(skip_model_weights)
    accelerator.register_load_state_pre_hook(load_model_weights)


class _ema_weights:
    """Context manager: the EMA weights in the transformer, the training weights restored afterwards."""

    def __init__(self, ema, transformer):
        self.ema, self.transformer = ema, transformer

    def __enter__(self):
        self.ema.store(self.transformer.parameters())
        self.ema.copy_to(self.transformer.parameters())

    def __exit__(self, *exc):
        self.ema.restore(self.transformer.parameters())


@torch.no_grad()
def render_validation(frozen: FrozenModels, transformer: nn.Module, ema, cfg: TrainConfig, step: int,
                      output_dir: Path) -> list[Path]:
    """One video and one image per validation prompt with the current (EMA) weights, saved as
    ``output_dir/sample/sample-{step}-{i}.gif`` / ``…-image-{i}.gif``. Each is a generation request with the
    model's recommended negative prompt and guidance (guidance 1 for an LCM-LoRA), run through the request layer
    as the predict scripts run theirs. Failures are logged, never fatal."""
    from ..inference.defaults import read_model_defaults
    from ..inference.request import TEXT_TO_IMAGE, TEXT_TO_VIDEO
    from ..inference.runner import generate, prepare
    from ..utils.video_io import save_video

    pipe = frozen.pipeline
    recommended = read_model_defaults(cfg.pretrained_model_name_or_path)
    size = max(cfg.video_sample_size // 16 * 16, 16)
    common = dict(width=size, height=size, frames=max(cfg.video_sample_n_frames // 8 * 8, 8), seed=cfg.seed,
                  steps=cfg.validation_inference_steps, sampler="LCM" if cfg.lcm_distillation else pipe.sampler)
    if cfg.lcm_distillation:
        common["guidance_scale"] = 1.0
    was_training = transformer.training
    transformer.eval()
    saved = []
    context = _ema_weights(ema, transformer) if ema is not None else contextlib.nullcontext()
    device = next(transformer.parameters()).device
    # precomputed text embeddings or --low_vram parked these on the CPU
    offloaded = [m for m in (pipe.text_encoder, pipe.text_encoder_2, pipe.vae) if next(m.parameters()).device != device]
    try:
        for module in offloaded:
            module.to(device)
        with context:
            for i, prompt in enumerate(cfg.validation_prompts):
                samples = ((TEXT_TO_VIDEO, f"sample-{step}-{i}.gif"), (TEXT_TO_IMAGE, f"sample-{step}-image-{i}.gif"))
                for kind, name in samples:
                    request = recommended.request(prompt=prompt, kind=kind, **common)
                    generation = generate(pipe, prepare(request))
                    saved.append(save_video(generation.videos, output_dir / "sample" / name, fps=8))
    except Exception:
        logger.exception("validation sampling failed at step %d (training continues)", step)
    finally:
        for module in offloaded:
            module.to("cpu")
        transformer.train(was_training)
    return saved
