"""log.txt's train_lr is the lr the optimizer held at each step (read back from its param groups),
averaged over the epoch as MAE's meter does: an lr applied wrongly shows in the log."""
import json
import math

from util.data.build import FolderData
from util.run import trainer as trainer_mod
from util.run.errors import Preempted

import pytest
from test_trainer import signal_before_batch

import main_pretrain

FLAGS = ["--model", "deepmim_vit_tiny_patch4", "--decoder_depth", "1", "--ds_layers", "12",
         "--batch_size", "16", "--num_workers", "0", "--device", "cpu", "--log_every", "5", "--epochs", "2",
         "--warmup_epochs", "1", "--blr", "1e-3", "--input_size", "16", "--stop_check_every", "1",
         "--knn_every", "0", "--recon_every", "0"]


def pretrain(data, out):
    return main_pretrain.main(main_pretrain.get_args_parser().parse_args(
        [*FLAGS, "--data_path", str(data), "--output_dir", str(out)]))


def train_lrs(out):
    return [json.loads(line)["train_lr"] for line in (out / "log.txt").read_text().splitlines()]


def mae_epoch_means(lr, warmup, epochs, steps):
    """MAE's ``adjust_learning_rate`` at ``epoch + it / steps``, averaged per epoch."""
    def at(e):
        if e < warmup:
            return lr * e / warmup
        return lr * 0.5 * (1.0 + math.cos(math.pi * (e - warmup) / (epochs - warmup)))
    return [sum(at(ep + it / steps) for it in range(steps)) / steps for ep in range(epochs)]


def test_train_lr_is_what_the_optimizer_applied(small_folder, tmp_path, monkeypatch, one_torch_thread):
    pretrain(small_folder, tmp_path / "right")  # 80 images, batch 16: 5 steps per epoch
    right = train_lrs(tmp_path / "right")
    assert right == pytest.approx(mae_epoch_means(1e-3 * 16 / 256, 1, 2, 5), rel=1e-12)

    real_set_lr = trainer_mod.set_lr

    def half_applied(optimizer, lr):  # a bug in applying the lr: the schedule says lr, the groups get half
        real_set_lr(optimizer, lr)
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] / 2
        return lr

    monkeypatch.setattr(trainer_mod, "set_lr", half_applied)
    pretrain(small_folder, tmp_path / "wrong")
    assert train_lrs(tmp_path / "wrong") == pytest.approx([v / 2 for v in right], rel=1e-12)


@pytest.mark.slow  # sibling: test_train_lr_is_what_the_optimizer_applied (the same sum, uninterrupted)
def test_a_resumed_epoch_logs_the_lr_of_all_its_steps(small_folder, tmp_path, monkeypatch, one_torch_thread):
    """Stopped mid-epoch by SIGTERM, the lr read back before the stop travels in checkpoint-last.pth:
    a wrong lr applied only before the stop still shows in the resumed epoch's train_lr."""
    pretrain(small_folder, tmp_path / "full")
    real_set_lr = trainer_mod.set_lr

    def doubled(optimizer, lr):
        real_set_lr(optimizer, 2 * lr)
        return lr

    stopped = tmp_path / "stopped"
    with monkeypatch.context() as m:
        m.setattr(trainer_mod, "set_lr", doubled)
        signal_before_batch(m, FolderData, 7)  # epoch 1, after its third step
        with pytest.raises(Preempted):
            pretrain(small_folder, stopped)
    pretrain(small_folder, stopped)  # resumed with the right lr for the last 2 steps of epoch 1
    full, resumed = train_lrs(tmp_path / "full"), train_lrs(stopped)
    assert resumed[0] == pytest.approx(2 * full[0], rel=1e-12)
    steps = [1e-3 * 16 / 256 * 0.5 * (1 + math.cos(math.pi * it / 5)) for it in range(5)]  # epoch 1's schedule
    assert resumed[1] == pytest.approx((2 * sum(steps[:3]) + sum(steps[3:])) / 5, rel=1e-12)
