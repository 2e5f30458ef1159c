"""Behaviour of EasyAnimatePipeline beyond golden parity: shapes per task, seeding, input validation, loading errors,
sampler choice, CFG batching, the strength+latents definition, offload modes, LoRA round trip and long video.

Runs on the tiny random model folder of the golden fixtures at 32x32 px with 1-2 steps, so it stays fast.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from easyanimate.pipeline import SAMPLERS, EasyAnimatePipeline, build_image_to_video_inputs
from easyanimate.inference.request import RequestError
from easyanimate.utils.weights import CheckpointError

SMALL = dict(height=32, width=32, num_inference_steps=2, guidance_scale=6.0)
PROMPT = "A red ball rolls across a wooden table."


@pytest.fixture(scope="module")
def model_dir(golden_dir):
    return golden_dir / "pipeline" / "model"


def load(model_dir, **kwargs):
    pipe = EasyAnimatePipeline.from_pretrained(model_dir, torch_dtype=torch.float32, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(model_dir):
    return load(model_dir)


def gen(seed=0):
    return torch.Generator("cpu").manual_seed(seed)


def test_image(seed=0, size=(32, 32)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8))


test_image.__test__ = False  # a helper, not a test


# ------------------------------------------------------------------------------------------------ tasks / shapes
def test_t2v_t2i_shapes_range_and_batch(pipe):
    video = pipe(PROMPT, video_length=8, generator=gen(), **SMALL).videos
    assert video.shape == (1, 3, 8, 32, 32) and video.dtype == torch.float32
    assert 0.0 <= video.min() and video.max() <= 1.0 and video.std() > 0
    image = pipe([PROMPT, "a cat"], video_length=1, generator=gen(), **SMALL).videos
    assert image.shape == (2, 3, 1, 32, 32)
    assert not torch.equal(image[0], image[1])  # the two prompts condition differently
    two = pipe(PROMPT, video_length=1, num_videos_per_prompt=2, generator=gen(), **SMALL).videos
    assert two.shape == (2, 3, 1, 32, 32) and not torch.equal(two[0], two[1])  # different noise per video


def test_i2v_and_v2v_shapes(pipe):
    out = pipe([PROMPT, "a cat"], video_length=8, image=test_image(), end_image=test_image(1), generator=gen(), **SMALL)
    assert out.videos.shape == (2, 3, 8, 32, 32)  # one conditioning image shared by a batch of prompts
    clip = torch.randint(0, 256, (1, 3, 8, 32, 32), generator=gen(3), dtype=torch.uint8)
    out = pipe(PROMPT, video_length=8, video=clip, strength=0.5, generator=gen(), **SMALL)
    assert out.videos.shape == (1, 3, 8, 32, 32)
    as_float = pipe(PROMPT, video_length=8, video=clip / 255, strength=0.5, generator=gen(), **SMALL)
    assert torch.equal(out.videos, as_float.videos)  # uint8 frames are read as k / 255
    latents = pipe(PROMPT, video_length=8, generator=gen(), output_type="latent", **SMALL).videos
    assert latents.shape == (1, 4, 2, 4, 4)
    as_np = pipe(PROMPT, video_length=1, generator=gen(), output_type="np", **SMALL).videos
    assert isinstance(as_np, np.ndarray) and as_np.shape == (1, 3, 1, 32, 32)


def test_image_to_video_inputs_match_the_original_helper():
    start, end = test_image(0), test_image(1)
    video, mask, clip = build_image_to_video_inputs(start, None, 8, 32, 32)
    start_px = torch.from_numpy(np.asarray(start)).permute(2, 0, 1).float() / 255
    assert video.shape == (1, 3, 8, 32, 32) and mask.shape == (1, 1, 8, 32, 32) and mask.dtype == torch.uint8
    assert all(torch.equal(video[0, :, f], start_px) for f in range(8))  # the start image tiled over all frames
    assert mask[0, 0, :, 0, 0].tolist() == [0, 0, 0, 255, 255, 255, 255, 255]
    assert clip.size == (32, 32)
    video, mask, _ = build_image_to_video_inputs(start, end, 8, 32, 32)
    end_px = torch.from_numpy(np.asarray(end)).permute(2, 0, 1).float() / 255
    assert mask[0, 0, :, 0, 0].tolist() == [0, 0, 0, 255, 255, 0, 0, 0]
    assert torch.equal(video[0, :, 4], start_px) and all(torch.equal(video[0, :, f], end_px) for f in (5, 6, 7))
    frames = [test_image(i) for i in range(4)]  # long-video continuation: k start frames
    video, mask, clip = build_image_to_video_inputs(frames, None, 8, 32, 32)
    assert mask[0, 0, :, 0, 0].tolist() == [0, 0, 0, 0, 255, 255, 255, 255]
    assert torch.equal(video[0, :, 3], torch.from_numpy(np.asarray(frames[3])).permute(2, 0, 1).float() / 255)
    assert torch.equal(video[0, :, 5], video[0, :, 0])


# ---------------------------------------------------------------------------------------------------- seeding
def test_same_seed_same_video_other_seed_differs(pipe):
    a = pipe(PROMPT, video_length=8, generator=gen(1), **SMALL).videos
    b = pipe(PROMPT, video_length=8, generator=gen(1), **SMALL).videos
    c = pipe(PROMPT, video_length=8, generator=gen(2), **SMALL).videos
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


def test_vae_posterior_sample_is_seeded(pipe):
    """The original samples the conditioning posterior from the global RNG; ours uses ``generator``."""
    kwargs = dict(video_length=8, image=test_image(), **SMALL)
    torch.manual_seed(0)
    a = pipe(PROMPT, generator=gen(5), **kwargs).videos
    torch.manual_seed(1)
    b = pipe(PROMPT, generator=gen(5), **kwargs).videos
    assert torch.equal(a, b)
    pipe.vae_posterior = "mode"
    try:
        c = pipe(PROMPT, generator=gen(5), **kwargs).videos
    finally:
        pipe.vae_posterior = "sample"
    assert not torch.equal(a, c)


def test_strength_with_explicit_latents_uses_them_as_noise(pipe):
    """Defined behaviour (the original ignores the video here): the latents are the noise added to the video."""
    clip = torch.rand(1, 3, 8, 32, 32, generator=gen(3))
    shape = pipe.latent_shape(1, 32, 32, 8)
    noise = torch.randn(shape, generator=gen(9))
    pipe.vae_posterior = "mode"  # keep the generator for the noise only
    try:
        from_generator = pipe(PROMPT, video_length=8, video=clip, strength=0.5, generator=gen(9), **SMALL).videos
        from_latents = pipe(PROMPT, video_length=8, video=clip, strength=0.5, latents=noise, **SMALL).videos
        other_video = pipe(PROMPT, video_length=8, video=1 - clip, strength=0.5, latents=noise, **SMALL).videos
    finally:
        pipe.vae_posterior = "sample"
    torch.testing.assert_close(from_latents, from_generator, atol=1e-6, rtol=0)
    assert (other_video - from_latents).abs().max() > 1e-3  # the video is not ignored


# ----------------------------------------------------------------------------------------- CFG batching, hooks
def test_one_transformer_call_per_step_with_cfg_rows(pipe):
    batches = []
    handle = pipe.transformer.register_forward_hook(
        lambda module, args, kwargs, out: batches.append(args[0].shape[0]), with_kwargs=True
    )
    steps = []
    try:
        pipe(PROMPT, video_length=8, image=test_image(), generator=gen(),
             callback_on_step_end=lambda p, i, t, kw: steps.append(i), **SMALL)
        assert batches == [2, 2] and steps == [0, 1]  # [uncond, cond] in one call per step
        batches.clear()
        pipe(PROMPT, video_length=1, generator=gen(), **{**SMALL, "guidance_scale": 1.0})
        assert batches == [1, 1]  # no CFG
    finally:
        handle.remove()


def test_callback_can_replace_latents(pipe):
    def zero_latents(p, i, t, kwargs):
        return {"latents": torch.zeros_like(kwargs["latents"])}

    out = pipe(PROMPT, video_length=1, generator=gen(), output_type="latent", callback_on_step_end=zero_latents,
               **SMALL)
    assert torch.count_nonzero(out.videos) == 0


# ------------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(height=30), "multiple of 16"),
        (dict(width=40), "multiple of 16"),
        (dict(video_length=5), "multiple of 8"),
        (dict(video_length=0), "multiple of 8"),
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(strength=0.0), "strength"),
        (dict(strength=0.5), "needs a video"),
        (dict(strength=0.1, video=torch.zeros(1, 3, 8, 32, 32), num_inference_steps=2), "runs no step"),
        (dict(video=torch.zeros(1, 3, 4, 32, 32), strength=0.5), "video must have shape"),
        (dict(video=torch.zeros(1, 3, 8, 32, 32)), "would be ignored"),
        (dict(video=torch.zeros(1, 3, 8, 32, 32), mask_video=torch.zeros(1, 3, 8, 32, 32)),
         "mask_video must have shape"),
        (dict(mask_video=torch.zeros(1, 1, 8, 32, 32)), "without video"),
        (dict(video=torch.full((1, 3, 8, 32, 32), 2.0), strength=0.5), r"\[0, 1\]"),
        (dict(latents=torch.zeros(1, 4, 3, 4, 4)), "latents must have shape"),
        (dict(end_image=Image.new("RGB", (32, 32))), "end_image needs a start image"),
        (dict(image=Image.new("RGB", (32, 32)), video=torch.zeros(1, 3, 8, 32, 32)), "not both"),
        (dict(output_type="gif"), "output_type"),
    ],
)
def test_bad_input_is_a_clear_error_before_any_work(pipe, kwargs, message):
    calls = []
    handle = pipe.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=message):
            pipe(PROMPT, **{**dict(SMALL, video_length=8), **kwargs})
    finally:
        handle.remove()
    assert not calls  # rejected before the text encoders ran


def test_samplers(model_dir, pipe):
    for name, cls in SAMPLERS.items():
        pipe.set_sampler(name)
        assert isinstance(pipe.scheduler, cls) and pipe.scheduler.config.prediction_type == "v_prediction"
    pipe.set_sampler("Euler")
    with pytest.raises(ValueError, match="valid samplers: 'Euler', 'Euler A', 'DPM\\+\\+', 'PNDM', 'DDIM'"):
        pipe.set_sampler("LMS")
    with pytest.raises(ValueError, match="valid samplers"):
        EasyAnimatePipeline.from_pretrained(model_dir, sampler="euler")
    assert isinstance(load(model_dir, sampler="DPM++").scheduler, SAMPLERS["DPM++"])


# ----------------------------------------------------------------------------------------------------- loading
def test_default_dtype_on_cpu_is_fp32_under_the_tests_override(model_dir):
    assert os.environ["EASYANIMATE_CPU_DTYPE"] == "float32"  # tests/conftest.py: fp32 on every CPU
    pipe = EasyAnimatePipeline.from_pretrained(model_dir, device="cpu")
    assert pipe.transformer.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.float32
    assert pipe.image_encoder is not None and pipe.device.type == "cpu"


@pytest.mark.parametrize("flags, expected", [
    ({"avx2", "avx512f"}, torch.float32),                           # e.g. an AMD EPYC before Zen 4: bf16 emulated
    ({"avx512f", "avx512_bf16"}, torch.bfloat16),                   # AMD Zen 4, Intel Cooper Lake
    ({"avx512_bf16", "amx_tile", "amx_bf16"}, torch.bfloat16),      # Intel Xeon with AMX
    (set(), torch.float32),                                         # no /proc/cpuinfo (not Linux) or another ISA
])
def test_cpu_dtype_follows_the_bf16_instructions(monkeypatch, flags, expected):
    from easyanimate.inference import loading
    from easyanimate.utils import system

    monkeypatch.setenv("EASYANIMATE_CPU_DTYPE", "auto")
    monkeypatch.setattr(system, "cpu_flags", lambda: flags)
    assert loading.default_dtype(torch.device("cpu")) == expected
    monkeypatch.setenv("EASYANIMATE_CPU_DTYPE", "float32")  # the override wins both ways
    assert loading.default_dtype(torch.device("cpu")) == torch.float32
    monkeypatch.setenv("EASYANIMATE_CPU_DTYPE", "bf16")
    assert loading.default_dtype(torch.device("cpu")) == torch.bfloat16
    monkeypatch.setenv("EASYANIMATE_CPU_DTYPE", "half")
    with pytest.raises(RequestError, match="EASYANIMATE_CPU_DTYPE='half' .*float32, bfloat16 or auto"):
        loading.default_dtype(torch.device("cpu"))


def test_cpu_flags_are_read_from_the_kernel_report(monkeypatch, tmp_path):
    from easyanimate.utils import system

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 avx512f avx512_bf16\n\n"
                       "processor\t: 1\nflags\t\t: fpu sse2 avx512f avx512_bf16\n")
    real_path = system.Path
    monkeypatch.setattr(system, "Path", lambda p: cpuinfo if p == "/proc/cpuinfo" else real_path(p))
    assert system.cpu_flags() == {"fpu", "sse2", "avx512f", "avx512_bf16"}
    assert system.cpu_native_bf16() == "avx512_bf16" and system.cpu_name() == "Some CPU"
    cpuinfo.unlink()
    assert system.cpu_flags() == set() and system.cpu_native_bf16() is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_runs_with_fp32_islands(model_dir, dtype):
    pipe = EasyAnimatePipeline.from_pretrained(model_dir, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.dtype == pipe.text_encoder_2.dtype == pipe.image_encoder.dtype == dtype
    assert pipe.vae.dtype == (torch.float32 if dtype == torch.float16 else dtype)  # fp16 upcasts the VAE
    videos = pipe(PROMPT, video_length=8, image=test_image(), generator=gen(), **SMALL).videos
    assert videos.dtype == torch.float32 and videos.shape == (1, 3, 8, 32, 32) and torch.isfinite(videos).all()


@pytest.mark.parametrize(
    "damage, folder",
    [
        (lambda root: shutil.rmtree(root / "text_encoder_2"), "text_encoder_2"),
        (lambda root: (root / "text_encoder_2" / "model-00002-of-00002.safetensors").unlink(), "text_encoder_2"),
        (lambda root: (root / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"broken"),
         "transformer"),
        (lambda root: shutil.rmtree(root / "image_encoder"), "image_encoder"),
        (lambda root: shutil.rmtree(root / "tokenizer"), "tokenizer"),
        (lambda root: (root / "scheduler" / "scheduler_config.json").write_text("{"), "scheduler"),
    ],
)
def test_missing_or_broken_component_names_its_folder(model_dir, tmp_path, damage, folder):
    root = tmp_path / "model"
    shutil.copytree(model_dir, root)
    damage(root)
    with pytest.raises(CheckpointError, match=folder):
        EasyAnimatePipeline.from_pretrained(root, torch_dtype=torch.float32)


def test_pickled_code_in_a_bin_file_is_refused(model_dir, tmp_path):
    import datetime

    root = tmp_path / "model"
    shutil.copytree(model_dir, root)
    state = torch.load(root / "image_encoder" / "pytorch_model.bin", weights_only=True)
    torch.save({**state, "not_a_tensor": datetime.datetime(2024, 1, 1)}, root / "image_encoder" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="image_encoder"):
        EasyAnimatePipeline.from_pretrained(root, torch_dtype=torch.float32)


def test_missing_model_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        EasyAnimatePipeline.from_pretrained(tmp_path / "nope")


# ---------------------------------------------------------------------------------------------- memory modes
def test_offload_modes_give_the_same_video(model_dir, pipe):
    """On CPU the accelerate hooks are exercised with the CPU as execution device; the i2v call runs the Resampler's
    nn.MultiheadAttention, whose weights a per-leaf hook would not load."""
    kwargs = dict(video_length=8, image=test_image(), **SMALL)
    pipe.vae_posterior = "mode"
    try:
        reference = pipe(PROMPT, generator=gen(), **kwargs).videos
    finally:
        pipe.vae_posterior = "sample"
    for enable in ("enable_sequential_cpu_offload", "enable_model_cpu_offload"):
        offloaded = load(model_dir)
        offloaded.vae_posterior = "mode"
        getattr(offloaded, enable)(device="cpu")
        if enable == "enable_sequential_cpu_offload":  # weights really are offloaded, the Resampler's included
            assert offloaded.transformer.blocks[0].attn1.to_q.weight.device.type == "meta"
            assert offloaded.transformer.clip_projection.attn.out_proj.weight.device.type == "meta"
        videos = offloaded(PROMPT, generator=gen(), **kwargs).videos
        torch.testing.assert_close(videos, reference, atol=1e-6, rtol=0, msg=enable)


def test_vae_tiling_passthrough(pipe):
    pipe.enable_vae_tiling()
    try:
        assert pipe.vae.use_tiling
        out = pipe(PROMPT, video_length=8, generator=gen(), **SMALL).videos
        assert out.shape == (1, 3, 8, 32, 32)
    finally:
        pipe.disable_vae_tiling()
    assert not pipe.vae.use_tiling


# -------------------------------------------------------------------------------------------------------- LoRA
def test_lora_load_changes_output_and_unload_restores_weights(model_dir, tmp_path):
    pipe = load(model_dir)
    weight = pipe.transformer.blocks[0].attn1.to_q.weight
    original = weight.detach().clone()
    rank = 2
    lora = {
        "lora_unet__blocks_0_attn1_to_q.lora_down.weight": torch.randn(rank, weight.shape[1], generator=gen(1)),
        "lora_unet__blocks_0_attn1_to_q.lora_up.weight": torch.randn(weight.shape[0], rank, generator=gen(2)),
        "lora_unet__blocks_0_attn1_to_q.alpha": torch.tensor(1.0),
    }
    path = tmp_path / "lora.safetensors"
    save_file(lora, str(path))
    before = pipe(PROMPT, video_length=1, generator=gen(), **SMALL).videos
    pipe.load_lora(path, 0.8)
    up = lora["lora_unet__blocks_0_attn1_to_q.lora_up.weight"]
    down = lora["lora_unet__blocks_0_attn1_to_q.lora_down.weight"]
    torch.testing.assert_close(weight.detach(), original + 0.8 * (1.0 / rank) * up @ down, atol=1e-5, rtol=0)
    merged = pipe(PROMPT, video_length=1, generator=gen(), **SMALL).videos
    assert (merged - before).abs().max() > 1e-4
    pipe.unload_lora()
    assert torch.equal(weight.detach(), original)
    assert torch.equal(pipe(PROMPT, video_length=1, generator=gen(), **SMALL).videos, before)


# -------------------------------------------------------------------------------------------------- long video
def test_long_video_frame_count_and_linear_cross_fade(pipe, monkeypatch):
    """Chunk stitching with a stand-in for the per-chunk call: chunk k is constant k + 1, so every stitched frame
    shows which chunks it came from and with what weight."""
    calls = []

    def fake_call(self, prompt, video_length, image=None, end_image=None, **kwargs):
        calls.append(dict(video_length=video_length, image=image, end_image=end_image))
        value = float(len(calls))
        return type("Out", (), {"videos": torch.full((1, 3, video_length, 32, 32), value)})()

    monkeypatch.setattr(EasyAnimatePipeline, "__call__", fake_call)
    end = test_image(2)
    out = pipe.generate_long_video(PROMPT, video_length=30, chunk_length=16, overlap=4, image=test_image(),
                                   end_image=end, height=32, width=32)
    # chunks: 16 frames, then 16 (covering 12..27), then the remaining 30-24=6 rounded up to 8 (covering 24..31)
    assert [c["video_length"] for c in calls] == [16, 16, 8]
    assert out.videos.shape == (1, 3, 30, 32, 32)
    assert calls[0]["end_image"] is None and calls[1]["end_image"] is None and calls[2]["end_image"] is end
    assert isinstance(calls[1]["image"], list) and len(calls[1]["image"]) == 4  # last 4 frames become start frames
    values = out.videos[0, 0, :, 0, 0]
    w = torch.arange(4) / 4
    torch.testing.assert_close(values[:12], torch.full((12,), 1.0))
    torch.testing.assert_close(values[12:16], 1.0 * (1 - w) + 2.0 * w)  # linear cross-fade over the overlap
    torch.testing.assert_close(values[16:24], torch.full((8,), 2.0))
    torch.testing.assert_close(values[24:28], 2.0 * (1 - w) + 3.0 * w)
    torch.testing.assert_close(values[28:30], torch.full((2,), 3.0))


def test_long_video_end_to_end(pipe):
    out = pipe.generate_long_video(PROMPT, video_length=12, chunk_length=8, overlap=4, generator=gen(),
                                   **{**SMALL, "num_inference_steps": 1})
    assert out.videos.shape == (1, 3, 12, 32, 32)
    with pytest.raises(ValueError, match="chunk_length"):
        pipe.generate_long_video(PROMPT, video_length=12, chunk_length=12)
    with pytest.raises(ValueError, match="overlap"):
        pipe.generate_long_video(PROMPT, video_length=12, chunk_length=8, overlap=8)


# ------------------------------------------------------------------------------------------ text-to-video model
def test_plain_text_to_video_model_needs_no_image_encoder(model_dir, tmp_path):
    """A 4-channel (non-InP) transformer: no CLIP branch, no inpaint channels, no image_encoder/ folder needed."""
    import json

    from easyanimate.models.transformer import HunyuanTransformer3DModel

    root = tmp_path / "t2v_model"
    shutil.copytree(model_dir, root, ignore=shutil.ignore_patterns("image_encoder"))
    config = json.loads((root / "transformer" / "config.json").read_text())
    config.update(in_channels=4, out_channels=None)
    torch.manual_seed(0)
    transformer = HunyuanTransformer3DModel.from_config(config)
    weights = {k: v.contiguous() for k, v in transformer.state_dict().items()}
    save_file(weights, str(root / "transformer" / "diffusion_pytorch_model.safetensors"))
    (root / "transformer" / "config.json").write_text(json.dumps(config))

    pipe = load(root)
    assert pipe.image_encoder is None and not pipe.transformer.is_inpaint
    assert pipe(PROMPT, video_length=8, generator=gen(), **SMALL).videos.shape == (1, 3, 8, 32, 32)
    clip = torch.rand(1, 3, 8, 32, 32, generator=gen(3))
    v2v = pipe(PROMPT, video_length=8, video=clip, strength=0.5, generator=gen(), **SMALL).videos
    assert v2v.shape == (1, 3, 8, 32, 32)
    with pytest.raises(ValueError, match="InP model"):
        pipe(PROMPT, video_length=8, image=test_image(), **SMALL)


def test_text_lengths_come_from_the_transformer_config(model_dir, tmp_path):
    """A transformer built with shorter text tables (the demo model's 32 + 32) gets prompts tokenized to those
    lengths; the released 77 + 256 are the config's defaults."""
    import json

    from easyanimate.models.transformer import HunyuanTransformer3DModel

    root = tmp_path / "short_text_model"
    shutil.copytree(model_dir, root)
    config = json.loads((root / "transformer" / "config.json").read_text())
    config.update(text_len=8, text_len_t5=12)
    torch.manual_seed(0)
    transformer = HunyuanTransformer3DModel.from_config(config)
    save_file({k: v.contiguous() for k, v in transformer.state_dict().items()},
              str(root / "transformer" / "diffusion_pytorch_model.safetensors"))
    (root / "transformer" / "config.json").write_text(json.dumps(config))

    short = load(root)
    tokens = short.tokenize_prompts([PROMPT * 4])
    assert tokens["input_ids"].shape == (1, 8) and tokens["input_ids_2"].shape == (1, 12)
    assert short(PROMPT, video_length=8, generator=gen(), **SMALL).videos.shape == (1, 3, 8, 32, 32)
    released = load(model_dir).tokenize_prompts([PROMPT])
    assert released["input_ids"].shape == (1, 77) and released["input_ids_2"].shape == (1, 256)
