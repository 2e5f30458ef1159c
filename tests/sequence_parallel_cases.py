"""The generations tests/test_sequence_parallel.py compares between one process and a sequence-parallel launch.

Run as a script under torchrun it is the launch's worker: every process loads the model once, runs every case
through the request layer with ``ulysses_degree`` = the process count, and rank 0 saves each case's video as
``<out>/<case>.pt`` (with its transformer evaluations); the others check that they got no video.

    torchrun --nproc_per_node 2 tests/sequence_parallel_cases.py MODEL_DIR LORA_FILE OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

STEPS = 4
# threshold and start steps at which the tiny model's step cache reuses some steps (checked by the test)
CACHE = dict(step_cache=1.0, step_cache_skip_start=1)


def start_image():
    """A start image in the demo's world: a red square on grey."""
    import PIL.Image

    image = PIL.Image.new("RGB", (64, 64), (128, 128, 128))
    image.paste((220, 30, 30), (8, 8, 40, 40))
    return image


def input_video() -> torch.Tensor:
    """A (3, 16, 64, 64) video in [0, 1]: a bright bar moving down."""
    video = torch.full((3, 16, 64, 64), 0.4)
    for frame in range(16):
        video[:, frame, 2 * frame:2 * frame + 12, 10:50] = torch.tensor([0.9, 0.8, 0.1]).view(3, 1, 1)
    return video


def write_lora(path: Path, seed: int = 0) -> Path:
    """A LoRA file in the original's format for the tiny transformer (hidden 32): rank-4 updates of every block's
    attn1 q / k / v and first feed-forward layer."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    state = {}
    for block in range(4):
        for layer, (out_f, in_f) in {"attn1_to_q": (32, 32), "attn1_to_k": (32, 32), "attn1_to_v": (32, 32),
                                     "ff_net_0_proj": (139, 32)}.items():
            name = f"lora_unet__blocks_{block}_{layer}"
            state[f"{name}.lora_down.weight"] = torch.randn(4, in_f, generator=generator) * 0.3
            state[f"{name}.lora_up.weight"] = torch.randn(out_f, 4, generator=generator) * 0.3
            state[f"{name}.alpha"] = torch.tensor(4.0)
    save_file(state, str(path))
    return path


def cases(lora: str) -> dict[str, dict]:
    """Each case's request settings beside the base (tiny model, 64x64, 16 frames, guidance 3: CFG rows). 16 frames
    are 4 latent frames x 16 tokens; text to image at 48x48 has 9 tokens, which 2 processes split with one padding
    token."""
    from easyanimate.inference import IMAGE_TO_VIDEO, LONG_VIDEO, TEXT_TO_IMAGE, VIDEO_TO_VIDEO

    return {
        "t2v": dict(),
        "t2v_cache": dict(**CACHE),
        "i2v": dict(kind=IMAGE_TO_VIDEO, start_image=start_image(), sampler="Euler A"),
        "i2v_cache": dict(kind=IMAGE_TO_VIDEO, start_image=start_image(), sampler="Euler A", **CACHE),
        "t2i_padded_lora": dict(kind=TEXT_TO_IMAGE, height=48, width=48, sampler="DPM++", lora=lora,
                                lora_strength=0.8),
        "v2v": dict(kind=VIDEO_TO_VIDEO, video=input_video(), frames=8, denoise_strength=0.8, sampler="DDIM"),
        "long_video": dict(kind=LONG_VIDEO, start_image=start_image(), frames=12, partial_frames=8,
                           overlap_frames=2, steps=3, sampler="PNDM", **CACHE),
    }


def base_request(model: str):
    from easyanimate.inference import read_model_defaults

    return read_model_defaults(model).request(model=model, prompt="a red square moving down", steps=STEPS, seed=7,
                                              dtype="float32", device="cpu")


def run_cases(model: str, lora: str, ulysses_degree: int = 1, names=None) -> dict[str, tuple]:
    """``{case: (videos or None, transformer_evaluations)}`` for every case (or those in ``names``), one pipeline
    loaded for all."""
    from easyanimate.inference import generate, load_for, prepare

    base = base_request(model).replace(ulysses_degree=ulysses_degree)
    selected = {k: v for k, v in cases(lora).items() if names is None or k in names}
    pipe, results = None, {}
    for name, changes in selected.items():
        prepared = prepare(base.replace(**changes))
        pipe = pipe or load_for(prepared)
        generation = generate(pipe, prepared)
        results[name] = (generation.videos, generation.settings["transformer_evaluations"])
    return results


def main(model: str, lora: str, out: str) -> None:
    import torch.distributed as dist

    from easyanimate.inference.distributed import launched_world_size, shutdown

    results = run_cases(model, lora, ulysses_degree=launched_world_size())
    rank = dist.get_rank()
    for name, (videos, evaluations) in results.items():
        if rank == 0:
            torch.save({"videos": videos, "evaluations": evaluations}, Path(out) / f"{name}.pt")
        elif videos is not None and name != "long_video":
            raise AssertionError(f"rank {rank} decoded {name}: only rank 0 should")
    shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:4])
