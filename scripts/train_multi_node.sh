#!/usr/bin/env bash
# Several nodes with torchrun: start it on every node with the same MASTER_ADDR (the first node's
# address) and NNODES, and each node's own NODE_RANK (0 .. NNODES-1). The reference pre-training
# (4 x 8 GPUs, total batch 4096):
#
#   MASTER_ADDR=node0 NNODES=4 NODE_RANK=0 scripts/train_multi_node.sh main_pretrain.py \
#       --model mae_vit_base_patch16 --clip_path /path/to/ViT-B-16.pt --batch_size 128 --epochs 1600 \
#       --warmup_epochs 40 --blr 1.5e-4 --weight_decay 0.05 --mask_ratio 0.75 \
#       --data_path /path/to/imagenet --output_dir /shared/output_dir
#
# --output_dir must be on a file system every node sees (rank 0 writes, every rank resumes from it).
# Exit status on every node: 0 finished, 3 stopped by a signal with checkpoint-last.pth written,
# else torchrun's (scripts/torchrun.sh).
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: MASTER_ADDR=.. NNODES=.. NODE_RANK=.. $0 main_*.py [flags]" >&2; exit 2; }
exec "$(dirname "$0")/torchrun.sh" --nnodes "${NNODES:?set NNODES}" --node_rank "${NODE_RANK:?set NODE_RANK (0 on the master)}" \
    --nproc_per_node "${NPROC:-8}" --master_addr "${MASTER_ADDR:?set MASTER_ADDR to the first node}" \
    --master_port "${MASTER_PORT:-29500}" "$@"
