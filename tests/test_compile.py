"""Compiled transformer blocks (easyanimate/models/compiled.py): compilations counted over steps, calls, LoRA merges,
fp8 and step caching; inductor's output against eager; the request layer and command line; errors naming the fix.

Compilation counts use a backend that counts the graphs dynamo hands it and runs them as traced (fast); one test
compiles with inductor, the default, on a two-block model (one graph, about a minute on a 2-core CPU the first
time; torch caches the result for later runs)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from easyanimate import lora
from easyanimate.inference.request import GenerationRequest, RequestError, check_request
from easyanimate.models import compiled
from easyanimate.models.compiled import CompileUnavailable, blocks_are_compiled, check_compile_support, compile_blocks
from easyanimate.models.fp8 import enable_fp8_weights
from easyanimate.models.step_cache import StepCache, StepCacheSettings
from easyanimate.models.transformer import HunyuanTransformer3DModel
from tests.test_fp8 import transformer_inputs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class CountingBackend:
    """A torch.compile backend that counts the graphs it is given (one per compilation) and runs them as traced."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1
        return graph_module.forward


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Compiled code is cached per function across models; every test starts and ends without any."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def tiny_transformer(tiny_model_dir):
    return HunyuanTransformer3DModel.from_pretrained(tiny_model_dir, subfolder="transformer").eval()


def run(model, inputs, **extra):
    with torch.no_grad():
        return model(**inputs, **extra).sample


def test_first_call_compiles_and_later_steps_calls_and_lora_merges_do_not(tiny_transformer):
    model, counter = copy.deepcopy(tiny_transformer), CountingBackend()
    video, other = transformer_inputs(model.config, seed=0), transformer_inputs(model.config, seed=1)
    expected = run(model, video)
    assert compile_blocks(model, backend=counter) == len(model.blocks) and blocks_are_compiled(model)

    torch.testing.assert_close(run(model, video), expected, rtol=0, atol=1e-6)
    assert counter.graphs == 2  # the first half's blocks, and the second half's (which take a long skip)
    for timestep in (900.0, 500.0, 100.0):  # later steps
        run(model, {**video, "timestep": torch.tensor([timestep, timestep])})
    run(model, other)  # a later call of the same size (other latents, text, image tokens)
    cache = StepCache(StepCacheSettings(threshold=0.5, skip_start_steps=0), num_steps=3)
    for step in range(3):  # step caching calls the first block alone, then the rest
        cache.begin_step(step)
        run(model, video, step_cache=cache)
    assert counter.graphs == 2

    name = "lora_unet__blocks_1_attn1_to_q"
    g = torch.Generator().manual_seed(0)
    weights = {f"{name}.lora_down.weight": torch.randn(2, 32, generator=g),
               f"{name}.lora_up.weight": torch.randn(32, 2, generator=g)}
    lora.merge_lora(SimpleNamespace(transformer=model), None, 0.5, state_dict=weights, transformer_only=True)
    eager = copy.deepcopy(tiny_transformer)
    lora.merge_lora(SimpleNamespace(transformer=eager), None, 0.5, state_dict=weights, transformer_only=True)
    torch.testing.assert_close(run(model, video), run(eager, video), rtol=0, atol=1e-6)  # weights are inputs
    assert counter.graphs == 2

    run(model, transformer_inputs(model.config, frames=4))  # a new size compiles once more, with dynamic shapes
    after_new_size = counter.graphs
    run(model, transformer_inputs(model.config, frames=5))
    assert after_new_size <= 4 and counter.graphs == after_new_size


def cached_steps(model, inputs, steps=4) -> list[torch.Tensor]:
    """``steps`` transformer calls under one step cache (threshold high enough that some steps reuse)."""
    cache = StepCache(StepCacheSettings(threshold=0.5, skip_start_steps=1), num_steps=steps)
    outputs = []
    for step in range(steps):
        cache.begin_step(step)
        timestep = torch.full((2,), 900.0 - 200 * step)
        outputs.append(run(model, {**inputs, "timestep": timestep}, step_cache=cache))
    assert cache.full_evaluations < steps  # some steps reused the cached residual
    return outputs


def test_fp8_weights_and_the_step_cache_compile_into_the_same_two_graphs(tiny_transformer):
    model, counter = copy.deepcopy(tiny_transformer), CountingBackend()
    enable_fp8_weights(model)
    inputs = transformer_inputs(model.config)
    expected, expected_cached = run(model, inputs), cached_steps(model, inputs)
    compile_blocks(model, backend=counter)
    torch.testing.assert_close(run(model, inputs), expected, rtol=0, atol=1e-6)
    for got, want in zip(cached_steps(model, inputs), expected_cached):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert counter.graphs == 2


@pytest.mark.slow
def test_inductor_blocks_equal_eager_within_1e4_in_fp32(tiny_model_dir):
    """The real compiler on a two-block copy of the tiny model (one graph): outputs within 1e-4 of eager."""
    from easyanimate.demo.tiny_model import TRANSFORMER_CONFIG

    check_compile_support("cpu")
    torch.manual_seed(0)
    config = {k: v for k, v in TRANSFORMER_CONFIG.items() if not k.startswith("_")}
    model = HunyuanTransformer3DModel(**{**config, "num_layers": 2}).eval()
    with torch.no_grad():
        for parameter in model.parameters():  # zero-initialised output layers would hide differences
            parameter.add_(torch.randn_like(parameter) * 0.05)
    inputs = transformer_inputs(model.config)
    expected = run(model, inputs)
    compile_blocks(model)
    got = run(model, inputs)
    error = (got - expected).abs().max().item()
    print(f"inductor vs eager: max abs difference {error:.2e} (output RMS {expected.pow(2).mean().sqrt():.2f})")
    assert error <= 1e-4


def test_the_request_layer_compiles_fp8_blocks_and_generates_the_eager_video(tiny_model_dir, monkeypatch):
    """compile=True from a request reaches load_pipeline (here with the counting backend) and gives the video of
    the same request uncompiled."""
    from easyanimate.inference.runner import generate, load_for, prepare

    counter = CountingBackend()
    monkeypatch.setattr(compiled, "DEFAULT_BACKEND", counter)
    request = GenerationRequest(model=str(tiny_model_dir), prompt="a red circle", negative_prompt="", steps=2,
                                height=32, width=32, frames=8, guidance_scale=6.0, seed=1, dtype="float32",
                                device="cpu", memory_mode="model_cpu_offload_and_fp8")
    results = {}
    for compile in (False, True):
        prepared = prepare(request.replace(compile=compile))
        pipe = load_for(prepared)
        pipe.set_progress_bar_config(disable=True)
        assert blocks_are_compiled(pipe.transformer) == compile
        results[compile] = generate(pipe, prepared)
    assert counter.graphs == 2
    assert results[True].settings["compile"] is True
    torch.testing.assert_close(results[True].videos, results[False].videos, rtol=0, atol=1e-5)


def test_command_line_flags_map_into_the_request(tiny_model_dir):
    from easyanimate import cli

    parser = cli.build_parser("t2v")
    args = parser.parse_args(["--model", str(tiny_model_dir), "--prompt", "x", "--compile",
                              "--memory-mode", "model_cpu_offload_and_qfloat8"])
    request, _ = cli.to_request("t2v", args)
    assert request.compile is True and request.memory_mode == "model_cpu_offload_and_fp8"
    assert cli.to_request("t2v", parser.parse_args(["--prompt", "x"]))[0].compile is False


# ------------------------------------------------------------------------------------------------ errors


def test_compile_with_sequential_offload_is_refused_naming_the_mode_to_use():
    with pytest.raises(RequestError, match="--compile does not work with memory mode sequential_cpu_offload.*"
                                           "model_cpu_offload_and_fp8"):
        check_request(GenerationRequest(compile=True, memory_mode="sequential_cpu_offload"),
                      labels={"compile": "--compile"})
    check_request(GenerationRequest(compile=True, memory_mode="model_cpu_offload_and_fp8"))


def test_missing_compilers_are_named(monkeypatch):
    monkeypatch.setattr(compiled, "_has_cpp_compiler", lambda: False)
    with pytest.raises(CompileUnavailable, match="C\\+\\+ compiler .*run without compile"):
        check_compile_support("cpu")
    import torch.utils._triton

    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: False)
    with pytest.raises(CompileUnavailable, match="triton"):
        check_compile_support("cuda")
    from easyanimate.inference.loading import check_model_options

    with pytest.raises(RequestError, match="compile: .*C\\+\\+ compiler"):
        check_model_options("model_cpu_offload", True, torch.device("cpu"))
