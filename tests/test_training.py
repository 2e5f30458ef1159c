"""Training objective and loop on the tiny model: loss falls, resume reproduces the losses, two processes (DDP, and
DeepSpeed ZeRO-2 with a resume) match one on images and videos mixed, broken files are skipped and reported, LoRA
trains and loads into the pipeline."""

import json
import os
import subprocess
import sys
from pathlib import Path

import imageio
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image

from easyanimate.data.dataset import DataError
from easyanimate.training.config import TrainConfig, parse_args
from easyanimate.training.objective import (
    DiffusionObjective, clip_keep_mask, diffusion_loss, discard_learned_sigma, inpaint_condition_flags,
    sample_logit_normal_timesteps, share_noise_across_frames,
)
from easyanimate.training.trainer import adaptive_clip_norm, train

REPO = Path(__file__).resolve().parents[1]
V4_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.03, beta_schedule="scaled_linear",
                    steps_offset=1, prediction_type="v_prediction", clip_sample=False)


# ------------------------------------------------------------------------------------------------ objective
def test_forward_process_and_v_target_follow_the_scheduler():
    objective = DiffusionObjective(DDPMScheduler(**V4_SCHEDULER))
    betas = torch.linspace(0.00085**0.5, 0.03**0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    x0, eps = torch.randn(3, 4, 2, 4, 4), torch.randn(3, 4, 2, 4, 4)
    t = torch.tensor([0, 500, 999])
    noisy, target = objective.noisy_latents_and_target(x0, eps, t)
    a = abar[t].float().sqrt()[:, None, None, None, None]
    s = (1 - abar[t]).float().sqrt()[:, None, None, None, None]
    torch.testing.assert_close(noisy, a * x0 + s * eps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(target, a * eps - s * x0, rtol=1e-5, atol=1e-5)
    eps_objective = DiffusionObjective(DDPMScheduler(**{**V4_SCHEDULER, "prediction_type": "epsilon"}))
    assert torch.equal(eps_objective.noisy_latents_and_target(x0, eps, t)[1], eps)


def test_logit_normal_timesteps_are_keyed_and_distributed():
    keys = [(0, i, 0) for i in range(4000)]
    t = sample_logit_normal_timesteps(keys, seed=1, num_train_timesteps=1000)
    assert t.dtype == torch.long and t.min() >= 0 and t.max() <= 999
    assert torch.equal(t[:10], sample_logit_normal_timesteps(keys[:10], seed=1, num_train_timesteps=1000))
    # sigmoid(N(0,1)) quantiles: median 0.5, 84th percentile sigmoid(1) = 0.731
    q = np.quantile(t.numpy(), [0.5, 0.8413])
    assert abs(q[0] - 500) < 20 and abs(q[1] - 731) < 20
    assert not torch.equal(t, sample_logit_normal_timesteps(keys, seed=2, num_train_timesteps=1000))
    # N(-1, 0.5): median sigmoid(-1) = 0.269, 84th percentile sigmoid(-0.5) = 0.378
    low = sample_logit_normal_timesteps(keys, seed=1, num_train_timesteps=1000, mean=-1.0, std=0.5)
    q = np.quantile(low.numpy(), [0.5, 0.8413])
    assert abs(q[0] - 269) < 15 and abs(q[1] - 378) < 15
    with pytest.raises(ValueError, match="std must be > 0"):
        sample_logit_normal_timesteps(keys, seed=1, num_train_timesteps=1000, std=0.0)


def test_loss_discards_learned_sigma_and_adds_motion_term():
    pred, target = torch.randn(2, 8, 4, 3, 3), torch.randn(2, 4, 4, 3, 3)
    first = discard_learned_sigma(pred, 4)
    assert torch.equal(first, pred[:, :4])
    with pytest.raises(ValueError, match="channels"):
        discard_learned_sigma(torch.randn(2, 6, 1, 2, 2), 4)
    mse = ((first - target) ** 2).mean()
    motion = (((first[:, :, 1:] - first[:, :, :-1]) - (target[:, :, 1:] - target[:, :, :-1])) ** 2).mean()
    torch.testing.assert_close(diffusion_loss(first, target), mse)
    torch.testing.assert_close(diffusion_loss(first, target, 0.25), 0.75 * mse + 0.25 * motion)
    # no motion term with 2 latent frames or fewer
    torch.testing.assert_close(diffusion_loss(first[:, :, :2], target[:, :, :2], 0.25), ((first - target)[:, :, :2] ** 2).mean())
    objective = DiffusionObjective(DDPMScheduler(**V4_SCHEDULER), motion_sub_loss_ratio=0.25)
    torch.testing.assert_close(objective.loss(pred, target), 0.75 * mse + 0.25 * motion)


def test_noise_is_keyed_per_sample_and_optionally_shared_across_frames():
    objective = DiffusionObjective(DDPMScheduler(**V4_SCHEDULER), seed=3)
    both = objective.sample_noise((4, 3, 2, 2), [(0, 0, 0), (0, 1, 0)])
    alone = objective.sample_noise((4, 3, 2, 2), [(0, 1, 0)])
    assert torch.equal(both[1:], alone) and not torch.equal(both[0], both[1])
    shared = share_noise_across_frames(both, 0.5)
    torch.testing.assert_close(shared[:, :, 1], 0.5 * shared[:, :, 0] + 0.5 * both[:, :, 1])


def test_inpaint_flags_and_clip_drop_rates():
    keys = [(0, i, 0) for i in range(2000)]
    full = torch.ones(2000, 1, 1, 2, 2)
    partial = full.clone()
    partial[:, :, :, 0, 0] = 0
    assert 0.87 < 1 - inpaint_condition_flags(full, keys, 0).mean() < 0.93
    assert inpaint_condition_flags(partial, keys, 0).min() == 1
    keep = clip_keep_mask(keys, 0, n_query=16)
    assert keep.shape == (2000, 16) and torch.equal(keep, keep[:, :1].expand(-1, 16))
    assert 0.45 < keep.mean() < 0.55


def test_adaptive_gradient_clip():
    cfg = TrainConfig(pretrained_model_name_or_path="m", train_data_meta="d", max_grad_norm=0.05)
    assert adaptive_clip_norm(0, 1.0, cfg) == pytest.approx(0.25)
    assert adaptive_clip_norm(500, 1.0, cfg) == pytest.approx(0.15)
    assert adaptive_clip_norm(2000, 0.1, cfg) == pytest.approx(0.05)
    assert adaptive_clip_norm(2000, 0.5, cfg) == pytest.approx(0.005)  # 10x abnormal -> damped 10x


def test_came_optimizer_has_the_original_settings():
    from came_pytorch.CAME import CAME

    from easyanimate.training.trainer import make_optimizer

    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 4)
    cfg = TrainConfig(pretrained_model_name_or_path="m", train_data_meta="d", learning_rate=1e-2, use_came=True,
                      adam_weight_decay=3e-2)
    optimizer = make_optimizer([{"params": [layer.weight], "lr": 1e-2}, {"params": [layer.bias], "lr": 5e-3}], cfg)
    assert isinstance(optimizer, CAME) and [g["lr"] for g in optimizer.param_groups] == [1e-2, 5e-3]
    for group in optimizer.param_groups:  # the original's CAME settings: its own betas and eps, no weight decay
        assert group["betas"] == (0.9, 0.999, 0.9999) and group["eps"] == (1e-30, 1e-16)
        assert group["weight_decay"] == 0.0
    x = torch.randn(64, 8)
    y = x @ torch.randn(8, 4)
    losses = []
    for _ in range(100):
        loss = ((layer(x) - y) ** 2).mean()
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < 0.2 * losses[0]
    with pytest.raises(ValueError, match="pass only one"):
        TrainConfig(pretrained_model_name_or_path="m", train_data_meta="d", use_came=True, use_8bit_adam=True)


def test_cli_defaults_are_sane():
    cfg = parse_args(["--pretrained_model_name_or_path", "m", "--train_data_meta", "d"])
    assert cfg.video_repeat == 1 and cfg.trainable_modules == ["."] and cfg.seed == 42 and cfg.text_drop_ratio == 0
    with pytest.raises(SystemExit):
        parse_args(["--train_data_meta", "d"])


# ------------------------------------------------------------------------------------------------ the loop
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_data")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        Image.fromarray((rng.random((32, 64, 3)) * 255).astype(np.uint8)).save(root / f"img{i}.png")
        rows.append({"file_path": f"img{i}.png", "text": f"picture number {i}", "type": "image"})
    # broken: a corrupt image whose size is in the metadata (replaced in the dataset) and a missing video
    (root / "broken.png").write_bytes(b"not a png")
    rows.append({"file_path": "broken.png", "text": "broken", "type": "image", "width": 64, "height": 32})
    rows.append({"file_path": "missing.mp4", "text": "missing", "type": "video"})
    for i in range(2):
        frames = np.stack([np.full((32, 64, 3), 20 * i + 10 * f, np.uint8) for f in range(12)])
        imageio.mimwrite(root / f"vid{i}.mp4", frames, fps=8, macro_block_size=1)
    videos = [{"file_path": f"vid{i}.mp4", "text": f"clip {i}", "type": "video"} for i in range(2)]
    # images and videos mixed (two buckets): with seed 42 the 4 steps of batch 2 are 3 image batches and 1 video
    # batch, and one image and one video are next to each other in the shuffled order, so dealing batches of 1 to
    # two processes in turn would pair them in one step
    (root / "meta.json").write_text(json.dumps(rows + videos))
    (root / "video_meta.json").write_text(json.dumps(videos))
    one = Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], (32, 1, 3)))
    one.save(root / "gradient.png")
    (root / "one_image.json").write_text(json.dumps([{"file_path": "gradient.png", "text": "a gradient"}] * 8))
    return root


def _args(model_dir, data, out, *extra):
    return [
        "--pretrained_model_name_or_path", str(model_dir), "--train_data_meta", str(data / "meta.json"),
        "--train_data_dir", str(data), "--output_dir", str(out), "--image_sample_size", "32",
        "--video_sample_size", "32", "--token_sample_size", "32", "--video_sample_n_frames", "8",
        "--video_sample_stride", "1", "--report_to", "none", "--max_failure_fraction", "0.6", *extra,
    ]


def _log(out):
    return [json.loads(line) for line in (Path(out) / "train_log.jsonl").read_text().splitlines()]


# The runs the baseline is compared with. --max_grad_norm 100 keeps every step's gradient (norms 9-19) below both
# clip rules, DeepSpeed's constant --max_grad_norm and the adaptive clip of the other runs, so that the runs differ
# only in how they are distributed.
RUN = ("--max_train_steps", "4", "--learning_rate", "1e-3", "--max_grad_norm", "100")


@pytest.fixture(scope="module")
def baseline(tiny_model_dir, data, tmp_path_factory):
    """One process, batch 2, 4 steps, a checkpoint every 2 steps."""
    out = tmp_path_factory.mktemp("baseline")
    result = train(parse_args(_args(tiny_model_dir, data, out, "--train_batch_size", "2",
                                    "--checkpointing_steps", "2", *RUN)))
    return out, result


def test_checkpoints_and_broken_files_are_reported(baseline, tiny_model_dir):
    from easyanimate.models.transformer import HunyuanTransformer3DModel
    from easyanimate.utils.weights import load_model_from_folder

    out, result = baseline
    assert result.global_step == 4 and [s for s, _ in result.losses] == [1, 2, 3, 4]
    assert all(np.isfinite(loss) for _, loss in result.losses)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert "missing.mp4" in result.data_summary or "broken.png" in result.data_summary
    sanity = sorted(p.name for p in (out / "sanity_check").iterdir())
    assert len(sanity) == 6 and any(n.endswith("-masked.gif") for n in sanity) and any("picture_number" in n for n in sanity)
    # the trained transformer is a released-format folder the pipeline loads strictly
    trained = load_model_from_folder(HunyuanTransformer3DModel, out / "checkpoint-4" / "transformer")
    base = load_model_from_folder(HunyuanTransformer3DModel, tiny_model_dir / "transformer")
    assert not torch.equal(trained.proj_out.weight, base.proj_out.weight)


def test_resume_reproduces_the_uninterrupted_losses(baseline, tiny_model_dir, data, tmp_path):
    out, result = baseline
    resumed = train(parse_args(_args(tiny_model_dir, data, tmp_path, "--train_batch_size", "2",
                                     "--checkpointing_steps", "2", *RUN,
                                     "--resume_from_checkpoint", str(out / "checkpoint-2"))))
    assert [s for s, _ in resumed.losses] == [3, 4]
    assert [l for _, l in resumed.losses] == [l for _, l in result.losses[2:]]


def test_timestep_density_flags_reach_the_objective(baseline, tiny_model_dir, data, tmp_path):
    """Same weights, data and noise as the baseline's first step; only the timesteps move (to low noise)."""
    _, result = baseline
    low = train(parse_args(_args(tiny_model_dir, data, tmp_path, "--train_batch_size", "2", "--max_train_steps", "1",
                                 "--checkpointing_steps", "1", "--learning_rate", "1e-3",
                                 "--timestep_logit_mean", "-3", "--timestep_logit_std", "0.5")))
    assert np.isfinite(low.losses[0][1]) and abs(low.losses[0][1] - result.losses[0][1]) > 1e-4
    with pytest.raises(ValueError, match="--timestep_logit_std must be > 0"):
        TrainConfig(pretrained_model_name_or_path="m", train_data_meta="d", timestep_logit_std=0.0)


def _launch(cmd, env=None):
    """Run a multi-process launch to completion (a hung process group fails the test after 5 minutes); the
    environment's ACCELERATE_USE_CPU is left out unless ``env`` sets it (it would turn DeepSpeed off)."""
    inherited = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env = dict(inherited, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **(env or {}))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _update(model_dir, checkpoint):
    """The change a run made to the transformer's weights, as one vector."""
    from safetensors.torch import load_file

    name = "diffusion_pytorch_model.safetensors"
    base = load_file(Path(model_dir) / "transformer" / name)
    trained = load_file(Path(checkpoint) / "transformer" / name)
    return torch.cat([(trained[k] - base[k]).flatten() for k in base])


@pytest.fixture(scope="module")
def two_processes(tiny_model_dir, data, tmp_path_factory):
    """The baseline's run as DDP: two processes at batch 1 (torchrun; accelerate on the CPU needs
    ACCELERATE_USE_CPU to count them)."""
    out = tmp_path_factory.mktemp("ddp")
    _launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29571",
             str(REPO / "train.py"), *_args(tiny_model_dir, data, out, "--train_batch_size", "1",
                                            "--checkpointing_steps", "4", *RUN)], env={"ACCELERATE_USE_CPU": "1"})
    return out


def test_two_processes_match_one_process(baseline, two_processes, tiny_model_dir):
    """On images and videos mixed, in inpaint mode: every step trains the same global batch, so the losses are the
    baseline's up to float rounding (gradients are summed in another order)."""
    out, result = baseline
    two = [row["loss"] for row in _log(two_processes)]
    np.testing.assert_allclose(two, [l for _, l in result.losses], rtol=1e-4)
    # Adam turns float-rounding differences of near-zero gradients into full-size steps for a few elements, so
    # compare the whole update: the two runs' weight changes agree to 1 %.
    update_one = _update(tiny_model_dir, out / "checkpoint-4")
    update_two = _update(tiny_model_dir, two_processes / "checkpoint-4")
    assert (update_one - update_two).norm() < 0.01 * update_one.norm()


def test_deepspeed_zero2_resumes_and_matches_ddp(two_processes, tiny_model_dir, data, tmp_path):
    """``accelerate launch`` with the project's ZeRO-2 settings (bf16 off: a test-side copy, as CPUs have no bf16
    DeepSpeed path) on two processes: 2 steps, then a new launch resumes from that checkpoint for 2 more. The
    losses match the DDP run's to rtol 1e-4, as DDP's match one process: both sum the same float32 gradients in
    another order (measured: 3e-7), and Adam may turn that rounding into full-size steps of a few near-zero
    gradient elements. The checkpoint's ``transformer/`` loads into the pipeline."""
    pytest.importorskip("deepspeed")
    from easyanimate.pipeline import EasyAnimatePipeline
    from easyanimate.utils.weights import load_weights_into

    ds_config = json.loads((REPO / "configs" / "zero_stage2_config.json").read_text())
    ds_config["bf16"]["enabled"] = False
    (tmp_path / "zero2.json").write_text(json.dumps(ds_config))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--deepspeed_config_file",
              str(tmp_path / "zero2.json"), "--deepspeed_multinode_launcher", "standard", "--num_machines", "1",
              "--num_processes", "2", "--main_process_port", "29572", "--mixed_precision", "no",
              "--dynamo_backend", "no", str(REPO / "train.py")]
    args = _args(tiny_model_dir, data, tmp_path / "out", "--train_batch_size", "1", "--checkpointing_steps", "2", *RUN)
    _launch([*launch, *args, "--max_train_steps", "2"])
    _launch([*launch, *args, "--resume_from_checkpoint", "latest"])
    log = _log(tmp_path / "out")
    assert [row["step"] for row in log] == [1, 2, 3, 4] and all("grad_norm" in row for row in log)
    np.testing.assert_allclose([row["loss"] for row in log], [row["loss"] for row in _log(two_processes)], rtol=1e-4)
    update_ds = _update(tiny_model_dir, tmp_path / "out" / "checkpoint-4")
    update_ddp = _update(tiny_model_dir, two_processes / "checkpoint-4")
    assert (update_ds - update_ddp).norm() < 0.01 * update_ddp.norm()

    pipe = EasyAnimatePipeline.from_pretrained(tiny_model_dir, torch_dtype=torch.float32, device="cpu")
    load_weights_into(pipe.transformer, tmp_path / "out" / "checkpoint-4" / "transformer")
    video = pipe("a gradient", height=32, width=32, video_length=1, num_inference_steps=2, output_type="latent",
                 generator=torch.Generator().manual_seed(0)).videos
    assert torch.isfinite(video).all()


def test_too_many_broken_files_stop_training(tiny_model_dir, data, tmp_path):
    meta = tmp_path / "bad.json"
    meta.write_text(json.dumps([{"file_path": str(data / "broken.png"), "text": "x", "width": 64, "height": 32}] * 4))
    args = _args(tiny_model_dir, data, tmp_path / "out", "--train_batch_size", "2", "--max_train_steps", "2",
                 "--max_retries", "2")
    args[args.index("--train_data_meta") + 1] = str(meta)
    with pytest.raises(DataError, match="could not be read"):
        train(parse_args(args))


def test_transformer_training_needs_captions(tiny_model_dir, data, tmp_path):
    """Unlike the VAE's, the transformer's metadata rows must have a caption (an empty one says "no caption")."""
    from easyanimate.data.metadata import MetadataError

    meta = tmp_path / "no_text.json"
    meta.write_text(json.dumps([{"file_path": "img0.png", "type": "image"}]))
    args = _args(tiny_model_dir, data, tmp_path / "out", "--max_train_steps", "1")
    args[args.index("--train_data_meta") + 1] = str(meta)
    with pytest.raises(MetadataError, match="missing 'text'"):
        train(parse_args(args))


def _fixed_batch_loss(model_dir, transformer_folder, data):
    """Mean loss of the one-image set over 8 fixed sample keys (same noise and timesteps for every model)."""
    from easyanimate.data.buckets import BucketCollate
    from easyanimate.data.dataset import SampleRef, VideoImageDataset
    from easyanimate.data.metadata import load_metadata
    from easyanimate.training import trainer as T

    cfg = parse_args(_args(model_dir, data, "unused", "--transformer_path", str(transformer_folder)))
    transformer, frozen = T.load_models(cfg, torch.device("cpu"), torch.float32)
    objective = DiffusionObjective.from_model_folder(model_dir, seed=cfg.seed)
    entries = load_metadata(data / "one_image.json", data)
    dataset = VideoImageDataset(entries, cfg.data_config(), seed=cfg.seed)
    collate = BucketCollate(cfg.data_config(), cfg.seed)
    batch = collate([dataset[SampleRef(0, 99, 1000 + i)] for i in range(8)])
    with torch.no_grad():
        return float(T.compute_loss(T.TrainableTransformer(transformer), transformer, frozen, objective, batch, cfg,
                                    "cpu", torch.float32))


def test_batch_loss_is_the_mean_of_per_sample_losses(tiny_model_dir, data):
    """Samples trained as text-to-video skip the inpaint VAE encodes; the batch must still see exactly the
    conditions each sample sees alone (a mis-scattered row would change its loss)."""
    from easyanimate.data.buckets import BucketCollate
    from easyanimate.data.dataset import SampleRef, VideoImageDataset
    from easyanimate.data.metadata import load_metadata
    from easyanimate.training import trainer as T
    from easyanimate.training.objective import inpaint_condition_flags

    cfg = parse_args(_args(tiny_model_dir, data, "unused"))
    transformer, frozen = T.load_models(cfg, torch.device("cpu"), torch.float32)
    objective = DiffusionObjective.from_model_folder(tiny_model_dir, seed=cfg.seed)
    dataset = VideoImageDataset(load_metadata(data / "one_image.json", data), cfg.data_config(), seed=cfg.seed)
    collate = BucketCollate(cfg.data_config(), cfg.seed)
    refs = [SampleRef(0, 99, 1000 + i) for i in range(8)]

    def loss(batch):
        with torch.no_grad():
            return float(T.compute_loss(T.TrainableTransformer(transformer), transformer, frozen, objective, batch,
                                        cfg, "cpu", torch.float32))

    batch = collate([dataset[r] for r in refs])
    keys = [(int(batch["epoch"]), int(p), 0) for p in batch["positions"]]
    flags = inpaint_condition_flags(batch["mask"], keys, cfg.seed)
    assert 0 < flags.sum() < len(flags), "the batch must mix text-to-video and conditioned samples"
    singles = [loss(collate([dataset[r]])) for r in refs]
    assert loss(batch) == pytest.approx(float(np.mean(singles)), rel=1e-5)


def test_loss_falls_on_a_learnable_set(tiny_model_dir, data, tmp_path):
    args = _args(tiny_model_dir, data, tmp_path, "--train_batch_size", "2", "--max_train_steps", "12",
                 "--checkpointing_steps", "12", "--learning_rate", "5e-3", "--lr_scheduler", "constant")
    args[args.index("--train_data_meta") + 1] = str(data / "one_image.json")
    train(parse_args(args))
    before = _fixed_batch_loss(tiny_model_dir, tiny_model_dir / "transformer", data)
    after = _fixed_batch_loss(tiny_model_dir, tmp_path / "checkpoint-12" / "transformer", data)
    print(f"fixed-batch loss before {before:.4f}, after {after:.4f}")
    assert after < 0.8 * before, (before, after)


def test_lora_trains_saves_and_changes_pipeline_output(tiny_model_dir, data, tmp_path):
    from safetensors.torch import load_file

    from easyanimate.pipeline import EasyAnimatePipeline

    args = _args(tiny_model_dir, data, tmp_path, "--train_batch_size", "2", "--max_train_steps", "6",
                 "--checkpointing_steps", "3", "--learning_rate", "1e-2", "--lora", "--rank", "4",
                 "--network_alpha", "2", "--logging_dir", "tb", "--validation_prompts", "a gradient",
                 "--validation_steps", "1000", "--validation_epochs", "1", "--validation_inference_steps", "2")
    args[args.index("--report_to") + 1] = "tensorboard"
    result = train(parse_args(args))
    # validation_steps is never reached: the samples are the end-of-epoch ones
    samples = sorted(p.name for p in (tmp_path / "sample").glob("sample-*-0.gif"))
    assert samples and result.global_step == 6, samples
    lora_file = tmp_path / "checkpoint-3.safetensors"
    state = load_file(lora_file)
    assert "lora_unet__blocks_0_attn1_to_q.lora_down.weight" in state and "lora_unet__proj_out.alpha" in state
    assert state["lora_unet__blocks_0_attn1_to_q.lora_down.weight"].shape[0] == 4
    assert any(v.abs().sum() > 0 for k, v in state.items() if "lora_up" in k)  # trained away from zero
    assert (tmp_path / "checkpoint-3" / "lora_diffusion_pytorch_model.safetensors").is_file()
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*")), "no TensorBoard log in --logging_dir"

    pipe = EasyAnimatePipeline.from_pretrained(tiny_model_dir, torch_dtype=torch.float32, device="cpu")
    kwargs = dict(height=32, width=32, video_length=1, num_inference_steps=2, output_type="latent")

    def run():
        return pipe("a gradient", generator=torch.Generator().manual_seed(0), **kwargs).videos

    plain = run()
    pipe.load_lora(lora_file, 1.0)
    adapted = run()
    pipe.unload_lora()
    assert (adapted - plain).abs().max() > 1e-4
    torch.testing.assert_close(run(), plain)


def test_video_token_length_ema_came_and_checkpointing_options(tiny_model_dir, data, tmp_path):
    args = _args(tiny_model_dir, data, tmp_path, "--train_batch_size", "1", "--max_train_steps", "2",
                 "--checkpointing_steps", "2", "--random_hw_adapt", "--training_with_video_token_length",
                 "--random_frame_crop", "--keep_all_node_same_token_length", "--motion_sub_loss", "--use_ema",
                 "--use_came", "--gradient_checkpointing",
                 "--precompute_text_embeddings", "--checkpoints_total_limit", "1")
    args[args.index("--train_data_meta") + 1] = str(data / "video_meta.json")
    result = train(parse_args(args))
    assert result.global_step == 2 and all(np.isfinite(l) for _, l in result.losses)
    assert (tmp_path / "checkpoint-2" / "transformer_ema" / "config.json").is_file()
    assert [p.name for p in tmp_path.glob("checkpoint-*")] == ["checkpoint-2"]


@pytest.mark.parametrize("script,token,batch,steps", [("train_stage1.sh", "256", 1024, "60000"),
                                                      ("train_stage2.sh", "512", 192, "16000"),
                                                      ("train_stage4.sh", "1024", 96, "5000")])
def test_stage_scripts_express_the_v4_recipe(tmp_path, script, token, batch, steps):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "accelerate").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$ARGS_OUT"\n')
    (fake / "accelerate").chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", ARGS_OUT=str(tmp_path / "args"), NUM_GPUS="8",
               LEARNING_RATE="3e-5")
    subprocess.run(["bash", str(REPO / "scripts" / script), "--validation_steps", "7"], env=env, check=True,
                   capture_output=True, timeout=60)
    args = (tmp_path / "args").read_text().split("\n")

    def value(flag):
        return args[args.index(flag) + 1]

    assert value("--token_sample_size") == token and value("--video_sample_n_frames") == "144"
    assert value("--max_train_steps") == steps and value("--learning_rate") == "3e-5"
    assert int(value("--gradient_accumulation_steps")) * 8 == batch and value("--num_processes") == "8"
    assert "--use_deepspeed" in args and "configs/zero_stage2_config.json" in args
    assert "--training_with_video_token_length" in args and value("--validation_steps") == "7"
    assert args.index("train.py") > args.index("--use_deepspeed")
    cfg = parse_args([a for a in args[args.index("train.py") + 1 :] if a != ""])  # train.py accepts every flag
    assert cfg.random_hw_adapt and cfg.motion_sub_loss and cfg.train_mode == "inpaint" and cfg.max_grad_norm == 0.05


def test_lora_script_defaults(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "accelerate").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$ARGS_OUT"\n')
    (fake / "accelerate").chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", ARGS_OUT=str(tmp_path / "args"), NUM_GPUS="1",
               RANK="32")
    subprocess.run(["bash", str(REPO / "scripts" / "train_lora.sh")], env=env, check=True, capture_output=True,
                   timeout=60)
    args = (tmp_path / "args").read_text().split("\n")
    assert "--lora" in args and args[args.index("--rank") + 1] == "32"
    assert args[args.index("--network_alpha") + 1] == "64" and args[args.index("--learning_rate") + 1] == "1e-4"
    assert "--use_deepspeed" not in args
    assert parse_args([a for a in args[args.index("train.py") + 1 :] if a != ""]).lora


def test_lcm_lora_script_defaults(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "accelerate").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$ARGS_OUT"\n')
    (fake / "accelerate").chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", ARGS_OUT=str(tmp_path / "args"), NUM_GPUS="1")
    subprocess.run(["bash", str(REPO / "scripts" / "train_lcm_lora.sh")], env=env, check=True, capture_output=True,
                   timeout=60)
    args = (tmp_path / "args").read_text().split("\n")
    cfg = parse_args([a for a in args[args.index("train.py") + 1 :] if a != ""])
    assert cfg.lora and cfg.lcm_distillation and (cfg.rank, cfg.network_alpha) == (64, 64)  # the original's rank and alpha
    assert (cfg.video_sample_size, cfg.video_sample_n_frames, cfg.train_batch_size) == (256, 32, 8)
    assert cfg.learning_rate == 1e-4 and cfg.checkpoints_total_limit == 2 and cfg.validation_steps == 100
    assert (cfg.lcm_w_min, cfg.lcm_w_max, cfg.lcm_num_ddim_timesteps) == (5.0, 15.0, 50)


def test_trainable_modules_select_parameters_by_name(tiny_model_dir):
    from easyanimate.models.transformer import HunyuanTransformer3DModel
    from easyanimate.training.trainer import select_trainable
    from easyanimate.utils.weights import load_model_from_folder

    transformer = load_model_from_folder(HunyuanTransformer3DModel, tiny_model_dir / "transformer")
    cfg = TrainConfig(pretrained_model_name_or_path="m", train_data_meta="d", learning_rate=1e-4,
                      trainable_modules=["attn1"], trainable_modules_low_learning_rate=["proj_out"])
    groups = select_trainable(transformer, cfg)
    trainable = {n for n, p in transformer.named_parameters() if p.requires_grad}
    assert trainable and all("attn1" in n or "proj_out" in n for n in trainable)
    assert [g["lr"] for g in groups] == [1e-4, 5e-5]
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(
        p.numel() for n, p in transformer.named_parameters() if n in trainable)
    with pytest.raises(ValueError, match="matches no transformer parameter"):
        select_trainable(transformer, TrainConfig(pretrained_model_name_or_path="m", train_data_meta="d",
                                                  trainable_modules=["no_such_module"]))
    with pytest.raises(ValueError, match="does not apply to --lora"):
        TrainConfig(pretrained_model_name_or_path="m", train_data_meta="d", lora=True, use_ema=True)


def test_vae_path_and_the_original_launch_flags(tiny_model_dir, data, tmp_path, caplog):
    """``--vae_path`` trains on a fine-tuned VAE (train_vae.py's ``vae/`` folder; the original's training-only
    ``loss.*`` keys are dropped), and weights that do not fit stop with the mismatch named. The original train.sh's
    ``--config_path``, ``--enable_xformers_memory_efficient_attention``, ``--not_sigma_loss`` and ``--multi_stream``
    are accepted and ignored with a notice each."""
    from safetensors.torch import save_file

    from easyanimate.training import trainer as T
    from easyanimate.utils.weights import CheckpointError, read_folder_weights

    vae = {k: v * 0.5 for k, v in read_folder_weights(tiny_model_dir / "vae").items()}
    (tmp_path / "vae").mkdir()
    save_file({**vae, "loss.logvar": torch.zeros(())}, str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"))
    with caplog.at_level("WARNING", logger="easyanimate.training.config"):
        cfg = parse_args(_args(tiny_model_dir, data, "unused", "--vae_path", str(tmp_path / "vae"), "--config_path",
                               "config/easyanimate_video_slicevae_multi_text_encoder_v4.yaml", "--not_sigma_loss",
                               "--enable_xformers_memory_efficient_attention", "--multi_stream"))
    notices = [r.getMessage() for r in caplog.records]
    assert len(notices) == 4 and all("is not needed and is ignored" in n for n in notices), notices
    _, frozen = T.load_models(cfg, torch.device("cpu"), torch.float32)
    loaded = frozen.vae.state_dict()
    assert loaded.keys() == vae.keys() and all(torch.equal(loaded[k], vae[k]) for k in vae)

    del vae[next(iter(vae))]
    save_file(vae, str(tmp_path / "partial.safetensors"))
    cfg = parse_args(_args(tiny_model_dir, data, "unused", "--vae_path", str(tmp_path / "partial.safetensors")))
    with pytest.raises(CheckpointError, match="1 missing keys"):
        T.load_models(cfg, torch.device("cpu"), torch.float32)


def test_training_starts_from_a_four_channel_checkpoint(tiny_model_dir, data, tmp_path):
    """``--transformer_path`` with a text-to-video (4 input channels) checkpoint and ``--adapt_transformer_channels``
    starts the 12-channel InP model from it: the latent channels keep their weights, the new mask / masked-video
    channels start at zero. Without the flag the mismatch is refused and the error names the flag."""
    import json as _json

    from safetensors.torch import save_file

    from easyanimate.models.transformer import HunyuanTransformer3DModel
    from easyanimate.training import trainer as T
    from easyanimate.utils.weights import CheckpointError

    config = _json.loads((tiny_model_dir / "transformer" / "config.json").read_text())
    torch.manual_seed(1)
    text_to_video = HunyuanTransformer3DModel.from_config({**config, "in_channels": 4})
    state = {k: v.contiguous() for k, v in text_to_video.state_dict().items()}
    save_file(state, str(tmp_path / "t2v.safetensors"))

    cfg = parse_args(_args(tiny_model_dir, data, "unused", "--transformer_path", str(tmp_path / "t2v.safetensors"),
                           "--adapt_transformer_channels"))
    transformer, _ = T.load_models(cfg, torch.device("cpu"), torch.float32)
    loaded = transformer.state_dict()
    proj = loaded["pos_embed.proj.weight"]
    assert proj.shape[1] == 12 and torch.equal(proj[:, :4], state["pos_embed.proj.weight"])
    assert not proj[:, 4:].any()
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if k != "pos_embed.proj.weight")

    cfg = parse_args(_args(tiny_model_dir, data, "unused", "--transformer_path", str(tmp_path / "t2v.safetensors")))
    with pytest.raises(CheckpointError, match="--adapt_transformer_channels"):
        T.load_models(cfg, torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="pass that too"):
        parse_args(_args(tiny_model_dir, data, "unused", "--adapt_transformer_channels"))


def test_report_model_info_logs_the_clip_and_the_largest_gradients(tiny_model_dir, data, tmp_path):
    """``--report_model_info``: the clip value of every step and, past the clip warm-up with a gradient norm over
    1, the 10 largest per-parameter gradient norms by name (the original's debugging aid for loss spikes)."""
    from easyanimate.models.transformer import HunyuanTransformer3DModel

    cfg = parse_args(_args(tiny_model_dir, data, tmp_path, "--train_batch_size", "2", "--max_train_steps", "2",
                           "--checkpointing_steps", "2", "--report_model_info", "--abnormal_norm_clip_start", "1",
                           "--max_grad_norm", "0.1"))
    train(cfg)
    records = _log(tmp_path)
    names = {n for n, _ in HunyuanTransformer3DModel.from_config(
        json.loads((tiny_model_dir / "transformer" / "config.json").read_text())).named_parameters()}
    for record in records:
        step = record["step"] - 1  # the clip is chosen before the step counter moves
        assert record["grad_clip"] == pytest.approx(adaptive_clip_norm(step, record["grad_norm"], cfg))
        largest = record.get("grad_norms")
        if step >= 1 and record["grad_norm"] > 1:
            assert len(largest) == 10 and set(largest) <= names
            values = list(largest.values())
            assert values == sorted(values, reverse=True) and values[0] <= record["grad_norm"] + 1e-6
            assert values[0] > record["grad_clip"]  # measured before clipping (after it the total is the clip)
        else:
            assert largest is None
    assert any("grad_norms" in r for r in records), [r["grad_norm"] for r in records]


def test_low_vram_moves_each_frozen_model_in_only_while_it_encodes(baseline, tiny_model_dir, data, tmp_path):
    """``--low_vram`` keeps the VAE and text encoders parked on the CPU and moves each to the training device just
    for its encode (recorded here through ``Module.to``); the run computes what the normal run computes."""
    from easyanimate.training import trainer

    moves = []

    class Recorded(torch.nn.Linear):
        def to(self, *args, **kwargs):
            moves.append(str(args[0]))
            return self

    layer = Recorded(2, 2)
    with trainer.on_device([layer, None], "cuda:1"):
        assert moves == ["cuda:1"]
    assert moves == ["cuda:1", "cpu"]
    with pytest.raises(RuntimeError, match="boom"), trainer.on_device([layer], "cuda:1"):
        raise RuntimeError("boom")
    assert moves[-1] == "cpu"  # parked again after a failure too
    with trainer.on_device([layer], "cuda:1", enabled=False):
        pass
    assert len(moves) == 4

    encodes = []
    real_on_device = trainer.on_device

    def spy(modules, device, enabled=True):
        names = sorted(type(m).__name__ for m in modules if m is not None)
        encodes.append((names, enabled))
        return real_on_device(modules, device, enabled)

    _, result = baseline
    try:
        trainer.on_device = spy
        low = train(parse_args(_args(tiny_model_dir, data, tmp_path, "--train_batch_size", "2", *RUN,
                                     "--max_train_steps", "2", "--checkpointing_steps", "2", "--low_vram")))
    finally:
        trainer.on_device = real_on_device
    assert [loss for _, loss in low.losses] == [loss for _, loss in result.losses[:2]]
    assert (["AutoencoderKLMagvit"], True) in encodes and (["BertModel", "T5EncoderModel"], True) in encodes
