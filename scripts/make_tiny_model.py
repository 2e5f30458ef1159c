"""Write a tiny EasyAnimate V4 model folder (released layout, seeded random weights, locally built tokenizers).

    python scripts/make_tiny_model.py OUT_DIR [--seed N] [--overwrite]
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from easyanimate.demo.tiny_model import build_tiny_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path, help="folder to create (must not exist unless --overwrite)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (same seed, same bytes)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it already exists")
    args = parser.parse_args()
    start = time.time()
    try:
        path = build_tiny_model(args.out_dir, seed=args.seed, overwrite=args.overwrite)
    except FileExistsError as exc:
        parser.error(str(exc))
    print(f"wrote {path} in {time.time() - start:.1f}s")


if __name__ == "__main__":
    main()
