"""Pre-training on unlabelled images: a flat folder (``--data_path`` holding images, or ``train/``
holding them directly) and img2dataset's shards (``<key>.jpg`` + ``.json`` / ``.txt``, no ``.cls``),
indexed by tools/make_shards.py; pre-training runs and resumes mid-epoch on both, and the jobs that
need labels say so in one line."""
import io
import json
import shutil
import tarfile

from util.data.build import build_train_data
from util.data.datasets import NO_LABEL, FolderData, list_images
from util.data.shards import ShardData, open_shards
from util.run.errors import Preempted, UserError

import pytest
from PIL import Image
from test_trainer import assert_same_weights, read_log, signal_before_batch, weights

import main_finetune
import main_pretrain
from tools import make_shards

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# 80 images, batch 16: 5 steps in the one epoch; the k-NN monitor finds no labelled folder and stays off
FLAGS = ["--model", "deepmim_vit_tiny_patch4", "--decoder_depth", "1", "--ds_layers", "12", "--input_size", "16",
         "--device", "cpu", "--batch_size", "16", "--num_workers", "0", "--epochs", "1", "--warmup_epochs", "1",
         "--blr", "1e-3", "--log_every", "2", "--stop_check_every", "1"]


def pretrain(data, out):
    return main_pretrain.main(main_pretrain.get_args_parser().parse_args(
        [*FLAGS, "--data_path", str(data), "--output_dir", str(out)]))


def assert_resumes_mid_epoch_as_if_never_stopped(data, data_cls, tmp_path, monkeypatch):
    pretrain(data, tmp_path / "full")
    stopped = tmp_path / "stopped"
    with monkeypatch.context() as m:
        signal_before_batch(m, data_cls, 2)
        with pytest.raises(Preempted):
            pretrain(data, stopped)
    ckpt = __import__("torch").load(stopped / "checkpoint-last.pth", weights_only=True)
    assert (ckpt["epoch"], ckpt["step_in_epoch"]) == (0, 3)  # stopped mid-epoch
    pretrain(data, stopped)  # the same command continues
    assert_same_weights(weights(tmp_path / "full" / "checkpoint-last.pth"), weights(stopped / "checkpoint-last.pth"))
    full, resumed = read_log(tmp_path / "full"), read_log(stopped)
    assert [r["epoch"] for r in resumed] == [0]
    assert resumed[0]["train_loss"] == pytest.approx(full[0]["train_loss"], rel=1e-5)


@pytest.fixture()
def photos(small_folder, tmp_path):
    """The 80 training images of the small folder as a flat folder of photos: some in nested folders
    (by "day"), some with upper-case extensions, plus a hidden file and a text file that are not images."""
    root = tmp_path / "photos"
    for i, src in enumerate(sorted((small_folder / "train").glob("*/*.png"))):
        dest = root / (f"day{i % 3}" if i % 2 else "") / (f"IMG_{i:03d}" + (".PNG" if i % 5 == 0 else ".png"))
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dest)
    (root / ".thumbnail.png").write_bytes((root / "IMG_000.PNG").read_bytes())
    (root / "notes.txt").write_text("not an image")
    return root


def test_a_flat_folder_is_listed_recursively_in_sorted_order(photos):
    found = list_images(photos)
    assert len(found) == 80 and found == sorted(found)
    assert sum(f.endswith(".PNG") for f in found) == 16 and sum("/day" in f for f in found) == 40
    assert not any(".thumbnail" in f or f.endswith(".txt") for f in found)
    data = build_train_data(str(photos), None, 16, 0, 1, 0, 0, False, labels=False)
    assert (data.num_samples, data.steps_per_epoch) == (80, 5)
    assert [p for p, _ in data.loader.dataset.base.samples] == found
    assert {label for _, label in data.loader.dataset.base.samples} == {NO_LABEL}


def test_pretraining_on_a_flat_folder_runs_and_resumes_mid_epoch(photos, tmp_path, monkeypatch):
    assert_resumes_mid_epoch_as_if_never_stopped(photos, FolderData, tmp_path, monkeypatch)


def test_pretraining_on_train_holding_images_directly(photos, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    shutil.move(str(photos), root / "train")
    pretrain(root, tmp_path / "out")
    assert len(read_log(tmp_path / "out")) == 1


def test_jobs_that_need_labels_say_so_in_one_line(photos, tmp_path, capsys):
    root = tmp_path / "data"
    (root / "val").mkdir(parents=True)
    shutil.copytree(photos, root / "train")
    shutil.copytree(photos, root / "val", dirs_exist_ok=True)
    ft = ["--model", "vit_tiny_patch4", "--input_size", "16", "--device", "cpu", "--num_workers", "0",
          "--output_dir", str(tmp_path / "ft")]
    with pytest.raises(UserError, match=r"holds images without class sub-folders.*pre-training only.*--data_path") as e:
        main_finetune.main(main_finetune.get_args_parser().parse_args([*ft, "--data_path", str(root)]))
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"need labelled images.*--monitor_data_path") as e:
        main_pretrain.main(main_pretrain.get_args_parser().parse_args(
            [*FLAGS, "--data_path", str(root), "--output_dir", str(tmp_path / "pre"), "--knn_every", "1"]))
    assert "--monitor_data_path" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"training folder .* does not exist.*images itself \(a flat folder"):
        pretrain(tmp_path / "ft", tmp_path / "pre2")  # neither train/ nor images


def write_img2dataset_shards(images, folder, per_shard):
    """img2dataset's output: ``NNNNN.tar`` shards of ``<key>.jpg`` + ``<key>.json`` + ``<key>.txt``, no ``.cls``."""
    folder.mkdir(parents=True)
    for s in range(0, len(images), per_shard):
        with tarfile.open(folder / f"{s // per_shard:05d}.tar", "w") as tar:
            for i, path in enumerate(images[s:s + per_shard], start=s):
                key = f"{s // per_shard:05d}{i:04d}"
                jpg = io.BytesIO()
                Image.open(path).convert("RGB").save(jpg, format="JPEG", quality=95)
                caption = f"photo {i}".encode()
                meta = json.dumps({"key": key, "caption": caption.decode(), "status": "success"}).encode()
                for ext, data in (("jpg", jpg.getvalue()), ("json", meta), ("txt", caption)):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder / "{00000..00002}.tar")


def test_img2dataset_shards_are_indexed_as_unlabelled_and_pretrain_and_resume(photos, tmp_path, monkeypatch, capsys):
    spec = write_img2dataset_shards(list_images(photos), tmp_path / "laion", per_shard=32)  # 32 + 32 + 16
    make_shards.main(make_shards.get_args_parser().parse_args(["--index", spec]))
    assert "80 samples in 3 shards, no class labels (.cls): pre-training only" in capsys.readouterr().out
    shards = open_shards(spec)
    assert (shards.counts, shards.classes, shards.labelled) == ((32, 32, 16), (), False)

    assert_resumes_mid_epoch_as_if_never_stopped(spec, ShardData, tmp_path, monkeypatch)

    with pytest.raises(UserError, match=r"no class labels .*pre-training only.*--data_path") as e:
        main_finetune.main(main_finetune.get_args_parser().parse_args(
            ["--model", "vit_tiny_patch4", "--input_size", "16", "--device", "cpu", "--num_workers", "0",
             "--data_path", spec, "--output_dir", str(tmp_path / "ft")]))
    assert "\n" not in str(e.value)
