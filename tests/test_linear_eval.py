"""All-layer linear evaluation in one run (tools/linear_eval.py): every head equals the same head
trained alone, an interrupted run (kill -9 of a real process, SIGTERM mid-epoch) resumes and writes
the same table, 2 processes equal 1, and the table picks the best learning rate."""
import json
import os
import shutil
import signal
import subprocess
import sys

from util.data.datasets import FolderData
from util.run.errors import Preempted, UserError

import pytest
import torch
from conftest import ROOT, clean_env

import models_deepmim
from evaluation import heads
from tools import linear_eval

TINY = dict(img_size=16, patch_size=4, embed_dim=48, depth=4, num_heads=3, decoder_embed_dim=32, decoder_depth=1,
            decoder_num_heads=2, ds_layers=(2, 4))
# 80 training images / 16 = 5 steps per epoch; 40 validation images
COMMON = ["--device", "cpu", "--num_workers", "0", "--batch_size", "16", "--epochs", "2", "--log_every", "100",
          "--crop_scale", "0.5", "1", "--hflip", "0", "--stop_check_every", "1", "--blrs", "0.1", "1"]


@pytest.fixture(scope="module")
def encoder_ckpt(tmp_path_factory):
    """A random pre-training checkpoint of a 4-block DeepMIM (what the heads read)."""
    path = tmp_path_factory.mktemp("encoder") / "pretrain.pth"
    torch.manual_seed(0)
    model = models_deepmim.DeepMIM(models_deepmim.DeepMIMConfig(**TINY))
    torch.save({"model": model.state_dict(), "epoch": 0, "model_cfg": model.cfg.to_dict(), "args": {}}, path)
    return path


def argv(ckpt, data, out, *extra):
    return [*COMMON, "--finetune", str(ckpt), "--data_path", str(data), "--output_dir", str(out), *map(str, extra)]


def run(ckpt, data, out, *extra):
    return linear_eval.main(linear_eval.get_args_parser().parse_args(argv(ckpt, data, out, *extra)))


def heads_of(out):
    return torch.load(out / "checkpoint-last.pth", weights_only=True)["model"]


def files_of(out):
    return json.loads((out / "linear_eval.json").read_text()), (out / "linear_eval.md").read_text(), \
        (out / "log.txt").read_text()


@pytest.fixture(scope="module", params=[False, True], ids=["images", "cached"])
def reference(request, encoder_ckpt, small_folder, tmp_path_factory):
    """One uninterrupted all-layer run: 4 layers x 2 poolings x 2 learning rates = 16 heads."""
    cached = request.param
    out = tmp_path_factory.mktemp("cached" if cached else "images")
    extra = ["--cache_features"] if cached else []
    return cached, extra, out, run(encoder_ckpt, small_folder, out, *extra)


def test_every_head_equals_the_same_head_trained_alone(reference, encoder_ckpt, small_folder, tmp_path):
    cached, extra, out, full = reference
    assert len(full["heads"]) == 16 and full["complete"] and full["epochs_done"] == 2
    assert [(r["layer"], r["pool"]) for r in full["table"]] == [(k, p) for k in (1, 2, 3, 4) for p in ("token", "avg")]
    top1 = [h["top1"] for h in full["heads"].values()]
    assert max(top1) > 20.0 and len(set(top1)) > 4  # the heads learn (chance: 10 %), and differ
    full_heads = heads_of(out)
    for layer, pool, blr, name in ((1, "avg", "0.1", "L1_avg_blr0p1"), (4, "token", "1", "L4_token_blr1")):
        alone = run(encoder_ckpt, small_folder, tmp_path / name, *extra, "--layers", layer, "--pool", pool, "--blrs", blr)
        assert list(alone["heads"]) == [name]
        assert alone["heads"][name]["top1"] == full["heads"][name]["top1"]
        assert alone["history"][0]["top1"][name] == full["history"][0]["top1"][name]
        own = heads_of(tmp_path / name)
        assert own.keys() == {k for k in full_heads if k.startswith(f"heads.{name}.")}
        for key, value in own.items():  # bit for bit: nothing couples the heads
            assert torch.equal(value, full_heads[key]), key


def test_mae_recipe_heads_with_batchnorm_and_lars_equal_their_runs_alone(encoder_ckpt, small_folder, tmp_path):
    full = run(encoder_ckpt, small_folder, tmp_path / "all", "--recipe", "mae", "--warmup_epochs", "1", "--cache_features",
               "--layers", "2,4")
    name = "L2_avg_blr1"
    alone = run(encoder_ckpt, small_folder, tmp_path / "alone", "--recipe", "mae", "--warmup_epochs", "1",
                "--cache_features", "--layers", "2", "--pool", "avg", "--blrs", "1")
    assert alone["heads"][name]["top1"] == full["heads"][name]["top1"]
    own, every = heads_of(tmp_path / "alone"), heads_of(tmp_path / "all")
    assert f"heads.{name}.0.running_mean" in own  # MAE's head: BatchNorm without affine, then the linear layer
    for key, value in own.items():
        assert torch.equal(value, every[key]), key


@pytest.mark.parametrize("reference", [False], indirect=True, ids=["images"])  # the cached path: SIGTERM below
def test_a_kill_9_mid_run_resumes_and_writes_the_same_table(reference, encoder_ckpt, small_folder, tmp_path):
    cached, extra, out, _ = reference
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "DEEPMIM_KILL_AFTER": "checkpoint-last.pth:1"}
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "linear_eval.py"),
                           *argv(encoder_ckpt, small_folder, killed, *extra)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert "linear eval:" in proc.stderr and "step" in proc.stderr  # the progress bar, off a terminal
    partial = json.loads((killed / "linear_eval.json").read_text())  # written as it went
    assert (partial["complete"], partial["epochs_done"]) == (False, 1)
    assert "partial: after 1 of 2 epochs" in (killed / "linear_eval.md").read_text()
    run(encoder_ckpt, small_folder, killed, *extra)  # the same command continues
    assert files_of(killed) == files_of(out)
    for key, value in heads_of(out).items():
        assert torch.equal(value, heads_of(killed)[key]), key


def test_sigterm_mid_epoch_then_the_same_command_gives_the_same_table(reference, encoder_ckpt, small_folder, tmp_path,
                                                                      monkeypatch):
    cached, extra, out, _ = reference
    data_cls = linear_eval.CachedFeatures if cached else FolderData
    original = data_cls.batches

    def batches(self, start_step=0):
        for i, batch in enumerate(original(self, start_step)):
            if start_step == 0 and i == 7:  # epoch 1, its third batch
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    stopped = tmp_path / "stopped"
    with monkeypatch.context() as m:
        m.setattr(data_cls, "batches", batches)
        with pytest.raises(Preempted, match="SIGTERM received"):
            run(encoder_ckpt, small_folder, stopped, *extra)
    ckpt = torch.load(stopped / "checkpoint-last.pth", weights_only=True)
    assert (ckpt["epoch"], ckpt["step_in_epoch"]) == (1, 3)
    assert len(ckpt["linear_eval"]["history"]) == 1  # the results so far travel with the heads
    run(encoder_ckpt, small_folder, stopped, *extra)
    assert files_of(stopped) == files_of(out)
    # a rerun of the finished run trains nothing and writes the same files
    before = (stopped / "checkpoint-last.pth").stat().st_mtime_ns
    run(encoder_ckpt, small_folder, stopped, *extra)
    assert files_of(stopped) == files_of(out) and (stopped / "checkpoint-last.pth").stat().st_mtime_ns == before


@pytest.mark.slow  # three processes; sibling: test_distributed's 2-process --dist_eval (the same gather)
def test_two_processes_equal_one(encoder_ckpt, small_folder, tmp_path):
    """2 gloo processes of 8 images each (features cached by shards, then gathered) = 1 process of 16."""
    single, double = tmp_path / "single", tmp_path / "double"
    run(encoder_ckpt, small_folder, single, "--cache_features")
    env = clean_env(tmp_path)
    args = argv(encoder_ckpt, small_folder, double, "--cache_features")
    args[args.index("--batch_size") + 1] = "8"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "tools" / "linear_eval.py"), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (json.loads((d / "linear_eval.json").read_text()) for d in (single, double))
    assert a["total_batch"] == b["total_batch"] == 16 and b["val_images"] == 40
    for name, head in a["heads"].items():  # the same samples per step; only the sum's rounding differs
        assert abs(head["top1"] - b["heads"][name]["top1"]) <= 100 / 40 + 1e-9, name
    for key, value in heads_of(single).items():
        assert torch.allclose(value, heads_of(double)[key], atol=1e-5), key


def test_the_table_takes_the_best_learning_rate_that_did_not_diverge():
    specs = heads.head_specs([(6, "token"), (6, "avg")], [1e-3, 1e-2, 1e-1], total_batch=512)
    assert [s.lr for s in specs[:3]] == [2e-3, 2e-2, 2e-1]  # blr x 512 / 256
    names = [s.name for s in specs]
    assert names[:3] == ["L6_token_blr0p001", "L6_token_blr0p01", "L6_token_blr0p1"]
    top1 = dict(zip(names, [50.0, 70.0, 70.0, 40.0, 60.0, 90.0]))
    rows = linear_eval.results_table(specs, top1, diverged=["L6_avg_blr0p1"])
    assert (rows[0]["best_blr"], rows[0]["top1"]) == (1e-2, 70.0)  # a tie: the smaller lr
    assert (rows[1]["best_blr"], rows[1]["best_lr"], rows[1]["top1"]) == (1e-2, 2e-2, 60.0)  # 90 % diverged: not it
    assert rows[1]["top1_by_blr"] == {"0.001": 40.0, "0.01": 60.0, "0.1": 90.0} and rows[1]["diverged_blrs"] == ["0.1"]
    doc = {"table": rows, "blrs": [1e-3, 1e-2, 1e-1], "epochs_done": 3, "epochs": 3, "complete": True, "checkpoint": "c",
           "model": "m", "input_size": 224, "recipe_text": "r", "total_batch": 512, "cache_features": False,
           "val_images": 10}
    md = linear_eval.markdown(doc)
    assert "| 6 | 70.00 | 0.01 | 60.00 | 0.01 |" in md
    assert "| 6 | avg | 40.00 | 60.00 | 90.00* |" in md


def test_user_errors(reference, encoder_ckpt, small_folder, tmp_path):
    _, extra, out, _ = reference
    # the flags are checked before the output folder is claimed: a refused run leaves nothing behind
    with pytest.raises(UserError, match="--layers 5: outside 1..4 for this 4-block encoder"):
        run(encoder_ckpt, small_folder, tmp_path / "a", "--layers", "2,5")
    with pytest.raises(UserError, match="needs an encoder: pass --finetune"):
        linear_eval.main(linear_eval.get_args_parser().parse_args(["--device", "cpu", "--output_dir", str(tmp_path / "b")]))
    with pytest.raises(UserError, match="does not exist"):
        run(encoder_ckpt, tmp_path / "no_data", tmp_path / "c")
    assert not any((tmp_path / d).exists() for d in "abc")
    # the pooling in either spelling: cls is the ViT's token
    assert linear_eval.get_args_parser().parse_args(["--pool", "cls", "avg"]).pool == ["token", "avg"]
    other = tmp_path / "other"
    shutil.copytree(out, other)
    with pytest.raises(UserError, match="holds a linear evaluation of 16 other heads .* this run trains 8 heads"):
        run(encoder_ckpt, small_folder, other, *extra, "--blrs", "0.5")
