"""fp8 weight storage (easyanimate/models/fp8.py): bytes, rounding, the transformer's output error against a derived
tolerance, the memory mode through load_pipeline, LoRA merge / unmerge on fp8 weights, and errors naming the fix."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from easyanimate.inference.loading import (
    OutOfGPUMemory,
    advise_on_out_of_memory,
    check_model_options,
    load_pipeline,
    out_of_memory_advice,
)
from easyanimate.inference.request import GenerationRequest, RequestError, check_request
from easyanimate.models import fp8
from easyanimate.models.fp8 import FP8_MAX, Fp8Linear, enable_fp8_weights, stored_bytes
from easyanimate.models.transformer import HunyuanTransformer3DModel

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def transformer_inputs(config, batch=2, frames=3, size=8, seed=0) -> dict:
    """Random inputs of the InP transformer's shapes (CLIP tokens included)."""
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    return dict(
        hidden_states=randn(batch, 4, frames, size, size), timestep=torch.tensor([700.0, 300.0][:batch]),
        encoder_hidden_states=randn(batch, config.text_len, config.cross_attention_dim),
        text_embedding_mask=torch.ones(batch, config.text_len),
        encoder_hidden_states_t5=randn(batch, config.text_len_t5, config.cross_attention_dim_t5),
        text_embedding_mask_t5=torch.ones(batch, config.text_len_t5),
        image_meta_size=torch.tensor([[64.0, 64, 64, 64, 0, 0]] * batch), style=torch.zeros(batch, dtype=torch.long),
        inpaint_latents=randn(batch, 8, frames, size, size),
        clip_encoder_hidden_states=randn(batch, 4, config.projection_dim), clip_attention_mask=torch.ones(batch, 16),
    )


def relative_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).pow(2).mean() / b.pow(2).mean()).sqrt().item()


@pytest.fixture(scope="module")
def tiny_transformer(tiny_model_dir):
    return HunyuanTransformer3DModel.from_pretrained(tiny_model_dir, subfolder="transformer").eval()


# ------------------------------------------------------------------------------------------------ storage


def test_released_transformer_stores_under_55_percent_of_its_bf16_bytes():
    """The released V4 transformer (built on the meta device: the same conversion, sizes only)."""
    with torch.device("meta"):
        model = HunyuanTransformer3DModel().to(torch.bfloat16)
    report = enable_fp8_weights(model)
    assert report.bytes_after == stored_bytes(model)
    assert report.saved_fraction >= 0.45, report  # measured 48.6 %: 666 layers, 1.93 G of its 1.98 G weights
    assert model.dtype == torch.bfloat16  # diffusers reads the compute dtype from the first parameter
    assert model.proj_out.weight.dtype == torch.bfloat16  # kept: its error reaches the prediction unfiltered
    assert model.clip_projection.attn.out_proj.weight.dtype == torch.bfloat16  # read directly by its parent
    assert model.time_extra_emb.pooler.q_proj.weight.dtype == torch.bfloat16
    assert isinstance(model.blocks[0].ff.net[2], Fp8Linear)
    assert enable_fp8_weights(model).layers == 0  # a second call converts nothing


def test_tiny_model_converted_weights_take_half_their_bf16_bytes(tiny_model_dir):
    """On the tiny model the fixed frame tables and text padding rows are a third of the bytes (0.36 saved in all);
    the converted layers themselves shrink to one byte per weight plus a 4-byte scale per row."""
    model = HunyuanTransformer3DModel.from_pretrained(tiny_model_dir, subfolder="transformer",
                                                      torch_dtype=torch.bfloat16)
    names = fp8.fp8_targets(model)
    bf16 = sum(model.get_submodule(n).weight.numel() * 2 for n in names)
    enable_fp8_weights(model)
    stored = sum(model.get_submodule(n).weight.numel() + model.get_submodule(n).weight_scale.numel() * 4
                 for n in names)
    assert stored <= 0.5 * bf16 * (1 + 4 / 32)  # the narrowest tiny row has 32 weights
    assert all(model.get_submodule(n).weight.dtype == torch.float8_e4m3fn for n in names)


def test_rounding_is_to_nearest_within_half_an_fp8_step():
    """Every stored weight is the nearest fp8 value of weight / scale: within half a step, which is 2^-4 of the
    value for normal numbers (3 mantissa bits) and 2^-10 x scale below 2^-6 x scale (subnormal step 2^-9)."""
    linear = nn.Linear(64, 48)
    with torch.no_grad():
        linear.weight.mul_(torch.logspace(-3, 1, 48)[:, None])  # rows of very different magnitude
        linear.weight[5] = 0.0  # an all-zero row must stay zero, not NaN
    layer = Fp8Linear.from_linear(linear)
    w, scale = linear.weight.detach(), layer.weight_scale[:, None]
    error = (layer.dequantized_weight() - w).abs()
    assert torch.all(error <= torch.maximum(2**-4 * w.abs(), 2**-10 * scale) * (1 + 1e-6))
    assert torch.equal(layer.dequantized_weight()[5], torch.zeros(64))
    largest = layer.weight.float().abs().amax(dim=1)[torch.arange(48) != 5]
    assert torch.equal(largest, torch.full_like(largest, FP8_MAX / fp8.FP8_HEADROOM))  # room for LoRA merges
    x = torch.randn(3, 64)
    assert torch.equal(layer(x), F.linear(x, layer.dequantized_weight(), linear.bias))
    assert layer.bias is linear.bias and not layer.weight.requires_grad


def test_tiny_transformer_output_error_is_that_of_its_rounding_noise(tiny_transformer):
    """The tolerance is derived, not tuned: fp8 rounding adds to each weight an error of known size that behaves
    like zero-mean noise. Perturbing each converted weight by the same magnitudes with random signs (mean of 4
    draws) gives the error to expect; fp8 must stay within twice that (a single realisation spreads by ~10 % and
    rounding is not perfectly sign-random; measured: fp8 0.058, noise 0.045-0.054 relative RMS), whereas a wrong
    or missing scale gives errors of order 1. Everything is deterministic, so the figures do not depend on the
    machine beyond fp32 rounding."""
    inputs = transformer_inputs(tiny_transformer.config)
    quantized = copy.deepcopy(tiny_transformer)
    enable_fp8_weights(quantized)
    with torch.no_grad():
        reference = tiny_transformer(**inputs).sample
        fp8_error = relative_rms(quantized(**inputs).sample, reference)
        noise_errors = []
        for draw in range(4):
            noisy, g = copy.deepcopy(tiny_transformer), torch.Generator().manual_seed(draw)
            for name, layer in quantized.named_modules():
                if isinstance(layer, Fp8Linear):
                    weight = noisy.get_submodule(name).weight
                    magnitude = (layer.dequantized_weight() - weight).abs()
                    weight.add_(magnitude * (torch.randint(0, 2, weight.shape, generator=g) * 2 - 1))
            noise_errors.append(relative_rms(noisy(**inputs).sample, reference))
    tolerance = 2 * sum(noise_errors) / len(noise_errors)
    print(f"tiny transformer: fp8 relative RMS error {fp8_error:.4f}, tolerance {tolerance:.4f} "
          f"(noise draws {', '.join(f'{e:.4f}' for e in noise_errors)})")
    assert 0 < fp8_error <= tolerance


# ------------------------------------------------------------------------------------------------ memory mode


def test_fp8_memory_mode_loads_and_generates_on_the_cpu(tiny_model_dir):
    """The original's name is accepted; on a CPU the fp8 storage applies alone (no offload) and the call runs."""
    request = check_request(GenerationRequest(model=str(tiny_model_dir), memory_mode="model_cpu_offload_and_qfloat8"))
    pipe = load_pipeline(tiny_model_dir, memory_mode=request.memory_mode, device="cpu", dtype="float32")
    layers = [m for m in pipe.transformer.modules() if isinstance(m, Fp8Linear)]
    assert layers and all(m.compute_dtype == torch.float32 for m in layers)
    assert pipe.transformer.dtype == torch.float32 and pipe.text_encoder.dtype == torch.float32
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red circle", height=32, width=32, video_length=8, num_inference_steps=2,
               generator=torch.Generator().manual_seed(0), output_type="latent").videos
    assert torch.isfinite(out).all()


def test_lora_merges_into_fp8_weights_and_unmerges_bit_exactly(tiny_model_dir, tmp_path):
    """A LoRA merged into an fp8 weight is rounded once more with the layer's scale, so the merged weight is within
    one fp8 rounding of merging before quantizing; unmerging restores the stored bytes exactly (the scale never
    changes)."""
    from safetensors.torch import save_file

    from easyanimate.pipeline import EasyAnimatePipeline

    pipe = EasyAnimatePipeline.from_pretrained(tiny_model_dir, torch_dtype=torch.float32, device="cpu")
    full = {n: m.weight.detach().clone() for n, m in pipe.transformer.named_modules() if isinstance(m, nn.Linear)}
    enable_fp8_weights(pipe.transformer)
    g = torch.Generator().manual_seed(0)
    lora = {}
    for name in ("blocks.0.attn1.to_q", "blocks.1.ff.net.2"):
        out_f, in_f = full[name].shape
        key = "lora_unet__" + name.replace(".", "_")
        lora[f"{key}.lora_down.weight"] = torch.randn(4, in_f, generator=g) * 0.1
        lora[f"{key}.lora_up.weight"] = torch.randn(out_f, 4, generator=g) * 0.1
    path = tmp_path / "lora.safetensors"
    save_file(lora, str(path))
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}

    pipe.load_lora(path, 0.8)
    for name in ("blocks.0.attn1.to_q", "blocks.1.ff.net.2"):
        key = "lora_unet__" + name.replace(".", "_")
        delta = 0.8 * lora[f"{key}.lora_up.weight"] @ lora[f"{key}.lora_down.weight"]
        layer = pipe.transformer.get_submodule(name)
        stored = fp8.dequantize_fp8(before[name + ".weight"], before[name + ".weight_scale"], torch.float32)
        one_rounding = torch.maximum(2**-4 * (stored + delta).abs(), 2**-10 * layer.weight_scale[:, None])
        assert torch.all((layer.dequantized_weight() - (stored + delta)).abs() <= one_rounding * (1 + 1e-6)), name
        assert torch.equal(layer.weight_scale, before[name + ".weight_scale"])
        # against merging before quantizing: the same rounding plus the base weight's own
        ideal = full[name] + delta
        print(f"{name}: relative RMS error of the merged weight {relative_rms(layer.dequantized_weight(), ideal):.4f}"
              f" (fp8 alone: {relative_rms(stored, full[name]):.4f})")
    pipe.unload_lora()
    after = pipe.transformer.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key].view(torch.uint8) if value.dtype == torch.float8_e4m3fn else after[key],
                           value.view(torch.uint8) if value.dtype == torch.float8_e4m3fn else value), key


def test_an_fp8_weight_without_its_layer_is_refused():
    with pytest.raises(ValueError, match="merge LoRAs into the model before"):
        fp8.add_to_fp8_weight(torch.zeros(2, 2).to(torch.float8_e4m3fn), torch.ones(2, 2))


# ------------------------------------------------------------------------------------------------ errors


def test_missing_fp8_support_names_the_memory_modes_to_use(monkeypatch):
    monkeypatch.setattr(fp8, "FP8_DTYPE", None)
    with pytest.raises(RequestError, match="model_cpu_offload .*sequential_cpu_offload"):
        check_model_options("model_cpu_offload_and_fp8", False, torch.device("cpu"))
    check_model_options("model_cpu_offload", False, torch.device("cpu"))  # other modes do not need fp8


def test_out_of_gpu_memory_names_the_next_memory_mode_and_a_smaller_job():
    with pytest.raises(OutOfGPUMemory) as caught:
        with advise_on_out_of_memory("model_cpu_offload", 384, 672, 144):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    message = str(caught.value)
    assert "memory mode model_cpu_offload_and_fp8" in message and "72 frames instead of 144" in message
    assert "a size of 256x464 instead of 384x672" in message and "VAE tiling" in message
    assert isinstance(caught.value, RequestError)  # front ends already show these messages
    assert "memory mode" not in out_of_memory_advice("sequential_cpu_offload", 384, 672, 144)
    assert out_of_memory_advice("none").startswith("try memory mode model_cpu_offload,")


def test_a_generation_out_of_gpu_memory_names_what_to_try():
    """Through the request layer, whichever front end asked."""
    from easyanimate.inference.runner import generate, prepare

    class OutOfMemoryPipe:
        is_inpaint = False
        transformer = None

        def set_sampler(self, name):
            pass

        def __call__(self, **kwargs):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    prepared = prepare(GenerationRequest(memory_mode="gpu", height=384, width=672, frames=144))
    with pytest.raises(OutOfGPUMemory, match="at 384x672, 144 frames in memory mode gpu: try memory mode "
                                             "model_cpu_offload, or 72 frames"):
        generate(OutOfMemoryPipe(), prepared)
