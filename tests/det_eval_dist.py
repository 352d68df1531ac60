"""COCO evaluation of a tiny random detector (seed 0), in one process or under DDP.

    torchrun --standalone --nproc_per_node 2 tests/det_eval_dist.py DATA OUT   # each rank: every other image
    python tests/det_eval_dist.py DATA OUT                                     # one process: every image

DATA is a COCO-layout folder; rank 0 writes ``OUT/metrics-w{world}.json`` and the gathered results
``OUT/results-w{world}.json``.
"""
import json
import sys
from pathlib import Path

from util.data.datasets import ShardSampler
from util.run import dist as dist_util

import torch
from torch.utils.data import DataLoader

from Detection import data, models
from evaluation import coco as evaluation


def main(root: str, out: Path) -> None:
    info = dist_util.init_distributed("cpu")
    torch.manual_seed(0)
    model = models.create_model("vitdet_mask_rcnn_vit_tiny_patch4", num_classes=3, score_thresh=0.0)
    val = data.CocoDetection(Path(root), "val")
    # one image per batch: the same arithmetic for an image whichever process predicts it
    loader = DataLoader(val, batch_size=1, sampler=ShardSampler(len(val), info.rank, info.world_size),
                        collate_fn=data.collate)
    world = info.world_size
    metrics = evaluation.evaluate(model, loader, val.coco, val.cat_ids, info.device,
                                  results_path=out / f"results-w{world}.json")
    if info.rank == 0:
        (out / f"metrics-w{world}.json").write_text(json.dumps(metrics))
    else:
        assert metrics == {}
    dist_util.cleanup()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
