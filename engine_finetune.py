"""One fine-tuning (or linear-probing) epoch, evaluation, and the epoch loop with the best checkpoint.

Used by ``main_finetune.py`` and ``main_linprobe.py``: the two differ only in model, optimizer and
augmentation, never in how an epoch runs or how accuracy is counted.
"""
import logging
import time
from functools import partial
from typing import Any, Callable, Dict, Optional

import torch
from torch import nn

from util import checkpoint as ckpt_util
from util import dist as dist_util
from util.datasets import eval_loader, train_loader
from util.loop import train_one_epoch as run_epoch
from util.misc import autocast, fmt_seconds, make_scaler
from util.runner import Run

_log = logging.getLogger(__name__)


def classification_loss(criterion: nn.Module, mixup_fn: Optional[Callable] = None):
    """Loss of one (images, labels) batch; Mixup / CutMix (timm) mixes images and labels first."""

    def loss_fn(model: nn.Module, batch):
        imgs, labels = batch
        if mixup_fn is not None:
            imgs, labels = mixup_fn(imgs, labels)
        loss = criterion(model(imgs), labels)
        return loss, loss.detach()[None]

    return loss_fn


@torch.no_grad()
def evaluate(model: nn.Module, loader: torch.utils.data.DataLoader, device: torch.device,
             amp_dtype: Optional[torch.dtype], reduce: bool) -> Dict[str, float]:
    """Top-1 / top-5 accuracy (%) and cross-entropy over ``loader``.

    Counts are summed on the device and read once at the end. With ``reduce`` (``--dist_eval``)
    each rank holds a disjoint shard (no padding) and the counts are summed over ranks, so every
    validation image is counted exactly once.
    """
    model.eval()
    if reduce and dist_util.get_world_size() > 1:
        # every shard must see the model that rank 0 saves: buffers (a probe's BatchNorm statistics)
        # are not synchronised during training (broadcast_buffers=False)
        for buf in model.buffers():
            torch.distributed.broadcast(buf, src=0)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # correct@1, correct@5, loss sum, count
    for imgs, labels in loader:
        imgs = imgs.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            logits = model(imgs)
        logits = logits.float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top == labels[:, None]
        sums += torch.stack([
            hit[:, 0].sum().double(), hit.any(dim=1).sum().double(),
            nn.functional.cross_entropy(logits, labels, reduction="sum").double(),
            torch.tensor(float(labels.numel()), dtype=torch.float64, device=device),
        ])
    if reduce:
        dist_util.all_reduce_sum(sums)
    c1, c5, loss, n = sums.tolist()
    n = max(n, 1.0)
    return {"acc1": 100.0 * c1 / n, "acc5": 100.0 * c5 / n, "loss": loss / n, "count": int(n)}


def fit(run: Run, model: nn.Module, train_model: nn.Module, loss_fn, train_loader, val_loader, optimizer, scaler,
        start_epoch: int, start_step: int, resumed: Dict[str, Any]) -> Dict[str, float]:
    """Train from ``start_epoch`` to ``--epochs``, evaluating after every epoch.

    Writes ``checkpoint-best.pth`` whenever validation top-1 improves; the best accuracy survives
    resume (it is stored in every checkpoint as ``max_accuracy``).
    """
    args = run.args
    max_acc = float(resumed.get("max_accuracy", 0.0))
    test: Dict[str, float] = {}

    def state(epoch: int, acc: float, step_in_epoch: int = 0) -> Dict[str, Any]:  # built on rank 0 only
        return ckpt_util.training_state(model, optimizer, scaler, epoch, run.args_dict(), step_in_epoch=step_in_epoch,
                                        max_accuracy=acc)

    t0 = time.time()
    for epoch in range(start_epoch, args.epochs):
        skip = start_step if epoch == start_epoch else 0
        train_loader.sampler.set_epoch(epoch, skip=skip * args.batch_size)
        train = run_epoch(train_model, loss_fn, ["loss"], train_loader, optimizer, scaler, run, epoch, start_step=skip)
        if "stopped_at" in train:  # preempted mid-epoch: checkpoint-last.pth, no evaluation, exit
            run.end_epoch(partial(state, epoch, max_acc), epoch, {}, stopped_at=train["stopped_at"])
        test = evaluate(model, val_loader, run.device, run.amp_dtype, reduce=args.dist_eval)
        best = test["acc1"] > max_acc
        max_acc = max(max_acc, test["acc1"])
        _log.info("epoch %d: val top-1 %.2f%% top-5 %.2f%% on %d images (best %.2f%%)", epoch, test["acc1"],
                  test["acc5"], test["count"], max_acc)
        run.tb.scalars({"test/acc1": test["acc1"], "test/acc5": test["acc5"], "test/loss": test["loss"]}, epoch)
        run.end_epoch(partial(state, epoch, max_acc), epoch, {**{f"train_{k}": v for k, v in train.items()},
                                     **{f"test_{k}": v for k, v in test.items()}, "max_accuracy": max_acc}, best=best)
    _log.info("training time %s; best val top-1 %.2f%%", fmt_seconds(time.time() - t0), max_acc)
    return {**test, "max_accuracy": max_acc}


def run_classification(run: Run, model: nn.Module, optimizer, loss_fn, train_set, val_set) -> Dict[str, float]:
    """Resume, then either ``--eval`` (evaluate and return) or train with :func:`fit`."""
    args, device = run.args, run.device
    pin = args.pin_mem and device.type == "cuda"
    scaler = make_scaler(device, run.amp_dtype)
    start_epoch, start_step, resumed = run.resume(model, optimizer, scaler)
    eval_rank, eval_world = (run.info.rank, run.info.world_size) if args.dist_eval else (0, 1)
    val_loader = eval_loader(val_set, args.batch_size, eval_rank, eval_world, args.num_workers, pin)
    if args.eval:
        if not (args.finetune or resumed):
            _log.warning("--eval without --resume / --finetune: evaluating a randomly initialised model")
        stats = evaluate(model, val_loader, device, run.amp_dtype, reduce=args.dist_eval)
        _log.info("val top-1 %.2f%% top-5 %.2f%% loss %.4f on %d images", stats["acc1"], stats["acc5"], stats["loss"],
                  stats["count"])
        if run.is_main:
            print(f"Accuracy of the network on the {stats['count']} test images: {stats['acc1']:.2f}%")
        return stats
    loader = train_loader(train_set, args.batch_size, run.info.rank, run.info.world_size, args.seed, args.num_workers, pin)
    _log.info("%d training / %d validation images, %d iterations per epoch", len(train_set), len(val_set), len(loader))
    run.save_config()
    return fit(run, model, run.wrap(model), loss_fn, loader, val_loader, optimizer, scaler, start_epoch, start_step,
               resumed)
