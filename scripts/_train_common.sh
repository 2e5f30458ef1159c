#!/usr/bin/env bash
# Shared launcher of scripts/train_stage{1..4}.sh and scripts/train_lora.sh. The calling script sets its stage
# defaults; every variable below can be overridden from the environment, and extra arguments are passed to
# train.py (later flags win). Run from the repository root.
set -euo pipefail

MODEL_NAME=${MODEL_NAME:-models/EasyAnimateV4-XL-2-InP}
DATASET_NAME=${DATASET_NAME:-datasets/internal_datasets/}             # "" when the metadata has absolute paths
DATASET_META_NAME=${DATASET_META_NAME:-datasets/internal_datasets/metadata.json}
TRANSFORMER_PATH=${TRANSFORMER_PATH:-}      # start from a previous stage, e.g. output_dir/stage1/checkpoint-60000/transformer
RESUME=${RESUME:-latest}                    # continue from the newest checkpoint in OUTPUT_DIR if there is one

NUM_GPUS=${NUM_GPUS:-$( (nvidia-smi -L 2>/dev/null || true) | grep -c GPU || true)}
[ "${NUM_GPUS}" -ge 1 ] 2>/dev/null || NUM_GPUS=1
NUM_MACHINES=${NUM_MACHINES:-1}
MACHINE_RANK=${MACHINE_RANK:-0}
MAIN_PROCESS_IP=${MAIN_PROCESS_IP:-127.0.0.1}
MAIN_PROCESS_PORT=${MAIN_PROCESS_PORT:-29500}
USE_DEEPSPEED=${USE_DEEPSPEED:-1}           # 1: DeepSpeed ZeRO-2 (configs/zero_stage2_config.json); 0: DDP
MIXED_PRECISION=${MIXED_PRECISION:-bf16}

TRAIN_BATCH_SIZE=${TRAIN_BATCH_SIZE:-1}     # per GPU
GLOBAL_BATCH=${GLOBAL_BATCH:-$((TRAIN_BATCH_SIZE * NUM_GPUS * NUM_MACHINES))}
WORLD=$((NUM_GPUS * NUM_MACHINES))
if (( GLOBAL_BATCH % (TRAIN_BATCH_SIZE * WORLD) )); then
  echo "GLOBAL_BATCH=${GLOBAL_BATCH} is not a multiple of TRAIN_BATCH_SIZE (${TRAIN_BATCH_SIZE}) x GPUs (${WORLD})" >&2
  exit 2
fi
GRADIENT_ACCUMULATION_STEPS=${GRADIENT_ACCUMULATION_STEPS:-$((GLOBAL_BATCH / (TRAIN_BATCH_SIZE * WORLD)))}

export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-1}
export NCCL_P2P_DISABLE=${NCCL_P2P_DISABLE:-1}

LAUNCH=(accelerate launch --mixed_precision "${MIXED_PRECISION}" --num_processes "${WORLD}"
        --num_machines "${NUM_MACHINES}" --machine_rank "${MACHINE_RANK}"
        --main_process_ip "${MAIN_PROCESS_IP}" --main_process_port "${MAIN_PROCESS_PORT}")
if [ "${USE_DEEPSPEED}" = "1" ]; then
  LAUNCH+=(--use_deepspeed --deepspeed_config_file configs/zero_stage2_config.json --deepspeed_multinode_launcher standard)
elif [ "${WORLD}" -gt 1 ]; then
  LAUNCH+=(--multi_gpu)
fi

ARGS=(--pretrained_model_name_or_path "${MODEL_NAME}"
      --train_data_meta "${DATASET_META_NAME}"
      --output_dir "${OUTPUT_DIR}"
      --image_sample_size "${IMAGE_SAMPLE_SIZE}" --video_sample_size "${VIDEO_SAMPLE_SIZE}"
      --token_sample_size "${TOKEN_SAMPLE_SIZE}" --video_sample_n_frames "${VIDEO_SAMPLE_N_FRAMES:-144}"
      --video_sample_stride "${VIDEO_SAMPLE_STRIDE:-1}" --video_repeat "${VIDEO_REPEAT:-1}"
      --train_batch_size "${TRAIN_BATCH_SIZE}" --gradient_accumulation_steps "${GRADIENT_ACCUMULATION_STEPS}"
      --max_train_steps "${MAX_TRAIN_STEPS}" --checkpointing_steps "${CHECKPOINTING_STEPS:-500}"
      --learning_rate "${LEARNING_RATE}" --lr_scheduler "${LR_SCHEDULER:-constant_with_warmup}"
      --lr_warmup_steps "${LR_WARMUP_STEPS:-100}" --seed "${SEED:-42}"
      --adam_weight_decay "${ADAM_WEIGHT_DECAY:-3e-2}" --adam_epsilon "${ADAM_EPSILON:-1e-10}"
      --max_grad_norm "${MAX_GRAD_NORM:-0.05}" --vae_mini_batch "${VAE_MINI_BATCH:-1}"
      --dataloader_num_workers "${DATALOADER_NUM_WORKERS:-8}" --train_mode "${TRAIN_MODE:-inpaint}"
      --resume_from_checkpoint "${RESUME}" --gradient_checkpointing --enable_bucket --motion_sub_loss
      --random_frame_crop)
[ -n "${DATASET_NAME}" ] && ARGS+=(--train_data_dir "${DATASET_NAME}")
[ -n "${TRANSFORMER_PATH}" ] && ARGS+=(--transformer_path "${TRANSFORMER_PATH}")
[ -n "${CHECKPOINTS_TOTAL_LIMIT:-}" ] && ARGS+=(--checkpoints_total_limit "${CHECKPOINTS_TOTAL_LIMIT}")

echo "+ ${LAUNCH[*]} train.py ${ARGS[*]} ${STAGE_ARGS[*]:-} $*" >&2
exec "${LAUNCH[@]}" train.py "${ARGS[@]}" ${STAGE_ARGS[@]+"${STAGE_ARGS[@]}"} "$@"
