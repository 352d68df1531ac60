"""What a researcher watches during pre-training: the k-NN monitor, reconstructions in TensorBoard,
progress lines, MAE's log.txt keys, W&B, the reconstruction tool for every target."""
import importlib.metadata
import json
import math
import struct
import subprocess
import sys
from pathlib import Path

from util import import_wandb
from util.config.cli import UsageError
from util.run.errors import UserError
from util.run.lr_sched import cosine_schedule

import pytest
import torch
from conftest import ROOT, clean_env, read_log, run_pretrain, run_script

import main_pretrain
from engine_monitor import MonitorConfig
from evaluation import knn

TINY = ["--model", "deepmim_vit_tiny_patch4", "--input_size", "16", "--decoder_depth", "1", "--device", "cpu",
        "--num_workers", "0", "--warmup_epochs", "1", "--blr", "1.5e-3", "--no_auto_resume"]




pretrain = run_pretrain


# --------------------------------------------------------------------------------------------
# the classifier


def unit(deg: float):
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def test_weighted_knn_equals_a_hand_computation():
    """Four labelled directions (0, 45, 90, 180 degrees; classes 0, 1, 1, 0), queries at 20 and 80 degrees."""
    train = torch.tensor([unit(0), [3 * x for x in unit(45)], unit(90), [0.5 * x for x in unit(180)]])  # scale-free
    labels = torch.tensor([0, 1, 1, 0])
    test = torch.tensor([unit(20), unit(80)])
    for temperature in (0.07, 10.0):
        votes = knn.knn_votes(train, labels, test, num_classes=2, k=3, temperature=temperature)
        w = lambda deg, t=temperature: math.exp(math.cos(math.radians(deg)) / t)  # noqa: E731
        # 20 deg: nearest 3 are 0 (20 deg away, class 0), 45 (25, class 1), 90 (70, class 1)
        # 80 deg: 90 (10, class 1), 45 (35, class 1), 0 (80, class 0)
        hand = torch.tensor([[w(20), w(25) + w(70)], [w(80), w(10) + w(35)]])
        assert torch.allclose(votes, hand, rtol=1e-5)
    test_labels = torch.tensor([0, 1])
    # a sharp temperature lets the nearest neighbour win; a flat one counts heads (two of class 1)
    assert knn.knn_accuracy(train, labels, test, test_labels, 2, k=3, temperature=0.07) == 100.0
    assert knn.knn_accuracy(train, labels, test, test_labels, 2, k=3, temperature=10.0) == 50.0
    # k above the number of training features uses them all
    all4 = knn.knn_votes(train, labels, test, 2, k=20, temperature=1.0)
    w1 = lambda deg: math.exp(math.cos(math.radians(deg)))  # noqa: E731
    assert torch.allclose(all4[0], torch.tensor([w1(20) + w1(160), w1(25) + w1(70)]), rtol=1e-5)


def test_subsets_are_seeded_and_class_balanced():
    labels = [0] * 30 + [1] * 5 + [2] * 12
    a = knn.balanced_subset(labels, 10, seed=3)
    assert a == knn.balanced_subset(labels, 10, seed=3) != knn.balanced_subset(labels, 10, seed=4)
    assert a == sorted(a) and len(set(a)) == len(a)
    assert [sum(labels[i] == c for i in a) for c in range(3)] == [10, 5, 10]  # all 5 of the small class
    assert knn.balanced_subset(labels, 0, seed=0) == list(range(len(labels)))


# --------------------------------------------------------------------------------------------
# the monitor in pre-training


@pytest.mark.slow  # four processes; sibling: test_distributed's 2-process --dist_eval (the same gather)
def test_two_processes_compute_the_single_process_features_and_accuracy(small_folder, tmp_path):
    env = clean_env(tmp_path)
    script = ROOT / "tests" / "knn_dist.py"
    # the two launches run at the same time: each in a folder of its own (a run locks its output folder)
    (tmp_path / "two").mkdir(), (tmp_path / "one").mkdir()
    two = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            str(script), str(small_folder), str(tmp_path / "two")], cwd=ROOT, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    one = subprocess.run([sys.executable, str(script), str(small_folder), str(tmp_path / "one")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    _, err = two.communicate(timeout=300)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, err
    w1, w2 = torch.load(tmp_path / "one" / "knn-w1.pt"), torch.load(tmp_path / "two" / "knn-w2.pt")
    # 50 training images in batches of 7: rank 0 extracted batches 0, 2, 4, 6 and rank 1 the others
    assert w1["batches_here"]["train"] == list(range(8)) and w2["batches_here"]["train"] == [0, 2, 4, 6]
    for split in ("train", "val"):
        assert w1["features"][split].keys() == w2["features"][split].keys() == {
            "L2_cls", "L2_avg", "L4_cls", "L4_avg"}
        for name, f in w1["features"][split].items():
            assert f.shape == (50 if split == "train" else 30, 192) and f.abs().sum(1).min() > 0
            assert torch.equal(f, w2["features"][split][name]), (split, name)
    assert w1["accuracy"] == w2["accuracy"]


def test_the_logged_knn_is_that_of_the_weights_at_each_epoch(small_folder, tmp_path):
    """The monitor reads the weights being trained (its ViT shares the DeepMIM tensors): each epoch's
    logged k-NN equals a fresh monitor's on that epoch's checkpoint, and it moves as the weights do.

    (Whether it rises is a property of the recipe, not of the monitor: on the digits, a few epochs of
    the demo's recipe leave it flat or lower than the random encoder's; docs/PRETRAIN.md: Monitoring.)
    """
    from engine_monitor import KnnMonitor
    from tools.visualize import load_pretrained

    out = tmp_path / "run"
    pretrain(*TINY, "--data_path", small_folder, "--batch_size", "16", "--epochs", "2", "--log_every", "100",
             "--save_every", "1", "--knn_every", "1", "--recon_every", "0", "--output_dir", out)
    log = read_log(out)
    cfg = MonitorConfig(knn_every=1, monitor_data_path=str(small_folder))
    for r in log:
        model, _ = load_pretrained(str(out / f"checkpoint-{r['epoch']}.pth"))
        again = KnnMonitor(model, cfg, torch.device("cpu"), None, seed=0).evaluate()
        assert again == {k[4:]: v for k, v in r.items() if k.startswith("knn_L")}
    names = [k for k in log[0] if k.startswith("knn_L")]
    assert len(names) == 8 and any(log[0][k] != log[1][k] for k in names)
    assert max(log[1][k] for k in names) > 25  # far above chance (10 classes)
    # the initial encoder's, measured before the first step, is in the epoch-0 line only
    init = {k[len("knn_init_"):]: v for k, v in log[0].items() if k.startswith("knn_init_")}
    assert sorted(init) == sorted(k[4:] for k in names) and not any(k.startswith("knn_init_") for k in log[1])
    assert init != {k[4:]: log[0][k] for k in names}


def test_logs_tensorboard_and_progress_of_a_monitored_run(small_folder, tmp_path):
    """log.txt: MAE's keys (epoch mean train_lr, n_parameters, epoch) and the k-NN fields; TensorBoard:
    the k-NN and timing scalars and the reconstruction figure; the progress line: ETA, data time,
    images/s, memory."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    pretrain(*TINY, "--data_path", small_folder, "--batch_size", "16", "--epochs", "2", "--log_every", "2",
             "--knn_every", "1", "--recon_every", "2", "--recon_images", "3", "--output_dir", out)
    log = read_log(out)
    assert [r["epoch"] for r in log] == [0, 1]
    ckpt = torch.load(out / "checkpoint-last.pth", weights_only=True)
    n_params = sum(v.numel() for k, v in ckpt["model"].items() if k not in ("pos_embed", "decoder_pos_embed"))
    spe = 5  # 80 images, batch 16
    lr = cosine_schedule(ckpt["args"]["lr"], 0.0, 1, 2, spe)
    for r in log:
        assert r["n_parameters"] == n_params
        # MAE's train_lr: the mean over the epoch's iterations, not the last iteration's
        mean = sum(lr(r["epoch"] * spe + i) for i in range(spe)) / spe
        assert r["train_lr"] == pytest.approx(mean, rel=1e-12) and r["train_lr"] != pytest.approx(
            lr(r["epoch"] * spe + spe - 1))
        assert {f"knn_L{x}_{p}" for x in (6, 8, 10, 12) for p in ("cls", "avg")} <= r.keys()
        assert all(0 <= r[f"knn_L{x}_cls"] <= 100 for x in (6, 8, 10, 12))

    acc = EventAccumulator(str(out), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"knn/L6_cls", "knn/L12_avg", "perf/images_per_s", "perf/data_s_per_it", "perf/peak_memory_gb",
            "train/loss", "train/lr"} <= set(tags["scalars"])
    knn12 = acc.Scalars("knn/L12_cls")
    assert [e.step for e in knn12] == [0, spe, 2 * spe]  # before the first step, then at each epoch end
    assert [e.value for e in knn12] == pytest.approx([log[0]["knn_init_L12_cls"]] + [r["knn_L12_cls"] for r in log])
    (image,) = acc.Images("reconstruction")  # every 2 epochs: after epoch 1 only
    assert image.step == 2 * spe and image.encoded_image_string[:4] == b"\x89PNG" and image.width > 300

    text = (out / "train.log").read_text()
    line = next(x for x in text.splitlines() if "epoch 1 [2/5]" in x)
    assert "loss" in line and "s/it, data " in line and "img/s" in line and "eta epoch 0:00:" in line
    assert " run 0:00:" in line and "max RSS" in line
    assert "k-NN top-1 L6" in text


def test_the_monitor_does_not_change_what_training_computes(small_folder, tmp_path):
    args = [*TINY, "--data_path", small_folder, "--batch_size", "16", "--epochs", "2", "--log_every", "100"]
    pretrain(*args, "--knn_every", "1", "--recon_every", "1", "--output_dir", tmp_path / "on", "--num_workers", "1")
    pretrain(*args, "--knn_every", "0", "--recon_every", "0", "--output_dir", tmp_path / "off")
    on, off = (torch.load(tmp_path / x / "checkpoint-last.pth", weights_only=True) for x in ("on", "off"))
    for k, v in off["model"].items():
        assert torch.equal(on["model"][k], v), k
    losses = lambda rs: [{k: v for k, v in r.items() if k.startswith("train_")} for r in rs]  # noqa: E731
    assert losses(read_log(tmp_path / "on")) == losses(read_log(tmp_path / "off"))
    assert "knn_L12_cls" in read_log(tmp_path / "on")[0] and "knn_L12_cls" not in read_log(tmp_path / "off")[0]


def test_monitor_defaults_and_errors(small_folder, tmp_path):
    # default: on for small image folders, off for ImageNet-sized data and for shards
    assert MonitorConfig().resolved("digits", 1438).knn_every == 2
    assert MonitorConfig().resolved("digits", 1438).recon_every == 4
    assert MonitorConfig().resolved("/imagenet", 1_281_167).knn_every == 0
    assert MonitorConfig().resolved("/imagenet", 1_281_167).recon_every == 0
    assert MonitorConfig(knn_every=5).resolved("/imagenet", 1_281_167).recon_every == 10
    assert MonitorConfig().resolved("/data/train-{000000..000009}.tar", 10).knn_every == 0
    train_only = tmp_path / "train_only"
    train_only.mkdir()
    (train_only / "train").symlink_to(small_folder / "train")
    assert MonitorConfig().resolved(str(train_only), 80).knn_every == 0  # no val/: off by default

    # every mistake stops before the run writes anything
    out = tmp_path / "out"
    base = [*TINY, "--data_path", small_folder, "--batch_size", "16", "--epochs", "1", "--output_dir", out]
    for flags, message in [
        (["--knn_layers", "6,13"], r"--knn_layers \[13\] outside 1..12"),
        (["--knn_every", "1", "--monitor_data_path", train_only], r"train_only/val does not exist: pass --monitor_data_path"),
    ]:
        with pytest.raises(UserError, match=message):
            pretrain(*base, *flags)
    for flags, message in [  # ranges of single flags: the parser's one error line
        (["--knn_k", "0"], "--knn_k 0: must be an integer >= 1"),
        (["--knn_temperature", "0"], "--knn_temperature 0: must be a number > 0"),
        (["--recon_every", "-1"], "--recon_every -1: must be an integer >= 0"),
    ]:
        with pytest.raises(UsageError, match=message):
            pretrain(*base, *flags)
    with pytest.raises(UserError, match="--monitor_data_path FOLDER"):
        MonitorConfig(knn_every=1).validate("/data/train-{000000..000009}.tar", 12)
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# W&B


def _installed(dist: str) -> bool:
    try:
        return bool(importlib.metadata.version(dist))
    except importlib.metadata.PackageNotFoundError:
        return False


# wandb is optional at run time; its tests run where it is installed (pytest.importorskip would not
# see it: util/__init__.py blocks the import until util.import_wandb)
WITH_WANDB = pytest.mark.skipif(not _installed("wandb"), reason="wandb is not installed (pip install wandb)")


def wandb_records(run_file: Path, tmp: Path):
    """The history items of an offline W&B run file (its LevelDB-style log of protobuf records). wandb
    makes folders in the temp directory at import: ``tmp``'s (this pytest process may end without the
    clean exit that removes them)."""
    import tempfile

    tmp.mkdir(exist_ok=True)
    saved, tempfile.tempdir = tempfile.tempdir, str(tmp)
    try:
        import_wandb()  # util/__init__.py blocks `import wandb` until asked
        from wandb.proto import wandb_internal_pb2 as pb
    finally:
        tempfile.tempdir = saved

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunks, items = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full record, or the last piece of one
            rec = pb.Record()
            rec.ParseFromString(chunks)
            chunks = b""
            if rec.WhichOneof("record_type") == "history":
                items.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return items


@WITH_WANDB
@pytest.mark.slow  # two runs with W&B (a minute); siblings: the two tests below
def test_wandb_offline_receives_the_scalars_and_a_resumed_run_keeps_its_id(small_folder, tmp_path):
    out = tmp_path / "run"
    args = ["main_pretrain.py", *TINY[:-1], "--data_path", small_folder, "--batch_size", "16", "--log_every", "5",
            "--knn_every", "1", "--recon_every", "0", "--wandb", "--wandb_project", "test", "--output_dir", out]
    (tmp_path / "tmp").mkdir()
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path / "tmp")}
    run_script(*args, "--epochs", "1", env=env)
    run_id = (out / "wandb-run-id").read_text().strip()
    (run_file,) = (out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    history = wandb_records(run_file, tmp_path / "tmp")
    merged = {k: v for h in history for k, v in h.items()}
    assert {"train/loss", "train/lr", "knn/L12_cls", "perf/images_per_s"} <= merged.keys()
    assert merged["knn/L12_cls"] == pytest.approx(read_log(out)[0]["knn_L12_cls"])
    run_script(*args, "--epochs", "2", env=env)  # resumes epoch 1: the same W&B run
    assert (out / "wandb-run-id").read_text().strip() == run_id
    assert len(list((out / "wandb").glob(f"offline-run-*-{run_id}"))) == 2


def test_wandb_missing_gives_one_error_line(small_folder, tmp_path, monkeypatch, capsys):
    from util.run.errors import run_cli

    blocker = tmp_path / "no_wandb" / "wandb"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('No module named wandb')\n")
    monkeypatch.syspath_prepend(str(blocker.parent))
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    with pytest.raises(SystemExit) as stop:
        run_cli(main_pretrain.main, main_pretrain.get_args_parser().parse_args(
            [*TINY, "--data_path", str(small_folder), "--epochs", "1", "--wandb", "--output_dir", str(tmp_path / "run")]))
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: --wandb needs the wandb package: pip install wandb (or run without --wandb).")


@WITH_WANDB
# --------------------------------------------------------------------------------------------
# reconstructions of every target


def test_pca_colours_map_equal_features_to_equal_colours():
    from engine_monitor import pca_rgb

    g = torch.Generator().manual_seed(0)
    target = torch.randn(2, 16, 27, generator=g)
    ref, (same, other) = pca_rgb(target, [target.clone(), torch.randn(2, 16, 27, generator=g)])
    assert ref.shape == (2, 16, 3) and torch.equal(ref, same) and not torch.allclose(ref, other)
    assert ref.min() == 0 and ref.max() == 1  # the target spans the colour range
    # the first colour channel is the direction of largest variance
    x = target.reshape(-1, 27) - target.reshape(-1, 27).mean(0)
    top = torch.linalg.svd(x, full_matrices=False).Vh[0]
    assert abs(torch.corrcoef(torch.stack([ref.reshape(-1, 3)[:, 0], x @ top]))[0, 1]) > 0.999


@pytest.mark.slow  # three trainings; siblings: test_analysis' visualization of pixel and CLIP checkpoints
def test_visualize_draws_hog_and_teacher_checkpoints(small_folder, tmp_path, capsys):
    from util.run.errors import run_cli

    from tools import visualize

    base = [*TINY, "--data_path", small_folder, "--batch_size", "16", "--epochs", "1", "--log_every", "100",
            "--knn_every", "0", "--recon_every", "0"]
    pretrain(*base, "--output_dir", tmp_path / "pix")
    teacher = tmp_path / "pix" / "checkpoint-0.pth"
    pretrain(*base, "--target", "hog", "--output_dir", tmp_path / "hog")
    pretrain(*base, "--target", "teacher", "--teacher_model", f"deepmim:{teacher}", "--teacher_layer", "6",
             "--output_dir", tmp_path / "teacher")

    # a HOG checkpoint, through the command line's entry point
    run_cli(visualize.main, visualize.get_args_parser().parse_args([
        str(tmp_path / "hog" / "checkpoint-0.pth"), "--data_path", str(small_folder), "--num_images", "2",
        "--out", str(tmp_path / "hog.png"), "--device", "cpu"]))
    assert "targets hog" in capsys.readouterr().out
    from PIL import Image

    with Image.open(tmp_path / "hog.png") as im:  # image, masked, HOG target; PCA + cosine per layer (4)
        assert im.size == (round(100 * (1.5 * 11 + 0.8)), round(100 * (1.6 * 2 + 0.4)))

    # a teacher checkpoint: the teacher is rebuilt from the saved flags; moved, --teacher_model finds it
    out = visualize.main(visualize.get_args_parser().parse_args([
        str(tmp_path / "teacher" / "checkpoint-0.pth"), "--data_path", str(small_folder), "--num_images", "2",
        "--out", str(tmp_path / "teacher.png"), "--device", "cpu"]))
    assert out.stat().st_size > 1000
    moved = teacher.rename(tmp_path / "moved.pth")
    args = [str(tmp_path / "teacher" / "checkpoint-0.pth"), "--data_path", str(small_folder), "--num_images", "2",
            "--out", str(tmp_path / "teacher2.png"), "--device", "cpu"]
    with pytest.raises(UserError, match="could not be rebuilt from its saved flags.*--teacher_model"):
        visualize.main(visualize.get_args_parser().parse_args(args))
    visualize.main(visualize.get_args_parser().parse_args([*args, "--teacher_model", f"deepmim:{moved}"]))
    assert (tmp_path / "teacher2.png").read_bytes() == out.read_bytes()  # the same figure


# --------------------------------------------------------------------------------------------
# the demo


def test_the_demo_resumes_monitors_and_tabulates_the_knn(tmp_path):
    from tools import demo

    # a rerun continues from the checkpoints (the trainer's resume is tested for every job elsewhere)
    assert "--no_auto_resume" not in demo.PRETRAIN + demo.FINETUNE
    args = main_pretrain.get_args_parser().parse_args(demo.PRETRAIN)
    assert (args.knn_every, args.recon_every, args.auto_resume) == (2, 4, True)
    log = tmp_path / "log.txt"
    rows = [{"train_loss": 1.0, "epoch": 0}, {"train_loss": 0.9, "epoch": 1, "knn_L6_cls": 41.0, "knn_L6_avg": 40.5,
                                              "knn_L12_cls": 38.25, "knn_L12_avg": 37.0}]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert demo.knn_table(log) == ["epoch           L6          L12", "    1   41.0/ 40.5   38.2/ 37.0"]
    rows[0].update(knn_init_L6_cls=45.0, knn_init_L6_avg=44.0, knn_init_L12_cls=43.0, knn_init_L12_avg=42.5)
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert demo.knn_table(log) == ["epoch           L6          L12", " init   45.0/ 44.0   43.0/ 42.5",
                                   "    1   41.0/ 40.5   38.2/ 37.0"]
    assert demo.knn_table(tmp_path / "missing.txt") == []
