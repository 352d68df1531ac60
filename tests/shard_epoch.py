"""One rank of a multi-process shard reading test (started by tests/test_shards.py with the torchrun
variables set: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).

    python tests/shard_epoch.py OUT.json SHARDS BATCH WORKERS RESUME_STEP

Each rank joins a gloo process group, reads one epoch plus three steps of ``ShardData`` from step
0, and the same from ``RESUME_STEP``; the ranks gather their sample ids and labels, rank 0 writes
them to ``OUT.json``.
"""
import json
import sys
from pathlib import Path

from util.data.datasets import pretrain_transform
from util.data.shards import ShardData, open_shards

import torch
import torch.distributed as dist


def take(data: ShardData, start: int, n: int):
    it = data.batches(start)
    try:
        out = []
        for _ in range(n):
            images, labels, ids = next(it)
            assert images.shape[1:] == (3, 16, 16)
            out.append({"ids": ids.tolist(), "labels": labels.tolist(), "sum": float(images.double().sum())})
        return out
    finally:
        it.close()


def main() -> None:
    out, spec, batch, workers, resume = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    data = ShardData(open_shards(spec, "train"), pretrain_transform(16), batch, rank, world, seed=0,
                     num_workers=workers, pin_mem=False, shuffle_buffer=16, return_ids=True)
    steps = data.steps_per_epoch
    mine = {"steps": steps, "full": take(data, 0, steps + 3), "resumed": take(data, resume, steps + 3 - resume)}
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
