"""VAE training end to end on a tiny VAE (the golden config: ch 8, 4 groups) and synthetic clips written by the
test: data pipeline, loss falling, discriminator start, resume, decoder-/encoder-only, the saved vae/ folder."""

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from easyanimate.data.metadata import load_metadata
from easyanimate.data.vae_dataset import HomogeneousBatchSampler, VAEDataset, check_video_len
from easyanimate.training.vae_trainer import VAETrainConfig, load_config, train

SIZE, FRAMES = 32, 8


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Three 12-frame 64x48 videos of moving smooth patterns and two images, with a metadata JSON of
    ``{file_path, type}`` rows as scripts/train_vae.sh documents (a VAE needs no caption, so there is no ``text``)."""
    import imageio

    root = tmp_path_factory.mktemp("vae_data")
    yy, xx = np.mgrid[0:48, 0:64].astype(np.float32)
    rows = []
    for i in range(3):
        frames = []
        for t in range(12):
            r = np.sin((xx + 2 * t * (i + 1)) / 20.0) * 0.4 + 0.5
            g = np.cos((yy - t) / 15.0 + i) * 0.4 + 0.5
            b = np.full_like(r, 0.2 + 0.3 * i)
            frames.append((np.stack([r, g, b], -1) * 255).astype(np.uint8))
        # decord needs rows of a multiple of 64 bytes here, hence 64 px wide; yuv420p is what it decodes.
        imageio.mimwrite(root / f"clip{i}.mp4", frames, fps=8, codec="libx264", pixelformat="yuv420p",
                         macro_block_size=16)
        rows.append({"file_path": f"clip{i}.mp4", "type": "video"})
    for i in range(2):
        image = (np.stack([np.sin(xx / 18.0 + i), np.cos(yy / 14.0), np.full_like(xx, 0.3)], -1) * 0.4 + 0.5) * 255
        imageio.imwrite(root / f"image{i}.png", image.astype(np.uint8))
        rows.append({"file_path": f"image{i}.png", "type": "image"})
    (root / "meta.json").write_text(json.dumps(rows))
    (root / "one_clip.json").write_text(json.dumps(rows[:1]))
    return root


def _entries(data: Path) -> list[dict]:
    return load_metadata(data / "meta.json", data, require_text=False)


@pytest.fixture(scope="module")
def vae_config(golden_dir) -> Path:
    """The golden tiny V4 VAE config (ch 8, norm_num_groups 4, cache mode)."""
    return golden_dir / "vae" / "config_v4_cache.json"


def settings(data: Path, out: Path, **overrides) -> VAETrainConfig:
    values = dict(
        train_data_meta=str(data / "meta.json"),
        train_data_dir=str(data),
        size=SIZE,
        video_len=FRAMES,
        batch_size=2,
        num_workers=0,
        learning_rate=1e-3,
        perceptual_weight=0.0,
        disc_frame_channels=8,
        disc_video_channels=[8, 16, 16],
        disc_norm_groups=4,
        output_dir=str(out),
        log_every=1,
        image_log_every=2,
        seed=3,
    )
    values.update(overrides)
    return load_config(None, values)


# -- data --------------------------------------------------------------------------------------------------------


def test_video_len_must_be_a_multiple_of_8(data):
    with pytest.raises(ValueError, match="video_len=25.*multiple of 8.*25 -> 28.*video_len=24"):
        check_video_len(25)
    with pytest.raises(ValueError, match="video_len=4"):
        VAEDataset(_entries(data), size=SIZE, video_len=4)
    check_video_len(24)


def test_dataset_items_are_square_crops_in_range(data):
    dataset = VAEDataset(_entries(data), size=SIZE, video_len=FRAMES, seed=1)
    kinds = dataset.kinds
    video = dataset[(kinds.index("video"), 0)]
    image = dataset[(kinds.index("image"), 0)]
    assert video["pixels"].shape == (3, FRAMES, SIZE, SIZE) and video["type"] == "video"
    assert image["pixels"].shape == (3, 1, SIZE, SIZE) and image["type"] == "image"
    for item in (video, image):
        assert item["pixels"].min() >= -1 and item["pixels"].max() <= 1 and item["pixels"].std() > 0.1
    # Keyed randomness: the same key gives the same crop, another key another one.
    again = dataset[(kinds.index("video"), 0)]["pixels"]
    other = dataset[(kinds.index("video"), 1)]["pixels"]
    assert torch.equal(video["pixels"], again) and not torch.equal(video["pixels"], other)


def test_sampler_batches_are_homogeneous_resumable_and_sharded():
    kinds = ["video", "image", "video", "video", "image", "image", "video"]
    take = lambda sampler, n: [b for _, b in zip(range(n), sampler)]  # noqa: E731
    full = take(HomogeneousBatchSampler(kinds, 2, seed=5), 12)
    assert all(len({kinds[i] for i, _ in batch}) == 1 for batch in full)
    assert {kinds[batch[0][0]] for batch in full} == {"image", "video"}
    keys = [key for batch in full for _, key in batch]
    assert len(keys) == len(set(keys))  # every sample drawn once, with its own random key
    assert take(HomogeneousBatchSampler(kinds, 2, seed=5, start_batch=5), 7) == full[5:]
    rank0 = take(HomogeneousBatchSampler(kinds, 2, seed=5, num_replicas=2, rank=0), 6)
    rank1 = take(HomogeneousBatchSampler(kinds, 2, seed=5, num_replicas=2, rank=1), 6)
    assert rank0 == full[0::2] and rank1 == full[1::2]


def test_unreadable_files_are_replaced_then_reported(data, tmp_path, caplog):
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    entries = _entries(data)
    good_video = [e for e in entries if e["type"] == "video"][0]
    bad = {"file_path": str(tmp_path / "broken.mp4"), "text": "", "type": "video"}
    dataset = VAEDataset([bad, good_video], size=SIZE, video_len=FRAMES)
    with caplog.at_level(logging.WARNING):
        item = dataset[(0, 7)]
    assert item["index"] == 1 and "broken.mp4" in caplog.text
    with pytest.raises(RuntimeError, match="(?s)could not be read.*broken.mp4"):
        VAEDataset([bad], size=SIZE, video_len=FRAMES, max_retries=2)[(0, 0)]


# -- configuration errors ----------------------------------------------------------------------------------------


def test_clear_errors_for_bad_settings(data, tmp_path, vae_config):
    with pytest.raises(ValueError, match="lpips_weights"):
        settings(data, tmp_path, vae_config=str(vae_config), perceptual_weight=1.0).validate()
    with pytest.raises(ValueError, match="exactly one of pretrained_vae"):
        settings(data, tmp_path).validate()
    with pytest.raises(ValueError, match="train_mode"):
        settings(data, tmp_path, vae_config=str(vae_config), train_mode="decoder").validate()
    with pytest.raises(ValueError, match="size=16 is too small"):
        settings(data, tmp_path, vae_config=str(vae_config), size=16).validate()
    with pytest.raises(ValueError, match="unknown VAE training settings.*'video_length'"):
        load_config(None, {"video_length": 24})
    with pytest.raises(ValueError, match="mixed_precision=bf16 on the CPU"):
        train(settings(data, tmp_path, vae_config=str(vae_config), mixed_precision="bf16", max_train_steps=1))
    with pytest.raises(ValueError, match="video_len=25"):
        train(settings(data, tmp_path, vae_config=str(vae_config), video_len=25, max_train_steps=1))
    with pytest.raises(ValueError, match="gradient_accumulation_steps must be >= 1"):
        settings(data, tmp_path, vae_config=str(vae_config), gradient_accumulation_steps=0).validate()
    with pytest.raises(ValueError, match="first_frame_loss_weight must be > 0"):
        settings(data, tmp_path, vae_config=str(vae_config), first_frame_loss_weight=0).validate()


# -- training ----------------------------------------------------------------------------------------------------


def test_reconstruction_loss_falls(data, tmp_path, vae_config):
    # One clip, whole-height crops: the loss of fitting it must fall clearly within a few dozen steps.
    result = train(settings(data, tmp_path / "run", vae_config=str(vae_config),
                            train_data_meta=str(data / "one_clip.json"), min_crop=1.0, batch_size=1,
                            learning_rate=2e-3, disc_weight=0.0, max_train_steps=30, checkpointing_steps=1000))
    losses = [r["rec_loss"] for r in result.history]
    assert len(losses) == 30 and all(r["batch_type"] == "video" for r in result.history)
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:3]), losses


def test_validation_measures_the_saved_vae_on_a_fixed_set_without_changing_training(data, tmp_path, vae_config):
    """Validation every 2 steps and at the end, on the first and last entries of the training list (as the
    original): its numbers are those of the saved VAE on whole-side crops, recomputed here by hand, and the
    training run is the same as without it."""
    from easyanimate.models.vae import AutoencoderKLMagvit

    common = dict(vae_config=str(vae_config), disc_weight=0.0, max_train_steps=3, checkpointing_steps=1000)
    plain = train(settings(data, tmp_path / "plain", **common))
    result = train(settings(data, tmp_path / "validated", validation_steps=2, validation_entries=2, **common))
    assert [r["step"] for r in result.validation] == [2, 3]
    assert result.history == plain.history
    final = result.validation[-1]
    assert set(final) == {"step", "l1", "psnr", "video/l1", "video/psnr", "image/l1", "image/psnr"}

    vae = AutoencoderKLMagvit.from_pretrained(result.vae_dir).eval()
    entries = _entries(data)
    psnrs = psnr_by_hand(vae, [entries[0], entries[-1]])  # validation_entries 2: the first and the last
    assert final["video/psnr"] == pytest.approx(np.mean(psnrs["video"]), abs=1e-3)
    assert final["image/psnr"] == pytest.approx(np.mean(psnrs["image"]), abs=1e-3)
    assert final["psnr"] == pytest.approx(np.mean(psnrs["video"] + psnrs["image"]), abs=1e-3)
    assert 5 < final["psnr"] < 60


def psnr_by_hand(vae, entries) -> dict[str, list[float]]:
    """PSNR of each entry's whole-height crop (sample key = its position), by kind."""
    dataset = VAEDataset(entries, size=SIZE, video_len=FRAMES, min_crop=1.0, max_crop=1.0, seed=3)
    psnrs = {"video": [], "image": []}
    for i, entry in enumerate(entries):
        x = dataset[(i, i)]["pixels"][None]
        assert x.shape[-2:] == (SIZE, SIZE) and x.shape[2] == (FRAMES if entry["type"] == "video" else 1)
        with torch.no_grad():
            y = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        psnrs[entry["type"]].append(float(10 * np.log10(1.0 / (((y - x) / 2) ** 2).mean().item())))
    return psnrs


def test_gradient_accumulation_steps_the_mean_gradient_of_micro_batches(data, tmp_path, vae_config):
    """``gradient_accumulation_steps`` 2: each Adam step takes the mean gradient of the next two micro-batches of
    the stream, each with its own posterior noise (the same run written out by hand), and a resumed run continues
    with the micro-batches the uninterrupted one would have drawn."""
    from easyanimate.data.seeding import POSTERIOR
    from easyanimate.training.vae_trainer import Reconstruct, build_loss, build_vae, make_dataloader, select_trainable

    cfg = settings(data, tmp_path / "run", vae_config=str(vae_config), batch_size=1, gradient_accumulation_steps=2,
                   disc_weight=0.0, kl_weight=1e-3, max_train_steps=2, checkpointing_steps=1)
    result = train(cfg)
    assert [r["step"] for r in result.history] == [1, 2]

    torch.manual_seed(cfg.seed)
    vae = build_vae(cfg).train()
    trainable, last_layer = select_trainable(vae, cfg.train_mode)
    loss_fn = build_loss(cfg)
    optimizer = torch.optim.Adam(trainable, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2))
    batches = iter(make_dataloader(cfg, vae.config.mini_batch_encoder, 0, 0, 1))
    reconstruct = Reconstruct(vae)
    for step in range(2):
        optimizer.zero_grad()
        rec_losses = []
        for micro in range(2):
            pixels = next(batches)["pixels"]
            reconstruction, mean, logvar = reconstruct(pixels, (cfg.seed, POSTERIOR, 2 * step + micro, 0))
            loss, logs = loss_fn.generator_loss(pixels, reconstruction, mean, logvar, step, last_layer, None)
            (loss / 2).backward()
            rec_losses.append(float(logs["rec_loss"]))
        optimizer.step()
        assert result.history[step]["rec_loss"] == pytest.approx(np.mean(rec_losses), rel=1e-5)
    expected, trained = vae.state_dict(), result.vae.state_dict()
    assert all(torch.allclose(expected[k], trained[k], atol=1e-6) for k in expected)

    assert [r["lr"] for r in result.history] == [cfg.learning_rate] * 2
    scaled = train(settings(data, tmp_path / "scaled", vae_config=str(vae_config), batch_size=1,
                            gradient_accumulation_steps=2, disc_weight=0.0, max_train_steps=1, scale_lr=True))
    assert scaled.history[0]["lr"] == pytest.approx(2 * cfg.learning_rate)  # x batch 1 x accumulation 2 x 1 process

    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(Path(cfg.output_dir) / "checkpoint-1", resumed_dir / "checkpoint-1")
    resumed = train(load_config(None, {**vars(cfg), "output_dir": str(resumed_dir), "resume_from_checkpoint": "latest"}))
    again = resumed.vae.state_dict()
    assert all(torch.allclose(trained[k], again[k], atol=1e-6) for k in trained)


@pytest.fixture(scope="module")
def gan_run(data, vae_config, tmp_path_factory):
    """Five steps with the GAN switched on at step 2, EMA, the tiny LPIPS stand-in and a checkpoint every step."""
    from test_vae_losses import tiny_lpips

    root = tmp_path_factory.mktemp("gan_run")
    save_file(tiny_lpips().state_dict(), str(root / "lpips.safetensors"))
    cfg = settings(data, root / "out", vae_config=str(vae_config), perceptual_weight=0.1,
                   lpips_weights=str(root / "lpips.safetensors"), disc_start=2, use_ema=True, ema_decay=0.9,
                   max_train_steps=5, checkpointing_steps=1, validation_steps=5)
    return cfg, train(cfg)


def test_validation_uses_the_ema_weights_and_lpips(gan_run, data):
    cfg, result = gan_run
    (final,) = result.validation
    assert final["step"] == 5 and final["lpips"] > 0 and final["video/lpips"] > 0 and final["image/lpips"] > 0
    psnrs = psnr_by_hand(result.vae, _entries(data))  # the saved (EMA) weights, all 5
    assert final["video/psnr"] == pytest.approx(np.mean(psnrs["video"]), abs=1e-3)
    assert final["image/psnr"] == pytest.approx(np.mean(psnrs["image"]), abs=1e-3)


def test_discriminator_inactive_before_start_and_active_after(gan_run):
    cfg, result = gan_run
    out = Path(cfg.output_dir)
    history = result.history
    for record in history[:2]:
        assert record["disc_factor"] == 0 and "g_loss" not in record and "disc_loss" not in record
    for record in history[2:]:
        assert record["disc_factor"] == 1 and record["d_weight"] > 0 and np.isfinite(record["disc_loss"])
    assert all(r["lpips"] > 0 for r in history)

    def disc_weights(step):  # accelerate saves the prepared models in order: model.safetensors = VAE wrapper
        return load_file(str(out / f"checkpoint-{step}" / "model_1.safetensors"))

    d1, d2, d3 = disc_weights(1), disc_weights(2), disc_weights(3)
    assert any("frame.main" in k for k in d1) and any("video.blocks" in k for k in d1)
    assert all(torch.equal(d1[k], d2[k]) for k in d1)  # untouched before disc_start
    assert any(not torch.equal(d2[k], d3[k]) for k in d2 if k.endswith("weight"))  # trained from disc_start on


def test_resume_continues_exactly(gan_run, tmp_path):
    cfg, result = gan_run
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(Path(cfg.output_dir) / "checkpoint-3", out / "checkpoint-3")
    resumed = train(load_config(None, {**vars(cfg), "output_dir": str(out), "resume_from_checkpoint": "latest"}))
    assert [r["step"] for r in resumed.history] == [4, 5]
    for a, b in zip(result.history[3:], resumed.history):
        assert a.keys() == b.keys()
        for key in a:
            if key != "batch_type":
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    final, again = result.vae.state_dict(), resumed.vae.state_dict()
    assert all(torch.allclose(final[k], again[k], atol=1e-6) for k in final)  # EMA weights included


def test_saved_vae_folder_reloads_and_reconstructs_the_same(gan_run, keys_dir):
    from easyanimate.models.vae import AutoencoderKLMagvit

    cfg, result = gan_run
    folder = Path(cfg.output_dir) / "vae"
    assert folder == result.vae_dir
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    saved = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    assert not any(k.startswith("loss") for k in saved)
    # Same key set as the released VAE, only smaller.
    manifest = json.loads((keys_dir / "vae_v4.json").read_text())
    manifest = manifest.get("keys", manifest) if isinstance(manifest, dict) else manifest
    assert set(saved) == set(manifest)

    reloaded = AutoencoderKLMagvit.from_pretrained(folder).eval()  # strict: raises on missing/unexpected keys
    x = torch.rand(1, 3, FRAMES, SIZE, SIZE) * 2 - 1
    with torch.no_grad():
        expected = result.vae.decode(result.vae.encode(x).latent_dist.mode()).sample
        got = reloaded.decode(reloaded.encode(x).latent_dist.mode()).sample
    assert torch.equal(expected, got)
    # The checkpoint holds the same vae/ folder, next to the accelerate state.
    ckpt = load_file(str(Path(cfg.output_dir) / "checkpoint-5" / "vae" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(ckpt[k], saved[k]) for k in saved)


def test_tensorboard_has_loss_terms_and_images(gan_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, _ = gan_run
    events = list((Path(cfg.output_dir) / cfg.logging_dir).rglob("events.out.tfevents.*"))
    assert events
    tags = {"scalars": set(), "images": set()}
    for path in events:
        acc = EventAccumulator(str(path), size_guidance={"images": 0})
        acc.Reload()
        tags["scalars"] |= set(acc.Tags()["scalars"])
        tags["images"] |= set(acc.Tags()["images"])
    for term in ("rec_loss", "l1", "lpips", "kl_loss", "nll_loss", "g_loss", "d_weight", "disc_loss", "total_loss"):
        assert f"train/{term}" in tags["scalars"], term
    assert any(tag.startswith("reconstruction/") for tag in tags["images"])


def _weights(module, prefixes):
    return {k: v.clone() for k, v in module.state_dict().items() if k.startswith(prefixes)}


def test_decoder_only_from_cli_with_gradient_checkpointing(gan_run, data, tmp_path):
    """train_vae.py with a YAML config: fine-tune the decoder of a saved VAE; the encoder must not move."""
    import train_vae
    from easyanimate.models.vae import AutoencoderKLMagvit

    cfg, result = gan_run
    start = AutoencoderKLMagvit.from_pretrained(result.vae_dir)
    config = tmp_path / "vae_test.yaml"
    config.write_text(
        f"pretrained_vae: {result.vae_dir}\ntrain_data_meta: {data / 'meta.json'}\ntrain_data_dir: {data}\n"
        f"size: {SIZE}\nvideo_len: {FRAMES}\nbatch_size: 2\nnum_workers: 0\nperceptual_weight: 0.0\n"
        "train_mode: decoder_only\nl1_weight: 0.0\nl2_weight: 1.0\ndisc_weight: 0.0\nmax_train_steps: 2\n"
    )
    out = tmp_path / "decoder_only"
    train_vae.main(["--config", str(config), "--output_dir", str(out), "--gradient_checkpointing",
                    "--learning_rate", "1e-3"])
    trained = AutoencoderKLMagvit.from_pretrained(out / "vae")
    frozen = ("encoder.", "quant_conv.")
    before, after = _weights(start, frozen), _weights(trained, frozen)
    assert all(torch.equal(before[k], after[k]) for k in before)
    before, after = _weights(start, ("decoder.",)), _weights(trained, ("decoder.",))
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_encoder_only_keeps_the_decoder(gan_run, data, tmp_path):
    cfg, result = gan_run
    start = {k: v.clone() for k, v in result.vae.state_dict().items()}
    # GAN on from step 0: the adaptive weight is taken at quant_conv, the last trainable layer.
    trained = train(settings(data, tmp_path / "encoder_only", pretrained_vae=str(result.vae_dir),
                             train_mode="encoder_only", disc_start=0, max_train_steps=2)).vae.state_dict()
    frozen = [k for k in start if k.startswith(("decoder.", "post_quant_conv."))]
    assert frozen and all(torch.equal(start[k], trained[k]) for k in frozen)
    assert any(not torch.equal(start[k], trained[k]) for k in start if k.startswith("encoder."))
    assert not torch.equal(start["quant_conv.weight"], trained["quant_conv.weight"])


def test_finetuned_vae_drops_into_the_model_folder(tiny_model_dir, data, tmp_path):
    """Fine-tune the VAE of a complete model folder (given by its root) and put the result back: the pipeline
    loads it unchanged and decodes with the new weights."""
    from easyanimate.pipeline import EasyAnimatePipeline

    result = train(settings(data, tmp_path / "out", pretrained_vae=str(tiny_model_dir), train_mode="decoder_only",
                            disc_weight=0.0, max_train_steps=1))
    original = json.loads((tiny_model_dir / "vae" / "config.json").read_text())
    saved = json.loads((result.vae_dir / "config.json").read_text())
    for key, value in original.items():  # hidden keys of the released file (block_out_channels, ...) survive
        if key not in ("_class_name", "_diffusers_version"):
            assert saved[key] == value, key

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model, ignore=shutil.ignore_patterns("vae"))
    shutil.copytree(result.vae_dir, model / "vae")
    pipe = EasyAnimatePipeline.from_pretrained(model, torch_dtype=torch.float32, device="cpu")
    latents = torch.randn(1, 4, 2, 4, 4)
    with torch.no_grad():
        expected = result.vae.decode(latents / result.vae.config.scaling_factor).sample.clamp(-1, 1) / 2 + 0.5
    assert torch.allclose(pipe.decode_latents(latents), expected.clamp(0, 1), atol=1e-6)


def test_ctrl_c_finishes_the_step_and_saves_a_checkpoint(data, tmp_path, vae_config, monkeypatch):
    import os
    import signal

    from easyanimate.data import vae_dataset
    from easyanimate.training import vae_trainer

    batches = []

    def collate_then_interrupt(samples):
        batches.append(len(samples))
        if len(batches) == 3:  # Ctrl-C while the third batch loads
            os.kill(os.getpid(), signal.SIGINT)
        return vae_dataset.collate_clips(samples)

    monkeypatch.setattr(vae_trainer, "collate_clips", collate_then_interrupt)
    out = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt, match="stopped at step 3"):
        train(settings(data, out, vae_config=str(vae_config), disc_weight=0.0, max_train_steps=100,
                       checkpointing_steps=1000))
    assert json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["step"] == 3
    assert (out / "checkpoint-3" / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


@pytest.mark.parametrize("name", ["vae_finetune.yaml", "vae_decoder_only.yaml"])
def test_shipped_configs_are_complete_and_valid(name, tmp_path):
    config = Path(__file__).resolve().parents[1] / "configs" / name
    cfg = load_config(config, {"pretrained_vae": "model/vae", "train_data_meta": "meta.json",
                               "lpips_weights": "lpips.safetensors", "output_dir": str(tmp_path)})
    cfg.validate()
    check_video_len(cfg.video_len)
    assert cfg.resume_from_checkpoint == "latest"  # re-running the same command continues the run
    if name == "vae_decoder_only.yaml":
        assert cfg.train_mode == "decoder_only" and (cfg.l1_weight, cfg.l2_weight) == (0.0, 1.0)
