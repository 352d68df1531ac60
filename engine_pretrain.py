"""One pre-training epoch: the targets (teacher forward, once per step), DeepMIM forward and loss.

The loop itself (schedule, precision, accumulation, logging, NaN check) is ``util.loop``.
"""
from typing import Dict, List, Optional

import torch
from torch import nn

from util.loop import train_one_epoch as run_epoch
from util.misc import TensorBoard
from util.targets import Target, compute_targets


def pretrain_loss(targets: Dict[str, Target], layer_targets: List[str], mask_ratio: float):
    """The loss of one batch: each target runs once, each supervised layer reads its own."""

    def loss_fn(model: nn.Module, batch):
        imgs = batch[0]
        tgt = compute_targets(targets, imgs)
        out = model(imgs, [tgt[name] for name in layer_targets], mask_ratio=mask_ratio)
        return out.loss, out.layer_losses

    return loss_fn


def train_one_epoch(
    model: nn.Module,
    targets: Dict[str, Target],
    layer_targets: List[str],
    loader: torch.utils.data.DataLoader,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    amp_dtype: Optional[torch.dtype],
    epoch: int,
    args,
    tb: TensorBoard,
    start_step: int = 0,
    should_stop=None,
) -> Dict[str, float]:
    """Pre-train for one epoch; metrics are each supervised layer's loss (``loss_L6`` ...)."""
    return run_epoch(
        model, pretrain_loss(targets, layer_targets, args.mask_ratio), [f"L{x}" for x in args.ds_layers],
        loader, optimizer, scaler, device, amp_dtype, epoch, args, tb, start_step=start_step,
        should_stop=should_stop, total_weights=args.ds_weights,
    )
