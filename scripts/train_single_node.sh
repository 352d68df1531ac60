#!/usr/bin/env bash
# One node, NPROC GPUs (default 8), with torchrun. Run from where your relative paths point:
#
#   scripts/train_single_node.sh main_finetune.py --model vit_base_patch16 \
#       --finetune ./output_dir/checkpoint-1599.pth --batch_size 128 --epochs 100 --blr 1e-4 \
#       --layer_decay 0.6 --weight_decay 0.05 --drop_path 0.1 --reprob 0.25 --mixup 0.8 --cutmix 1.0 \
#       --dist_eval --data_path /path/to/imagenet --output_dir ./out_finetune
#
# After a crash, kill or SIGTERM, rerun the same command: it resumes from the newest complete
# checkpoint in --output_dir (mid-epoch after a SIGTERM / SIGUSR1). Exit status: 0 finished, 3
# stopped by a signal with checkpoint-last.pth written, else torchrun's (scripts/torchrun.sh).
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: NPROC=8 $0 main_{pretrain,finetune,linprobe}.py [flags]" >&2; exit 2; }
exec "$(dirname "$0")/torchrun.sh" --standalone --nproc_per_node "${NPROC:-8}" "$@"
