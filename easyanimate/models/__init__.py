"""The V4 models: the causal slice video VAE and the 3D diffusion transformer.

The classes are imported on first use, so that light submodules (e.g. ``step_cache``, which the request layer reads
for its defaults) do not pull in diffusers and both models.
"""

import importlib

_EXPORTS = {"HunyuanTransformer3DModel": ".transformer", "AutoencoderKLMagvit": ".vae"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
