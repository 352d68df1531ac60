"""Every checkpoint a user has, through every entry point that takes one: files written exactly as the
reference DeepMIM / MAE ``save_model`` writes them load, files that would run code are refused without
running it, and evaluation rebuilds the model the checkpoint holds."""
import shutil

from util.checkpoints import convert, hub
from util.data.datasets import classification_datasets, eval_loader, eval_transform
from util.run.errors import UserError

import pytest
import torch
from conftest import NO_MONITORS
from test_serialization import CarriesPayload, RunsCode, mae_args

import main_finetune
import main_linprobe
import main_pretrain
import models_deepmim
import models_vit
from evaluation.classification import evaluate
from Segmentation import train as seg_train
from targets.base import TargetConfig
from targets.registry import build_targets
from tools import convert_checkpoint, visualize

FINETUNE = ["--model", "vit_tiny_patch4", "--input_size", "16", "--device", "cpu", "--batch_size", "16",
            "--num_workers", "0", "--epochs", "1", "--warmup_epochs", "0", "--lr", "1e-3", "--aa", "none",
            "--reprob", "0", "--log_every", "100"]
PRETRAIN = ["--model", "deepmim_vit_tiny_patch4", "--decoder_depth", "1", "--input_size", "16", "--device", "cpu",
            "--batch_size", "16", "--num_workers", "0", "--warmup_epochs", "1", "--blr", "1e-3", "--log_every", "100",
            *NO_MONITORS]
SEG = ["--model", "vit_tiny_patch4", "--out_indices", "1,2,3,4", "--device", "cpu", "--amp", "none", "--crop_size", "32",
       "--img_scale", "128", "32", "--stride", "21", "--channels", "16", "--aux_channels", "8", "--batch_size", "4",
       "--num_workers", "0", "--iters", "2", "--warmup_iters", "1", "--log_every", "1", "--eval_every", "100",
       "--data_path", "synthetic"]




def reference_state_dict():
    """A tiny DeepMIM (16 px, patch 4, layers 6/8/10/12) under the reference release's decoder names."""
    torch.manual_seed(0)
    model = models_deepmim.create_model("deepmim_vit_tiny_patch4", img_size=16, decoder_depth=1)
    return convert.ours_to_reference(model.state_dict())


def save_model_like_the_reference(path, args):
    """What the reference DeepMIM's / MAE's ``misc.save_model`` writes: a real argparse.Namespace inside."""
    sd = reference_state_dict()
    params = [torch.nn.Parameter(v.clone()) for v in sd.values() if v.dtype.is_floating_point]
    optimizer = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95))
    torch.save({"model": sd, "optimizer": optimizer.state_dict(), "epoch": 3,
                "scaler": torch.amp.GradScaler("cpu").state_dict(), "args": args}, path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    marker = root / "code_ran"
    evil = root / "evil.pth"
    torch.save({"model": reference_state_dict(), "epoch": 3, "args": RunsCode(str(marker))}, evil)
    return {"reference": save_model_like_the_reference(root / "checkpoint-3.pth", mae_args(str(root))),
            "evil": evil, "marker": marker}


def entry_points(small_folder, tmp_path):
    """name -> run(checkpoint): every place that takes a checkpoint, run as a user would."""
    def main(module, *argv):
        return module.main(module.get_args_parser().parse_args([str(a) for a in argv]))

    def auto_resume(ckpt):
        out = tmp_path / "auto"
        out.mkdir(exist_ok=True)
        shutil.copy(ckpt, out / "checkpoint-3.pth")  # found in the output folder by itself
        return main(main_pretrain, *PRETRAIN, "--epochs", 5, "--data_path", small_folder, "--output_dir", out)

    return {
        "finetune --finetune": lambda c: main(main_finetune, *FINETUNE, "--data_path", small_folder, "--finetune", c,
                                              "--output_dir", tmp_path / "ft"),
        "linprobe --finetune": lambda c: main(main_linprobe, *FINETUNE[:8], "--epochs", 1, "--num_workers", 0,
                                              "--data_path", small_folder, "--finetune", c, "--output_dir",
                                              tmp_path / "lp"),
        "pretrain --resume": lambda c: main(main_pretrain, *PRETRAIN, "--epochs", 5, "--data_path", small_folder,
                                            "--resume", c, "--output_dir", tmp_path / "pt"),
        "pretrain auto-resume": auto_resume,
        "segmentation --finetune": lambda c: main(seg_train, *SEG, "--finetune", c, "--output_dir", tmp_path / "seg"),
        "convert_checkpoint": lambda c: main(convert_checkpoint, c, tmp_path / "ours.pth", "--to", "ours"),
        "visualize": lambda c: visualize.load_pretrained(str(c)),
        "analysis tools (models_vit.from_checkpoint)": lambda c: models_vit.from_checkpoint(str(c)),
        "teacher deepmim:PATH": lambda c: build_targets(TargetConfig(target="teacher", teacher_model=f"deepmim:{c}"),
                                                        (4, 4), 16, 4, 4),
    }


ENTRY_POINTS = ["finetune --finetune", "linprobe --finetune", "pretrain --resume", "pretrain auto-resume",
                "segmentation --finetune", "convert_checkpoint", "visualize",
                "analysis tools (models_vit.from_checkpoint)", "teacher deepmim:PATH"]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_a_checkpoint_written_like_the_reference_save_model_loads_everywhere(entry, files, small_folder, tmp_path):
    entry_points(small_folder, tmp_path)[entry](files["reference"])
    if entry.startswith("pretrain"):  # resumed after the stored epoch 3: trained epoch 4 only
        out = tmp_path / ("pt" if entry == "pretrain --resume" else "auto")
        assert torch.load(out / "checkpoint-last.pth", weights_only=True)["epoch"] == 4


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_a_checkpoint_that_would_run_code_is_refused_everywhere_without_running_it(entry, files, small_folder,
                                                                                   tmp_path):
    run = entry_points(small_folder, tmp_path)[entry]
    if entry == "pretrain auto-resume":  # found in the output folder: skipped, saying why; training starts afresh
        run(files["evil"])
        log = (tmp_path / "auto" / "train.log").read_text()
        assert "skipping checkpoint" in log and "posix.system" in log
        assert torch.load(tmp_path / "auto" / "checkpoint-0.pth", weights_only=True)["epoch"] == 0
    else:
        with pytest.raises(UserError, match=r"unpickling it would import and call posix.system, i.e. run code") as err:
            run(files["evil"])
        assert "\x1b" not in str(err.value)
    assert not files["marker"].exists()


def test_a_torchscript_clip_whose_setstate_has_a_side_effect_is_refused_without_it(small_folder, tmp_path):
    import warnings

    marker = tmp_path / "created_by_setstate"
    path = tmp_path / "ViT-B-16.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(CarriesPayload(str(marker))).save(str(path))
    with pytest.raises(UserError, match="__setstate__"):
        main_pretrain.main(main_pretrain.get_args_parser().parse_args(
            [*PRETRAIN, "--epochs", "1", "--data_path", str(small_folder), "--clip_path", str(path), "--output_dir",
             str(tmp_path / "o")]))
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# evaluation: the model the checkpoint holds, its head


@pytest.fixture(scope="module")
def mae_finetuned(tmp_path_factory):
    """A fine-tuned ViT saved as MAE releases them: ``{'model': ...}`` only (fc_norm + a 10-class head)."""
    torch.manual_seed(3)
    model = models_vit.create_model("vit_tiny_patch4", num_classes=10, img_size=16)
    torch.nn.init.normal_(model.head.weight, std=0.5)  # a head that is far from MAE's re-initialisation
    path = tmp_path_factory.mktemp("mae_ft") / "mae_finetuned_vit_tiny.pth"
    torch.save({"model": model.state_dict()}, path)
    return path, model


def accuracy_in_process(model, data_path):
    _, val, _ = classification_datasets(str(data_path), None, eval_transform(16), need_train=False)
    return evaluate(model, eval_loader(val, 16, 0, 1, 0, False), torch.device("cpu"), None, reduce=False)


def test_mae_s_eval_command_on_a_model_only_file_evaluates_the_saved_head(mae_finetuned, small_folder, tmp_path):
    path, model = mae_finetuned
    expected = accuracy_in_process(model, small_folder)
    common = ["--device", "cpu", "--data_path", str(small_folder), "--batch_size", "16", "--num_workers", "0",
              "--output_dir", str(tmp_path)]
    # MAE's FINETUNE.md: --eval --resume FILE --model NAME
    resumed = main_finetune.main(main_finetune.get_args_parser().parse_args(
        ["--eval", "--resume", str(path), "--model", "vit_tiny_patch4", *common]))
    # nothing but the file: its model, input size, pooling and classes come from the weights
    finetuned = main_finetune.main(main_finetune.get_args_parser().parse_args(["--eval", "--finetune", str(path),
                                                                                 *common]))
    assert resumed["acc1"] == pytest.approx(expected["acc1"], abs=1e-9) and resumed["count"] == 40
    assert finetuned["acc1"] == pytest.approx(expected["acc1"], abs=1e-9)
    assert resumed["loss"] == pytest.approx(expected["loss"], rel=1e-6)


def test_eval_takes_the_input_size_of_the_checkpoint_and_refuses_a_contradicting_one(mae_finetuned, small_folder,
                                                                                     tmp_path):
    path, model = mae_finetuned
    common = ["--eval", "--resume", str(path), "--device", "cpu", "--data_path", str(small_folder), "--batch_size",
              "16", "--num_workers", "0", "--output_dir", str(tmp_path)]
    stats = main_finetune.main(main_finetune.get_args_parser().parse_args(common))  # 16 px, read off pos_embed
    assert stats["acc1"] == pytest.approx(accuracy_in_process(model, small_folder)["acc1"], abs=1e-9)
    with pytest.raises(UserError, match=r"--input_size 32 contradicts .*mae_finetuned_vit_tiny.pth, which holds 16"):
        main_finetune.main(main_finetune.get_args_parser().parse_args([*common, "--input_size", "32"]))
    with pytest.raises(UserError, match=r"--model vit_small_patch16 contradicts .*, which holds vit_tiny_patch4"):
        main_finetune.main(main_finetune.get_args_parser().parse_args([*common, "--model", "vit_small_patch16"]))


def test_a_state_dict_mismatch_names_every_key_and_shape(files, tmp_path, small_folder):
    with pytest.raises(UserError) as err:  # a 4-layer checkpoint resumed by the 12-layer model: nothing cut
        sd = reference_state_dict()
        convert.load_model_state(models_deepmim.create_model("deepmim_vit_tiny_patch4", img_size=32, decoder_depth=1),
                                 sd, "file.pth")
    msg = str(err.value)
    assert "pos_embed has shape (1, 17, 192) but the model expects (1, 65, 192)" in msg
    assert "decoder_pos_embed has shape (1, 17, 128) but the model expects (1, 65, 128)" in msg
    assert "..." not in msg


def test_finetune_by_published_name_downloads_once_and_then_works_offline(files, small_folder, tmp_path, server, cache):
    shutil.copy(files["reference"], server.root / "deepmim_tiny.pth")
    hub.register(hub.Published("deepmim_tiny", f"{server.base}/deepmim_tiny.pth", "reference", "pretrain",
                               "deepmim_vit_tiny_patch4"))
    try:
        argv = [*FINETUNE, "--data_path", str(small_folder), "--finetune", "deepmim_tiny"]
        main_finetune.main(main_finetune.get_args_parser().parse_args([*argv, "--output_dir", str(tmp_path / "a")]))
        server.shutdown()
        server.server_close()
        main_finetune.main(main_finetune.get_args_parser().parse_args([*argv, "--output_dir", str(tmp_path / "b")]))
        assert server.requests == ["/deepmim_tiny.pth"] and (cache / "deepmim_tiny.pth").exists()
        with pytest.raises(UserError, match=r"'deepmim_tinyy' is neither a file nor a known checkpoint name. Known "
                                            r"names: .*deepmim_tiny, mae_finetuned_vit_base"):
            models_vit.from_checkpoint("deepmim_tinyy")
    finally:
        hub.PUBLISHED.pop("deepmim_tiny")
