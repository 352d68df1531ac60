"""One pre-training epoch: targets (teacher forward), DeepMIM forward, backward, logging.

Host synchronisation happens only at log steps: losses are summed on the device, the non-finite
check keeps the first bad (step, layer) in a device tensor, and both are read every ``--log_every``
iterations and at the end of the epoch. A non-finite loss therefore stops training within
``--log_every`` iterations, before any checkpoint is written from the corrupted weights.
"""
import contextlib
import logging
import time
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from util import dist as dist_util
from util.errors import UserError
from util.lr_sched import adjust_learning_rate
from util.misc import TensorBoard, autocast, derive_seed, seed_everything
from util.targets import Target, compute_targets

_log = logging.getLogger(__name__)


class NonFiniteTracker:
    """Remembers, on the device, the first (step, layer) whose loss is NaN or infinite."""

    def __init__(self, num_layers: int, device: torch.device) -> None:
        self.k = num_layers
        self.first = torch.full((), -1, dtype=torch.long, device=device)

    def update(self, layer_losses: torch.Tensor, step: int) -> None:
        bad = ~torch.isfinite(layer_losses.detach())
        code = step * self.k + torch.argmax(bad.to(torch.int32))
        self.first = torch.where((self.first < 0) & bad.any(), code, self.first)

    def check(self, layer_names: Sequence[str], steps_per_epoch: int) -> None:
        """Raise (one host sync) if a non-finite loss has been seen."""
        first = int(self.first.item())
        if first >= 0:
            step, layer = divmod(first, self.k)
            epoch, it = divmod(step, steps_per_epoch)
            raise UserError(
                f"Non-finite loss at step {step} (epoch {epoch}, iteration {it}) in the loss of "
                f"{layer_names[layer]}. Training stopped; checkpoints already written are intact. "
                f"Lower --blr, add --clip_grad, or try --amp bf16 / --amp none."
            )


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
    """Train for one epoch (from iteration ``start_step``); return the epoch's mean metrics.

    Args:
        model: DeepMIM, possibly wrapped in DDP / ``torch.compile``.
        targets: name -> frozen target module; each runs once per step.
        layer_targets: per supervised layer, the name of its target.
        should_stop: optional callable; when it returns True after an optimizer step, the epoch
            ends early (preemption) and the stats carry ``stopped_at`` = iterations done.
    """
    model.train(True)
    layers = [f"L{x}" for x in args.ds_layers]
    k = len(layers)
    steps = len(loader) + start_step  # the loader already skips the first start_step batches
    accum = args.accum_iter
    loss_sum = torch.zeros(k, device=device)
    count = 0
    window_sum = torch.zeros(k, device=device)
    window_n = 0
    nonfinite = NonFiniteTracker(k, device)
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    t_window = time.perf_counter()
    lr = optimizer.param_groups[0]["lr"]
    optimizer.zero_grad(set_to_none=True)
    it = start_step
    for it, (imgs, _) in enumerate(loader, start=start_step):
        global_step = epoch * steps + it
        if it % accum == 0:
            lr = adjust_learning_rate(optimizer, epoch + it / steps, args)
        # masks (and any other randomness of the step) are a pure function of (seed, step, rank)
        seed_everything(derive_seed(args.seed, global_step, args.rank))
        imgs = imgs.to(device, non_blocking=True)
        update = (it + 1) % accum == 0 or it + 1 == steps
        # DDP: skip the gradient all-reduce on accumulation steps
        with model.no_sync() if ddp and not update else contextlib.nullcontext():
            with autocast(device, amp_dtype):
                tgt = compute_targets(targets, imgs)
                out = model(imgs, [tgt[name] for name in layer_targets], mask_ratio=args.mask_ratio)
            scaler.scale(out.loss / accum).backward()
        if update:
            if args.clip_grad:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

        losses = out.layer_losses.detach()
        nonfinite.update(losses, global_step)
        loss_sum += losses
        window_sum += losses
        count += 1
        window_n += 1

        last = it + 1 == steps
        if (it + 1) % args.log_every == 0 or last:
            nonfinite.check(layers, steps)
            window = dist_util.all_reduce_sum(window_sum.clone()) / (window_n * dist_util.get_world_size())
            vals = window.tolist()
            dt = (time.perf_counter() - t_window) / window_n
            _log.info(
                "epoch %d [%d/%d] loss %.4f (%s) lr %.3e %.3f s/it",
                epoch, it + 1, steps, sum(w * v for w, v in zip(args.ds_weights, vals)),
                " ".join(f"{n} {v:.4f}" for n, v in zip(layers, vals)), lr, dt,
            )
            tb.scalars({"train/loss": sum(w * v for w, v in zip(args.ds_weights, vals)), "train/lr": lr,
                        **{f"train/loss_{n}": v for n, v in zip(layers, vals)}}, global_step + 1)
            window_sum.zero_()
            window_n = 0
            t_window = time.perf_counter()
        if update and should_stop is not None and should_stop():
            break

    nonfinite.check(layers, steps)
    mean = dist_util.all_reduce_sum(loss_sum.clone()) / max(1, count * dist_util.get_world_size())
    vals = mean.tolist()
    stats = {"loss": sum(w * v for w, v in zip(args.ds_weights, vals)), "lr": lr}
    stats.update({f"loss_{n}": v for n, v in zip(layers, vals)})
    if it + 1 < steps:
        stats["stopped_at"] = it + 1
    return stats
