"""The CPU demo (``make demo``): DeepMIM pre-training on the built-in digits, then fine-tuning.

Both stages run at 16x16 pixels (the digits are 8x8 at heart, stored as 32x32 PNGs), which keeps
the whole demo within minutes on 2 CPU cores (docs/PERFORMANCE.md); the model is
``deepmim_vit_tiny_patch4`` (ViT-Ti, patch 4, depth 12, supervised layers 6/8/10/12) with the
normalized-pixel target. Pre-training logs the k-NN accuracy of layers 6, 8, 10 and 12 every two
epochs (``engine_monitor.py``) and draws the reconstructions into TensorBoard every four; the demo
ends with the k-NN table and the fine-tuned accuracy. The recipes below are the single source for
the demo and for the tests that check it.

Rerunning the same command after an interruption resumes both stages from their newest checkpoints
(an uninterrupted run computes the same numbers). The fine-tuned checkpoint is then evaluated once
more on the same validation digits read as tar shards (``digits-shards``): the shard reader gives
the same accuracy.

``--threads N`` pins torch's CPU threads, 1 by default, as ``make seg-demo`` does: the tensors are
tiny, and OpenMP threads waiting for each other on a loaded 2-core machine make the demo several
times slower (docs/PERFORMANCE.md). The thread count changes the last bits of the
numbers (float sums in another order: 1 against 2 threads, the first epoch's mean loss 5.376196980
against 5.376196742); one thread gives exactly the runs of the small study, which runs every job on
one thread.
"""
import argparse
import json
import time
from pathlib import Path
from typing import List

from util.config.cli import Parser, nonneg_int, positive_int
from util.run.errors import run_cli
from util.run.logs import fmt_seconds

import torch

import main_finetune
import main_pretrain

PRETRAIN = ["--data_path", "digits", "--model", "deepmim_vit_tiny_patch4", "--input_size", "16", "--device", "cpu",
            "--norm_pix_loss", "--epochs", "12", "--warmup_epochs", "1", "--batch_size", "64", "--blr", "1.5e-3",
            "--log_every", "11", "--save_every", "4", "--knn_every", "2", "--recon_every", "4"]
# fine-tuning for tiny data: no flips (digits are not mirror-symmetric), mild crops, no RandAugment /
# random erasing / label smoothing, a higher lr and milder layer decay than the ImageNet recipe
FINETUNE = ["--data_path", "digits", "--model", "vit_tiny_patch4", "--input_size", "16", "--device", "cpu",
            "--epochs", "10", "--batch_size", "32", "--lr", "2e-3", "--layer_decay", "0.85", "--warmup_epochs", "1",
            "--aa", "none", "--reprob", "0", "--drop_path", "0", "--smoothing", "0", "--crop_scale", "0.9", "1",
            "--hflip", "0", "--log_every", "45"]


def knn_table(log_txt: Path) -> List[str]:
    """The k-NN accuracy before training and at every logged epoch, one line each: ``cls / avg`` per layer."""
    records = [json.loads(x) for x in log_txt.read_text().splitlines() if x.strip()] if log_txt.exists() else []
    records = [r for r in records if "rollback" not in r]  # --on_nonfinite rollback's lines
    rows = [("init", {k[len("knn_init_"):]: v for k, v in r.items() if k.startswith("knn_init_")}) for r in records[:1]]
    rows += [(str(r["epoch"]), {k[len("knn_"):]: v for k, v in r.items() if k.startswith("knn_L")}) for r in records]
    rows = [(name, acc) for name, acc in rows if acc]
    if not rows:
        return []
    layers = list(dict.fromkeys(k.split("_")[0] for k in rows[0][1]))
    lines = ["epoch  " + "  ".join(f"{layer:>11}" for layer in layers)]
    for name, acc in rows:
        lines.append(f"{name:>5}  " + "  ".join(f"{acc[f'{x}_cls']:5.1f}/{acc[f'{x}_avg']:5.1f}" for x in layers))
    return lines


def main(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    workers = ["--num_workers", str(args.num_workers)]
    main_pretrain.main(main_pretrain.get_args_parser().parse_args(
        [*PRETRAIN, *workers, "--output_dir", str(out / "pretrain")]))
    table = knn_table(out / "pretrain" / "log.txt")
    stats = main_finetune.main(main_finetune.get_args_parser().parse_args(
        [*FINETUNE, *workers, "--finetune", str(out / "pretrain" / "checkpoint-last.pth"),
         "--output_dir", str(out / "finetune")]))
    shards = main_finetune.main(main_finetune.get_args_parser().parse_args(
        [*FINETUNE, *workers, "--eval", "--resume", str(out / "finetune" / "checkpoint-best.pth"),
         "--data_path", "digits-shards", "--output_dir", str(out / "eval_shards")]))
    if table:
        print("demo: k-NN top-1 (%) of the pre-trained encoder's layers, cls token / mean of the patch tokens "
              "(k=20, T=0.07; 200 training / 100 validation digits):")
        print("\n".join(f"  {line}" for line in table))
    print(f"demo: the best fine-tuned checkpoint on the same validation digits read as tar shards (digits-shards): "
          f"top-1 {shards['acc1']:.2f}% on {shards['count']} images")
    print(f"demo: fine-tuned val top-1 {stats['max_accuracy']:.2f}% (best epoch); outputs in {out}; "
          f"wall time {fmt_seconds(time.perf_counter() - t0)} ({torch.get_num_threads()} torch thread(s))")


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser("tools/demo.py", "DeepMIM CPU demo: pre-training on the built-in digits, then fine-tuning")
    p.add_argument("--output_dir", default="output_dir/demo",
                   help="one sub-folder per stage (pretrain/, finetune/); rerun the same command to resume")
    p.add_argument("--num_workers", default=1, type=nonneg_int, metavar="N", help="data loading processes per stage")
    p.add_argument("--threads", default=1, type=positive_int, metavar="N",
                   help="torch CPU threads of the training process: the tensors are tiny, and on a busy 2-core machine "
                        "two threads waiting for each other made the demo several times slower; one thread also gives "
                        "the numbers of the small study (tools/run_experiments.py runs every job on one thread)")
    return p


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
