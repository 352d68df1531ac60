"""The one trainer (util/run/trainer.py): every job runs through it, stops on a signal and resumes as if
never stopped, puts back the signal handlers, and commits an epoch so that a kill -9 at any moment
loses no log line or checkpoint and duplicates none."""
import os
import shutil
import signal
import subprocess
import sys

from util.data.datasets import FolderData, IterationData
from util.run.errors import Preempted, UserError

import pytest
import torch
from conftest import NO_MONITORS, ROOT, TINY_DET, assert_same_weights, read_log, run_finetune, weights

import main_finetune
import main_linprobe
import main_pretrain
from Detection import train as det_train
from Segmentation import train as seg_train

TINY_PRETRAIN = ["--model", "deepmim_vit_tiny_patch4", "--decoder_depth", "1", "--input_size", "16", "--device", "cpu",
                 "--batch_size", "16", "--num_workers", "0", "--epochs", "2", "--warmup_epochs", "1", "--blr", "1e-3",
                 "--log_every", "2", "--save_every", "1", "--stop_check_every", "1", *NO_MONITORS]
TINY_FINETUNE = ["--model", "vit_tiny_patch4", "--input_size", "16", "--device", "cpu", "--batch_size", "16",
                 "--num_workers", "0", "--epochs", "2", "--warmup_epochs", "1", "--lr", "1e-3", "--aa", "none",
                 "--reprob", "0", "--log_every", "2", "--save_every", "1", "--stop_check_every", "1"]
TINY_PROBE = ["--model", "vit_tiny_patch4", "--input_size", "16", "--device", "cpu", "--batch_size", "16",
              "--num_workers", "0", "--epochs", "2", "--warmup_epochs", "1", "--log_every", "2", "--save_every", "1",
              "--stop_check_every", "1", "--probe_layer", "6"]
TINY_SEG = ["--model", "vit_tiny_patch4", "--out_indices", "1,2,3,4", "--device", "cpu", "--amp", "none",
            "--crop_size", "32", "--img_scale", "128", "32", "--stride", "21", "--channels", "16", "--aux_channels", "8",
            "--batch_size", "4", "--num_workers", "0", "--iters", "12", "--warmup_iters", "2", "--lr", "1e-3",
            "--layer_decay", "1.0", "--drop_path", "0.0", "--log_every", "3", "--eval_every", "12", "--save_every", "100",
            "--save_last_every", "100", "--stop_check_every", "1", "--data_path", "synthetic"]




def signal_before_batch(monkeypatch, data_cls, index: int):
    """SIGTERM to this process while the training data yields batch ``index`` of a run started at step 0."""
    original = data_cls.batches

    def batches(self, start_step):
        for i, batch in enumerate(original(self, start_step)):
            if start_step == 0 and i == index:
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    monkeypatch.setattr(data_cls, "batches", batches)


JOBS = {
    # name: (main, flags, data class, batch before which SIGTERM arrives, what the rerun logs)
    "pretrain": (main_pretrain, TINY_PRETRAIN, FolderData, 7),  # 5 steps per epoch: epoch 1, iteration 3
    "finetune": (main_finetune, TINY_FINETUNE, FolderData, 6),
    "linprobe": (main_linprobe, TINY_PROBE, FolderData, 8),
    "segment": (seg_train, TINY_SEG, IterationData, 4),
    "detect": (det_train, list(TINY_DET), IterationData, 4),
}


@pytest.mark.parametrize("job", [  # finetune and segment in test-all; siblings: tests/test_loaders.py's SIGTERM
    *(pytest.param(j, marks=pytest.mark.slow) if j in ("finetune", "segment") else j for j in JOBS)])  # of both
def test_every_job_stops_on_sigterm_mid_run_and_resumes_as_if_never_stopped(job, small_folder, tiny_checkpoint,
                                                                             small_coco, tmp_path, monkeypatch):
    module, flags, data_cls, index = JOBS[job]
    extra = {"pretrain": ["--data_path", small_folder], "finetune": ["--data_path", small_folder],
             "linprobe": ["--data_path", small_folder, "--finetune", tiny_checkpoint], "segment": [],
             "detect": ["--data_path", small_coco]}[job]

    def run(out):
        return module.main(module.get_args_parser().parse_args([*map(str, flags + extra), "--output_dir", str(out)]))

    full, stopped = tmp_path / "full", tmp_path / "stopped"
    run(full)
    with monkeypatch.context() as m:
        signal_before_batch(m, data_cls, index)
        with pytest.raises(Preempted, match="SIGTERM received: wrote .*checkpoint-last.pth at"):
            run(stopped)
    ckpt = torch.load(stopped / "checkpoint-last.pth", weights_only=True)
    if job in ("segment", "detect"):
        assert ckpt["iteration"] == index + 1  # stopped after the step during whose loading the signal came
    else:
        assert (ckpt["epoch"], ckpt["step_in_epoch"]) == divmod(index + 1, 5)
    run(stopped)  # the same command continues

    assert_same_weights(weights(full / "checkpoint-last.pth"), weights(stopped / "checkpoint-last.pth"))
    a, b = read_log(full), read_log(stopped)
    assert [r.get("epoch", r.get("iteration")) for r in a] == [r.get("epoch", r.get("iteration")) for r in b]
    for ra, rb in zip(a, b):  # the resumed epoch's (or log window's) loss is the mean over all of it
        for key in ra:
            if key != "time" and isinstance(ra[key], float):
                assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-7), (key, ra, rb)
            elif isinstance(ra[key], dict):  # detection's COCO metrics (None where COCOeval has no ground truth)
                assert rb[key] == ra[key], (key, ra, rb)


def test_main_puts_back_the_signal_handlers_however_it_ends(small_folder, tmp_path):
    def mine(signum, frame):  # pragma: no cover - never delivered
        pass

    before = {s: signal.signal(s, mine) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        main_pretrain.main(main_pretrain.get_args_parser().parse_args(
            [*TINY_PRETRAIN, "--epochs", "1", "--data_path", str(small_folder), "--output_dir", str(tmp_path / "a")]))
        assert signal.getsignal(signal.SIGTERM) is mine and signal.getsignal(signal.SIGUSR1) is mine
        with pytest.raises(UserError, match="fewer than one batch"):
            main_finetune.main(main_finetune.get_args_parser().parse_args(
                [*TINY_FINETUNE, "--batch_size", "1000", "--data_path", str(small_folder), "--output_dir",
                 str(tmp_path / "b")]))
        assert signal.getsignal(signal.SIGTERM) is mine and signal.getsignal(signal.SIGUSR1) is mine
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


# --------------------------------------------------------------------------------------------
# crash consistency of the commit: kill -9 right after each file it writes


@pytest.fixture(scope="module")
def finetune_reference(small_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    # one thread, as the killed process (conftest): a float sum's rounding follows the thread count
    run_finetune(*TINY_FINETUNE, "--epochs", "3", "--data_path", small_folder, "--output_dir", out)
    return out


@pytest.mark.slow  # the series of kill points; fast sibling: test_linear_eval's kill -9 mid-run, resumed to the same table
@pytest.mark.parametrize("kill_after", ["checkpoint-last.pth:2", "checkpoint-1.pth:1", "checkpoint-best.pth:1", "log.txt:2"])
def test_a_kill_during_the_epoch_commit_loses_and_duplicates_nothing(kill_after, finetune_reference, small_folder,
                                                                      tmp_path):
    argv = [*TINY_FINETUNE, "--epochs", "3", "--data_path", str(small_folder), "--output_dir", str(tmp_path)]
    env = {**os.environ, "DEEPMIM_KILL_AFTER": kill_after, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "main_finetune.py"), *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    main_finetune.main(main_finetune.get_args_parser().parse_args(argv))  # the rerun

    ref, got = read_log(finetune_reference), read_log(tmp_path)
    assert [r["epoch"] for r in got] == [0, 1, 2]  # every epoch exactly once
    for ra, rb in zip(ref, got):  # the same records; floats to rounding (weights too: allclose below)
        assert ra.keys() == rb.keys()
        for key in ra:
            if isinstance(ra[key], float):
                assert rb[key] == pytest.approx(ra[key], rel=1e-6, abs=1e-7), (key, ra, rb)
            else:
                assert rb[key] == ra[key], (key, ra, rb)
    expected = {p.name for p in finetune_reference.glob("checkpoint-*.pth")}
    assert {p.name for p in tmp_path.glob("checkpoint-*.pth")} == expected
    for name in expected:
        a, b = (torch.load(d / name, weights_only=True) for d in (finetune_reference, tmp_path))
        assert (a["epoch"], a["max_accuracy"]) == (b["epoch"], b["max_accuracy"]), name
        assert_same_weights(a["model"], b["model"])


@pytest.mark.slow  # siblings: the kill -9 after checkpoint-last.pth above, test_distributed's partial log line
def test_a_kill_after_a_segmentation_log_line_does_not_repeat_it(tmp_path):
    out = tmp_path / "seg"
    argv = [*TINY_SEG, "--output_dir", str(out)]
    env = {**os.environ, "DEEPMIM_KILL_AFTER": "log.txt:2", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "Segmentation" / "train.py"), *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [r["iteration"] for r in read_log(out)] == [3, 6]  # killed with no checkpoint written yet
    seg_train.main(seg_train.get_args_parser().parse_args(argv))
    log = read_log(out)
    assert [(r["mode"], r["iteration"]) for r in log] == [("train", 3), ("train", 6), ("train", 9), ("train", 12),
                                                          ("val", 12)]
    shutil.rmtree(out)
