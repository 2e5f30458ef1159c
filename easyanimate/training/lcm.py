"""Latent consistency distillation into a LoRA (LCM-LoRA, as the original's ``train_lcm_lora.py``).

The teacher is the frozen transformer, the student the same transformer with a LoRA. Each step:

1. draw a point of the 50-step DDIM grid over the 1000 training timesteps (``t``; its neighbour ``s = t - 20``)
   and a guidance scale ``w ~ U[w_min, w_max]``, per sample from its key;
2. noise the clean latents to ``x_t``; the student maps ``x_t`` to the consistency output
   ``c_skip(t) * x_t + c_out(t) * x0_student``;
3. without gradients: the teacher's classifier-free guided prediction in LCM form
   (``cond + w * (cond - uncond)``; unconditional = empty captions and no CLIP image tokens) takes one DDIM step
   from ``t`` to ``s``, and the student's own consistency output at ``x_s`` is the target (no separate EMA target
   network, as in the original);
4. the loss is the L2 (or pseudo-Huber) distance between the two.

Sampling with the result: the ``LCM`` sampler, 2-8 steps, guidance 1 (no classifier-free guidance: it was
distilled in).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..data.seeding import LCM_DRAW, keyed_rng
from .objective import DiffusionObjective, SampleKey, discard_learned_sigma

SIGMA_DATA = 0.5  # the boundary-condition scale of the LCM paper


def boundary_scalings(timesteps: torch.Tensor, timestep_scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``c_skip, c_out`` of the consistency parametrisation: ``c_skip -> 1, c_out -> 0`` at ``t = 0``."""
    scaled = timestep_scaling * timesteps.double()
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5
    return c_skip.float(), c_out.float()


def predicted_x0_and_noise(output: torch.Tensor, sample: torch.Tensor, alphas_cumprod: torch.Tensor,
                           timesteps: torch.Tensor, prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean sample and the noise a model output implies at ``timesteps`` (v- or epsilon-prediction)."""
    alpha_bar = alphas_cumprod.to(sample.device)[timesteps].float().view(-1, *[1] * (sample.ndim - 1))
    alpha, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    output, sample = output.float(), sample.float()
    if prediction_type == "v_prediction":
        return alpha * sample - sigma * output, alpha * output + sigma * sample
    if prediction_type == "epsilon":
        return (sample - sigma * output) / alpha, output
    raise ValueError(f"LCM distillation supports v_prediction and epsilon schedulers, not {prediction_type!r}")


class DDIMSolver:
    """The teacher's ODE solver: ``num_steps`` DDIM points over the training timesteps
    (``t_i = (i + 1) * T / num_steps - 1``), one deterministic DDIM step from ``t_i`` to the previous point."""

    def __init__(self, alphas_cumprod: torch.Tensor, num_train_timesteps: int, num_steps: int = 50):
        if not 1 <= num_steps <= num_train_timesteps:
            raise ValueError(f"the DDIM grid needs 1..{num_train_timesteps} points, got {num_steps}")
        self.step_ratio = num_train_timesteps // num_steps
        self.timesteps = torch.arange(1, num_steps + 1, dtype=torch.long) * self.step_ratio - 1
        self.alphas_cumprod_prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[self.timesteps[:-1]]]).float()

    def __len__(self) -> int:
        return len(self.timesteps)

    def step(self, x0: torch.Tensor, noise: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """One DDIM step per sample from grid point ``timesteps[index]`` to the point before it (``t = 0`` for the
        first), given the predicted clean sample ``x0`` and noise."""
        alpha_bar_prev = self.alphas_cumprod_prev.to(x0.device)[index].view(-1, *[1] * (x0.ndim - 1))
        return alpha_bar_prev.sqrt() * x0 + (1 - alpha_bar_prev).sqrt() * noise


@dataclass
class LCMDistillation:
    """Settings and loss of latent consistency distillation (defaults: the original's)."""

    objective: DiffusionObjective
    num_ddim_timesteps: int = 50
    w_min: float = 5.0
    w_max: float = 15.0
    timestep_scaling: float = 10.0
    loss_type: str = "l2"
    huber_c: float = 0.001

    def __post_init__(self):
        if self.loss_type not in ("l2", "huber"):
            raise ValueError(f"unknown LCM loss {self.loss_type!r}; choose l2 or huber")
        if not 0 <= self.w_min <= self.w_max:
            raise ValueError(f"need 0 <= w_min <= w_max, got {self.w_min} and {self.w_max}")
        scheduler = self.objective.scheduler
        self.alphas_cumprod = scheduler.alphas_cumprod.float()
        self.solver = DDIMSolver(self.alphas_cumprod, self.objective.num_train_timesteps, self.num_ddim_timesteps)

    def draw(self, keys: Sequence[SampleKey]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample: the DDIM grid index and the guidance scale ``w``."""
        index, scale = [], []
        for key in keys:
            rng = keyed_rng(self.objective.seed, LCM_DRAW, *key)
            index.append(int(rng.integers(len(self.solver))))
            scale.append(rng.uniform(self.w_min, self.w_max))
        return torch.tensor(index), torch.tensor(scale, dtype=torch.float32)

    def consistency_output(self, output: torch.Tensor, sample: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``c_skip(t) * sample + c_out(t) * x0`` in fp32, with ``x0`` the clean sample ``output`` implies."""
        x0, _ = predicted_x0_and_noise(output, sample, self.alphas_cumprod, timesteps, self.objective.prediction_type)
        c_skip, c_out = (c.to(sample.device).view(-1, *[1] * (sample.ndim - 1))
                         for c in boundary_scalings(timesteps, self.timestep_scaling))
        return c_skip * sample.float() + c_out * x0

    def loss(self, student: Callable[..., torch.Tensor], teacher: Callable[..., torch.Tensor],
             latents: torch.Tensor, keys: Sequence[SampleKey], conditioning: dict, unconditional: dict,
             weight_dtype: torch.dtype) -> torch.Tensor:
        """``student(x, t, conditioning)`` / ``teacher(...)`` return the transformer's raw output; the student is
        called once with gradients (the prediction) and once without (the target)."""
        channels = latents.shape[1]
        device = latents.device
        index, scale = self.draw(keys)
        start = self.solver.timesteps[index].to(device)
        end = (start - self.solver.step_ratio).clamp(min=0)
        noise = self.objective.sample_noise(latents.shape[1:], keys, device=device)
        noisy, _ = self.objective.noisy_latents_and_target(latents, noise, start)

        def call(model, x, t, cond):
            return discard_learned_sigma(model(x.to(weight_dtype), t.to(weight_dtype), cond), channels)

        prediction = self.consistency_output(call(student, noisy, start, conditioning), noisy, start)
        with torch.no_grad():
            prediction_type = self.objective.prediction_type
            cond_x0, cond_noise = predicted_x0_and_noise(call(teacher, noisy, start, conditioning), noisy,
                                                         self.alphas_cumprod, start, prediction_type)
            uncond_x0, uncond_noise = predicted_x0_and_noise(call(teacher, noisy, start, unconditional), noisy,
                                                             self.alphas_cumprod, start, prediction_type)
            w = scale.to(device).view(-1, *[1] * (latents.ndim - 1))
            x0 = cond_x0 + w * (cond_x0 - uncond_x0)
            eps = cond_noise + w * (cond_noise - uncond_noise)
            previous = self.solver.step(x0, eps, index.to(device))
            target = self.consistency_output(call(student, previous, end, conditioning), previous, end)
        if self.loss_type == "huber":
            return torch.mean(torch.sqrt((prediction - target) ** 2 + self.huber_c**2) - self.huber_c)
        return torch.mean((prediction - target) ** 2)
