"""Transformer training settings: one dataclass, turned into command-line flags by :func:`build_parser`.

Flag names are the original ``scripts/train.py`` names so its launch commands keep working; defaults are the
original's except where the original's default is a trap (``video_repeat`` 0 dropped every video; ``seed`` and
``trainable_modules`` had no default although the code needs them).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from dataclasses import dataclass, field

from ..data.dataset import DataConfig
from ..data.masks import VIDEO_MASK_PROBS, check_mask_probs

logger = logging.getLogger(__name__)

# Flags of the original's V4 train.sh that this trainer does not need: accepted, so that its launch commands run,
# and ignored with a notice that says why.
IGNORED_ORIGINAL_FLAGS = {
    "config_path": "the architecture comes from the model folder's config.json files",
    "enable_xformers_memory_efficient_attention": "attention uses PyTorch's scaled_dot_product_attention",
    "not_sigma_loss": "the V4 loss is the only loss this trainer has",
    "multi_stream": "the VAE encodes run on the default CUDA stream (the original overlapped them on two more)",
}


def _f(default, help: str, **extra):
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    """Every setting of a transformer training run (full fine-tune or LoRA)."""

    # paths
    pretrained_model_name_or_path: str = _f(None, "model folder in the released layout (required)", required=True)
    train_data_meta: str = _f(None, "metadata .json/.jsonl/.csv (file_path, text, type, [width, height])", required=True)
    train_data_dir: str = _f(None, "folder relative file paths are relative to (omit for absolute paths)")
    output_dir: str = _f("output_dir", "checkpoints, samples and logs go here")
    transformer_path: str = _f(None, "start from these transformer weights (.safetensors or a folder) instead")
    adapt_transformer_channels: bool = _f(False, "fit --transformer_path weights made for other channel counts (e.g. "
                                          "a 4-channel HunyuanDiT into the 12-channel InP model: new inputs zeroed)")
    vae_path: str = _f(None, "use these VAE weights (a file, or the vae/ folder train_vae.py writes) instead")
    # data
    image_sample_size: int = _f(512, "largest image base size")
    video_sample_size: int = _f(512, "video base size")
    token_sample_size: int = _f(512, "token budget side: budget = video_sample_n_frames * token_sample_size**2")
    video_sample_stride: int = _f(4, "frame stride when sampling clips")
    video_sample_n_frames: int = _f(17, "frames per clip (the V4 stages use 144)")
    video_repeat: int = _f(1, "how often each video is listed per epoch (the original's default 0 drops videos)")
    enable_bucket: bool = _f(True, "aspect-ratio buckets (off: square centre crops at video_sample_size)")
    random_ratio_crop: bool = _f(False, "draw the crop bucket from the 15 random-crop ratios")
    random_frame_crop: bool = _f(False, "randomly shorten clips (full length with probability 0.9)")
    keep_all_node_same_token_length: bool = _f(False, "every process trains a step at the same pixel budget, drawn per "
                                               "step from 256^2..token_sample_size^2 x frames (frames capped to it)")
    random_hw_adapt: bool = _f(False, "train at several resolutions")
    training_with_video_token_length: bool = _f(False, "fixed token budget per batch (size/frames trade-off, x2/x4)")
    text_drop_ratio: float = _f(0.0, "probability of an empty caption (V4: 0, never)")
    video_mask_probs: list = _f(list(VIDEO_MASK_PROBS), "inpaint mode: probabilities of the video mask types random "
                                "box, full (text-to-video), keep head, keep head and tail, spatio-temporal box",
                                nargs=5, type=float)
    dataloader_num_workers: int = _f(0, "dataloader worker processes")
    max_failure_fraction: float = _f(0.05, "stop training when more than this fraction of file reads fail")
    max_retries: int = _f(10, "replacements tried for one broken file before giving up")
    # model and objective
    train_mode: str = _f("inpaint", "'inpaint' (image-to-video InP model) or 'normal' (text-to-video)",
                         choices=["inpaint", "normal"])
    trainable_modules: list = _f(["."], "train transformer parameters whose name contains one of these", nargs="+")
    trainable_modules_low_learning_rate: list = _f([], "…and these at half the learning rate", nargs="*")
    motion_sub_loss: bool = _f(False, "add the frame-difference loss (V4 recipe: on)")
    motion_sub_loss_ratio: float = _f(0.25, "weight of the motion sub-loss")
    noise_share_in_frames: bool = _f(False, "correlate the noise of consecutive latent frames")
    noise_share_in_frames_ratio: float = _f(0.5, "correlation of --noise_share_in_frames")
    timestep_logit_mean: float = _f(0.0, "timesteps t = T * sigmoid(u), u ~ N(mean, std); V4: N(0, 1); a negative "
                                    "mean trains more at low noise (fine detail)")
    timestep_logit_std: float = _f(1.0, "std of the logit-normal timestep density")
    vae_mini_batch: int = _f(32, "samples per VAE encode call")
    precompute_text_embeddings: bool = _f(False, "encode all captions once at start and free the text encoders")
    # optimisation
    train_batch_size: int = _f(16, "samples per process per micro-batch")
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step")
    num_train_epochs: int = _f(100, "epochs (ignored when max_train_steps is set)")
    max_train_steps: int = _f(None, "stop after this many optimizer steps")
    learning_rate: float = _f(1e-4, "peak learning rate")
    scale_lr: bool = _f(False, "multiply lr by accumulation x batch x processes")
    lr_scheduler: str = _f("constant", "diffusers schedule name (constant, constant_with_warmup, cosine, linear, ...)")
    lr_warmup_steps: int = _f(500, "warm-up optimizer steps")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    adam_weight_decay: float = _f(1e-2, "AdamW weight decay")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon")
    use_8bit_adam: bool = _f(False, "bitsandbytes AdamW8bit (needs `pip install bitsandbytes`)")
    use_came: bool = _f(False, "CAME optimizer with the original's betas (0.9, 0.999, 0.9999), eps (1e-30, 1e-16) and "
                        "no weight decay (the adam_* settings do not apply)")
    max_grad_norm: float = _f(1.0, "gradient clipping norm")
    abnormal_norm_clip_start: int = _f(1000, "steps of the adaptive clip warm-up")
    initial_grad_norm_ratio: float = _f(5.0, "adaptive clip starts at this multiple of max_grad_norm")
    report_model_info: bool = _f(False, "also log the clip value and, when the gradient norm exceeds 1 after the clip "
                                 "warm-up, the 10 largest per-parameter gradient norms (to find what spikes)")
    gradient_checkpointing: bool = _f(False, "recompute transformer activations in backward")
    low_vram: bool = _f(False, "keep the VAE and text encoders on the CPU and move each to the GPU only while it "
                        "encodes (the original's; slower, frees their GPU memory for the transformer)")
    allow_tf32: bool = _f(False, "TF32 matmuls on Ampere+ GPUs")
    mixed_precision: str = _f(None, "no / fp16 / bf16 (default: accelerate config)", choices=[None, "no", "fp16", "bf16"])
    use_ema: bool = _f(False, "keep an EMA of the transformer weights (diffusers EMAModel)")
    ema_decay: float = _f(0.9999, "EMA decay")
    use_deepspeed: bool = _f(False, "accepted for the original's scripts; DeepSpeed is detected from the launcher")
    # LoRA
    lora: bool = _f(False, "train a LoRA instead of the transformer weights")
    rank: int = _f(128, "LoRA rank")
    network_alpha: float = _f(64.0, "LoRA alpha (scale = alpha / rank)")
    # LCM-LoRA distillation (the original's train_lcm_lora.py; its flag names in brackets)
    lcm_distillation: bool = _f(False, "distil the model into an LCM-LoRA for 2-8 step sampling (needs --lora; the "
                                "original used rank 64, alpha 64)")
    lcm_num_ddim_timesteps: int = _f(50, "points of the teacher's DDIM grid [--num_ddim_timesteps]; the LCM sampler "
                                     "assumes 50 (its original_inference_steps)")
    lcm_w_min: float = _f(5.0, "smallest distilled guidance scale w [--w_min]")
    lcm_w_max: float = _f(15.0, "largest distilled guidance scale w [--w_max]")
    lcm_timestep_scaling: float = _f(10.0, "timestep scale of the boundary conditions [--timestep_scaling_factor]")
    lcm_loss_type: str = _f("l2", "distillation loss [--loss_type]", choices=["l2", "huber"])
    lcm_huber_c: float = _f(0.001, "pseudo-Huber constant [--huber_c]")
    # bookkeeping
    seed: int = _f(42, "seed of every random choice")
    checkpointing_steps: int = _f(500, "save a checkpoint every N optimizer steps")
    checkpoints_total_limit: int = _f(None, "keep only the newest N checkpoints")
    resume_from_checkpoint: str = _f(None, "'latest' or a checkpoint folder")
    validation_prompts: list = _f([], "prompts rendered every validation_steps", nargs="*")
    validation_steps: int = _f(2000, "render validation samples every N steps")
    validation_epochs: int = _f(None, "also render them at the end of every N-th epoch (the original: 5; off here, "
                                "as small datasets finish epochs every few steps)")
    validation_inference_steps: int = _f(50, "sampler steps of validation samples")
    report_to: str = _f("tensorboard", "accelerate tracker ('none' to disable)")
    logging_dir: str = _f("logs", "tracker (TensorBoard) logs, relative to output_dir")
    tracker_project_name: str = _f("easyanimate-train", "tracker run name")

    def __post_init__(self):
        if self.train_batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ValueError("train_batch_size and gradient_accumulation_steps must be >= 1")
        if self.checkpointing_steps < 1:
            raise ValueError("checkpointing_steps must be >= 1")
        self.video_mask_probs = list(check_mask_probs(self.video_mask_probs))
        if not 0 <= self.max_failure_fraction <= 1:
            raise ValueError("max_failure_fraction must be in [0, 1]")
        if self.lora and self.use_ema:
            raise ValueError("--use_ema averages full transformer weights; it does not apply to --lora training")
        if self.timestep_logit_std <= 0:
            raise ValueError(f"--timestep_logit_std must be > 0, got {self.timestep_logit_std}")
        if self.lcm_distillation and not self.lora:
            raise ValueError("--lcm_distillation trains a LoRA student next to the frozen teacher; add --lora "
                             "(the original: --rank 64 --network_alpha 64)")
        if self.use_came and self.use_8bit_adam:
            raise ValueError("--use_came and --use_8bit_adam each choose the optimizer; pass only one")
        if self.validation_epochs is not None and self.validation_epochs < 1:
            raise ValueError(f"--validation_epochs must be >= 1, got {self.validation_epochs}")
        if self.adapt_transformer_channels and not self.transformer_path:
            raise ValueError("--adapt_transformer_channels fits the weights of --transformer_path; pass that too")
        if self.lora and self.rank < 1:
            raise ValueError(f"--rank must be >= 1, got {self.rank}")

    def data_config(self) -> DataConfig:
        """The data settings of this run as the dataset, sampler and collate function take them."""
        return DataConfig(
            image_sample_size=self.image_sample_size,
            video_sample_size=self.video_sample_size,
            token_sample_size=self.token_sample_size,
            video_sample_n_frames=self.video_sample_n_frames,
            video_sample_stride=self.video_sample_stride,
            video_repeat=self.video_repeat,
            enable_bucket=self.enable_bucket,
            random_hw_adapt=self.random_hw_adapt,
            training_with_video_token_length=self.training_with_video_token_length,
            random_ratio_crop=self.random_ratio_crop,
            random_frame_crop=self.random_frame_crop,
            keep_all_node_same_token_length=self.keep_all_node_same_token_length,
            enable_inpaint=self.train_mode == "inpaint",
            video_mask_probs=tuple(self.video_mask_probs),
            text_drop_ratio=self.text_drop_ratio,
            max_retries=self.max_retries,
        )


def build_parser() -> argparse.ArgumentParser:
    """One flag per :class:`TrainConfig` field (booleans also as ``--no-…``), plus the ignored original flags."""
    parser = argparse.ArgumentParser(description="Train the EasyAnimate V4 transformer (full fine-tune or LoRA).")
    for f in dataclasses.fields(TrainConfig):
        meta = dict(f.metadata)
        help_text = meta.pop("help")
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        flag = "--" + f.name
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
            continue
        kind = meta.pop("type", {"int": int, "float": float, "str": str, "list": str}.get(f.type, str))
        parser.add_argument(flag, type=kind, default=default, help=help_text, **meta)
    ignored = parser.add_argument_group("accepted from the original's train.sh and ignored")
    for name, reason in IGNORED_ORIGINAL_FLAGS.items():
        if name == "config_path":
            ignored.add_argument(f"--{name}", default=None, help=f"ignored: {reason}")
        else:
            ignored.add_argument(f"--{name}", action="store_true", help=f"ignored: {reason}")
    return parser


def parse_args(argv=None) -> TrainConfig:
    """A validated :class:`TrainConfig` from command-line arguments (``sys.argv`` when None), with a warning for
    each ignored original flag given."""
    args = vars(build_parser().parse_args(argv))
    for name, reason in IGNORED_ORIGINAL_FLAGS.items():
        if args.pop(name):
            logger.warning("--%s is not needed and is ignored: %s", name, reason)
    return TrainConfig(**args)
