"""Keyed randomness: every random choice of the data path and the objective is drawn from a generator seeded by
``(seed, purpose, epoch, sample position, ...)`` instead of from a shared stream.

Because a sample's mask, frame window, noise and timestep depend only on its key, a run resumed from a
checkpoint draws exactly what the uninterrupted run drew, and a run on N processes draws exactly what one
process with the same global batch draws, whatever the number of dataloader workers.
"""

from __future__ import annotations

import numpy as np
import torch

# purposes (small ints so they fit in a SeedSequence entropy list)
(FRAMES, REPLACE, MASK, BATCH, TEXT_DROP, NOISE, TIMESTEP, POSTERIOR, CLIP_DROP, T2V_FLAG, ROUND_BUDGET,
 LCM_DRAW) = range(12)


def seed_for(*keys: int) -> int:
    """A 63-bit seed that is a deterministic hash of the integer ``keys``."""
    state = np.random.SeedSequence([int(k) & 0xFFFFFFFFFFFFFFFF for k in keys]).generate_state(2, np.uint32)
    return (int(state[0]) << 31 | int(state[1])) & ((1 << 63) - 1)


def keyed_rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng(seed_for(*keys))


def keyed_torch_generator(*keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed_for(*keys))


def keyed_randn(shape, keys, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """Standard normal noise for one sample, drawn on the CPU from its key (identical on every device count)."""
    noise = torch.randn(shape, generator=keyed_torch_generator(*keys), dtype=torch.float32)
    return noise.to(device=device, dtype=dtype)
