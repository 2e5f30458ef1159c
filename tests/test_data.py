"""Metadata parsing, video/image reading, broken-file handling and scripts/check_dataset.py."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import imageio
import numpy as np
import pytest
import torch
from PIL import Image

from easyanimate.data.dataset import (
    DataConfig, DataError, DataHealth, SampleRef, VideoImageDataset, compose_entries, frame_indices,
)
from easyanimate.data.metadata import MetadataError, load_metadata

REPO = Path(__file__).resolve().parents[1]


def write_video(path, frames):
    imageio.mimwrite(path, frames, fps=8, macro_block_size=1)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    # frame i has brightness 6*i so decoded frames reveal their index
    ramp = np.stack([np.full((48, 80, 3), 6 * i, np.uint8) for i in range(40)])
    write_video(root / "ramp.mp4", ramp)
    write_video(root / "short.mp4", ramp[:1])
    Image.fromarray(np.full((30, 60, 3), 200, np.uint8)).save(root / "wide.png")
    (root / "corrupt.mp4").write_bytes(b"\x00" * 100)
    (root / "corrupt.jpg").write_bytes(b"not a jpeg")
    return root


def test_load_metadata_json_and_csv(tmp_path):
    rows = [
        {"file_path": "a.mp4", "text": "a cat", "type": "video"},
        {"file_path": "/abs/b.jpg", "text": "", "width": 640, "height": 480},
        {"file_path": "c.mp4", "text": "untyped video"},
    ]
    (tmp_path / "m.json").write_text(json.dumps(rows))
    entries = load_metadata(tmp_path / "m.json", data_root="/data")
    assert [e["file_path"] for e in entries] == ["/data/a.mp4", "/abs/b.jpg", "/data/c.mp4"]
    assert [e["type"] for e in entries] == ["video", "image", "video"]
    assert entries[1]["width"] == 640 and entries[1]["height"] == 480 and entries[1]["text"] == ""
    assert load_metadata(tmp_path / "m.json")[0]["file_path"] == "a.mp4"

    with open(tmp_path / "m.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["file_path", "text", "type", "width", "height"])
        writer.writeheader()
        writer.writerow({"file_path": "x.png", "text": "hi", "type": "image", "width": "", "height": ""})
        writer.writerow({"file_path": "y.mp4", "text": "yo", "type": "video", "width": "320", "height": "240"})
    entries = load_metadata(tmp_path / "m.csv", data_root=str(tmp_path))
    assert entries[0] == {"file_path": str(tmp_path / "x.png"), "text": "hi", "type": "image"}
    assert (entries[1]["width"], entries[1]["height"]) == (320, 240)


@pytest.mark.parametrize(
    "content,suffix,message",
    [
        ('[{"text": "no path"}]', ".json", "entry 0: missing or empty 'file_path'"),
        ('[{"file_path": "a.mp4"}]', ".json", "missing 'text'"),
        ('[{"file_path": "a.mp4", "text": "x", "type": "audio"}]', ".json", "'type' must be 'image' or 'video'"),
        ('[{"file_path": "a.mp4", "text": "x", "width": -3, "height": 4}]', ".json", "'width' must be a positive"),
        ('{"file_path": "a.mp4"}', ".json", "must hold a list"),
        ("[{", ".json", "not valid JSON"),
        ("path,text\na,b\n", ".csv", "CSV header must name"),
        ("file_path,text\na.mp4,x\n,y\n", ".csv", "line 3: missing or empty 'file_path'"),
        ("[]", ".json", "has no entries"),
        ("x", ".txt", "unknown metadata format"),
    ],
)
def test_malformed_metadata_is_reported_with_row(tmp_path, content, suffix, message):
    path = tmp_path / f"meta{suffix}"
    path.write_text(content)
    with pytest.raises(MetadataError, match=message.replace("(", r"\(")):
        load_metadata(path)


def test_missing_metadata_file(tmp_path):
    with pytest.raises(MetadataError, match="not found"):
        load_metadata(tmp_path / "nope.json")


def test_frame_window_and_stride():
    cfg = DataConfig(video_sample_n_frames=8, video_sample_stride=3)
    for seed in range(20):
        idx = frame_indices(100, cfg, np.random.default_rng(seed))
        assert len(idx) == 8 and np.all(np.diff(idx) == 3)
        assert idx[0] >= 9 and idx[-1] < 90  # inside the 10 %..90 % window
    spread = frame_indices(20, DataConfig(video_sample_n_frames=16, video_sample_stride=4), np.random.default_rng(0))
    assert len(spread) == 16 and spread[-1] < 18  # clip does not fit: frames spread over the usable 18
    with pytest.raises(ValueError, match="too short"):
        frame_indices(1, cfg, np.random.default_rng(0))


def test_dataset_reads_video_and_image(media):
    entries = [
        {"file_path": str(media / "ramp.mp4"), "text": "ramp", "type": "video"},
        {"file_path": str(media / "wide.png"), "text": "wide", "type": "image"},
    ]
    cfg = DataConfig(image_sample_size=32, video_sample_size=32, token_sample_size=32, video_sample_n_frames=8,
                     video_sample_stride=2)
    ds = VideoImageDataset(entries, cfg, seed=0)
    video = ds[SampleRef(0, 0, 5)]
    # short side 48 -> 32 (never larger than the largest sample size), aspect kept
    assert video["pixels"].shape == (8, 32, 53, 3) and video["pixels"].dtype == torch.uint8
    brightness = video["pixels"].float().mean((1, 2, 3)) / 6
    steps = torch.diff(brightness)
    assert torch.all((steps > 1.5) & (steps < 2.5)), brightness  # stride 2
    assert brightness[0] > 2.5 and brightness[-1] < 36.5  # first index >= int(0.1 * 36), last < 36
    assert torch.equal(ds[SampleRef(0, 0, 5)]["pixels"], video["pixels"])  # same key, same frames
    image = ds[SampleRef(1)]
    assert image["pixels"].shape == (1, 30, 60, 3) and image["data_type"] == "image" and image["failures"] == []


def test_broken_files_are_replaced_counted_and_stop_training(media):
    entries = [
        {"file_path": str(media / "corrupt.mp4"), "text": "bad", "type": "video"},
        {"file_path": str(media / "short.mp4"), "text": "short", "type": "video"},
        {"file_path": str(media / "missing.mp4"), "text": "gone", "type": "video"},
        {"file_path": str(media / "ramp.mp4"), "text": "good", "type": "video"},
        {"file_path": str(media / "corrupt.jpg"), "text": "bad img", "type": "image"},
    ]
    cfg = DataConfig(image_sample_size=32, video_sample_size=32, token_sample_size=32, video_sample_n_frames=8,
                     max_retries=50)
    ds = VideoImageDataset(entries, cfg, seed=0)
    sample = ds[SampleRef(0)]
    assert sample["text"] == "good" and sample["data_type"] == "video"
    assert sample["failures"][0][0].endswith("corrupt.mp4")
    assert all(p.endswith(("corrupt.mp4", "short.mp4", "missing.mp4")) for p, _ in sample["failures"])
    # no readable image at all: bounded retries, then a clear error
    with pytest.raises(DataError, match="could not be read"):
        ds[SampleRef(4)]

    health = DataHealth(max_failure_fraction=0.2, min_reads=10)
    health.update([], successes=8)
    health.update([("a.mp4", "broken")], successes=1)
    assert health.failures == 1 and "a.mp4" in health.summary()
    with pytest.raises(DataError, match="training stopped"):
        health.update([("b.mp4", "broken"), ("c.mp4", "broken")], successes=0)


def test_video_repeat_defaults_keep_videos():
    entries = [{"file_path": "a.mp4", "text": "", "type": "video"}, {"file_path": "b.png", "text": "", "type": "image"}]
    assert DataConfig().video_repeat == 1
    assert len(compose_entries(entries, DataConfig().video_repeat)) == 2
    assert [e["type"] for e in compose_entries(entries, 3)] == ["image", "video", "video", "video"]
    with pytest.raises(DataError, match="video_repeat=0"):
        compose_entries(entries[:1], 0)


def test_check_dataset_script_lists_unreadable_entries(media, tmp_path):
    rows = [{"file_path": name, "text": name} for name in ("ramp.mp4", "corrupt.mp4", "wide.png", "missing.png",
                                                         "short.mp4")]
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps(rows))
    clean = tmp_path / "clean.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "check_dataset.py"), str(meta), "--data_root", str(media),
         "--video_sample_n_frames", "8", "--write_clean", str(clean)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1, result.stderr
    unreadable = [line for line in result.stdout.splitlines() if line.startswith("UNREADABLE")]
    assert len(unreadable) == 3
    assert any("corrupt.mp4" in l for l in unreadable) and any("missing.png" in l for l in unreadable)
    assert any("short.mp4" in l for l in unreadable)
    kept = json.loads(clean.read_text())
    assert [Path(e["file_path"]).name for e in kept] == ["ramp.mp4", "wide.png"]
    assert (kept[0]["height"], kept[0]["width"]) == (48, 80) and kept[1]["type"] == "image"
