from util.run.errors import UserError

import pytest
import torch

from targets.base import TargetConfig
from targets.clip import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, CLIPTeacher, load_clip_visual
from targets.registry import build_targets


def _reference_tokens(clip_model, imgs):
    """ln_post + proj of every patch token, computed through open_clip's own forward."""
    pixels = imgs * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    clip_in = (pixels - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    visual = clip_model.visual
    visual.output_tokens = True
    try:
        _, tokens = visual(clip_in)  # ln_post applied, patch tokens only
    finally:
        visual.output_tokens = False
    return tokens @ visual.proj


@pytest.mark.parametrize("fmt", ["state_dict", "torchscript"])
def test_teacher_reads_openai_formats_and_returns_projected_patch_tokens(tiny_clip, fmt):
    teacher = CLIPTeacher(load_clip_visual(str(tiny_clip[fmt])))
    imgs = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        out = teacher(imgs)
    assert out.shape == (2, 64, 32)  # 8x8 patches, proj width 32, no cls token
    with torch.no_grad():
        ref = _reference_tokens(tiny_clip["model"], imgs)
    assert torch.allclose(out, ref, atol=1e-5)
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.visual.training  # stays in eval mode


def test_open_clip_training_checkpoint_with_module_prefix(tiny_clip, tmp_path):
    sd = {"module." + k: v for k, v in tiny_clip["model"].state_dict().items()}
    path = tmp_path / "epoch_32.pt"
    torch.save({"epoch": 32, "name": "tiny", "state_dict": sd}, path)
    a = CLIPTeacher(load_clip_visual(str(path)))
    b = CLIPTeacher(load_clip_visual(str(tiny_clip["state_dict"])))
    imgs = torch.randn(1, 3, 32, 32)
    assert torch.equal(a(imgs), b(imgs))


def test_missing_clip_file(tmp_path):
    with pytest.raises(UserError, match="CLIP weights not found.*--clip_path"):
        load_clip_visual(str(tmp_path / "nope.pt"))


def test_file_that_is_not_clip(tmp_path):
    path = tmp_path / "vit.pth"
    torch.save({"model": {"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}}, path)
    with pytest.raises(UserError, match="not a CLIP checkpoint with a ViT image tower"):
        load_clip_visual(str(path))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(UserError, match="could not be read as a CLIP checkpoint"):
        load_clip_visual(str(junk))


def test_grid_mismatch_with_the_student(tiny_clip):
    Args = TargetConfig(clip_path=str(tiny_clip["state_dict"]))

    targets, per_layer = build_targets(Args, (8, 8), 32, 4, 4)  # 32 px / patch 4: fits
    assert per_layer == ["clip"] * 4 and targets["clip"].dim == 32 and targets["clip"].loss == "cosine"
    with pytest.raises(UserError, match=r"8x8 token grid but the student has a 2x2 patch grid"):
        build_targets(Args, (2, 2), 32, 16, 4)
