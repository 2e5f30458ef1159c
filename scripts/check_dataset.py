#!/usr/bin/env python
"""List every training entry that cannot be read (missing, corrupt, too short), before training starts.

    python scripts/check_dataset.py datasets/internal_datasets/metadata.json --data_root datasets/internal_datasets
    python scripts/check_dataset.py META.csv --write_clean clean.json   # readable entries only, with width/height

Exit status 1 when any entry is unreadable.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from easyanimate.data.dataset import DataConfig, check_entries  # noqa: E402
from easyanimate.data.metadata import MetadataError, load_metadata  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metadata", help="JSON / JSON-lines / CSV metadata file")
    parser.add_argument("--data_root", default=None, help="folder the relative file paths are relative to")
    parser.add_argument("--video_sample_n_frames", type=int, default=144)
    parser.add_argument("--video_sample_stride", type=int, default=1)
    parser.add_argument("--write_clean", default=None,
                        help="write the readable entries (with width/height filled in) to this JSON file")
    args = parser.parse_args()
    try:
        entries = load_metadata(args.metadata, args.data_root)
    except MetadataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    config = DataConfig(video_sample_n_frames=args.video_sample_n_frames, video_sample_stride=args.video_sample_stride)
    problems, sizes = check_entries(entries, config)
    for index, path, error in problems:
        print(f"UNREADABLE entry {index}: {path}: {error}")
    print(f"{len(entries) - len(problems)} of {len(entries)} entries readable, {len(problems)} unreadable")
    if args.write_clean:
        clean = [dict(entry, height=size[0], width=size[1]) for entry, size in zip(entries, sizes) if size]
        Path(args.write_clean).write_text(json.dumps(clean, ensure_ascii=False, indent=1))
        print(f"wrote {len(clean)} entries to {args.write_clean}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
