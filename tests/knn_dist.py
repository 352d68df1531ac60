"""The k-NN monitor's features and accuracies, in one process or under DDP.

    torchrun --standalone --nproc_per_node 2 tests/knn_dist.py DATA OUT   # each rank: every other batch
    python tests/knn_dist.py DATA OUT                                     # one process: every batch

A tiny DeepMIM (seed 0) and the repo's own ``engine_monitor.KnnMonitor`` on the image folder DATA,
with a batch size that splits the subsets into batches the two ranks share unevenly. Rank 0 writes
``OUT/knn-w{world}.pt``: the gathered features of both subsets and the accuracies.
"""
import sys
from pathlib import Path

from util.config.typed import RunConfig
from util.run.runner import start_run

import torch

import models_deepmim
from engine_monitor import KnnMonitor, MonitorConfig

SETTINGS = dict(knn_every=1, knn_train_per_class=5, knn_val_per_class=3, knn_batch_size=7, knn_layers=(2, 4))


def main(data: str, out: Path) -> None:
    with start_run(RunConfig(device="cpu", output_dir=str(out / "run"))) as run:
        torch.manual_seed(0)
        model = models_deepmim.create_model("deepmim_vit_tiny_patch4", img_size=16, decoder_depth=1, depth=4,
                                            ds_layers=[2, 4])
        monitor = KnnMonitor(model, MonitorConfig(monitor_data_path=data, **SETTINGS), run.device, None, seed=0)
        result = {"features": {s: monitor.features(s) for s in ("train", "val")}, "accuracy": monitor.evaluate(),
                  "batches_here": {s: [b for b, _ in monitor._my_batches(s)] for s in ("train", "val")}}
        if run.is_main:
            torch.save(result, out / f"knn-w{run.info.world_size}.pt")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
