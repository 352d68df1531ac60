"""The training loop shared by pre-training, fine-tuning and linear probing (and, step by step,
by the iteration-based segmentation training: :func:`train_step`, :class:`NonFiniteTracker`).

One epoch: per-iteration lr schedule, per-step seeding, mixed precision, gradient accumulation
(without DDP's all-reduce on accumulation steps), loss scaling, gradient clipping, logging.
What differs between the jobs is only ``loss_fn``.

Host synchronisation happens only at log steps: metrics are summed on the device, and the
non-finite check keeps the first bad (step, metric) in a device tensor; both are read every
``--log_every`` iterations and at the end of the epoch. A NaN therefore stops training within
``--log_every`` iterations, before any checkpoint is written from the corrupted weights.
"""
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from util import dist as dist_util
from util.errors import UserError
from util.lr_sched import adjust_learning_rate
from util.misc import autocast, derive_seed, seed_everything

if TYPE_CHECKING:  # the runner builds on this module's users, not the other way round
    from util.runner import Run

_log = logging.getLogger(__name__)

# loss_fn(model, batch) -> (loss to back-propagate, detached metrics [M] summed into the logs)
LossFn = Callable[[nn.Module, Tuple[torch.Tensor, ...]], Tuple[torch.Tensor, torch.Tensor]]


class NonFiniteTracker:
    """Remembers, on the device, the first (step, metric) that was NaN or infinite."""

    def __init__(self, num_metrics: int, device: torch.device) -> None:
        self.k = num_metrics
        self.first = torch.full((), -1, dtype=torch.long, device=device)

    def update(self, metrics: torch.Tensor, step: int) -> None:
        bad = ~torch.isfinite(metrics)
        code = step * self.k + torch.argmax(bad.to(torch.int32))
        self.first = torch.where((self.first < 0) & bad.any(), code, self.first)

    def check(self, names: Sequence[str], steps_per_epoch: Optional[int] = None) -> None:
        """Raise (one host sync) if a non-finite value has been seen.

        ``steps_per_epoch`` names the epoch and iteration of the bad step; None (iteration-based
        training such as segmentation) names the iteration alone.
        """
        first = int(self.first.item())
        if first >= 0:
            step, which = divmod(first, self.k)
            if steps_per_epoch:
                epoch, it = divmod(step, steps_per_epoch)
                where = f"step {step} (epoch {epoch}, iteration {it})"
            else:
                where = f"iteration {step}"
            raise UserError(
                f"Non-finite loss at {where} in the loss of "
                f"{names[which]}. Training stopped; checkpoints already written are intact. "
                f"Lower the learning rate (--blr / --lr), add --clip_grad, or try --amp bf16 / --amp none."
            )


def train_step(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Sequence[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    amp_dtype: Optional[torch.dtype],
    accum: int = 1,
    update: bool = True,
    clip_grad: Optional[float] = None,
) -> torch.Tensor:
    """Forward and backward of one batch, then (if ``update``) the optimizer step; returns the
    detached float metrics [M] (on the device, no host sync).

    Without ``update`` the gradients accumulate, and DDP skips its all-reduce (``no_sync``).
    """
    batch = tuple(t.to(device, non_blocking=True) for t in batch)
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    with model.no_sync() if ddp and not update else contextlib.nullcontext():
        with autocast(device, amp_dtype):
            loss, metrics = loss_fn(model, batch)
        scaler.scale(loss / accum).backward()
    if update:
        if clip_grad:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    return metrics.detach().float()


def train_one_epoch(
    model: nn.Module,
    loss_fn: LossFn,
    metric_names: Sequence[str],
    loader: torch.utils.data.DataLoader,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    run: "Run",
    epoch: int,
    start_step: int = 0,
    total_weights: Optional[Sequence[float]] = None,
) -> Dict[str, float]:
    """Train for one epoch, from iteration ``start_step``; return the epoch's mean metrics.

    Args:
        loss_fn: computes the loss of one batch (called under autocast).
        metric_names: names of the metrics ``loss_fn`` returns (``loss`` is their weighted sum when
            there are several, with ``total_weights``).
        run: the job (``util.runner.Run``): device, mixed precision, flags, TensorBoard, and the
            stop signal, checked after each optimizer step; when it fires the epoch ends early
            (preemption) and the stats carry ``stopped_at`` = iterations done.
    Reads ``args.accum_iter``, ``args.clip_grad``, ``args.log_every``, ``args.seed``, ``args.rank``
    and the lr schedule flags.
    """
    device, amp_dtype, args, tb, should_stop = run.device, run.amp_dtype, run.args, run.tb, run.stop
    model.train(True)
    names = list(metric_names)
    weights = list(total_weights) if total_weights is not None else [1.0] * len(names)
    steps = len(loader) + start_step  # the loader already skips the first start_step batches
    accum = max(1, args.accum_iter)
    epoch_sum = torch.zeros(len(names), device=device)
    window_sum = torch.zeros(len(names), device=device)
    count = window_n = 0
    nonfinite = NonFiniteTracker(len(names), device)
    lr = optimizer.param_groups[0]["lr"]
    t_window = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    it = start_step - 1

    def summary(values: Sequence[float]) -> Dict[str, float]:
        out = {"loss": sum(w * v for w, v in zip(weights, values))}
        if len(names) > 1 or names[0] != "loss":
            out.update({f"loss_{n}": v for n, v in zip(names, values)})
        return out

    for it, batch in enumerate(loader, start=start_step):
        global_step = epoch * steps + it
        if it % accum == 0:
            lr = adjust_learning_rate(optimizer, epoch + it / steps, args)
        # masks, mixup, drop path: every random draw of the step is a function of (seed, step, rank)
        seed_everything(derive_seed(args.seed, global_step, args.rank))
        update = (it + 1) % accum == 0 or it + 1 == steps
        metrics = train_step(model, loss_fn, batch, optimizer, scaler, device, amp_dtype, accum=accum, update=update,
                             clip_grad=args.clip_grad)
        nonfinite.update(metrics, global_step)
        epoch_sum += metrics
        window_sum += metrics
        count += 1
        window_n += 1

        if (it + 1) % args.log_every == 0 or it + 1 == steps:
            nonfinite.check(names, steps)
            values = (dist_util.all_reduce_sum(window_sum.clone()) / (window_n * dist_util.get_world_size())).tolist()
            logged = summary(values)
            parts = " ".join(f"{n} {v:.4f}" for n, v in zip(names, values)) if len(names) > 1 else ""
            _log.info("epoch %d [%d/%d] loss %.4f%s lr %.3e %.3f s/it", epoch, it + 1, steps, logged["loss"],
                      f" ({parts})" if parts else "", lr, (time.perf_counter() - t_window) / window_n)
            tb.scalars({f"train/{k}": v for k, v in logged.items()} | {"train/lr": lr}, global_step + 1)
            window_sum.zero_()
            window_n = 0
            t_window = time.perf_counter()
        if update and should_stop is not None and should_stop():
            break

    nonfinite.check(names, steps)
    values = (dist_util.all_reduce_sum(epoch_sum.clone()) / max(1, count * dist_util.get_world_size())).tolist()
    stats = {**summary(values), "lr": lr}
    if it + 1 < steps:
        stats["stopped_at"] = it + 1
    return stats
