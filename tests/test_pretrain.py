"""main_pretrain.py end to end: training, resume, checkpoints and every user error."""
import json
import shutil

from util.checkpoints import reader as ckpt_util
from util.run.errors import UserError

import pytest
import torch
from conftest import NO_MONITORS, read_log, run_pretrain, run_script

FAST = ["--model", "deepmim_vit_tiny_patch4", "--decoder_depth", "1", "--batch_size", "16", "--num_workers", "0",
        "--device", "cpu", "--log_every", "5", "--save_every", "1", *NO_MONITORS]


def pretrain(*args):
    return run_pretrain(*FAST, *args)


def assert_layer_losses_went_down(out, layers=(6, 8, 10, 12)):
    log = read_log(out)
    for layer in layers:
        first, last = log[0][f"train_loss_L{layer}"], log[-1][f"train_loss_L{layer}"]
        assert last < 0.9 * first, (layer, first, last)


def test_pixel_loss_goes_down_and_outputs_are_written(small_folder, tmp_path):
    out = tmp_path / "run"
    pretrain("--data_path", small_folder, "--output_dir", out, "--input_size", 16, "--epochs", 3, "--warmup_epochs", 1,
             "--blr", "2e-3", "--norm_pix_loss")
    assert_layer_losses_went_down(out)
    names = {p.name for p in out.iterdir()}
    assert {"checkpoint-0.pth", "checkpoint-2.pth", "checkpoint-last.pth", "log.txt", "config.json"} <= names
    assert any(n.startswith("events.out.tfevents") for n in names)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_cfg"]["ds_layers"] == [6, 8, 10, 12] and cfg["args"]["norm_pix_loss"] is True
    for f in out.glob("*.pth"):  # every checkpoint this repo writes loads weights-only
        ckpt = torch.load(f, weights_only=True)
        assert set(ckpt) >= {"model", "optimizer", "epoch", "scaler", "args", "model_cfg"}
        assert isinstance(ckpt["args"], dict)


@pytest.mark.slow  # sibling: test_teachers' mixed targets (two CLIP layers train, the losses fall)
@pytest.mark.parametrize("fmt", ["state_dict", "torchscript"])
def test_clip_target_loss_goes_down(small_folder, tiny_clip, tmp_path, fmt):
    out = tmp_path / fmt
    pretrain("--data_path", small_folder, "--output_dir", out, "--epochs", 3, "--warmup_epochs", 1,
             "--blr", "2e-3", "--clip_path", tiny_clip[fmt])
    assert_layer_losses_went_down(out)
    ckpt = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert ckpt["model"]["decoders.6.pred.weight"].shape[0] == 32  # predicts the CLIP width
    assert ckpt["model_cfg"]["losses"] == ["cosine"] * 4


def test_resume_equals_an_uninterrupted_run_and_auto_resume_picks_newest(small_folder, tmp_path):
    common = ["--data_path", small_folder, "--input_size", 16, "--epochs", 2, "--warmup_epochs", 1, "--blr", "1e-3"]
    full = tmp_path / "full"
    pretrain(*common, "--output_dir", full)
    # the stopped run: only its epoch-0 checkpoint exists; rerunning the same command resumes it
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    shutil.copy(full / "checkpoint-0.pth", stopped / "checkpoint-0.pth")
    pretrain(*common, "--output_dir", stopped)
    a = torch.load(full / "checkpoint-1.pth", weights_only=True)
    b = torch.load(stopped / "checkpoint-1.pth", weights_only=True)
    assert a["epoch"] == b["epoch"] == 1
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], atol=1e-6, rtol=0), k
    assert [e["epoch"] for e in read_log(stopped)] == [1]

    # explicit --resume gives the same
    explicit = tmp_path / "explicit"
    pretrain(*common, "--output_dir", explicit, "--resume", full / "checkpoint-0.pth")
    c = torch.load(explicit / "checkpoint-1.pth", weights_only=True)
    assert all(torch.allclose(a["model"][k], c["model"][k], atol=1e-6, rtol=0) for k in a["model"])


def test_find_resume_skips_broken_and_takes_newest(tmp_path):
    state = {"model": {"w": torch.zeros(1)}, "epoch": 0}
    ckpt_util.save_atomic(state, tmp_path / "checkpoint-0.pth")
    ckpt_util.save_atomic({**state, "epoch": 3}, tmp_path / "checkpoint-3.pth")
    assert ckpt_util.find_resume(tmp_path).name == "checkpoint-3.pth"
    broken = tmp_path / "checkpoint-last.pth"
    broken.write_bytes((tmp_path / "checkpoint-3.pth").read_bytes()[:100])  # truncated, and newest
    assert ckpt_util.find_resume(tmp_path).name == "checkpoint-3.pth"
    (tmp_path / "notes.pth").write_bytes(b"x")  # not a checkpoint name: ignored
    assert ckpt_util.find_resume(tmp_path).name == "checkpoint-3.pth"
    assert not list(tmp_path.glob(".*tmp*"))  # atomic saves leave no temporary files


def test_resume_refuses_a_checkpoint_of_another_model(small_folder, tmp_path):
    out = tmp_path / "run"
    pretrain("--data_path", small_folder, "--output_dir", out, "--epochs", 1)
    with pytest.raises(UserError, match="different model or flags"):
        pretrain("--data_path", small_folder, "--output_dir", out, "--epochs", 2, "--ds_layers", "12")
    assert read_log(out)[-1]["epoch"] == 0  # nothing overwritten


@pytest.mark.parametrize("extra, message", [
    (["--model", "vit_gigantic"], "Unknown pre-training model 'vit_gigantic'. Valid names:"),
    (["--ds_layers", "6,8"], "must include the last layer"),
    (["--ds_layers", "6,12", "--ds_weights", "1"], "one weight per supervised layer"),
    (["--clip_path", "missing_clip.pt"], "CLIP weights not found"),
    (["--lr", "1e30", "--warmup_epochs", "0"], r"Non-finite loss at step \d+ \(epoch 0, iteration \d+\) in the loss of L\d+"),
    (["--batch_size", "1000"], "fewer than one batch"),
])
def test_bad_input_messages(small_folder, tmp_path, extra, message):
    with pytest.raises(UserError, match=message):
        pretrain("--data_path", small_folder, "--output_dir", tmp_path / "o", "--epochs", 1, *extra)


def test_data_errors(tmp_path):
    with pytest.raises(UserError, match=r"training folder .*does not exist.*'digits'"):
        pretrain("--data_path", tmp_path / "nowhere", "--output_dir", tmp_path / "o")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(UserError, match="No images found"):
        pretrain("--data_path", tmp_path / "empty", "--output_dir", tmp_path / "o")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="--output_dir .* is not writable"):
        pretrain("--data_path", tmp_path / "empty", "--output_dir", blocker / "sub")


def test_unreadable_image_in_a_worker_gives_one_clear_line(small_folder, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(small_folder, data)
    bad = data / "train" / "3" / "broken.png"
    bad.write_bytes(b"not a png")
    proc = run_script("main_pretrain.py", *FAST, "--num_workers", "1", "--data_path", data,
                      "--output_dir", tmp_path / "o", "--epochs", 1, check=False)
    assert proc.returncode == 2
    err_lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(err_lines) == 1 and f"Cannot read image {bad}" in err_lines[0]
    assert "Traceback" not in proc.stderr
