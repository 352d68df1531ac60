"""mIoU, mAcc, aAcc and the per-class table, computed as mmseg computes them.

Per image, over the pixels whose label is not ``ignore_index`` (255): the areas of intersection
(prediction == label), of the prediction and of the label, per class. These areas are **summed over
the whole validation set** (and over processes) before any ratio is taken:

* IoU_c = intersect_c / (pred_c + label_c - intersect_c);  Acc_c = intersect_c / label_c
* aAcc = sum_c intersect_c / sum_c label_c
* mIoU / mAcc = the mean over classes of IoU / Acc, leaving out NaN: a class absent from both the
  prediction and the ground truth has union 0 and IoU NaN (a class only predicted has IoU 0);
  a class absent from the ground truth has Acc NaN.
"""
import math
from typing import Dict, List, Sequence

import torch

from Segmentation.data import IGNORE_INDEX


def intersect_and_union(pred: torch.Tensor, label: torch.Tensor, num_classes: int,
                        ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Areas [4, C] (int64): intersection, union, prediction, label, over the non-ignored pixels.

    Args:
        pred: predicted class per pixel, any shape.
        label: ground truth of the same shape (already reduced; ``ignore_index`` is left out).
    """
    valid = label != ignore_index
    pred, label = pred[valid].long(), label[valid].long()
    # mmseg's histc(bins=C, min=0, max=C-1) drops values outside 0..C-1; bincount then keeps the first C
    inside = (label >= 0) & (label < num_classes)

    def count(x: torch.Tensor) -> torch.Tensor:
        return torch.bincount(x, minlength=num_classes)[:num_classes]

    area_inter = count(pred[pred == label])
    area_pred = count(pred)
    area_label = count(label[inside])
    return torch.stack([area_inter, area_pred + area_label - area_inter, area_pred, area_label])


def summarize(areas: torch.Tensor) -> Dict[str, object]:
    """Metrics (in %) from summed areas [4, C]: ``aAcc``, ``mIoU``, ``mAcc`` and per-class ``IoU`` /
    ``Acc`` lists (NaN where undefined, as mmseg)."""
    inter, union, _, label = areas.double().cpu()
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    iou = torch.where(union > 0, inter / union.clamp(min=1), nan)
    acc = torch.where(label > 0, inter / label.clamp(min=1), nan)
    total = label.sum()
    return {
        "aAcc": 100.0 * float(inter.sum() / total) if total > 0 else float("nan"),
        "mIoU": 100.0 * float(iou.nanmean()),
        "mAcc": 100.0 * float(acc.nanmean()),
        "IoU": (100.0 * iou).tolist(),
        "Acc": (100.0 * acc).tolist(),
    }


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    line = lambda r: "| " + " | ".join(str(v).ljust(w) for v, w in zip(r, widths)) + " |"  # noqa: E731
    return [rule, line(header), rule, *[line(r) for r in rows], rule]


def format_table(stats: Dict[str, object], names: Sequence[str]) -> str:
    """mmseg's evaluation print-out: the per-class IoU / Acc table, then the summary."""
    fmt = lambda v: "nan" if math.isnan(v) else f"{v:.2f}"  # noqa: E731
    per_class = [(n, fmt(i), fmt(a)) for n, i, a in zip(names, stats["IoU"], stats["Acc"])]
    summary = [("global", fmt(stats["mIoU"]), fmt(stats["mAcc"]), fmt(stats["aAcc"]))]
    return "\n".join(["per class results:", *_table(("Class", "IoU", "Acc"), per_class), "Summary:",
                      *_table(("Scope", "mIoU", "mAcc", "aAcc"), summary)])
