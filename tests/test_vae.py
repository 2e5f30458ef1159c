"""The V4 video VAE: golden parity with the original, checkpoint exactness, frame rules, cache statelessness,
tiling, slicing, spatial_group_norm, upcast, validation and gradients."""

import json
import logging

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from easyanimate.models.vae import (
    AutoencoderKLMagvit,
    CausalCache,
    CausalConv3d,
    DiagonalGaussian,
    GroupNorm3D,
    Upsampler3D,
)
from easyanimate.utils.weights import CheckpointError, load_state_dict_strict

TINY = dict(ch=8, norm_num_groups=4)
VAE_CASES = [
    "v4_cache_f1_48x32",
    "v4_cache_f8_32x32",
    "v4_cache_f24_32x48",
    "v4_cache_f9_32x32_oddlen",
    "v4_cache_tiled_f8_64x48",
    "v3_slice_f9_32x32",
    "v3_slice_f17_32x32",
]


def tiny_vae(seed: int = 0, **config) -> AutoencoderKLMagvit:
    """A tiny VAE whose norms and biases are random too, so every parameter matters."""
    torch.manual_seed(seed)
    model = AutoencoderKLMagvit(**{**TINY, **config}).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def golden_vae(golden_dir):
    """Builds (once per config file) the golden VAE with the golden weights."""
    weights = load_file(golden_dir / "vae" / "weights.safetensors")
    models = {}

    def get(config_name: str) -> AutoencoderKLMagvit:
        if config_name not in models:
            config = json.loads((golden_dir / "vae" / config_name).read_text())
            model = AutoencoderKLMagvit.from_config(config)
            load_state_dict_strict(model, weights, source="golden vae")
            models[config_name] = model.eval()
        return models[config_name]

    return get


def config_of(model) -> dict:
    """The model's config as save_pretrained writes it (without diffusers' private bookkeeping)."""
    return {k: v for k, v in dict(model.config).items() if k != "_use_default_values"}


def load_case(golden_dir, name):
    path = golden_dir / "vae" / f"case_{name}.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["case"])
    return load_file(path), meta


# ---------------------------------------------------------------------------------------------------------------
# Numerical parity with the original
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", VAE_CASES)
def test_golden_case(golden_dir, golden_vae, name):
    case, meta = load_case(golden_dir, name)
    model = golden_vae(meta["config"])
    with torch.no_grad():
        posterior = model.encode(case["input.video"]).latent_dist
        decoded = model.decode(case["output.posterior_mean"]).sample
    expected = case["output.decoded_from_mean"]
    assert decoded.shape == expected.shape
    assert decoded.shape[2] == meta["frames_out"] == model.num_decoded_frames(posterior.mean.shape[2])
    assert posterior.mean.shape[2] == model.num_latent_frames(meta["frames_in"])
    assert (posterior.mean - case["output.posterior_mean"]).abs().max() <= 1e-4
    assert (posterior.logvar - case["output.posterior_logvar"]).abs().max() <= 1e-4
    assert (decoded - expected).abs().max() <= 1e-4


def test_tiling_switches_route_large_inputs_to_tiles(monkeypatch):
    """The numbers of the tiled path are pinned by the golden tiled case; here: which path each switch takes."""
    model = AutoencoderKLMagvit(**TINY, tile_sample_min_size=32)
    calls = []
    real_encode, real_decode = model._tiled_encode, model._tiled_decode
    monkeypatch.setattr(model, "_tiled_encode", lambda x: calls.append("encode") or real_encode(x))
    monkeypatch.setattr(model, "_tiled_decode", lambda z: calls.append("decode") or real_decode(z))
    big, small = torch.zeros(1, 3, 1, 40, 16), torch.zeros(1, 3, 1, 32, 32)

    def run(x):
        calls.clear()
        with torch.no_grad():
            model.decode(model.encode(x).latent_dist.mode())
        return list(calls)

    assert run(big) == []
    model.enable_tiling()
    assert run(big) == ["encode", "decode"] and run(small) == []
    model.disable_tiling()
    assert run(big) == []
    model.use_tiling_decoder = True
    assert run(big) == ["decode"]
    model.use_tiling_decoder, model.use_tiling_encoder = False, True
    assert run(big) == ["encode"]
    assert AutoencoderKLMagvit(**TINY, use_tiling=True).use_tiling  # honoured from config


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint exactness and loading
# ---------------------------------------------------------------------------------------------------------------


def test_release_config_matches_key_manifest(keys_dir):
    manifest = json.loads((keys_dir / "vae_v4.json").read_text())
    with torch.device("meta"):
        model = AutoencoderKLMagvit()  # the defaults are the released config
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == manifest
    assert sum(p.numel() for p in model.parameters()) == 245_979_879
    assert model.spatial_compression_ratio == 8 and model.temporal_compression_ratio == 4
    assert model.config.scaling_factor == 0.18215


def test_pipeline_model_folder_loads(golden_dir):
    """The release-style vae/config.json (_class_name AutoencoderKL, hidden block_out_channels...) loads strictly."""
    folder = golden_dir / "pipeline" / "model"
    model = AutoencoderKLMagvit.from_pretrained(folder, subfolder="vae")
    assert model.mode == "cache" and model.config.scaling_factor == 0.18215
    assert model.config.block_out_channels == [8, 16, 32, 32]  # hidden key kept for the pipeline
    assert model.spatial_compression_ratio == 2 ** (len(model.config.block_out_channels) - 1)
    weights = load_file(folder / "vae" / "diffusion_pytorch_model.safetensors")
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    assert not model.training


def write_folder(path, model, state=None, config_update=None, drop_keys=()):
    path.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in config_of(model).items() if k not in drop_keys}
    config.update(config_update or {})
    (path / "config.json").write_text(json.dumps(config))
    save_file(state if state is not None else model.state_dict(), str(path / "diffusion_pytorch_model.safetensors"))


def test_strict_loading_errors_and_ignored_loss_keys(tmp_path, caplog):
    model = tiny_vae()
    state = dict(model.state_dict())
    missing = dict(state)
    del missing["decoder.conv_out.weight"], missing["encoder.mid_block.attentions.0.to_q.bias"]
    write_folder(tmp_path / "missing", model, missing)
    with pytest.raises(CheckpointError, match="2 missing keys") as err:
        AutoencoderKLMagvit.from_pretrained(tmp_path / "missing")
    assert "decoder.conv_out.weight" in str(err.value) and "to_q.bias" in str(err.value)

    wrong = dict(state, **{"quant_conv.weight": torch.zeros(8, 8, 1, 1)})
    write_folder(tmp_path / "wrong", model, wrong)
    with pytest.raises(CheckpointError, match="wrong shape"):
        AutoencoderKLMagvit.from_pretrained(tmp_path / "wrong")

    extra = dict(state, **{"loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.ones(2, 3)})
    write_folder(tmp_path / "extra", model, extra)
    with caplog.at_level(logging.INFO):
        loaded = AutoencoderKLMagvit.from_pretrained(tmp_path / "extra")
    notices = [r for r in caplog.records if "training-only" in r.getMessage()]
    assert len(notices) == 1 and "2 training-only keys" in notices[0].getMessage()
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())

    write_folder(tmp_path / "unexpected", model, dict(state, **{"decoder.extra.weight": torch.ones(1)}))
    with pytest.raises(CheckpointError, match="unexpected keys: decoder.extra.weight"):
        AutoencoderKLMagvit.from_pretrained(tmp_path / "unexpected")


def test_missing_config_keys_take_the_original_defaults(tmp_path, caplog):
    model = tiny_vae()
    write_folder(tmp_path / "noscale", model, drop_keys=("scaling_factor", "mini_batch_encoder"))
    with caplog.at_level(logging.WARNING):
        loaded = AutoencoderKLMagvit.from_pretrained(tmp_path / "noscale")
    assert loaded.config.scaling_factor == 0.1825 and loaded.config.mini_batch_encoder == 9
    assert "scaling_factor" in caplog.text
    # Without the mode flags the original silently runs its V2 slice_mag mode; we refuse it.
    write_folder(tmp_path / "nomode", model, drop_keys=("cache_compression_vae", "slice_mag_vae"))
    with pytest.raises(ValueError, match="slice_mag_vae"):
        AutoencoderKLMagvit.from_pretrained(tmp_path / "nomode")
    # Explicit overrides win.
    loaded = AutoencoderKLMagvit.from_pretrained(tmp_path / "noscale", scaling_factor=0.5)
    assert loaded.config.scaling_factor == 0.5


def test_save_pretrained_round_trip(tmp_path):
    model = tiny_vae(spatial_group_norm=True, use_tiling=True)
    model.save_pretrained(tmp_path / "vae")
    assert (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKLMagvit" and config["spatial_group_norm"] is True
    loaded = AutoencoderKLMagvit.from_pretrained(tmp_path, subfolder="vae")
    assert loaded.config.spatial_group_norm and loaded.use_tiling
    x = torch.rand(1, 3, 8, 16, 16) * 2 - 1
    with torch.no_grad():
        z = model.encode(x).latent_dist.mean
        assert torch.equal(loaded.encode(x).latent_dist.mean, z)
        assert torch.equal(loaded.decode(z).sample, model.decode(z).sample)
    bf16 = AutoencoderKLMagvit.from_pretrained(tmp_path, subfolder="vae", torch_dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16


def test_released_config_only_keys_load_quietly_and_are_saved_again(tmp_path):
    """block_out_channels, force_upcast and sample_size are in the released config.json but no argument of the
    class: no "not expected ... Please verify your config.json" warning, and they survive a save."""
    model = tiny_vae()
    model.save_pretrained(tmp_path / "vae")
    path = tmp_path / "vae" / "config.json"
    config = json.loads(path.read_text())
    config.update(block_out_channels=[8, 16, 32, 32], force_upcast=True, sample_size=256)
    path.write_text(json.dumps(config))
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    diffusers_logger = logging.getLogger("diffusers.configuration_utils")
    diffusers_logger.addHandler(handler)
    try:
        loaded = AutoencoderKLMagvit.from_pretrained(tmp_path, subfolder="vae")
    finally:
        diffusers_logger.removeHandler(handler)
    assert not [r for r in records if "not expected" in r.getMessage()]
    assert list(loaded.config.block_out_channels) == [8, 16, 32, 32] and loaded.config.sample_size == 256
    loaded.save_pretrained(tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "config.json").read_text())
    assert saved["block_out_channels"] == [8, 16, 32, 32] and saved["force_upcast"] is True


# ---------------------------------------------------------------------------------------------------------------
# Modes, frame rules and validation
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, match",
    [
        (dict(cache_compression_vae=False, slice_mag_vae=True), "slice_mag_vae"),
        (dict(cache_compression_vae=False), "full"),
        (dict(down_block_types=["DownBlock3D"] * 4), "down_block_types"),
        (dict(up_block_types=["SpatialUpBlock3D"] * 3), "up_block_types"),
        (dict(mid_block_attention_type="spatial"), "mid_block"),
        (dict(up_block_types=["SpatialUpBlock3D"] * 2 + ["SpatialTemporalUpBlock3D"] * 2), "halves time 2x"),
        (dict(use_gc_blocks=[True, False, False, False]), "GC blocks"),
        (dict(norm_num_groups=3), "norm_num_groups"),
    ],
)
def test_bad_configs_are_refused(config, match):
    with pytest.raises(ValueError, match=match):
        AutoencoderKLMagvit(**{**TINY, **config})


def test_frame_rules_follow_the_spec():
    model = AutoencoderKLMagvit(**TINY)
    # frame counts measured on the original
    encoded = {1: 1, 2: 1, 3: 2, 4: 1, 5: 2, 8: 2, 9: 3, 12: 3, 16: 4, 17: 5, 24: 6, 25: 7, 144: 36}
    assert {f: model.num_latent_frames(f) for f in encoded} == encoded
    decoded = {1: 1, 2: 8, 3: 12, 4: 16, 5: 20, 6: 24}
    assert {f: model.num_decoded_frames(f) for f in decoded} == decoded
    slice_model = AutoencoderKLMagvit(**TINY, cache_compression_vae=False, slice_compression_vae=True)
    assert {f: slice_model.num_decoded_frames(f) for f in decoded} == {1: 1, 2: 8, 3: 9, 4: 16, 5: 17, 6: 24}
    with pytest.raises(ValueError, match="num_frames"):
        model.num_latent_frames(0)


@pytest.mark.parametrize("frames", [1, 4, 12])
def test_encode_decode_shapes(frames):
    model = tiny_vae()
    with torch.no_grad():
        z = model.encode(torch.zeros(1, 3, frames, 16, 24)).latent_dist.mode()
        out = model.decode(z).sample
    assert z.shape == (1, 4, model.num_latent_frames(frames), 2, 3)
    assert out.shape == (1, 3, model.num_decoded_frames(z.shape[2]), 16, 24)


@pytest.mark.parametrize(
    "shape, match",
    [
        ((1, 3, 8, 16), "5-D"),
        ((1, 4, 8, 16, 16), "3 channels"),
        ((1, 3, 8, 20, 16), "multiples of 8"),
        ((1, 3, 8, 16, 12), "multiples of 8"),
        ((1, 3, 0, 16, 16), "empty"),
        ((0, 3, 8, 16, 16), "empty"),
    ],
)
def test_encode_rejects_bad_input(shape, match):
    with pytest.raises(ValueError, match=match):
        AutoencoderKLMagvit(**TINY).encode(torch.zeros(shape))


def test_decode_rejects_bad_input():
    model = AutoencoderKLMagvit(**TINY)
    with pytest.raises(ValueError, match="4 channels"):
        model.decode(torch.zeros(1, 8, 2, 2, 2))
    with pytest.raises(ValueError, match="floating-point"):
        model.encode(torch.zeros(1, 3, 8, 16, 16, dtype=torch.uint8))
    with pytest.raises(TypeError, match="torch.Tensor"):
        model.decode([[0.0]])


# ---------------------------------------------------------------------------------------------------------------
# The causal cache
# ---------------------------------------------------------------------------------------------------------------


def test_cached_conv_equals_one_causal_pass():
    """Chunked CausalConv3d with a cache equals one pass with frame 0 replicated twice in front."""
    torch.manual_seed(0)
    conv = CausalConv3d(3, 5)
    x = torch.randn(2, 3, 7, 6, 5)
    whole = F.conv3d(torch.cat([x[:, :, :1], x[:, :, :1], x], 2), conv.weight, conv.bias, padding=(0, 1, 1))
    cache, pieces = CausalCache(), []
    for a, b in [(0, 2), (2, 5), (5, 6), (6, 7)]:
        pieces.append(conv(x[:, :, a:b], cache))
        cache = cache.next()
    torch.testing.assert_close(torch.cat(pieces, 2), whole, rtol=1e-5, atol=1e-5)
    # Without a cache: one zero frame on each side, like a plain padded conv.
    torch.testing.assert_close(conv(x), F.conv3d(x, conv.weight, conv.bias, padding=1), rtol=1e-5, atol=1e-5)


def test_decode_is_stateless_and_causal():
    model, fresh = tiny_vae(), tiny_vae()
    torch.manual_seed(1)
    z1, z2 = torch.randn(1, 4, 6, 1, 1), torch.randn(1, 4, 4, 1, 2)
    with torch.no_grad():
        model.decode(z1)
        after_other = model.decode(z2).sample
        image = model.decode(z2[:, :, :1]).sample
        assert torch.equal(after_other, fresh.decode(z2).sample)
        assert torch.equal(image, fresh.decode(z2[:, :, :1]).sample)
        assert torch.equal(model.decode(z2).sample, after_other)
        # Causality: changing latents 4..5 keeps frames 0..15; changing chunk 0 changes chunk 1.
        base = model.decode(z1).sample
        late = z1.clone()
        late[:, :, 4:] += 1
        out = model.decode(late).sample
        assert torch.equal(out[:, :, :16], base[:, :, :16]) and not torch.equal(out[:, :, 16:], base[:, :, 16:])
        early = z1.clone()
        early[:, :, :2] += 1
        assert not torch.allclose(model.decode(early).sample[:, :, 8:16], base[:, :, 8:16])
    # No module keeps a tensor outside its parameters (the original leaves prev_features on every conv).
    assert not [(type(m).__name__, k) for m in model.modules() for k, v in vars(m).items() if torch.is_tensor(v)]


def test_decode_with_autograd_equals_inference():
    """Inference writes chunks into a preallocated output and frees caches early; with autograd it concatenates."""
    model = tiny_vae()
    z = torch.randn(1, 4, 5, 1, 2)
    with torch.no_grad():
        expected = model.decode(z).sample
    out = model.decode(z.requires_grad_()).sample
    assert out.requires_grad and torch.equal(out.detach(), expected)


# ---------------------------------------------------------------------------------------------------------------
# spatial_group_norm, slicing, upcast
# ---------------------------------------------------------------------------------------------------------------


def test_spatial_group_norm_normalises_each_frame_alone():
    torch.manual_seed(0)
    norm = GroupNorm3D(2, 4, per_frame=True)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 4, 3, 5, 6) * torch.arange(1.0, 4.0).view(1, 1, 3, 1, 1)
    per_frame = torch.stack([F.group_norm(x[:, :, t], 2, norm.weight, norm.bias, 1e-6) for t in range(3)], 2)
    torch.testing.assert_close(norm(x), per_frame)
    norm.per_frame = False
    assert not torch.allclose(norm(x), per_frame, atol=1e-3)


def test_spatial_group_norm_switches_temporal_upsampling_to_nearest():
    torch.manual_seed(0)
    x = torch.randn(1, 4, 3, 2, 2)
    nearest, trilinear = Upsampler3D(4, True, "nearest"), Upsampler3D(4, True, "trilinear")
    trilinear.load_state_dict(nearest.state_dict())
    conv = nearest.conv(F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest"))
    assert torch.equal(nearest(x), conv.repeat_interleave(2, dim=2))
    # trilinear, align_corners=False: [a, b, c] -> [a, .75a+.25b, .25a+.75b, .75b+.25c, .25b+.75c, c]
    a, b, c = conv.unbind(2)
    manual = torch.stack([a, .75 * a + .25 * b, .25 * a + .75 * b, .75 * b + .25 * c, .25 * b + .75 * c, c], 2)
    torch.testing.assert_close(trilinear(x), manual)
    assert torch.equal(trilinear(x, image=True), conv)  # images: no temporal upsampling

    model = AutoencoderKLMagvit(**TINY, spatial_group_norm=True)
    upsamplers = [b.upsampler for b in model.decoder.up_blocks if b.upsampler is not None and b.upsampler.temporal]
    assert upsamplers and all(u.temporal_mode == "nearest" for u in upsamplers)
    norms = [m for m in model.modules() if isinstance(m, GroupNorm3D)]
    assert norms and all(m.per_frame for m in norms)
    assert not model.encoder.mid_block.attentions[0].group_norm.__class__ is GroupNorm3D


def test_spatial_group_norm_model():
    """Images are unaffected (one frame: per-frame and per-chunk statistics coincide); videos are not."""
    off, on = tiny_vae(), tiny_vae(spatial_group_norm=True)
    torch.manual_seed(0)
    image, video = torch.rand(1, 3, 1, 16, 8) * 2 - 1, torch.rand(1, 3, 8, 8, 8) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(on.encode(image).latent_dist.mean, off.encode(image).latent_dist.mean)
        zi = off.encode(image).latent_dist.mean
        torch.testing.assert_close(on.decode(zi).sample, off.decode(zi).sample)
        assert not torch.allclose(on.encode(video).latent_dist.mean, off.encode(video).latent_dist.mean, atol=1e-4)


def test_slicing_matches_batched():
    model = tiny_vae()
    torch.manual_seed(0)
    x = torch.rand(2, 3, 8, 8, 8) * 2 - 1
    with torch.no_grad():
        z = model.encode(x).latent_dist.mean
        out = model.decode(z).sample
        model.enable_slicing()
        torch.testing.assert_close(model.encode(x).latent_dist.mean, z, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.decode(z).sample, out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.decode(z[1:]).sample, out[1:], rtol=1e-5, atol=1e-5)


def test_fp16_upcast():
    reference = tiny_vae()
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(p.half().float())  # the fp16 model's weights, exactly
    model = AutoencoderKLMagvit.from_config(config_of(reference))
    model.load_state_dict(reference.state_dict())
    model.half()
    assert not model.upcast_vae
    model.upcast_vae = True  # what the predict scripts do for fp16 (also settable in config.json)
    x = (torch.rand(1, 3, 8, 8, 8) * 2 - 1).half()
    with torch.no_grad():
        z = model.encode(x).latent_dist.mean
        out = model.decode(z.half()).sample
        assert z.dtype == out.dtype == torch.float32
        assert model.encoder.conv_in.weight.dtype == model.decoder.conv_out.weight.dtype == torch.float32
        torch.testing.assert_close(z, reference.encode(x.float()).latent_dist.mean)
        torch.testing.assert_close(out, reference.decode(z.half().float()).sample)


# ---------------------------------------------------------------------------------------------------------------
# Posterior and training
# ---------------------------------------------------------------------------------------------------------------


def test_posterior():
    torch.manual_seed(0)
    moments = torch.randn(2, 8, 3, 4, 5)
    moments[0, 4, 0, 0, 0] = 50.0  # clamped to 20
    post = DiagonalGaussian(moments)
    mean, logvar = moments[:, :4], moments[:, 4:].clamp(-30, 20)
    assert torch.equal(post.mode(), mean) and torch.equal(post.logvar, logvar)
    torch.testing.assert_close(post.std, torch.exp(logvar / 2))
    expected_kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).flatten(1).sum(1)
    torch.testing.assert_close(post.kl(), expected_kl)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(post.sample(torch.Generator().manual_seed(3)), mean + post.std * noise)


def test_training_forward_backward_and_gradient_checkpointing():
    torch.manual_seed(0)
    x = torch.rand(1, 3, 16, 8, 8) * 2 - 1  # 4 latents: two decoder chunks, the cache carries gradients

    def grads(model):
        model.zero_grad()
        out = model(x, generator=torch.Generator().manual_seed(0))
        assert out.sample.shape == x.shape
        loss = (out.sample - x).abs().mean() + 1e-6 * out.latent_dist.kl().mean()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    model = tiny_vae().train()
    plain = grads(model)
    assert plain["decoder.conv_out.weight"].abs().sum() > 0 and plain["encoder.conv_in.weight"].abs().sum() > 0
    assert all(g.abs().sum() > 0 for g in plain.values())
    model.enable_gradient_checkpointing()
    assert model.decoder.gradient_checkpointing and model.encoder.gradient_checkpointing
    checkpointed = grads(model)
    for name, g in plain.items():
        torch.testing.assert_close(checkpointed[name], g, rtol=1e-4, atol=1e-6, msg=name)
