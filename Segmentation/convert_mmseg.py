"""Move segmentation checkpoints between this repo and mmseg 0.x (the reference's framework).

    python Segmentation/convert_mmseg.py out_seg/checkpoint-160000.pth deepmim_upernet_mmseg.pth --to mmseg
    python Segmentation/convert_mmseg.py upernet_mmseg.pth imported.pth --to ours   # prints the --eval command

**Export** (``--to mmseg``) writes what mmcv's ``save_checkpoint`` writes, ``{'meta', 'state_dict'}``,
with the key names of the reference's ``EncoderDecoder`` (backbone ``MAE`` of mae_segmentation,
``UPerHead``, ``FCNHead``): ``backbone.*`` / ``decode_head.*`` / ``auxiliary_head.*``. The backbone
differs from ours in three names only: layer scale ``blocks.i.ls1.gamma`` / ``ls2.gamma`` ->
``blocks.i.gamma_1`` / ``gamma_2``, the pyramid ``necks.k`` -> ``fpn{k+1}``, and the reference keeps
``relative_position_index`` buffers, which are added. ``meta`` holds ``CLASSES``, ``PALETTE`` (what
``mmseg.apis.init_segmentor`` reads), ``iter`` and ``config``: the mmseg config of this model, to
save as a ``.py`` file for mmseg's tools.

**Import** (``--to ours``) reverses the renames, drops the index buffers, folds BEiT-style
``q_bias`` / ``v_bias`` into ``qkv.bias`` (a key bias changes no attention weight), infers the model
from the weights (and ``meta['config']`` when present) and writes a checkpoint that
``Segmentation/train.py --eval --resume`` (or further training) reads.
"""
import argparse
import ast
import re
from pathlib import Path
from typing import Any, Dict, List

from util.checkpoints.reader import read_checkpoint, save_atomic
from util.config.cli import Parser
from util.config.registry import vit_heads
from util.run.errors import UserError

import numpy as np
import torch
from timm.layers import gen_relative_position_index

import models_vit
from Segmentation.data import ADE20K_CLASSES
from Segmentation.inference import default_stride
from Segmentation.models import STRIDES, SegConfig, default_out_indices

_OURS_TO_MMSEG = [(re.compile(r"^backbone\.blocks\.(\d+)\.ls([12])\.gamma$"), r"backbone.blocks.\1.gamma_\2"),
                  (re.compile(r"^backbone\.necks\.(\d+)\."), lambda m: f"backbone.fpn{int(m.group(1)) + 1}.")]
_MMSEG_TO_OURS = [(re.compile(r"^backbone\.blocks\.(\d+)\.gamma_([12])$"), r"backbone.blocks.\1.ls\2.gamma"),
                  (re.compile(r"^backbone\.fpn(\d+)\."), lambda m: f"backbone.necks.{int(m.group(1)) - 1}.")]
REQUIRED = ("backbone.patch_embed.proj.weight", "backbone.pos_embed", "decode_head.conv_seg.weight")


def _rename(key: str, rules) -> str:
    for pattern, repl in rules:
        key = pattern.sub(repl, key)
    return key


def palette(num_classes: int) -> List[List[int]]:
    """mmseg's fallback palette for datasets without one (numpy seed 42)."""
    return np.random.RandomState(42).randint(0, 255, size=(num_classes, 3)).tolist()


def mmseg_config(cfg: SegConfig, depth: int, embed_dim: int, num_heads: int, patch: int, stride: int) -> str:
    """The mmseg 0.x model config (mae_segmentation's ``MAE`` backbone) of a model of ours."""
    dims = [embed_dim] * len(STRIDES)
    return f"""# mmseg 0.x model of this checkpoint (backbone 'MAE' from mae_segmentation / the DeepMIM reference)
norm_cfg = dict(type='SyncBN', requires_grad=True)
model = dict(
    type='EncoderDecoder',
    pretrained=None,
    backbone=dict(
        type='MAE', img_size={cfg.img_size}, patch_size={patch}, embed_dim={embed_dim}, depth={depth},
        num_heads={num_heads}, mlp_ratio=4, qkv_bias=True, use_abs_pos_emb=True,
        use_rel_pos_bias={cfg.rel_pos_bias}, init_values={cfg.init_values}, drop_path_rate={cfg.drop_path},
        out_indices={[i - 1 for i in cfg.out_indices]}),
    decode_head=dict(
        type='UPerHead', in_channels={dims}, in_index=[0, 1, 2, 3], pool_scales={tuple(cfg.pool_scales)},
        channels={cfg.channels}, dropout_ratio={cfg.dropout}, num_classes={cfg.num_classes}, norm_cfg=norm_cfg,
        align_corners=False, loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    auxiliary_head=dict(
        type='FCNHead', in_channels={embed_dim}, in_index=2, channels={cfg.aux_channels}, num_convs=1,
        concat_input=False, dropout_ratio={cfg.dropout}, num_classes={cfg.num_classes}, norm_cfg=norm_cfg,
        align_corners=False, loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight={cfg.aux_weight})),
    train_cfg=dict(),
    test_cfg=dict(mode='slide', crop_size=({cfg.img_size}, {cfg.img_size}), stride=({stride}, {stride})))
"""


def to_mmseg(ckpt: Dict[str, Any]) -> Dict[str, Any]:
    """A training checkpoint of ``Segmentation/train.py`` -> ``{'meta', 'state_dict'}`` in mmseg's names."""
    if "model_cfg" not in ckpt or not any(k.startswith("decode_head.") for k in ckpt.get("model", {})):
        raise UserError("the source is not a segmentation checkpoint of Segmentation/train.py (no model_cfg / decode_head).")
    cfg = SegConfig.from_dict(ckpt["model_cfg"])
    sd = {_rename(k, _OURS_TO_MMSEG): v for k, v in ckpt["model"].items()}
    embed_dim, _, patch, _ = sd["backbone.patch_embed.proj.weight"].shape
    depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("backbone.blocks."))
    tables = sorted(k for k in sd if k.endswith("relative_position_bias_table"))
    grid = (cfg.img_size // patch, cfg.img_size // patch)
    for k in tables:  # the reference registers the index as a (persistent) buffer
        sd[k.replace("relative_position_bias_table", "relative_position_index")] = gen_relative_position_index(
            grid, class_token=True)
    num_heads = sd[tables[0]].shape[1] if tables else vit_heads(embed_dim)
    classes = ckpt.get("classes") or (list(ADE20K_CLASSES) if cfg.num_classes == 150 else
                                      [f"class_{i}" for i in range(cfg.num_classes)])
    stride = int(ckpt.get("args", {}).get("stride", default_stride(cfg.img_size)))
    meta = {"CLASSES": list(classes), "PALETTE": palette(len(classes)), "iter": int(ckpt.get("iteration", 0)),
            "epoch": int(ckpt.get("epoch", 0)), "config": mmseg_config(cfg, depth, embed_dim, num_heads, patch, stride),
            "exported_by": "DeepMIM Segmentation/convert_mmseg.py"}
    return {"meta": meta, "state_dict": sd}


def _config_value(config: str, name: str, default: Any = None) -> Any:
    """A literal ``name=value`` from an mmseg config text (first occurrence), or ``default``."""
    m = re.search(rf"\b{name}=([\[\(][^\]\)]*[\]\)]|[^,\)\s]+)", config or "")
    if not m:
        return default
    try:
        return ast.literal_eval(m.group(1))
    except (ValueError, SyntaxError):
        return default


def _registered_name(embed_dim: int, depth: int, patch: int) -> str:
    """The models_vit name of a ViT with this width and patch size and at least ``depth`` blocks."""
    name = models_vit.registered_name(embed_dim, depth, patch, at_least=True)
    if name is None:
        raise UserError(f"no registered ViT has width {embed_dim}, patch {patch} and {depth}+ blocks "
                        f"({', '.join(models_vit.MODELS.names())}).")
    return name


def from_mmseg(obj: Dict[str, Any]) -> Dict[str, Any]:
    """An mmseg ``{'meta', 'state_dict'}`` of the reference's ViT / UperNet -> a checkpoint of ours."""
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else {}
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items() if torch.is_tensor(v)}
    missing = [k for k in REQUIRED if k not in sd]
    if missing:
        raise UserError(f"not an mmseg ViT / UperNet checkpoint: {', '.join(missing)} missing (keys found: "
                        f"{', '.join(list(sd)[:5])}, ...). Expected the reference's names: backbone.blocks.i.*, "
                        f"backbone.fpn1..4, decode_head.psp_modules.*, auxiliary_head.* ...")
    meta = obj.get("meta") or {}
    out: Dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k.endswith("relative_position_index"):
            continue
        m = re.match(r"^(backbone\.blocks\.\d+\.attn)\.([qv])_bias$", k)
        if m:  # BEiT-style biases: qkv.bias = [q_bias, 0, v_bias]
            q, v_ = sd[f"{m.group(1)}.q_bias"], sd[f"{m.group(1)}.v_bias"]
            out[f"{m.group(1)}.qkv.bias"] = torch.cat([q, torch.zeros_like(q), v_])
            continue
        out[_rename(k, _MMSEG_TO_OURS)] = v

    embed_dim, _, patch, _ = out["backbone.patch_embed.proj.weight"].shape
    depth = 1 + max(int(k.split(".")[2]) for k in out if k.startswith("backbone.blocks."))
    grid = round((out["backbone.pos_embed"].shape[1] - 1) ** 0.5)
    config = meta.get("config", "")  # the weights do not tell out_indices, pool scales, drop path, loss weights
    out_indices = _config_value(config, "out_indices")
    num_classes, channels = out["decode_head.conv_seg.weight"].shape[:2]
    aux = out.get("auxiliary_head.conv_seg.weight")
    branches = sum(1 for k in out if re.match(r"^decode_head\.psp_modules\.\d+\.1\.conv\.weight$", k))
    pool_scales = _config_value(config, "pool_scales", (1, 2, 3, 6) if branches == 4 else None)
    if pool_scales is None or len(pool_scales) != branches:
        raise UserError(f"the checkpoint has {branches} PPM branches but no config naming their pool scales.")
    cfg = SegConfig(
        model=_registered_name(embed_dim, depth, patch), img_size=grid * patch, num_classes=int(num_classes),
        out_indices=tuple(i + 1 for i in out_indices) if out_indices else default_out_indices(depth),
        drop_path=float(_config_value(config, "drop_path_rate", 0.1)),
        rel_pos_bias=any(k.endswith("relative_position_bias_table") for k in out),
        init_values=1.0 if any(k.endswith("ls1.gamma") for k in out) else None, channels=int(channels),
        pool_scales=tuple(pool_scales), aux_channels=int(aux.shape[1]) if aux is not None else 256,
        aux_weight=float(_config_value(config.split("auxiliary_head", 1)[-1], "loss_weight", 0.4)) if aux is not None
        else 0.0,
        dropout=float(_config_value(config, "dropout_ratio", 0.1)),
    )
    classes = list(meta.get("CLASSES") or [])
    # the config's test stride (test_cfg=dict(..., stride=(341, 341))) where it covers the crop, else the reference's rule
    stride = _config_value(config.split("test_cfg", 1)[-1] if "test_cfg" in config else "", "stride")
    stride = stride[0] if isinstance(stride, (tuple, list)) else stride
    if not isinstance(stride, int) or not 1 <= stride <= cfg.img_size:
        stride = default_stride(cfg.img_size)
    return {"model": out, "epoch": int(meta.get("epoch", 0)), "iteration": int(meta.get("iter", 0)),
            "args": {"model": cfg.model, "stride": stride}, "model_cfg": cfg.to_dict(), "classes": classes}


def eval_flags(cfg: SegConfig, stride: int) -> List[str]:
    """The ``Segmentation/train.py`` flags that build ``cfg`` and evaluate it with sliding windows every ``stride`` px."""
    flags = ["--model", cfg.model, "--num_classes", str(cfg.num_classes), "--crop_size", str(cfg.img_size),
             "--stride", str(stride),
             "--out_indices", ",".join(map(str, cfg.out_indices)), "--channels", str(cfg.channels),
             "--aux_channels", str(cfg.aux_channels), "--aux_weight", str(cfg.aux_weight),
             "--pool_scales", ",".join(map(str, cfg.pool_scales))]
    if not cfg.rel_pos_bias:
        flags.append("--no_rel_pos_bias")
    if cfg.init_values is None:
        flags += ["--init_values", "0"]
    return flags


def main(args: argparse.Namespace) -> None:
    src = read_checkpoint(args.src)
    if not isinstance(src, dict):
        raise UserError(f"{args.src} does not hold a checkpoint dictionary.")
    if args.to == "mmseg":
        out = to_mmseg(src)
        save_atomic(out, Path(args.dst))
        print(f"wrote {args.dst}: {len(out['state_dict'])} tensors in mmseg's layout; meta['config'] holds the "
              f"mmseg model config")
    else:
        out = from_mmseg(src)
        save_atomic(out, Path(args.dst))
        cfg = SegConfig.from_dict(out["model_cfg"])
        print(f"wrote {args.dst}: {len(out['model'])} tensors. Evaluate it with:\n  python Segmentation/train.py "
              f"--eval --resume {args.dst} --data_path /path/to/ADEChallengeData2016 "
              f"{' '.join(eval_flags(cfg, out['args']['stride']))}")


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser("Segmentation/convert_mmseg.py", "Convert segmentation checkpoints between this repo and mmseg 0.x")
    p.add_argument("src", help="source checkpoint")
    p.add_argument("dst", help="file to write")
    p.add_argument("--to", required=True, choices=["mmseg", "ours"],
                   help="target layout: mmseg's {'meta', 'state_dict'}, or this repo's (prints the --eval command)")
    return p


if __name__ == "__main__":
    from util.run.errors import run_cli

    run_cli(main, get_args_parser().parse_args())
