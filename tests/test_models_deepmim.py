from util.run.errors import UserError

import pytest
import torch
from conftest import TINY_DEEPMIM, tiny_deepmim

import models_deepmim
from models_deepmim import DeepMIMConfig, create_model, model_config
from targets.pixel import PixelTarget


def tiny(**kw):
    return tiny_deepmim(**kw).eval()


def test_registry_has_the_reference_names_and_lists_them_on_error():
    names = models_deepmim.MODELS.names()
    for size in ("tiny", "small", "base", "large", "huge"):
        assert f"deepmim_vit_{size}_patch16" in names and f"deepmim_vit_{size}_patch14" in names
    for n in ("mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14", "deepmim_vit_tiny_patch4"):
        assert n in names
    with pytest.raises(UserError) as e:
        model_config("deepmim_vit_gigantic_patch16")
    assert "Valid names:" in str(e.value) and "mae_vit_base_patch16" in str(e.value)


@pytest.mark.parametrize("name", models_deepmim.MODELS.names())
def test_every_registered_model_builds_with_tiny_widths(name):
    cfg = model_config(name)
    # MAE's recipes supervise the last layer only
    last_only = name in models_deepmim.MAE_RECIPES
    assert cfg.ds_layers == ((cfg.depth,) if last_only else models_deepmim.default_ds_layers(cfg.depth))
    # same entry point, small widths so that every model is built for real
    model = create_model(name, embed_dim=16, num_heads=2, decoder_embed_dim=16, decoder_num_heads=2,
                         decoder_depth=1, img_size=cfg.patch_size * 2)
    imgs = torch.randn(2, 3, cfg.patch_size * 2, cfg.patch_size * 2)
    out = model(imgs, PixelTarget(cfg.patch_size * 2, cfg.patch_size)(imgs))
    assert out.layer_losses.shape == (len(cfg.ds_layers),) and torch.isfinite(out.loss)


def test_mae_baseline_is_maes_published_decoder_on_the_last_layer():
    """MAE's models_mae.py: mae_vit_base_patch16_dec512d8b, one decoder 512 wide, 8 blocks, 16 heads."""
    for name in ("mae_vit_base_patch16_dec8", "mae_vit_base_patch16_dec512d8b"):
        cfg = model_config(name)
        assert (cfg.embed_dim, cfg.depth, cfg.patch_size, cfg.ds_layers) == (768, 12, 16, (12,))
        assert (cfg.decoder_embed_dim, cfg.decoder_depth, cfg.decoder_num_heads) == (512, 8, 16)
    assert model_config("mae_vit_huge_patch14_dec8").ds_layers == (32,)
    # the same encoder as DeepMIM's; a flag still overrides the recipe
    assert model_config("mae_vit_base_patch16_dec8", ds_layers=[6, 8, 10, 12]).ds_layers == (6, 8, 10, 12)


def test_reference_base_config():
    cfg = model_config("mae_vit_base_patch16")
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.patch_size, cfg.img_size) == (768, 12, 12, 16, 224)
    assert (cfg.decoder_embed_dim, cfg.decoder_depth, cfg.decoder_num_heads) == (512, 4, 16)
    assert cfg.ds_layers == (6, 8, 10, 12)
    assert models_deepmim.default_ds_layers(24) == (12, 16, 20, 24)
    tiny4 = model_config("deepmim_vit_tiny_patch4")
    assert (tiny4.depth, tiny4.patch_size, tiny4.img_size, tiny4.ds_layers) == (12, 4, 32, (6, 8, 10, 12))


def test_only_the_supervised_decoders_exist_and_all_params_get_gradients():
    model = tiny(ds_layers=(2, 4)).train()
    assert list(model.decoders.keys()) == ["2", "4"]
    imgs = torch.randn(2, 3, 16, 16)
    model(imgs, PixelTarget(16, 4)(imgs)).loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert no_grad == []
    sd = model.state_dict()
    assert "pos_embed" in sd and "decoder_pos_embed" in sd and "decoders.2.mask_token" in sd


def test_masking_keeps_int_L_times_1_minus_r_and_is_reproducible_from_noise():
    model = tiny()
    x = torch.randn(3, 16, 32)
    for ratio in (0.75, 0.6, 0.5, 0.9):
        keep = int(16 * (1 - ratio))
        noise = torch.rand(3, 16)
        kept, mask, ids_restore = model.random_masking(x, ratio, noise)
        assert kept.shape == (3, keep, 32)
        assert torch.equal((mask == 0).sum(1), torch.full((3,), keep))
        kept2, mask2, _ = model.random_masking(x, ratio, noise.clone())
        assert torch.equal(mask, mask2) and torch.equal(kept, kept2)
        # the kept tokens are the ones with the smallest noise, and mask marks the others
        smallest = noise.argsort(1)[:, :keep]
        assert torch.equal(mask.gather(1, smallest), torch.zeros(3, keep))
        assert torch.equal(kept, x.gather(1, smallest.unsqueeze(-1).expand(-1, -1, 32)))


def _mae_reference(model, imgs, target, noise, ratio, layer, decoder):
    """Plain MAE with one decoder, written out step by step from the model's weights."""
    x = model.patch_embed(imgs) + model.pos_embed[:, 1:]
    n, length, d = x.shape
    keep = int(length * (1 - ratio))
    ids_shuffle = noise.argsort(1)
    ids_restore = ids_shuffle.argsort(1)
    x = x.gather(1, ids_shuffle[:, :keep, None].expand(-1, -1, d))
    x = torch.cat([(model.cls_token + model.pos_embed[:, :1]).expand(n, -1, -1), x], 1)
    for blk in model.blocks[:layer]:
        x = blk(x)
    if layer == len(model.blocks):
        x = model.norm(x)
    y = decoder.embed(x)
    dd = y.shape[-1]
    y_ = torch.cat([y[:, 1:], decoder.mask_token.repeat(n, length - keep, 1)], 1)
    y_ = y_.gather(1, ids_restore[:, :, None].expand(-1, -1, dd))
    y = torch.cat([y[:, :1], y_], 1) + model.decoder_pos_embed
    for blk in decoder.blocks:
        y = blk(y)
    pred = decoder.pred(decoder.norm(y))[:, 1:]
    mask = torch.ones(n, length)
    mask[:, :keep] = 0
    mask = mask.gather(1, ids_restore)
    return (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()


def test_ds_layers_last_only_is_exactly_mae():
    model = tiny(ds_layers=(4,))
    imgs = torch.randn(2, 3, 16, 16)
    target = PixelTarget(16, 4, norm_pix=True)(imgs)
    noise = torch.rand(2, 16)
    with torch.no_grad():
        out = model(imgs, target, mask_ratio=0.75, noise=noise)
        ref = _mae_reference(model, imgs, target, noise, 0.75, 4, model.decoders["4"])
    assert torch.allclose(out.loss, ref, atol=1e-6, rtol=0)
    assert out.layer_losses.shape == (1,)


def test_deep_supervision_feeds_raw_blocks_and_normed_last_layer():
    model = tiny(ds_layers=(2, 3, 4), ds_weights=(0.5, 1.0, 2.0))
    imgs = torch.randn(2, 3, 16, 16)
    target = PixelTarget(16, 4)(imgs)
    noise = torch.rand(2, 16)
    with torch.no_grad():
        out = model(imgs, target, noise=noise, return_pred=True)
        refs = torch.stack([_mae_reference(model, imgs, target, noise, 0.75, layer, model.decoders[str(layer)])
                            for layer in (2, 3, 4)])
    assert torch.allclose(out.layer_losses, refs, atol=1e-6, rtol=0)
    assert torch.allclose(out.loss, (refs * torch.tensor([0.5, 1.0, 2.0])).sum(), atol=1e-6)
    assert [p.shape for p in out.preds] == [(2, 16, 48)] * 3
    assert out.mask.shape == (2, 16)


def test_per_layer_targets_and_losses():
    model = tiny(ds_layers=(2, 4), pred_dims=(48, 8), losses=("mse", "cosine"))
    imgs = torch.randn(2, 3, 16, 16)
    out = model(imgs, [PixelTarget(16, 4)(imgs), torch.randn(2, 16, 8)], return_pred=True)
    assert [p.shape[-1] for p in out.preds] == [48, 8]
    assert 0 <= out.layer_losses[1] <= 4  # 2 - 2cos is in [0, 4]


@pytest.mark.parametrize("kw, message", [
    (dict(ds_layers=(2, 3)), "must include the last layer"),
    (dict(ds_layers=(0, 4)), "outside 1..4"),
    (dict(ds_layers=(3, 2, 4)), "increasing"),
    (dict(ds_layers=(2, 4), ds_weights=(1.0,)), "one weight per supervised layer"),
    (dict(img_size=18), "not a multiple of the patch size"),
])
def test_bad_config_messages(kw, message):
    with pytest.raises(UserError, match=message):
        DeepMIMConfig(**{**TINY_DEEPMIM, **kw})


def test_config_round_trips_through_plain_dict():
    cfg = DeepMIMConfig(**TINY_DEEPMIM, ds_layers=(2, 4))
    d = cfg.to_dict()
    assert all(isinstance(v, (int, float, str, list)) for v in d.values())
    model = models_deepmim.model_from_config(d)
    assert model.cfg == cfg


def test_the_model_module_imports_nothing_that_touches_signals_files_or_processes():
    """``models_deepmim`` is the pure model: importing it must not pull in the run machinery."""
    import subprocess
    import sys

    from conftest import ROOT

    code = ("import sys, models_deepmim; print(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('util', 'targets', 'engine_pretrain', 'engine_finetune', 'models_vit')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    loaded = set(eval(out))
    # the packages' __init__ modules import nothing: only the three leaf modules the model needs
    assert loaded <= {"util", "util.run", "util.run.errors", "util.checkpoints", "util.checkpoints.pos_embed",
                      "util.config", "util.config.registry", "targets", "targets.losses"}, loaded
