#!/usr/bin/env bash
# Reproduce the shipped demo model (models/EasyAnimateV4-demo) from scratch with this project's own scripts, on a
# CPU: the synthetic bilingual shapes dataset, a base folder (text encoders + tokenizers from the tiny-model
# builder, frozen), train_vae.py, then train.py through five stages in inpaint mode (the V4 token-length stages
# 256/512/768 tokens x 144 frames, scaled down to 48/64/80 x 16 frames, then a fourth at 80 that trains mostly at
# low noise and a fifth with more image-to-video samples), and the fp16 model folder.
#
#   bash scripts/train_demo.sh [WORK_DIR]            # default WORK_DIR: output_dir/demo
#   SMOKE=1 bash scripts/train_demo.sh WORK_DIR      # a few steps per stage on a small dataset (CI)
#
# Measured on the 2-core machine with OMP_NUM_THREADS=2 (VAE phases 1-3, transformer stages 1-4: about 2 h 05 min):
# data 1 min; VAE 2000 image steps (4.5 min) + 2400 clip/image steps (6 min) + 3000 decoder-only steps (~8 min alone;
# 12 min beside stage 1);
# transformer stages 1000 + 1500 + 6000 + 1500 steps of batch 16 (8 + 15 + 65 + 16 min on otherwise idle cores;
# running anything else beside them slows them 2-7x; expect ~1.5x longer with the default 1 thread). On the slower
# machine of 2026-12-01 the transformer stages took 11 + 24.5 + ~110 + 30 min, VAE phase 4 (3000 decoder-only steps)
# 11 min and transformer stage 5 (1000 steps) 22 min (models/EasyAnimateV4-demo/README.md): about 2 h 20 min in all
# on the faster machine, 3 h 45 min on the slower.
# Re-running resumes every stage from its newest checkpoint. The result is WORK_DIR/EasyAnimateV4-demo; copy it
# to models/ (DEST=models/EasyAnimateV4-demo writes it there directly).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mkdir -p "${1:-${REPO}/output_dir/demo}" && cd "${1:-${REPO}/output_dir/demo}" && pwd)
PYTHON=${PYTHON:-python}
DEST=${DEST:-${WORK}/EasyAnimateV4-demo}
export PYTHONPATH="${REPO}${PYTHONPATH:+:${PYTHONPATH}}"
# One thread per process: on a shared or busy CPU, PyTorch's default of one thread per core makes every parallel
# region wait for descheduled threads (measured: 15 s instead of 0.35 s per VAE step with one core busy).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

if [ "${SMOKE:-0}" = "1" ]; then
  DATA_ARGS=(--videos-per-combination 1 --images-per-combination 1 --vae-images-per-combination 1 --max-combinations 4)
  VAE_ARGS=(--max_train_steps 2 --batch_size 1 --checkpointing_steps 2 --num_workers 0)
  STEPS=(2 2 2 2 2); BATCH=2; WARMUP=0; WORKERS=0; CKPT=2
else
  DATA_ARGS=(--videos-per-combination 16 --images-per-combination 24 --vae-images-per-combination 100)
  VAE_ARGS=()
  STEPS=(${STAGE1_STEPS:-1000} ${STAGE2_STEPS:-1500} ${STAGE3_STEPS:-6000} ${STAGE4_STEPS:-1500} ${STAGE5_STEPS:-1000})
  BATCH=16; WARMUP=100; WORKERS=1; CKPT=100
fi

step() { echo "=== $(date -u +%H:%M:%S) $*" >&2; }

# 1. data
if [ ! -f "${WORK}/data/metadata.json" ]; then
  step "dataset"
  "${PYTHON}" "${REPO}/scripts/make_demo_dataset.py" "${WORK}/data" "${DATA_ARGS[@]}"
fi
META="${WORK}/data/metadata.json"

# 2. base model: tiny-model text encoders (the mT5 with its output projections at DEMO_T5_RESIDUAL_SCALE), tokenizers,
#    CLIP, scheduler; demo transformer + VAE architectures
if [ ! -f "${WORK}/base/model_index.json" ]; then
  step "base model"
  "${PYTHON}" -m easyanimate.demo.build base "${WORK}/base"
fi

# 3. VAE from scratch (L1 + L2 + KL; no LPIPS / GAN): still images first (colour and shape; cheap steps), then
#    clips and images together (motion, the causal temporal layers), then the decoder alone (twice)
if [ ! -f "${WORK}/vae_images/vae/config.json" ]; then
  step "train_vae.py phase 1: still images"
  "${PYTHON}" "${REPO}/train_vae.py" --config "${REPO}/configs/demo_vae_images.yaml" \
    --vae_config "${WORK}/base/vae/config.json" --train_data_meta "${WORK}/data/metadata_vae_images.json" \
    --train_data_dir "${WORK}/data" --output_dir "${WORK}/vae_images" "${VAE_ARGS[@]}"
fi
if [ ! -f "${WORK}/vae/vae/config.json" ]; then
  step "train_vae.py phase 2: clips and images"
  "${PYTHON}" "${REPO}/train_vae.py" --config "${REPO}/configs/demo_vae.yaml" \
    --pretrained_vae "${WORK}/vae_images/vae" --train_data_meta "${WORK}/data/metadata_vae.json" \
    --train_data_dir "${WORK}/data" --output_dir "${WORK}/vae" "${VAE_ARGS[@]}"
fi
# the decoder alone, phase 2's settings for 3000 steps (the encoder, and so every latent the transformer trains on,
# stays bit-identical): reconstructions 25.9 -> 27.6 dB PSNR
if [ ! -f "${WORK}/vae_decoder/vae/config.json" ]; then
  step "train_vae.py phase 3: decoder only"
  "${PYTHON}" "${REPO}/train_vae.py" --config "${REPO}/configs/demo_vae.yaml" --train_mode decoder_only \
    --max_train_steps 3000 --pretrained_vae "${WORK}/vae/vae" --train_data_meta "${WORK}/data/metadata_vae.json" \
    --train_data_dir "${WORK}/data" --output_dir "${WORK}/vae_decoder" "${VAE_ARGS[@]}"
fi
# and the decoder once more with frame 0 counting x8 in the reconstruction terms (--first_frame_loss_weight): frames
# 0-3 share one latent, and image-to-video is judged on frame 0, which phase 3's decoder reconstructs at only
# ~22 dB in moving clips (-> ~26 dB); the encoder, and so the transformer's latents, still bit-identical
if [ ! -f "${WORK}/vae_first_frame/vae/config.json" ]; then
  step "train_vae.py phase 4: decoder only, first frame x8"
  "${PYTHON}" "${REPO}/train_vae.py" --config "${REPO}/configs/demo_vae.yaml" --train_mode decoder_only \
    --max_train_steps 3000 --first_frame_loss_weight 8 --pretrained_vae "${WORK}/vae_decoder/vae" \
    --train_data_meta "${WORK}/data/metadata_vae.json" --train_data_dir "${WORK}/data" \
    --output_dir "${WORK}/vae_first_frame" "${VAE_ARGS[@]}"
fi
step "VAE into the model folder"
"${PYTHON}" -m easyanimate.demo.build set-vae "${WORK}/base" "${WORK}/vae_first_frame/vae" "${META}"

# 4. transformer: five stages (scripts/train_stageN.sh with demo sizes; stage 5 uses stage 4's), inpaint mode
export MODEL_NAME="${WORK}/base" DATASET_NAME="${WORK}/data" DATASET_META_NAME="${META}"
export NUM_GPUS=1 USE_DEEPSPEED=0 MIXED_PRECISION=no TRAIN_BATCH_SIZE=${BATCH} GLOBAL_BATCH=${BATCH}
export VIDEO_SAMPLE_N_FRAMES=16 VIDEO_SAMPLE_STRIDE=1 DATALOADER_NUM_WORKERS=${WORKERS}
export MAX_GRAD_NORM=1.0 ADAM_WEIGHT_DECAY=1e-2 ADAM_EPSILON=1e-8
export CHECKPOINTING_STEPS=${CKPT} CHECKPOINTS_TOTAL_LIMIT=2 TRAIN_MODE=inpaint
# empty captions 10 % of the time, so classifier-free guidance has a trained unconditional prediction; half of the
# clips get the full mask (text-to-video; V4 uses 30 %) and 35 % keep their first frames (image-to-video), because
# at this scale colour and shape are learnt from the text only on text-to-video samples (MASK_PROBS below, per stage,
# in the order box, full, keep head, keep head and tail, spatio-temporal box)
EXTRA=(--no-gradient_checkpointing --precompute_text_embeddings --vae_mini_batch 8 --report_to none
       --text_drop_ratio 0.1)
TOKENS=(48 64 80 80 80); VIDEO_SIZES=(48 64 64 64 64); IMAGE_SIZE=80
# per stage: learning rate, schedule, extra flags. Stage 4 keeps stage 3's sizes and moves the timestep density to
# low noise (logit-normal mean -1: median t = 269 instead of 500), where corners and curves are decided; fresh
# noise draws (seed 4). Stage 5 (stage 4's settings at half its learning rate, seed 5) keeps the head of half of the
# clips (35 % before): image-to-video is judged on how exactly the model keeps the frames it is given
lr=${LEARNING_RATE:-5e-4}
LRS=(${lr} ${lr} ${lr} ${STAGE4_LEARNING_RATE:-2e-4} ${STAGE5_LEARNING_RATE:-1e-4})
SCHEDULES=(constant_with_warmup constant_with_warmup cosine cosine cosine)
STAGE_EXTRA=("" "" "" "--timestep_logit_mean -1.0 --seed 4" "--timestep_logit_mean -1.0 --seed 5")
MASK_PROBS=("0.05 0.5 0.35 0.05 0.05" "0.05 0.5 0.35 0.05 0.05" "0.05 0.5 0.35 0.05 0.05" "0.05 0.5 0.35 0.05 0.05"
            "0.05 0.35 0.5 0.05 0.05")
previous=""
for i in 0 1 2 3 4; do
  stage=$((i + 1))
  out="${WORK}/stage${stage}"
  step "train.py stage ${stage}: token size ${TOKENS[$i]}, ${STEPS[$i]} steps"
  # shellcheck disable=SC2206
  stage_extra=(${STAGE_EXTRA[$i]} --video_mask_probs ${MASK_PROBS[$i]})
  OUTPUT_DIR="${out}" TOKEN_SAMPLE_SIZE=${TOKENS[$i]} VIDEO_SAMPLE_SIZE=${VIDEO_SIZES[$i]} \
  IMAGE_SAMPLE_SIZE=${IMAGE_SIZE} MAX_TRAIN_STEPS=${STEPS[$i]} LEARNING_RATE=${LRS[$i]} LR_SCHEDULER=${SCHEDULES[$i]} \
  LR_WARMUP_STEPS=${WARMUP} TRANSFORMER_PATH="${previous}" \
    bash "${REPO}/scripts/train_stage$((stage < 4 ? stage : 4)).sh" "${EXTRA[@]}" "${stage_extra[@]}"
  previous="${out}/checkpoint-${STEPS[$i]}/transformer"
done

# 5. the shipped folder: fp16 transformer + VAE, everything else from the base folder
step "model folder ${DEST}"
"${PYTHON}" -m easyanimate.demo.build ship "${WORK}/base" "${previous}" "${DEST}"
step "done"
