"""The CPU demo (``make demo``): DeepMIM pre-training on the built-in digits, then fine-tuning.

Both stages run at 16x16 pixels (the digits are 8x8 at heart, stored as 32x32 PNGs), which keeps
the whole demo near two and a half minutes on 2 CPU cores; the model is ``deepmim_vit_tiny_patch4``
(ViT-Ti, patch 4, depth 12, supervised layers 6/8/10/12) with the normalized-pixel target.
The recipes below are the single source for the demo and for the test that checks it.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import main_finetune  # noqa: E402
import main_pretrain  # noqa: E402
from util.cli import Parser, nonneg_int  # noqa: E402
from util.misc import run_cli  # noqa: E402

PRETRAIN = ["--data_path", "digits", "--model", "deepmim_vit_tiny_patch4", "--input_size", "16", "--device", "cpu",
            "--norm_pix_loss", "--epochs", "12", "--warmup_epochs", "1", "--batch_size", "64", "--blr", "1.5e-3",
            "--log_every", "11", "--save_every", "4", "--no_auto_resume"]
# fine-tuning for tiny data: no flips (digits are not mirror-symmetric), mild crops, no RandAugment /
# random erasing / label smoothing, a higher lr and milder layer decay than the ImageNet recipe
FINETUNE = ["--data_path", "digits", "--model", "vit_tiny_patch4", "--input_size", "16", "--device", "cpu",
            "--epochs", "10", "--batch_size", "32", "--lr", "2e-3", "--layer_decay", "0.85", "--warmup_epochs", "1",
            "--aa", "none", "--reprob", "0", "--drop_path", "0", "--smoothing", "0", "--crop_scale", "0.9", "1",
            "--hflip", "0", "--log_every", "45", "--no_auto_resume"]


def main(args: argparse.Namespace) -> None:
    out = Path(args.output_dir)
    workers = ["--num_workers", str(args.num_workers)]
    main_pretrain.main(main_pretrain.get_args_parser().parse_args(
        [*PRETRAIN, *workers, "--output_dir", str(out / "pretrain")]))
    stats = main_finetune.main(main_finetune.get_args_parser().parse_args(
        [*FINETUNE, *workers, "--finetune", str(out / "pretrain" / "checkpoint-last.pth"),
         "--output_dir", str(out / "finetune")]))
    print(f"demo: fine-tuned val top-1 {stats['max_accuracy']:.2f}% (best epoch); outputs in {out}")


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser("tools/demo.py", "DeepMIM CPU demo: pre-training on the built-in digits, then fine-tuning")
    p.add_argument("--output_dir", default="output_dir/demo", help="one sub-folder per stage (pretrain/, finetune/)")
    p.add_argument("--num_workers", default=1, type=nonneg_int, metavar="N", help="data loading processes")
    return p


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
