"""The V4 training objective.

DDPM forward process with the model folder's scheduler (scaled-linear betas, v-prediction), logit-normal
timesteps, the learned-sigma half of the transformer output discarded, MSE in fp32 with the optional motion
sub-loss, and the inpaint conditioning (VAE-encoded mask and masked video, CLIP tokens dropped half of the time).

All noise and coin flips are drawn per sample from keys (see :mod:`easyanimate.data.seeding`), so the loss of a
sample does not depend on the batch it landed in, the number of processes, or whether the run was resumed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from diffusers import DDPMScheduler

from ..data.seeding import CLIP_DROP, NOISE, T2V_FLAG, TIMESTEP, keyed_randn, keyed_rng

SampleKey = tuple[int, ...]  # (epoch, position, replica)


def sample_logit_normal_timesteps(keys: Sequence[SampleKey], seed: int, num_train_timesteps: int,
                                  mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """``t = int(sigmoid(u) * T)`` with ``u ~ N(mean, std)``, clipped to ``[0, T-1]``, one draw per sample key.
    V4 trains with ``N(0, 1)`` (median t = T/2); a negative mean moves weight to low noise, where fine detail
    such as corners is decided."""
    if std <= 0:
        raise ValueError(f"the logit-normal timestep std must be > 0, got {std}")
    u = mean + std * np.array([keyed_rng(seed, TIMESTEP, *key).standard_normal() for key in keys])
    t = (1.0 / (1.0 + np.exp(-u)) * num_train_timesteps).astype(np.int64)
    return torch.from_numpy(np.clip(t, 0, num_train_timesteps - 1))


def share_noise_across_frames(noise: torch.Tensor, ratio: float) -> torch.Tensor:
    """``--noise_share_in_frames``: ``eps_f <- r * eps_{f-1} + (1 - r) * eps_f`` sequentially over latent frames
    (``noise`` is ``B, C, F, h, w``)."""
    noise = noise.clone()
    for f in range(1, noise.shape[2]):
        noise[:, :, f] = ratio * noise[:, :, f - 1] + (1 - ratio) * noise[:, :, f]
    return noise


def discard_learned_sigma(model_output: torch.Tensor, latent_channels: int) -> torch.Tensor:
    """The transformer predicts ``2 * latent_channels`` channels (learn_sigma); only the first half is trained."""
    if model_output.shape[1] == 2 * latent_channels:
        return model_output[:, :latent_channels]
    if model_output.shape[1] != latent_channels:
        raise ValueError(
            f"transformer output has {model_output.shape[1]} channels; expected {latent_channels} or "
            f"{2 * latent_channels} for latents with {latent_channels} channels"
        )
    return model_output


def diffusion_loss(prediction: torch.Tensor, target: torch.Tensor, motion_sub_loss_ratio: float = 0.0) -> torch.Tensor:
    """MSE in fp32; with ``motion_sub_loss_ratio > 0`` and more than 2 latent frames it is mixed with the MSE of
    frame-to-frame differences: ``(1 - r) * mse + r * mse(diff_f pred, diff_f target)``."""
    prediction, target = prediction.float(), target.float()
    loss = torch.mean((prediction - target) ** 2)
    if motion_sub_loss_ratio > 0 and prediction.ndim == 5 and prediction.shape[2] > 2:
        motion_pred = prediction[:, :, 1:] - prediction[:, :, :-1]
        motion_target = target[:, :, 1:] - target[:, :, :-1]
        motion = torch.mean((motion_pred - motion_target) ** 2)
        loss = (1 - motion_sub_loss_ratio) * loss + motion_sub_loss_ratio * motion
    return loss


@dataclass
class DiffusionObjective:
    """Noise, timesteps, noisy input and regression target of one training step."""

    scheduler: DDPMScheduler
    seed: int = 0
    motion_sub_loss_ratio: float = 0.0
    noise_share_in_frames_ratio: float = 0.0
    timestep_logit_mean: float = 0.0
    timestep_logit_std: float = 1.0

    @classmethod
    def from_model_folder(cls, path: str | os.PathLike, **kwargs) -> "DiffusionObjective":
        """The objective with the DDPM scheduler of the model folder's ``scheduler/``; ``kwargs`` set the rest."""
        scheduler_dir = os.path.join(os.fspath(path), "scheduler")
        if not os.path.isfile(os.path.join(scheduler_dir, "scheduler_config.json")):
            raise FileNotFoundError(f"no scheduler/scheduler_config.json in {path}: the model folder is incomplete")
        return cls(DDPMScheduler.from_pretrained(scheduler_dir), **kwargs)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    def sample_noise(self, shape_per_sample: Sequence[int], keys: Sequence[SampleKey], *, device=None) -> torch.Tensor:
        """Standard normal noise ``(len(keys), *shape_per_sample)``, each row drawn from its sample key (and
        correlated across latent frames with ``noise_share_in_frames_ratio``)."""
        noise = torch.stack([keyed_randn(tuple(shape_per_sample), (self.seed, NOISE, *key)) for key in keys])
        if self.noise_share_in_frames_ratio > 0:
            noise = share_noise_across_frames(noise, self.noise_share_in_frames_ratio)
        return noise.to(device)

    def sample_timesteps(self, keys: Sequence[SampleKey], *, device=None) -> torch.Tensor:
        """One logit-normal training timestep per sample key (:func:`sample_logit_normal_timesteps`)."""
        return sample_logit_normal_timesteps(keys, self.seed, self.num_train_timesteps,
                                             self.timestep_logit_mean, self.timestep_logit_std).to(device)

    def noisy_latents_and_target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
        """``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` and the target the scheduler's prediction type asks
        for (``v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0`` for V4)."""
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        if self.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        elif self.prediction_type == "epsilon":
            target = noise
        else:
            raise ValueError(f"unsupported scheduler prediction_type {self.prediction_type!r} (v_prediction or epsilon)")
        return noisy, target

    def loss(self, model_output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The scalar fp32 loss of the transformer's raw output (learned-sigma half dropped) against ``target``."""
        prediction = discard_learned_sigma(model_output, target.shape[1])
        return diffusion_loss(prediction, target, self.motion_sub_loss_ratio)


def inpaint_condition_flags(masks: torch.Tensor, keys: Sequence[SampleKey], seed: int) -> torch.Tensor:
    """``t2v_flag`` per sample: 0 (inpaint latents zeroed, pure text-to-video as at inference) with probability
    0.9 when the whole mask is 1, else 1. ``masks`` is ``B, F, 1, H, W``."""
    flags = []
    for mask, key in zip(masks, keys):
        full = bool(torch.all(mask > 0.5))
        flags.append(0.0 if full and keyed_rng(seed, T2V_FLAG, *key).random() < 0.9 else 1.0)
    return torch.tensor(flags)


def clip_keep_mask(keys: Sequence[SampleKey], seed: int, n_query: int, p_keep: float = 0.5) -> torch.Tensor:
    """``clip_attention_mask`` ``B x n_query``: all ones (use the image tokens) with probability ``p_keep``, else
    zeros (tokens replaced by the learned padding). Drawn per sample; the original draws once per batch."""
    keep = [1.0 if keyed_rng(seed, CLIP_DROP, *key).random() < p_keep else 0.0 for key in keys]
    return torch.tensor(keep)[:, None].expand(-1, n_query).contiguous()
