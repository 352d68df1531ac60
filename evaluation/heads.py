"""Linear heads on frozen features: many heads trained side by side on one encoder's features, and
their evaluation (every head's top-1, each image counted once across ranks)."""
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Sequence, Tuple

from util.config.typed import OptimConfig
from util.run import dist as dist_util
from util.run.seed import derive_seed

import torch
from torch import nn

from evaluation.classification import sync_buffers
from evaluation.features import VIT_POOLS


@dataclass(frozen=True)
class HeadSpec:
    """One linear head: the features it reads (encoder block ``layer``, ViT ``pool``) and its learning rate."""

    layer: int
    pool: str
    blr: float
    lr: float

    @property
    def feature(self) -> Tuple[int, str]:
        return self.layer, self.pool

    @property
    def name(self) -> str:
        return f"L{self.layer}_{self.pool}_blr{self.blr:g}".replace(".", "p")  # module names cannot hold a dot


def head_specs(features: Sequence[Tuple[int, str]], blrs: Sequence[float], total_batch: int) -> List[HeadSpec]:
    """Every (feature, base lr) pair; lr = blr x total batch / 256 (``OptimConfig.resolved``)."""
    return [HeadSpec(layer, pool, blr, OptimConfig(blr=blr).resolved(total_batch).lr)
            for layer, pool in features for blr in sorted(blrs)]


class LinearHeads(nn.Module):
    """A linear classifier per :class:`HeadSpec` (``BatchNorm1d(affine=False)`` first with
    ``batch_norm``, MAE's probe); ``forward`` maps the stacked features [K, B, D] of ``features`` to
    one logits tensor [B, classes] per head.

    Each head's weights come from its own generator, seeded by (seed, layer, pooling): the same
    initial head whatever other heads the run has (heads of one feature and different lrs start alike).
    """

    def __init__(self, specs: Sequence[HeadSpec], features: Sequence[Tuple[int, str]], dim: int, num_classes: int,
                 seed: int, batch_norm: bool) -> None:
        super().__init__()
        self.specs = list(specs)
        self.index = [list(features).index(s.feature) for s in self.specs]
        self.heads = nn.ModuleDict()
        for s in self.specs:
            linear = nn.Linear(dim, num_classes)
            gen = torch.Generator().manual_seed(derive_seed(seed, s.layer, VIT_POOLS.index(s.pool)))
            nn.init.trunc_normal_(linear.weight, std=0.01, generator=gen)
            nn.init.zeros_(linear.bias)
            self.heads[s.name] = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), linear) if batch_norm \
                else linear

    def linears(self) -> List[nn.Linear]:
        return [h[-1] if isinstance(h, nn.Sequential) else h for h in self.heads.values()]

    def forward(self, feats: torch.Tensor) -> List[torch.Tensor]:
        return [head(feats[k]) for k, head in zip(self.index, self.heads.values())]


@torch.no_grad()
def evaluate_heads(heads: LinearHeads, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                   features_of: Callable[[torch.Tensor], torch.Tensor]) -> Tuple[Dict[str, float], int, List[str]]:
    """Every head's top-1 (%) over ``batches`` (this process's share; the counts summed over ranks),
    the number of images, and the heads whose parameters are no longer finite (diverged).

    Args:
        batches: (inputs, labels); ``features_of(inputs on the device)`` gives the stacked features
            [K, B, D] the heads read (an encoder pass for images, the identity for cached features).
    """
    heads.eval()
    sync_buffers(heads)
    correct = torch.zeros(len(heads.heads), dtype=torch.float64, device=device)
    count = torch.zeros(1, dtype=torch.float64, device=device)
    for x, labels in batches:
        x, labels = x.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        hits = [(logits.argmax(dim=1) == labels).sum() for logits in heads(features_of(x).float())]
        correct += torch.stack(hits).double()
        count += labels.numel()
    dist_util.all_reduce_sum(correct)
    dist_util.all_reduce_sum(count)
    n = int(count.item())
    top1 = (100.0 * correct / max(n, 1)).tolist()
    diverged = [name for name, head in heads.heads.items()
                if not all(bool(torch.isfinite(p).all()) for p in head.parameters())]
    return dict(zip(heads.heads, top1)), n, diverged
