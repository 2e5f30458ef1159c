"""Assembling the demo model folder around the trained parts.

``base``: a complete model folder in the released layout whose text encoders, tokenizers, CLIP image encoder and
scheduler come from the tiny-model builder (frozen during training; its tokenizers cover the demo vocabulary in
English and Chinese), with the demo's own transformer (freshly initialised, the model's own init) and VAE
architecture (random until ``train_vae.py`` has trained it).

``set-vae``: put a trained VAE into the folder and set its ``scaling_factor`` so the scaled latents of the dataset
have unit standard deviation (the released 0.18215 is a property of the released VAE, not of ours).

``ship``: copy a trained transformer in, store transformer and VAE weights in half precision, and copy the folder
to its destination (``models/EasyAnimateV4-demo``).

    python -m easyanimate.demo.build base OUT_DIR
    python -m easyanimate.demo.build set-vae MODEL_DIR VAE_DIR METADATA
    python -m easyanimate.demo.build ship MODEL_DIR TRANSFORMER_DIR DEST
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..utils.atomic import building_directory
from ..utils.weights import read_folder_weights
from .tiny_model import TRANSFORMER_CONFIG, VAE_CONFIG, build_tiny_model

# The InP transformer of the demo: 64 tokens for a 16-frame 64x64 clip (4 latent frames of 4x4 patches).
DEMO_TRANSFORMER_CONFIG = {
    **TRANSFORMER_CONFIG,
    "hidden_size": 192,
    "num_attention_heads": 4,
    "attention_head_dim": 48,
    "num_layers": 8,
    "mlp_ratio": 4.0,
    "sample_size": 8,
    # captions are at most ~20 tokens: 32-token tables instead of V4's 77 + 256, so cross-attention and the mT5
    # pooler are not diluted by ~320 padding slots (the pipeline and train.py take the lengths from this config)
    "text_len": 32,
    "text_len_t5": 32,
}
# The V4 cache VAE at 1/16 of the released width: spatial /8, temporal /4, 4 latent channels.
DEMO_VAE_CONFIG = {
    **VAE_CONFIG,
    "ch": 8,
    "block_out_channels": [8, 16, 32, 32],
    "layers_per_block": 1,
    "norm_num_groups": 1,
    "sample_size": 64,
}
WEIGHTS = "diffusion_pytorch_model.safetensors"
# The tiny mT5's attention / feed-forward outputs at 0.2 of their random gain, so a word's state depends mostly on
# the word (see tiny_model.write_t5_encoder), as in a trained encoder.
DEMO_T5_RESIDUAL_SCALE = 0.2


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def build_base_model(out_dir: str | os.PathLike, seed: int = 0, *, overwrite: bool = False) -> Path:
    """The untrained demo model folder (see the module docstring)."""
    from ..models.transformer import HunyuanTransformer3DModel
    from ..models.vae import AutoencoderKLMagvit

    out_dir = Path(out_dir)
    build_tiny_model(out_dir, seed=seed, overwrite=overwrite, t5_residual_scale=DEMO_T5_RESIDUAL_SCALE)
    torch.manual_seed(seed)
    for name, cls, config in (("transformer", HunyuanTransformer3DModel, DEMO_TRANSFORMER_CONFIG),
                              ("vae", AutoencoderKLMagvit, DEMO_VAE_CONFIG)):
        model = cls.from_config(config)
        folder = out_dir / name
        _write_json(folder / "config.json", config)
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(folder / WEIGHTS), metadata={"format": "pt"})
    return out_dir


@torch.no_grad()
def latent_std(vae, metadata: str | os.PathLike, max_videos: int = 64) -> float:
    """Standard deviation of the (unscaled) posterior means of up to ``max_videos`` dataset videos."""
    from ..data.metadata import load_metadata
    from ..utils.video_io import read_video

    metadata = Path(metadata)
    entries = [e for e in load_metadata(metadata, metadata.parent) if e["type"] == "video"]
    step = max(len(entries) // max_videos, 1)
    latents = []
    for entry in entries[::step][:max_videos]:
        video = read_video(entry["file_path"], num_frames=16)[None] * 2 - 1
        latents.append(vae.encode(video).latent_dist.mode().flatten())
    return float(torch.cat(latents).std())


def set_vae(model_dir: str | os.PathLike, vae_dir: str | os.PathLike, metadata: str | os.PathLike) -> float:
    """Copy a trained VAE into ``model_dir/vae`` with ``scaling_factor = 1 / latent std``; returns the factor."""
    from ..models.vae import AutoencoderKLMagvit
    from ..utils.weights import load_model_from_folder

    vae = load_model_from_folder(AutoencoderKLMagvit, vae_dir, None, torch_dtype=torch.float32).eval()
    factor = round(1.0 / latent_std(vae, metadata), 5)
    target = Path(model_dir) / "vae"
    config = json.loads((Path(vae_dir) / "config.json").read_text())
    config["scaling_factor"] = factor
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    _write_json(target / "config.json", config)
    shutil.copy2(Path(vae_dir) / WEIGHTS, target / WEIGHTS)
    return factor


def _save_half(state: dict, path: Path) -> None:
    save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}, str(path),
              metadata={"format": "pt"})


def ship(model_dir: str | os.PathLike, transformer_dir: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Copy ``model_dir`` to ``dest`` with the transformer from ``transformer_dir``, transformer and VAE weights in
    fp16 (the loaders cast them to the compute dtype). Written next to ``dest`` and renamed, replacing an existing ``dest``
    (its README.md, the model card, is kept)."""
    model_dir, transformer_dir, dest = Path(model_dir), Path(transformer_dir), Path(dest)
    with building_directory(dest) as work:
        shutil.rmtree(work)
        shutil.copytree(model_dir, work)
        for name, source in (("transformer", transformer_dir), ("vae", model_dir / "vae")):
            state = read_folder_weights(source)
            config = json.loads((source / "config.json").read_text())
            shutil.rmtree(work / name)
            (work / name).mkdir()
            _write_json(work / name / "config.json", config)
            _save_half(state, work / name / WEIGHTS)
        if (dest / "README.md").is_file():  # the model card (measured results) stays with the folder
            shutil.copy2(dest / "README.md", work / "README.md")
    return dest


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    base = sub.add_parser("base", help="write the untrained demo model folder")
    base.add_argument("out_dir", type=Path)
    base.add_argument("--seed", type=int, default=0)
    base.add_argument("--overwrite", action="store_true")
    vae = sub.add_parser("set-vae", help="put a trained VAE into the model folder and set its scaling_factor")
    vae.add_argument("model_dir", type=Path)
    vae.add_argument("vae_dir", type=Path)
    vae.add_argument("metadata", type=Path)
    out = sub.add_parser("ship", help="write the final fp16 model folder")
    out.add_argument("model_dir", type=Path)
    out.add_argument("transformer_dir", type=Path)
    out.add_argument("dest", type=Path)
    args = parser.parse_args(argv)
    if args.command == "base":
        try:
            print(f"wrote {build_base_model(args.out_dir, args.seed, overwrite=args.overwrite)}")
        except FileExistsError as exc:
            parser.error(str(exc))
    elif args.command == "set-vae":
        print(f"vae scaling_factor = {set_vae(args.model_dir, args.vae_dir, args.metadata)}")
    else:
        print(f"wrote {ship(args.model_dir, args.transformer_dir, args.dest)}")


if __name__ == "__main__":
    main()
