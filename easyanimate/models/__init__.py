"""The V4 models: the causal slice video VAE and the 3D diffusion transformer."""

from .transformer import HunyuanTransformer3DModel
from .vae import AutoencoderKLMagvit

__all__ = ["AutoencoderKLMagvit", "HunyuanTransformer3DModel"]
