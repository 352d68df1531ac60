"""The one loader builder (util/data/loader.py): every DataLoader the project builds installs the worker init
that lets a loader worker outlive the scheduler's SIGTERM, so a job with loader workers stops with its
checkpoint and resumes exactly, segmentation included (its loader once lacked it)."""
import multiprocessing
import os
import re
import shutil
import subprocess
import sys

from util.data.build import build_train_data, classification_data
from util.data.datasets import FolderData, IterationData, eval_transform, pretrain_transform
from util.data.loader import build_loader
from util.run.errors import Preempted
from util.run.preempt import worker_init

import pytest
import torch
from conftest import ROOT, assert_same_weights, run_finetune, weights

from Segmentation import data as seg_data
from Segmentation import train as seg_train

WORKERS = ["--num_workers", "2"]
FINETUNE = ["--model", "vit_tiny_patch4", "--input_size", "16", "--device", "cpu", "--batch_size", "8",
            "--epochs", "1", "--warmup_epochs", "1", "--lr", "1e-3", "--aa", "none", "--reprob", "0",
            "--log_every", "100", "--save_every", "1", "--stop_check_every", "1", *WORKERS]
SEGMENT = ["--model", "vit_tiny_patch4", "--out_indices", "1,2,3,4", "--device", "cpu", "--amp", "none",
           "--crop_size", "32", "--img_scale", "128", "32", "--channels", "16", "--aux_channels", "8",
           "--batch_size", "4", "--iters", "6", "--warmup_iters", "2", "--lr", "1e-3", "--layer_decay", "1.0",
           "--drop_path", "0.0", "--log_every", "4", "--eval_every", "100", "--save_every", "100",
           "--save_last_every", "100", "--stop_check_every", "1", "--mode", "whole", *WORKERS]


def sigterm_the_task_before_batch(monkeypatch, data_cls, index: int) -> None:
    """While the training data yields batch ``index`` of a run started at step 0, SIGTERM this process
    and every loader worker it has, from another process: what SLURM does to every process of a task
    it preempts. A worker must survive it (only its own training process may end it); the training
    process stops at the next step with its checkpoint."""
    original = data_cls.batches

    def batches(self, start_step):
        for i, batch in enumerate(original(self, start_step)):
            if start_step == 0 and i == index:
                workers = [p.pid for p in multiprocessing.active_children()]
                assert len(workers) >= 2, "the training loader's workers must be running"
                kill = "import os, signal, sys; [os.kill(int(p), signal.SIGTERM) for p in sys.argv[1:]]"
                subprocess.run([sys.executable, "-c", kill, str(os.getpid()), *map(str, workers)], check=True)
            yield batch

    monkeypatch.setattr(data_cls, "batches", batches)


@pytest.fixture(scope="module")
def tiny_folder(small_folder, tmp_path_factory):
    """3 training / 1 validation image per class of ``small_folder``: 3 steps of 8 images per epoch."""
    root = tmp_path_factory.mktemp("tiny")
    for split, n in (("train", 3), ("val", 1)):
        for cls_dir in sorted((small_folder / split).iterdir()):
            (root / split / cls_dir.name).mkdir(parents=True)
            for f in sorted(cls_dir.iterdir())[:n]:
                shutil.copy(f, root / split / cls_dir.name / f.name)
    return root


@pytest.fixture(scope="module")
def small_ade(tmp_path_factory):
    """The built-in synthetic ADE20K-layout data, 16 training / 2 validation images."""
    from Segmentation.make_synthetic import build

    return build(tmp_path_factory.mktemp("ade") / "synthetic", sizes={"training": 16, "validation": 2})


def stop_and_resume(run, data_cls, index: int, tmp_path):
    """An uninterrupted run, a run SIGTERM'd before batch ``index`` and its rerun: the folders of the two
    runs and the checkpoint the SIGTERM'd run wrote."""
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    run(full)
    with pytest.MonkeyPatch.context() as m:
        sigterm_the_task_before_batch(m, data_cls, index)
        with pytest.raises(Preempted, match="SIGTERM received: wrote .*checkpoint-last.pth at"):
            run(stopped)
    ckpt = torch.load(stopped / "checkpoint-last.pth", weights_only=True)
    run(stopped)  # the same command continues
    return full, stopped, ckpt


def test_finetuning_with_loader_workers_stops_on_sigterm_and_resumes_exactly(tiny_folder, tmp_path):
    def run(out):
        return run_finetune(*FINETUNE, "--data_path", tiny_folder, "--output_dir", out)

    full, stopped, ckpt = stop_and_resume(run, FolderData, 1, tmp_path)  # 3 steps in the epoch
    assert (ckpt["epoch"], ckpt["step_in_epoch"]) == (0, 2)
    assert_same_weights(weights(full / "checkpoint-last.pth"), weights(stopped / "checkpoint-last.pth"))


def test_segmentation_with_loader_workers_stops_on_sigterm_and_resumes_exactly(small_ade, tmp_path):
    def run(out):
        return seg_train.main(seg_train.get_args_parser().parse_args(
            [*SEGMENT, "--data_path", str(small_ade), "--output_dir", str(out)]))

    full, stopped, ckpt = stop_and_resume(run, IterationData, 2, tmp_path)
    assert ckpt["iteration"] == 3  # stopped after the step during whose loading the signal came
    assert_same_weights(weights(full / "checkpoint-last.pth"), weights(stopped / "checkpoint-last.pth"))


# --------------------------------------------------------------------------------------------
# every loader from the one builder


def has_worker_init(loader) -> bool:
    """``loader``'s workers run ``util.run.preempt.worker_init`` bound to this (the training) process."""
    fn = loader.worker_init_fn
    return getattr(fn, "func", None) is worker_init and fn.args == (os.getpid(),)


def test_every_training_and_evaluation_loader_installs_the_worker_init(tiny_folder, small_ade):
    train, val, _ = classification_data(str(tiny_folder), eval_transform(16), eval_transform(16), None, True, 8, 0, 1,
                                        0, 2, False, False)  # fine-tuning and linear probing
    pretrain = build_train_data(str(tiny_folder), pretrain_transform(16), 8, 0, 1, 0, 2, False)
    ade = seg_data.ADE20K(small_ade, seg_data.SPLITS["train"], 5)
    segment = IterationData(ade, 4, 0, 1, 0, 6, 2, False).loader(0)
    for loader in (train.loader, val, pretrain.loader, segment):
        assert has_worker_init(loader) and loader.num_workers == 2
    # the builder keeps each loader's choices: epoch loaders keep their workers, segmentation's reads once
    assert train.loader.persistent_workers and val.persistent_workers and not segment.persistent_workers
    assert has_worker_init(build_loader(list(range(4)), batch_sampler=[[0, 1], [2, 3]]))
    assert not build_loader(list(range(4)), persistent=True).persistent_workers  # no workers to keep


def test_no_dataloader_is_built_outside_the_builder():
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    assert "util/data/loader.py" in files
    built = [f"{f}:{n}" for f in files if not f.startswith("tests/") and f != "util/data/loader.py"
             for n, line in enumerate((ROOT / f).read_text().splitlines(), 1) if re.search(r"\bDataLoader\s*\(", line)]
    assert not built, f"build these with util.data.loader.build_loader (their workers must outlive a SIGTERM): {built}"
