"""One pre-training epoch: the targets (teacher forward, once per step), DeepMIM forward and loss.

The loop itself (schedule, precision, accumulation, logging, NaN check) is ``util.loop``.
"""
from typing import Dict, List

import torch
from torch import nn

from util.loop import train_one_epoch as run_epoch
from util.runner import Run
from util.targets import Target, compute_targets


def pretrain_loss(targets: Dict[str, Target], layer_targets: List[str], mask_ratio: float):
    """The loss of one batch: each target runs once, each supervised layer reads its own."""

    def loss_fn(model: nn.Module, batch):
        imgs = batch[0]
        tgt = compute_targets(targets, imgs)
        out = model(imgs, [tgt[name] for name in layer_targets], mask_ratio=mask_ratio)
        return out.loss, out.layer_losses

    return loss_fn


def train_one_epoch(model: nn.Module, targets: Dict[str, Target], layer_targets: List[str], loader,
                    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, run: Run, epoch: int,
                    start_step: int = 0) -> Dict[str, float]:
    """Pre-train for one epoch; metrics are each supervised layer's loss (``loss_L6`` ...)."""
    args = run.args
    return run_epoch(model, pretrain_loss(targets, layer_targets, args.mask_ratio), [f"L{x}" for x in args.ds_layers],
                     loader, optimizer, scaler, run, epoch, start_step=start_step, total_weights=args.ds_weights)
