#!/usr/bin/env bash
# LoRA fine-tune of the V4 InP model (the original's train_lora.sh): rank 128, alpha 64, lr 1e-4, 512 px,
# 144 frames, a checkpoint (LoRA safetensors in the original format) every 100 steps. Override from the
# environment, e.g.  RANK=64 NETWORK_ALPHA=32 DATASET_META_NAME=my.json NUM_GPUS=1 bash scripts/train_lora.sh
# The result output_dir/lora/checkpoint-N.safetensors loads with EasyAnimatePipeline.load_lora(path, strength).
set -euo pipefail
cd "$(dirname "$0")/.."
export OUTPUT_DIR=${OUTPUT_DIR:-output_dir/lora}
export TOKEN_SAMPLE_SIZE=${TOKEN_SAMPLE_SIZE:-512}
export VIDEO_SAMPLE_SIZE=${VIDEO_SAMPLE_SIZE:-512}
export IMAGE_SAMPLE_SIZE=${IMAGE_SAMPLE_SIZE:-512}
export MAX_TRAIN_STEPS=${MAX_TRAIN_STEPS:-5000}
export LEARNING_RATE=${LEARNING_RATE:-1e-4}
export CHECKPOINTING_STEPS=${CHECKPOINTING_STEPS:-100}
export DATALOADER_NUM_WORKERS=${DATALOADER_NUM_WORKERS:-4}
export USE_DEEPSPEED=${USE_DEEPSPEED:-0}
STAGE_ARGS=(--lora --rank "${RANK:-128}" --network_alpha "${NETWORK_ALPHA:-64}")
source scripts/_train_common.sh "$@"
