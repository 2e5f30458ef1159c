"""Adaptive step caching: skip the transformer's later blocks on denoising steps where its output barely changes.

The rule (first-block caching, as FBCache / TeaCache do for other video DiTs, with no fitted coefficients): every
step runs the first block. Its output is compared with the first block's output at the previous step (relative
mean absolute change over every row, so the classifier-free-guidance rows decide together), and the changes are
accumulated since the last full step. While the sum stays below ``threshold`` the step reuses the residual the
other blocks added at the last full step (``output = first_block_output + residual``); once it passes, every block
runs, the residual is refreshed and the sum restarts. The first ``skip_start_steps`` steps and the last step always
run in full. Because the signal is measured on the model's own features at run time, it needs no calibration per
model, fine-tune or LoRA.

A :class:`StepCache` holds the state of one generation: the pipeline makes a new one per call (nothing carries over
between calls) and passes it to each transformer call with the step index.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

RECOMMENDED_THRESHOLD = 0.2  # chosen from the demo measurements: see the README's step-cache table
RECOMMENDED_SKIP_START_STEPS = 2


def relative_change(first: torch.Tensor, previous: torch.Tensor) -> float:
    """``mean|first - previous| / mean|previous|`` over every element (every row decides together)."""
    return ((first - previous).abs().mean() / previous.abs().mean().clamp_min(1e-12)).item()


@dataclass(frozen=True)
class StepCacheSettings:
    """How eagerly to reuse: ``threshold`` on the accumulated relative change of the first block's output (0 never
    reuses), and ``skip_start_steps`` steps at the start that always run in full."""

    threshold: float = RECOMMENDED_THRESHOLD
    skip_start_steps: int = RECOMMENDED_SKIP_START_STEPS

    def __post_init__(self):
        if not self.threshold >= 0:
            raise ValueError(f"step cache threshold must be >= 0 (0 never reuses a step), got {self.threshold}")
        if self.skip_start_steps < 0:
            raise ValueError(f"step cache skip_start_steps must be >= 0, got {self.skip_start_steps}")


@dataclass
class StepCache:
    """The caching state of one generation of ``num_steps`` denoising steps (see the module docstring).

    Call :meth:`begin_step` before each transformer call; the transformer asks :meth:`reuse` with its first block's
    output and then either calls :meth:`cached_output` or, after running every block, :meth:`store`.
    ``full_evaluations`` counts the steps that ran every block.
    """

    settings: StepCacheSettings
    num_steps: int
    step: int = 0
    full_evaluations: int = 0
    accumulated: float = 0.0
    previous_first: torch.Tensor | None = field(default=None, repr=False)
    residual: torch.Tensor | None = field(default=None, repr=False)

    def begin_step(self, step: int) -> None:
        self.step = step

    def reuse(self, first_output: torch.Tensor,
              measure: Callable[[torch.Tensor, torch.Tensor], float] | None = None) -> bool:
        """Whether this step may reuse the cached residual, given the first block's output (which is remembered).
        ``measure(first, previous)`` is the change (default :func:`relative_change`); under sequence parallelism
        each process holds some tokens and passes one that sums over all processes, so all decide alike. It is
        called only on steps that may reuse, which depends on the step and the earlier decisions alone: every
        process calls it together."""
        previous, self.previous_first = self.previous_first, first_output
        must_run = (self.residual is None or self.step < self.settings.skip_start_steps
                    or self.step >= self.num_steps - 1 or previous is None
                    or previous.shape != first_output.shape or self.residual.shape != first_output.shape)
        if must_run:
            return False
        self.accumulated += (measure or relative_change)(first_output, previous)
        return self.accumulated < self.settings.threshold

    def cached_output(self, first_output: torch.Tensor) -> torch.Tensor:
        return first_output + self.residual

    def store(self, first_output: torch.Tensor, output: torch.Tensor) -> None:
        """Remember what the blocks after the first added at this full step; restart the accumulated change."""
        self.residual = output - first_output
        self.accumulated = 0.0
        self.full_evaluations += 1
