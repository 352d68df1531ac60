"""Tar shards (util.shards), FolderData and the data entry points (util.data), on real files and real
processes: the writer keeps every image and label, an epoch over 2 gloo processes sees every sample
once, a resumed stream is the tail of the uninterrupted one, evaluation reads each image once."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from util.data.build import build_eval_data, build_train_data, data_classes
from util.data.datasets import FolderData, _load_image, eval_transform, image_folder, pretrain_transform, train_loader
from util.data.decode import EncodedImage, open_rgb
from util.data.shards import (
    ShardData,
    ShardEvalData,
    decode_sample,
    index_location,
    index_shards,
    is_shard_spec,
    open_shards,
    read_samples,
    shuffle_order,
    write_shards,
)
from util.run.errors import UserError

import numpy as np
import pytest
import torch
from conftest import ROOT, free_port
from torchvision.transforms import functional as F

from tools import make_shards


@pytest.fixture(scope="module")
def small_shards(small_folder, tmp_path_factory):
    """The small folder (80 train / 40 val images) as shards of 10: 8 train, 4 val."""
    out = tmp_path_factory.mktemp("shards")
    for split in ("train", "val"):
        write_shards(small_folder, out, split, shard_size=10)
    return out


def take(data, start: int, n: int):
    it = data.batches(start)
    try:
        return [next(it) for _ in range(n)]
    finally:
        it.close()


# --------------------------------------------------------------------------------------------
# format and writer


def test_digits_shards_hold_the_folders_images_and_labels(digits_root):
    """Every image of the digits folder is in the built-in shards once, byte-equal once decoded, with its label."""
    for split in ("train", "val"):
        folder = image_folder(digits_root / split, None, split)
        shards = open_shards("digits-shards", split)
        assert shards.num_samples == len(folder.samples)
        assert list(shards.classes) == folder.classes
        seen = set()
        for _, sample in read_samples(shards, np.arange(shards.num_samples)):
            idx = int(sample["__key__"])
            path, label = folder.samples[idx]
            img, got_label = decode_sample(sample, "test", None)
            assert got_label == label
            assert torch.equal(F.pil_to_tensor(img), F.pil_to_tensor(_load_image(path)))
            seen.add(idx)
        assert seen == set(range(len(folder.samples)))


def test_writer_is_deterministic_and_prints_the_spec(small_folder, small_shards, tmp_path, capsys):
    make_shards.main(make_shards.get_args_parser().parse_args(
        ["--data_path", str(small_folder), "--output", str(tmp_path), "--shard_size", "10", "--splits", "train"]))
    assert f"{tmp_path}/train-{{000000..000007}}.tar" in capsys.readouterr().out
    for name in [f"train-{k:06d}.tar" for k in range(8)] + ["train.json"]:
        assert (tmp_path / name).read_bytes() == (small_shards / name).read_bytes(), name
    index = json.loads((tmp_path / "train.json").read_text())
    assert index["num_samples"] == 80 and [s["count"] for s in index["shards"]] == [10] * 8
    # shuffled across shards: a shard of a class-sorted folder would hold one class
    first = open_shards(str(tmp_path / "train-000000.tar"))
    labels = {s["cls"] for _, s in read_samples(first, np.arange(10))}
    assert len(labels) > 3


def test_spec_forms_and_index_location(small_shards):
    spec = f"{small_shards}/train-{{000000..000007}}.tar"
    assert is_shard_spec(spec) and is_shard_spec(str(small_shards)) and is_shard_spec("digits-shards")
    assert is_shard_spec(f"pipe:cat {small_shards}/train-000001.tar") and is_shard_spec("a.tar::b.tar")
    assert not is_shard_spec("digits") and not is_shard_spec(str(small_shards.parent))
    assert index_location(spec) == f"{small_shards}/train.json"
    assert index_location("pipe:aws s3 cp s3://b/in-train-{0000..0099}.tar -") == "pipe:aws s3 cp s3://b/in-train.json -"
    folder, braces = open_shards(str(small_shards), "train"), open_shards(spec)
    assert folder.urls == braces.urls and folder.counts == braces.counts and folder.num_samples == 80
    part = open_shards(f"{small_shards}/train-{{000002..000003}}.tar")  # a subset of the indexed shards
    assert part.num_samples == 20 and list(part.starts) == [0, 10]
    assert data_classes(str(small_shards)) == [str(c) for c in range(10)]


def test_pipe_urls_read_the_same_batches(small_shards):
    local = f"{small_shards}/train-{{000000..000007}}.tar"
    piped = f"pipe:cat {local}"
    a = take(ShardData(open_shards(local), pretrain_transform(16), 4, 0, 1, 0, 0, False, return_ids=True), 3, 4)
    b = take(ShardData(open_shards(piped), pretrain_transform(16), 4, 0, 1, 0, 0, False, return_ids=True), 3, 4)
    for x, y in zip(a, b):
        assert all(torch.equal(u, v) for u, v in zip(x, y))


def test_index_shards_counts_foreign_shards(small_shards, tmp_path):
    for k in range(8):
        shutil.copy(small_shards / f"train-{k:06d}.tar", tmp_path)
    spec = f"{tmp_path}/train-{{000000..000007}}.tar"
    with pytest.raises(UserError, match="--index"):
        open_shards(spec)
    dest, index = index_shards(spec)
    assert dest == f"{tmp_path}/train.json" and index["num_samples"] == 80
    assert open_shards(spec).counts == open_shards(str(small_shards)).counts


def test_errors_say_what_to_do(small_shards, tmp_path):
    for k in range(2):
        shutil.copy(small_shards / f"train-{k:06d}.tar", tmp_path)
    index = json.loads((small_shards / "train.json").read_text())
    index["shards"] = index["shards"][:2]
    index["shards"][1]["count"] = 30  # says more than the shard holds: every epoch needs them all
    (tmp_path / "train.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="not in its index"):
        open_shards(f"{tmp_path}/train-{{000000..000002}}.tar")
    data = ShardData(open_shards(str(tmp_path)), pretrain_transform(16), 4, 0, 1, 0, 0, False, shuffle_buffer=1)
    with pytest.raises(UserError, match="fewer samples than its index"):
        take(data, 0, data.steps_per_epoch)
    with pytest.raises(UserError, match="fewer than one batch"):
        ShardData(open_shards(str(small_shards)), None, 64, 0, 2, 0, 0, False)
    with pytest.raises(UserError, match="does not exist"):
        open_shards(str(tmp_path / "nowhere"))


# --------------------------------------------------------------------------------------------
# training order and resume


def test_shuffle_order_is_a_seeded_bounded_permutation():
    ids = np.arange(1000)
    a = shuffle_order(ids, 50, np.random.default_rng(1))
    assert sorted(a.tolist()) == ids.tolist() and not np.array_equal(a, ids)
    assert np.array_equal(a, shuffle_order(ids, 50, np.random.default_rng(1)))
    # a buffer of 50 never emits an item more than 50 reads early
    assert all(a[t] < t + 50 for t in range(len(a)))
    assert np.array_equal(shuffle_order(ids, 1, np.random.default_rng(1)), ids)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_on_shards_is_the_tail_of_the_stream(small_shards, workers):
    """batches(k) equals batches(0) from step k on (ids, labels, images), mid-epoch and across the
    epoch boundary, with loader workers in real processes; every epoch sees every sample once."""
    data = ShardData(open_shards(str(small_shards)), pretrain_transform(16), 4, 0, 1, seed=3, num_workers=workers,
                     pin_mem=False, shuffle_buffer=16, return_ids=True)
    steps = data.steps_per_epoch
    assert steps == 20 and data.num_samples == 80
    full = take(data, 0, 2 * steps + 2)
    for epoch in range(2):
        ids = torch.cat([b[2] for b in full[epoch * steps:(epoch + 1) * steps]]).tolist()
        assert sorted(ids) == list(range(80))
    assert [b[2].tolist() for b in full[:steps]] != [b[2].tolist() for b in full[steps:2 * steps]]
    for start in (7, steps - 1, steps + 1):
        resumed = take(data, start, 3)
        for got, want in zip(resumed, full[start:start + 3]):
            assert got[2].tolist() == want[2].tolist()
            assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


def test_order_does_not_depend_on_workers_0_or_1(small_shards):
    def run(workers):
        return [b[2].tolist() for b in take(ShardData(open_shards(str(small_shards)), pretrain_transform(16), 4, 0, 1, 0,
                                                        workers, False, shuffle_buffer=16, return_ids=True), 0, 20)]
    assert run(0) == run(1)


@pytest.mark.slow  # siblings: test_resume_on_shards_is_the_tail_of_the_stream, test_eval_reads_each_image_once_across_ranks
def test_two_gloo_processes_see_every_sample_once(small_shards, tmp_path):
    """2 ranks x 2 loader workers: one epoch covers the 80 samples exactly once; resuming each rank at
    step 3 continues with exactly the uninterrupted batches."""
    port = str(free_port())
    out = tmp_path / "ids.json"
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "tests" / "shard_epoch.py"), str(out),
                                       str(small_shards), "4", "2", "3"], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(errs)
    ranks = json.loads(out.read_text())
    steps = ranks[0]["steps"]
    assert steps == 10 and ranks[1]["steps"] == 10
    epoch = [i for r in ranks for b in r["full"][:steps] for i in b["ids"]]
    assert sorted(epoch) == list(range(80))
    labels = {i: lab for r in ranks for b in r["full"] for i, lab in zip(b["ids"], b["labels"])}
    index_labels = {i: int(s["cls"]) for i, s in read_samples(open_shards(str(small_shards)), np.arange(80))}
    assert labels == {i: index_labels[i] for i in labels}
    for r in ranks:
        assert r["resumed"] == r["full"][3:]


# --------------------------------------------------------------------------------------------
# folders, evaluation, entry points


def test_folder_data_is_the_current_loop(small_folder):
    """FolderData.batches(k) equals the tail of batches(0) across an epoch boundary, and batches(0)
    equals what the current loop does (set_epoch(epoch, skip) then the loader)."""
    ds = image_folder(small_folder / "train", pretrain_transform(16), "training")
    data = FolderData(ds, 8, 0, 1, 5, 1, False)
    steps = data.steps_per_epoch
    assert steps == 10 and data.num_samples == 80
    full = take(data, 0, 2 * steps + 2)
    for start in (4, steps - 1, steps + 2):
        for got, want in zip(take(data, start, 3), full[start:start + 3]):
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    loader = train_loader(ds, 8, 0, 1, 5, 0, False)
    loop = []
    for epoch, skip in ((0, 6), (1, 0)):
        loader.sampler.set_epoch(epoch, skip=skip * 8)
        loop += [b for _, b in zip(range(2), loader)]
    for got, want in zip(loop, full[6:8] + full[steps:steps + 2]):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_eval_reads_each_image_once_across_ranks(small_shards):
    shards = open_shards(str(small_shards), "val")
    seen, total = [], 0
    for rank in range(3):
        ev = ShardEvalData(shards, eval_transform(16), 6, rank, 3, 2, False, return_ids=True)
        batches = list(ev)
        assert len(batches) == len(ev) and sum(len(b[2]) for b in batches) == ev.count
        seen += [i for b in batches for i in b[2].tolist()]
        total += ev.count
    assert sorted(seen) == list(range(40)) and total == 40


def test_entry_points_choose_folder_or_shards(small_folder, small_shards):
    tf = pretrain_transform(16)
    assert isinstance(build_train_data(str(small_folder), tf, 8, 0, 1, 0, 0, False), FolderData)
    shard_train = build_train_data(str(small_shards), tf, 8, 0, 1, 0, 0, False)
    assert isinstance(shard_train, ShardData) and shard_train.steps_per_epoch == 10
    images, labels = take(shard_train, 0, 1)[0]
    assert images.shape == (8, 3, 16, 16) and images.dtype == torch.float32 and labels.dtype == torch.long
    for path in (small_folder, small_shards):
        ev = build_eval_data(str(path), eval_transform(16), 7, 0, 1, 0, False)
        assert sum(len(b[1]) for b in ev) == 40
    with pytest.raises(UserError, match="CUDA"):
        build_train_data(str(small_shards), pretrain_transform(16, "nvjpeg"), 8, 0, 1, 0, 0, False)


def test_shards_keep_the_files_bytes(small_folder, small_shards):
    """A sample's image member is the image file, unchanged (no re-encoding); its key the folder index."""
    folder = image_folder(small_folder / "train", None, "train")
    for _, sample in read_samples(open_shards(str(small_shards)), np.arange(0, 80, 9)):
        path, label = folder.samples[int(sample["__key__"])]
        assert Path(path).read_bytes() == sample["png"] and int(sample["cls"]) == label
        assert open_rgb(EncodedImage(sample["png"], "x")).size == (32, 32)
