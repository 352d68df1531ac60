"""tools/compare_logs.py: constructed logs with known differences, and two real fine-tuning runs."""
import json
import subprocess
import sys

import pytest
from conftest import ROOT, run_finetune
from PIL import Image

from tools import compare_logs

TINY_FINETUNE = ["--model", "vit_tiny_patch4", "--input_size", "16", "--device", "cpu", "--batch_size", "16",
                 "--num_workers", "0", "--epochs", "2", "--warmup_epochs", "1", "--lr", "1e-3", "--aa", "none",
                 "--reprob", "0", "--log_every", "100", "--save_every", "1"]


def write_log(path, records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return str(path)


def records(n=5, acc_shift=None, lr_scale=1.0, loss_scale=1.0):
    """MAE's fine-tuning log lines: lr, losses, accuracies, n_parameters, epoch."""
    out = []
    for e in range(n):
        acc = 50.0 + 5 * e + (acc_shift.get(e, 0.0) if acc_shift else 0.0)
        out.append({"train_lr": 1e-3 * (e + 1) / n * lr_scale, "train_loss": 2.0 / (e + 1) * loss_scale,
                    "test_loss": 1.5 / (e + 1), "test_acc1": acc, "test_acc5": acc + 20, "epoch": e,
                    "n_parameters": 5_000_000})
    return out


def run(argv, capsys):
    ok = compare_logs.main(compare_logs.get_args_parser().parse_args([*map(str, argv)]))
    return ok, capsys.readouterr().out


def test_identical_logs_match_and_every_key_is_identical(tmp_path, capsys):
    a = write_log(tmp_path / "a.txt", records())
    ok, out = run([a, a], capsys)
    assert ok and out.rstrip().endswith("verdict: match (5 keys over 5 shared epochs)")
    for key in ("test_acc1", "test_acc5", "test_loss", "train_loss", "train_lr"):
        assert f"epochs 0-4: {key} identical" in out
    assert "n_parameters" not in out.split("\n\n")[0]  # bookkeeping, not compared


def test_an_accuracy_off_by_more_than_the_tolerance_is_named_with_its_epoch(tmp_path, capsys):
    a = write_log(tmp_path / "a.txt", records(acc_shift={3: -0.5, 4: 0.2}))
    b = write_log(tmp_path / "b.txt", records())
    ok, out = run([a, b], capsys)
    assert not ok and "verdict: differ" in out
    assert ("epochs 0-4: test_acc1 differs by more than 0.3 at 1 epoch(s), first at epoch 3 (64.5 against 65), "
            "largest -0.5 at epoch 3") in out
    assert "epochs 0-4: train_lr identical" in out
    # the table: epoch 3's row holds both values and the difference
    row = next(ln.split() for ln in out.splitlines() if ln.split()[:1] == ["3"])
    header = next(ln.split() for ln in out.splitlines() if ln.startswith("epoch"))
    assert row[0] == "3" and "-0.5" in row and len(header) == 1 + 5 * 3 * 2  # "KEY run" is two words
    # a looser tolerance (a glob) accepts it; relative tolerances are written with %
    ok, out = run([a, b, "--tol", "test_*=0.6"], capsys)
    assert ok and "test_acc1 within 0.6 (largest difference -0.5 at epoch 3)" in out
    ok, out = run([a, b, "--tol", "test_acc1=1%", "--keys", "test_acc1", "--quiet"], capsys)
    assert ok and out.splitlines()[0] == "epochs 0-4: test_acc1 within 1 % (largest difference -0.5 at epoch 3)"


def test_learning_rates_must_be_identical_and_losses_agree_within_two_percent(tmp_path, capsys):
    b = write_log(tmp_path / "b.txt", records())
    ok, out = run([write_log(tmp_path / "lr.txt", records(lr_scale=1.001)), b, "--quiet"], capsys)
    assert not ok and "train_lr differs by more than 0.0001 %" in out
    ok, out = run([write_log(tmp_path / "loss.txt", records(loss_scale=1.01)), b, "--quiet"], capsys)
    assert ok and "train_loss within 2 %" in out
    ok, out = run([write_log(tmp_path / "loss3.txt", records(loss_scale=1.03)), b, "--quiet"], capsys)
    assert not ok and "train_loss differs by more than 2 % at 5 epoch(s)" in out


def test_epochs_of_one_log_only_and_a_partial_last_line(tmp_path, capsys):
    extra = [dict(r, epoch=r["epoch"] + 5) for r in records(3)]  # epochs 5-7
    longer = write_log(tmp_path / "long.txt", records(5) + extra, tail='{"train_lr": 0.1, "epo')  # killed mid-write
    ok, out = run([longer, write_log(tmp_path / "short.txt", records(5))], capsys)
    assert ok and f"epochs 5-7 only in {longer}: not compared" in out
    assert "(5 keys over 5 shared epochs)" in out


def test_a_rollback_line_is_named_and_not_an_epoch(tmp_path, capsys):
    rollback = {"rollback": 1, "trigger": "non-finite loss", "step": 8, "skipped": [7, 9]}
    rolled = write_log(tmp_path / "rolled.txt", records(2)[:1] + [rollback] + records(2)[1:])
    ok, out = run([rolled, write_log(tmp_path / "plain.txt", records(2))], capsys)
    assert ok and "(5 keys over 2 shared epochs)" in out
    assert f"{rolled}: 1 rollback (--on_nonfinite rollback); its epochs trained without the steps 7-8" in out


@pytest.mark.parametrize("content, message", [
    ('{"epoch": 0, "test_acc1": 1}\nnot json\n{"epoch": 1, "test_acc1": 2}\n', r"a.txt:2 is not a JSON line"),
    ('{"test_acc1": 1}\n', r"a.txt:1 has no 'epoch' field"),
    ("", r"a.txt holds no epoch line"),
])
def test_unreadable_logs_say_which_line(tmp_path, capsys, content, message):
    (tmp_path / "a.txt").write_text(content)
    b = write_log(tmp_path / "b.txt", records())
    with pytest.raises(compare_logs.UserError, match=message):
        run([tmp_path / "a.txt", b], capsys)


def test_flag_errors(tmp_path, capsys):
    a = write_log(tmp_path / "a.txt", records())
    with pytest.raises(compare_logs.UserError, match=r"--tol 'test_acc1': write KEY=VALUE"):
        run([a, a, "--tol", "test_acc1"], capsys)
    with pytest.raises(compare_logs.UserError, match=r"--keys top1: not in both logs; both have: test_acc1"):
        run([a, a, "--keys", "top1"], capsys)
    late = write_log(tmp_path / "late.txt", [dict(r, epoch=r["epoch"] + 10) for r in records()])
    with pytest.raises(compare_logs.UserError, match=r"share no epoch"):
        run([a, late], capsys)
    with pytest.raises(compare_logs.UserError, match=r"missing.txt does not exist"):
        run([tmp_path / "missing.txt", a], capsys)


def test_plot_draws_one_panel_per_key(tmp_path, capsys):
    a = write_log(tmp_path / "a.txt", records())
    ok, out = run([a, a, "--keys", "test_acc1", "train_lr", "--plot", tmp_path / "c.png"], capsys)
    assert ok and f"plot written to {tmp_path / 'c.png'}" in out
    with Image.open(tmp_path / "c.png") as im:
        assert im.size == (700, 480)  # 7 x (2.4 x 2 panels) inches at 100 dpi


def test_two_runs_with_one_seed_match_and_another_seed_does_not(small_folder, tiny_checkpoint, tmp_path):
    """Real fine-tuning logs: the same command twice is identical; another seed is not, and the
    script's exit status says so (0 / 1)."""
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        run_finetune(*TINY_FINETUNE, "--seed", seed, "--finetune", tiny_checkpoint, "--data_path", small_folder,
                     "--output_dir", tmp_path / name)
    same = compare_logs.main(compare_logs.get_args_parser().parse_args(
        [str(tmp_path / "a" / "log.txt"), str(tmp_path / "b" / "log.txt"), "--quiet"]))
    assert same
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "compare_logs.py"), str(tmp_path / "a" / "log.txt"),
                           str(tmp_path / "c" / "log.txt"), "--quiet", "--tol", "test_acc1=0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "verdict: differ" in proc.stdout and "train_lr identical" in proc.stdout  # same schedule, other numbers
