"""Judging a demo model: generate videos for held-out prompts and score them with the analytic judge.

* text-to-video: one video per (combination, language, seed); colour, shape and motion judged against the prompt;
* image-to-video: the first frame of a rendered held-out clip plus its caption; PSNR of the generated first
  frame against the given image, and the generated clip judged like a text-to-video one;
* video-to-video: a rendered held-out clip at ``strength`` 0.3 with its caption; PSNR against the input.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .examples import DEMO_DEFAULTS
from .judge import accuracy, judge_frames
from .shapes import HELD_OUT, NUM_FRAMES, caption, random_clip, render_clip

EVAL_NEGATIVE_PROMPT = DEMO_DEFAULTS.negative_prompt


@dataclass
class EvalSettings:
    """How videos are generated for judging (defaults: the demo's recommended settings)."""

    height: int = DEMO_DEFAULTS.height
    width: int = DEMO_DEFAULTS.width
    num_frames: int = DEMO_DEFAULTS.frames
    steps: int = DEMO_DEFAULTS.steps
    guidance: float = DEMO_DEFAULTS.guidance_scale
    seeds: tuple[int, ...] = (0,)
    languages: tuple[str, ...] = ("en", "zh")
    templates: tuple[int, ...] = (0, 1, 2)  # caption templates (each language has three); every one by default
    v2v_strength: float = 0.3


@dataclass
class EvalRecord:
    mode: str
    prompt: str
    language: str
    seed: int
    color: str
    shape: str
    motion: str
    verdict: dict
    correct: dict
    psnr: float | None = None
    seconds: float = 0.0
    video: torch.Tensor | None = field(default=None, repr=False)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two tensors in [0, 1]."""
    mse = float(torch.mean((a.float() - b.float()) ** 2))
    return float("inf") if mse == 0 else 10 * float(np.log10(1.0 / mse))


def _verdict_fields(video: torch.Tensor, color: str, shape: str, motion: str) -> tuple[dict, dict]:
    verdict = judge_frames(video)
    summary = {"color": verdict.color, "shape": verdict.shape, "motion": verdict.motion,
               "displacement": [round(v, 1) for v in verdict.displacement], "fill": round(verdict.fill, 3)}
    return summary, verdict.score(color, shape, motion)


def reference_clip(color: str, shape: str, motion: str, height: int, width: int, seed: int,
                   num_frames: int = NUM_FRAMES) -> torch.Tensor:
    """A rendered ground-truth clip (3, F, H, W) in [0, 1] (conditioning of image/video-to-video)."""
    clip = random_clip(color, shape, motion, height, width, np.random.default_rng(10_000 + seed), num_frames)
    return torch.from_numpy(render_clip(clip)).permute(3, 0, 1, 2).float() / 255.0


def evaluate(pipe, combinations=HELD_OUT, settings: EvalSettings = EvalSettings(), modes=("t2v",),
             keep_videos: bool = False, progress: bool = True) -> list[EvalRecord]:
    """Generate and judge every (mode, combination, language, seed)."""
    from PIL import Image
    from tqdm.auto import tqdm

    s = settings
    jobs = [(m, c, lang, template, seed) for m in modes for c in combinations for lang in s.languages
            for template in s.templates for seed in s.seeds]
    records = []
    for mode, (color, shape, motion), language, template, seed in tqdm(jobs, desc="judging", disable=not progress):
        prompt = caption(color, shape, motion, language, template)
        kwargs = dict(prompt=prompt, negative_prompt=EVAL_NEGATIVE_PROMPT, height=s.height, width=s.width,
                      video_length=s.num_frames, num_inference_steps=s.steps, guidance_scale=s.guidance,
                      generator=torch.Generator().manual_seed(seed))
        reference = None
        if mode == "i2v":
            reference = reference_clip(color, shape, motion, s.height, s.width, seed, s.num_frames)
            first = (reference[:, 0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
            kwargs["image"] = Image.fromarray(first)
        elif mode == "v2v":
            reference = reference_clip(color, shape, motion, s.height, s.width, seed, s.num_frames)
            kwargs.update(video=reference[None], strength=s.v2v_strength)
        elif mode != "t2v":
            raise ValueError(f"unknown mode {mode!r}; expected t2v, i2v or v2v")
        start = time.perf_counter()
        with torch.no_grad():
            video = pipe(**kwargs).videos[0].float().cpu()  # (3, F, H, W) in [0, 1]
        seconds = time.perf_counter() - start
        verdict, correct = _verdict_fields(video, color, shape, motion)
        value = None
        if mode == "i2v":
            value = psnr(video[:, 0], reference[:, 0])
        elif mode == "v2v":
            value = psnr(video, reference)
        records.append(EvalRecord(mode, prompt, language, seed, color, shape, motion, verdict, correct, value,
                                  seconds, video if keep_videos else None))
    return records


def prompt_standard_error(records: list[EvalRecord]) -> float | None:
    """Standard error of the overall accuracy of ``records``, with the prompts as the samples: the seeds of one
    prompt mostly fail together (a held-out pairing the model ties to a trained one is wrong at every seed), so
    more seeds add little certainty, more prompts add much. None for fewer than two prompts."""
    by_prompt: dict[str, list[bool]] = {}
    for record in records:
        by_prompt.setdefault(record.prompt, []).extend(record.correct.values())
    means = [float(np.mean(v)) for v in by_prompt.values()]
    return float(np.std(means, ddof=1) / np.sqrt(len(means))) if len(means) > 1 else None


def summarize(records: list[EvalRecord]) -> dict:
    """Accuracy per mode and language (and all languages) with its standard error over prompts
    (``overall_se``), mean PSNR of i2v / v2v."""
    summary = {}
    for mode in sorted({r.mode for r in records}):
        of_mode = [r for r in records if r.mode == mode]
        groups = {"all": of_mode}
        for language in sorted({r.language for r in of_mode}):
            groups[language] = [r for r in of_mode if r.language == language]
        entry = {name: {**accuracy([r.correct for r in group]), "overall_se": prompt_standard_error(group)}
                 for name, group in groups.items()}
        values = [r.psnr for r in of_mode if r.psnr is not None]
        if values:
            entry["psnr_mean"] = float(np.mean(values))
            entry["psnr_min"] = float(np.min(values))
        entry["seconds_mean"] = float(np.mean([r.seconds for r in of_mode]))
        summary[mode] = entry
    return summary


def record_to_json(record: EvalRecord) -> dict:
    data = asdict(record)
    data.pop("video")
    return data
