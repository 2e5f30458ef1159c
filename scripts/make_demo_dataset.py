"""Write the synthetic bilingual shapes dataset of the demo model (videos + images + metadata.json).

    python scripts/make_demo_dataset.py OUT_DIR [--videos-per-combination 6] [--images-per-combination 4]

The held-out colour x shape x motion combinations (never written, used only by scripts/eval_demo.py) are listed in
easyanimate/demo/shapes.py (HELD_OUT) and copied to OUT_DIR/held_out.json.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from easyanimate.demo.dataset import make_dataset  # noqa: E402
from easyanimate.demo.shapes import HELD_OUT  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path, help="folder to create (must not exist unless --overwrite)")
    parser.add_argument("--videos-per-combination", type=int, default=6, help="clips per combination and size")
    parser.add_argument("--images-per-combination", type=int, default=4, help="still images per colour x shape")
    parser.add_argument("--vae-images-per-combination", type=int, default=100,
                        help="extra still images per colour x shape listed only in metadata_vae.json (VAE training)")
    parser.add_argument("--max-combinations", type=int, default=None,
                        help="keep only this many training combinations (a small dataset for smoke tests)")
    parser.add_argument("--seed", type=int, default=0, help="seed of positions, sizes and speeds")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    args = parser.parse_args()
    if args.videos_per_combination < 1 or args.images_per_combination < 0:
        parser.error("--videos-per-combination must be >= 1 and --images-per-combination >= 0")
    start = time.time()
    try:
        meta = make_dataset(args.out_dir, args.videos_per_combination, args.images_per_combination, args.seed,
                            vae_images_per_combination=args.vae_images_per_combination,
                            max_combinations=args.max_combinations, overwrite=args.overwrite)
    except FileExistsError as exc:
        parser.error(str(exc))
    print(f"wrote {meta} in {time.time() - start:.1f}s; held out: "
          + ", ".join(" ".join(c) for c in HELD_OUT))


if __name__ == "__main__":
    main()
