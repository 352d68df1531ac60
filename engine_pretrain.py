"""The pre-training job: the targets of one batch (each teacher runs once per step), the DeepMIM
forward and its loss, the cosine schedule, and at epoch ends the monitor (k-NN accuracy,
reconstructions: ``engine_monitor.py``). The loop itself is ``util/run/trainer.py``."""
from typing import Any, Dict, List, Optional, Sequence

from util.run.trainer import Commit, Job, Trainer

import torch
from torch import nn

from engine_monitor import Monitor
from models_deepmim import DeepMIM
from targets.base import Target, check_resume_targets, compute_targets


def pretrain_loss(targets: Dict[str, Target], layer_targets: Sequence[str], mask_ratio: float):
    """The loss of one batch: each target runs once, each supervised layer reads its own."""

    def loss_fn(model: nn.Module, batch):
        imgs = batch[0]
        tgt = compute_targets(targets, imgs)
        out = model(imgs, [tgt[name] for name in layer_targets], mask_ratio=mask_ratio)
        return out.loss, out.layer_losses

    return loss_fn


class PretrainJob(Job):
    """DeepMIM pre-training: metrics are each supervised layer's loss (logged as ``loss_L6`` ...).

    Args:
        model: the DeepMIM model (plain, unwrapped).
        targets / layer_targets: the targets, and which one each supervised layer reconstructs.
        mask_ratio: fraction of patches removed.
        lr: the schedule, step -> learning rate.
        monitor: what runs at epoch ends besides the losses (k-NN accuracy, reconstructions), or None.
    """

    def __init__(self, model: DeepMIM, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                 targets: Dict[str, Target], layer_targets: List[str], mask_ratio: float, lr,
                 monitor: Optional[Monitor] = None) -> None:
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.targets, self.layer_targets = targets, layer_targets
        self.metric_names = [f"L{x}" for x in model.cfg.ds_layers]
        self.metric_weights = list(model.cfg.ds_weights)
        self.loss = pretrain_loss(targets, layer_targets, mask_ratio)
        self._lr = lr
        self.monitor = monitor
        self.knn_init: Dict[str, float] = {}  # the initial encoder's k-NN accuracy, until the epoch-0 line has it

    def lr(self, step: int) -> float:
        return self._lr(step)

    def on_start(self, trainer: Trainer, start: int) -> None:
        """A fresh run measures the k-NN accuracy of its initial encoder (kept for the epoch-0 line,
        and in a checkpoint written before that line, so that it survives a resume)."""
        if self.monitor is not None and start == 0:
            self.knn_init = self.monitor.before_training(trainer.run)

    def on_epoch_end(self, trainer: Trainer, epoch: int, train: Dict[str, float]) -> Commit:
        """The epoch's ``train_*`` record, with the monitor's fields (``knn_L6_cls`` ...) when it ran,
        and on the first epoch the initial encoder's (``knn_init_L6_cls`` ...)."""
        commit = super().on_epoch_end(trainer, epoch, train)
        if self.knn_init:
            commit.records[0].update(self.knn_init)
            self.knn_init = {}
        if self.monitor is not None:
            epochs = trainer.total_steps // trainer.steps_per_epoch
            commit.records[0].update(self.monitor.on_epoch_end(trainer.run, epoch, epochs,
                                                               (epoch + 1) * trainer.steps_per_epoch))
        return commit

    def check_resume(self, ckpt: Dict[str, Any], path: str) -> None:
        cfg = self.model.cfg
        check_resume_targets(ckpt, cfg.pred_dims, cfg.losses, self.layer_targets, path)

    def extra_state(self) -> Dict[str, Any]:
        return {"model_cfg": self.model.cfg.to_dict(), **({"knn_init": dict(self.knn_init)} if self.knn_init else {})}

    def load_extra_state(self, ckpt: Dict[str, Any]) -> None:
        self.knn_init = dict(ckpt.get("knn_init") or {})  # measured before training, not logged yet
