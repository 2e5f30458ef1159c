"""The predict command lines: bad input is rejected before any model loads, and every script writes a video (or png)
that reads back with the requested frame count and size."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from easyanimate import cli
from easyanimate.inference.loading import MODEL_SUBFOLDERS
from easyanimate.utils.video_io import read_image, read_video, save_video

REPO = Path(__file__).resolve().parents[1]
FAST = ["--steps", "2", "--guidance", "6", "--seed", "7", "--memory-mode", "gpu"]


@pytest.fixture
def no_model_load(monkeypatch):
    def fail(job):
        raise AssertionError("a model was loaded although the input is bad")

    monkeypatch.setattr(cli, "load_pipeline", fail)


@pytest.fixture
def fake_model_dir(tmp_path):
    """Has the released subfolders but no weights: validation must pass or fail on the inputs alone."""
    model = tmp_path / "model"
    for sub in MODEL_SUBFOLDERS:
        (model / sub).mkdir(parents=True)
    return model


@pytest.fixture
def start_image(tmp_path):
    return save_video(torch.rand(3, 1, 20, 30), tmp_path / "start.png")


def expect_usage_error(capsys, task, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(task, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_sampler_names_match_the_pipeline():
    from easyanimate.pipeline import SAMPLERS

    assert tuple(SAMPLERS) == cli.SAMPLER_NAMES


def test_bad_input_is_rejected_before_loading(capsys, tmp_path, no_model_load, fake_model_dir, start_image):
    base = ["--model", str(fake_model_dir), "--prompt", "a red circle"]
    expect_usage_error(capsys, "t2v", base + ["--height", "100"], "--height must be a positive multiple of 16, got 100")
    expect_usage_error(capsys, "t2v", base + ["--width", "0"], "--width must be a positive multiple of 16")
    expect_usage_error(capsys, "t2v", base + ["--frames", "5"], "--frames must be 1 or a multiple of 8, got 5")
    expect_usage_error(capsys, "t2v", base + ["--sampler", "Heun"], "invalid choice: 'Heun'")
    expect_usage_error(capsys, "t2v", base + ["--steps", "0"], "--steps must be at least 1")
    expect_usage_error(capsys, "t2v", base + ["--device", "gpu0"], "is not a torch device")
    if not torch.cuda.is_available():
        expect_usage_error(capsys, "t2v", base + ["--device", "cuda"], "CUDA is not available")
    expect_usage_error(capsys, "t2v", ["--model", str(tmp_path / "nowhere"), "--prompt", "x"], "model folder not found")
    expect_usage_error(capsys, "t2v", ["--model", str(tmp_path), "--prompt", "x"], "not an EasyAnimate V4 model folder")
    expect_usage_error(capsys, "t2v", base + ["--lora", str(tmp_path / "none.safetensors")], "LoRA file not found")
    expect_usage_error(capsys, "t2v", base + ["--frames", "8", "--output", str(tmp_path / "x.png")],
                       "is an image file name but 8 frames")
    expect_usage_error(capsys, "i2v", base + ["--image", str(tmp_path / "none.png")], "image file not found")
    expect_usage_error(capsys, "i2v", base + ["--image", str(start_image), "--end-image", str(tmp_path / "e.png")],
                       "image file not found")
    expect_usage_error(capsys, "i2v", base + ["--image", str(start_image), "--chunk-frames", "12"],
                       "--chunk-frames must be a positive multiple of 8")
    nine = ["--image"] + [str(start_image)] * 9
    expect_usage_error(capsys, "i2v", base + nine + ["--frames", "8"], "--image: 9 images but only 8 frames are generated")
    expect_usage_error(capsys, "i2v", base + nine + ["--frames", "24", "--chunk-frames", "8"],
                       "--image: 9 images but only 8 frames are generated per chunk")
    expect_usage_error(capsys, "i2v", base + nine[:6] + ["--end-image"] + nine[1:5] + ["--frames", "8"],
                       "5 start and 4 end images overlap in 8 frames")
    expect_usage_error(capsys, "v2v", base + ["--video", str(tmp_path / "none.mp4")], "video file not found")
    video = save_video(torch.rand(3, 8, 32, 32), tmp_path / "in.mp4")
    expect_usage_error(capsys, "v2v", base + ["--video", str(video), "--frames", "16"], "fewer than the 16 requested")
    expect_usage_error(capsys, "v2v", base + ["--video", str(video), "--frames", "8", "--strength", "1.5"],
                       "--strength must be in (0, 1]")
    expect_usage_error(capsys, "i2v", base, "the following arguments are required: --image")
    taken = tmp_path / "taken.mp4"
    taken.write_bytes(b"someone's video")
    expect_usage_error(capsys, "t2v", base + ["--frames", "8", "--output", str(taken)], "already exists")
    assert taken.read_bytes() == b"someone's video"


def test_help_explains_the_flags(capsys):
    with pytest.raises(SystemExit):
        cli.main("v2v", ["--help"])
    out = capsys.readouterr().out
    for flag in ("--model", "--prompt", "--negative-prompt", "--sampler", "--steps", "--height", "--width",
                 "--frames", "--fps", "--guidance", "--seed", "--lora", "--lora-weight", "--memory-mode", "--dtype",
                 "--output", "--video", "--strength", "--color-transfer"):
        assert flag in out


def test_t2v_rounds_frames_and_writes_mp4(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "t2v.mp4"
    path = cli.main("t2v", ["--model", str(tiny_model_dir), "--prompt", "a red circle moving to the left",
                            "--height", "32", "--width", "64", "--frames", "12", "--fps", "8",
                            "--output", str(out)] + FAST)
    captured = capsys.readouterr()
    assert "using 8" in captured.err  # 12 frames rounded down to the VAE chunk, with a notice
    assert path == out and str(out) in captured.out
    assert read_video(out).shape == (3, 8, 32, 64)


def test_t2i_writes_png(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "image.mp4"
    path = cli.main("t2v", ["--model", str(tiny_model_dir), "--prompt", "一个红色的圆形", "--height", "48",
                            "--width", "32", "--frames", "1", "--output", str(out)] + FAST)
    assert path == tmp_path / "image.png"
    assert read_image(path).size == (32, 48)


def test_one_start_image_is_spread_several_are_frames(no_model_load, fake_model_dir, tmp_path, start_image):
    second = save_video(torch.rand(3, 1, 20, 30), tmp_path / "second.png")
    base = ["--model", str(fake_model_dir), "--prompt", "a red circle", "--frames", "8"]
    job = cli.validate("i2v", cli.build_parser("i2v").parse_args(base + ["--image", str(start_image)]))
    image = job.prepared.start_image
    assert not isinstance(image, list) and image.size == (30, 20)  # the pipeline puts it on 3 frames
    job = cli.validate("i2v", cli.build_parser("i2v").parse_args(
        base + ["--image", str(start_image), str(second), "--end-image", str(second)]))
    image, end_image = job.prepared.start_image, job.prepared.end_image
    assert isinstance(image, list) and len(image) == 2 and not isinstance(end_image, list)
    assert np.array_equal(np.asarray(image[1]), np.asarray(read_image(second)))


def test_i2v_start_and_end_image(tiny_model_dir, tmp_path, start_image):
    end = save_video(torch.rand(3, 1, 20, 30), tmp_path / "end.png")
    path = cli.main("i2v", ["--model", str(tiny_model_dir), "--prompt", "a blue square moving up",
                            "--image", str(start_image), str(end), "--end-image", str(end),
                            "--height", "32", "--width", "32",
                            "--frames", "8", "--sampler", "DDIM", "--color-transfer",
                            "--output", str(tmp_path / "i2v.mp4")] + FAST)
    assert read_video(path).shape == (3, 8, 32, 32)


def test_i2v_long_video(tiny_model_dir, tmp_path, start_image):
    path = cli.main("i2v", ["--model", str(tiny_model_dir), "--prompt", "a green star standing still",
                            "--image", str(start_image), "--height", "32", "--width", "32", "--frames", "12",
                            "--chunk-frames", "8", "--overlap", "4", "--output", str(tmp_path / "long.mp4")] + FAST)
    assert read_video(path).shape == (3, 12, 32, 32)


def test_v2v_with_lora(tiny_model_dir, tmp_path):
    from easyanimate.lora import LoRANetwork
    from easyanimate.models.transformer import HunyuanTransformer3DModel
    from easyanimate.utils.weights import load_model_from_folder

    network = LoRANetwork(load_model_from_folder(HunyuanTransformer3DModel, tiny_model_dir, "transformer"), rank=2)
    lora = network.save(tmp_path / "style.safetensors")
    source = save_video(torch.rand(3, 10, 40, 40), tmp_path / "source.mp4")
    path = cli.main("v2v", ["--model", str(tiny_model_dir), "--prompt", "a sunset over the sea",
                            "--video", str(source), "--strength", "0.5", "--height", "32", "--width", "64",
                            "--frames", "8", "--lora", str(lora), "--lora-weight", "0.8",
                            "--output", str(tmp_path / "v2v.mp4")] + FAST)
    assert read_video(path).shape == (3, 8, 32, 64)


def test_predict_script_runs_as_a_program(tiny_model_dir, tmp_path):
    out = tmp_path / "script.mp4"
    result = subprocess.run(
        [sys.executable, str(REPO / "predict_t2v.py"), "--model", str(tiny_model_dir), "--prompt", "a red circle",
         "--height", "32", "--width", "32", "--frames", "8", "--output", str(out)] + FAST,
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == str(out)
    assert read_video(out).shape == (3, 8, 32, 32)


def test_replacement_weights_for_the_transformer_and_vae(tiny_model_dir, tmp_path, capsys):
    """``--transformer-path`` / ``--vae-path`` put fine-tuned weights (a .safetensors file, or the folder train.py
    or train_vae.py writes) in place of the model folder's; weights that do not fit stop the run with the mismatch
    named, never a half-loaded model."""
    from safetensors.torch import save_file

    from easyanimate.utils.weights import read_folder_weights

    transformer = {k: v * 1.5 for k, v in read_folder_weights(tiny_model_dir / "transformer").items()}
    save_file(transformer, str(tmp_path / "transformer.safetensors"))
    vae = {k: v * 0.5 for k, v in read_folder_weights(tiny_model_dir / "vae").items()}
    (tmp_path / "vae").mkdir()
    save_file(vae, str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"))
    base = ["--model", str(tiny_model_dir), "--prompt", "a red circle", "--height", "32", "--width", "32",
            "--frames", "8", "--output", str(tmp_path / "out.mp4")] + FAST
    args = cli.build_parser("t2v").parse_args(base + ["--transformer-path", str(tmp_path / "transformer.safetensors"),
                                                      "--vae-path", str(tmp_path / "vae")])
    pipe = cli.load_pipeline(cli.validate("t2v", args))
    for loaded, expected in ((pipe.transformer.state_dict(), transformer), (pipe.vae.state_dict(), vae)):
        assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)

    expect_usage_error(capsys, "t2v", base + ["--vae-path", str(tmp_path / "none")], "--vae-path")
    del transformer[next(iter(transformer))]
    save_file(transformer, str(tmp_path / "partial.safetensors"))
    expect_usage_error(capsys, "t2v", base + ["--transformer-path", str(tmp_path / "partial.safetensors")],
                       "1 missing keys")
    assert not (tmp_path / "out.mp4").exists()
