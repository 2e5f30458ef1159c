"""The control channel of a long-lived sequence-parallel launch (easyanimate/inference/distributed.py:
ControlChannel), measured with 2 gloo processes and no model (tests/control_channel_cases.py). The launch has a
timeout: a hung collective fails the test instead of hanging it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COLLECTIVE_TIMEOUT_S = 2  # short, so idling past it takes seconds


def launch_env(**extra: str) -> dict[str, str]:
    """A CPU-only, one-thread-per-process, fp32 environment for the launched processes."""
    return {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
            "EASYANIMATE_CPU_DTYPE": "float32", **extra}


def torchrun_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]


def test_control_channel_outlasts_the_collective_timeout_and_shares_every_failure(tmp_path):
    """With a 2 s collective timeout: a follower waiting 4 s on the control channel still gets its message, while
    the same wait on the default group fails after 2 s (why the channel has a group of its own) with an error
    recognised as a communication error; a failure on one process is raised on both (a refusal as a refusal), a
    communication error as ProcessesOutOfStep; a cancel flag set on one is seen by both; and a vanished rank 0
    ends the follower's wait at once instead of after the channel's year-long timeout."""
    try:
        result = subprocess.run(torchrun_command("tests/control_channel_cases.py", str(tmp_path)), cwd=REPO,
                                env=launch_env(EASYANIMATE_DIST_TIMEOUT_S=str(COLLECTIVE_TIMEOUT_S)),
                                capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the control-channel launch did not finish in 120 s:\n{exc.stderr}")
    assert result.returncode == 0, result.stderr[-6000:]
    leader, follower = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))

    assert follower["idle"] == {"message": "the next job", "waited_s": pytest.approx(2 * COLLECTIVE_TIMEOUT_S, abs=1)}
    default = follower["default_group"]
    assert "Timed out" in default["error"] and default["communication"] is True
    assert default["waited_s"] == pytest.approx(COLLECTIVE_TIMEOUT_S, abs=1)

    assert leader["together"]["all_succeed"] == {"result": 0} and follower["together"]["all_succeed"] == {"result": 1}
    assert leader["together"]["one_fails"] == {"raised": "RuntimeError",
                                               "message": "process 1 of 2 failed: ValueError: boom"}
    assert follower["together"]["one_fails"] == {"raised": "ValueError", "message": "boom"}
    assert leader["together"]["one_refuses"]["raised"] == "RequestError"
    assert "out of memory: try a smaller size" in leader["together"]["one_refuses"]["message"]
    for seen in (leader, follower):
        out_of_step = seen["together"]["one_times_out"]
        assert out_of_step["raised"] == "ProcessesOutOfStep" and "process 1: RuntimeError" in out_of_step["message"]
        assert seen["any"] == [True, False]
    assert follower["leader_gone"]["raised"] == "ProcessesOutOfStep"
    assert follower["leader_gone"]["waited_s"] < 10
