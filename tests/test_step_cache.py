"""Step-invariant work runs once per call, and the adaptive step cache skips blocks only where it may: never at the
start or the last step, never across calls, the same way for every kind, sampler and LoRA, and through every front
end's request."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from easyanimate.models.step_cache import StepCache, StepCacheSettings
from easyanimate.pipeline import EasyAnimatePipeline

SMALL = dict(height=32, width=32, num_inference_steps=6, guidance_scale=4.0)
PROMPT = "a red circle moving to the left"


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    pipe = EasyAnimatePipeline.from_pretrained(tiny_model_dir, torch_dtype=torch.float32, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def count_calls(modules: dict) -> tuple[dict, list]:
    counts = {name: 0 for name in modules}
    handles = [module.register_forward_hook(lambda *a, name=name: counts.__setitem__(name, counts[name] + 1))
               for name, module in modules.items()]
    return counts, handles


def test_step_invariant_work_runs_once_per_call(pipe, monkeypatch):
    """Text encoders, the pooled text vector, the text projection, the size / style embedding, the CLIP image
    encoder and Resampler, the rotary table and the inpaint latents: once per call, whatever the step count."""
    import easyanimate.models.rope as rope

    t = pipe.transformer
    counts, handles = count_calls({
        "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2, "image_encoder": pipe.image_encoder,
        "pooled text": t.time_extra_emb.pooler, "size/style/text projection": t.time_extra_emb.extra_embedder,
        "style": t.time_extra_emb.style_embedder, "mT5 projection": t.text_embedder, "Resampler": t.clip_projection,
        "timestep MLP": t.time_extra_emb.timestep_embedder,
    })
    calls = {"rotary table": 0, "inpaint latents": 0}
    original_rope, original_inpaint = rope.rope_for_size, pipe.prepare_inpaint_latents

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(rope, "rope_for_size", counted("rotary table", original_rope))
    monkeypatch.setattr(pipe, "prepare_inpaint_latents", counted("inpaint latents", original_inpaint))
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    try:
        for steps in (3, 7):
            counts.update({name: 0 for name in counts})
            calls.update({name: 0 for name in calls})
            pipe(PROMPT, video_length=8, image=image, generator=gen(), **{**SMALL, "num_inference_steps": steps})
            assert counts.pop("timestep MLP") == steps  # the timestep's part really is per step
            assert {**counts, **calls} == {name: 1 for name in {**counts, **calls}}, (counts, calls)
            counts["timestep MLP"] = 0
    finally:
        for handle in handles:
            handle.remove()


def test_threshold_zero_is_the_uncached_run_and_counts_every_step(pipe):
    plain = pipe(PROMPT, video_length=8, generator=gen(1), **SMALL)
    cached = pipe(PROMPT, video_length=8, generator=gen(1), step_cache=StepCacheSettings(0.0, 0), **SMALL)
    assert torch.equal(plain.videos, cached.videos)
    assert plain.transformer_evaluations == cached.transformer_evaluations == SMALL["num_inference_steps"]


def test_cache_always_runs_the_start_and_the_last_step_and_resets_between_calls(pipe):
    steps = SMALL["num_inference_steps"]
    settings = StepCacheSettings(threshold=1e9, skip_start_steps=2)  # reuse wherever it is allowed
    first = pipe(PROMPT, video_length=8, generator=gen(2), step_cache=settings, **SMALL)
    assert first.transformer_evaluations == 2 + 1  # steps 0, 1 and the last
    again = pipe(PROMPT, video_length=8, generator=gen(2), step_cache=settings, **SMALL)
    assert torch.equal(first.videos, again.videos)  # nothing carried over from the first call
    plain = pipe(PROMPT, video_length=8, generator=gen(2), **SMALL)
    assert plain.transformer_evaluations == steps
    assert not torch.equal(plain.videos, first.videos)


def test_enable_and_disable_set_the_default_of_later_calls(pipe):
    pipe.enable_step_cache(threshold=1e9, skip_start_steps=1)
    try:
        assert pipe(PROMPT, video_length=1, generator=gen(), **SMALL).transformer_evaluations == 2
        assert pipe(PROMPT, video_length=1, generator=gen(), step_cache=False,
                    **SMALL).transformer_evaluations == SMALL["num_inference_steps"]
        pipe.enable_step_cache()
        assert pipe.step_cache == StepCacheSettings()  # the recommended values
    finally:
        pipe.disable_step_cache()
    assert pipe(PROMPT, video_length=1, generator=gen(), **SMALL).transformer_evaluations == SMALL[
        "num_inference_steps"]


def test_reuse_follows_the_accumulated_change_of_the_first_block():
    cache = StepCache(StepCacheSettings(threshold=0.25, skip_start_steps=1), num_steps=6)
    base = torch.ones(2, 4, 8)
    outputs = []
    for step, first in enumerate([base, base * 1.1, base * 1.2, base * 1.3, base * 1.4, base * 1.5]):
        cache.begin_step(step)
        reused = cache.reuse(first)
        if not reused:
            cache.store(first, first * 3)
        outputs.append(reused)
    # step 0: start; 1: change 0.10 <= 0.25, reuse; 2: +0.09 = 0.19 reuse; 3: +0.08 = 0.27 full (sum restarts);
    # 4: 0.077 reuse; 5: the last step, full
    assert outputs == [False, True, True, False, True, False]
    assert cache.full_evaluations == 3


@pytest.mark.parametrize("sampler", ["Euler", "Euler A", "DPM++", "PNDM", "DDIM"])
def test_every_sampler_with_the_cache(pipe, sampler):
    pipe.set_sampler(sampler)
    try:
        out = pipe(PROMPT, video_length=8, generator=gen(3), step_cache=StepCacheSettings(1e9, 1), **SMALL)
    finally:
        pipe.set_sampler("Euler")
    assert out.transformer_evaluations == 2 and torch.isfinite(out.videos).all()


def test_image_video_long_video_and_lora_with_the_cache(pipe, tiny_model_dir, tmp_path):
    from easyanimate.lora import LoRANetwork

    settings = StepCacheSettings(1e9, 1)
    image = Image.new("RGB", (32, 32), (30, 30, 200))
    i2v = pipe(PROMPT, video_length=8, image=image, generator=gen(4), step_cache=settings, **SMALL)
    assert i2v.transformer_evaluations == 2
    video = torch.rand(1, 3, 8, 32, 32, generator=gen(5))
    v2v = pipe(PROMPT, video_length=8, video=video, strength=0.5, generator=gen(4), step_cache=settings, **SMALL)
    assert v2v.transformer_evaluations == 2  # of the 3 steps strength 0.5 runs
    long = pipe.generate_long_video(PROMPT, video_length=12, chunk_length=8, overlap=4, image=image,
                                    generator=gen(4), step_cache=settings, **SMALL)
    assert long.videos.shape[2] == 12 and long.transformer_evaluations == 2 * 2  # two chunks
    from easyanimate.models.transformer import HunyuanTransformer3DModel
    from easyanimate.utils.weights import load_model_from_folder

    network = LoRANetwork(load_model_from_folder(HunyuanTransformer3DModel, tiny_model_dir, "transformer"), rank=2)
    for name, param in network.named_parameters():
        if "lora_up" in name:  # trained away from its zero start, so the LoRA changes the video
            torch.nn.init.normal_(param, std=0.5, generator=gen(6))
    path = network.save(tmp_path / "style.safetensors")
    plain = pipe(PROMPT, video_length=8, generator=gen(7), step_cache=settings, **SMALL)
    pipe.load_lora(path, 1.0)
    try:
        styled = pipe(PROMPT, video_length=8, generator=gen(7), step_cache=settings, **SMALL)
    finally:
        pipe.unload_lora()
    assert styled.transformer_evaluations == 2 and not torch.equal(plain.videos, styled.videos)


def test_step_cache_through_the_command_line_settings(tiny_model_dir, tmp_path):
    from easyanimate import cli

    path = cli.main("t2v", ["--model", str(tiny_model_dir), "--prompt", PROMPT, "--width", "32", "--height", "32",
                            "--frames", "8", "--steps", "6", "--step-cache", "1e9", "--step-cache-skip-start", "2",
                            "--memory-mode", "gpu", "--output", str(tmp_path / "cached.mp4")])
    settings = json.loads(path.with_suffix(".json").read_text())
    assert (settings["step_cache"], settings["step_cache_skip_start"], settings["transformer_evaluations"]) == (
        1e9, 2, 3)
    assert (settings["dtype"], settings["compute_dtype"]) == ("auto", "float32")  # what "auto" resolved to
    with pytest.raises(SystemExit):
        cli.main("t2v", ["--model", str(tiny_model_dir), "--prompt", PROMPT, "--step-cache", "-1"])
