#!/usr/bin/env bash
# V4 stage 1: 9 216 tokens (256x256x144): all data; within the budget 512x512x32 and 1024x1024x8 clips too.
# Report defaults: global batch 1024, 60000 steps. The report gives no learning rate; 2e-5 is the shipped
# train.sh value. Override anything from the environment, e.g.
#   NUM_GPUS=8 NUM_MACHINES=4 MACHINE_RANK=0 MAIN_PROCESS_IP=10.0.0.1 DATASET_META_NAME=meta.json bash scripts/train_stage1.sh
# Videos are trained at sizes VIDEO_SAMPLE_SIZE..IMAGE_SAMPLE_SIZE with the frame count that keeps the token
# budget; small clips/images are replicated x2/x4 to fill it (so the effective batch can exceed GLOBAL_BATCH).
set -euo pipefail
cd "$(dirname "$0")/.."
export OUTPUT_DIR=${OUTPUT_DIR:-output_dir/stage1}
export TOKEN_SAMPLE_SIZE=${TOKEN_SAMPLE_SIZE:-256}
export VIDEO_SAMPLE_SIZE=${VIDEO_SAMPLE_SIZE:-256}
export IMAGE_SAMPLE_SIZE=${IMAGE_SAMPLE_SIZE:-1024}
export GLOBAL_BATCH=${GLOBAL_BATCH:-1024}
export MAX_TRAIN_STEPS=${MAX_TRAIN_STEPS:-60000}
export LEARNING_RATE=${LEARNING_RATE:-2e-5}
STAGE_ARGS=(--random_hw_adapt --training_with_video_token_length --trainable_modules .)
source scripts/_train_common.sh "$@"
