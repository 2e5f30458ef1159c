#!/usr/bin/env bash
# LCM-LoRA distillation of the V4 InP model (the original's train_lcm_lora.sh): the frozen model teaches a rank-64
# LoRA to jump along its guided sampling trajectory, so that the LCM sampler makes a video in 2-8 steps without
# classifier-free guidance. 256 px, 32 frames, batch 8, lr 1e-4, a checkpoint every 100 steps (the newest 2 kept).
# Override from the environment, e.g.  DATASET_META_NAME=my.json NUM_GPUS=1 bash scripts/train_lcm_lora.sh
# Use the result: EasyAnimatePipeline.from_pretrained(model, sampler="LCM"), pipe.load_lora(
# "output_dir/lcm_lora/checkpoint-N.safetensors", 1.0), then num_inference_steps=4, guidance_scale=1.0.
set -euo pipefail
cd "$(dirname "$0")/.."
export OUTPUT_DIR=${OUTPUT_DIR:-output_dir/lcm_lora}
export TOKEN_SAMPLE_SIZE=${TOKEN_SAMPLE_SIZE:-256}
export VIDEO_SAMPLE_SIZE=${VIDEO_SAMPLE_SIZE:-256}
export IMAGE_SAMPLE_SIZE=${IMAGE_SAMPLE_SIZE:-256}
export VIDEO_SAMPLE_N_FRAMES=${VIDEO_SAMPLE_N_FRAMES:-32}
export TRAIN_BATCH_SIZE=${TRAIN_BATCH_SIZE:-8}
export MAX_TRAIN_STEPS=${MAX_TRAIN_STEPS:-5000}
export LEARNING_RATE=${LEARNING_RATE:-1e-4}
export CHECKPOINTING_STEPS=${CHECKPOINTING_STEPS:-100}
export CHECKPOINTS_TOTAL_LIMIT=${CHECKPOINTS_TOTAL_LIMIT:-2}
export DATALOADER_NUM_WORKERS=${DATALOADER_NUM_WORKERS:-4}
export USE_DEEPSPEED=${USE_DEEPSPEED:-0}
STAGE_ARGS=(--lora --rank "${RANK:-64}" --network_alpha "${NETWORK_ALPHA:-64}" --lcm_distillation
            --validation_steps "${VALIDATION_STEPS:-100}" --validation_inference_steps 4)
source scripts/_train_common.sh "$@"
