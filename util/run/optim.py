"""Optimizer builders shared by pre-training, fine-tuning and linear probing."""
import logging
from typing import Iterable, List, Optional

import torch
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import nn

_log = logging.getLogger(__name__)


def no_decay_names(model: nn.Module) -> set:
    fn = getattr(model, "no_weight_decay", None)
    return set(fn()) if fn is not None else set()


def weight_decay_groups(model: nn.Module, weight_decay: float) -> List[dict]:
    """Two groups: decay on weight matrices; none on biases, norms (1-D) and the model's tokens."""
    return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=no_decay_names(model))


def layer_decay_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> List[dict]:
    """One group per depth with ``lr_scale = layer_decay ** (depth + 1 - layer_id)``.

    layer_id is 0 for the patch embedding / cls token / position embedding, i for block i (1-based)
    and depth + 1 for the head and ``fc_norm`` (timm's grouping, which matches MAE's / BEiT's).
    Biases, norms, the position embedding and the cls token get no weight decay.
    """
    return param_groups_layer_decay(
        model, weight_decay=weight_decay, no_weight_decay_list=no_decay_names(model), layer_decay=layer_decay
    )


def use_fused(device: torch.device, fused: Optional[bool]) -> bool:
    """Fused AdamW by default on CUDA and CPU (one kernel over all parameters).

    On CPU the fused step is several times faster than the foreach one (docs/PERFORMANCE.md); other
    devices keep the foreach implementation.
    """
    return device.type in ("cuda", "cpu") if fused is None else bool(fused)


def adamw(groups: Iterable[dict], lr: float, betas=(0.9, 0.999), device: torch.device = torch.device("cpu"),
          fused: Optional[bool] = None) -> torch.optim.AdamW:
    """AdamW over ``groups``; fused kernels where they help (see :func:`use_fused`)."""
    fused = use_fused(device, fused)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused, foreach=None if fused else True)
