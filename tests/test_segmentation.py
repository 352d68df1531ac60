"""Semantic segmentation (Segmentation/): the metric, inference, the training pipeline, training and
evaluation on the synthetic data, resume, checkpoint loading and the mmseg export / import."""
import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys

from util.checkpoints import convert
from util.checkpoints.pos_embed import resize_pos_embed
from util.run.errors import UserError
from util.run.lr_sched import poly_lr_at
from util.run.optim import layer_decay_groups

import numpy as np
import pytest
import torch
from conftest import ROOT, clean_env, free_port

import models_deepmim
from Segmentation import convert_mmseg, data, inference, metrics, models, train
from Segmentation.make_synthetic import build as build_synthetic

# ViT-Ti/4 cut to its first 4 blocks (the backbone drops blocks after the last out index), narrow heads
TINY = models.SegConfig(model="vit_tiny_patch4", img_size=32, num_classes=5, out_indices=(1, 2, 3, 4), channels=16,
                        aux_channels=8)
TINY_FLAGS = ["--model", "vit_tiny_patch4", "--out_indices", "1,2,3,4", "--channels", "16", "--aux_channels", "8",
              "--crop_size", "32", "--img_scale", "128", "32", "--stride", "21", "--device", "cpu", "--amp", "none",
              "--num_workers", "0", "--batch_size", "4", "--drop_path", "0", "--lr", "1e-3", "--layer_decay", "1.0",
              "--warmup_iters", "2"]


def segment(*args):
    return train.main(train.get_args_parser().parse_args([*map(str, args)]))


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    """The synthetic ADE20K-layout data, small: 24 training and 6 validation images, 5 classes."""
    return build_synthetic(tmp_path_factory.mktemp("seg") / "synthetic", sizes={"training": 24, "validation": 6})


# --------------------------------------------------------------------------------------------
# metric


def test_metric_equals_a_hand_computation():
    """Two images; raw ADE20K annotations (0 = unlabelled) reduced; class 3 is absent from both the
    prediction and the ground truth once the ignored pixels are left out (it is predicted only on an
    ignored pixel), class 4 is only predicted."""
    ann_a = np.array([[1, 1, 2, 0], [2, 2, 3, 0]], np.uint8)
    pred_a = torch.tensor([[0, 1, 1, 3], [1, 4, 2, 0]])
    ann_b = np.array([[3, 3, 3], [1, 0, 0]], np.uint8)
    pred_b = torch.tensor([[2, 2, 0], [0, 3, 3]])
    lbl_a = torch.from_numpy(data.reduce_zero_label(ann_a)).long()
    assert lbl_a.tolist() == [[0, 0, 1, 255], [1, 1, 2, 255]]
    areas = metrics.intersect_and_union(pred_a, lbl_a, 5) + metrics.intersect_and_union(
        pred_b, torch.from_numpy(data.reduce_zero_label(ann_b)).long(), 5)
    # by hand, summed over both images: intersection 2 2 3 0 0, prediction 3 3 3 0 1, label 3 3 4 0 0
    assert areas.tolist() == [[2, 2, 3, 0, 0], [4, 4, 4, 0, 1], [3, 3, 3, 0, 1], [3, 3, 4, 0, 0]]
    stats = metrics.summarize(areas)
    iou, acc = stats["IoU"], stats["Acc"]
    assert iou[:3] == pytest.approx([50.0, 50.0, 75.0]) and math.isnan(iou[3]) and iou[4] == 0.0
    assert acc[:3] == pytest.approx([200 / 3, 200 / 3, 75.0]) and math.isnan(acc[3]) and math.isnan(acc[4])
    assert stats["mIoU"] == pytest.approx((50 + 50 + 75 + 0) / 4)  # NaN left out, the 0 kept
    assert stats["mAcc"] == pytest.approx((200 / 3 + 200 / 3 + 75) / 3)
    assert stats["aAcc"] == pytest.approx(100 * 7 / 10)
    table = metrics.format_table(stats, ["a", "b", "c", "d", "e"])
    assert "| d     | nan   | nan   |" in table and "| global | 43.75 | 69.44 | 70.00 |" in table


# --------------------------------------------------------------------------------------------
# inference


@pytest.mark.parametrize("h, w", [(45, 70), (20, 25), (32, 32), (64, 97)])
def test_sliding_window_covers_every_pixel_and_equals_whole_image_for_a_1x1_conv(h, w):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, 1)
    img = torch.randn(2, 3, h, w)
    with torch.no_grad():
        slide, count = inference.slide_inference(conv, img, 5, crop=32, stride=21, crops_per_batch=3)
        whole = inference.whole_inference(conv, img)
    assert count.shape == (1, 1, h, w) and count.min() >= 1
    torch.testing.assert_close(slide, whole, atol=1e-5, rtol=1e-5)
    # flip test-time augmentation of a flip-equivariant model changes nothing (the flip is undone)
    cfg = inference.InferenceConfig(num_classes=5, crop=32, stride=21, img_scale=(10 * w, h))
    flipped = inference.predict(conv, img, inference.InferenceConfig(**{**cfg.__dict__, "flip": True}))
    torch.testing.assert_close(flipped, inference.predict(conv, img, cfg), atol=1e-5, rtol=1e-5)


def test_windows_follow_mmseg_grid():
    assert inference.windows(512, 683, 512, 341) == [(0, 512, 0, 512), (0, 512, 171, 683)]
    assert inference.windows(20, 25, 32, 21) == [(0, 20, 0, 25)]


# --------------------------------------------------------------------------------------------
# training pipeline


def _label_image(h: int = 60, w: int = 90):
    """Blocks of 10 classes in an asymmetric pattern (plus some ignored pixels) and an image whose
    colour tells the label of each pixel."""
    yy, xx = np.mgrid[0:h, 0:w]
    label = ((xx // 11) + 3 * (yy // 13)) % 10
    label[(yy > 40) & (xx < 20)] = 255
    palette = np.random.RandomState(0).randint(0, 256, (256, 3))
    return palette[label].astype(np.uint8), label.astype(np.uint8), palette


def _decode(img: torch.Tensor, palette: np.ndarray) -> np.ndarray:
    """The label whose palette colour is nearest to each pixel of a normalized image [3, H, W]."""
    rgb = img.permute(1, 2, 0).numpy() * np.array(data.IMG_STD) + np.array(data.IMG_MEAN)
    codes = np.array([*range(10), 255])
    dist = ((rgb[:, :, None, :] - palette[codes][None, None].astype(np.float64)) ** 2).sum(-1)
    return codes[np.argmin(dist, -1)]


def test_training_pipeline_keeps_image_and_label_aligned_and_never_interpolates_labels():
    img, label, palette = _label_image()
    originals = set(np.unique(label).tolist())
    padded_seen = set()
    for seed in range(12):
        flip = float(seed % 2)
        tf = data.TrainTransform(crop_size=48, img_scale=(180, 60), ratio_range=(0.5, 2.0), cat_max_ratio=0.75,
                                 flip_prob=flip, photometric=False)
        np.random.seed(seed)
        out_img, out_lbl = tf(img, label)
        assert out_img.shape == (3, 48, 48) and out_lbl.shape == (48, 48) and out_lbl.dtype == torch.int64
        lbl = out_lbl.numpy()
        assert set(np.unique(lbl).tolist()) <= originals | {255}  # nearest only: no value between two classes
        # padded area: label 255, image 0 (normalized)
        padded = (out_img == 0).all(0).numpy()
        assert (lbl[padded] == 255).all()
        # interior pixels (3x3 neighbourhood of one class): the image colour says the same class
        pad_lbl = np.pad(lbl, 1, mode="edge")
        uniform = np.ones_like(lbl, bool)
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                uniform &= pad_lbl[dy:dy + 48, dx:dx + 48] == lbl
        check = uniform & (lbl != 255) & ~padded
        decoded = _decode(out_img, palette)
        assert check.sum() > 200
        assert (decoded[check] == lbl[check]).all(), f"seed {seed}: image and label disagree"
        padded_seen.add(bool(padded.any()))
    assert padded_seen == {False, True}  # crops of enlarged images and padded crops of shrunk ones were both checked

    # photometric distortion changes colours only: same label, same random geometry
    np.random.seed(3)
    plain = data.TrainTransform(48, (180, 60), photometric=False)(img, label)
    np.random.seed(3)
    coloured = data.TrainTransform(48, (180, 60), photometric=True)(img, label)
    assert torch.equal(plain[1], coloured[1]) and not torch.equal(plain[0], coloured[0])


def test_resize_of_labels_is_nearest_only():
    label = np.array([[0, 8], [8, 0]], np.uint8)
    img = np.zeros((2, 2, 3), np.uint8)
    _, up = data.resize(img, label, (7, 5))
    _, down = data.resize(np.zeros((40, 40, 3), np.uint8), np.kron(label, np.ones((20, 20), np.uint8)), (13, 9))
    assert set(np.unique(up)) == {0, 8} and set(np.unique(down)) == {0, 8}
    assert data.rescale_size(683, 512, (2048, 512)) == (683, 512)
    assert data.rescale_size(3000, 500, (2048, 512)) == (2048, 341)


# --------------------------------------------------------------------------------------------
# training, evaluation, resume


@pytest.fixture(scope="module")
def trained(synthetic, tmp_path_factory):
    out = tmp_path_factory.mktemp("seg_train")
    common = [*TINY_FLAGS, "--data_path", synthetic, "--iters", 12, "--log_every", 3, "--eval_every", 12,
              "--save_every", 8, "--save_last_every", 3]
    stats = segment(*common, "--output_dir", out)
    return out, stats, common


def test_training_lowers_the_loss_and_evaluates(trained):
    out, stats, _ = trained
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    train_log = [e for e in log if e["mode"] == "train"]
    assert [e["iteration"] for e in train_log] == [3, 6, 9, 12]
    assert train_log[-1]["loss"] < train_log[0]["loss"]
    assert train_log[0]["loss"] == pytest.approx(train_log[0]["loss_decode"] + 0.4 * train_log[0]["loss_aux"])
    val = [e for e in log if e["mode"] == "val"]
    assert len(val) == 1 and val[0]["iteration"] == 12 and val[0]["images"] == 6
    assert val[0]["mIoU"] == pytest.approx(stats["mIoU"]) and 0 < stats["mIoU"] <= 100
    assert set(val[0]["IoU"]) == {"background", "disc", "square", "triangle", "ring"}
    assert {p.name for p in out.glob("checkpoint-*.pth")} == {"checkpoint-8.pth", "checkpoint-12.pth",
                                                              "checkpoint-last.pth"}
    ckpt = torch.load(out / "checkpoint-12.pth", weights_only=True)
    assert ckpt["iteration"] == 12 and ckpt["epoch"] == 2 and isinstance(ckpt["args"], dict)
    assert ckpt["model_cfg"]["out_indices"] == [1, 2, 3, 4] and ckpt["classes"][1] == "disc"
    assert {"model", "optimizer", "scaler"} <= set(ckpt)


def test_resume_continues_as_if_never_stopped(trained, tmp_path):
    out, _, common = trained
    part = tmp_path / "part"
    part.mkdir()
    shutil.copy(out / "checkpoint-8.pth", part / "checkpoint-8.pth")
    segment(*common, "--output_dir", part)  # finds checkpoint-8.pth by itself
    a = torch.load(out / "checkpoint-12.pth", weights_only=True)["model"]
    b = torch.load(part / "checkpoint-12.pth", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)
    log = [json.loads(line) for line in (part / "log.txt").read_text().splitlines()]
    assert [e["iteration"] for e in log if e["mode"] == "train"] == [9, 12]


def test_eval_of_a_checkpoint_reproduces_the_logged_miou(trained, tmp_path):
    out, stats, common = trained
    result = segment(*common, "--eval", "--resume", out / "checkpoint-12.pth", "--output_dir", tmp_path)
    assert result["mIoU"] == pytest.approx(stats["mIoU"], abs=1e-9) and result["images"] == 6
    whole = segment(*common, "--eval", "--mode", "whole", "--aug_test", "--aug_ratios", "0.75,1.0",
                    "--resume", out / "checkpoint-12.pth", "--output_dir", tmp_path)
    assert whole["images"] == 6 and 0 <= whole["mIoU"] <= 100


@pytest.mark.slow  # three processes; sibling: test_distributed's 2-process --dist_eval (the same sampler)
def test_distributed_evaluation_counts_each_image_once(trained, tmp_path):
    out, stats, common = trained
    env = clean_env(tmp_path)
    port = free_port()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
         str(ROOT / "Segmentation" / "train.py"), *map(str, common), "--eval", "--resume", str(out / "checkpoint-12.pth"),
         "--output_dir", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"mIoU {stats['mIoU']:.2f}" in proc.stdout and "on 6 images" in proc.stdout, proc.stdout


# --------------------------------------------------------------------------------------------
# checkpoints


def _pretraining_checkpoint(path, depth: int = 4):
    torch.manual_seed(0)
    cfg = models_deepmim.DeepMIMConfig(img_size=16, patch_size=4, embed_dim=192, depth=depth, num_heads=3,
                                       decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, ds_layers=(2, depth))
    model = models_deepmim.DeepMIM(cfg)
    torch.save({"model": model.state_dict(), "epoch": 9, "args": {}, "model_cfg": cfg.to_dict()}, path)
    return model


def test_a_pretraining_checkpoint_loads_into_the_backbone_with_only_new_keys_missing(tmp_path):
    pre = _pretraining_checkpoint(tmp_path / "checkpoint-9.pth")
    seg = models.Segmentor(TINY)
    missing, unexpected = models.load_pretrained(seg, str(tmp_path / "checkpoint-9.pth"))
    assert set(missing) == set(seg.backbone.new_keys())  # nothing of the encoder is missing
    assert {k.split(".")[-1] for k in missing if not k.startswith("necks.")} == {"relative_position_bias_table", "gamma"}
    assert set(unexpected) == {"norm.weight", "norm.bias"}  # blocks feed the pyramid raw, as in the reference
    assert torch.equal(seg.backbone.blocks[3].mlp.fc1.weight, pre.blocks[3].mlp.fc1.weight)
    assert torch.equal(seg.backbone.pos_embed, resize_pos_embed(pre.pos_embed, (8, 8)))  # 16 px -> 32 px grid

    plain = models.Segmentor(models.SegConfig(**{**TINY.__dict__, "rel_pos_bias": False, "init_values": None}))
    missing, _ = models.load_pretrained(plain, str(tmp_path / "checkpoint-9.pth"))
    assert missing == []  # patch 4: the stride-4 neck is the identity, the others max-pool: no new weights

    sd = convert.read_state_dict(str(tmp_path / "checkpoint-9.pth"))
    del sd["blocks.2.attn.qkv.weight"]
    torch.save({"model": sd}, tmp_path / "broken.pth")
    with pytest.raises(UserError, match="lacks 1 encoder weight.*blocks.2.attn.qkv.weight"):
        models.load_pretrained(models.Segmentor(TINY), str(tmp_path / "broken.pth"))


def test_relative_position_bias_is_beit_s_and_starts_as_a_plain_vit():
    torch.manual_seed(0)
    with_bias = models.Segmentor(TINY).eval()
    plain = models.Segmentor(models.SegConfig(**{**TINY.__dict__, "rel_pos_bias": False})).eval()
    plain.load_state_dict(with_bias.state_dict(), strict=False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(with_bias.encode_decode(x), plain.encode_decode(x))  # zero tables: no change
    bb = with_bias.backbone
    table = torch.randn_like(bb.blocks[0].attn.relative_position_bias_table)
    bias = bb.attention_bias(table, (8, 8))  # [heads, 65, 65]
    L = 15 * 15
    # token (row 0, col 0) -> token (row 1, col 2): offset (-1, -2) -> entry (-1 + 7) * 15 + (-2 + 7)
    assert torch.equal(bias[:, 1, 1 + 8 + 2], table[6 * 15 + 5])
    assert torch.equal(bias[:, 0, 5], table[L]) and torch.equal(bias[:, 5, 0], table[L + 1])
    assert torch.equal(bias[:, 0, 0], table[L + 2])
    with torch.no_grad():  # other grids (whole-image inference) interpolate the table
        bb.blocks[0].attn.relative_position_bias_table.copy_(table)
        assert with_bias.encode_decode(torch.randn(1, 3, 37, 50)).shape == (1, 5, 37, 50)


def test_layer_decay_and_weight_decay_groups():
    model = models.Segmentor(TINY)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, depth = 0.9, 4
    for group in layer_decay_groups(model, 0.05, decay):
        for p in group["params"]:
            n = names[id(p)]
            if n.startswith(("backbone.cls_token", "backbone.pos_embed", "backbone.patch_embed")):
                layer = 0
            elif n.startswith("backbone.blocks."):
                layer = int(n.split(".")[2]) + 1
            else:  # necks and heads
                layer = depth + 1
            assert group["lr_scale"] == pytest.approx(decay ** (depth + 1 - layer)), n
            no_decay = p.ndim == 1 or n in ("backbone.cls_token", "backbone.pos_embed")
            assert group["weight_decay"] == (0.0 if no_decay else 0.05), n


def test_poly_schedule_matches_the_reference_log():
    # DeepMIM-Seg.log: lr of the first group (5e-5 x 0.9^13) at iterations 50, 1500, 1550 (mmcv logs it - 1)
    lr = 5e-5 * 0.9 ** 13
    assert f"{poly_lr_at(49, lr, 160000, 1500):.3e}" == "4.151e-07"
    assert f"{poly_lr_at(1499, lr, 160000, 1500):.3e}" == "1.258e-05"
    assert f"{poly_lr_at(1549, lr, 160000, 1500):.3e}" == "1.259e-05"
    assert poly_lr_at(0, 1.0, 100, 10) == pytest.approx(1e-6) and poly_lr_at(100, 1.0, 100, 10) == 0.0


# --------------------------------------------------------------------------------------------
# mmseg export / import


def test_mmseg_export_has_the_reference_names_and_imports_back(tmp_path):
    cfg = models.SegConfig(model="vit_tiny_patch16", img_size=64, num_classes=150, out_indices=(1, 2, 3, 4),
                           channels=16, aux_channels=8)
    torch.manual_seed(0)
    model = models.Segmentor(cfg).eval()
    for m in model.modules():  # non-trivial BatchNorm statistics, so that the round trip is checked
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
    ckpt = {"model": model.state_dict(), "model_cfg": model.cfg.to_dict(), "iteration": 160000, "epoch": 127,
            "args": {"stride": 341}}
    torch.save(ckpt, tmp_path / "ours.pth")
    convert_mmseg.main(argparse.Namespace(src=str(tmp_path / "ours.pth"), dst=str(tmp_path / "mmseg.pth"), to="mmseg"))
    exported = torch.load(tmp_path / "mmseg.pth", weights_only=True)
    sd, meta = exported["state_dict"], exported["meta"]
    reference_names = [  # from the reference's training log (mae_segmentation backbone, mmseg heads)
        "backbone.cls_token", "backbone.blocks.0.gamma_1", "backbone.blocks.3.gamma_2", "backbone.blocks.0.attn.qkv.bias",
        "backbone.blocks.0.attn.relative_position_bias_table", "backbone.blocks.0.attn.relative_position_index",
        "backbone.fpn1.0.weight", "backbone.fpn1.1.running_mean", "backbone.fpn1.3.weight", "backbone.fpn2.0.weight",
        "decode_head.psp_modules.3.1.conv.weight", "decode_head.psp_modules.0.1.bn.running_var",
        "decode_head.bottleneck.conv.weight", "decode_head.lateral_convs.2.conv.weight",
        "decode_head.fpn_convs.2.bn.weight", "decode_head.fpn_bottleneck.conv.weight", "decode_head.conv_seg.bias",
        "auxiliary_head.convs.0.conv.weight", "auxiliary_head.conv_seg.weight"]
    assert set(reference_names) <= set(sd)
    assert not any(".ls1." in k or "necks" in k for k in sd)
    assert sd["decode_head.bottleneck.conv.weight"].shape == (16, 192 + 4 * 16, 3, 3)
    assert sd["backbone.blocks.0.attn.relative_position_index"].shape == (17, 17)
    assert meta["CLASSES"][7] == "bed " and len(meta["PALETTE"]) == 150 and meta["iter"] == 160000
    assert "out_indices=[0, 1, 2, 3]" in meta["config"] and "stride=(341, 341)" in meta["config"]

    # BEiT-style q/v biases (no k bias) import too: a key bias changes no attention weight
    beit = dict(sd)
    for i in range(4):
        q, k, v = beit.pop(f"backbone.blocks.{i}.attn.qkv.bias").chunk(3)
        beit[f"backbone.blocks.{i}.attn.q_bias"], beit[f"backbone.blocks.{i}.attn.v_bias"] = q, v
    for source in (exported, {"meta": meta, "state_dict": beit}):
        torch.save(source, tmp_path / "src.pth")
        convert_mmseg.main(argparse.Namespace(src=str(tmp_path / "src.pth"), dst=str(tmp_path / "back.pth"), to="ours"))
        back = torch.load(tmp_path / "back.pth", weights_only=True)
        assert models.SegConfig.from_dict(back["model_cfg"]) == model.cfg
        again = models.Segmentor(models.SegConfig.from_dict(back["model_cfg"])).eval()
        again.load_state_dict(back["model"], strict=True)
        x = torch.randn(1, 3, 64, 64)
        with torch.no_grad():
            torch.testing.assert_close(again.encode_decode(x), model.encode_decode(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(UserError, match="not an mmseg ViT / UperNet checkpoint"):
        convert_mmseg.from_mmseg({"state_dict": {"x": torch.zeros(1)}})


# --------------------------------------------------------------------------------------------
# user errors


def test_data_errors_name_the_path(synthetic, tmp_path):
    with pytest.raises(UserError, match=re.escape(f"{tmp_path}/images/validation does not exist")):
        data.ADE20K(tmp_path, "validation", 150)
    broken = tmp_path / "broken"
    shutil.copytree(synthetic, broken)
    (broken / "annotations" / "training" / "synthetic_00003.png").unlink()
    with pytest.raises(UserError, match="synthetic_00003.png is missing"):
        data.ADE20K(broken, "training", 5)
    with pytest.raises(UserError, match=r"synthetic_\d+.png holds class [45] \(label [34] after reduce_zero_label\) "
                                        r"but --num_classes is 3"):
        ds = data.ADE20K(synthetic, "validation", 3)
        [ds[i] for i in range(len(ds))]
    with pytest.raises(UserError, match="--out_indices 2,1,3,4: give 4 increasing block numbers in 1..12"):
        models.Segmentor(models.SegConfig(**{**TINY.__dict__, "out_indices": (2, 1, 3, 4)}))


def test_a_non_finite_loss_stops_before_any_checkpoint(synthetic, tmp_path):
    with pytest.raises(UserError, match=r"Non-finite loss at iteration \d+ in the loss of the decode head"):
        segment(*TINY_FLAGS, "--data_path", synthetic, "--lr", "1e30", "--warmup_iters", "0", "--iters", "4",
                "--log_every", "2", "--save_every", "2", "--output_dir", tmp_path)
    assert not list(tmp_path.glob("checkpoint-*.pth"))


@pytest.mark.slow  # siblings: test_loaders' segmentation SIGTERM with loader workers, test_trainer's [pretrain]
def test_sigterm_writes_checkpoint_last_and_the_rerun_continues(synthetic, tmp_path):
    """Preemption in iteration-based training: the same runner mechanism as the epoch-based scripts."""
    import signal
    import threading
    import time

    from util.run.errors import Preempted

    out = tmp_path / "run"
    common = [*TINY_FLAGS, "--data_path", synthetic, "--iters", 40, "--log_every", 3, "--eval_every", 40,
              "--save_every", 100, "--save_last_every", 100, "--stop_check_every", 1, "--output_dir", out]

    def terminate_after_first_log():  # the scheduler's SIGTERM, once training is under way
        deadline = time.time() + 120
        while not (out / "log.txt").exists() and time.time() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    killer = threading.Thread(target=terminate_after_first_log)
    killer.start()
    with pytest.raises(Preempted, match=r"SIGTERM received: wrote .*checkpoint-last.pth at iteration \d+"):
        segment(*common)
    killer.join()
    stopped = torch.load(out / "checkpoint-last.pth", weights_only=True)["iteration"]
    assert 3 <= stopped < 40
    stats = segment(*common)  # the same command continues
    assert torch.load(out / "checkpoint-last.pth", weights_only=True)["iteration"] == 40
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    iters = [e["iteration"] for e in log if e["mode"] == "train"]
    assert iters == sorted(iters) and iters[-1] == 40 and 0 <= stats["mIoU"] <= 100
