"""Training checkpoints you can trust: atomic writes, retention, resume.

A checkpoint is a folder ``checkpoint-{step}`` holding ``accelerator.save_state`` output (model, optimizer,
LR scheduler, RNG states and every object registered with ``accelerator.register_for_checkpointing``), whatever
``save_model_fn`` writes (e.g. the transformer or ``vae/`` folder in the released format) and ``trainer_state.json``
(step and any extra state such as the data sampler position).

It is first written as ``checkpoint-{step}.partial`` and renamed only when complete, so a crash mid-save never
leaves a folder that looks like a finished checkpoint; leftovers of interrupted saves are removed at the next save.
Shared by the transformer and VAE trainers.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Callable

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest (lowest step) first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        match = _NAME.match(path.name)
        if match and path.is_dir() and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def resolve_resume(output_dir: str | os.PathLike, requested: str | os.PathLike | None) -> Path | None:
    """Turn ``--resume_from_checkpoint`` (``requested``) into a checkpoint folder.

    ``None``/``""`` -> no resume; ``"latest"`` -> the newest complete checkpoint in ``output_dir`` (``None`` when
    there is none yet, so a first run and a restarted run can share one command line); otherwise a folder that
    must be a complete checkpoint.
    """
    if requested is None or str(requested) == "":
        return None
    if str(requested) == "latest":
        path = latest_checkpoint(output_dir)
        if path is None:
            logger.info("resume 'latest': no checkpoint in %s yet, starting from scratch", output_dir)
        return path
    path = Path(requested)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {requested}: no such checkpoint folder")
    if not (path / STATE_FILE).is_file():
        raise ValueError(
            f"--resume_from_checkpoint {requested}: not a complete checkpoint (no {STATE_FILE}); "
            "it was probably interrupted while saving - pick an earlier one or use 'latest'"
        )
    return path


def save_checkpoint(
    accelerator,
    output_dir: str | os.PathLike,
    step: int,
    *,
    extra: dict | None = None,
    keep_last: int | None = None,
    save_model_fn: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``output_dir/checkpoint-{step}`` atomically. Call it on every process (DeepSpeed saves shards on
    each rank); only the main process writes the state file, renames and prunes. Returns the final path."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    partial = output_dir / f"checkpoint-{step}.partial"
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        for stale in output_dir.glob("checkpoint-*.partial"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()

    accelerator.save_state(str(partial))
    if accelerator.is_main_process:
        if save_model_fn is not None:
            save_model_fn(partial)
        state = {"step": int(step), **(extra or {})}
        tmp = partial / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        os.replace(tmp, partial / STATE_FILE)
        if final.exists():  # re-saving the same step (e.g. the final save right after a periodic one)
            shutil.rmtree(final)
        os.replace(partial, final)
        _fsync_dir(output_dir)
        if keep_last is not None and keep_last > 0:
            for old in list_checkpoints(output_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        logger.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: str | os.PathLike) -> dict:
    """Restore everything ``save_checkpoint`` wrote; returns the trainer state (``step`` and the extras).

    accelerate unpickles its ``.pkl``/``.bin`` files with ``weights_only=False``, which would run any code a
    tampered checkpoint carries. So every pickle in the folder is first read with ``weights_only=True`` (plus the
    numpy array types RNG states need), and a file holding anything else is refused before accelerate opens it.
    """
    path = Path(path)
    verify_pickles_hold_only_data(path)
    accelerator.load_state(str(path))
    return json.loads((path / STATE_FILE).read_text())


def verify_pickles_hold_only_data(folder: Path) -> None:
    """Raise ``ValueError`` naming the first pickle file under ``folder`` that holds more than tensors, plain
    containers, numbers, strings, numpy arrays and (in a run under DeepSpeed) the plain-data records DeepSpeed's
    ZeRO optimizer states hold."""
    import numpy as np
    import torch

    data_types = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32)),
                  *_deepspeed_state_types()]
    for file in sorted(folder.rglob("*")):
        if not file.is_file() or file.suffix not in (".pkl", ".bin", ".pt", ".pth"):
            continue
        try:
            with torch.serialization.safe_globals(data_types):
                torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any failure means we cannot vouch for the file
            raise ValueError(
                f"refusing to resume from {folder}: {file.name} holds pickled objects other than plain data "
                f"({str(exc).splitlines()[-1][:200]}). Resume only from checkpoints this project wrote."
            ) from exc


def _deepspeed_state_types() -> list:
    """The classes DeepSpeed pickles into its ZeRO optimizer states (loss-scaler settings, the ZeRO stage, a
    parameter's fragment offsets: attributes only, no code), when this run uses DeepSpeed (already imported);
    a run without it cannot resume a DeepSpeed checkpoint anyway."""
    if "deepspeed" not in sys.modules:
        return []
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
