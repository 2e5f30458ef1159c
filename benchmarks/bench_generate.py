"""End-to-end generation time, with and without the step cache.

    python benchmarks/bench_generate.py [--json out.json] [--quick] [--threads 1] [--dtypes float32 bfloat16]

Models: the shipped demo (hidden 192, 8 layers) and a random-weight mid-size model (transformer hidden 512, 8
layers, 8 heads; the released text interface: BERT states 1024 wide x 77 tokens, mT5 states 2048 wide x 256 tokens,
from two-layer encoders of those widths; the demo's VAE). For each model, size x frames, sampler and steps, the
uncached run and the run at the recommended step-cache threshold report: seconds per video, full transformer
evaluations, the time per step spent outside the transformer (scheduler, guidance, callbacks), peak RSS during the
call, and the PSNR of the cached video against the uncached one. Ratios are measured in one run; the machine is
shared, so compare rows of one table, not tables of two runs.

The CPU, its bf16 instructions and the dtype the project chooses on it by default are printed. ``--dtypes float32
bfloat16`` times both (default: the chosen one); speedups and PSNR are then against the first dtype's uncached
run, so the table shows whether the choice pays on this CPU (without bf16 instructions bf16 is emulated and can be
~100x slower: expect minutes).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import torch
from diffusers.utils import logging as diffusers_logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from easyanimate.demo.evaluate import psnr  # noqa: E402
from easyanimate.models.step_cache import StepCacheSettings  # noqa: E402
from easyanimate.utils.system import cpu_name, cpu_native_bf16  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "models" / "EasyAnimateV4-demo"


class PeakRSS:
    """Samples this process's resident memory every 10 ms while active; ``peak`` in MiB."""

    def __enter__(self):
        self.peak, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        page = 4096
        while not self._stop.is_set():
            rss = int(Path("/proc/self/statm").read_text().split()[1]) * page / 2**20
            self.peak = max(self.peak, rss)
            time.sleep(0.01)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def mid_size_pipeline(dtype: torch.dtype = torch.float32):
    """The demo's tokenizers, image encoder, VAE and scheduler around a random hidden-512 transformer and text
    encoders of the released widths (two layers each, random), in ``dtype``."""
    from transformers import BertConfig, BertModel, T5Config, T5EncoderModel

    from easyanimate.models.transformer import HunyuanTransformer3DModel
    from easyanimate.pipeline import EasyAnimatePipeline

    demo = EasyAnimatePipeline.from_pretrained(DEMO, torch_dtype=dtype, device="cpu")
    torch.manual_seed(0)
    text_encoder = BertModel(BertConfig(vocab_size=demo.tokenizer.vocab_size, hidden_size=1024, num_hidden_layers=2,
                                        num_attention_heads=16, intermediate_size=4096), add_pooling_layer=False)
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=demo.text_encoder_2.config.vocab_size, d_model=2048,
                                             d_kv=64, d_ff=5120, num_layers=2, num_heads=32,
                                             feed_forward_proj="gated-gelu"))
    transformer = HunyuanTransformer3DModel(
        num_attention_heads=8, attention_head_dim=64, hidden_size=512, num_layers=8, in_channels=12,
        out_channels=8, cross_attention_dim=1024, cross_attention_dim_t5=2048, pooled_projection_dim=1024,
        text_len=77, text_len_t5=256, projection_dim=demo.transformer.config.projection_dim, mlp_ratio=4.0,
    )
    return EasyAnimatePipeline(demo.vae, transformer.to(dtype).eval(), text_encoder.to(dtype).eval(), demo.tokenizer,
                               text_encoder_2.to(dtype).eval(), demo.tokenizer_2, demo.scheduler, demo.image_encoder,
                               demo.image_processor)


def timed_call(pipe, steps: int, height: int, width: int, frames: int, cache) -> dict:
    """One generation; seconds, evaluations, seconds per step outside the transformer, peak RSS."""
    transformer_seconds, loop_seconds = [0.0], [0.0]
    forward, denoise = pipe.transformer.forward, pipe._denoise

    def timed_forward(*args, **kwargs):
        if kwargs.get("conditioning_for") is not None:  # the once-per-call preparation, not a step
            return forward(*args, **kwargs)
        start = time.perf_counter()
        try:
            return forward(*args, **kwargs)
        finally:
            transformer_seconds[0] += time.perf_counter() - start

    def timed_denoise(*args, **kwargs):
        start = time.perf_counter()
        try:
            return denoise(*args, **kwargs)
        finally:
            loop_seconds[0] += time.perf_counter() - start

    pipe.transformer.forward, pipe._denoise = timed_forward, timed_denoise
    try:
        with PeakRSS() as rss:
            start = time.perf_counter()
            out = pipe("a red circle moving to the right", negative_prompt="", height=height, width=width,
                       video_length=frames, num_inference_steps=steps, guidance_scale=3.0,
                       generator=torch.Generator().manual_seed(0), step_cache=cache)
            seconds = time.perf_counter() - start
    finally:
        del pipe.transformer.forward, pipe._denoise  # back to the class's methods
    step = loop_seconds[0] / steps
    outside = (loop_seconds[0] - transformer_seconds[0]) / steps
    return dict(seconds=seconds, evaluations=out.transformer_evaluations, outside_share=outside / step,
                peak_rss_mib=rss.peak, video=out.videos)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="one size per model and 25 steps only")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"], default=None,
                        help="dtypes to time, the first the reference (default: the one chosen on this CPU)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    diffusers_logging.set_verbosity_error()  # casting the random models warns once per model

    from easyanimate.inference.loading import default_dtype, dtype_name
    from easyanimate.pipeline import EasyAnimatePipeline

    chosen = default_dtype(torch.device("cpu"))
    dtypes = [getattr(torch, name) for name in args.dtypes] if args.dtypes else [chosen]
    bf16_instructions = cpu_native_bf16() or "none"
    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} threads, bf16 instructions: {bf16_instructions}, "
          f"default dtype here: {dtype_name(chosen)}")
    cases = {
        "demo": (lambda dtype: EasyAnimatePipeline.from_pretrained(DEMO, torch_dtype=dtype, device="cpu"),
                 [(64, 64, 16)]),
        "mid-512x8": (mid_size_pipeline, [(128, 128, 16)] if args.quick else [(128, 128, 16), (256, 256, 16)]),
    }
    step_counts = [25] if args.quick else [25, 50]
    rows = []
    print(f"{'model':10s} {'size':>12s} {'dtype':8s} {'steps':>5s} {'cache':>5s} {'s/video':>8s} {'evals':>5s} "
          f"{'speedup':>7s} {'outside':>7s} {'RSS MiB':>8s} {'PSNR dB':>7s}")
    for name, (build, sizes) in cases.items():
        references = {}  # (size, steps) -> the first dtype's uncached result
        for dtype in dtypes:
            pipe = build(dtype)
            pipe.set_progress_bar_config(disable=True)
            for height, width, frames in sizes:
                for steps in step_counts:
                    pipe.set_sampler("Euler")
                    pipe(".", height=height, width=width, video_length=frames, num_inference_steps=1)  # warm-up
                    for label, cache in (("off", False), ("on", StepCacheSettings())):
                        result = timed_call(pipe, steps, height, width, frames, cache)
                        reference = references.setdefault((height, width, steps), result)
                        row = dict(model=name, size=f"{height}x{width}x{frames}", dtype=dtype_name(dtype),
                                   sampler="Euler", steps=steps, cache=label, seconds=round(result["seconds"], 2),
                                   evaluations=result["evaluations"],
                                   speedup=round(reference["seconds"] / result["seconds"], 2),
                                   outside_share=round(result["outside_share"], 4),
                                   peak_rss_mib=round(result["peak_rss_mib"]),
                                   psnr=None if result is reference else round(
                                       psnr(result["video"].float(), reference["video"].float()), 1))
                        rows.append(row)
                        psnr_text = "-" if row["psnr"] is None else f"{row['psnr']:.1f}"
                        print(f"{name:10s} {row['size']:>12s} {row['dtype']:8s} {steps:5d} {label:>5s} "
                              f"{row['seconds']:8.2f} {row['evaluations']:5d} {row['speedup']:6.2f}x "
                              f"{row['outside_share']:6.1%} {row['peak_rss_mib']:8d} {psnr_text:>7s}", flush=True)
            del pipe
    print("speedup and PSNR: against the uncached run of the first dtype listed, same model, size and steps")
    if args.json is not None:
        args.json.write_text(json.dumps({"cpu": cpu_name(), "bf16_instructions": bf16_instructions,
                                         "default_dtype": dtype_name(chosen), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
