"""Fine-tuning on ImageNet-style classification, and ``--eval`` of a fine-tuned checkpoint.

    python main_finetune.py --data_path digits --model vit_tiny_patch4 \
        --finetune output_dir/demo/pretrain/checkpoint-last.pth --epochs 20            # CPU demo
    torchrun --nproc_per_node 8 main_finetune.py --model vit_base_patch16 \
        --finetune checkpoint-1599.pth --batch_size 128 --epochs 100 --blr 1e-4 --layer_decay 0.6 \
        --weight_decay 0.05 --drop_path 0.1 --reprob 0.25 --mixup 0.8 --cutmix 1.0 --dist_eval \
        --data_path /imagenet
"""
import argparse
import dataclasses
import logging

from util.checkpoints.convert import load_encoder
from util.config.classify import DEFAULT_MODEL, add_classification_args
from util.config.cli import Parser, add_optim_args, add_run_args
from util.data.datasets import eval_transform, finetune_transform
from util.run.errors import run_cli
from util.run.optim import adamw, layer_decay_groups
from util.run.runner import Run, start_run

import torch
from timm.data import Mixup
from timm.layers import trunc_normal_
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

import models_vit
from engine_finetune import (
    ClassifyConfig,
    checkpoint_flags,
    classification_data,
    classification_loss,
    eval_sources,
    run_classification,
)

_log = logging.getLogger("main_finetune")


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser("main_finetune.py", "DeepMIM fine-tuning for image classification (and --eval of a checkpoint)")
    add_classification_args(p, epochs=50, batch_size=64, global_pool=True, model=["drop_path"], timm_augment=True)
    add_optim_args(p, blr=1e-3, weight_decay=0.05, warmup_epochs=5, layer_decay=0.75, min_lr=1e-6)
    add_run_args(p)
    p.set_defaults(save_every=10)
    return p


def main(args: argparse.Namespace) -> dict:
    cfg = ClassifyConfig.from_args(args)
    warnings = cfg.validate(timm_augment=True)  # a bad combination of flags stops here: nothing written yet
    with start_run(cfg.run, warnings) as run:
        return finetune(run, cfg)


def finetune(run: Run, c: ClassifyConfig) -> dict:
    m, aug = c.model, c.aug
    source, eval_path = eval_sources(run, c) if m.eval else (None, None)
    if source:  # --eval rebuilds the model the checkpoint holds
        m = checkpoint_flags(m, source)
    name = m.model or DEFAULT_MODEL
    global_pool = True if m.global_pool is None else m.global_pool
    input_size = m.input_size or models_vit.native_size(name)
    data, val_loader, nb_classes = classification_data(run, dataclasses.replace(c, model=m),
                                                       finetune_transform(input_size, aug), eval_transform(input_size))

    model = models_vit.create_model(name, num_classes=nb_classes, img_size=input_size,
                                    drop_path_rate=m.drop_path, global_pool="avg" if global_pool else "token")
    if m.finetune and not c.train.resume:
        missing, _ = load_encoder(model, m.finetune, m.finetune_sha256)
        if "head.weight" in missing:
            trunc_normal_(model.head.weight, std=2e-5)  # MAE: start from a near-zero head
    model.to(run.device)

    eff_batch = c.train.batch_size * c.train.accum_iter * run.info.world_size
    optim = c.optim.resolved(eff_batch)
    optimizer = adamw(layer_decay_groups(model, optim.weight_decay, optim.layer_decay), optim.lr, device=run.device,
                      fused=optim.fused_adamw)

    mixup_fn = None
    if aug.mixup > 0 or aug.cutmix > 0 or aug.cutmix_minmax is not None:
        mixup_fn = Mixup(mixup_alpha=aug.mixup, cutmix_alpha=aug.cutmix, cutmix_minmax=aug.cutmix_minmax,
                         prob=aug.mixup_prob, switch_prob=aug.mixup_switch_prob, mode=aug.mixup_mode,
                         label_smoothing=aug.smoothing, num_classes=nb_classes)
        criterion = SoftTargetCrossEntropy()  # label smoothing is folded into the mixed targets
    elif aug.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=aug.smoothing)
    else:
        criterion = torch.nn.CrossEntropyLoss()
    _log.info("%s: %d classes; effective batch %d; lr %.3e (blr %.3e); layer decay %.2f; amp %s", name,
              nb_classes, eff_batch, optim.lr, optim.lr * 256 / eff_batch, optim.layer_decay, run.amp_dtype)
    saved = run.resolved_args(c.flags, model=name, input_size=input_size, global_pool=global_pool,
                              nb_classes=nb_classes, lr=optim.lr)
    return run_classification(run, c, model, optimizer, classification_loss(criterion, mixup_fn), optim, data,
                              val_loader, saved, eval_path)


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
