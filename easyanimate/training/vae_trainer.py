"""Training the video VAE with accelerate.

One step, for ``gradient_accumulation_steps`` micro-batches (each all images (T = 1) or all clips):

1. autoencoder step: per micro-batch encode, sample the posterior, decode; ``nll + kl_weight * kl`` and, from
   ``disc_start`` on, the adaptively weighted GAN term (:class:`~easyanimate.training.vae_losses.VAELoss`); Adam
   step on the mean gradient.
2. discriminator step (from ``disc_start`` on): hinge loss of the 2D and 3D discriminators on the real
   micro-batches and their reconstructions of step 1; Adam step on the mean gradient.

Unlike the original, step 2 reuses the reconstructions of step 1 (made before the step-1 update, a one-step lag)
instead of running the VAE again, which saves a third of the compute once the GAN is on.

Randomness (data crops, posterior noise) is keyed by the micro-batch, so a resumed run continues exactly as the
uninterrupted one. Output: checkpoints ``output_dir/checkpoint-{step}`` (each with a ``vae/`` folder) and the final
``output_dir/vae`` (``config.json`` + ``diffusion_pytorch_model.safetensors``), loadable by
``AutoencoderKLMagvit.from_pretrained``; with EMA on, ``vae/`` holds the EMA weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..data.metadata import load_metadata
from ..data.seeding import POSTERIOR, keyed_randn
from ..data.vae_dataset import HomogeneousBatchSampler, VAEDataset, check_video_len, collate_clips
from ..utils.weights import CheckpointError, read_folder_weights
from .checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from .vae_losses import LPIPS, Discriminators, LossWeights, VAELoss

logger = logging.getLogger(__name__)

TRAIN_MODES = ("full", "decoder_only", "encoder_only")
MIXED_PRECISION = ("no", "fp16", "bf16")


class VAEConfigError(ValueError):
    """A VAE training setting is missing, unknown or out of range."""


@dataclass
class VAETrainConfig:
    """Every setting of a VAE training run (``configs/vae_*.yaml``; command-line flags override the file).
    Defaults follow the original's ``autoencoder_kl_32x32x4_slice.yaml`` except ``video_len`` (25 cannot be
    reconstructed by the V4 cache VAE; 24 can)."""

    # model: a folder to start from (config.json + weights; training-only ``loss.*`` keys are ignored), or a
    # config.json to start from random weights.
    pretrained_vae: str | None = None
    vae_config: str | None = None
    # data
    train_data_meta: str | None = None
    train_data_dir: str | None = None
    size: int = 256
    video_len: int = 24
    frame_interval: int = 1
    min_crop: float = 0.25
    max_crop: float = 1.0
    batch_size: int = 1
    # micro-batches per optimizer step: the effective batch is batch_size x this x processes
    gradient_accumulation_steps: int = 1
    num_workers: int = 2
    # optimisation
    max_train_steps: int = 100_000
    learning_rate: float = 1e-4
    # the original's --scale_lr: the rate is learning_rate x batch_size x gradient_accumulation_steps x processes
    scale_lr: bool = False
    adam_beta1: float = 0.5
    adam_beta2: float = 0.9
    train_mode: str = "full"  # full | decoder_only | encoder_only
    # loss
    l1_weight: float = 1.0
    l2_weight: float = 0.0
    # not in the original: frame 0 of each clip counts this many times in the reconstruction terms (LossWeights)
    first_frame_loss_weight: float = 1.0
    perceptual_weight: float = 1.0
    lpips_weights: str | None = None
    kl_weight: float = 1e-6
    disc_weight: float = 0.5
    disc_start: int = 50001
    disc_frame_channels: int = 64
    disc_frame_layers: int = 3
    disc_video_channels: list = field(default_factory=lambda: [64, 128, 256])
    disc_norm_groups: int = 32
    # options
    use_ema: bool = False
    ema_decay: float = 0.9999
    mixed_precision: str = "no"  # no | fp16 | bf16
    gradient_checkpointing: bool = False
    # output
    output_dir: str = "output_vae"
    logging_dir: str = "logs"
    checkpointing_steps: int = 1000
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None  # a checkpoint folder or "latest"
    log_every: int = 10
    image_log_every: int = 1000
    # validation: reconstruction metrics (L1, PSNR, LPIPS) of a fixed set every validation_steps steps and at the
    # end (0: off), with the EMA weights when EMA is on. The set is validation_data_meta (held-out files, best), or
    # else the first and last validation_entries / 2 entries of train_data_meta, as the original validated on its
    # first 100 and last 100 training entries. Whole-side crops at fixed places, the posterior mean: no randomness.
    validation_steps: int = 0
    validation_data_meta: str | None = None
    validation_entries: int = 200
    seed: int = 23

    def validate(self) -> None:
        """Raise VAEConfigError naming the first setting that is missing, unknown or out of range."""
        if (self.pretrained_vae is None) == (self.vae_config is None):
            raise VAEConfigError(
                "give exactly one of pretrained_vae (a VAE folder to fine-tune) or vae_config (a config.json)"
            )
        if not self.train_data_meta:
            raise VAEConfigError("train_data_meta is required: a JSON/CSV list of {file_path, type: image|video}")
        if self.train_mode not in TRAIN_MODES:
            raise VAEConfigError(f"train_mode must be one of {TRAIN_MODES}, got {self.train_mode!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise VAEConfigError(f"mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        if self.first_frame_loss_weight <= 0:
            raise VAEConfigError(
                "first_frame_loss_weight must be > 0 (1: every frame counts the same), "
                f"got {self.first_frame_loss_weight}"
            )
        if self.l1_weight <= 0 and self.l2_weight <= 0 and self.perceptual_weight <= 0:
            raise VAEConfigError("at least one of l1_weight, l2_weight, perceptual_weight must be > 0")
        if self.perceptual_weight > 0 and not self.lpips_weights:
            raise VAEConfigError(
                f"perceptual_weight is {self.perceptual_weight} but lpips_weights is not set: pass --lpips_weights "
                "with the VGG16 LPIPS weights (one file with net.slice*/lin* keys, a VAE training checkpoint of the "
                "original with loss.perceptual_loss.* keys, or torchvision's vgg16 .pth and the lpips package's "
                "weights/v0.1/vgg.pth joined by a comma), or set --perceptual_weight 0"
            )
        if self.disc_weight > 0 and self.size // 2**self.disc_frame_layers < 3:
            raise VAEConfigError(
                f"size={self.size} is too small for the {self.disc_frame_layers}-layer frame discriminator; it needs "
                f"size >= {3 * 2**self.disc_frame_layers} (or fewer disc_frame_layers)"
            )
        for name in ("max_train_steps", "batch_size", "gradient_accumulation_steps", "checkpointing_steps", "log_every",
                     "image_log_every", "validation_entries"):
            if getattr(self, name) < 1:
                raise VAEConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.validation_steps < 0:
            raise VAEConfigError(f"validation_steps must be >= 0 (0: no validation), got {self.validation_steps}")


def load_config(path: str | os.PathLike | None, overrides: dict[str, Any] | None = None) -> VAETrainConfig:
    """A :class:`VAETrainConfig` from a YAML file (optional) with ``overrides`` on top; unknown keys are an error."""
    from omegaconf import OmegaConf

    values: dict[str, Any] = {}
    if path is not None:
        if not Path(path).is_file():
            raise VAEConfigError(f"config file not found: {path}")
        values = OmegaConf.to_container(OmegaConf.load(path), resolve=True) or {}
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    known = {f.name for f in dataclasses.fields(VAETrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise VAEConfigError(f"unknown VAE training settings {unknown}; known settings: {sorted(known)}")
    return VAETrainConfig(**values)


# --------------------------------------------------------------------------------------------------------------
# Building blocks of the run
# --------------------------------------------------------------------------------------------------------------


def build_vae(cfg: VAETrainConfig):
    """The VAE to train: random weights from ``vae_config``, or the ``pretrained_vae`` folder (the model root or
    its ``vae/`` folder)."""
    from ..models.vae import AutoencoderKLMagvit

    if cfg.vae_config is not None:
        config_path = Path(cfg.vae_config)
        if not config_path.is_file():
            raise VAEConfigError(f"vae_config not found: {config_path}")
        return AutoencoderKLMagvit.from_config(json.loads(config_path.read_text()))
    folder = Path(cfg.pretrained_vae)
    # Accept the model root as well as its vae/ folder. Training-only ``loss.*`` keys are ignored on load.
    subfolder = "vae" if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file() else None
    return AutoencoderKLMagvit.from_pretrained(folder, subfolder=subfolder)


def select_trainable(vae: nn.Module, mode: str) -> tuple[list[nn.Parameter], nn.Parameter]:
    """Freeze what ``mode`` keeps fixed; return the trainable parameters and the layer at which the adaptive GAN
    weight compares gradients: the decoder's last conv, or ``quant_conv`` when only the encoder trains (the
    original has no answer for that case: its decoder layer gets no gradient)."""
    vae.requires_grad_(True)
    if mode == "decoder_only":
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    elif mode == "encoder_only":
        vae.decoder.requires_grad_(False)
        vae.post_quant_conv.requires_grad_(False)
    last_layer = vae.quant_conv.weight if mode == "encoder_only" else vae.decoder.conv_out.weight
    return [p for p in vae.parameters() if p.requires_grad], last_layer


def build_loss(cfg: VAETrainConfig) -> VAELoss:
    """The loss terms with the configured weights: LPIPS loaded from ``lpips_weights`` when the perceptual weight
    is on, and new discriminators when the GAN weight is on."""
    weights = LossWeights(
        l1=cfg.l1_weight,
        l2=cfg.l2_weight,
        perceptual=cfg.perceptual_weight,
        kl=cfg.kl_weight,
        disc=cfg.disc_weight,
        disc_start=cfg.disc_start,
        first_frame=cfg.first_frame_loss_weight,
    )
    lpips = LPIPS.from_file(cfg.lpips_weights) if cfg.perceptual_weight > 0 else None
    discriminators = None
    if cfg.disc_weight > 0:
        discriminators = Discriminators(
            frame_channels=cfg.disc_frame_channels,
            frame_layers=cfg.disc_frame_layers,
            video_channels=tuple(cfg.disc_video_channels),
            video_norm_groups=cfg.disc_norm_groups,
        )
    return VAELoss(weights, discriminators, lpips)


class Reconstruct(nn.Module):
    """encode -> posterior sample -> decode as one ``forward``, so that a distributed wrapper sees one call.
    The posterior noise is given by the caller (keyed by step) instead of drawn from the global generator."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, pixels: torch.Tensor, noise_key: tuple[int, ...]):
        """-> (reconstruction, posterior mean, posterior logvar)"""
        posterior = self.vae.encode(pixels).latent_dist
        noise = keyed_randn(tuple(posterior.mean.shape), noise_key, dtype=posterior.mean.dtype, device=pixels.device)
        latents = posterior.mean + posterior.std * noise
        reconstruction = self.vae.decode(latents).sample
        return reconstruction, posterior.mean, posterior.logvar


def read_entries(metadata: str, cfg: VAETrainConfig) -> list[dict]:
    """The entries of a metadata file, paths under ``train_data_dir``; a VAE needs no caption, so ``text`` may be
    left out (``{file_path, type}`` rows, as scripts/train_vae.sh documents)."""
    return load_metadata(metadata, cfg.train_data_dir, require_text=False)


def make_dataloader(cfg: VAETrainConfig, frame_multiple: int, start_batch: int, rank: int, world: int):
    """The endless stream of this process's batches of the training entries, from its batch ``start_batch`` on."""
    entries = read_entries(cfg.train_data_meta, cfg)
    dataset = VAEDataset(
        entries,
        size=cfg.size,
        video_len=cfg.video_len,
        frame_interval=cfg.frame_interval,
        frame_multiple=frame_multiple,
        min_crop=cfg.min_crop,
        max_crop=cfg.max_crop,
        seed=cfg.seed,
    )
    sampler = HomogeneousBatchSampler(dataset.kinds, cfg.batch_size, cfg.seed, world, rank, start_batch)
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_clips,
        num_workers=cfg.num_workers,
        persistent_workers=cfg.num_workers > 0,
    )


def validation_dataset(cfg: VAETrainConfig, frame_multiple: int) -> VAEDataset:
    """The fixed validation set (see :class:`VAETrainConfig`): item ``i`` is read with sample key ``i``."""
    if cfg.validation_data_meta:
        entries = read_entries(cfg.validation_data_meta, cfg)
    else:
        entries = read_entries(cfg.train_data_meta, cfg)
        if len(entries) > cfg.validation_entries:
            first = cfg.validation_entries // 2
            entries = entries[:first] + entries[len(entries) - (cfg.validation_entries - first):]
    return VAEDataset(entries, size=cfg.size, video_len=cfg.video_len, frame_interval=cfg.frame_interval,
                      frame_multiple=frame_multiple, min_crop=1.0, max_crop=1.0, seed=cfg.seed)


@torch.no_grad()
def validate_reconstruction(vae: nn.Module, dataset: VAEDataset, lpips: nn.Module | None = None,
                            autocast=contextlib.nullcontext) -> dict[str, float]:
    """Reconstruct every item of ``dataset`` through the posterior mean; the mean per item of L1 (in [-1, 1]), PSNR
    (dB, pixels in [0, 1], the output clamped) and, given ``lpips``, LPIPS per frame: over all items and per kind
    (``video/psnr``, ``image/psnr``, ...)."""
    device = next(vae.parameters()).device
    per_kind: dict[str, dict[str, list[float]]] = {}
    was_training = vae.training
    vae.eval()
    try:
        for index in range(len(dataset)):
            item = dataset[(index, index)]
            pixels = item["pixels"][None].to(device)
            with autocast():
                reconstruction = vae.decode(vae.encode(pixels).latent_dist.mode()).sample
            reconstruction = reconstruction.float().clamp(-1, 1)
            mse = ((reconstruction - pixels) / 2).pow(2).mean().clamp_min(1e-10)
            metrics = {"l1": (reconstruction - pixels).abs().mean().item(), "psnr": (-10 * torch.log10(mse)).item()}
            if lpips is not None:  # per frame: (1, C, T, H, W) -> (T, C, H, W)
                metrics["lpips"] = lpips(reconstruction[0].transpose(0, 1), pixels[0].transpose(0, 1)).mean().item()
            for kind in ("all", item["type"]):
                for name, value in metrics.items():
                    per_kind.setdefault(kind, {}).setdefault(name, []).append(value)
    finally:
        vae.train(was_training)
    return {(name if kind == "all" else f"{kind}/{name}"): sum(values) / len(values)
            for kind, metrics in per_kind.items() for name, values in metrics.items()}


def reconstruction_grid(pixels: torch.Tensor, reconstruction: torch.Tensor, max_frames: int = 8) -> torch.Tensor:
    """First sample's frames (top) over their reconstructions (bottom), as a (3, 2H, T*W) image in [0, 1]."""
    real = pixels[0, :, :max_frames].float()
    fake = reconstruction[0, :, :max_frames].float()
    rows = [torch.cat(list(v.unbind(1)), dim=-1) for v in (real, fake)]  # (3, H, T*W)
    return ((torch.cat(rows, dim=-2) + 1) / 2).clamp(0, 1).cpu()


def restore_ema(ema, vae: nn.Module, vae_dir: Path, ema_steps: int | None) -> None:
    """Set the EMA from a checkpoint's ``vae/`` folder (which holds the EMA weights when the run used EMA;
    ``ema_steps`` None means it did not, and the EMA restarts from the trained weights). Read with safetensors,
    not accelerate's pickled custom state."""
    if ema_steps is None:
        logger.warning("the checkpoint was written without EMA: starting the EMA from its trained weights")
        ema.shadow_params = [p.detach().clone() for p in vae.parameters()]
        ema.optimization_step = 0
        return
    state = read_folder_weights(vae_dir)
    names = [name for name, _ in vae.named_parameters()]
    missing = [n for n in names if n not in state]
    if missing:
        raise CheckpointError(f"{vae_dir}: EMA weights lack {len(missing)} parameters, e.g. {missing[:3]}")
    for shadow, name in zip(ema.shadow_params, names):
        shadow.copy_(state[name].to(shadow.dtype))
    ema.optimization_step = ema_steps


class StopRequest:
    """Turns Ctrl-C / SIGTERM into a request to stop after the current step, so that the run ends with a complete
    checkpoint instead of losing the work since the last one. A second signal stops at once."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        logger.warning("signal %d: finishing this step, saving a checkpoint and stopping (again to stop now)", signum)
        self.requested = True

    def agreed(self, accelerator) -> bool:
        """Whether any process was asked to stop (all processes must save the checkpoint together)."""
        if accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


@dataclass
class TrainResult:
    vae: nn.Module  # the trained model, as saved (the EMA weights when EMA is on)
    vae_dir: Path
    history: list[dict[str, float]]  # what was logged (every log_every steps), in order
    validation: list[dict[str, float]] = field(default_factory=list)  # validation metrics with their "step"


# --------------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------------


@dataclass
class VAERun:
    """Everything the steps of a VAE run share, and ``step``, the optimizer steps done. ``reconstruct`` and
    ``discriminators`` are the modules as accelerate prepared them (wrapped for DDP), ``vae`` and ``disc`` the
    modules inside; ``history`` and ``validation`` collect what :class:`TrainResult` returns."""

    cfg: VAETrainConfig
    accelerator: Any
    output_dir: Path
    reconstruct: nn.Module
    discriminators: nn.Module | None
    opt_ae: torch.optim.Optimizer
    opt_disc: torch.optim.Optimizer | None
    vae: nn.Module
    disc: nn.Module | None
    last_layer: nn.Parameter  # where the adaptive GAN weight compares gradients
    loss_fn: VAELoss
    ema: Any | None  # diffusers EMAModel of the VAE (use_ema)
    frame_multiple: int  # clip lengths must be a multiple of the VAE's encoder chunk
    validation_set: VAEDataset | None
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    validation: list[dict[str, float]] = field(default_factory=list)


def train(cfg: VAETrainConfig) -> TrainResult:
    """Train the VAE as ``cfg`` says, continuing from ``resume_from_checkpoint`` when given, and save it as
    ``output_dir/vae``. Raises VAEConfigError for unusable settings, and KeyboardInterrupt after saving a
    checkpoint when the run was asked to stop (Ctrl-C / SIGTERM)."""
    cfg.validate()
    accelerator = make_accelerator(cfg)
    torch.manual_seed(cfg.seed)  # initial weights of the discriminators (and of a VAE built from a config)
    run = build_run(cfg, accelerator)
    resume_from_checkpoint(run)
    # the sampler skips the micro-batches of the steps already done, without reading them
    loader = make_dataloader(cfg, run.frame_multiple, run.step * cfg.gradient_accumulation_steps,
                             accelerator.process_index, accelerator.num_processes)
    if accelerator.is_main_process:
        accelerator.init_trackers("vae", config={k: str(v) for k, v in dataclasses.asdict(cfg).items()})
    train_steps(run, iter(loader))
    return finish(run)


def make_accelerator(cfg: VAETrainConfig):
    """The run's ``Accelerator`` (mixed precision, TensorBoard under ``output_dir/logging_dir``). Raises
    VAEConfigError for mixed precision on the CPU, checked before the Accelerator exists because its
    mixed-precision setting cannot be changed afterwards."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import ProjectConfiguration

    if cfg.mixed_precision != "no" and PartialState().device.type == "cpu":
        raise VAEConfigError(
            f"mixed_precision={cfg.mixed_precision} on the CPU: PyTorch's CPU Conv3d backward returns inf/NaN "
            "under bf16 autocast (seen with torch 2.13), which breaks the VAE on the first step. Train in fp32 "
            "(mixed_precision: no) on the CPU, or use a GPU."
        )
    output_dir = Path(cfg.output_dir)
    return Accelerator(
        mixed_precision=cfg.mixed_precision,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / cfg.logging_dir)),
    )


def build_run(cfg: VAETrainConfig, accelerator) -> VAERun:
    """The run at step 0: the VAE in training mode with what trains selected, the losses (with the
    discriminators), the optimizers prepared by accelerate, the EMA and the validation set."""
    from diffusers.training_utils import EMAModel

    device = accelerator.device
    vae, frame_multiple = prepare_vae(cfg)
    trainable, last_layer = select_trainable(vae, cfg.train_mode)
    loss_fn = build_loss(cfg).to(device)
    reconstruct, discriminators, opt_ae, opt_disc = build_optimizers(cfg, accelerator, vae, trainable,
                                                                     loss_fn.discriminators)
    vae_module = accelerator.unwrap_model(reconstruct).vae
    disc_module = accelerator.unwrap_model(discriminators) if discriminators is not None else None
    ema = None
    if cfg.use_ema:
        # diffusers' EMA: decay min(ema_decay, (1 + n) / (10 + n)) at update n, the warm-up of LDM's LitEma. The
        # original decays at 0.9999 after every batch; whether it warms up is not known.
        ema = EMAModel(vae_module.parameters(), decay=cfg.ema_decay)
        ema.to(device)
    validation_set = validation_dataset(cfg, frame_multiple) if cfg.validation_steps else None
    return VAERun(cfg, accelerator, Path(cfg.output_dir), reconstruct, discriminators, opt_ae, opt_disc, vae_module,
                  disc_module, last_layer, loss_fn, ema, frame_multiple, validation_set)


def prepare_vae(cfg: VAETrainConfig) -> tuple[nn.Module, int]:
    """The VAE to train, in training mode (with gradient checkpointing when asked), and its encoder chunk length
    in frames. Raises VAEConfigError when ``video_len`` is no multiple of that chunk or the VAE cannot
    checkpoint gradients."""
    vae = build_vae(cfg)
    frame_multiple = int(getattr(vae.config, "mini_batch_encoder", 8))
    try:
        check_video_len(cfg.video_len, frame_multiple)
    except ValueError as exc:
        raise VAEConfigError(str(exc)) from None
    if cfg.gradient_checkpointing:
        if not getattr(vae, "_supports_gradient_checkpointing", False):
            raise VAEConfigError("gradient_checkpointing: this VAE implementation does not support it; turn it off")
        vae.enable_gradient_checkpointing()
    vae.train()
    return vae, frame_multiple


def build_optimizers(cfg: VAETrainConfig, accelerator, vae: nn.Module, trainable: list[nn.Parameter],
                     discriminators: nn.Module | None):
    """Adam for the autoencoder's ``trainable`` parameters and, with a GAN, for the discriminators, at
    ``learning_rate`` (times the global batch with ``scale_lr``). Returns ``(reconstruct, discriminators,
    opt_ae, opt_disc)`` as accelerate prepared them; ``discriminators`` and ``opt_disc`` are None without a GAN."""
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    learning_rate = cfg.learning_rate
    if cfg.scale_lr:
        learning_rate *= cfg.batch_size * cfg.gradient_accumulation_steps * accelerator.num_processes
        logger.info("scale_lr: learning rate %g (%g x batch %d x accumulation %d x %d processes)", learning_rate,
                    cfg.learning_rate, cfg.batch_size, cfg.gradient_accumulation_steps, accelerator.num_processes)
    opt_ae = torch.optim.Adam(trainable, lr=learning_rate, betas=betas)
    reconstruct = Reconstruct(vae)
    if discriminators is None:
        reconstruct, opt_ae = accelerator.prepare(reconstruct, opt_ae)
        return reconstruct, None, opt_ae, None
    opt_disc = torch.optim.Adam(discriminators.parameters(), lr=learning_rate, betas=betas)
    reconstruct, discriminators, opt_ae, opt_disc = accelerator.prepare(reconstruct, discriminators, opt_ae, opt_disc)
    return reconstruct, discriminators, opt_ae, opt_disc


@contextlib.contextmanager
def ema_weights(run: VAERun):
    """Inside the block the VAE holds the EMA weights when EMA is on (else nothing changes)."""
    params = list(run.vae.parameters())
    if run.ema is not None:
        run.ema.store(params)
        run.ema.copy_to(params)
    try:
        yield
    finally:
        if run.ema is not None:
            run.ema.restore(params)


def save_vae(run: VAERun, folder: Path) -> None:
    """Write ``folder/vae``: the EMA weights when EMA is on (they are also what a resume restores the EMA from),
    else the trained weights."""
    with ema_weights(run):
        run.vae.save_pretrained(str(folder / "vae"), safe_serialization=True)


def resume_from_checkpoint(run: VAERun) -> None:
    """With ``resume_from_checkpoint``: restore the optimizers, models and RNG states, the step and the EMA from
    the checkpoint; without one, or with ``latest`` and no checkpoint yet, leave the run at step 0."""
    checkpoint = resolve_resume(run.output_dir, run.cfg.resume_from_checkpoint)
    if checkpoint is None:
        return
    state = load_checkpoint(run.accelerator, checkpoint)
    run.step = int(state["step"])
    if run.ema is not None:
        restore_ema(run.ema, run.vae, checkpoint / "vae", run.step if state.get("ema") else None)
    logger.info("resumed from %s at step %d", checkpoint, run.step)
    if run.step >= run.cfg.max_train_steps:
        logger.info("nothing to do: the checkpoint is at step %d >= max_train_steps", run.step)


def save_training_checkpoint(run: VAERun) -> None:
    """Write ``checkpoint-{step}`` (call on every process): accelerate's state, ``vae/`` and whether EMA was on."""
    save_checkpoint(run.accelerator, run.output_dir, run.step, keep_last=run.cfg.checkpoints_total_limit,
                    save_model_fn=lambda folder: save_vae(run, folder), extra={"ema": run.ema is not None})


def train_steps(run: VAERun, batches) -> None:
    """Optimizer steps until ``max_train_steps``, each followed by logging, validation and a checkpoint as
    configured. A stop request (Ctrl-C / SIGTERM on any process) ends the step, saves a checkpoint on every
    process and raises KeyboardInterrupt."""
    cfg, accelerator = run.cfg, run.accelerator
    progress = tqdm(
        total=cfg.max_train_steps, initial=run.step, desc="VAE steps", disable=not accelerator.is_local_main_process
    )
    with StopRequest() as stop:
        while run.step < cfg.max_train_steps:
            logs, kinds, (pixels, reconstruction) = train_step(run, batches)
            run.step += 1
            progress.update(1)
            log_step(run, logs, kinds, pixels, reconstruction, progress)
            if cfg.validation_steps and (run.step % cfg.validation_steps == 0 or run.step == cfg.max_train_steps):
                run_validation(run)
            stopping = stop.agreed(accelerator)
            if run.step % cfg.checkpointing_steps == 0 or run.step == cfg.max_train_steps or stopping:
                save_training_checkpoint(run)
            if stopping:
                progress.close()
                accelerator.end_training()
                raise KeyboardInterrupt(f"stopped at step {run.step}; resume with --resume_from_checkpoint latest")
    progress.close()


def train_step(run: VAERun, batches) -> tuple[dict[str, float], list[str], tuple[torch.Tensor, torch.Tensor]]:
    """One optimizer step of the autoencoder and, once the GAN is on, one of the discriminators on the same
    micro-batches. Returns the logs averaged over the micro-batches (plus the learning rate), the micro-batches'
    kinds, and the last micro-batch's pixels with their reconstruction."""
    disc_on = run.loss_fn.disc_active(run.step)
    micro_logs, kinds, reconstructed = autoencoder_step(run, batches, disc_on)
    if disc_on:
        discriminator_step(run, reconstructed, micro_logs)
    accum = run.cfg.gradient_accumulation_steps
    logs = {key: sum(float(m[key]) for m in micro_logs) / accum for key in micro_logs[0]}
    logs["lr"] = run.opt_ae.param_groups[0]["lr"]
    return logs, kinds, reconstructed[-1]


def autoencoder_step(run: VAERun, batches, disc_on: bool) -> tuple[list[dict], list[str], list[tuple]]:
    """Adam step of the autoencoder on the mean gradient of ``gradient_accumulation_steps`` micro-batches
    (gradients synchronised across processes only on the last), then the EMA update. Returns each micro-batch's
    logs and kind, and ``(pixels, reconstruction)`` of every micro-batch when ``disc_on`` (the discriminators
    train on them), else of the last one only (for the image log)."""
    accelerator, accum = run.accelerator, run.cfg.gradient_accumulation_steps
    micro_logs, kinds, reconstructed = [], [], []
    run.opt_ae.zero_grad(set_to_none=True)
    for micro in range(accum):
        batch = next(batches)
        pixels = batch["pixels"].to(accelerator.device)
        kinds.append(batch["type"])
        last = micro == accum - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(run.reconstruct):
            reconstruction, logs = autoencoder_backward(run, pixels, micro)
        micro_logs.append(logs)
        if disc_on or last:
            reconstructed.append((pixels, reconstruction.detach()))
    run.opt_ae.step()
    if run.ema is not None:
        run.ema.step(run.vae.parameters())
    return micro_logs, kinds, reconstructed


def autoencoder_backward(run: VAERun, pixels: torch.Tensor, micro: int) -> tuple[torch.Tensor, dict]:
    """Reconstruct micro-batch ``micro`` of the current step and backpropagate its generator loss divided by the
    micro-batch count. Returns the reconstruction and the loss terms. Raises FloatingPointError on a non-finite
    loss."""
    accelerator, accum = run.accelerator, run.cfg.gradient_accumulation_steps
    with accelerator.autocast():
        # the posterior noise is keyed by the micro-batch's number in the run and the process
        noise_key = (run.cfg.seed, POSTERIOR, run.step * accum + micro, accelerator.process_index)
        reconstruction, mean, logvar = run.reconstruct(pixels, noise_key)
        if run.disc is not None:
            run.disc.requires_grad_(False)  # the GAN term must not train the discriminators
        loss, logs = run.loss_fn.generator_loss(pixels, reconstruction, mean, logvar, run.step, run.last_layer,
                                                run.disc)
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"step {run.step}: the VAE loss is {loss.item()} "
            f"({ {k: float(v) for k, v in logs.items()} }); "
            "lower the learning rate, or use bf16 / fp32 instead of fp16"
        )
    accelerator.backward(loss / accum)
    return reconstruction, logs


def discriminator_step(run: VAERun, reconstructed: list[tuple], micro_logs: list[dict]) -> None:
    """Adam step of the discriminators on the mean hinge loss over the real micro-batches and their
    reconstructions; each micro-batch's discriminator terms are added to its entry of ``micro_logs``."""
    accelerator, accum = run.accelerator, run.cfg.gradient_accumulation_steps
    run.disc.requires_grad_(True)
    run.opt_disc.zero_grad(set_to_none=True)
    for micro, (real, fake) in enumerate(reconstructed):
        with contextlib.nullcontext() if micro == accum - 1 else accelerator.no_sync(run.discriminators):
            with accelerator.autocast():
                d_loss, d_logs = run.loss_fn.discriminator_loss(real, fake, run.discriminators)
            accelerator.backward(d_loss / accum)
        micro_logs[micro] = {**micro_logs[micro], **d_logs}
    run.opt_disc.step()


def log_step(run: VAERun, logs: dict, kinds: list[str], pixels: torch.Tensor, reconstruction: torch.Tensor,
             progress) -> None:
    """Every ``log_every`` steps (and at the last): the logs to the tracker, the progress bar and
    ``run.history``; every ``image_log_every`` steps (and at the last, main process): a reconstruction grid."""
    cfg, accelerator, step = run.cfg, run.accelerator, run.step
    if step % cfg.log_every == 0 or step == cfg.max_train_steps:
        record = {k: float(v) for k, v in logs.items()}
        accelerator.log({f"train/{k}": v for k, v in record.items()}, step=step)
        progress.set_postfix(rec=f"{record['rec_loss']:.4f}", kl=f"{record['kl_loss']:.1f}")
        run.history.append({**record, "step": step, "batch_type": "+".join(sorted(set(kinds)))})
    if accelerator.is_main_process and (step % cfg.image_log_every == 0 or step == cfg.max_train_steps):
        writer = accelerator.get_tracker("tensorboard", unwrap=True)
        grid = reconstruction_grid(pixels, reconstruction.detach())
        writer.add_image(f"reconstruction/{kinds[-1]}", grid, step)


def run_validation(run: VAERun) -> None:
    """Reconstruction metrics of the validation set at the current step (main process, with the EMA weights when
    EMA is on), logged and appended to ``run.validation``; every process waits for it."""
    accelerator = run.accelerator
    if accelerator.is_main_process:
        with ema_weights(run):
            metrics = validate_reconstruction(run.vae, run.validation_set, run.loss_fn.lpips, accelerator.autocast)
        accelerator.log({f"val/{k}": v for k, v in metrics.items()}, step=run.step)
        logger.info("step %d validation (%d items): %s", run.step, len(run.validation_set),
                    ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        run.validation.append({**metrics, "step": run.step})
    accelerator.wait_for_everyone()


def finish(run: VAERun) -> TrainResult:
    """Put the EMA weights into the VAE (the result of an EMA run is the EMA model), write ``output_dir/vae``
    (main process) and end the trackers."""
    accelerator = run.accelerator
    if run.ema is not None:
        run.ema.copy_to(run.vae.parameters())
    vae_dir = run.output_dir / "vae"
    if accelerator.is_main_process:
        # Write next to the destination and rename, so a crash never leaves a half-written vae/ folder.
        partial = run.output_dir / "vae.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        save_vae(run, partial)
        if vae_dir.exists():
            shutil.rmtree(vae_dir)
        os.replace(partial / "vae", vae_dir)
        shutil.rmtree(partial, ignore_errors=True)
        logger.info("saved the trained VAE to %s", vae_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(vae=run.vae.eval(), vae_dir=vae_dir, history=run.history, validation=run.validation)
