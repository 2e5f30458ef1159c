#!/usr/bin/env bash
# V4 stage 2: 36 864 tokens (512x512x144): videos of 720p and more.
# Report defaults: global batch 192, 16000 steps. The report gives no learning rate; 2e-5 is the shipped
# train.sh value. Override anything from the environment, e.g.
#   NUM_GPUS=8 NUM_MACHINES=4 MACHINE_RANK=0 MAIN_PROCESS_IP=10.0.0.1 DATASET_META_NAME=meta.json bash scripts/train_stage2.sh
# Videos are trained at sizes VIDEO_SAMPLE_SIZE..IMAGE_SAMPLE_SIZE with the frame count that keeps the token
# budget; small clips/images are replicated x2/x4 to fill it (so the effective batch can exceed GLOBAL_BATCH).
set -euo pipefail
cd "$(dirname "$0")/.."
export OUTPUT_DIR=${OUTPUT_DIR:-output_dir/stage2}
export TOKEN_SAMPLE_SIZE=${TOKEN_SAMPLE_SIZE:-512}
export VIDEO_SAMPLE_SIZE=${VIDEO_SAMPLE_SIZE:-512}
export IMAGE_SAMPLE_SIZE=${IMAGE_SAMPLE_SIZE:-1024}
export GLOBAL_BATCH=${GLOBAL_BATCH:-192}
export MAX_TRAIN_STEPS=${MAX_TRAIN_STEPS:-16000}
export LEARNING_RATE=${LEARNING_RATE:-2e-5}
STAGE_ARGS=(--random_hw_adapt --training_with_video_token_length --trainable_modules .)
source scripts/_train_common.sh "$@"
