#!/usr/bin/env python
"""Cut raw videos into training clips at their scene changes (3-10 s, at least 512x512 by default) and write a
metadata.json with empty captions; then caption the clips and check them with scripts/check_dataset.py.

    python scripts/split_videos.py raw_videos/ datasets/my_clips
    python scripts/split_videos.py a.mp4 b.mp4 datasets/my_clips --min_seconds 2 --max_seconds 6 --min_pixels 0
    python scripts/split_videos.py raw_videos/ datasets/my_clips --min_motion 2      # leave out still shots

Re-running continues where an interrupted run stopped. Exit status 1 when a video had to be skipped as unreadable.
"""

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from easyanimate.data.prepare import SplitSettings, split_videos  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="video files and/or folders (searched recursively)")
    parser.add_argument("out_dir", help="folder for clips/ and metadata.json")
    defaults = SplitSettings()
    parser.add_argument("--min_seconds", type=float, default=defaults.min_seconds, help="shorter scenes are dropped")
    parser.add_argument("--max_seconds", type=float, default=defaults.max_seconds,
                        help="longer scenes are cut into equal pieces of at most this length")
    parser.add_argument("--min_pixels", type=int, default=defaults.min_pixels,
                        help="videos with fewer pixels per frame (width x height) are skipped")
    parser.add_argument("--threshold", type=float, default=defaults.threshold,
                        help="scene-cut sensitivity (PySceneDetect ContentDetector; larger finds fewer cuts)")
    parser.add_argument("--crf", type=int, default=defaults.crf, help="H.264 quality of the clips (lower: better)")
    parser.add_argument("--min_motion", type=float, default=None,
                        help="leave out clips whose motion score (mean optical flow in pixels, half a second apart, "
                             "at a 256-px short side) is lower; recorded as motion_score in the metadata")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        settings = SplitSettings(args.min_seconds, args.max_seconds, args.min_pixels, args.threshold, args.crf,
                                 args.min_motion)
        metadata, report = split_videos(args.inputs, args.out_dir, settings)
    except (ValueError, FileNotFoundError) as exc:
        parser.error(str(exc))
    print(report.summary())
    print(f"metadata: {metadata}")
    return 1 if any(why.startswith("unreadable") for why in report.skipped.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
