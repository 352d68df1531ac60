"""Features of any encoder layers x poolings, with one vocabulary, and their gather across ranks."""
from typing import Iterable, Iterator, Sequence, Tuple

from util.data.shards import ShardEvalData
from util.run import dist as dist_util

import torch

import models_vit

# the poolings, by the name logs and tables use -> models_vit.ViT's pooling of that name
POOLS = {"cls": "token", "avg": "avg"}
VIT_POOLS = tuple(POOLS.values())
POOL_LABEL = {vit: name for name, vit in POOLS.items()}


def pooled_features(encoder: models_vit.ViT, imgs: torch.Tensor, features: Sequence[Tuple[int, str]]) -> torch.Tensor:
    """The features of ``features`` ((layer, pool) pairs) from one forward pass: [K, B, D] float32."""
    layers = sorted({layer for layer, _ in features})
    pools = [p for p in VIT_POOLS if any(p == q for _, q in features)]
    out = encoder.multi_layer_features(imgs, layers, pools)
    return torch.stack([out[pool][layers.index(layer)].float() for layer, pool in features])


def indexed_batches(reader: Iterable) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(images, labels, sample indices)`` of an evaluation reader (this process's share).

    Shards return their sample ids; an image folder's loader reads its sampler's indices in order.
    """
    if isinstance(reader, ShardEvalData):
        yield from reader
        return
    ids = torch.as_tensor(list(reader.sampler))
    pos = 0
    for imgs, labels in reader:
        yield imgs, labels, ids[pos:pos + len(labels)]
        pos += len(labels)


def gather_by_index(feats: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor, total: int,
                    device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Every process's share ([K, n_r, D], [n_r], sample ids [n_r]) -> the whole set in index order
    ([K, total, D], [total]) on every process (one all-gather; shares padded to the largest)."""
    world = dist_util.get_world_size()
    if world > 1:
        longest = -(-total // world) + 1  # no share of a disjoint split is longer (folders: ceil; shards: floor + 1)
        pad = longest - labels.numel()
        parts = [torch.nn.functional.pad(feats, (0, 0, 0, pad)), torch.nn.functional.pad(labels.long(), (0, pad), value=-1),
                 torch.nn.functional.pad(ids.long(), (0, pad), value=-1)]
        gathered = []
        for t in parts:
            t = t.to(device).contiguous()
            out = [torch.empty_like(t) for _ in range(world)]
            torch.distributed.all_gather(out, t)
            gathered.append(torch.cat(out, dim=-2 if t.dim() == 3 else 0).cpu())
        feats, labels, ids = gathered
        keep = ids >= 0
        feats, labels, ids = feats[:, keep], labels[keep], ids[keep]
    if ids.numel() != total or not torch.equal(torch.sort(ids).values, torch.arange(total)):
        raise RuntimeError(f"the feature cache holds {ids.numel()} samples of {total}, not each once")
    full = torch.empty(feats.shape[0], total, feats.shape[2], dtype=feats.dtype)
    full[:, ids] = feats
    full_labels = torch.empty(total, dtype=torch.long)
    full_labels[ids] = labels.long()
    return full, full_labels
