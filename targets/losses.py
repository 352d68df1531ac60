"""The per-patch losses of the decoders: (pred [N, L, C], target [N, L, C]) -> [N, L], and their
mean over the masked patches. The one module of the method the pre-training model imports."""
from typing import Callable, Dict

import torch
import torch.nn.functional as F


def mse_per_patch(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MAE's loss: mean squared error over the channels of each patch."""
    return (pred - target).pow(2).mean(dim=-1)


def cosine_per_patch(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``2 - 2 cos(pred, target)``: the squared distance of the L2-normalized vectors."""
    return 2.0 - 2.0 * (F.normalize(pred, dim=-1) * F.normalize(target, dim=-1)).sum(dim=-1)


def smooth_l1_per_patch(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Smooth-L1 (beta 1) averaged over the channels of each patch (used by feature teachers)."""
    return F.smooth_l1_loss(pred, target, reduction="none").mean(dim=-1)


LOSSES: Dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mse": mse_per_patch,
    "cosine": cosine_per_patch,
    "smooth_l1": smooth_l1_per_patch,
}

def masked_mean(per_patch: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average a [N, L] loss over the patches where ``mask`` is 1 (removed patches)."""
    return (per_patch * mask).sum() / mask.sum()
