"""Per-iteration learning-rate schedules: linear warm-up then half-cycle cosine to ``min_lr`` (MAE, in
fractional epochs), mmseg's poly schedule with linear warm-up (segmentation, in iterations), and
detectron2's linear warm-up then step decay (detection, in iterations)."""
import bisect
import math
from typing import Callable, Sequence

import torch


def lr_at(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """Learning rate at a fractional epoch (``epoch + iteration / iterations_per_epoch``)."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    span = max(epochs - warmup_epochs, 1e-12)
    progress = min(1.0, (epoch - warmup_epochs) / span)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def poly_lr_at(it: int, lr: float, iters: int, warmup_iters: int = 0, warmup_ratio: float = 1e-6,
               power: float = 1.0, min_lr: float = 0.0) -> float:
    """mmcv's ``poly`` policy with ``warmup='linear'``, by iteration (``it`` = iterations done).

    The poly value ``(lr - min_lr) * (1 - it / iters) ** power + min_lr`` runs from iteration 0;
    during warm-up it is multiplied by ``1 - (1 - it / warmup_iters) * (1 - warmup_ratio)``, which
    rises linearly from ``warmup_ratio`` to 1 (mmcv multiplies the scheduled, not the base, lr).
    """
    regular = (lr - min_lr) * (1.0 - min(it, iters) / iters) ** power + min_lr
    if it < warmup_iters:
        return regular * (1.0 - (1.0 - it / warmup_iters) * (1.0 - warmup_ratio))
    return regular


def multistep_lr_at(it: int, lr: float, milestones: Sequence[int], gamma: float = 0.1, warmup_iters: int = 0,
                    warmup_factor: float = 0.001) -> float:
    """detectron2's ``WarmupParamScheduler(MultiStepParamScheduler, warmup_method='linear')``, by
    iteration (``it`` = iterations done): ``lr * gamma ** k`` after the k-th milestone (the value
    changes at the milestone itself), times ``warmup_factor * (1 - a) + a`` with ``a = it / warmup_iters``
    during the warm-up (detectron2 multiplies the scheduled value, as mmcv does)."""
    value = lr * gamma ** bisect.bisect_right(list(milestones), it)
    if it < warmup_iters:
        alpha = it / warmup_iters
        value *= warmup_factor * (1.0 - alpha) + alpha
    return value


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    """Set every param group's lr to ``lr`` times its ``lr_scale`` (layer decay); return ``lr``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr


def applied_lr(optimizer: torch.optim.Optimizer) -> float:
    """The base lr the optimizer holds now, read back from its param groups (a python float: no
    device sync): the lr of the first group at scale 1 (every group in pre-training; the head under
    layer decay, i.e. MAE's logged maximum), else the first group's lr over its ``lr_scale``."""
    for group in optimizer.param_groups:
        if group.get("lr_scale", 1.0) == 1.0:
            return float(group["lr"])
    first = optimizer.param_groups[0]
    return float(first["lr"]) / first["lr_scale"]


def cosine_schedule(lr: float, min_lr: float, warmup_epochs: float, epochs: int, steps_per_epoch: int
                    ) -> Callable[[int], float]:
    """MAE's per-iteration schedule by global step: :func:`lr_at` of ``epoch + iteration / iterations``."""

    def at(step: int) -> float:
        epoch, it = divmod(step, steps_per_epoch)
        return lr_at(epoch + it / steps_per_epoch, lr, min_lr, warmup_epochs, epochs)

    return at


def poly_schedule(lr: float, iters: int, warmup_iters: int = 0, warmup_ratio: float = 1e-6, power: float = 1.0,
                  min_lr: float = 0.0) -> Callable[[int], float]:
    """mmseg's schedule by global step (iterations done): :func:`poly_lr_at`."""
    return lambda step: poly_lr_at(step, lr, iters, warmup_iters, warmup_ratio, power, min_lr)


def multistep_schedule(lr: float, milestones: Sequence[int], gamma: float = 0.1, warmup_iters: int = 0,
                       warmup_factor: float = 0.001) -> Callable[[int], float]:
    """detectron2's schedule by global step (iterations done): :func:`multistep_lr_at`."""
    steps = tuple(milestones)
    return lambda step: multistep_lr_at(step, lr, steps, gamma, warmup_iters, warmup_factor)
