"""Weighted k-nearest-neighbour classification of frozen features (DINO's ``eval_knn``), and the fixed,
class-balanced subsets the pre-training monitor classifies.

DINO's classifier (Caron et al. 2021, ``eval_knn.py``; DINOv2 keeps it): features are L2-normalized,
the similarity of a test feature to every training feature is their cosine; the ``k`` most similar
training features vote for their class with weight ``exp(similarity / T)``; the prediction is the
class with the largest total vote. DINO uses k = 20, T = 0.07.

Pure tensor code: no model, no data loading, no communication.
"""
from typing import List, Sequence

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_K = 20
DEFAULT_TEMPERATURE = 0.07


def balanced_subset(labels: Sequence[int], per_class: int, seed: int) -> List[int]:
    """Indices of ``per_class`` samples of every class (all of a class that has fewer), drawn with
    ``seed``; sorted, so that the subset reads in dataset order.

    Args:
        labels: the class of every sample of the dataset.
        per_class: samples kept per class (0 or less: every sample).
        seed: the draw's seed (the same seed gives the same subset on every process).
    """
    labels = np.asarray(labels)
    if per_class <= 0:
        return list(range(len(labels)))
    rng = np.random.default_rng(seed)
    keep: List[int] = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        keep += rng.choice(members, size=min(per_class, len(members)), replace=False).tolist()
    return sorted(int(i) for i in keep)


@torch.no_grad()
def knn_votes(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor, num_classes: int,
              k: int = DEFAULT_K, temperature: float = DEFAULT_TEMPERATURE, chunk: int = 1024) -> torch.Tensor:
    """Every test feature's weighted votes per class.

    Args:
        train_feats: [N, D] features of the labelled set (any scale: they are L2-normalized here).
        train_labels: [N] classes, 0 .. num_classes - 1.
        test_feats: [M, D] features to classify.
        k: neighbours (at most N are used).
        temperature: T of the weights ``exp(cos / T)``.
        chunk: test features per similarity matrix (bounds the memory to ``chunk x N``).

    Returns:
        [M, num_classes] float32: the sum of ``exp(cos / T)`` over the k nearest training features of
        each class.
    """
    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float(), dim=1)
    labels = train_labels.to(train.device, torch.long)
    k = min(k, train.shape[0])
    out = []
    for start in range(0, test.shape[0], chunk):
        sim = test[start:start + chunk] @ train.T  # [B, N] cosines
        top, idx = sim.topk(k, dim=1)  # [B, k]
        weights = (top / temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
        out.append(votes.scatter_add_(1, labels[idx], weights))
    return torch.cat(out) if out else torch.zeros(0, num_classes, device=train.device)


def knn_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, num_classes: int, k: int = DEFAULT_K,
                 temperature: float = DEFAULT_TEMPERATURE) -> float:
    """Top-1 accuracy (%) of :func:`knn_votes` on ``test_labels`` (ties: the lowest class wins)."""
    votes = knn_votes(train_feats, train_labels, test_feats, num_classes, k, temperature)
    correct = int((votes.argmax(dim=1) == test_labels.to(votes.device)).sum().item())
    return 100.0 * correct / max(1, len(test_labels))
