"""The segmentation CPU demo (``make seg-demo``): UperNet on the first 4 blocks of a ViT-Ti/4, trained
from scratch on the built-in synthetic ADE20K-layout data, then evaluated with sliding windows.

The recipe is the reference pipeline scaled to the 32-48 pixel synthetic images: the (2048, 512)
resize scale becomes (128, 32), the 512 crop 32 and the 341 stride 21; the heads are narrower
(64 / 32 channels). Without pre-trained weights it uses a higher learning rate, no layer decay and a
short warm-up.
"""
import argparse
import time

from util.config.cli import Parser, nonneg_int, positive_int
from util.run.errors import run_cli
from util.run.logs import fmt_seconds

import torch

from Segmentation import train

RECIPE = ["--data_path", "synthetic", "--model", "vit_tiny_patch4", "--out_indices", "1,2,3,4", "--device", "cpu",
          "--amp", "none", "--crop_size", "32", "--img_scale", "128", "32", "--stride", "21", "--channels", "64",
          "--aux_channels", "32", "--batch_size", "8", "--iters", "400", "--warmup_iters", "40", "--lr", "1e-3",
          "--layer_decay", "1.0", "--drop_path", "0.0", "--eval_every", "200", "--save_every", "200",
          "--log_every", "25", "--no_auto_resume"]


def main(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    # the demo's tensors are tiny: a second thread gains little, and on a busy 2-core machine OpenMP
    # threads waiting for each other make training several times slower (docs/PERFORMANCE.md)
    torch.set_num_threads(args.threads)
    stats = train.main(train.get_args_parser().parse_args(
        [*RECIPE, "--num_workers", str(args.num_workers), "--output_dir", args.output_dir]))
    print(f"seg-demo: mIoU {stats['mIoU']:.2f}  mAcc {stats['mAcc']:.2f}  aAcc {stats['aAcc']:.2f} on the "
          f"{stats['images']} synthetic validation images; outputs in {args.output_dir}; wall time "
          f"{fmt_seconds(time.perf_counter() - t0)}")


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser("Segmentation/demo.py", "DeepMIM segmentation CPU demo: UperNet on a ViT-Ti/4, synthetic data")
    p.add_argument("--output_dir", default="output_dir/seg_demo", help="checkpoints, log.txt and config.json")
    p.add_argument("--num_workers", default=1, type=nonneg_int, metavar="N", help="data loading processes")
    p.add_argument("--threads", default=1, type=positive_int, metavar="N", help="torch CPU threads of the training process")
    return p


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
