"""fp8 weight storage measured: stored bytes, per-channel against per-tensor scales, and the demo model's judged
accuracy with fp8 against fp32.

    python -m benchmarks.bench_fp8                      # bytes + scale granularity (~1 min on a CPU)
    python -m benchmarks.bench_fp8 --eval --seeds 0 1 2 3 4 5 6 7   # + held-out judged accuracy (~40 min, 1 thread)
    python -m benchmarks.bench_fp8 --eval --json fp8_eval.json

* **bytes**: the transformer's parameters and buffers in bf16, then with its large Linear weights in fp8, for the
  released V4 architecture (built on the meta device: sizes only), the demo and the tiny model.
* **granularity**: the demo transformer with per-channel and with per-tensor scales: RMS relative error of the
  converted weights, and of the transformer's output against fp32 on inputs recorded from a real generation (steps
  0, 12 and 24 of 25).
* **eval** (``--eval``): ``easyanimate.demo.evaluate`` on the held-out combinations for text, image and video to
  video, both languages, with the pipeline loaded in fp32 (memory mode "gpu") and in "model_cpu_offload_and_fp8"
  (on a CPU that is the fp8 storage alone, computing in fp32), the same seeds for both.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch

from easyanimate.models.fp8 import Fp8Linear, enable_fp8_weights
from easyanimate.models.transformer import HunyuanTransformer3DModel

DEFAULT_MODEL = "models/EasyAnimateV4-demo"


def bytes_table(model_dir: str) -> list[dict]:
    """Stored transformer bytes in bf16 and with fp8 weights for the released, demo and tiny configs (meta)."""
    from easyanimate.demo.tiny_model import TRANSFORMER_CONFIG

    demo_config = json.loads((Path(model_dir) / "transformer" / "config.json").read_text())
    configs = {"released V4 (InP)": {}, "demo": demo_config, "tiny": TRANSFORMER_CONFIG}
    rows = []
    for name, config in configs.items():
        with torch.device("meta"):
            model = HunyuanTransformer3DModel(**{k: v for k, v in config.items() if not k.startswith("_")})
        model = model.to(torch.bfloat16)
        report = enable_fp8_weights(model)
        rows.append(dict(model=name, layers=report.layers, bf16_mb=report.bytes_before / 2**20,
                         fp8_mb=report.bytes_after / 2**20, saved=report.saved_fraction))
    return rows


class RecordedCalls:
    """The transformer calls of one 25-step demo text-to-video generation (its ``prepare_conditioning`` call and the
    steps), replayable on another transformer: the conditioning is recomputed by that transformer, so its text
    and time-embedding layers count too."""

    def __init__(self, pipe, steps=(0, 12, 24)):
        transformer, prepared, step_calls = pipe.transformer, [], []

        def prepare_conditioning(*args, **kwargs):  # a method call, not a module call: no forward hook sees it
            prepared.append((args, kwargs, type(transformer).prepare_conditioning(transformer, *args, **kwargs)))
            return prepared[-1][2]

        transformer.prepare_conditioning = prepare_conditioning
        handle = transformer.register_forward_hook(lambda m, a, k, out: step_calls.append((a, k)), with_kwargs=True)
        try:
            pipe(prompt="a red circle moving up", negative_prompt="", height=64, width=64, video_length=16,
                 num_inference_steps=25, guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
        finally:
            handle.remove()
            del transformer.prepare_conditioning
        self.prepare = prepared[0]
        self.steps = [step_calls[i] for i in steps if i < len(step_calls)]

    @torch.no_grad()
    def replay(self, transformer) -> list[torch.Tensor]:
        args, kwargs, recorded = self.prepare
        conditioning = transformer.prepare_conditioning(*args, **kwargs)
        outputs = []
        for args, kwargs in self.steps:
            # the pipeline passes the prepared conditioning, or its CLIP-free variant (early steps)
            mine = conditioning if kwargs["conditioning"] is recorded else conditioning.without_clip()
            outputs.append(transformer(*args, **{**kwargs, "conditioning": mine}).sample)
        return outputs


def relative_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).pow(2).mean() / b.float().pow(2).mean()).sqrt().item()


def granularity_table(model_dir: str) -> list[dict]:
    from easyanimate.pipeline import EasyAnimatePipeline

    pipe = EasyAnimatePipeline.from_pretrained(model_dir, torch_dtype=torch.float32, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    calls = RecordedCalls(pipe)
    reference = pipe.transformer
    expected = calls.replay(reference)
    rows = []
    for granularity in ("channel", "tensor"):
        model = copy.deepcopy(reference)
        enable_fp8_weights(model, granularity)
        squared = [relative_rms(m.dequantized_weight(), reference.get_submodule(n).weight) ** 2
                   for n, m in model.named_modules() if isinstance(m, Fp8Linear)]
        errors = [relative_rms(o, e) for o, e in zip(calls.replay(model), expected)]
        rows.append(dict(granularity=granularity, weight_rel_rms=math.sqrt(sum(squared) / len(squared)),
                         **{f"output_rel_rms_step{s}": e for s, e in zip((0, 12, 24), errors)}))
    return rows


def eval_table(model_dir: str, seeds: list[int], modes: list[str], templates: list[int]) -> tuple[list[dict], dict]:
    from easyanimate.demo.evaluate import EvalSettings, evaluate, summarize
    from easyanimate.demo.shapes import HELD_OUT
    from easyanimate.inference.loading import load_pipeline

    settings = EvalSettings(seeds=tuple(seeds), templates=tuple(templates))
    summaries, rows = {}, []
    for label, memory_mode in (("fp32", "gpu"), ("fp8", "model_cpu_offload_and_fp8")):
        pipe = load_pipeline(model_dir, memory_mode=memory_mode, dtype="float32", device="cpu")
        pipe.set_progress_bar_config(disable=True)
        start = time.time()
        summary = summarize(evaluate(pipe, list(HELD_OUT), settings, modes=tuple(modes)))
        summaries[label] = summary
        for mode, entry in summary.items():
            rows.append(dict(weights=label, mode=mode, en=entry["en"]["overall"], zh=entry["zh"]["overall"],
                             all=entry["all"]["overall"], psnr=entry.get("psnr_mean"),
                             minutes=(time.time() - start) / 60))
    return rows, summaries


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    if not rows:
        return
    keys = list(rows[0])
    print(" | ".join(keys))
    for row in rows:
        print(" | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row.values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--eval", action="store_true", help="also judge the demo model with fp32 and fp8 weights")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--modes", nargs="+", default=["t2v", "i2v", "v2v"], choices=["t2v", "i2v", "v2v"])
    parser.add_argument("--templates", nargs="+", type=int, default=[0],
                        help="caption templates (the README's figures: template 0, as the model card's)")
    parser.add_argument("--skip-granularity", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(min(torch.get_num_threads(), 4))

    results = {"bytes": bytes_table(args.model)}
    print_table("stored transformer bytes (MiB)", results["bytes"])
    if not args.skip_granularity:
        results["granularity"] = granularity_table(args.model)
        print_table("scale granularity on the demo transformer (fp32 compute)", results["granularity"])
    if args.eval:
        results["eval"], results["eval_summaries"] = eval_table(args.model, args.seeds, args.modes, args.templates)
        print_table(f"held-out judged accuracy, seeds {args.seeds}", results["eval"])
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
