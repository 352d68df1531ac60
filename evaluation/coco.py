"""COCO evaluation of instance predictions: COCO's results format, the gather to rank 0, COCOeval.

* :func:`to_coco_results`: a model's outputs -> COCO's results format, one entry per instance:
  ``{'image_id', 'category_id', 'bbox': [x, y, w, h], 'score', 'segmentation': compressed RLE}``
  (masks thresholded at 0.5, as detectron2 and torchvision do);
* :func:`gather_to_main`: every process's list, concatenated on rank 0 (over the CPU control group);
* :func:`coco_evaluate`: pycocotools' ``COCOeval`` per IoU type (``bbox``, ``segm``) over the images
  evaluated: AP, AP50, AP75, APs, APm, APl in percent (NaN where COCOeval has no ground truth to
  score, e.g. no small objects), and COCOeval's printed summary;
* :func:`evaluate`: the loop: inference on this process's shard, gather, evaluation on rank 0,
  optionally the results JSON (``coco_instances_results.json`` in detectron2's naming).

Evaluation is sharded over the processes without padding (``util.data.datasets.ShardSampler``), so every
image is predicted once; the gathered list holds the image ids as well, so an image without any
detection still counts in the AP.
"""
import contextlib
import io
import json
import logging
import math
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from util.checkpoints.files import write_atomic
from util.run import dist as dist_util

import numpy as np
import torch
import torch.distributed as dist
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

_log = logging.getLogger(__name__)

IOU_TYPES = ("bbox", "segm")
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # COCOeval.stats[0:6]
RESULTS_FILE = "coco_instances_results.json"


def to_coco_results(output: Dict[str, torch.Tensor], image_id: int, cat_ids: Sequence[int],
                    mask_threshold: float = 0.5) -> List[Dict[str, Any]]:
    """One image's predictions in COCO's results format.

    Args:
        output: torchvision's detection output at the image's original size: ``boxes`` [N, 4] (xyxy),
            ``scores`` [N], ``labels`` [N] (1..K), optionally ``masks`` [N, 1, H, W] (probabilities).
        image_id: the image's COCO id.
        cat_ids: label k is category ``cat_ids[k - 1]``.
    """
    boxes = output["boxes"].detach().float().cpu()
    if len(boxes) == 0:
        return []
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    scores = output["scores"].detach().float().cpu().tolist()
    labels = output["labels"].detach().cpu().tolist()
    results = [{"image_id": int(image_id), "category_id": int(cat_ids[label - 1]), "bbox": [round(v, 2) for v in box],
                "score": round(score, 5)} for box, score, label in zip(xywh, scores, labels)]
    if "masks" in output:
        masks = (output["masks"][:, 0] > mask_threshold).cpu().numpy().astype(np.uint8)  # [N, H, W]
        rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0)))  # pycocotools wants [H, W, N]
        for r, rle in zip(results, rles):
            r["segmentation"] = {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
    return results


def gather_to_main(items: List[Any]) -> Optional[List[Any]]:
    """All processes' ``items`` concatenated in rank order on rank 0 (``None`` elsewhere); the list
    itself in a single process. Objects travel on the CPU (gloo) control group, never on the GPUs."""
    world = dist_util.get_world_size()
    if world == 1:
        return list(items)
    rank = dist_util.get_rank()
    parts: Optional[List[Any]] = [None] * world if rank == 0 else None
    dist.gather_object(items, parts, dst=0, group=dist_util.control_group())
    return [x for part in parts for x in part] if parts is not None else None


def _results_for(results: List[Dict[str, Any]], iou_type: str) -> List[Dict[str, Any]]:
    # COCO.loadRes turns a box into a polygon mask when both are present, and takes a mask's box
    # when there is no box: each IoU type gets only its own field, as detectron2 does
    drop = "segmentation" if iou_type == "bbox" else "bbox"
    return [{k: v for k, v in r.items() if k != drop} for r in results if iou_type == "bbox" or "segmentation" in r]


def coco_evaluate(coco_gt: COCO, results: List[Dict[str, Any]], image_ids: Optional[Iterable[int]] = None,
                  iou_types: Sequence[str] = IOU_TYPES) -> Tuple[Dict[str, Dict[str, float]], str]:
    """COCOeval of ``results`` against ``coco_gt`` over ``image_ids`` (default: every image).

    Returns:
        ``{iou_type: {'AP', 'AP50', 'AP75', 'APs', 'APm', 'APl'}}`` in percent, and COCOeval's
        printed summary. No prediction at all gives AP 0 (COCOeval itself cannot run on an empty list).
    """
    ids = sorted(set(image_ids)) if image_ids is not None else sorted(coco_gt.getImgIds())
    metrics: Dict[str, Dict[str, float]] = {}
    text = []
    for iou_type in iou_types:
        res = _results_for(results, iou_type)
        if not res:
            _log.warning("no %s predictions: AP 0", iou_type)
            metrics[iou_type] = {m: 0.0 for m in METRICS}
            continue
        out = io.StringIO()
        with contextlib.redirect_stdout(out):  # pycocotools prints; the summary is returned instead
            coco_dt = coco_gt.loadRes(res)
            ev = COCOeval(coco_gt, coco_dt, iou_type)
            ev.params.imgIds = ids
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        summary = "\n".join(line for line in out.getvalue().splitlines() if line.lstrip().startswith("Average"))
        text.append(f"{iou_type}:\n{summary}")
        # COCOeval writes -1 where no ground truth can be scored (e.g. no small objects): NaN, as detectron2
        metrics[iou_type] = {m: float(v) * 100 if v >= 0 else math.nan for m, v in zip(METRICS, ev.stats[:6])}
    return metrics, "\n".join(text)


def write_results(path: Path, results: List[Dict[str, Any]]) -> None:
    """COCO's results JSON (a list of instances), written atomically."""
    data = json.dumps(results).encode()
    write_atomic(Path(path), lambda f: f.write(data))


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Iterable, coco_gt: COCO, cat_ids: Sequence[int],
             device: torch.device, iou_types: Sequence[str] = IOU_TYPES,
             results_path: Optional[Path] = None) -> Dict[str, Dict[str, float]]:
    """Predict this process's shard (``loader`` yields ``(images, targets)`` of :func:`Detection.data.collate`,
    targets holding ``image_id``), gather on rank 0, evaluate there.

    Returns:
        the metrics of :func:`coco_evaluate` on rank 0, ``{}`` on the other ranks.
    """
    was_training = model.training
    model.eval()
    results: List[Dict[str, Any]] = []
    ids: List[int] = []
    try:
        for images, targets in loader:
            outputs = model([img.to(device, non_blocking=True) for img in images])
            for out, t in zip(outputs, targets):
                ids.append(int(t["image_id"]))
                results.extend(to_coco_results(out, t["image_id"], cat_ids))
    finally:
        model.train(was_training)
    gathered = gather_to_main([(ids, results)])
    if gathered is None:
        return {}
    all_ids = [i for part_ids, _ in gathered for i in part_ids]
    all_results = [r for _, part in gathered for r in part]
    if results_path is not None:
        write_results(results_path, all_results)
    metrics, summary = coco_evaluate(coco_gt, all_results, all_ids, iou_types)
    _log.info("COCO evaluation of %d images, %d instances:\n%s", len(all_ids), len(all_results), summary)
    return metrics
