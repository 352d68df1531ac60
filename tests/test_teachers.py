"""Feature teachers (timm by name + local weights, this repo's checkpoints, open_clip at any layer)
and per-layer targets (--ds_targets) in real training runs."""
import json

from util.data.constants import IMAGENET_MEAN, IMAGENET_STD
from util.run.errors import UserError

import pytest
import timm
import torch
from test_pretrain import assert_layer_losses_went_down, pretrain

import models_deepmim
from targets.base import TargetConfig
from targets.clip import CLIP_MEAN, CLIP_STD, CLIPTeacher
from targets.registry import build_targets


def flags(**kw):
    """The target flags of main_pretrain with their defaults, overridden by ``kw``."""
    return TargetConfig.from_flags(kw)


def renormalize(imgs, mean, std):
    """ImageNet-normalized images -> the same pixels normalized with (mean, std)."""
    pixels = imgs * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    return (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def deepmim_ckpt(tmp_path_factory):
    """A DeepMIM checkpoint on disk (depth 4, supervised layers 2 and 4) and its model."""
    torch.manual_seed(0)
    cfg = models_deepmim.model_config("deepmim_vit_tiny_patch4", depth=4, ds_layers=[2, 4], decoder_depth=1)
    model = models_deepmim.DeepMIM(cfg).eval()
    path = tmp_path_factory.mktemp("teacher") / "checkpoint-0.pth"
    torch.save({"model": model.state_dict(), "model_cfg": cfg.to_dict(), "epoch": 0, "args": {}}, path)
    return model, path


@pytest.fixture(scope="module")
def timm_vit(tmp_path_factory):
    """timm's vit_tiny_patch16_224 with random weights (and its 1000-class head) saved as a state dict."""
    torch.manual_seed(1)
    model = timm.create_model("vit_tiny_patch16_224").eval()
    path = tmp_path_factory.mktemp("timm") / "vit_tiny.pth"
    torch.save(model.state_dict(), path)
    return model, path


@pytest.mark.parametrize("layer", [2, 4])
def test_repo_checkpoint_teacher_equals_its_encoder_run_directly(deepmim_ckpt, layer):
    model, path = deepmim_ckpt
    targets, per_layer = build_targets(flags(target="teacher", teacher_model=f"deepmim:{path}", teacher_layer=layer),
                                       (8, 8), 32, 4, 2)
    teacher = targets["teacher"]
    imgs = torch.randn(3, 3, 32, 32)
    with torch.no_grad():  # DeepMIM's own encoder, nothing masked (increasing noise keeps the order)
        feats, _, _ = model.forward_encoder(imgs, 0.0, noise=torch.arange(64.0).expand(3, 64))
    expected = feats[model.ds_layers.index(layer)][:, 1:]  # layer 4 is the last: after the final norm
    with torch.inference_mode():
        out = teacher(imgs)
    assert per_layer == ["teacher", "teacher"] and (teacher.dim, teacher.loss) == (192, "cosine")
    assert out.shape == (3, 64, 192) and torch.allclose(out, expected, atol=1e-5)
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.net.training
    assert len(teacher.net.blocks) == layer  # blocks after the target layer are not kept


def test_timm_teacher_by_name_with_local_weights(timm_vit):
    model, path = timm_vit
    targets, _ = build_targets(flags(target="teacher", teacher_model="vit_tiny_patch16_224", teacher_weights=str(path),
                                     teacher_layer=6), (14, 14), 224, 16, 4)
    teacher = targets["teacher"]
    imgs = torch.randn(2, 3, 224, 224)
    with torch.no_grad():  # block 6 by hand, on the pixels normalized with timm's stats for this model (0.5, 0.5)
        x = renormalize(imgs, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        x = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        for blk in model.blocks[:6]:
            x = blk(x)
        out = teacher(imgs)
    assert (teacher.grid, teacher.dim) == ((14, 14), 192)
    assert out.shape == (2, 196, 192) and torch.allclose(out, x[:, 1:], atol=1e-5)  # cls token dropped


def test_teacher_of_another_grid_stops_with_the_fix_and_the_fix_works(timm_vit):
    _, path = timm_vit
    args = flags(target="teacher", teacher_model="vit_tiny_patch16_224", teacher_weights=str(path),
                 teacher_loss="smooth_l1")
    with pytest.raises(UserError, match=r"2x2 token grid but the student has a 8x8 patch grid .*"
                                        r"--teacher_input_size 128.*16-px patches covers exactly one student patch"):
        build_targets(args, (8, 8), 32, 4, 4)
    args = args.replace(teacher_input_size=128)  # 32-px images resized to 128: 16-px teacher patches on the 8x8 grid
    teacher = build_targets(args, (8, 8), 32, 4, 4)[0]["teacher"]
    out = teacher(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 64, 192) and teacher.loss == "smooth_l1"
    # smooth-L1 targets are standardized per token
    assert torch.allclose(out.mean(-1), torch.zeros(2, 64), atol=1e-4)
    assert torch.allclose(out.var(-1, unbiased=False), torch.ones(2, 64), atol=1e-3)


def test_open_clip_teacher_at_an_intermediate_layer(tiny_clip):
    args = flags(target="teacher", teacher_model="open_clip", clip_path=str(tiny_clip["state_dict"]), teacher_layer=1)
    teacher = build_targets(args, (8, 8), 32, 4, 4)[0]["teacher"]
    assert isinstance(teacher, CLIPTeacher) and teacher.dim == 64  # the tower's width: no projection mid-tower
    imgs = torch.randn(2, 3, 32, 32)
    visual = tiny_clip["model"].visual
    with torch.no_grad():
        expected = visual.transformer.resblocks[0](visual._embeds(renormalize(imgs, CLIP_MEAN, CLIP_STD)))[:, 1:]
        assert torch.allclose(teacher(imgs), expected, atol=1e-5)
        # the last layer is the clip target itself: ln_post + proj
        args = args.replace(teacher_layer=None)
        last = build_targets(args, (8, 8), 32, 4, 4)[0]["teacher"]
        clip = build_targets(flags(clip_path=str(tiny_clip["state_dict"])), (8, 8), 32, 4, 4)[0]["clip"]
        assert last.dim == 32 and torch.equal(last(imgs), clip(imgs))


@pytest.mark.parametrize("kw, message", [
    (dict(ds_targets=["pixel", "clip"], ds_layers=[6, 8, 10, 12]),
     r"--ds_targets names 2 target\(s\) but there are 4 supervised layers \(--ds_layers 6,8,10,12\)"),
    (dict(ds_targets=["pixel", "pixel", "hogg", "hog"]),
     r"Unknown reconstruction target 'hogg'. Valid names: clip, hog, pixel, teacher"),
    (dict(target="hog", ds_targets=["pixel", "pixel", "hog", "hog"]), "disagree"),
    (dict(target="teacher"), "The teacher target needs --teacher_model"),
    (dict(target="teacher", teacher_model="vit_tiny_patch16_2244"), r"not a timm model name \(close: vit_tiny_patch16_224"),
    (dict(target="teacher", teacher_model="vit_tiny_patch16_224", teacher_weights="nope.pth"), "not found"),
    (dict(target="teacher", teacher_model="deepmim:x.pth", teacher_weights="w.pth"), "--teacher_weights is for timm"),
])
def test_target_flag_errors(kw, message):
    with pytest.raises(UserError, match=message):
        build_targets(flags(**kw), (8, 8), 32, 4, 4, kw.get("ds_layers"))


def test_teacher_layer_outside_the_teacher(deepmim_ckpt):
    with pytest.raises(UserError, match=r"--teacher_layer 5 is outside 1..4"):
        build_targets(flags(target="teacher", teacher_model=str(deepmim_ckpt[1]), teacher_layer=5), (8, 8), 32, 4, 4)


def test_mixed_ds_targets_train_and_the_teacher_runs_once_per_step(small_folder, tiny_clip, tmp_path):
    from open_clip.transformer import ResidualAttentionBlock

    calls = {"teacher": 0, "blocks": 0}

    def count(module, inputs, output):
        if isinstance(module, CLIPTeacher):
            calls["teacher"] += 1
        elif isinstance(module, ResidualAttentionBlock):  # only the CLIP tower has these
            calls["blocks"] += 1

    out = tmp_path / "mixed"
    handle = torch.nn.modules.module.register_module_forward_hook(count)
    try:
        pretrain("--data_path", small_folder, "--output_dir", out, "--epochs", 3, "--warmup_epochs", 1,
                 "--blr", "2e-3", "--clip_path", tiny_clip["state_dict"], "--ds_targets", "hog,pixel,clip,clip",
                 "--knn_every", 0, "--recon_every", 0)  # the monitors' forwards are not training steps
    finally:
        handle.remove()
    assert_layer_losses_went_down(out)
    steps = 3 * (80 // 16)  # 3 epochs of 80 images in batches of 16
    assert calls == {"teacher": steps, "blocks": 2 * steps}  # once per step for two layers; 2 blocks per forward
    ckpt = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert ckpt["model_cfg"]["pred_dims"] == [27, 48, 32, 32]  # HOG 1 cell x 3 x 9; 4x4x3 pixels; CLIP proj
    assert ckpt["model_cfg"]["losses"] == ["mse", "mse", "cosine", "cosine"]
    assert json.loads((out / "config.json").read_text())["args"]["ds_targets"] == ["hog", "pixel", "clip", "clip"]

    # resuming this run with other targets: the widths do not fit its decoders
    with pytest.raises(UserError, match=r"trained with targets hog,pixel,clip,clip \(widths \[27, 48, 32, 32\].*"
                                        r"this run's targets pixel,pixel,pixel,pixel need widths \[48, 48, 48, 48\]"):
        pretrain("--data_path", small_folder, "--output_dir", out, "--epochs", 6, "--target", "pixel")


def test_open_clip_model_without_weights_is_refused():
    # open_clip itself would build a randomly initialised CLIP and only log a warning
    with pytest.raises(UserError, match="--clip_model 'ViT-B-16' needs weights: --clip_path FILE, or --clip_pretrained"):
        build_targets(flags(target="teacher", teacher_model="open_clip:ViT-B-16"), (14, 14), 224, 16, 4)
