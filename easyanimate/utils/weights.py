"""Loading model weights safely and strictly.

The original loads checkpoints with ``strict=False`` and only *prints* missing keys, so a truncated or
mismatched file silently leaves layers at random init. Here every load goes through :func:`load_state_dict_strict`,
which raises with the list of what is wrong. Files are read with safetensors, or ``torch.load(weights_only=True)``
for ``.bin`` files, so no pickle code ever runs.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError
from safetensors.torch import load_file

logger = logging.getLogger(__name__)

WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
)
INDEX_NAMES = ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json")


class CheckpointError(RuntimeError):
    """A checkpoint file or folder is missing, corrupt, or does not fit the model."""


def read_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read one ``.safetensors`` or ``.bin``/``.pt`` file onto the CPU without executing pickled code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path), device="cpu")
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refusing to load {path}: it contains pickled objects other than tensors, which could run code. "
            "Convert it to .safetensors with a tool you trust."
        ) from exc
    except (SafetensorError, OSError, RuntimeError, EOFError, ValueError) as exc:
        raise CheckpointError(
            f"cannot read weights file {path}: {exc}. The file is corrupt or truncated; download or copy it again."
        ) from exc
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path} does not hold a state dict (found {type(state).__name__})")
    return dict(state)


def find_weights(folder: str | os.PathLike) -> list[Path]:
    """The weight file(s) of a model folder: a single file, or the shards listed in an index json."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"model folder not found: {folder}")
    for name in INDEX_NAMES:
        index = folder / name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise CheckpointError(f"{index} lists shards that are missing: {missing}")
            return [folder / s for s in shards]
    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return [folder / name]
    raise CheckpointError(
        f"no weights in {folder}: expected one of {', '.join(WEIGHT_NAMES)} (or a sharded index json)"
    )


def read_folder_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All weights of a model folder (every shard merged) on the CPU; raises :class:`CheckpointError`."""
    state: dict[str, torch.Tensor] = {}
    for file in find_weights(folder):
        state.update(read_weights_file(file))
    return state


def _summarise(keys: Iterable[str], limit: int = 20) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_state_dict_strict(
    model: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    source: str = "checkpoint",
    ignore_prefixes: tuple[str, ...] = (),
    assign: bool = False,
) -> None:
    """Copy ``state_dict`` into ``model``; raise :class:`CheckpointError` on any missing, unexpected or
    wrongly-shaped key. Keys starting with one of ``ignore_prefixes`` (training-only extras such as a VAE's
    ``loss.*`` modules) are dropped with a single notice line. ``assign=True`` makes the checkpoint tensors the
    parameters (for models built on the meta device)."""
    ignored = [k for k in state_dict if ignore_prefixes and k.startswith(ignore_prefixes)]
    if ignored:
        logger.info("%s: ignoring %d training-only keys (%s...)", source, len(ignored), ignored[0])
        state_dict = {k: v for k, v in state_dict.items() if k not in set(ignored)}
    expected = model.state_dict()
    missing = set(expected) - set(state_dict)
    unexpected = set(state_dict) - set(expected)
    wrong_shape = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state_dict)
        if tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_summarise(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_summarise(unexpected)}")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} keys with the wrong shape: {_summarise(wrong_shape)}")
    if problems:
        raise CheckpointError(
            f"{source} does not match {type(model).__name__} "
            f"(is the config.json the one that belongs to these weights?):\n  " + "\n  ".join(problems)
        )
    model.load_state_dict(state_dict, strict=True, assign=assign)


def load_weights_into(model: torch.nn.Module, path: str | os.PathLike, *, ignore_prefixes: tuple[str, ...] = (),
                      adapt: Callable[[torch.nn.Module, dict], dict] | None = None) -> None:
    """Replace all of ``model``'s weights with those of ``path``: a weights file or a model folder (e.g. a fine-tuned
    ``transformer/`` or ``vae/``). Strict: any missing, unexpected or wrongly-shaped key raises
    :class:`CheckpointError`, so weights are never loaded in part. ``adapt(model, state_dict)`` may first fit the
    state dict to the model (e.g. other input channel counts)."""
    state = read_folder_weights(path) if Path(path).is_dir() else read_weights_file(path)
    if adapt is not None:
        state = adapt(model, state)
    load_state_dict_strict(model, state, source=str(path), ignore_prefixes=ignore_prefixes)


def read_model_config(cls, folder: str | os.PathLike, overrides: Mapping | None = None) -> dict:
    """``folder/config.json`` with ``overrides`` on top; a missing or malformed file is a clear error."""
    config_file = Path(folder) / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{cls.__name__}: no config.json in {folder}")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_file} is not valid JSON: {exc}") from exc
    config.update(overrides or {})
    return config


def load_model_from_folder(
    cls,
    path: str | os.PathLike,
    subfolder: str | None = None,
    *,
    torch_dtype: torch.dtype | None = None,
    config_overrides: Mapping | None = None,
    ignore_prefixes: tuple[str, ...] = (),
    adapt: Callable | None = None,
):
    """Build ``cls`` (a diffusers ``ModelMixin`` + ``ConfigMixin``) from ``folder/config.json`` with
    ``config_overrides`` on top, and load the folder's weights strictly, in ``torch_dtype`` (default float32,
    whatever the precision on disk).

    Unknown config keys (``_class_name``, ``block_out_channels``, ...) are tolerated: ``from_config`` drops them.
    Parameters are created on the meta device and the checkpoint tensors are assigned in place, so loading needs
    about one copy of the weights in memory, not two (random init of a 2B model alone would take 8 GB).
    ``adapt(model, state_dict) -> state_dict`` fits a checkpoint to the model first; the model is then built with
    real init, because what the checkpoint does not cover keeps its init.
    """
    folder = Path(path) / subfolder if subfolder else Path(path)
    config = read_model_config(cls, folder, config_overrides)
    state_dict = read_folder_weights(folder)
    if adapt is None:
        with init_empty_weights(include_buffers=False):
            model = cls.from_config(config)
    else:
        model = cls.from_config(config)
        state_dict = adapt(model, state_dict)
    dtype = torch_dtype or torch.float32
    state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    load_state_dict_strict(
        model, state_dict, source=str(folder), ignore_prefixes=ignore_prefixes, assign=adapt is None
    )
    # nn.Module.to: buffers outside the state dict follow the dtype too. (diffusers' ModelMixin.to would log a
    # "keep in float32" warning on every cast.)
    torch.nn.Module.to(model, dtype)
    return model.eval()
