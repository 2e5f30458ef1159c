"""Generation time of the demo model on the CPU: 16 frames, 25 steps, the way README's command runs it.

    python -m benchmarks.bench_demo                      # models/EasyAnimateV4-demo, 64x64 and 48x96
    python -m benchmarks.bench_demo --threads 1 2 --repeats 3 --guidance 1

Prints, per size and thread count: model load seconds (once), then the median over ``--repeats`` of the whole
text-to-video call and of its parts (text encoders, denoising loop, VAE decode, measured with hooks on the
components), plus image-to-video. On a shared CPU the figures are noisy; the median of a few repeats helps.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from easyanimate.demo.evaluate import EvalSettings

DEFAULT_MODEL = "models/EasyAnimateV4-demo"


class _Timer:
    """Accumulates the wall time spent inside the named methods of an object (wrapped in place)."""

    def __init__(self, obj, *methods: str):
        self.total = 0.0
        for name in methods:
            setattr(obj, name, self._wrap(getattr(obj, name)))

    def _wrap(self, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.total += time.perf_counter() - start
        return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--sizes", nargs="+", default=["64x64", "48x96"], help="HEIGHTxWIDTH")
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=EvalSettings.guidance,
                        help="> 1 runs the transformer twice per step (default: the demo's recommended guidance)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not Path(args.model).is_dir():
        parser.error(f"model folder not found: {args.model}")

    from PIL import Image

    from easyanimate.demo.evaluate import reference_clip
    from easyanimate.pipeline import EasyAnimatePipeline

    start = time.perf_counter()
    pipe = EasyAnimatePipeline.from_pretrained(args.model, device="cpu")
    load = time.perf_counter() - start
    pipe.set_progress_bar_config(disable=True)
    timers = {"text": [_Timer(pipe.text_encoder, "forward"), _Timer(pipe.text_encoder_2, "forward")],
              "transformer": [_Timer(pipe.transformer, "forward")], "vae": [_Timer(pipe.vae, "encode", "decode")]}
    print(f"model {args.model}: loaded in {load:.2f}s; {args.frames} frames, {args.steps} steps, "
          f"guidance {args.guidance}, median of {args.repeats}")
    print(f"{'size':>7s} {'thr':>3s} {'mode':>4s} {'total s':>8s} {'text s':>7s} {'denoise s':>9s} {'vae s':>6s}")
    for size in args.sizes:
        height, width = (int(v) for v in size.split("x"))
        first = reference_clip("red", "circle", "right", height, width, seed=0)[:, 0]
        image = Image.fromarray((first.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())
        for threads in args.threads:
            torch.set_num_threads(threads)
            for mode in ("t2v", "i2v"):
                rows = []
                for repeat in range(args.repeats + 1):  # the first call warms up and is not counted
                    for group in timers.values():
                        for timer in group:
                            timer.total = 0.0
                    kwargs = dict(image=image) if mode == "i2v" else {}
                    start = time.perf_counter()
                    pipe("a red circle moving to the right", height=height, width=width, video_length=args.frames,
                         num_inference_steps=args.steps, guidance_scale=args.guidance,
                         generator=torch.Generator().manual_seed(repeat), **kwargs)
                    total = time.perf_counter() - start
                    if repeat:
                        rows.append([total] + [sum(t.total for t in timers[k]) for k in ("text", "transformer", "vae")])
                med = [statistics.median(col) for col in np.asarray(rows).T]
                print(f"{size:>7s} {threads:>3d} {mode:>4s} {med[0]:8.2f} {med[1]:7.2f} {med[2]:9.2f} {med[3]:6.2f}")


if __name__ == "__main__":
    main()
