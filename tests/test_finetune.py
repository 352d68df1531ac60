"""Fine-tuning, evaluation and linear probing, end to end on the built-in digits."""
import json
import os

import pytest
import torch
from conftest import run_finetune

import main_linprobe
import main_pretrain
import models_vit
from tools.demo import FINETUNE as DEMO_FINETUNE
from tools.demo import PRETRAIN as DEMO_PRETRAIN

finetune = run_finetune


@pytest.fixture(scope="session")
def finetuned(tmp_path_factory):
    """The demo's pre-training then fine-tuning (minutes), run once per ``make test``: under
    pytest-xdist the first worker that needs it runs it in the workers' shared temporary folder and
    the other waits for it (a file lock), instead of both running it."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by the workers of this session
    done = root / "demo_finetune" / "stats.json"
    with FileLock(str(root / "demo.lock")):
        if not done.exists():
            pre, out = root / "demo_pretrain", root / "demo_finetune"
            main_pretrain.main(main_pretrain.get_args_parser().parse_args(
                [*DEMO_PRETRAIN, "--num_workers", "0", "--output_dir", str(pre)]))
            stats = finetune(*DEMO_FINETUNE, "--num_workers", 0, "--finetune", pre / "checkpoint-last.pth",
                             "--output_dir", out)
            done.write_text(json.dumps(stats))
    return done.parent, json.loads(done.read_text())


@pytest.mark.demo
@pytest.mark.slow  # fast sibling: the fine-tuning, --eval and resume tests below, on 80 images
def test_finetuning_the_demo_checkpoint_reaches_90_percent(finetuned):
    """The demo's pre-training and fine-tuning recipes (tools/demo.py), end to end: at least 90 %."""
    out, stats = finetuned
    assert stats["max_accuracy"] >= 90.0, stats
    log = [json.loads(x) for x in (out / "log.txt").read_text().splitlines()]
    assert len(log) == 10 and log[-1]["max_accuracy"] == stats["max_accuracy"]
    assert log[-1]["train_loss"] < log[0]["train_loss"]
    assert (out / "checkpoint-best.pth").exists()
    ckpt = torch.load(out / "checkpoint-best.pth", weights_only=True)
    assert ckpt["max_accuracy"] == stats["max_accuracy"]


@pytest.mark.demo
@pytest.mark.slow  # fast sibling: the fine-tuning, --eval and resume tests below, on 80 images
def test_eval_reproduces_the_logged_accuracy(finetuned, tmp_path):
    out, stats = finetuned
    log = [json.loads(x) for x in (out / "log.txt").read_text().splitlines()]
    best = max(log, key=lambda e: e["test_acc1"])
    result = finetune(*DEMO_FINETUNE, "--num_workers", 0, "--eval", "--resume", out / "checkpoint-best.pth",
                      "--output_dir", tmp_path)
    assert result["acc1"] == pytest.approx(best["test_acc1"], abs=1e-9)
    assert result["count"] == 359


def test_finetune_resume_continues_and_keeps_the_best_accuracy(tiny_checkpoint, small_folder, tmp_path):
    common = ["--data_path", small_folder, "--model", "vit_tiny_patch4", "--input_size", "16", "--device", "cpu",
              "--batch_size", "16", "--num_workers", "0", "--finetune", tiny_checkpoint, "--warmup_epochs", "1",
              "--log_every", "100", "--aa", "rand-m9-mstd0.5-inc1", "--mixup", "0.8", "--cutmix", "1.0", "--epochs", "2"]
    full = tmp_path / "full"
    finetune(*common, "--output_dir", full)
    part = tmp_path / "part"
    part.mkdir()
    (part / "checkpoint-0.pth").write_bytes((full / "checkpoint-0.pth").read_bytes())
    finetune(*common, "--output_dir", part)  # resumes from epoch 0 by itself
    a = torch.load(full / "checkpoint-1.pth", weights_only=True)
    b = torch.load(part / "checkpoint-1.pth", weights_only=True)
    assert all(torch.allclose(a["model"][k], b["model"][k], atol=1e-6, rtol=0) for k in a["model"])
    assert a["max_accuracy"] == b["max_accuracy"]


@pytest.mark.slow  # siblings: test_trainer's SIGTERM of a layer-6 probe, tools/linear_eval's per-layer heads
def test_linear_probe_of_layers_1_and_12(tiny_checkpoint, tmp_path):
    results = {}
    for layer in (1, 12):
        args = main_linprobe.get_args_parser().parse_args(
            ["--data_path", "digits", "--model", "vit_tiny_patch4", "--input_size", "16", "--device", "cpu", "--finetune",
             str(tiny_checkpoint), "--probe_layer", str(layer), "--epochs", "3", "--warmup_epochs", "0.5",
             "--batch_size", "64", "--lr", "10", "--num_workers", "0", "--output_dir", str(tmp_path / str(layer)),
             "--crop_scale", "0.8", "1", "--hflip", "0", "--log_every", "100"])
        results[layer] = main_linprobe.main(args)
    assert results[1]["acc1"] > 30 and results[12]["acc1"] > 30  # both learn (chance is 10 %)
    assert results[1]["acc1"] != results[12]["acc1"]
    ckpt = torch.load(tmp_path / "1" / "checkpoint-last.pth", weights_only=True)
    assert ckpt["args"]["probe_layer"] == 1
    encoder_keys = [k for k in ckpt["model"] if k.startswith("encoder.")]
    assert encoder_keys and "head.1.weight" in ckpt["model"] and "head.0.running_mean" in ckpt["model"]


def test_linear_probe_needs_weights_and_a_valid_layer(tiny_checkpoint, tmp_path):
    from util.run.errors import UserError

    base = ["--data_path", "digits", "--model", "vit_tiny_patch4", "--device", "cpu", "--output_dir", str(tmp_path)]
    with pytest.raises(UserError, match="needs pre-trained weights"):
        main_linprobe.main(main_linprobe.get_args_parser().parse_args(base))
    with pytest.raises(UserError, match="--probe_layer 13 is outside 1..12"):
        main_linprobe.main(main_linprobe.get_args_parser().parse_args(
            [*base, "--input_size", "16", "--finetune", str(tiny_checkpoint), "--probe_layer", "13"]))


def test_layer_decay_groups_scales_and_weight_decay():
    from util.run.optim import layer_decay_groups

    model = models_vit.create_model("vit_tiny_patch4", num_classes=10, depth=4)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, depth = 0.5, 4
    for group in layer_decay_groups(model, 0.05, decay):
        for p in group["params"]:
            n = names[id(p)]
            layer = 0 if n.startswith(("cls_token", "pos_embed", "patch_embed")) else (
                int(n.split(".")[1]) + 1 if n.startswith("blocks.") else depth + 1)
            assert group["lr_scale"] == pytest.approx(decay ** (depth + 1 - layer)), n
            no_decay = p.ndim == 1 or n in ("cls_token", "pos_embed")
            assert group["weight_decay"] == (0.0 if no_decay else 0.05), n


def test_unknown_model_and_class_count_messages(tmp_path, small_folder):
    from util.run.errors import UserError

    with pytest.raises(UserError, match="Unknown fine-tuning model 'vit_gigantic'. Valid names: .*vit_tiny_patch4"):
        finetune("--model", "vit_gigantic", "--data_path", small_folder, "--output_dir", tmp_path, "--device", "cpu")
    with pytest.raises(UserError, match="--nb_classes 5 but .* has 10 class folders"):
        finetune("--model", "vit_tiny_patch4", "--nb_classes", 5, "--data_path", small_folder, "--output_dir", tmp_path,
                 "--device", "cpu")
