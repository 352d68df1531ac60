"""Features of any encoder layers x poolings, with one vocabulary, and their gather across ranks.

The poolings are named ``cls`` (the cls token; after the final norm for the last block, as in
``main_linprobe.py``) and ``avg`` (the mean of the patch tokens). ``models_vit.ViT`` calls the first
``token`` (timm's ``global_pool``), and so do the files and keys that linear evaluation and the layer
probes have always written; :data:`POOLS` is the one map between the two spellings, and
:func:`pool_arg` lets a command line give either.
"""
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

from util.data.shards import ShardEvalData
from util.run import dist as dist_util
from util.run.amp import autocast

import torch

import models_vit

# the poolings, by the name logs and tables use -> models_vit.ViT's pooling of that name
POOLS = {"cls": "token", "avg": "avg"}
VIT_POOLS = tuple(POOLS.values())
POOL_LABEL = {vit: name for name, vit in POOLS.items()}


def pool_arg(value: str) -> str:
    """A ``--pool`` value in either spelling -> the ViT's name (``cls`` -> ``token``); anything else
    unchanged, for the parser's ``choices`` to refuse."""
    return POOLS.get(value, value)


def pooled_features(encoder: models_vit.ViT, imgs: torch.Tensor, features: Sequence[Tuple[int, str]]) -> torch.Tensor:
    """The features of ``features`` ((layer, ViT pool) pairs) from one forward pass: [K, B, D] float32."""
    layers = sorted({layer for layer, _ in features})
    pools = [p for p in VIT_POOLS if any(p == q for _, q in features)]
    out = encoder.multi_layer_features(imgs, layers, pools)
    return torch.stack([out[pool][layers.index(layer)].float() for layer, pool in features])


@torch.no_grad()
def extract(encoder: models_vit.ViT, features: Sequence[Tuple[int, str]], batches: Iterable, device: torch.device,
            amp_dtype: Optional[torch.dtype] = None, columns: int = 1) -> Tuple[torch.Tensor, ...]:
    """Every batch ``(images, *others)`` of ``batches`` through the encoder (under autocast with
    ``amp_dtype``): (features [K, n, D] float32 on the CPU, then each of the ``columns`` other tensors
    of the batches concatenated). A process without any batch gets [K, 0, D] and empty int64 tensors.
    """
    feats: List[torch.Tensor] = []
    rest: List[List[torch.Tensor]] = []
    for imgs, *others in batches:
        with autocast(device, amp_dtype):
            feats.append(pooled_features(encoder, imgs.to(device, non_blocking=True), features).cpu())
        rest.append([torch.as_tensor(t) for t in others])
    if not feats:
        return (torch.zeros(len(features), 0, encoder.embed_dim), *[torch.zeros(0, dtype=torch.long)] * columns)
    return (torch.cat(feats, dim=1), *[torch.cat(col) for col in zip(*rest)])


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
    ([K, total, D], [total]) on the CPU of every process.

    One all-gather of the shares padded to the longest; the features are copied, never added, so any
    number of processes gives the single process's matrices bit for bit.
    """
    world = dist_util.get_world_size()
    if world > 1:
        longest = torch.tensor([labels.numel()], device=device)
        torch.distributed.all_reduce(longest, op=torch.distributed.ReduceOp.MAX)
        pad = int(longest.item()) - labels.numel()
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
    feats, labels, ids = feats.cpu(), labels.cpu(), ids.cpu()
    if ids.numel() != total or not torch.equal(torch.sort(ids).values, torch.arange(total)):
        raise RuntimeError(f"the gathered features hold {ids.numel()} samples of {total}, not each once")
    full = torch.empty(feats.shape[0], total, feats.shape[2], dtype=feats.dtype)
    full[:, ids] = feats
    full_labels = torch.empty(total, dtype=torch.long)
    full_labels[ids] = labels.long()
    return full, full_labels
