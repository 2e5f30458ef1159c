"""Step-cache quality on the demo model: threshold -> (full transformer evaluations, judged accuracy, PSNR of the
cached videos against the uncached ones of the same seed), on the held-out colour/shape/motion combinations, both
languages, every caption template.

    python benchmarks/eval_step_cache.py --steps 25 50 --thresholds 0.05 0.1 0.15 0.2 --seeds 0 1 --json out.json

Prints one table; with ``--json`` every row is also written (and rewritten as rows finish, so a long run that is
stopped keeps what it measured).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from easyanimate.demo.evaluate import EVAL_NEGATIVE_PROMPT, EvalSettings, _verdict_fields, psnr  # noqa: E402
from easyanimate.demo.judge import accuracy  # noqa: E402
from easyanimate.demo.shapes import HELD_OUT, LANGUAGES, VIDEO_TEMPLATES_EN, caption  # noqa: E402
from easyanimate.models.step_cache import RECOMMENDED_SKIP_START_STEPS, StepCacheSettings  # noqa: E402


def prompts() -> list[tuple[str, tuple[str, str, str]]]:
    """Every held-out combination in both languages and every caption template."""
    return [(caption(*combo, language, template), combo) for combo in HELD_OUT for language in LANGUAGES
            for template in range(len(VIDEO_TEMPLATES_EN))]


def generate(pipe, prompt: str, seed: int, steps: int, cache: StepCacheSettings | bool):
    s = EvalSettings()
    out = pipe(prompt, negative_prompt=EVAL_NEGATIVE_PROMPT, height=s.height, width=s.width,
               video_length=s.num_frames, num_inference_steps=steps, guidance_scale=s.guidance,
               generator=torch.Generator().manual_seed(seed), step_cache=cache)
    return out.videos[0], out.transformer_evaluations


def judged(video: torch.Tensor, combo: tuple[str, str, str]) -> dict[str, bool]:
    return _verdict_fields(video, *combo)[1]


def measure(pipe, steps: int, thresholds: list[float], seeds: list[int], skip_start: int, rows: list[dict],
            save) -> None:
    """Append one row per threshold (0 = uncached) for ``steps``."""
    uncached: dict[tuple, torch.Tensor] = {}
    for threshold in [0.0, *thresholds]:
        cache = StepCacheSettings(threshold, skip_start) if threshold else False
        results, evaluations, psnrs, began = [], [], [], time.time()
        for prompt, combo in prompts():
            for seed in seeds:
                video, count = generate(pipe, prompt, seed, steps, cache)
                if len(evaluations) % 12 == 11:
                    print(f"  ... {len(evaluations) + 1} videos at threshold {threshold}", flush=True)
                results.append(judged(video, combo))
                evaluations.append(count)
                if threshold:
                    psnrs.append(psnr(video, uncached[prompt, seed]))
                else:
                    uncached[prompt, seed] = video
        score = accuracy(results)
        rows.append({"steps": steps, "threshold": threshold, "videos": len(results),
                     "evaluations": sum(evaluations) / len(evaluations), "accuracy": score["overall"],
                     "psnr_mean": sum(psnrs) / len(psnrs) if psnrs else None,
                     "psnr_min": min(psnrs) if psnrs else None, "seconds": round(time.time() - began, 1)})
        print(_format(rows[-1]), flush=True)
        save()


def _format(row: dict) -> str:
    psnr_text = "   (reference)   " if row["psnr_mean"] is None else (
        f"{row['psnr_mean']:5.1f} (min {row['psnr_min']:4.1f})")
    return (f"{row['steps']:5d} {row['threshold']:9.2f} {row['evaluations']:11.1f} {row['accuracy']:8.1%} "
            f"{psnr_text} {row['videos']:6d}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/EasyAnimateV4-demo")
    parser.add_argument("--steps", type=int, nargs="+", default=[25, 50])
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.05, 0.1, 0.15, 0.2])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--skip-start", type=int, default=RECOMMENDED_SKIP_START_STEPS)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    from easyanimate.pipeline import EasyAnimatePipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = EasyAnimatePipeline.from_pretrained(args.model, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    rows: list[dict] = []

    def save() -> None:
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=1, default=str) + "\n")

    print(f"{len(prompts())} held-out prompts x {len(args.seeds)} seeds per row; skip_start {args.skip_start}")
    print("steps threshold evaluations accuracy PSNR dB (vs uncached) videos")
    for steps in args.steps:
        measure(pipe, steps, args.thresholds, args.seeds, args.skip_start, rows, save)


if __name__ == "__main__":
    main()
