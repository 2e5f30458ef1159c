"""Judge the demo model on held-out colour x shape x motion combinations, in English and Chinese.

    python scripts/eval_demo.py [--model models/EasyAnimateV4-demo] [--modes t2v i2v v2v] [--seeds 0 1 2 3]
                                [--templates 0 1 2] [--size 64x64] [--steps 25] [--sampler Euler] [--guidance 3]
                                [--dtype float32] [--save-dir DIR] [--json FILE]

By default every caption template of each language and four seeds: what users will see, not one phrasing.
Prints per-attribute (colour, shape, motion) and overall accuracy per mode and language, with the standard error of
the overall figure over prompts (the seeds of one prompt mostly fail together), and for image-to-video (PSNR of the
first frame against the given image) and video-to-video (PSNR against the input at strength 0.3).
Targets: overall >= 90 % in each language on held-out combinations; i2v first frame >= 25 dB.
The held-out combinations are easyanimate/demo/shapes.py HELD_OUT; --split train judges training combinations.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from easyanimate.inference.request import SAMPLER_NAMES  # noqa: E402
from easyanimate.demo.evaluate import EvalSettings, evaluate, record_to_json, summarize  # noqa: E402
from easyanimate.demo.shapes import HELD_OUT, training_combinations  # noqa: E402

DEFAULT_MODEL = "models/EasyAnimateV4-demo"


def _size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH such as 64x64, got {text!r}") from None
    if height % 16 or width % 16 or height <= 0 or width <= 0:
        raise argparse.ArgumentTypeError(f"height and width must be positive multiples of 16, got {text!r}")
    return height, width


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model folder")
    parser.add_argument("--modes", nargs="+", default=["t2v", "i2v", "v2v"], choices=["t2v", "i2v", "v2v"])
    parser.add_argument("--split", choices=["held_out", "train"], default="held_out",
                        help="judge the held-out combinations (default) or the training ones")
    parser.add_argument("--languages", nargs="+", default=["en", "zh"], choices=["en", "zh"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    parser.add_argument("--size", type=_size, default=(64, 64), help="HEIGHTxWIDTH (64x64 or 48x96 were trained)")
    parser.add_argument("--steps", type=int, default=25, help="sampler steps")
    parser.add_argument("--sampler", default="Euler", choices=SAMPLER_NAMES, help="sampler by the original's name")
    parser.add_argument("--guidance", type=float, default=EvalSettings.guidance, help="classifier-free guidance")
    parser.add_argument("--templates", type=int, nargs="+", default=list(EvalSettings.templates),
                        help="caption template numbers (default: all three of each language)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="compute dtype (the model card's figures are float32; bfloat16 judges the CPU bf16 path)")
    parser.add_argument("--save-dir", type=Path, default=None, help="write every generated video here (gif)")
    parser.add_argument("--json", type=Path, default=None, help="write every verdict and the summary here")
    args = parser.parse_args()
    if not Path(args.model).is_dir():
        parser.error(f"model folder not found: {args.model} (train one with scripts/train_demo.sh)")

    from easyanimate.pipeline import EasyAnimatePipeline

    torch.set_num_threads(min(torch.get_num_threads(), 4))
    pipe = EasyAnimatePipeline.from_pretrained(args.model, torch_dtype=getattr(torch, args.dtype), device="cpu",
                                               sampler=args.sampler)
    combos = list(HELD_OUT) if args.split == "held_out" else training_combinations()
    settings = EvalSettings(height=args.size[0], width=args.size[1], steps=args.steps, guidance=args.guidance,
                            seeds=tuple(args.seeds), languages=tuple(args.languages), templates=tuple(args.templates))
    start = time.time()
    records = evaluate(pipe, combos, settings, modes=tuple(args.modes), keep_videos=args.save_dir is not None)
    summary = summarize(records)

    for record in records:
        wrong = [k for k, ok in record.correct.items() if not ok]
        extra = f" psnr={record.psnr:.1f}dB" if record.psnr is not None else ""
        print(f"{record.mode} seed={record.seed} {record.prompt!r}: saw {record.verdict['color']} "
              f"{record.verdict['shape']} {record.verdict['motion']}{extra}" + (f"  WRONG {wrong}" if wrong else ""))
        if args.save_dir is not None:
            from easyanimate.utils.video_io import save_video

            name = f"{record.mode}_{record.color}_{record.shape}_{record.motion}_{record.language}_{record.seed}.gif"
            save_video(record.video, args.save_dir / name, fps=8)
    print(f"\n{len(records)} videos in {time.time() - start:.0f}s ({args.split}, {args.size[0]}x{args.size[1]}, "
          f"{args.steps} {args.sampler} steps, guidance {args.guidance})")
    for mode, entry in summary.items():
        for language in [k for k in entry if k in ("all", "en", "zh")]:
            acc = entry[language]
            spread = f" (+-{acc['overall_se']:.1%} over prompts)" if acc["overall_se"] is not None else ""
            print(f"{mode:4s} {language:3s} overall {acc['overall']:.1%}{spread}  "
                  + "  ".join(f"{k} {v:.1%}" for k, v in acc.items() if not k.startswith("overall")))
        if "psnr_mean" in entry:
            print(f"{mode:4s} PSNR mean {entry['psnr_mean']:.1f} dB, min {entry['psnr_min']:.1f} dB")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        settings_json = {**vars(settings), "sampler": args.sampler, "dtype": args.dtype}
        args.json.write_text(json.dumps({"summary": summary, "settings": settings_json,
                                         "records": [record_to_json(r) for r in records]},
                                        indent=1, ensure_ascii=False, default=str) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
