"""The processes of one sequence-parallel generation: how they are launched, checked and connected.

    torchrun --nproc_per_node 2 predict_t2v.py --prompt "..." --ulysses-degree 2

torchrun starts the processes and tells each its place (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``). Every process
checks the request, loads the whole model and runs the whole pipeline; only the transformer's tokens are split
(:mod:`easyanimate.models.sequence_parallel`), so the processes hold the same latents at every step. Rank 0 decodes
and writes the result; the others skip the decode (except between the chunks of a long video, whose next chunk
starts from the decoded frames) and write nothing.

GPUs talk over NCCL, one GPU per process (``cuda:LOCAL_RANK``); CPUs over gloo.

A long-lived launch (the web server: ``torchrun --nproc_per_node N app.py --ulysses-degree N``) also needs a way for
rank 0 to hand each job to the others and for all of them to agree on how it went: :class:`ControlChannel`, a gloo
group of its own whose timeout outlasts any idle time (the per-generation collectives keep :data:`TIMEOUT_ENV`'s).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, TypeVar

import torch

from easyanimate.inference.request import RequestError

T = TypeVar("T")

# How long a process waits in a collective for the others (a failed process otherwise leaves the rest waiting).
TIMEOUT_ENV = "EASYANIMATE_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 1800
# How long a follower waits on the control channel for rank 0's next job: as long as a server may stay idle. (Not
# longer: gloo adds it to the clock in nanoseconds, which overflows past ~290 years.)
CONTROL_TIMEOUT = timedelta(days=365)


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
    from easyanimate.models.sequence_parallel import SequenceParallelError, check_ring_support

    if request.parallel_degree == 1:
        return
    check_degrees(request.ulysses_degree, request.ring_degree, labels=labels)
    check_model_heads(model_path, request.ulysses_degree)
    try:
        if request.ring_degree > 1:
            dtype = None if request.dtype == "auto" else getattr(torch, request.dtype)
            check_ring_support(process_device(request.device).type, dtype)
            _check_ring_tokens(height, width, request.parallel_degree)
    except SequenceParallelError as exc:
        raise RequestError(str(exc)) from exc


def check_model_heads(model_path, ulysses_degree: int) -> None:
    """:class:`RequestError` naming the allowed degrees unless ``ulysses_degree`` divides the attention heads of
    ``model_path``'s transformer (a folder whose config cannot be read is not checked: loading will say why)."""
    from easyanimate.models.sequence_parallel import SequenceParallelError, check_heads

    heads = _attention_heads(model_path)
    if heads is None:
        return
    try:
        check_heads(heads, ulysses_degree)
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
    device = connect_processes(device)
    degrees = (ulysses_degree, ring_degree)
    if getattr(PROCESS_GROUP, "easyanimate_degrees", None) != degrees:
        set_seq_parallel_pg(ulysses_degree, ring_degree, dist.get_rank(), dist.get_world_size())
        PROCESS_GROUP.easyanimate_degrees = degrees
    return device


def connect_processes(device: torch.device | str | None = None) -> torch.device:
    """Join the processes of this launch into ``torch.distributed``'s default group (once): NCCL for a CUDA device,
    gloo otherwise, with :data:`TIMEOUT_ENV`'s timeout for every collective. Returns this process's device (see
    :func:`process_device`)."""
    import torch.distributed as dist

    device = process_device(device)
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
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


# ---------------------------------------------------------------------------------------------------------------
# A long-lived launch: rank 0 leads, the others follow


class ProcessesOutOfStep(RuntimeError):
    """A collective failed (timed out, or a process is gone): the processes may no longer be in the same collective,
    so none of them can run another generation; the launch must end."""


@dataclass(frozen=True)
class Outcome:
    """How one process's part of a job went, as every process learns it: ``error`` (None: it succeeded), whether
    that error is a refusal (:class:`RequestError`: a message for the user) and whether it came from a collective
    (then the processes may be out of step)."""

    rank: int
    error: str | None = None
    refusal: bool = False
    communication: bool = False

    @classmethod
    def of(cls, rank: int, error: BaseException | None) -> "Outcome":
        if error is None:
            return cls(rank)
        return cls(rank, f"{type(error).__name__}: {error}", isinstance(error, RequestError),
                   is_communication_error(error))


def is_communication_error(error: BaseException) -> bool:
    """Whether ``error`` came from a collective rather than from this process's own work: torch's ``DistError``
    family (NCCL's errors, a lost store) or a gloo transport error (gloo raises a plain RuntimeError whose message
    names its source, e.g. "[.../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 1800000ms for recv
    operation to complete")."""
    import torch.distributed as dist

    if isinstance(error, ProcessesOutOfStep) or isinstance(error, getattr(dist, "DistError", ())):
        return True
    return isinstance(error, RuntimeError) and "/gloo/" in str(error)


class ControlChannel:
    """Rank 0 (the leader) hands jobs to the other processes of a launch (the followers), and all of them agree on
    each job's outcome, over a gloo group of its own.

    Its own group because of timeouts: a follower waits here for the next job for as long as the leader is idle
    (a web server waits for visitors), which would trip the default group's :data:`TIMEOUT_ENV` (meant to end a
    generation whose peer failed); this group's is :data:`CONTROL_TIMEOUT`. gloo also on GPUs: the messages are small
    Python objects on the CPU. Every method is a collective: every process calls the same methods in the same order
    (the leader holds a lock around each job, so its threads never interleave them)."""

    def __init__(self, group, rank: int, world_size: int, ulysses_degree: int, ring_degree: int):
        self.group, self.rank, self.world_size = group, rank, world_size
        self.ulysses_degree, self.ring_degree = ulysses_degree, ring_degree

    @classmethod
    def connect(cls, ulysses_degree: int, ring_degree: int, device: torch.device | str | None = None
                ) -> "ControlChannel":
        """Connect the processes of this launch (:func:`connect_processes`; the degrees checked first) and open the
        channel. Every process of the launch must call it, before anything else makes process groups."""
        import torch.distributed as dist

        check_degrees(ulysses_degree, ring_degree)
        connect_processes(device)
        group = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
        return cls(group, dist.get_rank(), dist.get_world_size(), ulysses_degree, ring_degree)

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def share(self, message: Any = None) -> Any:
        """The leader's ``message`` (any picklable object), on every process (followers pass nothing and wait)."""
        import torch.distributed as dist

        box = [message]
        self._collective(dist.broadcast_object_list, box, src=0, group=self.group)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every process's ``value``, in rank order, on every process."""
        import torch.distributed as dist

        values = [None] * self.world_size
        self._collective(dist.all_gather_object, values, value, group=self.group)
        return values

    def any(self, flag: bool) -> bool:
        """True on every process when ``flag`` is true on any (e.g. a cancel pressed on the leader's page)."""
        import torch.distributed as dist

        value = torch.tensor([int(bool(flag))])
        self._collective(dist.all_reduce, value, op=dist.ReduceOp.MAX, group=self.group)
        return bool(value.item())

    def run_together(self, action: Callable[[], T]) -> T:
        """Run ``action`` on every process and agree on the outcome: its result where it succeeded everywhere;
        otherwise every process raises -- its own error where it failed, else a :class:`RequestError` (a refusal
        elsewhere, e.g. out of GPU memory) or RuntimeError naming the process that failed and why -- so that all
        of them go on to the next job together. Where any process's error came from a collective, every process
        raises :class:`ProcessesOutOfStep` instead."""
        try:
            result, error = action(), None
        except Exception as exc:  # every failure is shared with the others, then raised
            result, error = None, exc
        outcomes = self.gather(Outcome.of(self.rank, error))
        broken = [o for o in outcomes if o.communication]
        if broken:
            raise ProcessesOutOfStep(
                "the processes of this launch fell out of step: " + "; ".join(
                    f"process {o.rank}: {o.error}" for o in broken)) from error
        if error is not None:
            raise error
        failed = next((o for o in outcomes if o.error is not None), None)
        if failed is not None:
            message = f"process {failed.rank} of {self.world_size} failed: {failed.error}"
            raise RequestError(message) if failed.refusal else RuntimeError(message)
        return result

    def _collective(self, function, *args, **kwargs) -> None:
        """``function`` on the channel's group; a failure (the leader or a follower is gone) is
        :class:`ProcessesOutOfStep`."""
        try:
            function(*args, **kwargs)
        except RuntimeError as exc:
            raise ProcessesOutOfStep(f"the control channel between the processes failed: {exc}") from exc
