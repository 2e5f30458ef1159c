"""One-shot GPU check: everything this project wants measured on a GPU, in one run of at most 8 minutes.

    python -m benchmarks.gpu_check --json gpu_check.json        # on a machine with one CUDA GPU
    python -m benchmarks.gpu_check --dry-run                     # the same code at tiny sizes on the CPU (~1 min)

Prints one table (and writes it as JSON with ``--json``), one row per check:

* **golden**: the golden vectors of ``../shared/reference/golden`` (transformer, VAE, pipeline; see
  ``tests/test_transformer.py``, ``tests/test_vae.py``, ``tests/test_pipeline_golden.py``) on the device in fp32
  (TF32 off) against the tests' tolerances (max abs error: transformer and VAE 1e-4, pipeline video 2e-3), and in
  bf16 against bf16 tolerances (relative RMS error; see ``BF16_TOLERANCES``).
* **step**: random weights at the released sizes (the transformer's defaults are the released InP config, the VAE's
  the released V4 VAE; ``tests`` check both against the key layouts in ``../shared/reference/keys``): seconds per
  denoising step (one transformer call on the guidance batch of 2, after one warm-up step) and peak GPU memory at
  384x672 with 49 and 144 frames, for bf16 on the GPU, fp8 weights on the GPU, compiled blocks, and each memory mode
  (``model_cpu_offload``, ``model_cpu_offload_and_fp8``, ``sequential_cpu_offload``), each applied by the same
  ``apply_memory_mode`` the loader uses.
* **vae**: decode seconds and peak GPU memory for the latents of those videos (bf16, as the pipeline decodes).

Every row is guarded: an out-of-memory error is reported as an ``OOM`` row (with the advice the pipeline would give)
and the next row runs; any other error is an ``error`` row. A time budget (``--budget-s``, default 420 s) skips the
remaining rows once the elapsed time plus a row's estimate would exceed it, so the whole run stays under 8 minutes.
``--dry-run`` runs every row on the CPU with the tiny model's configs, 32x48 pixels, 9 and 16 frames, one golden case
of each kind and compiled blocks (at 9 frames only) traced by dynamo but run by its "eager" backend (inductor's C++
build takes minutes on a small CPU), so that a test can run it and it cannot rot.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GOLDEN = Path(os.environ.get("EASYANIMATE_SHARED", REPO.parent / "shared")) / "reference" / "golden"
FP32_TOLERANCES = {"transformer": 1e-4, "vae": 1e-4, "pipeline": 2e-3}  # max abs error, as the tests
# bf16 relative RMS error against fp32. Transformer: tests/test_transformer.py's bound (CPU: at most 0.009). VAE and
# pipeline: about 3x the largest error bf16 gives on a CPU over all cases (--device cpu --only golden: VAE 0.037,
# pipeline 0.042, i.e. ~10 units of bf16 rounding, 2^-8); a GPU also accumulates bf16 products in fp32.
BF16_TOLERANCES = {"transformer": 0.03, "vae": 0.1, "pipeline": 0.12}
TRANSFORMER_CASES = [("transformer_t2v", "case_video_f3_8x8"), ("transformer_t2v", "case_image_f1_8x12"),
                     ("transformer_inpaint", "case_video_f3_8x8"), ("transformer_inpaint", "case_image_f1_8x12")]
VAE_CASES = ["v4_cache_f1_48x32", "v4_cache_f8_32x32", "v4_cache_f24_32x48", "v4_cache_f9_32x32_oddlen",
             "v4_cache_tiled_f8_64x48", "v3_slice_f9_32x32", "v3_slice_f17_32x32"]
PIPELINE_CASES = ["t2v_euler", "t2v_euler_a", "t2v_dpmpp", "t2v_pndm", "t2v_ddim", "t2v_zh_euler", "t2i_ddim",
                  "i2v_start_euler", "i2v_start_end_euler", "v2v_euler"]
STEP_SETTINGS = [  # (row name, memory mode for apply_memory_mode, fp8 on the GPU, compiled)
    ("bf16", "gpu", False, False),
    ("fp8", "gpu", True, False),
    ("model_cpu_offload", "model_cpu_offload", False, False),
    ("model_cpu_offload_and_fp8", "model_cpu_offload_and_fp8", False, False),
    ("sequential_cpu_offload", "sequential_cpu_offload", False, False),
    ("compiled", "gpu", False, True),
    ("compiled+fp8 offload", "model_cpu_offload_and_fp8", False, True),
]


@dataclass
class Sizes:
    """What the speed rows run at: the released model at 384x672, or tiny configs for --dry-run."""

    height: int
    width: int
    frames: tuple[int, ...]
    transformer_config: dict
    vae_config: dict
    timed_steps: int
    golden_subset: bool
    compile_backend: str
    compiled_frames: tuple[int, ...] | None = None  # frame counts of the compiled settings (None: all)


def released_sizes() -> Sizes:
    return Sizes(384, 672, (49, 144), {}, {}, timed_steps=2, golden_subset=False, compile_backend="inductor")


def dry_run_sizes() -> Sizes:
    from easyanimate.demo.tiny_model import TRANSFORMER_CONFIG, VAE_CONFIG

    strip = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    return Sizes(32, 48, (9, 16), strip(TRANSFORMER_CONFIG), strip(VAE_CONFIG), timed_steps=1, golden_subset=True,
                 compile_backend="eager", compiled_frames=(9,))


# ------------------------------------------------------------------------------------------------ rows and budget


@dataclass
class Row:
    """One line of the table. ``status``: ok, FAIL (outside tolerance), OOM, error or skipped."""

    section: str
    name: str
    setting: str
    status: str = "ok"
    error: float | None = None  # golden: the measured error
    tolerance: float | None = None
    seconds: float | None = None  # step: seconds per denoising step; vae: decode seconds; golden: run time
    peak_gib: float | None = None  # peak GPU memory allocated during the row (None on the CPU)
    note: str = ""


@dataclass
class Check:
    """Runs rows under a time budget, each guarded, and collects them."""

    device: torch.device
    budget_s: float
    started: float = field(default_factory=time.monotonic)
    rows: list[Row] = field(default_factory=list)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def run(self, section: str, name: str, setting: str, body: Callable[[Row], None], estimate_s: float = 10.0):
        """Run ``body(row)`` (which fills the row) unless the budget cannot take ``estimate_s`` more seconds;
        out-of-memory and other errors become the row's status. Prints the row when done."""
        row = Row(section, name, setting)
        if self.elapsed() + estimate_s > self.budget_s:
            row.status, row.note = "skipped", f"time budget ({self.budget_s:.0f} s) would be exceeded"
        else:
            reset_memory(self.device)
            try:
                body(row)
                row.peak_gib = peak_gib(self.device)
            except torch.cuda.OutOfMemoryError as exc:
                from easyanimate.inference.loading import out_of_memory_advice

                row.status = "OOM"
                row.note = f"{str(exc).splitlines()[0][:80]}; pipeline advice: " + out_of_memory_advice(
                    setting if setting in _MODE_NAMES else "gpu")
            except Exception as exc:  # noqa: BLE001 - every failure is a row, the next row still runs
                row.status, row.note = "error", f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                traceback.print_exc(limit=3)
            finally:
                gc.collect()
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
        self.rows.append(row)
        print(format_row(row), flush=True)
        return row


_MODE_NAMES = ("gpu", "model_cpu_offload", "model_cpu_offload_and_fp8", "sequential_cpu_offload")


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def relative_rms(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.float().cpu(), want.float().cpu()
    return ((got - want).pow(2).mean() / want.pow(2).mean().clamp_min(1e-30)).sqrt().item()


def max_abs(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.float().cpu() - want.float().cpu()).abs().max().item()


def judge(row: Row, error: float, tolerance: float) -> None:
    row.error, row.tolerance = error, tolerance
    row.status = "ok" if error <= tolerance else "FAIL"


def fp32_exact(enabled: bool) -> None:
    """fp32 rows compare at 1e-4: TF32 matmuls and convolutions (on by default for cuDNN) would not."""
    torch.backends.cuda.matmul.allow_tf32 = not enabled
    torch.backends.cudnn.allow_tf32 = not enabled


# ------------------------------------------------------------------------------------------------ golden


def _load_case(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["case"])
    return load_file(str(path)), meta


def _to(value, device, dtype=None):
    if torch.is_tensor(value):
        return value.to(device, dtype if dtype is not None and value.is_floating_point() else value.dtype)
    if isinstance(value, tuple):
        return tuple(_to(v, device, dtype) for v in value)
    return value


def golden_transformer(check: Check, variant: str, case: str, dtype: torch.dtype) -> None:
    from safetensors.torch import load_file

    from easyanimate.models.transformer import HunyuanTransformer3DModel

    def body(row: Row) -> None:
        start = time.perf_counter()
        folder = GOLDEN / variant
        model = HunyuanTransformer3DModel.from_config(json.loads((folder / "config.json").read_text()))
        model.load_state_dict(load_file(str(folder / "weights.safetensors")), strict=True)
        model = model.eval().to(check.device)
        tensors = load_file(str(folder / f"{case}.safetensors"))
        inputs = {k[len("input."):]: v for k, v in tensors.items() if k.startswith("input.")}
        inputs["image_rotary_emb"] = (inputs.pop("image_rotary_emb_cos"), inputs.pop("image_rotary_emb_sin"))
        inputs = {k: _to(v, check.device) for k, v in inputs.items()}
        with torch.no_grad():
            if dtype == torch.float32:
                judge(row, max_abs(model(**inputs).sample, tensors["output.sample"]), FP32_TOLERANCES["transformer"])
            else:  # against fp32 at the bf16-rounded timestep, as the V4 pipeline hands it over
                rounded = {**inputs, "timestep": inputs["timestep"].to(dtype).float()}
                reference = model(**rounded).sample
                out = model.to(dtype)(**{k: _to(v, check.device, dtype) for k, v in inputs.items()}).sample
                judge(row, relative_rms(out, reference), BF16_TOLERANCES["transformer"])
        row.seconds = time.perf_counter() - start

    check.run("golden", f"transformer {variant[12:]} {case[5:]}", _dtype_name(dtype), body, estimate_s=5)


def golden_vae(check: Check, case: str, dtype: torch.dtype) -> None:
    from safetensors.torch import load_file

    from easyanimate.models.vae import AutoencoderKLMagvit
    from easyanimate.utils.weights import load_state_dict_strict

    def body(row: Row) -> None:
        start = time.perf_counter()
        tensors, meta = _load_case(GOLDEN / "vae" / f"case_{case}.safetensors")
        model = AutoencoderKLMagvit.from_config(json.loads((GOLDEN / "vae" / meta["config"]).read_text()))
        load_state_dict_strict(model, load_file(str(GOLDEN / "vae" / "weights.safetensors")), source="golden vae")
        model = model.eval().to(check.device, dtype)
        with torch.no_grad():
            posterior = model.encode(tensors["input.video"].to(check.device, dtype)).latent_dist
            decoded = model.decode(tensors["output.posterior_mean"].to(check.device, dtype)).sample
        pairs = [(posterior.mean, tensors["output.posterior_mean"]), (posterior.logvar, tensors["output.posterior_logvar"]),
                 (decoded, tensors["output.decoded_from_mean"])]
        if dtype == torch.float32:
            judge(row, max(max_abs(a, b) for a, b in pairs), FP32_TOLERANCES["vae"])
        else:  # mean and decoded video (logvar is near -30 for these random weights: relative error meaningless)
            judge(row, max(relative_rms(a, b) for a, b in (pairs[0], pairs[2])), BF16_TOLERANCES["vae"])
        row.seconds = time.perf_counter() - start

    check.run("golden", f"vae {case}", _dtype_name(dtype), body, estimate_s=8)


def golden_pipeline(check: Check, case: str, dtype: torch.dtype, cache: dict) -> None:
    from PIL import Image

    from easyanimate.pipeline import EasyAnimatePipeline

    def body(row: Row) -> None:
        start = time.perf_counter()
        if dtype not in cache:
            cache.clear()  # one pipeline at a time
            pipe = EasyAnimatePipeline.from_pretrained(GOLDEN / "pipeline" / "model", torch_dtype=dtype,
                                                       device=check.device)
            pipe.set_progress_bar_config(disable=True)
            cache[dtype] = pipe
        pipe = cache[dtype]
        t, meta = _load_case(GOLDEN / "pipeline" / f"case_{case}.safetensors")
        call = meta["call"]
        pipe.set_sampler(call["sampler"])
        pipe.vae_posterior = "mode" if call["vae_posterior"] == "mode" else "sample"
        latents = t.get("input.latents")
        with torch.no_grad():
            out = pipe(prompt=call["prompt"], negative_prompt=call["negative_prompt"], height=call["height"],
                       width=call["width"], video_length=call["video_length"],
                       num_inference_steps=call["num_inference_steps"], guidance_scale=call["guidance_scale"],
                       generator=torch.Generator("cpu").manual_seed(call["generator_seed"]),
                       latents=None if latents is None else latents.to(check.device),
                       video=t["input.video_u8"] / 255,
                       mask_video=t["input.mask_video_u8"].to(getattr(torch, call["mask_video_dtype"])),
                       clip_image=Image.fromarray(t["input.clip_image"].numpy()) if "input.clip_image" in t else None,
                       strength=call["strength"])
        expected = t["output.videos"]
        if dtype == torch.float32:
            judge(row, max_abs(out.videos, expected), FP32_TOLERANCES["pipeline"])
        else:
            judge(row, relative_rms(out.videos, expected), BF16_TOLERANCES["pipeline"])
        row.seconds = time.perf_counter() - start

    check.run("golden", f"pipeline {case}", _dtype_name(dtype), body, estimate_s=10)


def run_golden(check: Check, sizes: Sizes) -> None:
    if not GOLDEN.is_dir():
        check.rows.append(Row("golden", "all", "-", "skipped", note=f"no golden vectors at {GOLDEN}"))
        return
    # the dry run's subset: one case of each kind, the quickest (an image where there is one)
    transformer_cases = TRANSFORMER_CASES[3:] if sizes.golden_subset else TRANSFORMER_CASES
    vae_cases = VAE_CASES[:1] if sizes.golden_subset else VAE_CASES
    pipeline_cases = ["t2i_ddim"] if sizes.golden_subset else PIPELINE_CASES
    for dtype in (torch.float32, torch.bfloat16):
        fp32_exact(dtype == torch.float32)
        for variant, case in transformer_cases:
            golden_transformer(check, variant, case, dtype)
        for case in vae_cases:
            golden_vae(check, case, dtype)
        cache: dict = {}
        for case in pipeline_cases:
            golden_pipeline(check, case, dtype, cache)
        cache.clear()
    fp32_exact(False)


# ------------------------------------------------------------------------------------------------ speed


def random_weights_(module: torch.nn.Module, seed: int = 0) -> None:
    """Random weights that keep activations finite through 40 blocks: N(0, 1/fan_in) for matrices and kernels,
    norms at weight 1 bias 0, other vectors N(0, 0.02). Values do not change speed; finite values keep fp8 scales
    and kernels on their normal paths."""
    g = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = math.prod(p.shape[1:])
                p.normal_(0, 1 / math.sqrt(fan_in), generator=g)
            elif "norm" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                p.normal_(0, 0.02, generator=g)


def build_models(check: Check, sizes: Sizes, dtype: torch.dtype):
    """The transformer (kept on the CPU as the master copy each row copies) and the VAE (on the device), built
    directly on the device (GPU random init is fast) in ``dtype``."""
    from easyanimate.models.transformer import HunyuanTransformer3DModel
    from easyanimate.models.vae import AutoencoderKLMagvit

    with torch.device(check.device):
        transformer = HunyuanTransformer3DModel(**sizes.transformer_config).eval()
        random_weights_(transformer)
        transformer = transformer.to(dtype)
        vae = AutoencoderKLMagvit.from_config(sizes.vae_config).eval()  # takes release-style config keys
        random_weights_(vae, seed=1)
        vae = vae.to(dtype)
    return transformer.to("cpu"), vae


def step_inputs(transformer, vae, sizes: Sizes, frames: int, device: torch.device, dtype: torch.dtype) -> dict:
    """One guidance batch (2 rows) of latents, inpaint latents and conditioning inputs at ``frames`` frames."""
    cfg = transformer.config
    latent_frames = vae.num_latent_frames(frames)
    shape = (2, 4, latent_frames, sizes.height // 8, sizes.width // 8)
    g = torch.Generator(device=device).manual_seed(0)
    randn = lambda *s: torch.randn(*s, generator=g, device=device, dtype=dtype)  # noqa: E731
    return dict(
        latents=randn(*shape), inpaint_latents=randn(2, cfg.in_channels - 4, *shape[2:]),
        conditioning=dict(
            encoder_hidden_states=randn(2, cfg.text_len, cfg.cross_attention_dim),
            text_embedding_mask=torch.ones(2, cfg.text_len, device=device),
            encoder_hidden_states_t5=randn(2, cfg.text_len_t5, cfg.cross_attention_dim_t5),
            text_embedding_mask_t5=torch.ones(2, cfg.text_len_t5, device=device),
            image_meta_size=torch.tensor([[sizes.height, sizes.width, sizes.height, sizes.width, 0, 0]] * 2,
                                         device=device, dtype=dtype),
            style=torch.zeros(2, dtype=torch.long, device=device),
            clip_encoder_hidden_states=randn(2, 256, cfg.projection_dim),  # CLIP ViT-L/14's 16 x 16 patches
            clip_attention_mask=torch.ones(2, cfg.n_query, device=device, dtype=dtype),
        ),
    )


def make_pipeline(transformer):
    """An EasyAnimatePipeline holding only the transformer (text encoders and VAE are not part of a step), so that
    apply_memory_mode puts its hooks on it exactly as on a loaded model."""
    from easyanimate.pipeline import EasyAnimatePipeline, make_scheduler

    scheduler = make_scheduler("Euler", {"num_train_timesteps": 1000, "prediction_type": "v_prediction"})
    return EasyAnimatePipeline(vae=None, transformer=transformer, text_encoder=None, tokenizer=None,
                               text_encoder_2=None, tokenizer_2=None, scheduler=scheduler)


def prepare_setting(check: Check, sizes: Sizes, master, memory_mode: str, fp8_on_gpu: bool, compiled: bool):
    """A copy of the master transformer in one setting: moved to the GPU for "gpu", fp8 weights, the memory mode's
    hooks (apply_memory_mode, as load_pipeline), compiled blocks (as load_pipeline: after the hooks)."""
    from easyanimate.inference.loading import apply_memory_mode
    from easyanimate.models.compiled import compile_blocks
    from easyanimate.models.fp8 import enable_fp8_weights

    transformer = copy.deepcopy(master)  # fp8 and compiling change the model in place
    if memory_mode == "gpu":
        transformer.to(check.device)
    if fp8_on_gpu:
        enable_fp8_weights(transformer)
    pipe = make_pipeline(transformer)
    apply_memory_mode(pipe, memory_mode, check.device)
    if compiled:
        compile_blocks(transformer, backend=sizes.compile_backend)
    return transformer, pipe


def time_steps(check: Check, sizes: Sizes, state: dict, vae, frames: int, name: str, memory_mode: str,
               dtype: torch.dtype, estimate_s: float) -> None:
    """One row: seconds per denoising step at ``frames`` frames with the setting in ``state`` (prepared by the
    setting's first row). In the "gpu" setting the VAE stays on the GPU, as it would; otherwise it is offloaded."""

    def body(row: Row) -> None:
        if "transformer" not in state:
            state["transformer"], state["pipe"] = state["prepare"]()
        transformer = state["transformer"]
        vae.to(check.device if memory_mode == "gpu" else "cpu")
        inputs = step_inputs(transformer, vae, sizes, frames, check.device, dtype)
        latent_shape = tuple(inputs["latents"].shape)
        with torch.no_grad():
            conditioning = transformer.prepare_conditioning(**inputs["conditioning"],
                                                            latent_shape=(2, *latent_shape[2:]))

            def step(t: float) -> None:
                timestep = torch.full((2,), t, device=check.device, dtype=dtype)
                transformer(inputs["latents"], timestep, conditioning=conditioning,
                            inpaint_latents=inputs["inpaint_latents"])

            start = time.perf_counter()
            step(999.0)  # warm-up: the offload hook moves the model in; compiled blocks compile
            synchronize(check.device)
            warm = time.perf_counter() - start
            start = time.perf_counter()
            for i in range(sizes.timed_steps):
                step(900.0 - 100 * i)
            synchronize(check.device)
        row.seconds = (time.perf_counter() - start) / sizes.timed_steps
        tokens = latent_shape[2] * (latent_shape[3] // 2) * (latent_shape[4] // 2)
        row.note = f"{tokens} tokens x 2 rows; first step {warm:.1f} s"

    check.run("step", f"{sizes.height}x{sizes.width} {frames} frames", name, body,
              estimate_s=estimate_s if check.device.type == "cuda" else 1)


def time_decode(check: Check, sizes: Sizes, vae, frames: int, tiling: bool, dtype: torch.dtype) -> None:
    from easyanimate.pipeline import EasyAnimatePipeline

    def body(row: Row) -> None:
        vae.to(check.device)
        if tiling:
            vae.enable_tiling()
        latent_frames = vae.num_latent_frames(frames)
        g = torch.Generator(device=check.device).manual_seed(0)
        latents = torch.randn(1, 4, latent_frames, sizes.height // 8, sizes.width // 8, generator=g,
                              device=check.device, dtype=dtype) * vae.config.scaling_factor
        holder = type("Holder", (), {"vae": vae})()  # decode_latents needs only .vae
        start = time.perf_counter()
        video = EasyAnimatePipeline.decode_latents(holder, latents)
        synchronize(check.device)
        row.seconds = time.perf_counter() - start
        row.note = f"{latent_frames} latent frames -> {tuple(video.shape[2:])}"
        vae.disable_tiling()

    check.run("vae", f"decode {sizes.height}x{sizes.width} {frames} frames", "bf16" + (" tiled" if tiling else ""),
              body, estimate_s=30 * frames / 49 if check.device.type == "cuda" else 1)


def run_speed(check: Check, sizes: Sizes) -> None:
    """The setup row, then per setting its rows for each frame count (a setting is prepared once, so compiled
    blocks compile at the first frame count and recompile once, with dynamic shapes, at the next), then the VAE
    decodes. Settings run in STEP_SETTINGS order, the compiled ones last: they take longest and are the first to
    go when the budget runs out."""
    dtype = torch.bfloat16
    models = {}

    def build(row: Row) -> None:
        start = time.perf_counter()
        models["transformer"], models["vae"] = build_models(check, sizes, dtype)
        row.seconds = time.perf_counter() - start
        row.note = f"transformer {sum(p.numel() for p in models['transformer'].parameters()) / 1e9:.2f} G params"

    check.run("setup", "random weights at the released sizes" if not sizes.golden_subset else "tiny random weights",
              "bf16", build, estimate_s=30 if check.device.type == "cuda" else 1)
    if not models:
        return
    master, vae = models["transformer"], models["vae"]
    settings = [s for s in STEP_SETTINGS if not s[3]] + [s for s in STEP_SETTINGS if s[3]]
    for position, (name, memory_mode, fp8_on_gpu, compiled) in enumerate(settings):
        state = {"prepare": lambda m=memory_mode, f=fp8_on_gpu, c=compiled: prepare_setting(check, sizes, master,
                                                                                              m, f, c)}
        for frames in (sizes.compiled_frames or sizes.frames) if compiled else sizes.frames:
            per_step = (30 if memory_mode == "sequential_cpu_offload" else 10) * frames / 49
            setup = (90 if compiled else 15 if memory_mode != "gpu" or fp8_on_gpu else 5)
            time_steps(check, sizes, state, vae, frames, name, memory_mode, dtype, setup + per_step)
        state.clear()
        if compiled:
            torch._dynamo.reset()
        if position == len([s for s in settings if not s[3]]) - 1:  # after the eager settings: the VAE
            for frames in sizes.frames:
                time_decode(check, sizes, vae, frames, False, dtype)
            time_decode(check, sizes, vae, sizes.frames[-1], True, dtype)


# ------------------------------------------------------------------------------------------------ report


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "").replace("float32", "fp32").replace("bfloat16", "bf16")


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


HEADER = f"{'section':7} {'check':34} {'setting':26} {'status':7} {'error':>9} {'tol':>7} {'s':>8} {'GiB':>7}  note"


def format_row(row: Row) -> str:
    return (f"{row.section:7} {row.name[:34]:34} {row.setting[:26]:26} {row.status:7} {_fmt(row.error, '9.2e')} "
            f"{_fmt(row.tolerance, '7.0e')} {_fmt(row.seconds, '8.3f')} {_fmt(row.peak_gib, '7.2f')}  {row.note}")


def environment(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
            "cpu": platform.processor() or platform.machine()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return info


def main(argv: list[str] | None = None) -> dict:
    """Run the check; returns (and prints, and with --json writes) ``{"environment", "seconds", "rows"}``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (what the test runs)")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --dry-run)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip rows that would end after this")
    parser.add_argument("--only", nargs="+", choices=["golden", "speed"], default=["golden", "speed"])
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cpu" if args.dry_run else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA GPU here: run with --dry-run (tiny sizes on the CPU) to check the script itself")
    sizes = dry_run_sizes() if args.dry_run else released_sizes()
    check = Check(device, args.budget_s)
    print(f"gpu_check on {environment(device)}{' (dry run: tiny sizes)' if args.dry_run else ''}")
    print(HEADER, flush=True)
    if "golden" in args.only:
        run_golden(check, sizes)
    if "speed" in args.only:
        run_speed(check, sizes)
    result = {"environment": environment(device), "dry_run": args.dry_run, "seconds": round(check.elapsed(), 1),
              "rows": [asdict(r) for r in check.rows]}
    failed = [r for r in check.rows if r.status not in ("ok", "skipped")]
    print(f"\n{len(check.rows)} rows in {check.elapsed():.0f} s; {len(failed)} not ok")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
