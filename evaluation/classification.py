"""The classification evaluate (top-1 / top-5 / loss, each image counted once across ranks) and the
buffer broadcast every distributed evaluation of a trained module starts with."""
from typing import Dict, Optional

from util.run import dist as dist_util
from util.run.amp import autocast

import torch
from torch import nn


def sync_buffers(module: nn.Module) -> None:
    """Rank 0's buffers to every rank: training runs DDP without buffer synchronisation, so the
    BatchNorm statistics of a probe differ per rank, and every shard of a distributed evaluation must
    see the model that rank 0 saves."""
    if dist_util.get_world_size() > 1:
        for buf in module.buffers():
            torch.distributed.broadcast(buf, src=0)


@torch.no_grad()
def evaluate(model: nn.Module, loader: torch.utils.data.DataLoader, device: torch.device,
             amp_dtype: Optional[torch.dtype], reduce: bool) -> Dict[str, float]:
    """Top-1 / top-5 accuracy (%) and cross-entropy over ``loader``.

    Counts are summed on the device and read once at the end. With ``reduce`` (``--dist_eval``)
    each rank holds a disjoint shard (no padding) and the counts are summed over ranks, so every
    validation image is counted exactly once.
    """
    model.eval()
    if reduce:
        sync_buffers(model)
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
