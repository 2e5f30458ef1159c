"""EasyAnimate V4: causal slice video VAE, Hunyuan-DiT-derived 3D transformer, one pipeline, training and UI."""

__version__ = "0.1.0"
