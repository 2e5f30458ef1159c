"""The V4 diffusion transformer: golden parity, checkpoint layout and loading, dtypes, checkpointing, input errors."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from safetensors.torch import load_file, save_file

from easyanimate.models.transformer import HunyuanTransformer3DModel, adapt_checkpoint_channels
from easyanimate.utils.weights import CheckpointError

VARIANTS = ["transformer_t2v", "transformer_inpaint"]
CASES = ["case_video_f3_8x8", "case_image_f1_8x12"]
V4_INFERENCE_KEYS = ("basic_block_type", "time_position_encoding", "after_norm")


def _golden_model(golden_dir, variant) -> HunyuanTransformer3DModel:
    folder = golden_dir / variant
    model = HunyuanTransformer3DModel.from_config(json.loads((folder / "config.json").read_text()))
    model.load_state_dict(load_file(str(folder / "weights.safetensors")), strict=True)
    return model.eval()


def _golden_case(golden_dir, variant, case):
    tensors = load_file(str(golden_dir / variant / f"{case}.safetensors"))
    inputs = {k[len("input."):]: v for k, v in tensors.items() if k.startswith("input.")}
    inputs["image_rotary_emb"] = (inputs.pop("image_rotary_emb_cos"), inputs.pop("image_rotary_emb_sin"))
    debug = {k[len("debug."):]: v for k, v in tensors.items() if k.startswith("debug.")}
    return inputs, tensors["output.sample"], debug


@pytest.fixture(scope="module", params=VARIANTS)
def golden_model(request, golden_dir):
    return request.param, _golden_model(golden_dir, request.param)


def _as_folder(golden_dir, variant, dest, drop_config_keys=()):
    """A released-style model folder (config.json + diffusion_pytorch_model.safetensors) from a golden model."""
    dest.mkdir(parents=True, exist_ok=True)
    config = json.loads((golden_dir / variant / "config.json").read_text())
    for key in drop_config_keys:
        config.pop(key)
    (dest / "config.json").write_text(json.dumps(config))
    shutil.copy(golden_dir / variant / "weights.safetensors", dest / "diffusion_pytorch_model.safetensors")
    return dest


# ------------------------------------------------------------------------------------------ golden parity


@pytest.mark.parametrize("case", CASES)
def test_golden_parity(golden_model, golden_dir, case):
    variant, model = golden_model
    inputs, expected, debug = _golden_case(golden_dir, variant, case)
    captured = {}
    hooks = [
        model.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: captured.__setitem__(name, o))
        for name in debug
    ]
    try:
        with torch.no_grad():
            out = model(**inputs).sample
    finally:
        for hook in hooks:
            hook.remove()
    assert out.shape == expected.shape
    err = (out - expected).abs().max().item()
    print(f"{variant}/{case}: max abs err {err:.2e}")
    assert err <= 1e-4
    # Intermediates (patch embed, temb, text/CLIP projections, every block) localise any regression.
    for name, ref in debug.items():
        torch.testing.assert_close(captured[name].reshape(ref.shape), ref, rtol=1e-4, atol=1e-4, msg=name)


def test_rope_computed_when_not_given_matches_golden(golden_model, golden_dir):
    variant, model = golden_model
    inputs, expected, _ = _golden_case(golden_dir, variant, "case_image_f1_8x12")
    inputs["image_rotary_emb"] = None
    with torch.no_grad():
        out = model(**inputs).sample
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_frame_index_table_matches_checkpoint(golden_dir):
    """The fixed ``t_embed.pe`` tables built at init equal the ones the original saved, to float32 rounding."""
    config = json.loads((golden_dir / "transformer_t2v" / "config.json").read_text())
    fresh = HunyuanTransformer3DModel.from_config(config).state_dict()
    saved = load_file(str(golden_dir / "transformer_t2v" / "weights.safetensors"))
    for key in [k for k in saved if k.endswith("t_embed.pe")]:
        # The sinusoid's largest argument is frame * frequency = (rows - 1) * 1. CPU vector libraries round exp (the
        # frequencies) and sin/cos of large arguments differently, which moves an argument by up to about
        # |argument| * eps; sin and cos have slope at most 1, so the tables may differ by that much (~1.5e-5 is
        # seen on Intel against tables written on AMD). A wrong formula differs by O(1).
        largest_argument = saved[key].shape[1] - 1
        atol = largest_argument * torch.finfo(torch.float32).eps
        torch.testing.assert_close(fresh[key], saved[key], rtol=0, atol=atol)


def test_sample_independent_of_batch_partner(golden_model, golden_dir):
    """Each sample is computed independently (no leakage through batch-wide ops)."""
    variant, model = golden_model
    inputs, expected, _ = _golden_case(golden_dir, variant, "case_video_f3_8x8")
    single = {k: (v[1:] if torch.is_tensor(v) and v.shape[:1] == (2,) else v) for k, v in inputs.items()}
    with torch.no_grad():
        out = model(**single).sample
    torch.testing.assert_close(out, expected[1:], rtol=1e-4, atol=1e-4)


def test_attention_goes_through_sdpa(golden_model, golden_dir, monkeypatch):
    variant, model = golden_model
    inputs, _, _ = _golden_case(golden_dir, variant, "case_video_f3_8x8")
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting_sdpa(q, k, v, *args, **kwargs):
        calls.append(q.shape[-2] * k.shape[-2])
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting_sdpa)
    with torch.no_grad():
        model(**inputs)
    per_block = 3 if model.is_inpaint else 2  # self, text, (CLIP)
    poolers = 2 if model.is_inpaint else 1  # the T5 attention pool, (the CLIP Resampler)
    assert len(calls) == per_block * len(model.blocks) + poolers
    assert max(calls) == 48 * 48  # the 3-frame self-attention: all 3 x 16 tokens attend to each other


# ------------------------------------------------------------------------------------------ checkpoint layout


def test_released_key_manifest_on_meta_device(keys_dir):
    """At the released config (class defaults) the state dict has exactly the released keys and shapes."""
    manifest = json.loads((keys_dir / "transformer_v4_inp.json").read_text())
    with torch.device("meta"):
        model = HunyuanTransformer3DModel()
    state = model.state_dict()
    assert set(state) == set(manifest)
    wrong = {k: (list(state[k].shape), v) for k, v in manifest.items() if list(state[k].shape) != v}
    assert not wrong
    assert sum(p.numel() for p in model.parameters()) == 1_954_058_272
    assert model.is_inpaint and model.config.in_channels == 12 and model.out_channels == 8
    assert model.blocks[0].gate_clip.norm.eps == 1408.0  # trained-with quirk, kept
    assert not model.clip_projection.pos_embed.requires_grad


def test_t2v_variant_has_no_clip_branch(golden_dir):
    model = _golden_model(golden_dir, "transformer_t2v")
    assert not model.is_inpaint and model.out_channels == 8
    assert not any("clip" in k for k in model.state_dict())


def test_from_pretrained_strict_and_v4_defaults(golden_dir, tmp_path):
    """A config without the V4 inference keys gives the V4 model; the load is strict and exact."""
    folder = _as_folder(golden_dir, "transformer_inpaint", tmp_path / "model" / "transformer", V4_INFERENCE_KEYS)
    model = HunyuanTransformer3DModel.from_pretrained(tmp_path / "model", subfolder="transformer")
    assert (model.config.basic_block_type, model.config.time_position_encoding, model.config.after_norm) == (
        "basic", True, False,
    )
    assert not model.training
    inputs, expected, _ = _golden_case(golden_dir, "transformer_inpaint", "case_video_f3_8x8")
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).sample, expected, rtol=1e-4, atol=1e-4)

    model.save_pretrained(tmp_path / "saved")
    again = HunyuanTransformer3DModel.from_pretrained(tmp_path / "saved")
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    assert folder.is_dir()


@pytest.mark.parametrize("damage", ["missing", "unexpected", "wrong_shape"])
def test_from_pretrained_rejects_mismatched_checkpoints(golden_dir, tmp_path, damage):
    folder = _as_folder(golden_dir, "transformer_inpaint", tmp_path / "transformer")
    state = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    if damage == "missing":
        del state["blocks.3.attn_clip.to_k.weight"]
        expected = "missing keys: blocks.3.attn_clip.to_k.weight"
    elif damage == "unexpected":
        state["blocks.3.attn_temporal.weight"] = torch.zeros(2)
        expected = "unexpected keys: blocks.3.attn_temporal.weight"
    else:
        state["proj_out.weight"] = torch.zeros(16, 64)
        expected = "wrong shape: proj_out.weight"
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError, match=expected):
        HunyuanTransformer3DModel.from_pretrained(folder)


def test_adapt_channels_t2v_checkpoint_into_inpaint_model(golden_dir, tmp_path):
    """A 4-channel checkpoint loads into the 12-channel InP model only with adapt_channels=True."""
    folder = _as_folder(golden_dir, "transformer_t2v", tmp_path / "transformer")
    overrides = {"in_channels": 12, "out_channels": 8}
    with pytest.raises(CheckpointError, match="missing keys"):
        HunyuanTransformer3DModel.from_pretrained(folder, **overrides)

    model = HunyuanTransformer3DModel.from_pretrained(folder, adapt_channels=True, **overrides)
    ckpt = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    state = model.state_dict()
    assert torch.equal(state["pos_embed.proj.weight"][:, :4], ckpt["pos_embed.proj.weight"])
    assert torch.count_nonzero(state["pos_embed.proj.weight"][:, 4:]) == 0
    for key, value in ckpt.items():
        if key != "pos_embed.proj.weight":
            assert torch.equal(state[key], value), key

    report = model.channel_adaptation
    assert report.zero_filled == ["pos_embed.proj.weight input channels 4..11"]
    assert not report.left_random and not report.truncated
    clip_keys = sorted(k for k in state if k not in ckpt)
    assert report.left_at_init == clip_keys
    assert all("clip" in k for k in clip_keys) and len(clip_keys) == 1 + 10 + 20 * len(model.blocks)
    assert "zero-filled" in report.summary()

    # With zero inpaint channels the patch embedding equals the 4-channel model's.
    t2v = _golden_model(golden_dir, "transformer_t2v")
    latents = torch.randn(3, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(
            model.pos_embed(torch.cat([latents, torch.randn(3, 8, 8, 8) * 0], 1)), t2v.pos_embed(latents)
        )


def test_adapt_channels_output_rows_per_patch_position(golden_dir):
    """proj_out growth keeps each patch position's channels in place; the new channels stay random."""
    config = json.loads((golden_dir / "transformer_t2v" / "config.json").read_text())
    ckpt = load_file(str(golden_dir / "transformer_t2v" / "weights.safetensors"))
    wide = HunyuanTransformer3DModel.from_config({**config, "out_channels": 16})  # 4 in, 16 out: CLIP branch on
    random_init = wide.state_dict()["proj_out.weight"].clone()
    state, report = adapt_checkpoint_channels(wide, ckpt)
    grown = state["proj_out.weight"].reshape(4, 16, -1)
    torch.testing.assert_close(grown[:, :8], ckpt["proj_out.weight"].reshape(4, 8, -1), rtol=0, atol=0)
    torch.testing.assert_close(grown[:, 8:], random_init.reshape(4, 16, -1)[:, 8:], rtol=0, atol=0)
    assert state["proj_out.bias"].reshape(4, 16)[:, :8].equal(ckpt["proj_out.bias"].reshape(4, 8))
    assert report.left_random == [
        "proj_out.weight output channels 8..15 (at every patch position)",
        "proj_out.bias output channels 8..15 (at every patch position)",
    ]

    narrow = HunyuanTransformer3DModel.from_config({**config, "out_channels": 4, "learn_sigma": False})
    state, report = adapt_checkpoint_channels(narrow, ckpt)
    assert state["proj_out.weight"].reshape(4, 4, -1).equal(ckpt["proj_out.weight"].reshape(4, 8, -1)[:, :4])
    assert report.truncated == ["proj_out.weight output channels 4..7", "proj_out.bias output channels 4..7"]


def test_adapt_channels_still_rejects_unrelated_mismatches(golden_dir, tmp_path):
    """Only channel counts and the CLIP branch are adapted: a truncated checkpoint is still an error."""
    folder = _as_folder(golden_dir, "transformer_t2v", tmp_path / "transformer")
    state = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    del state["blocks.2.ff.net.2.weight"]
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError, match="blocks.2.ff.net.2.weight"):
        HunyuanTransformer3DModel.from_pretrained(folder, adapt_channels=True, in_channels=12, out_channels=8)


# ------------------------------------------------------------------------------------------ dtypes, training


def test_bf16_forward_close_to_fp32_and_rounds_timestep(golden_dir):
    model = _golden_model(golden_dir, "transformer_inpaint")
    inputs, _, _ = _golden_case(golden_dir, "transformer_inpaint", "case_video_f3_8x8")
    assert inputs["timestep"].tolist() == [999.0, 237.0]
    # The reference for bf16 is fp32 at the bf16-rounded timestep (999 -> 1000), as the V4 pipeline does.
    rounded = {**inputs, "timestep": inputs["timestep"].bfloat16().float()}
    with torch.no_grad():
        reference = model(**rounded).sample
        model_bf16 = model.to(torch.bfloat16)
        to_bf16 = {k: (v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in inputs.items()}
        out = model_bf16(**to_bf16).sample
        out_t1000 = model_bf16(**{**to_bf16, "timestep": torch.tensor([1000.0, 237.0])}).sample
        out_fp32_inputs = model_bf16(**inputs).sample  # inputs are cast to the model dtype
    assert out.dtype == torch.bfloat16
    rel_rms = ((out.float() - reference).pow(2).mean() / reference.pow(2).mean()).sqrt().item()
    assert rel_rms < 0.03, rel_rms  # observed ~0.009
    assert torch.equal(out, out_t1000)  # the fp32 timestep is cast to bf16 before the sinusoid
    assert torch.equal(out, out_fp32_inputs)
    # fp32 islands: FP32 LayerNorms run in fp32 even though their weights are bf16
    block = model_bf16.blocks[4]
    x = (torch.randn(1, 5, block.norm2.normalized_shape[0]) * 3 + 1).bfloat16()
    expected = F.layer_norm(
        x.float(), block.norm2.normalized_shape, block.norm2.weight.float(), block.norm2.bias.float(), block.norm2.eps
    )
    assert torch.equal(block.norm2(x), expected.bfloat16())


def test_gradient_checkpointing_gives_the_same_gradients(golden_dir):
    inputs, _, _ = _golden_case(golden_dir, "transformer_inpaint", "case_video_f3_8x8")
    target = torch.randn(2, 8, 3, 8, 8, generator=torch.Generator().manual_seed(0))

    def grads(checkpointing):
        model = _golden_model(golden_dir, "transformer_inpaint").train()
        checkpointed = []
        if checkpointing:

            def checkpoint(block, *args):
                checkpointed.append(block)
                return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False)

            model.enable_gradient_checkpointing(checkpoint)
        loss = F.mse_loss(model(**inputs).sample, target)
        assert len(checkpointed) == (len(model.blocks) if checkpointing else 0)
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    loss_plain, plain = grads(False)
    loss_ckpt, ckpt = grads(True)
    torch.testing.assert_close(loss_ckpt, loss_plain, rtol=0, atol=0)
    assert plain.keys() == ckpt.keys()
    missing = [n for n, g in plain.items() if g is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------------------ clear errors


@pytest.fixture(scope="module")
def inpaint_inputs(golden_dir):
    return _golden_model(golden_dir, "transformer_inpaint"), _golden_case(golden_dir, "transformer_inpaint",
                                                                         "case_video_f3_8x8")[0]


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda i: {"hidden_states": i["hidden_states"][..., :7], "inpaint_latents": i["inpaint_latents"][..., :7]},
         "multiples of patch_size 2"),
        (lambda i: {"hidden_states": i["hidden_states"][:, :, 0]}, "5D latent video"),
        (lambda i: {"encoder_hidden_states": i["encoder_hidden_states"][:, :5]}, r"\(B=2, 6, 32\)"),
        (lambda i: {"encoder_hidden_states_t5": torch.zeros(2, 12, 48)}, "pad/truncate the tokenizer output to 10"),
        (lambda i: {"text_embedding_mask_t5": torch.ones(2, 12)}, "attention mask of encoder_hidden_states_t5"),
        (lambda i: {"inpaint_latents": None}, "pass inpaint_latents"),
        (lambda i: {"inpaint_latents": i["inpaint_latents"][:, :4]}, "12 input channels, got 4 latent channels \\+ 4"),
        (lambda i: {"clip_encoder_hidden_states": None}, "needs clip_encoder_hidden_states"),
        (lambda i: {"clip_attention_mask": None}, "needs clip_encoder_hidden_states"),
        (lambda i: {"clip_encoder_hidden_states": torch.zeros(2, 63, 32)}, "square number"),
        (lambda i: {"clip_attention_mask": torch.ones(2, 8)}, r"clip_attention_mask must have shape \(2, 16\)"),
        (lambda i: {"image_meta_size": torch.zeros(2, 4)}, "image_meta_size must have shape"),
        (lambda i: {"timestep": torch.tensor([1.0, 2.0, 3.0])}, "one value per sample"),
        (lambda i: {"image_rotary_emb": (torch.zeros(20, 16), torch.zeros(20, 16))}, "rope_for_size"),
    ],
)
def test_bad_inputs_raise_clear_errors(inpaint_inputs, change, message):
    model, inputs = inpaint_inputs
    with pytest.raises(ValueError, match=message):
        model(**{**inputs, **change(inputs)})


def test_t2v_model_rejects_inpaint_latents(golden_dir):
    model = _golden_model(golden_dir, "transformer_t2v")
    inputs, _, _ = _golden_case(golden_dir, "transformer_t2v", "case_video_f3_8x8")
    with pytest.raises(ValueError, match="takes no inpaint_latents"):
        model(**inputs, inpaint_latents=torch.zeros(2, 8, 3, 8, 8))


@pytest.mark.parametrize(
    "config,message",
    [
        ({"basic_block_type": "motionmodule"}, "V3 motion-module"),
        ({"basic_block_type": "hybrid_attention"}, "not supported"),
        ({"time_position_encoding": False}, "not V4 values"),
        ({"after_norm": True}, "not V4 values"),
        ({"num_layers": 5}, "num_layers must be even"),
        ({"hidden_size": 60}, "must equal num_attention_heads x attention_head_dim"),
        ({"n_query": 15}, "square number"),
    ],
)
def test_unsupported_configs_raise(golden_dir, config, message):
    base = json.loads((golden_dir / "transformer_inpaint" / "config.json").read_text())
    with pytest.raises(ValueError, match=message):
        HunyuanTransformer3DModel.from_config({**base, **config})
