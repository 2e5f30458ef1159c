"""Atomic checkpoints: complete-or-invisible, retention, resume resolution, exact state restore."""

import json

import pytest
import torch
from accelerate import Accelerator

from easyanimate.training.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)


def _setup(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    acc = Accelerator(cpu=True)
    model, opt = acc.prepare(model, opt)
    return acc, model, opt


def _step(model, opt):
    loss = model(torch.ones(2, 4)).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


def test_save_retention_and_latest(tmp_path):
    acc, model, opt = _setup()
    for step in (1, 2, 3):
        _step(model, opt)
        path = save_checkpoint(acc, tmp_path, step, extra={"sampler_position": step * 10}, keep_last=2)
        assert path.name == f"checkpoint-{step}"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    assert latest_checkpoint(tmp_path).name == "checkpoint-3"
    assert json.loads((tmp_path / "checkpoint-3" / "trainer_state.json").read_text())["sampler_position"] == 30


def test_interrupted_save_is_invisible_and_cleaned(tmp_path):
    acc, model, opt = _setup()
    save_checkpoint(acc, tmp_path, 1)
    # a crash mid-save leaves a .partial folder and a folder without the state file: neither counts
    (tmp_path / "checkpoint-7.partial").mkdir()
    (tmp_path / "checkpoint-9").mkdir()
    assert latest_checkpoint(tmp_path).name == "checkpoint-1"
    assert resolve_resume(tmp_path, "latest").name == "checkpoint-1"
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        resolve_resume(tmp_path, tmp_path / "checkpoint-9")
    save_checkpoint(acc, tmp_path, 2)
    assert not (tmp_path / "checkpoint-7.partial").exists()


def test_resume_resolution_edge_cases(tmp_path):
    assert resolve_resume(tmp_path, None) is None
    assert resolve_resume(tmp_path, "latest") is None  # first run with the same command line
    with pytest.raises(FileNotFoundError):
        resolve_resume(tmp_path, tmp_path / "missing")


def test_resume_continues_exactly(tmp_path):
    acc, model, opt = _setup()
    _step(model, opt)
    save_checkpoint(acc, tmp_path, 1, extra={"epoch": 0})
    uninterrupted = [_step(model, opt) for _ in range(3)]

    acc2, model2, opt2 = _setup(seed=123)  # different init: everything must come from the checkpoint
    state = load_checkpoint(acc2, latest_checkpoint(tmp_path))
    assert state == {"step": 1, "epoch": 0}
    resumed = [_step(model2, opt2) for _ in range(3)]
    assert resumed == uninterrupted


def test_resume_refuses_pickles_that_carry_code(tmp_path):
    acc, model, opt = _setup()
    path = save_checkpoint(acc, tmp_path, 1)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, str(path / "custom_checkpoint_0.pkl"))
    acc2, _, _ = _setup()
    with pytest.raises(ValueError, match="custom_checkpoint_0.pkl"):
        load_checkpoint(acc2, path)
