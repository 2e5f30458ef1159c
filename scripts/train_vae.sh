#!/usr/bin/env bash
# Fine-tune the V4 VAE on your data (configs/vae_finetune.yaml; CONFIG=configs/vae_decoder_only.yaml keeps the
# encoder, and so the transformer's latent space, fixed). Re-running the same command resumes from the newest
# checkpoint in the output folder. Runs on every local GPU with DDP (set NUM_GPUS to choose).
# Usage: scripts/train_vae.sh MODEL_DIR METADATA LPIPS_WEIGHTS [extra train_vae.py flags...]
set -euo pipefail
if [ "$#" -lt 3 ]; then
  echo "usage: $0 MODEL_DIR METADATA LPIPS_WEIGHTS [flags...]" >&2
  echo "  MODEL_DIR      e.g. models/EasyAnimateV4-XL-2-InP (its vae/ is fine-tuned)" >&2
  echo "  METADATA       JSON/CSV list of {file_path, type: image|video} (paths relative to DATA_DIR if set)" >&2
  echo "  LPIPS_WEIGHTS  VGG16 LPIPS weights: one file, or torchvision's vgg16 .pth and the lpips package's" >&2
  echo "                 weights/v0.1/vgg.pth joined by a comma" >&2
  exit 2
fi
MODEL_DIR=$1; METADATA=$2; LPIPS=$3; shift 3
REPO=$(cd "$(dirname "$0")/.." && pwd)       # paths given by the user stay relative to where they run this
CONFIG=${CONFIG:-${REPO}/configs/vae_finetune.yaml}
DATA_DIR=${DATA_DIR:-}
NUM_GPUS=${NUM_GPUS:-$( (nvidia-smi -L 2>/dev/null || true) | grep -c GPU || true)}
[ "${NUM_GPUS}" -ge 1 ] 2>/dev/null || NUM_GPUS=1

LAUNCH=(accelerate launch --num_processes "${NUM_GPUS}" --num_machines 1)
[ "${NUM_GPUS}" -gt 1 ] && LAUNCH+=(--multi_gpu)
ARGS=(--config "${CONFIG}" --pretrained_vae "${MODEL_DIR}/vae" --train_data_meta "${METADATA}" --lpips_weights "${LPIPS}")
[ -n "${DATA_DIR}" ] && ARGS+=(--train_data_dir "${DATA_DIR}")
"${LAUNCH[@]}" "${REPO}/train_vae.py" "${ARGS[@]}" "$@"
