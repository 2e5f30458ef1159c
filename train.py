#!/usr/bin/env python
"""Train the EasyAnimate V4 transformer (full fine-tune, or LoRA with --lora). See README.md, "Training the transformer".

    accelerate launch --mixed_precision bf16 train.py --pretrained_model_name_or_path models/EasyAnimateV4-XL-2-InP \
        --train_data_meta datasets/metadata.json --train_data_dir datasets/ --output_dir output_dir ...
"""

import sys

from easyanimate.data.dataset import DataError
from easyanimate.data.metadata import MetadataError
from easyanimate.training.config import parse_args
from easyanimate.training.trainer import train
from easyanimate.utils.weights import CheckpointError

if __name__ == "__main__":
    try:
        result = train(parse_args())
    except (MetadataError, DataError, CheckpointError, FileNotFoundError) as exc:
        sys.exit(f"error: {exc}")
    print(f"finished at step {result.global_step}; {result.data_summary}", file=sys.stderr)
