"""scripts/split_videos.py and easyanimate.data.prepare: raw videos cut at their scene changes into clips of
min..max seconds, with a metadata.json that training reads."""

import json
import subprocess
import sys
from pathlib import Path

import imageio
import numpy as np
import pytest
import torch

from easyanimate.data.metadata import load_metadata
from easyanimate.data.prepare import SplitSettings, motion_score, scene_pieces, split_videos
from easyanimate.utils.video_io import read_video

REPO = Path(__file__).resolve().parents[1]
FPS = 8
RED, BLUE, GREEN = (200, 30, 30), (20, 20, 110), (40, 220, 40)  # hue and brightness change at each cut


def write_scenes(path: Path, scenes, height=64, width=96) -> Path:
    """One flat colour per scene with a small white bar moving across it, ``seconds`` long at 8 fps."""
    frames = []
    for colour, seconds in scenes:
        for t in range(round(seconds * FPS)):
            frame = np.empty((height, width, 3), np.uint8)
            frame[:] = colour
            x = (3 * t) % (width - 4)
            frame[height // 2 - 2 : height // 2 + 2, x : x + 4] = 255
            frames.append(frame)
    imageio.mimwrite(path, frames, fps=FPS, codec="libx264", pixelformat="yuv420p", macro_block_size=16,
                     output_params=["-crf", "12"])
    return path


def test_scene_pieces():
    s = SplitSettings(min_seconds=3, max_seconds=10)
    assert scene_pieces(0, 2.9, s) == []
    assert scene_pieces(5, 9, s) == [(5, 9)]
    assert np.allclose(scene_pieces(0, 25, s), [(0, 25 / 3), (25 / 3, 50 / 3), (50 / 3, 25)])
    assert scene_pieces(0, 11, SplitSettings(min_seconds=6, max_seconds=10)) == []  # two 5.5 s pieces: too short
    with pytest.raises(ValueError, match="min_seconds <= max_seconds"):
        SplitSettings(min_seconds=5, max_seconds=4)


def _mean_colour(frame: torch.Tensor) -> np.ndarray:
    return (frame.reshape(3, -1).median(dim=1).values * 255).numpy()


def test_videos_are_cut_at_scene_changes_into_clips_training_can_read(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    write_scenes(raw / "film.mp4", [(RED, 4), (BLUE, 25), (GREEN, 2)])
    out = tmp_path / "clips"
    settings = SplitSettings(min_pixels=0)
    metadata, report = split_videos([raw], out, settings, progress=False)
    assert (report.clips, report.reused, report.skipped) == (4, 0, {})

    rows = json.loads(metadata.read_text())
    entries = load_metadata(metadata, out)
    assert len(entries) == 4 and all(e["type"] == "video" and e["text"] == "" for e in entries)
    assert [(r["width"], r["height"]) for r in rows] == [(96, 64)] * 4
    # the red scene whole (4 s), the 25 s blue scene in three 8.3 s pieces, the 2 s green scene dropped
    assert [r["end_seconds"] - r["start_seconds"] for r in rows] == pytest.approx([4, 25 / 3, 25 / 3, 25 / 3], abs=0.2)
    for row, colour in zip(rows, [RED, BLUE, BLUE, BLUE]):
        clip = read_video(out / row["file_path"])
        expected = (row["end_seconds"] - row["start_seconds"]) * FPS
        assert abs(clip.shape[1] - expected) <= 2, (row, clip.shape)
        for frame in (clip[:, 0], clip[:, -1]):  # no frame of the neighbouring scene at either end
            assert np.abs(_mean_colour(frame) - colour).max() < 25, (row, _mean_colour(frame))

    before = {p.name: p.stat().st_mtime_ns for p in (out / "clips").iterdir()}
    metadata, again = split_videos([raw / "film.mp4"], out, settings, progress=False)
    assert (again.clips, again.reused) == (4, 4)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "clips").iterdir()} == before  # nothing re-encoded
    assert json.loads(metadata.read_text()) == rows


def test_small_and_unreadable_videos_are_skipped_and_reported(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    write_scenes(raw / "small.mp4", [(RED, 4)])
    (raw / "broken.mp4").write_bytes(b"not a video")
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "split_videos.py"), str(raw), str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    assert "2 videos -> 0 clips" in result.stdout
    assert "96x64 is below min_pixels=262144" in result.stdout and "broken.mp4: unreadable" in result.stdout
    assert json.loads((tmp_path / "out" / "metadata.json").read_text()) == []
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "split_videos.py"), str(tmp_path / "none"),
                             str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "no such file or folder" in result.stderr


def write_pan(path: Path, seconds: float, pixels_per_frame: int, height=64, width=96) -> Path:
    """A smooth random texture sliding sideways by ``pixels_per_frame`` (0: a still shot)."""
    rng = np.random.default_rng(0)
    texture = rng.random((height, 4 * width))
    for axis in (0, 1):  # blur, so the optical flow has gradients to follow
        for _ in range(3):
            texture = (texture + np.roll(texture, 1, axis) + np.roll(texture, -1, axis)) / 3
    texture = ((texture - texture.min()) / np.ptp(texture) * 200 + 20).astype(np.uint8)
    frames = [np.repeat(texture[:, x : x + width, None], 3, axis=2)
              for x in (pixels_per_frame * t for t in range(round(seconds * FPS)))]
    imageio.mimwrite(path, frames, fps=FPS, codec="libx264", pixelformat="yuv420p", macro_block_size=16,
                     output_params=["-crf", "12"])
    return path


def test_motion_score_and_the_static_clip_filter(tmp_path):
    """A still shot scores ~0; a pan of 1 px per frame at 96x64 is 4 px per half second, 16 px at the 256-px scale
    the score is measured at; --min_motion leaves the still shot out of the metadata."""
    raw = tmp_path / "raw"
    raw.mkdir()
    still, pan = write_pan(raw / "still.mp4", 4, 0), write_pan(raw / "pan.mp4", 4, 1)
    assert motion_score(still) < 0.2
    assert 10 < motion_score(pan) < 20
    metadata, report = split_videos([raw], tmp_path / "out", SplitSettings(min_pixels=0, min_motion=2.0),
                                    progress=False)
    rows = json.loads(metadata.read_text())
    assert (report.clips, report.static) == (1, 1) and "static" in report.summary()
    assert [Path(r["source"]).name for r in rows] == ["pan.mp4"] and rows[0]["motion_score"] > 10
