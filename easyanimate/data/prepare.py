"""Raw videos -> training clips: the first stage of the original's data toolkit.

Each video is cut at its scene changes (PySceneDetect's content detector); scenes shorter than ``min_seconds`` are
dropped, longer than ``max_seconds`` cut into equal pieces of at most that length, and videos below ``min_pixels``
skipped. Every piece is re-encoded to its own mp4 (H.264, frame-accurate cuts, no audio) and listed in a
``metadata.json`` in the training format with an empty caption, ready for captions and ``scripts/check_dataset.py``.
With ``min_motion``, clips that hardly move are left out (:func:`motion_score`, the original's optical-flow filter
of its second stage). Its caption rewrite by a language model is :mod:`easyanimate.data.captions`; its other stages
(aesthetic and OCR filters, VILA captions) need model weights and are not part of this project.

Re-running the same command skips the clips already written and rewrites the metadata; every clip is encoded
under a temporary name and renamed when complete, so an interrupted run never leaves a truncated clip behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..utils.atomic import write_text_atomic
from ..utils.video_io import VIDEO_SUFFIXES

logger = logging.getLogger(__name__)

METADATA_NAME = "metadata.json"
CLIPS_FOLDER = "clips"


@dataclass(frozen=True)
class SplitSettings:
    """Which scenes become clips (the original's defaults: 3-10 s, at least 512 x 512 pixels)."""

    min_seconds: float = 3.0
    max_seconds: float = 10.0
    min_pixels: int = 512 * 512
    threshold: float = 27.0  # PySceneDetect ContentDetector: larger finds fewer cuts
    crf: int = 18  # H.264 quality of the written clips (lower is better, larger files)
    min_motion: float | None = None  # drop clips whose motion_score is lower (None: keep all)

    def __post_init__(self):
        if not 0 < self.min_seconds <= self.max_seconds:
            raise ValueError(f"need 0 < min_seconds <= max_seconds, got {self.min_seconds} and {self.max_seconds}")
        if self.min_pixels < 0 or self.threshold <= 0:
            raise ValueError("min_pixels must be >= 0 and threshold > 0")


@dataclass
class SplitReport:
    """What a run did: clips written (or found from an earlier run), and the videos it skipped and why."""

    clips: int = 0
    reused: int = 0
    static: int = 0  # clips left out of the metadata for moving less than min_motion
    videos: int = 0
    skipped: dict[str, str] | None = None

    def summary(self) -> str:
        skipped = self.skipped or {}
        lines = [f"{self.videos} videos -> {self.clips} clips ({self.reused} already there, {self.static} left out as "
                 f"static), {len(skipped)} videos skipped"]
        lines += [f"  skipped {path}: {why}" for path, why in sorted(skipped.items())]
        return "\n".join(lines)


def scene_pieces(start: float, end: float, settings: SplitSettings) -> list[tuple[float, float]]:
    """The clips cut from one scene ``[start, end)`` seconds: none when it is shorter than ``min_seconds``, else
    equal pieces of at most ``max_seconds`` (pieces that come out shorter than ``min_seconds`` are dropped)."""
    duration = end - start
    if duration < settings.min_seconds:
        return []
    count = math.ceil(duration / settings.max_seconds - 1e-9)
    length = duration / count
    if length < settings.min_seconds:
        return []
    return [(start + i * length, start + (i + 1) * length) for i in range(count)]


MOTION_FPS = 2  # frame pairs half a second apart
MOTION_SIDE = 256  # short side the flow is computed at, so scores do not depend on the resolution


def motion_score(path: str | os.PathLike) -> float:
    """How much a clip moves: the mean optical-flow magnitude (OpenCV Farneback, grey frames scaled to a 256-px
    short side) between frames half a second apart, in pixels. A still shot scores about 0; a slow pan of a few
    percent of the frame per second scores a few pixels."""
    import cv2
    from decord import VideoReader, cpu

    reader = VideoReader(str(path), ctx=cpu(0))
    step = max(1, round(reader.get_avg_fps() / MOTION_FPS))
    indices = list(range(0, len(reader), step))
    if len(indices) < 2:
        return 0.0
    frames = reader.get_batch(indices).asnumpy()
    height, width = frames.shape[1:3]
    scale = MOTION_SIDE / min(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    grey = [cv2.resize(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), size, interpolation=cv2.INTER_AREA) for f in frames]
    magnitudes = []
    for before, after in zip(grey, grey[1:]):
        flow = cv2.calcOpticalFlowFarneback(before, after, None, 0.5, 3, 15, 3, 5, 1.2, 0)
        magnitudes.append(float(np.linalg.norm(flow, axis=-1).mean()))
    return float(np.mean(magnitudes))


def find_videos(inputs: list[str | os.PathLike]) -> list[Path]:
    """Video files among ``inputs`` (files, or folders searched recursively), sorted, each once."""
    found = set()
    for item in map(Path, inputs):
        if item.is_dir():
            found.update(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
        elif item.is_file():
            found.add(item)
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")
    return sorted(found)


def _detect_scenes(path: Path, threshold: float) -> tuple[list[tuple[float, float]], int, int]:
    """Scenes as ``(start, end)`` seconds, and the frame width and height."""
    from scenedetect import ContentDetector, detect, open_video

    video = open_video(str(path))
    width, height = video.frame_size
    scenes = detect(str(path), ContentDetector(threshold=threshold), start_in_scene=True)
    return [(s.seconds, e.seconds) for s, e in scenes], int(width), int(height)


def _cut(ffmpeg: str, source: Path, start: float, end: float, target: Path, crf: int) -> None:
    """Re-encode ``[start, end)`` seconds of ``source`` to ``target`` (H.264, no audio), written under a temporary
    name and renamed when complete; raises RuntimeError with ffmpeg's message when it fails."""
    partial = target.with_name(f".{target.stem}.partial{target.suffix}")
    command = [
        ffmpeg, "-nostdin", "-loglevel", "error", "-y", "-ss", f"{start:.3f}", "-i", str(source),
        "-t", f"{end - start:.3f}", "-map", "0:v:0", "-an", "-vf", "scale=trunc(iw/2)*2:trunc(ih/2)*2",  # even sides
        "-c:v", "libx264", "-preset", "veryfast",
        "-crf", str(crf), "-pix_fmt", "yuv420p", str(partial),
    ]
    try:
        subprocess.run(command, check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as exc:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"ffmpeg could not cut {source} at {start:.2f}-{end:.2f} s: {exc.stderr.strip()}") from exc
    os.replace(partial, target)


def split_videos(inputs: list[str | os.PathLike], out_dir: str | os.PathLike, settings: SplitSettings = SplitSettings(),
                 *, progress: bool = True) -> tuple[Path, SplitReport]:
    """Cut every video of ``inputs`` into clips under ``out_dir/clips`` and write ``out_dir/metadata.json``;
    returns its path and the :class:`SplitReport`. Unreadable and too-small videos are skipped and reported."""
    from imageio_ffmpeg import get_ffmpeg_exe
    from tqdm.auto import tqdm

    videos = find_videos(inputs)
    out_dir = Path(out_dir)
    (out_dir / CLIPS_FOLDER).mkdir(parents=True, exist_ok=True)
    ffmpeg = get_ffmpeg_exe()
    report = SplitReport(videos=len(videos), skipped={})
    rows = []
    for video in tqdm(videos, desc="videos", unit="video", disable=not progress):
        try:
            scenes, width, height = _detect_scenes(video, settings.threshold)
        except Exception as exc:  # OpenCV / PySceneDetect raise several types for unreadable files
            report.skipped[str(video)] = f"unreadable ({type(exc).__name__}: {exc})"
            logger.warning("skipping %s: unreadable (%s)", video, exc)
            continue
        if width * height < settings.min_pixels:
            report.skipped[str(video)] = f"{width}x{height} is below min_pixels={settings.min_pixels}"
            continue
        # the source's path keys the names, so two videos called clip.mp4 in different folders never collide
        tag = hashlib.sha1(str(video.resolve()).encode()).hexdigest()[:8]
        pieces = [p for start, end in scenes for p in scene_pieces(start, end, settings)]
        for number, (start, end) in enumerate(pieces):
            name = f"{CLIPS_FOLDER}/{video.stem}-{tag}-{number:03d}.mp4"
            target = out_dir / name
            if target.is_file():
                report.reused += 1
            else:
                _cut(ffmpeg, video, start, end, target, settings.crf)
            row = {"file_path": name, "text": "", "type": "video", "width": width - width % 2,
                   "height": height - height % 2, "source": str(video), "start_seconds": round(start, 3),
                   "end_seconds": round(end, 3)}
            if settings.min_motion is not None:
                row["motion_score"] = round(motion_score(target), 3)
                if row["motion_score"] < settings.min_motion:
                    report.static += 1
                    continue  # the file stays, so a re-run with another threshold need not cut it again
            report.clips += 1
            rows.append(row)
    metadata = write_text_atomic(out_dir / METADATA_NAME, json.dumps(rows, ensure_ascii=False, indent=1) + "\n")
    return metadata, report
