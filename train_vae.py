"""Train or fine-tune the EasyAnimate V4 video VAE.

    accelerate launch train_vae.py --config configs/vae_finetune.yaml \
        --pretrained_vae models/EasyAnimateV4-XL-2-InP/vae --train_data_meta data/meta.json \
        --lpips_weights weights/lpips_vgg16.safetensors --output_dir output_vae

Every setting of configs/vae_*.yaml can be given as a flag; flags override the file. The result is
OUTPUT_DIR/vae (config.json + safetensors), loadable as the pipeline's VAE.
"""

import argparse
import dataclasses
import logging
import sys

from easyanimate.data.metadata import MetadataError
from easyanimate.training.vae_trainer import VAEConfigError, VAETrainConfig, load_config, train
from easyanimate.utils.weights import CheckpointError


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file with the run's settings (see configs/vae_*.yaml)")
    defaults = VAETrainConfig()
    for f in dataclasses.fields(VAETrainConfig):
        kind = str(f.type)  # annotations are strings, e.g. "int | None"
        options = {"help": f"default: {getattr(defaults, f.name)}"}
        if kind.startswith("bool"):
            options.update(type=_bool, nargs="?", const=True)
        elif kind.startswith("list"):
            options.update(type=int, nargs="+")
        elif kind.startswith(("int", "float")):
            options.update(type=int if kind.startswith("int") else float)
        parser.add_argument(f"--{f.name}", **options)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = vars(parse_args(argv))
    try:
        result = train(load_config(args.pop("config"), args))
    except (VAEConfigError, MetadataError, CheckpointError) as exc:  # bad input: the message says what to fix
        print(f"train_vae.py: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as stop:
        print(f"interrupted: {stop}" if str(stop) else "interrupted", file=sys.stderr)
        sys.exit(130)
    print(f"trained VAE saved to {result.vae_dir}")


if __name__ == "__main__":
    main()
