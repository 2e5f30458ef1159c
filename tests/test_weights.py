"""Strict, safe weight loading: corrupt files and mismatched keys are errors that say what is wrong."""

import pytest
import torch
from safetensors.torch import save_file

from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from easyanimate.utils.weights import CheckpointError, load_model_from_folder, load_state_dict_strict, read_weights_file


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


class TinyModel(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, width: int = 4):
        super().__init__()
        self.proj = torch.nn.Linear(width, width)
        self.register_buffer("table", torch.arange(float(width)), persistent=False)


def test_folder_load_casts_half_precision_files_and_builds_no_random_init(tmp_path, monkeypatch):
    model = TinyModel(width=4)
    model.save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({k: v.half() for k, v in model.state_dict().items()}, str(weights))  # fp16 on disk

    loaded = load_model_from_folder(TinyModel, tmp_path)
    assert loaded.proj.weight.dtype == torch.float32 and loaded.table.dtype == torch.float32
    assert torch.equal(loaded.proj.weight, model.proj.weight.half().float())
    assert torch.equal(loaded.table, torch.arange(4.0))  # non-persistent buffers are built for real

    as_bf16 = load_model_from_folder(TinyModel, tmp_path, torch_dtype=torch.bfloat16)
    assert as_bf16.proj.weight.dtype == torch.bfloat16 and as_bf16.table.dtype == torch.bfloat16

    save_file({"proj.weight": model.proj.weight}, str(weights))
    with pytest.raises(CheckpointError, match="proj.bias"):
        load_model_from_folder(TinyModel, tmp_path)
