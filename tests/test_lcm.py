"""LCM-LoRA distillation: solver, boundary scalings and loss against diffusers and an exact
denoiser; a short distillation run through train.py; the LCM sampler."""

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, LCMScheduler
from PIL import Image

from easyanimate.training.lcm import DDIMSolver, LCMDistillation, boundary_scalings, predicted_x0_and_noise
from easyanimate.training.objective import DiffusionObjective

V4_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.03, beta_schedule="scaled_linear",
                    steps_offset=1, prediction_type="v_prediction", clip_sample=False)


def _objective(seed=0) -> DiffusionObjective:
    return DiffusionObjective(DDPMScheduler(**V4_SCHEDULER), seed=seed)


def test_ddim_solver_step_matches_diffusers_ddim():
    scheduler = DDPMScheduler(**V4_SCHEDULER)
    solver = DDIMSolver(scheduler.alphas_cumprod, 1000, 50)
    assert solver.timesteps.tolist() == list(range(19, 1000, 20))  # the LCM scheduler's grid
    ddim = DDIMScheduler(**V4_SCHEDULER, set_alpha_to_one=False)  # the solver ends at alpha_bar[0], as the original
    ddim.set_timesteps(50)
    torch.manual_seed(0)
    for index in (0, 7, 49):
        t = int(solver.timesteps[index])
        sample, output = torch.randn(2, 4, 3, 4, 4), torch.randn(2, 4, 3, 4, 4)
        x0, eps = predicted_x0_and_noise(output, sample, scheduler.alphas_cumprod, torch.tensor([t, t]), "v_prediction")
        ours = solver.step(x0, eps, torch.tensor([index, index]))
        theirs = ddim.step(output, t, sample, eta=0.0).prev_sample
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_boundary_scalings_match_the_lcm_scheduler():
    lcm = LCMScheduler(**V4_SCHEDULER)
    t = torch.tensor([0, 19, 500, 999])
    c_skip, c_out = boundary_scalings(t, 10.0)
    for i, step in enumerate(t.tolist()):
        skip, out = lcm.get_scalings_for_boundary_condition_discrete(step)
        assert c_skip[i].item() == pytest.approx(float(skip), rel=1e-6)
        assert c_out[i].item() == pytest.approx(float(out), rel=1e-6)
    assert c_skip[0] == 1 and c_out[0] == 0  # at t = 0 the consistency function is the identity


def _exact_denoiser(clean: torch.Tensor, alphas_cumprod: torch.Tensor):
    """The v-prediction of a model that knows the clean latents are ``clean``."""
    def model(x, t, _inputs):
        alpha_bar = alphas_cumprod[t.round().long()].view(-1, 1, 1, 1, 1)
        alpha, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        eps = (x.float() - alpha * clean) / sigma
        return alpha * eps - sigma * clean
    return model


def test_loss_singles_out_the_guided_consistency_function():
    """Teachers that denoise exactly to the constants ``cond`` / ``uncond``, w = 4, every point of the DDIM grid
    once. The student that denoises to ``cond + w (cond - uncond)`` (where the guided teacher's trajectory ends) is
    consistent: only the last DDIM step, which stops at alpha_bar[0] < 1, leaves a residue. A student that ignores
    the guidance fails the boundary condition at t = 19 -> 0, one whose answer drifts with t fails consistency."""
    objective = _objective()
    alphas = objective.scheduler.alphas_cumprod.float()
    shape = (50, 4, 1, 2, 2)
    cond, uncond = torch.full(shape, 0.5), torch.full(shape, 0.2)
    guided = cond + 4.0 * (cond - uncond)
    keys = [(0, p, 0) for p in range(50)]
    cond_teacher, uncond_teacher = _exact_denoiser(cond, alphas), _exact_denoiser(uncond, alphas)

    def teacher(x, t, inputs):
        return (cond_teacher if inputs == "cond" else uncond_teacher)(x, t, inputs)

    def drifting(x, t, inputs):
        return _exact_denoiser(guided * (1 + t.view(-1, 1, 1, 1, 1) / 1000), alphas)(x, t, inputs)

    losses = {}
    for loss_type in ("l2", "huber"):
        distillation = LCMDistillation(objective, w_min=4.0, w_max=4.0, loss_type=loss_type)
        distillation.draw = lambda keys: (torch.arange(len(keys)), torch.full((len(keys),), 4.0))
        for name, student in (("exact", _exact_denoiser(guided, alphas)), ("unguided", cond_teacher),
                              ("drifting", drifting)):
            losses[loss_type, name] = float(distillation.loss(student, teacher, guided.clone(), keys, "cond",
                                                              "uncond", torch.float32))
    assert losses["l2", "exact"] < 1e-4
    assert losses["l2", "unguided"] > 100 * losses["l2", "exact"]
    assert losses["l2", "drifting"] > 10 * losses["l2", "exact"]
    assert losses["huber", "unguided"] > 10 * losses["huber", "exact"]


def test_draws_are_keyed_per_sample_and_in_range():
    distillation = LCMDistillation(_objective(seed=3), w_min=5.0, w_max=15.0)
    keys = [(0, p, 0) for p in range(200)]
    index, scale = distillation.draw(keys)
    assert index.min() >= 0 and index.max() <= 49 and len(set(index.tolist())) > 40
    assert scale.min() >= 5.0 and scale.max() <= 15.0
    again, _ = distillation.draw(keys[100:])
    assert torch.equal(again, index[100:])  # a sample's draw does not depend on its batch
    with pytest.raises(ValueError, match="l2 or huber"):
        LCMDistillation(_objective(), loss_type="l1")


def test_lcm_distillation_run_trains_a_lora_for_the_lcm_sampler(tiny_model_dir, tmp_path):
    from easyanimate.pipeline import EasyAnimatePipeline
    from easyanimate.training.config import parse_args
    from easyanimate.training.trainer import train

    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(tmp_path / f"img{i}.png")
        rows.append({"file_path": f"img{i}.png", "text": f"picture number {i}", "type": "image"})
    (tmp_path / "meta.json").write_text(json.dumps(rows))
    out = tmp_path / "lcm"
    args = ["--pretrained_model_name_or_path", str(tiny_model_dir), "--train_data_meta", str(tmp_path / "meta.json"),
            "--train_data_dir", str(tmp_path), "--output_dir", str(out), "--image_sample_size", "32",
            "--video_sample_size", "32", "--token_sample_size", "32", "--train_batch_size", "2",
            "--max_train_steps", "3", "--checkpointing_steps", "3", "--learning_rate", "1e-2", "--report_to", "none",
            "--lora", "--rank", "4", "--network_alpha", "4", "--lcm_distillation", "--lcm_loss_type", "huber",
            "--precompute_text_embeddings", "--validation_prompts", "a picture", "--validation_steps", "3",
            "--validation_inference_steps", "2", "--video_sample_n_frames", "8"]
    result = train(parse_args(args))
    assert result.global_step == 3 and all(np.isfinite(loss) for _, loss in result.losses)
    assert (out / "sample" / "sample-3-0.gif").is_file()

    pipe = EasyAnimatePipeline.from_pretrained(tiny_model_dir, device="cpu", sampler="LCM")

    def run():
        return pipe("a picture", height=32, width=32, video_length=1, num_inference_steps=2, guidance_scale=1.0,
                    generator=torch.Generator().manual_seed(0), output_type="pt").videos

    plain = run()
    pipe.load_lora(out / "checkpoint-3.safetensors", 1.0)
    assert (run() - plain).abs().max() > 1e-4


def test_lcm_distillation_needs_a_lora():
    from easyanimate.training.config import TrainConfig

    with pytest.raises(ValueError, match="add --lora"):
        TrainConfig(pretrained_model_name_or_path="m", train_data_meta="d", lcm_distillation=True)
