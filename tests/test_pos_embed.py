import math

from util.checkpoints.pos_embed import resize_pos_embed, sincos_2d

import pytest
import torch


def test_sincos_layout_matches_mae_by_hand():
    # dim 8 on a 2x2 grid: each half (4 channels) is [sin(p*w0), sin(p*w1), cos(p*w0), cos(p*w1)]
    # with w0 = 1, w1 = 1/10000**0.5 = 0.01; the first half encodes the column (w), the second the row (h)
    emb = sincos_2d(8, 2, cls_token=True)
    assert emb.shape == (5, 8)
    assert torch.equal(emb[0], torch.zeros(8))  # cls row

    def half(p):
        return [math.sin(p), math.sin(p * 0.01), math.cos(p), math.cos(p * 0.01)]

    # token order is row-major: (h, w) = (0,0), (0,1), (1,0), (1,1)
    for token, (h, w) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)], start=1):
        expected = torch.tensor(half(w) + half(h), dtype=torch.float32)
        assert torch.allclose(emb[token], expected, atol=1e-7), (token, emb[token], expected)


def test_sincos_base_shape_and_range():
    emb = sincos_2d(768, 14, cls_token=True)
    assert emb.shape == (197, 768)
    assert emb.dtype == torch.float32
    assert emb[1:].abs().max() <= 1.0


def test_resize_is_identity_at_equal_size_and_resamples_to_384():
    pos = torch.randn(1, 1 + 14 * 14, 32)
    assert resize_pos_embed(pos, (14, 14)) is pos
    big = resize_pos_embed(pos, (24, 24))
    assert big.shape == (1, 1 + 24 * 24, 32)
    assert torch.equal(big[:, :1], pos[:, :1])  # cls row kept


def mae_interpolate(pos_embed, num_extra_tokens, orig_size, new_size):
    """MAE's ``interpolate_pos_embed`` (util/checkpoints/pos_embed.py of facebookresearch/mae), written out: the
    extra tokens kept, the patch rows as [1, D, H, W] through plain bicubic, align_corners False."""
    embedding_size = pos_embed.shape[-1]
    extra_tokens = pos_embed[:, :num_extra_tokens]
    pos_tokens = pos_embed[:, num_extra_tokens:]
    pos_tokens = pos_tokens.reshape(-1, orig_size[0], orig_size[1], embedding_size).permute(0, 3, 1, 2)
    pos_tokens = torch.nn.functional.interpolate(pos_tokens, size=new_size, mode="bicubic", align_corners=False)
    pos_tokens = pos_tokens.permute(0, 2, 3, 1).flatten(1, 2)
    return torch.cat((extra_tokens, pos_tokens), dim=1)


@pytest.mark.parametrize("old, new, prefix", [
    ((14, 14), (24, 24), 1),  # up: 224 -> 384 (MAE's fine-tuning at 384)
    ((14, 14), (32, 32), 1),  # up: 224 -> 512 (segmentation crops)
    ((14, 14), (7, 7), 1),  # down
    ((4, 4), (8, 8), 0),  # no prefix token
    ((8, 8), (3, 5), 1),  # non-square target (whole-image segmentation inference)
    ((6, 4), (9, 7), 0),  # non-square source
    ((16, 16), (14, 14), 2),  # two prefix tokens (cls + a register)
])
def test_resize_is_maes_interpolate_pos_embed_to_the_bit(old, new, prefix):
    g = torch.Generator().manual_seed(old[0] * 100 + new[1])
    pos = torch.randn(1, prefix + old[0] * old[1], 48, generator=g)
    ours = resize_pos_embed(pos, new, num_prefix_tokens=prefix, old_grid=None if old[0] == old[1] else old)
    assert torch.equal(ours, mae_interpolate(pos, prefix, old, new))
    assert torch.equal(ours[:, :prefix], pos[:, :prefix])  # prefix rows untouched
    # the antialiased kernel (timm's default) is another table: only on request
    if new[0] < old[0]:
        other = resize_pos_embed(pos, new, num_prefix_tokens=prefix, old_grid=old, antialias=True)
        assert not torch.equal(other, ours)


def test_every_loader_resizes_with_maes_rule(tmp_path):
    """A 16-px checkpoint fine-tuned at 32 px: the ViT starts from MAE's interpolation of its table."""
    from util.checkpoints.convert import load_encoder

    import models_vit

    src = models_vit.create_model("vit_tiny_patch4", num_classes=0, img_size=16)
    with torch.no_grad():
        src.pos_embed.normal_()
    path = tmp_path / "enc.pth"
    torch.save({"model": src.state_dict()}, path)
    dst = models_vit.create_model("vit_tiny_patch4", num_classes=0, img_size=32)
    load_encoder(dst, str(path))
    assert torch.equal(dst.pos_embed.detach(), mae_interpolate(src.pos_embed.detach(), 1, (4, 4), (8, 8)))


def test_segmentation_at_another_grid_uses_maes_rule():
    """Whole-image inference at 48 px on a backbone trained at 32 px equals a backbone built at 48 px
    whose table is MAE's interpolation (the reference mmseg backbone's rule too)."""
    from Segmentation import models

    def backbone(size):
        cfg = models.SegConfig(model="vit_tiny_patch4", img_size=size, num_classes=5, out_indices=(1, 2, 3, 4),
                               channels=16, aux_channels=8, rel_pos_bias=False, init_values=None, drop_path=0.0)
        return models.Segmentor(cfg).backbone.eval()

    torch.manual_seed(0)
    native, big = backbone(32), backbone(48)
    with torch.no_grad():
        native.pos_embed.normal_()
        state = native.state_dict()
        state["pos_embed"] = mae_interpolate(native.pos_embed, 1, (8, 8), (12, 12))
        big.load_state_dict(state)
        x = torch.randn(1, 3, 48, 48)
        for a, b in zip(native(x), big(x)):
            assert torch.equal(a, b)


def test_timm_teacher_at_teacher_input_size_uses_maes_rule(tmp_path):
    """--teacher_input_size 128 on timm's 224-px ViT: its table is MAE's interpolation (14 -> 8), not
    timm's antialiased resample."""
    import timm

    from targets.base import TargetConfig
    from targets.registry import build_targets

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224").eval()
    path = tmp_path / "vit_tiny.pth"
    torch.save(model.state_dict(), path)
    cfg = TargetConfig.from_flags(dict(target="teacher", teacher_model="vit_tiny_patch16_224",
                                       teacher_weights=str(path), teacher_input_size=128))
    teacher = build_targets(cfg, (8, 8), 32, 4, 4)[0]["teacher"]
    expected = mae_interpolate(model.pos_embed.detach(), 1, (14, 14), (8, 8))
    assert torch.equal(teacher.net.pos_embed.detach(), expected)
    assert torch.equal(teacher.net.blocks[0].mlp.fc1.weight, model.blocks[0].mlp.fc1.weight)  # the rest as loaded
