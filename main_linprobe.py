"""Linear probing (MAE's recipe) of the last encoder layer or of any layer (``--probe_layer K``).

Frozen encoder; a BatchNorm without affine parameters and a linear layer on top, trained with LARS.
``--probe_layer K`` probes the features of encoder block K (1-based) instead of the last one: the
paper's claim that deep supervision improves shallow layers is checked with it.

    python main_linprobe.py --data_path digits --model vit_tiny_patch4 \
        --finetune output_dir/demo/pretrain/checkpoint-last.pth --probe_layer 6 --epochs 10
    torchrun --nproc_per_node 8 main_linprobe.py --model vit_base_patch16 --cls_token \
        --finetune checkpoint-1599.pth --batch_size 2048 --epochs 90 --blr 0.1 --weight_decay 0.0 \
        --dist_eval --data_path /imagenet
"""
import argparse
import dataclasses
import logging
from typing import List

from util.checkpoints.convert import load_encoder
from util.config.classify import DEFAULT_MODEL, add_classification_args, probe_layer_of
from util.config.cli import Parser, add_optim_args, add_run_args, set_help
from util.data.datasets import eval_transform, linprobe_transform
from util.run.errors import UserError, run_cli
from util.run.runner import Run, start_run

import torch
from timm.layers import trunc_normal_
from timm.optim import Lars
from torch import nn

import models_vit
from engine_finetune import (
    ClassifyConfig,
    checkpoint_flags,
    classification_data,
    classification_loss,
    eval_sources,
    run_classification,
)

_log = logging.getLogger("main_linprobe")


class LinearProbe(nn.Module):
    """A frozen ViT encoder and a trainable ``BatchNorm1d(affine=False) + Linear`` head.

    Args:
        encoder: the ViT (its own head is unused).
        num_classes: classes.
        layer: encoder block whose features are probed (1-based).
        pool: ``'token'`` (cls token) or ``'avg'`` (mean of the patch tokens).
    """

    def __init__(self, encoder: models_vit.ViT, num_classes: int, layer: int, pool: str) -> None:
        super().__init__()
        self.encoder = encoder.requires_grad_(False)
        self.layer, self.pool = layer, pool
        dim = encoder.embed_dim
        self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
        trunc_normal_(self.head[1].weight, std=0.01)
        nn.init.zeros_(self.head[1].bias)

    def train(self, mode: bool = True) -> "LinearProbe":
        super().train(mode)
        self.encoder.eval()  # frozen: never in training mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            feats = self.encoder.layer_features(x, self.layer, self.pool)
        return self.head(feats.float())


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser("main_linprobe.py", "DeepMIM linear probing of the last encoder layer or of any layer")
    add_classification_args(p, epochs=90, batch_size=512, global_pool=False, model=["probe_layer"])
    add_optim_args(p, blr=0.1, weight_decay=0.0, warmup_epochs=10, adamw=False)
    add_run_args(p)
    p.set_defaults(save_every=10)
    set_help(p, blr="base learning rate of LARS: lr = blr * total batch size / 256",
             weight_decay="LARS weight decay of the linear layer's weight (MAE: 0)")
    return p


def validate(c: ClassifyConfig) -> List[str]:
    """Linear probing's cross-flag checks: :meth:`ClassifyConfig.validate`, and weights to probe."""
    warnings = c.validate(timm_augment=False)
    if not (c.model.finetune or c.train.resume or c.model.eval):
        raise UserError("Linear probing needs pre-trained weights: pass --finetune CHECKPOINT.")
    return warnings


def main(args: argparse.Namespace) -> dict:
    cfg = ClassifyConfig.from_args(args)
    warnings = validate(cfg)  # a bad combination of flags stops here: nothing written yet
    with start_run(cfg.run, warnings) as run:
        return linprobe(run, cfg)


def linprobe(run: Run, c: ClassifyConfig) -> dict:
    m = c.model
    source, eval_path = eval_sources(run, c) if m.eval else (None, None)
    if source:  # --eval rebuilds the probe the checkpoint holds
        m = checkpoint_flags(m, source)
    name = m.model or DEFAULT_MODEL
    global_pool = False if m.global_pool is None else m.global_pool
    input_size = m.input_size or models_vit.native_size(name)
    data, val_loader, nb_classes = classification_data(
        run, dataclasses.replace(c, model=m), linprobe_transform(input_size, c.aug.crop_scale, c.aug.hflip),
        eval_transform(input_size))

    encoder = models_vit.create_model(name, num_classes=0, img_size=input_size, global_pool="token")
    if m.finetune and not c.train.resume:
        load_encoder(encoder, m.finetune, m.finetune_sha256)
    probe_layer = probe_layer_of(m.probe_layer, len(encoder.blocks), name)  # with --eval: the checkpoint's model
    model = LinearProbe(encoder, nb_classes, probe_layer, "avg" if global_pool else "token").to(run.device)

    eff_batch = c.train.batch_size * c.train.accum_iter * run.info.world_size
    optim = c.optim.resolved(eff_batch)
    linear = model.head[1]
    # MAE's LARS: weight decay and the trust ratio on the weight matrix only, plain momentum SGD on the bias
    optimizer = Lars([{"params": [linear.weight], "weight_decay": optim.weight_decay, "always_adapt": True},
                      {"params": [linear.bias], "weight_decay": 0.0, "always_adapt": False}],
                     lr=optim.lr, momentum=0.9)
    _log.info("%s: probing layer %d (%s) for %d classes; effective batch %d; lr %.3e (blr %.3e)", name,
              probe_layer, "avg pool" if global_pool else "cls token", nb_classes, eff_batch, optim.lr,
              optim.lr * 256 / eff_batch)
    saved = run.resolved_args(c.flags, model=name, input_size=input_size, global_pool=global_pool,
                              nb_classes=nb_classes, probe_layer=probe_layer, lr=optim.lr)
    return run_classification(run, c, model, optimizer, classification_loss(nn.CrossEntropyLoss()), optim, data,
                              val_loader, saved, eval_path)


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
