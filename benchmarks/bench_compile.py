"""Eager against compiled transformer blocks on the CPU, as ratios measured in one run.

    python -m benchmarks.bench_compile                          # the demo model's transformer, 2 sizes (~10 min)
    python -m benchmarks.bench_compile --model models/EasyAnimateV4-demo --frames 4 16 --repeats 5 --threads 2

For each latent size (the demo's 64x64 px = 8x8 latents, ``--frames`` latent frames, guidance batch 2) prints: the
first compiled call (compiling included) in seconds, the median seconds of an eager and of a compiled call, the
speed-up (eager / compiled) and the largest difference of the outputs. Eager and compiled calls alternate, so a
change in the machine's load hits both alike; on a shared machine the ratio is what to read. The first line names
the CPU. Compiled blocks are ``easyanimate.models.compiled.compile_blocks`` with inductor, the default.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

from easyanimate.utils.system import cpu_name

DEFAULT_MODEL = "models/EasyAnimateV4-demo"


def inputs_for(config, frames: int, size: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    return dict(
        hidden_states=randn(2, 4, frames, size, size), timestep=torch.tensor([600.0, 600.0]),
        encoder_hidden_states=randn(2, config.text_len, config.cross_attention_dim),
        text_embedding_mask=torch.ones(2, config.text_len),
        encoder_hidden_states_t5=randn(2, config.text_len_t5, config.cross_attention_dim_t5),
        text_embedding_mask_t5=torch.ones(2, config.text_len_t5),
        image_meta_size=torch.tensor([[8.0 * size, 8 * size, 8 * size, 8 * size, 0, 0]] * 2),
        style=torch.zeros(2, dtype=torch.long), inpaint_latents=randn(2, config.in_channels - 4, frames, size, size),
        clip_encoder_hidden_states=randn(2, 256, config.projection_dim), clip_attention_mask=torch.ones(2, 16),
    )


def timed(model, inputs) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    with torch.no_grad():
        out = model(**inputs).sample
    return time.perf_counter() - start, out


def main() -> None:
    from easyanimate.models.compiled import check_compile_support, compile_blocks
    from easyanimate.models.transformer import HunyuanTransformer3DModel

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="a model folder (its transformer is timed)")
    parser.add_argument("--frames", nargs="+", type=int, default=[4, 16], help="latent frames per size")
    parser.add_argument("--size", type=int, default=8, help="latent height and width")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    check_compile_support("cpu")
    torch.set_num_threads(args.threads)

    eager = HunyuanTransformer3DModel.from_pretrained(args.model, subfolder="transformer").eval()
    compiled = copy.deepcopy(eager)
    compile_blocks(compiled)
    print(f"CPU: {cpu_name()}; {args.threads} threads; torch {torch.__version__}; {args.model} transformer "
          f"(hidden {eager.config.hidden_size}, {eager.config.num_layers} blocks), fp32, batch 2")
    print(f"{'latent':>14} {'tokens':>7} {'first compiled s':>17} {'eager s':>8} {'compiled s':>11} "
          f"{'speed-up':>9} {'max |diff|':>11}")
    for frames in args.frames:
        inputs = inputs_for(eager.config, frames, args.size)
        first, out_compiled = timed(compiled, inputs)
        _, out_eager = timed(eager, inputs)
        eager_s, compiled_s = [], []
        for _ in range(args.repeats):  # alternate, so load changes hit both
            eager_s.append(timed(eager, inputs)[0])
            compiled_s.append(timed(compiled, inputs)[0])
        e, c = statistics.median(eager_s), statistics.median(compiled_s)
        tokens = frames * (args.size // 2) ** 2
        diff = (out_compiled - out_eager).abs().max().item()
        print(f"{f'{frames}x{args.size}x{args.size}':>14} {tokens:>7} {first:>17.1f} {e:>8.3f} {c:>11.3f} "
              f"{e / c:>8.2f}x {diff:>11.1e}", flush=True)


if __name__ == "__main__":
    main()
