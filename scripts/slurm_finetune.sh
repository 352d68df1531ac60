#!/usr/bin/env bash
# The reference ImageNet-1K fine-tuning of a pre-trained ViT-B/16 on SLURM: 1 node x 8 GPUs,
# 128 images per GPU (total batch 1024), 100 epochs, evaluation sharded over the GPUs.
#
#   CKPT=/shared/deepmim_pretrain/checkpoint-1599.pth DATA=/path/to/imagenet OUT=./out_finetune scripts/slurm_finetune.sh
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
exec sbatch --nodes 1 --job-name deepmim-finetune "$repo/scripts/slurm_train.sbatch" "$repo/main_finetune.py" \
    --model vit_base_patch16 --finetune "${CKPT:?set CKPT to the pre-trained checkpoint}" \
    --batch_size 128 --epochs 100 --blr 1e-4 --layer_decay 0.6 --weight_decay 0.05 --drop_path 0.1 \
    --reprob 0.25 --mixup 0.8 --cutmix 1.0 --dist_eval \
    --data_path "${DATA:?set DATA to the ImageNet folder}" --output_dir "${OUT:-./out_finetune}" "$@"
