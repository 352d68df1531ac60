#!/usr/bin/env bash
# The reference DeepMIM-CLIP pre-training of ViT-B/16 on SLURM: 4 nodes x 8 GPUs, 128 images per
# GPU (total batch 4096), 1600 epochs, in 72-hour jobs that requeue themselves until done.
#
#   CLIP=/path/to/ViT-B-16.pt DATA=/path/to/imagenet OUT=/shared/deepmim_pretrain scripts/slurm_pretrain.sh [more flags]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
exec sbatch --nodes 4 --job-name deepmim-pretrain "$repo/scripts/slurm_train.sbatch" "$repo/main_pretrain.py" \
    --model mae_vit_base_patch16 --clip_path "${CLIP:?set CLIP to the OpenAI ViT-B-16.pt file}" \
    --batch_size 128 --epochs 1600 --warmup_epochs 40 --blr 1.5e-4 --weight_decay 0.05 --mask_ratio 0.75 \
    --data_path "${DATA:?set DATA to the ImageNet folder}" --output_dir "${OUT:-./output_dir/pretrain}" "$@"
