"""LoRA: the original's file format, greedy name resolution, merge formula, exact unmerge, training adapters that
compute what a merged file computes, PEFT files, and clear errors that leave the model untouched."""

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from easyanimate.lora import LoRANetwork, merge_lora, unmerge_lora
from easyanimate.utils.weights import CheckpointError


class ToyAttention(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.to_q = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])


class ToyBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.attn1 = ToyAttention(dim)
        self.attn_clip = ToyAttention(dim)
        self.skip_linear = nn.Linear(2 * dim, dim)


class ToyTransformer(nn.Module):
    """Names like the V4 transformer's, with underscores inside attribute names, a 1x1 and a 2x2 conv and an
    nn.MultiheadAttention (whose out_proj must not be adapted)."""

    def __init__(self, dim=8):
        super().__init__()
        self.patch = nn.Conv2d(4, dim, 2, stride=2)
        self.mix_1x1 = nn.Conv2d(dim, dim, 1)
        self.blocks = nn.ModuleList([ToyBlock(dim) for _ in range(2)])
        self.clip_projection = nn.MultiheadAttention(dim, 2)
        self.proj_out = nn.Linear(dim, 4)

    def forward(self, x):
        h = self.mix_1x1(self.patch(x)).flatten(2).transpose(1, 2)  # (B, N, dim)
        for block in self.blocks:
            q = block.attn1.to_out[0](block.attn1.to_q(h))
            c = block.attn_clip.to_out[0](block.attn_clip.to_q(h))
            h = block.skip_linear(torch.cat([q, c], -1))
        return self.proj_out(h)


def toy_pipe(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return SimpleNamespace(transformer=ToyTransformer().to(dtype), text_encoder=None)


def snapshot(*modules):
    return [{k: v.clone() for k, v in m.state_dict().items()} for m in modules]


def assert_bitwise_equal(before, modules):
    for state, module in zip(before, modules):
        now = module.state_dict()
        assert state.keys() == now.keys()
        for key in state:
            assert torch.equal(state[key], now[key]), key


def kohya_layer(name, out_f, in_f, rank, alpha=None, conv=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    down, up = torch.randn(rank, in_f, generator=g), torch.randn(out_f, rank, generator=g)
    if conv:
        down, up = down[..., None, None], up[..., None, None]
    layer = {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}
    if alpha is not None:
        layer[f"{name}.alpha"] = torch.tensor(float(alpha))
    return layer


def test_merge_formula_greedy_names_and_1x1_conv(tmp_path):
    pipe = toy_pipe()
    state = {}
    state.update(kohya_layer("lora_unet__blocks_1_attn_clip_to_out_0", 8, 8, 2, alpha=1, seed=1))
    state.update(kohya_layer("lora_unet__blocks_0_skip_linear", 8, 16, 4, seed=2))  # no alpha: alpha = rank
    state.update(kohya_layer("lora_unet__mix_1x1", 8, 8, 2, alpha=4, conv=True, seed=3))
    path = tmp_path / "lora.safetensors"
    save_file(state, str(path))
    t = pipe.transformer
    w_clip, w_skip, w_conv = (t.blocks[1].attn_clip.to_out[0].weight.clone(), t.blocks[0].skip_linear.weight.clone(),
                              t.mix_1x1.weight.clone())
    untouched = t.blocks[1].attn1.to_out[0].weight.clone()

    assert merge_lora(pipe, path, 0.6) == 3
    up, down = state["lora_unet__blocks_1_attn_clip_to_out_0.lora_up.weight"], state[
        "lora_unet__blocks_1_attn_clip_to_out_0.lora_down.weight"]
    torch.testing.assert_close(t.blocks[1].attn_clip.to_out[0].weight, w_clip + 0.6 * (1 / 2) * up @ down)
    up, down = state["lora_unet__blocks_0_skip_linear.lora_up.weight"], state["lora_unet__blocks_0_skip_linear.lora_down.weight"]
    torch.testing.assert_close(t.blocks[0].skip_linear.weight, w_skip + 0.6 * up @ down)
    up, down = state["lora_unet__mix_1x1.lora_up.weight"], state["lora_unet__mix_1x1.lora_down.weight"]
    torch.testing.assert_close(t.mix_1x1.weight, w_conv + 0.6 * 2 * (up.flatten(1) @ down.flatten(1))[..., None, None])
    assert torch.equal(t.blocks[1].attn1.to_out[0].weight, untouched)

    unmerge_lora(pipe, path, 0.6)
    assert torch.equal(t.blocks[1].attn_clip.to_out[0].weight, w_clip)
    assert torch.equal(t.mix_1x1.weight, w_conv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stacked_merges_unmerge_bit_exactly(tmp_path, dtype):
    pipe = toy_pipe(dtype)
    before = snapshot(pipe.transformer)
    paths = []
    for i in range(2):
        state = {}
        for block in range(2):
            state.update(kohya_layer(f"lora_unet__blocks_{block}_attn1_to_q", 8, 8, 4, alpha=2, seed=10 * i + block))
        paths.append(tmp_path / f"lora{i}.safetensors")
        save_file(state, str(paths[-1]))
    merge_lora(pipe, paths[0], 0.55)
    merge_lora(pipe, paths[1], 1.3)
    assert not torch.equal(pipe.transformer.blocks[0].attn1.to_q.weight, before[0]["blocks.0.attn1.to_q.weight"])
    unmerge_lora(pipe, paths[1], 1.3)
    unmerge_lora(pipe, paths[0], 0.55)
    assert_bitwise_equal(before, [pipe.transformer])


def test_bad_files_raise_clearly_and_change_nothing(tmp_path):
    pipe = toy_pipe()
    before = snapshot(pipe.transformer)

    def write(state):
        path = tmp_path / "bad.safetensors"
        save_file(state, str(path))
        return path

    good = kohya_layer("lora_unet__blocks_0_attn1_to_q", 8, 8, 2)
    with pytest.raises(CheckpointError, match="blocks_0_attn9_to_q: no such layer"):
        merge_lora(pipe, write({**good, **kohya_layer("lora_unet__blocks_0_attn9_to_q", 8, 8, 2)}), 1.0)
    with pytest.raises(CheckpointError, match="LoRA gives 8x16, the weight is 8x8"):
        merge_lora(pipe, write({**good, **kohya_layer("lora_unet__blocks_1_attn1_to_q", 8, 16, 2)}), 1.0)
    with pytest.raises(CheckpointError, match="the pipeline has no text_encoder"):
        merge_lora(pipe, write({**good, **kohya_layer("lora_te_encoder_layer_0_attention_self_query", 8, 8, 2)}), 1.0)
    with pytest.raises(CheckpointError, match="unrecognised key"):
        merge_lora(pipe, write({**good, "something.else": torch.zeros(1)}), 1.0)
    with pytest.raises(CheckpointError, match="not found"):
        merge_lora(pipe, tmp_path / "missing.safetensors", 1.0)
    assert_bitwise_equal(before, [pipe.transformer])


def test_peft_format_with_adapter_config(tmp_path):
    pipe = toy_pipe()
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g)
    folder = tmp_path / "peft"
    folder.mkdir()
    save_file({"transformer.blocks.0.attn_clip.to_q.lora_A.weight": a,
               "transformer.blocks.0.attn_clip.to_q.lora_B.weight": b}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 8}))
    weight = pipe.transformer.blocks[0].attn_clip.to_q.weight
    original = weight.clone()
    merge_lora(pipe, folder / "adapter_model.safetensors", 0.5)
    torch.testing.assert_close(weight, original + 0.5 * (8 / 2) * b @ a)
    unmerge_lora(pipe, folder / "adapter_model.safetensors", 0.5)
    assert torch.equal(weight, original)


def test_network_targets_and_hooks_match_merge_on_toy(tmp_path):
    pipe = toy_pipe()
    network = LoRANetwork(pipe.transformer, rank=2, alpha=1)
    names = {n for n, _ in network.named_children()}
    assert "lora_unet__blocks_0_attn_clip_to_out_0" in names and "lora_unet__mix_1x1" in names
    assert "lora_unet__patch" not in names  # 2x2 conv
    assert not any("clip_projection" in n for n in names)  # nn.MultiheadAttention
    assert set(network.state_dict()) == {f"{n}.{p}" for n in names for p in ("lora_down.weight", "lora_up.weight", "alpha")}
    x = torch.randn(2, 4, 8, 8)
    base = pipe.transformer(x)
    network.apply_to()
    torch.testing.assert_close(pipe.transformer(x), base, rtol=0, atol=0)  # up starts at zero
    with torch.no_grad():
        for adapter in network.children():
            adapter.lora_up.weight.normal_(0, 0.3)
    hooked = pipe.transformer(x)
    assert (hooked - base).abs().max() > 1e-2
    path = network.save(tmp_path / "trained.safetensors")
    network.remove()
    assert torch.equal(pipe.transformer(x), base)
    merge_lora(pipe, path, 1.0)
    torch.testing.assert_close(pipe.transformer(x), hooked, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_pipe(tiny_model_dir):
    from easyanimate.pipeline import EasyAnimatePipeline

    return EasyAnimatePipeline.from_pretrained(tiny_model_dir, torch_dtype=torch.float32, device="cpu")


def run_tiny(pipe):
    return pipe("a red circle moving to the left", negative_prompt="low quality", height=32, width=32,
                video_length=1, num_inference_steps=2, guidance_scale=6.0, output_type="latent",
                generator=torch.Generator().manual_seed(0)).videos


def test_trained_network_and_merged_file_agree_on_the_tiny_pipeline(tiny_pipe, tmp_path):
    pipe = tiny_pipe
    modules = [pipe.transformer, pipe.text_encoder, pipe.text_encoder_2]
    before = snapshot(*modules)
    base = run_tiny(pipe)

    network = LoRANetwork(pipe.transformer, rank=4, alpha=2, text_encoder=pipe.text_encoder,
                          text_encoder_2=pipe.text_encoder_2)
    names = [n for n, _ in network.named_children()]
    assert "lora_unet__blocks_0_attn1_to_q" in names and "lora_unet__proj_out" in names
    assert "lora_te_encoder_layer_0_attention_self_query" in names
    assert "lora_te2_encoder_block_0_layer_0_SelfAttention_q" in names
    assert not any("pooler" in n or "clip_projection_attn" in n for n in names)
    groups = network.param_groups(1e-4)
    assert [g["lr"] for g in groups] == [1e-4, 5e-5]
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in network.parameters())

    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for adapter in network.children():
            adapter.lora_up.weight.copy_(torch.randn(adapter.lora_up.weight.shape, generator=g) * 0.2)
    network.apply_to()
    hooked = run_tiny(pipe)
    path = network.save(tmp_path / "lora.safetensors")
    network.remove()
    assert (hooked - base).abs().max() > 1e-2

    pipe.load_lora(path, 1.0)
    merged = run_tiny(pipe)
    scale = hooked.abs().max()
    assert (merged - hooked).abs().max() <= 1e-4 * scale
    pipe.unload_lora()
    assert_bitwise_equal(before, modules)
    assert torch.equal(run_tiny(pipe), base)


def test_saved_lora_carries_the_additional_networks_hashes(tmp_path):
    """The original writes sd-webui-additional-networks' hashes into every LoRA file it saves; recompute them from
    the saved file: the model hash covers the bytes after the header, the legacy hash the 64 KiB at 1 MiB of the
    file as saved with only ``ss_*`` metadata (here none: a file over 1 MiB, so the window is real data)."""
    import hashlib

    from safetensors import safe_open

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(512, 512) for _ in range(3)])
    network = LoRANetwork(model, rank=128, alpha=64.0)
    with torch.no_grad():
        for adapter in network.children():
            adapter.lora_up.weight.normal_()
    path = network.save(tmp_path / "hashed.safetensors", metadata={"ss_note": "demo", "other": "x"})
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}
    assert meta["ss_note"] == "demo" and meta["other"] == "x"
    blob = path.read_bytes()
    header = int.from_bytes(blob[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(blob[8 + header:]).hexdigest()
    save_file(state, str(tmp_path / "ss_only.safetensors"), metadata={"ss_note": "demo"})
    window = (tmp_path / "ss_only.safetensors").read_bytes()[0x100000:0x110000]
    assert len(window) == 0x10000
    assert meta["sshs_legacy_hash"] == hashlib.sha256(window).hexdigest()[:8]
    # Non-ss metadata does not move the hashes; ss metadata moves the legacy one only (it shifts the window).
    plain = safe_open(str(network.save(tmp_path / "plain.safetensors")), "pt").metadata()
    assert plain["sshs_model_hash"] == meta["sshs_model_hash"]
    assert plain["sshs_legacy_hash"] != meta["sshs_legacy_hash"]
