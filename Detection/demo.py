"""The detection CPU demo (``make det-demo``): what self-supervised pre-training gives a detector when
labels are few, end to end.

1. pre-training: DeepMIM (ViT-Ti/4, normalized-pixel target, layers 6 / 8 / 10 / 12) on the 400
   training images of the built-in synthetic COCO-layout set, without their annotations;
2. detection: ViTDet's Mask R-CNN on the first 4 blocks of that encoder (``--finetune``), trained on
   40 labelled images (a second synthetic set, written once: the same 60 validation images) and
   evaluated with COCOeval;
3. the same detector from a randomly initialised backbone, same recipe and seed;
4. both results side by side.

Interrupted, the same command resumes each stage; run again, it prints the results again.

The detection recipe is ViTDet's scaled to the 48-80 pixel synthetic images: the 1024 crop becomes
64, ViT-B becomes ViT-Ti/4 cut to 4 blocks (window 4, global blocks 2 and 4), the heads are narrower,
layer decay 0.75, 300 iterations of 4 images.
"""
import argparse
import time
from pathlib import Path
from typing import Any, Dict, List

from util.config.cli import Parser, nonneg_int, positive_int
from util.data.datasets import cache_root
from util.run.errors import run_cli
from util.run.logs import fmt_seconds

import torch

import main_pretrain
from Detection import data, train
from Detection.make_synthetic import SPLIT_SIZES
from Detection.make_synthetic import build as build_synthetic

PRETRAIN = ["--model", "deepmim_vit_tiny_patch4", "--input_size", "32", "--device", "cpu", "--amp", "none",
            "--norm_pix_loss", "--epochs", "EPOCHS", "--warmup_epochs", "2", "--batch_size", "64", "--blr", "1.5e-3",
            "--knn_every", "0", "--recon_every", "0"]
LABELLED = 40  # detection's training images
DETECT = ["--data_path", "DATA", "--model", "vitdet_mask_rcnn_vit_tiny_patch4", "--device", "cpu", "--amp", "none",
          "--batch_size", "4", "--iters", "ITERS", "--warmup_iters", "25", "--lr", "3e-4", "--layer_decay", "0.75",
          "--eval_every", "0", "--save_every", "100000", "--save_last_every", "100", "--log_every", "50"]


def labelled_data() -> Path:
    """The detection data: a synthetic set of ``LABELLED`` training images and the usual validation
    images (the same draws: each split has its own seed), written once under ``$DEEPMIM_CACHE``."""
    return build_synthetic(cache_root() / f"synthetic_coco_{LABELLED}", sizes={"train": LABELLED, "val": SPLIT_SIZES["val"]})


def fill(recipe: List[str], **values: Any) -> List[str]:
    return [str(values.get(x.lower(), x)) if x.isupper() else x for x in recipe]


def main(args: argparse.Namespace) -> Dict[str, Dict[str, Any]]:
    t0 = time.perf_counter()
    # the demo's tensors are tiny: a second thread gains little, and on a busy 2-core machine OpenMP
    # threads waiting for each other make training several times slower (docs/PERFORMANCE.md)
    torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    workers = ["--num_workers", str(args.num_workers)]
    images = data.image_folder(data.resolve_root(data.SYNTHETIC), "train")
    labelled = labelled_data()
    main_pretrain.main(main_pretrain.get_args_parser().parse_args(
        [*fill(PRETRAIN, epochs=args.pretrain_epochs), *workers, "--data_path", str(images),
         "--output_dir", str(out / "pretrain")]))
    encoder = out / "pretrain" / "checkpoint-last.pth"
    results = {}
    recipe = [*fill(DETECT, iters=args.iters, data=labelled), *workers]
    for name, start in (("pre-trained", ["--finetune", str(encoder)]), ("random", [])):
        results[name] = train.main(train.get_args_parser().parse_args(
            [*recipe, *start, "--output_dir", str(out / name.replace("-", "_"))]))
    for name, stats in results.items():
        print(f"det-demo, {name} backbone: {train.report(stats)} on the {stats['images']} synthetic validation "
              f"images ({LABELLED} labelled training images)")
    gain = {t: results["pre-trained"][t]["AP"] - results["random"][t]["AP"] for t in ("bbox", "segm")}
    print(f"det-demo: pre-training adds {gain['bbox']:+.2f} box AP, {gain['segm']:+.2f} mask AP; outputs in {out}; "
          f"wall time {fmt_seconds(time.perf_counter() - t0)}")
    return results


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser("Detection/demo.py", "DeepMIM detection CPU demo: Mask R-CNN on a pre-trained and on a random ViT-Ti/4")
    p.add_argument("--output_dir", default="output_dir/det_demo", help="pretrain/, pre_trained/ and random/ go here")
    p.add_argument("--pretrain_epochs", default=40, type=positive_int, metavar="N", help="pre-training epochs")
    p.add_argument("--iters", default=300, type=positive_int, metavar="N", help="detection training iterations")
    p.add_argument("--num_workers", default=1, type=nonneg_int, metavar="N", help="data loading processes")
    p.add_argument("--threads", default=1, type=positive_int, metavar="N", help="torch CPU threads of the training process")
    return p


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
