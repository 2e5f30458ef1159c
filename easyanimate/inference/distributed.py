"""The processes of one sequence-parallel generation: how they are launched, checked and connected.

    torchrun --nproc_per_node 2 predict_t2v.py --prompt "..." --ulysses-degree 2

torchrun starts the processes and tells each its place (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``). Every process
checks the request, loads the whole model and runs the whole pipeline; only the transformer's tokens are split
(:mod:`easyanimate.models.sequence_parallel`), so the processes hold the same latents at every step. Rank 0 decodes
and writes the result; the others skip the decode (except between the chunks of a long video, whose next chunk
starts from the decoded frames) and write nothing.

GPUs talk over NCCL, one GPU per process (``cuda:LOCAL_RANK``); CPUs over gloo.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch

from easyanimate.inference.request import RequestError

# How long a process waits in a collective for the others (a failed process otherwise leaves the rest waiting).
TIMEOUT_ENV = "EASYANIMATE_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 1800


def launched_world_size() -> int:
    """Processes in this launch, as torchrun (or any launcher setting ``WORLD_SIZE``) says; 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    """This process's rank in the launch (``RANK``); 0 without a launcher."""
    return int(os.environ.get("RANK", "0"))


def is_output_rank() -> bool:
    """Whether this process reports and writes results: the only one, or rank 0 of a launch."""
    return launched_rank() == 0


def check_degrees(ulysses_degree: int, ring_degree: int, world_size: int | None = None, *,
                  labels: dict[str, str] | None = None) -> None:
    """:class:`RequestError` unless ``ulysses_degree x ring_degree`` equals the processes launched (``world_size``,
    default :func:`launched_world_size`): one video is split across all of them, and more processes would only
    repeat the same work. Cheap: nothing is loaded or connected."""
    labels = labels or {}
    u_name, r_name = labels.get("ulysses_degree", "ulysses degree"), labels.get("ring_degree", "ring degree")
    world = launched_world_size() if world_size is None else world_size
    degree = ulysses_degree * ring_degree
    if degree == world:
        return
    if world == 1:
        raise RequestError(
            f"{u_name} {ulysses_degree} x {r_name} {ring_degree} = {degree} processes, but this is one process: "
            f"launch it with torchrun --nproc_per_node {degree} (one process per GPU, or per CPU socket)")
    raise RequestError(
        f"{world} processes were launched but {u_name} {ulysses_degree} x {r_name} {ring_degree} = {degree}: the "
        f"product must equal the process count; e.g. {u_name} {world}")


def check_parallel_request(request, height: int, width: int, model_path=None, *,
                           labels: dict[str, str] | None = None) -> None:
    """:class:`RequestError` naming the allowed values unless ``request``'s sequence-parallel degrees work: their
    product is the process count, the Ulysses degree divides the model's attention heads (read from
    ``model_path``'s transformer config when given), and ring attention has a CUDA device, a 16-bit dtype and a
    per-frame token count ``(height/16) x (width/16)`` that divides by the degree (its kernels cannot mask padding;
    Ulysses pads and masks any count). Cheap: nothing is loaded or connected."""
    from easyanimate.models.sequence_parallel import SequenceParallelError, check_heads, check_ring_support

    if request.parallel_degree == 1:
        return
    check_degrees(request.ulysses_degree, request.ring_degree, labels=labels)
    try:
        heads = _attention_heads(model_path)
        if heads is not None:
            check_heads(heads, request.ulysses_degree)
        if request.ring_degree > 1:
            dtype = None if request.dtype == "auto" else getattr(torch, request.dtype)
            check_ring_support(process_device(request.device).type, dtype)
            _check_ring_tokens(height, width, request.parallel_degree)
    except SequenceParallelError as exc:
        raise RequestError(str(exc)) from exc


def _attention_heads(model_path) -> int | None:
    """``num_attention_heads`` of a model folder's transformer config; None when it cannot be read (loading will
    say why)."""
    import json
    from pathlib import Path

    if model_path is None:
        return None
    try:
        return int(json.loads((Path(model_path) / "transformer" / "config.json").read_text())["num_attention_heads"])
    except (OSError, ValueError, KeyError):
        return None


def _check_ring_tokens(height: int, width: int, degree: int) -> None:
    """Ring attention needs every frame's tokens, ``(height/16) x (width/16)``, to divide by ``degree``."""
    import math

    from easyanimate.inference.request import SIZE_MULTIPLE
    from easyanimate.models.sequence_parallel import SequenceParallelError

    rows, cols = height // SIZE_MULTIPLE, width // SIZE_MULTIPLE
    if rows * cols % degree == 0:
        return
    step = degree // math.gcd(rows, degree)  # width / 16 must be a multiple of this at this height
    lower = max(step, cols // step * step) * SIZE_MULTIPLE
    raise SequenceParallelError(
        f"ring attention splits every frame's tokens, (height/16) x (width/16) = {rows} x {cols} = {rows * cols}, "
        f"evenly across {degree} processes and cannot pad them: choose a size where that product is a multiple of "
        f"{degree}, e.g. {height}x{lower} or {height}x{lower + step * SIZE_MULTIPLE}, or use the Ulysses degree alone")


def setup_sequence_parallel(ulysses_degree: int, ring_degree: int, device: torch.device | str | None = None,
                            ) -> torch.device:
    """Connect the processes of this launch (once; later calls with the same degrees reuse the connection): NCCL
    for CUDA, gloo otherwise; then yunchang's Ulysses and ring groups. Returns the device this process runs on:
    ``cuda:LOCAL_RANK`` when ``device`` is CUDA (or None and CUDA is available), else ``device``."""
    import torch.distributed as dist
    from yunchang import set_seq_parallel_pg
    from yunchang.globals import PROCESS_GROUP

    check_degrees(ulysses_degree, ring_degree)
    device = process_device(device)
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    degrees = (ulysses_degree, ring_degree)
    if getattr(PROCESS_GROUP, "easyanimate_degrees", None) != degrees:
        set_seq_parallel_pg(ulysses_degree, ring_degree, dist.get_rank(), dist.get_world_size())
        PROCESS_GROUP.easyanimate_degrees = degrees
    return device


def process_device(device: torch.device | str | None) -> torch.device:
    """The device of this process: a CUDA device (or None when CUDA is available) becomes ``cuda:LOCAL_RANK`` (one
    GPU per process); anything else stays as given (None: the CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def shutdown() -> None:
    """Close this process's connection to the others (at the end of a launch), if one was made."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
