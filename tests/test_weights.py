"""Strict, safe weight loading: corrupt files and mismatched keys are errors that say what is wrong."""

import pytest
import torch
from safetensors.torch import save_file

from easyanimate.utils.weights import CheckpointError, load_state_dict_strict, read_weights_file


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(3, 4)
        self.b = torch.nn.Linear(4, 2)


def test_missing_unexpected_and_shape_errors_list_the_keys():
    model = Tiny()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    del state["b.bias"]
    state["c.weight"] = torch.zeros(1)
    state["a.weight"] = torch.zeros(5, 3)
    with pytest.raises(CheckpointError) as err:
        load_state_dict_strict(model, state, source="ckpt")
    msg = str(err.value)
    assert "b.bias" in msg and "c.weight" in msg and "a.weight" in msg and "(5, 3)" in msg


def test_ignored_prefixes_are_dropped_and_values_loaded():
    model, other = Tiny(), Tiny()
    state = dict(other.state_dict())
    state["loss.discriminator.weight"] = torch.ones(2)
    load_state_dict_strict(model, state, ignore_prefixes=("loss.",))
    assert torch.equal(model.a.weight, other.a.weight)


def test_corrupt_and_missing_files_are_clear_errors(tmp_path):
    good = tmp_path / "w.safetensors"
    save_file({"x": torch.arange(1000.0)}, str(good))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(good.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        read_weights_file(bad)
    with pytest.raises(CheckpointError, match="not found"):
        read_weights_file(tmp_path / "nope.safetensors")
    assert torch.equal(read_weights_file(good)["x"], torch.arange(1000.0))


def test_bin_files_never_unpickle_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.bin"
    torch.save({"x": Evil()}, str(path))
    with pytest.raises(CheckpointError, match="refusing to load"):
        read_weights_file(path)
