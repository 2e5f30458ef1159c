"""Video and image IO: round trips through decord/PIL, the original's uint8 truncation, atomic writes, clear errors."""

import numpy as np
import pytest
import torch

from easyanimate.utils.video_io import MediaError, frames_to_uint8, read_image, read_video, save_video


def smooth_video(frames=8, height=48, width=64) -> torch.Tensor:
    """A (3, F, H, W) video of gradients moving over time: compresses well, so a round trip is close."""
    y = torch.linspace(0, 1, height)[:, None]
    x = torch.linspace(0, 1, width)[None, :]
    t = torch.arange(frames)[:, None, None] / frames
    zero = torch.zeros(frames, height, width)
    return torch.stack([zero + ((x + t) % 1.0) * 0.8 + 0.1, zero + y * 0.8 + 0.1, zero + (x * y + t / 2) * 0.6 + 0.2])


def test_mp4_round_trip_frame_count_size_and_values(tmp_path):
    video = smooth_video()
    path = save_video(video[None], tmp_path / "clip.mp4", fps=8)
    assert path == tmp_path / "clip.mp4"
    back = read_video(path)
    assert back.shape == (3, 8, 48, 64) and back.dtype == torch.float32
    assert 0 <= back.min() and back.max() <= 1
    assert (back - video).abs().mean() < 0.03  # lossy codec, but the content survives
    assert read_video(path, num_frames=5).shape == (3, 5, 48, 64)
    assert read_video(path, num_frames=3, size=(32, 16)).shape == (3, 3, 32, 16)
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]  # no temporary file left behind


def test_widths_decord_cannot_copy_are_read_through_ffmpeg(tmp_path):
    video = smooth_video(frames=4, height=32, width=48)  # decord 0.6 fails on this width
    back = read_video(save_video(video, tmp_path / "narrow.mp4"), num_frames=3)
    assert back.shape == (3, 3, 32, 48)
    assert (back - video[:, :3]).abs().mean() < 0.03


def test_gif_round_trip(tmp_path):
    video = smooth_video(frames=4, height=16, width=24)
    back = read_video(save_video(video, tmp_path / "clip.gif", fps=4))
    assert back.shape == (3, 4, 16, 24)
    assert (back - video).abs().mean() < 0.05  # 256-colour palette


def test_single_frame_png_truncates_like_the_original(tmp_path):
    image = torch.rand(3, 1, 16, 24)
    path = save_video(image, tmp_path / "still.png")
    back = read_image(path, as_tensor=True)
    expected = (image[:, 0] * 255).to(torch.uint8).float() / 255  # truncation, not rounding
    assert torch.equal(back, expected)
    assert read_image(path).size == (24, 16)
    assert read_image(path, size=(8, 12)).size == (12, 8)


def test_batch_becomes_a_grid_and_values_are_clamped():
    videos = torch.full((3, 3, 2, 8, 8), 2.0)
    grid = frames_to_uint8(videos)
    assert grid.shape == (2, 2 + 8 + 2, 2 + 3 * (8 + 2), 3)
    assert grid.max() == 255 and grid[0, 0, 0].tolist() == [0, 0, 0]  # padding
    single = frames_to_uint8(torch.full((3, 2, 8, 8), 0.999))
    assert single.shape == (2, 8, 8, 3) and np.all(single == 254)


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    import imageio.v2 as imageio

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(imageio, "mimsave", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        save_video(smooth_video(), tmp_path / "out.mp4")
    assert list(tmp_path.iterdir()) == []


def test_clear_errors(tmp_path):
    with pytest.raises(MediaError, match="not found"):
        read_video(tmp_path / "missing.mp4")
    with pytest.raises(MediaError, match="not found"):
        read_image(tmp_path / "missing.png")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video")
    with pytest.raises(MediaError, match="cannot read video"):
        read_video(junk)
    junk_png = tmp_path / "junk.png"
    junk_png.write_bytes(b"not an image")
    with pytest.raises(MediaError, match="cannot read image"):
        read_image(junk_png)
    path = save_video(smooth_video(frames=8), tmp_path / "short.mp4")
    with pytest.raises(MediaError, match="8 frames, fewer than the 16"):
        read_video(path, num_frames=16)
    with pytest.raises(MediaError, match="format"):
        save_video(smooth_video(), tmp_path / "clip.xyz")
    with pytest.raises(MediaError, match="shape"):
        save_video(torch.zeros(8, 3, 4, 4), tmp_path / "clip.mp4")


def test_colour_transfer_undoes_a_drift_and_keeps_the_first_frame():
    import cv2

    from easyanimate.utils.video_io import match_colours_to_first_frame

    rng = np.random.default_rng(0)
    base = rng.uniform(40, 200, size=(24, 32, 3))
    # Frames drift: brighter, redder, lower contrast; the last frame is flat (a zero spread must not blow up).
    frames = [base] + [(base - 120) * (1 - 0.1 * k) + 120 + np.array([12.0 * k, 4.0 * k, -6.0 * k]) for k in (1, 2, 3)]
    frames.append(np.full_like(base, 90.0))
    frames = np.clip(np.stack(frames), 0, 255).astype(np.uint8)
    out = match_colours_to_first_frame(frames)
    assert out.shape == frames.shape and out.dtype == np.uint8
    assert np.array_equal(out[0], frames[0])

    def lab_stats(frame):
        lab = cv2.cvtColor(frame, cv2.COLOR_RGB2LAB).astype(np.float64)
        return lab.mean(axis=(0, 1)), lab.std(axis=(0, 1))

    mean0, std0 = lab_stats(frames[0])
    for k in (1, 2, 3):
        mean_before, _ = lab_stats(frames[k])
        mean, std = lab_stats(out[k])
        assert np.abs(mean_before - mean0).max() > 5  # there was a drift to undo
        np.testing.assert_allclose(mean, mean0, atol=1.5)  # LAB -> RGB -> LAB rounding
        np.testing.assert_allclose(std, std0, rtol=0.05, atol=1.0)
        # The picture is kept: the corrected frame still follows the first frame pixel by pixel.
        assert np.corrcoef(out[k][..., 1].ravel(), frames[0][..., 1].ravel())[0, 1] > 0.95
    mean, std = lab_stats(out[4])
    np.testing.assert_allclose(mean, mean0, atol=1.5)
    assert np.all(std < 1.0)  # a flat frame stays flat (in the first frame's mean colour)
