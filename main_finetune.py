"""Fine-tuning on ImageNet-style classification, and ``--eval`` of a fine-tuned checkpoint.

    python main_finetune.py --data_path digits --model vit_tiny_patch4 \
        --finetune output_dir/demo/pretrain/checkpoint-last.pth --epochs 20            # CPU demo
    torchrun --nproc_per_node 8 main_finetune.py --model vit_base_patch16 \
        --finetune checkpoint-1599.pth --batch_size 128 --epochs 100 --blr 1e-4 --layer_decay 0.6 \
        --weight_decay 0.05 --drop_path 0.1 --reprob 0.25 --mixup 0.8 --cutmix 1.0 --dist_eval \
        --data_path /imagenet
"""
import argparse
import logging

import torch
from timm.data import Mixup
from timm.layers import trunc_normal_
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

import models_vit
from engine_finetune import classification_loss, run_classification
from util.cli import add_classification_args, add_optim_args, add_run_args
from util.convert import load_encoder
from util.datasets import classification_datasets, eval_transform, finetune_transform
from util.misc import run_cli
from util.optim import adamw, layer_decay_groups
from util.runner import Run, start_run

_log = logging.getLogger("main_finetune")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("DeepMIM fine-tuning for image classification")
    add_classification_args(p, model="vit_base_patch16", epochs=50, batch_size=64, global_pool=True)
    p.add_argument("--drop_path", type=float, default=0.1, metavar="PCT", help="drop path rate")
    p.add_argument("--layer_decay", type=float, default=0.75, help="layer-wise lr decay (BEiT / MAE)")
    add_optim_args(p, blr=1e-3, weight_decay=0.05, warmup_epochs=5)
    p.set_defaults(min_lr=1e-6)

    a = p.add_argument_group("augmentation (timm)")
    a.add_argument("--color_jitter", type=float, default=None, metavar="PCT", help="color jitter (only without --aa)")
    a.add_argument("--aa", type=str, default="rand-m9-mstd0.5-inc1", metavar="NAME",
                   help="RandAugment policy ('none' to disable)")
    a.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    a.add_argument("--reprob", type=float, default=0.25, metavar="PCT", help="random erasing probability")
    a.add_argument("--remode", type=str, default="pixel", help="random erasing mode")
    a.add_argument("--recount", type=int, default=1, help="random erasing count")
    a.add_argument("--resplit", action="store_true", default=False, help="no random erasing on the first split")
    a.add_argument("--mixup", type=float, default=0, help="mixup alpha (enabled if > 0)")
    a.add_argument("--cutmix", type=float, default=0, help="cutmix alpha (enabled if > 0)")
    a.add_argument("--cutmix_minmax", type=float, nargs="+", default=None, help="cutmix min/max ratio")
    a.add_argument("--mixup_prob", type=float, default=1.0, help="probability of mixup or cutmix per batch")
    a.add_argument("--mixup_switch_prob", type=float, default=0.5, help="probability of cutmix when both are on")
    a.add_argument("--mixup_mode", type=str, default="batch", help="'batch', 'pair' or 'elem'")
    add_run_args(p)
    p.set_defaults(save_every=10)
    return p


def main(args: argparse.Namespace) -> dict:
    with start_run(args) as run:
        return finetune(run, args)


def finetune(run: Run, args: argparse.Namespace) -> dict:
    args.input_size = args.input_size or models_vit.native_size(args.model)
    train_set, val_set, args.nb_classes = classification_datasets(
        args.data_path, finetune_transform(args), eval_transform(args.input_size), args.nb_classes,
        need_train=not args.eval)

    model = models_vit.create_model(args.model, num_classes=args.nb_classes, img_size=args.input_size,
                                    drop_path_rate=args.drop_path, global_pool="avg" if args.global_pool else "token")
    if args.finetune and not args.resume:
        load_encoder(model, args.finetune, args.finetune_sha256)
        trunc_normal_(model.head.weight, std=2e-5)  # MAE: start from a near-zero head
    model.to(run.device)

    eff_batch = args.batch_size * args.accum_iter * run.info.world_size
    if args.lr is None:
        args.lr = args.blr * eff_batch / 256
    optimizer = adamw(layer_decay_groups(model, args.weight_decay, args.layer_decay), args.lr, device=run.device,
                      fused=args.fused_adamw)

    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None:
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=args.nb_classes)
        criterion = SoftTargetCrossEntropy()  # label smoothing is folded into the mixed targets
    elif args.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        criterion = torch.nn.CrossEntropyLoss()
    _log.info("%s: %d classes; effective batch %d; lr %.3e (blr %.3e); layer decay %.2f; amp %s", args.model,
              args.nb_classes, eff_batch, args.lr, args.lr * 256 / eff_batch, args.layer_decay, run.amp_dtype)
    return run_classification(run, model, optimizer, classification_loss(criterion, mixup_fn), train_set, val_set)


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
