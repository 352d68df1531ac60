"""Every flag of every script checked before anything is built or written, one ``error:`` line and
exit 2 for each mistake, and a ``--help`` that shows every default (issues 13 and 17)."""
import argparse
import shlex

from util.config import cli
from util.config.typed import RunConfig
from util.data.datasets import check_folders
from util.run.errors import UserError, run_cli
from util.run.runner import start_run

import pytest
import torch
from conftest import NO_MONITORS, run_script

import main_finetune
import main_linprobe
import main_pretrain
from engine_finetune import ClassifyConfig
from Segmentation import convert_mmseg, make_synthetic
from Segmentation import demo as seg_demo
from Segmentation import models as seg_models
from Segmentation import train as seg_train
from tools import (
    attention_analysis,
    benchmark,
    compare_logs,
    convert_checkpoint,
    linear_eval,
    probe_layers,
    run_experiments,
    visualize,
)
from tools import demo as demo_tool

TINY = ["--model", "deepmim_vit_tiny_patch4", "--device", "cpu", "--num_workers", "0", *NO_MONITORS]
TINY_SEG = ["--model", "vit_tiny_patch4", "--out_indices", "1,2,3,4", "--channels", "16", "--aux_channels", "8",
            "--device", "cpu", "--num_workers", "0"]

PARSERS = {  # every script with flags: main_*, Segmentation/*, tools/* and the demos
    "main_pretrain.py": main_pretrain.get_args_parser, "main_finetune.py": main_finetune.get_args_parser,
    "main_linprobe.py": main_linprobe.get_args_parser, "Segmentation/train.py": seg_train.get_args_parser,
    "Segmentation/convert_mmseg.py": convert_mmseg.get_args_parser,
    "Segmentation/make_synthetic.py": make_synthetic.get_args_parser, "Segmentation/demo.py": seg_demo.get_args_parser,
    "tools/demo.py": demo_tool.get_args_parser, "tools/convert_checkpoint.py": convert_checkpoint.get_args_parser,
    "tools/probe_layers.py": probe_layers.get_args_parser, "tools/visualize.py": visualize.get_args_parser,
    "tools/attention_analysis.py": attention_analysis.get_args_parser,
    "tools/run_experiments.py": run_experiments.get_args_parser, "tools/benchmark.py": benchmark.get_args_parser,
    "tools/linear_eval.py": linear_eval.get_args_parser, "tools/compare_logs.py": compare_logs.get_args_parser,
}


def parse_error(parser: argparse.ArgumentParser, argv, capsys) -> str:
    """The one stderr line of a refused command line (asserting exit status 2 and a single line)."""
    with pytest.raises(SystemExit) as exc:
        parser.parse_args([*map(str, argv)])
    assert exc.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def cli_error(main, parser: argparse.ArgumentParser, argv, capsys) -> str:
    """Parse (must succeed) and run ``main`` the way the scripts do (``run_cli``): the one stderr line."""
    args = parser.parse_args([*map(str, argv)])
    with pytest.raises(SystemExit) as exc:
        run_cli(main, args)
    assert exc.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


# --------------------------------------------------------------------------------------------
# per-flag ranges: refused while parsing, with the flag, the value and the valid range


@pytest.mark.parametrize("argv, message", [
    (["--batch_size", "0"], "error: --batch_size 0: must be an integer >= 1"),
    (["--accum_iter", "0"], "error: --accum_iter 0: must be an integer >= 1"),
    (["--log_every", "0"], "error: --log_every 0: must be an integer >= 1"),
    (["--save_every", "0"], "error: --save_every 0: must be an integer >= 1"),
    (["--blr", "-1"], "error: --blr -1: must be a number > 0"),
    (["--lr", "nan"], "error: --lr nan: must be a number > 0"),
    (["--seed", "-1"], "error: --seed -1: must be an integer in 0..4294967295 (numpy takes 32-bit seeds)"),
    (["--seed", str(2**32)], "error: --seed 4294967296: must be an integer in 0..4294967295"),
    (["--num_workers", "-1"], "error: --num_workers -1: must be an integer >= 0"),
    (["--epochs", "0"], "error: --epochs 0: must be an integer >= 1"),
    (["--warmup_epochs", "-1"], "error: --warmup_epochs -1: must be a number >= 0"),
    (["--mask_ratio", "1.0"], "error: --mask_ratio 1.0: must be a number in (0, 1) (the fraction of patches removed"),
    (["--mask_ratio", "1.5"], "error: --mask_ratio 1.5: must be a number in (0, 1)"),
    (["--mask_ratio", "0"], "error: --mask_ratio 0: must be a number in (0, 1) (the fraction of patches removed: 0 "
                            "would mask no patch"),
    (["--ds_weights", "1,-1,1,1"], "error: --ds_weights 1,-1,1,1: -1 is not a number >= 0"),
    (["--ds_weights", "0,0,0,0"], "error: --ds_weights 0,0,0,0: at least one weight must be > 0"),
    (["--ds_layers", "6,0,12"], "error: --ds_layers 6,0,12: 0 is not an integer >= 1"),
    (["--ds_layers", "8,6,12"], "error: --ds_layers 8,6,12: values must be increasing and distinct"),
    (["--decoder_num_heads", "0"], "error: --decoder_num_heads 0: must be an integer >= 1"),
    (["--weight_decay", "-0.1"], "error: --weight_decay -0.1: must be a number >= 0"),
    (["--clip_grad", "-1"], "error: --clip_grad -1: must be a number >= 0"),
    (["--dist_port", "70000"], "error: --dist_port 70000: must be an integer in 1..65535"),
    (["--local_rank", "-2"], "error: --local_rank/--local-rank -2: must be an integer >= -1"),
    (["--amp", "fp8"], "error: --amp 'fp8': invalid choice; choose from auto, bf16, fp16, none"),
    (["--batch_size", "many"], "error: --batch_size many: must be an integer >= 1"),
    (["--no_such_flag"], "error: unrecognized arguments: --no_such_flag (main_pretrain.py --help lists the flags)"),
])
def test_pretrain_flag_ranges(argv, message, capsys):
    assert parse_error(main_pretrain.get_args_parser(), argv, capsys).startswith(message)


@pytest.mark.parametrize("argv, message", [
    (["--crop_scale", "0.9", "0.5"], "error: --crop_scale 0.9 0.5: MIN must be <= MAX"),
    (["--crop_scale", "0", "1"], "error: --crop_scale 0: must be a number in (0, 1]"),
    (["--cutmix_minmax", "0.5"], "error: --cutmix_minmax 0.5: give two values, MIN MAX"),
    (["--cutmix_minmax", "0.5", "0.5"], "error: --cutmix_minmax 0.5 0.5: MIN must be < MAX"),
    (["--hflip", "2"], "error: --hflip 2: must be a number in [0, 1]"),
    (["--drop_path", "1"], "error: --drop_path 1: must be a number in [0, 1)"),
    (["--layer_decay", "0"], "error: --layer_decay 0: must be a number in (0, 1]"),
    (["--smoothing", "1"], "error: --smoothing 1: must be a number in [0, 1)"),
    (["--mixup_mode", "half"], "error: --mixup_mode 'half': invalid choice; choose from batch, pair, elem"),
    (["--finetune_sha256", "not-hex"], "error: --finetune_sha256 not-hex: must be a sha256 hex digest"),
    (["--nb_classes", "0"], "error: --nb_classes 0: must be an integer >= 1"),
])
def test_finetune_flag_ranges(argv, message, capsys):
    assert parse_error(main_finetune.get_args_parser(), argv, capsys).startswith(message)


@pytest.mark.parametrize("argv, message", [
    (["--stride", "0"], "error: --stride 0: must be an integer >= 1"),
    (["--iters", "0"], "error: --iters 0: must be an integer >= 1"),
    (["--save_every", "0"], "error: --save_every 0: must be an integer >= 1"),
    (["--crops_per_batch", "0"], "error: --crops_per_batch 0: must be an integer >= 1"),
    (["--img_scale", "2048", "0"], "error: --img_scale 0: must be an integer >= 1"),
    (["--ratio_range", "2", "0.5"], "error: --ratio_range 2.0 0.5: MIN must be <= MAX"),
    (["--aug_ratios", "1,0,2"], "error: --aug_ratios 1,0,2: 0 is not a number > 0"),
    (["--out_indices", ""], "error: --out_indices '': give at least one value (comma-separated)"),
    (["--cat_max_ratio", "0"], "error: --cat_max_ratio 0: must be a number in (0, 1]"),
])
def test_segmentation_flag_ranges(argv, message, capsys):
    assert parse_error(seg_train.get_args_parser(), argv, capsys).startswith(message)


def test_tool_flags_and_the_benchmark_use_the_same_checks(capsys):
    assert parse_error(benchmark.get_args_parser(), ["--steps", "0"], capsys) == \
        "error: --steps 0: must be an integer >= 1"
    assert parse_error(make_synthetic.get_args_parser(), ["--out", "x", "--n_val", "0"], capsys) == \
        "error: --n_val 0: must be an integer >= 1"
    assert parse_error(visualize.get_args_parser(), ["ckpt", "--mask_ratio", "1"], capsys).startswith(
        "error: --mask_ratio 1: must be a number in (0, 1)")
    assert parse_error(convert_mmseg.get_args_parser(), ["a", "b"], capsys) == \
        "error: the following arguments are required: --to"
    with pytest.raises(SystemExit, match="--compare needs at least one setting") as exc:
        benchmark.parse_cli(["--compare", "--steps", "3"])
    assert exc.value.code == 2


def test_list_and_range_validators():
    assert cli.str2list(cli.positive_int, cli.increasing)("6,8 10,12") == [6, 8, 10, 12]
    assert cli.str2list(cli.nonneg_float, cli.positive_sum)("0,1") == [0.0, 1.0]
    assert cli.ranged(float, 0, 1, hi_open=True)("0") == 0.0
    for bad in ("1", "inf", "-inf", "nan", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match=f"{bad}: must be a number in \\[0, 1\\)"):
            cli.rate(bad)


# --------------------------------------------------------------------------------------------
# cross-flag checks: before start_run, so the output folder is never created


@pytest.mark.parametrize("argv, message", [
    (["--mask_ratio", "0.99"], "error: --mask_ratio 0.99 keeps 0 of the 64 patches of the 8x8 patch grid of "
                               "deepmim_vit_tiny_patch4 at 32 px: no patch would stay visible. Use 0 < --mask_ratio "
                               "<= 0.984 (MAE: 0.75)."),
    (["--mask_ratio", "0.95", "--input_size", "16"], "error: --mask_ratio 0.95 keeps 0 of the 16 patches of the 4x4 "
                                                     "patch grid of deepmim_vit_tiny_patch4 at 16 px"),
    (["--input_size", "4"], "error: --input_size 4 gives deepmim_vit_tiny_patch4 a 1x1 patch grid: masking needs at "
                            "least 2 patches"),
    (["--decoder_num_heads", "5"], "error: --decoder_num_heads 5 does not divide --decoder_embed_dim 128: each head "
                                   "takes width / heads channels. Use one of 1, 2, 4, 8, 16, 32, 64."),
    (["--decoder_embed_dim", "100", "--decoder_num_heads", "16"], "error: --decoder_num_heads 16 does not divide "
                                                                  "--decoder_embed_dim 100"),
    (["--input_size", "18"], "error: --input_size 18 is not a multiple of the patch size 4. Use e.g. --input_size 16 "
                             "or 20."),
    (["--ds_layers", "6,8"], "error: --ds_layers must include the last layer (12)"),
    (["--ds_targets", "pixel,clip"], "error: --ds_targets names 2 target(s) but there are 4 supervised layers"),
    (["--model", "vit_gigantic"], "error: Unknown pre-training model 'vit_gigantic'. Valid names:"),
    (["--start_epoch", "3", "--epochs", "3"], "error: --start_epoch 3 is not below --epochs 3: nothing would be "
                                              "trained. Use --start_epoch 0..2"),
    (["--data_path", "{tmp}/nowhere"], "error: training folder '{tmp}/nowhere/train' does not exist. --data_path must "
                                       "contain train/<class>/<image> (the ImageNet layout)"),
])
def test_pretrain_cross_flag_errors_write_nothing(argv, message, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    line = cli_error(main_pretrain.main, main_pretrain.get_args_parser(), [*TINY, "--output_dir", out, *argv], capsys)
    assert line.startswith(message.replace("{tmp}", str(tmp_path)))
    assert not out.exists()


def test_a_refused_rerun_leaves_an_existing_output_folder_as_it_was(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "log.txt").write_text('{"epoch": 0}\n')
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    cli_error(main_pretrain.main, main_pretrain.get_args_parser(),
              [*TINY, "--output_dir", out, "--decoder_num_heads", "3"], capsys)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


@pytest.mark.parametrize("script, argv, message", [
    (main_finetune, ["--aa", "rand-x9"], "error: --aa 'rand-x9': timm cannot build this augmentation (Unknown "
                                         "RandAugment config section). Use a RandAugment policy such as"),
    (main_finetune, ["--model", "vit_gigantic"], "error: Unknown fine-tuning model 'vit_gigantic'."),
    (main_finetune, ["--eval", "--data_path", "{tmp}/nowhere"], "error: validation folder '{tmp}/nowhere/val' does "
                                                                "not exist. --data_path must contain val/<class>/"),
    (main_linprobe, ["--finetune", "x.pth", "--probe_layer", "13"], "error: --probe_layer 13 is outside 1..12 for "
                                                                    "vit_tiny_patch4."),
    (main_linprobe, [], "error: Linear probing needs pre-trained weights: pass --finetune CHECKPOINT."),
    (main_linprobe, ["--finetune", "x.pth", "--epochs", "2", "--start_epoch", "2"], "error: --start_epoch 2 is not "
                                                                                   "below --epochs 2"),
])
def test_classification_cross_flag_errors_write_nothing(script, argv, message, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    line = cli_error(script.main, script.get_args_parser(),
                     ["--model", "vit_tiny_patch4", "--device", "cpu", "--output_dir", out, *argv], capsys)
    assert line.startswith(message.replace("{tmp}", str(tmp_path)))
    assert not out.exists()


@pytest.mark.parametrize("argv, message", [
    (["--crop_size", "32"], "error: --stride 341 is larger than --crop_size 32: sliding windows 32 px wide every "
                            "341 px would leave pixels uncovered. Use --stride 21 (2/3 of the crop, as the reference's "
                            "341 for 512), or any value in 1..32."),
    (["--crop_size", "64", "--stride", "65", "--eval"], "error: --stride 65 is larger than --crop_size 64"),
    (["--crop_size", "30", "--stride", "20"], "error: --crop_size 30: the crop must be a multiple of "
                                              "vit_tiny_patch4's patch size 4 and at least 32 pixels (the coarsest "
                                              "feature stride). Use e.g. --crop_size 32."),
    (["--crop_size", "16", "--stride", "8"], "error: --crop_size 16: the crop must be a multiple"),
    (["--crop_size", "32", "--stride", "21", "--aug_test", "--aug_ratios", "0.5,0.0001"],
     "error: --img_scale 2048 512 at ratio 0.0001 resizes images to a 0-pixel short edge. Use a larger --img_scale or "
     "larger ratios"),
    (["--crop_size", "32", "--stride", "21", "--img_scale", "128", "1", "--ratio_range", "0.5", "2"],
     "error: --img_scale 128 1 at ratio 0.5 resizes images to a 0-pixel short edge"),
    (["--crop_size", "32", "--stride", "21", "--out_indices", "1,2,3,13"], "error: --out_indices 1,2,3,13: give 4 "
                                                                           "increasing block numbers in 1..12"),
    (["--crop_size", "32", "--stride", "21", "--model", "vit_gigantic"], "error: Unknown fine-tuning model "
                                                                         "'vit_gigantic'"),
    (["--crop_size", "32", "--stride", "21", "--data_path", "{tmp}/nowhere"], "error: {tmp}/nowhere/images/training "
                                                                              "does not exist. --data_path must be an "
                                                                              "ADEChallengeData2016 folder"),
])
def test_segmentation_inference_and_model_errors_write_nothing(argv, message, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    line = cli_error(seg_train.main, seg_train.get_args_parser(),
                     [*TINY_SEG, "--data_path", "synthetic", "--output_dir", out, *argv], capsys)
    assert line.startswith(message.replace("{tmp}", str(tmp_path)))
    assert not out.exists()


def test_valid_edges_pass_and_a_long_warm_up_is_only_a_warning(tmp_path):
    def pretrain_checks(*argv):
        return main_pretrain.PretrainConfig.from_args(main_pretrain.get_args_parser().parse_args([*TINY, *argv])).validate()

    for argv in (["--mask_ratio", "0.984"], ["--mask_ratio", "0.001"], ["--ds_weights", "0,0,0,1"],
                 ["--decoder_num_heads", "8"], ["--input_size", "8"], ["--epochs", "5", "--warmup_epochs", "5"]):
        assert pretrain_checks(*argv) == [], argv
    assert pretrain_checks("--epochs", "2") == [
        "--warmup_epochs 40 exceeds --epochs 2: the learning rate stays in its linear warm-up and ends at 5% of its peak"]

    def seg_checks(*argv):
        args = seg_train.get_args_parser().parse_args([*TINY_SEG, "--data_path", "synthetic", *argv])
        return seg_train.SegmentationConfig.from_args(args).validate()

    assert seg_checks("--crop_size", "32", "--stride", "32") == []
    assert seg_checks("--crop_size", "32", "--stride", "21", "--iters", "10") == [
        "--warmup_iters 1500 exceeds --iters 10: the learning rate stays in its linear warm-up"]
    with start_run(RunConfig(output_dir=str(tmp_path), device="cpu"), ["a warning of the checks"]):
        pass
    assert "a warning of the checks" in (tmp_path / "train.log").read_text()  # logged once logging is set up


def test_the_missing_folder_message_names_the_folder_that_is_missing(tmp_path):
    with pytest.raises(UserError) as err:
        check_folders(str(tmp_path), ["train"])
    assert "must contain train/<class>/<image>" in str(err.value) and "training/<class>" not in str(err.value)
    (tmp_path / "train").mkdir()
    check_folders(str(tmp_path), ["train"])  # there now
    check_folders("digits", ["train", "val"])  # the built-in data is written on first use: never refused


def test_the_demo_recipes_pass_every_check():
    pre = main_pretrain.PretrainConfig.from_args(main_pretrain.get_args_parser().parse_args(demo_tool.PRETRAIN))
    assert pre.validate() == []
    ft = ClassifyConfig.from_args(main_finetune.get_args_parser().parse_args(
        [*demo_tool.FINETUNE, "--finetune", "pretrain/checkpoint-last.pth"]))
    assert ft.validate(timm_augment=True) == []
    seg = seg_train.SegmentationConfig.from_args(seg_train.get_args_parser().parse_args(seg_demo.RECIPE))
    assert seg.validate() == []


# --------------------------------------------------------------------------------------------
# what the scripts print: one error line from a real process, --help with every default


def test_a_real_process_prints_one_error_line_exits_2_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    proc = run_script("main_pretrain.py", "--batch_size", "0", "--output_dir", out, check=False)
    assert proc.returncode == 2, proc.stderr
    assert [ln for ln in proc.stderr.splitlines() if ln.strip()] == [proc.stderr.strip()]  # no warning, no traceback
    assert proc.stderr.startswith("error: --batch_size 0: must be an integer >= 1") and not proc.stdout
    assert not out.exists()
    # a check after parsing (a cross-flag one), through the same exit path (run_cli) in this process
    line = cli_error(seg_train.main, seg_train.get_args_parser(),
                     [*TINY_SEG, "--data_path", "synthetic", "--crop_size", "32", "--output_dir", out], capsys)
    assert line.startswith("error: --stride 341 is larger than --crop_size 32") and not out.exists()


@pytest.mark.parametrize("script", sorted(PARSERS))
def test_every_flag_has_help_and_shows_its_default(script):
    parser = PARSERS[script]()
    assert isinstance(parser, cli.Parser) and parser.prog == script
    formatter, shown = parser._get_formatter(), 0
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and action.help.strip(), f"{script} {action.option_strings or action.dest} has no help"
        if action.option_strings and action.nargs != 0 and not action.required:
            # the formatter adds "(default: X)", or the help says the default in words
            assert "default" in formatter._get_help_string(action).lower(), (script, action.option_strings)
            shown += action.default is not None
    assert " ".join(parser.format_help().split()).count("(default: ") >= shown  # unwrapped


def test_help_texts_groups_and_defaults_read_right():
    def text(parser):  # --help with its line wrapping undone
        return " ".join(parser.format_help().split())

    pre = text(main_pretrain.get_args_parser())
    assert "--batch_size N batch size per GPU (effective batch = batch_size * accum_iter * processes) (default: 64)" in pre
    assert "--epochs N training epochs (default: 400)" in pre
    assert "--mask_ratio R" in pre and "(default: 0.75)" in pre

    def groups(parser):
        return {a.dest: g.title for g in parser._action_groups for a in g._group_actions}

    for parser in (main_finetune.get_args_parser(), seg_train.get_args_parser(), main_pretrain.get_args_parser()):
        where = groups(parser)
        assert where["clip_grad"] == where["weight_decay"] == "optimizer and schedule"
        assert where["batch_size"] == "training"
    assert groups(main_finetune.get_args_parser())["layer_decay"] == "optimizer and schedule"
    assert groups(main_finetune.get_args_parser())["crop_scale"] == "augmentation"
    assert groups(seg_train.get_args_parser())["save_every"] == "output and checkpoints"

    def help_of(parser, dest):
        return next(a.help for a in parser._actions if a.dest == dest)

    assert "teacher" not in help_of(seg_train.get_args_parser(), "compile")
    assert "target network" in help_of(main_pretrain.get_args_parser(), "compile")
    seg = text(seg_train.get_args_parser())
    assert "(default: 2048 512)" in seg and "(default: 0.5,0.75,1.0,1.25,1.5,1.75)" in seg
    assert "--eval_every N iterations between evaluations (0: only at the end) (default: 16000)" in seg
    assert "average-pool the patch tokens (the default)" in text(main_finetune.get_args_parser())
    assert "use the cls token (the default)" in text(main_linprobe.get_args_parser())


# --------------------------------------------------------------------------------------------
# convert_mmseg's printed command runs


def test_convert_mmseg_prints_an_evaluation_command_that_runs(tmp_path, capsys):
    cfg = seg_models.SegConfig(model="vit_tiny_patch4", img_size=32, num_classes=5, out_indices=(1, 2, 3, 4),
                               channels=16, aux_channels=8)
    torch.manual_seed(0)
    model = seg_models.Segmentor(cfg).eval()
    exported = convert_mmseg.to_mmseg({"model": model.state_dict(), "model_cfg": model.cfg.to_dict(),
                                       "args": {"stride": 16}})
    assert "stride=(16, 16)" in exported["meta"]["config"]

    def import_command(meta):
        torch.save({"meta": meta, "state_dict": exported["state_dict"]}, tmp_path / "mmseg.pth")
        convert_mmseg.main(argparse.Namespace(src=str(tmp_path / "mmseg.pth"), dst=str(tmp_path / "ours.pth"),
                                              to="ours"))
        return capsys.readouterr().out.splitlines()[-1].strip()

    assert "--crop_size 32 --stride 16 " in import_command(exported["meta"])  # the config's test stride
    # a config whose stride does not fit the crop (the 512 px reference's 341): the reference's rule, 2/3 of the crop
    meta = {**exported["meta"], "config": exported["meta"]["config"].replace("stride=(16, 16)", "stride=(341, 341)")}
    command = import_command(meta)
    assert command.startswith("python Segmentation/train.py --eval --resume") and "--stride 21 " in command
    argv = shlex.split(command)[2:]
    argv[argv.index("--data_path") + 1] = str(make_synthetic.build(tmp_path / "data", sizes={"training": 1,
                                                                                             "validation": 2}))
    stats = seg_train.main(seg_train.get_args_parser().parse_args(
        [*argv, "--device", "cpu", "--num_workers", "0", "--output_dir", str(tmp_path / "eval"),
         "--img_scale", "64", "48"]))  # the images' own size: ADE20K's 512 px test scale means hundreds of windows
    assert stats["images"] == 2 and 0 <= stats["aAcc"] <= 100
