"""The control channel of a sequence-parallel server (easyanimate/inference/distributed.py: ControlChannel), run as
2 gloo processes by tests/test_parallel_server.py, without a model:

    EASYANIMATE_DIST_TIMEOUT_S=2 torchrun --nproc_per_node 2 tests/control_channel_cases.py OUT_DIR

Each process writes what it saw to ``OUT_DIR/rank<r>.json``:

* ``idle``: the follower waited on the channel longer than the collective timeout and still got the message;
* ``default_group``: the same wait on the default group (the per-generation collectives' timeout) failed, and the
  error is recognised as a communication error (the measurement behind the channel's own long timeout);
* ``together``: how :meth:`ControlChannel.run_together` reports a failure on one process to every process, and a
  communication error as :class:`ProcessesOutOfStep`; ``any``: a flag set on one process is seen by both;
* ``leader_gone``: rank 0 exits without a word; how long the follower's next wait on the channel lasts, and why it
  ends.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch.distributed as dist

from easyanimate.inference import RequestError
from easyanimate.inference.distributed import TIMEOUT_ENV, ControlChannel, ProcessesOutOfStep, is_communication_error


def idle_then_share(channel: ControlChannel, idle_s: float) -> dict:
    """The leader idles ``idle_s``, then shares a message; the follower has waited all along."""
    began = time.monotonic()
    if channel.is_leader:
        time.sleep(idle_s)
    message = channel.share("the next job" if channel.is_leader else None)
    return {"message": message, "waited_s": round(time.monotonic() - began, 1)}


def wait_on_default_group(channel: ControlChannel, idle_s: float) -> dict:
    """The follower waits on the default group for a broadcast the leader never sends (it idles ``idle_s``)."""
    if channel.is_leader:
        time.sleep(idle_s)
        return {}
    began = time.monotonic()
    try:
        dist.broadcast_object_list([None], src=0)
        return {"error": None}
    except RuntimeError as exc:
        return {"error": str(exc)[:300], "communication": is_communication_error(exc),
                "waited_s": round(time.monotonic() - began, 1)}


def together(channel: ControlChannel, failure: Exception | None, fail_on: int) -> dict:
    """``run_together`` of an action that raises ``failure`` on rank ``fail_on`` and returns the rank elsewhere."""
    def action():
        if failure is not None and channel.rank == fail_on:
            raise failure
        return channel.rank

    try:
        return {"result": channel.run_together(action)}
    except Exception as exc:
        return {"raised": type(exc).__name__, "message": str(exc)[:300]}


def main(out: str) -> None:
    channel = ControlChannel.connect(2, 1)
    timeout_s = float(os.environ[TIMEOUT_ENV])
    seen = {"idle": idle_then_share(channel, 2 * timeout_s)}
    seen["default_group"] = wait_on_default_group(channel, 1.5 * timeout_s)
    timed_out = RuntimeError(seen["default_group"].get("error") or "")  # the real gloo message, raised on rank 1
    seen["together"] = {
        "all_succeed": together(channel, None, 1),
        "one_fails": together(channel, ValueError("boom"), 1),
        "one_refuses": together(channel, RequestError("out of memory: try a smaller size"), 1),
        "one_times_out": together(channel, timed_out if channel.rank == 1 else None, 1),
    }
    seen["any"] = [channel.any(channel.rank == 0), channel.any(False)]
    if channel.is_leader:
        Path(out, "rank0.json").write_text(json.dumps(seen))
        os._exit(0)  # gone without a word (no stop message, no clean shutdown)
    began = time.monotonic()
    try:
        channel.share()
        seen["leader_gone"] = {"raised": None}
    except ProcessesOutOfStep as exc:
        seen["leader_gone"] = {"raised": "ProcessesOutOfStep", "message": str(exc)[:300]}
    seen["leader_gone"]["waited_s"] = round(time.monotonic() - began, 1)
    Path(out, "rank1.json").write_text(json.dumps(seen))
    os._exit(0)  # without tearing down the groups broken on purpose above


if __name__ == "__main__":
    main(sys.argv[1])
