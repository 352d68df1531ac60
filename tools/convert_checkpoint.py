"""Convert checkpoints between this repo, the reference DeepMIM / MAE releases, timm and mmseg.

    # reference DeepMIM (or MAE) pre-training release -> this repo (resume / visualize / fine-tune)
    python tools/convert_checkpoint.py deepmim_release.pth ours.pth --to ours
    # this repo -> the reference release's key names
    python tools/convert_checkpoint.py output_dir/checkpoint-1599.pth reference.pth --to reference
    # this repo (pre-trained or fine-tuned) -> a timm VisionTransformer state dict; a .safetensors
    # name writes real safetensors, which timm.create_model(..., pretrained=True,
    # pretrained_cfg_overlay=dict(file=...)) loads (the tool prints the exact call)
    python tools/convert_checkpoint.py output_dir/checkpoint-best.pth vit_timm.safetensors --to timm
    # encoder only ({'model': ...}), or with the 'backbone.' prefix mmseg-based code expects
    python tools/convert_checkpoint.py output_dir/checkpoint-1599.pth encoder.pth --to encoder
    python tools/convert_checkpoint.py output_dir/checkpoint-1599.pth backbone.pth --to backbone
    # detectron2's ViTDet layout (backbone.net.*): train.init_checkpoint of projects/ViTDet's configs
    python tools/convert_checkpoint.py output_dir/checkpoint-1599.pth vitdet_init.pth --to detectron2
    # a published name or URL as the input (downloaded once, checksum checked)
    python tools/convert_checkpoint.py mae_pretrain_vit_base vit_b_mae.safetensors --to timm

Inputs are read without running code from them (``util.checkpoints.reader.read_checkpoint``): MAE's and the
reference DeepMIM's files (with their pickled ``argparse.Namespace``) load; safetensors and
TorchScript files too. ``--format`` chooses the output format (default: ``safetensors`` for a
``.safetensors`` name, else ``torch``). A safetensors file holds the tensors under the keys the state
dict has; the checkpoint's other entries (``epoch``, ``args``, ``model_cfg``, ``meta``) go into its
metadata, and this repo reads them back.

Every direction refuses a file whose layout it does not recognise. The optimizer state is not
carried across layouts (the parameter order differs); a converted pre-training checkpoint resumes
with the stored epoch and a fresh optimizer.
"""
import argparse
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from util.checkpoints import convert, serialization
from util.checkpoints.reader import read_checkpoint, save_atomic
from util.config.cli import Parser, increasing, positive_int, str2list
from util.config.registry import vit_heads
from util.run.errors import UserError, run_cli

from tools.common import release_to_ours

TIMM_NAMES = {(192, 12, 16): "vit_tiny_patch16", (384, 12, 16): "vit_small_patch16", (768, 12, 16): "vit_base_patch16",
              (1024, 24, 16): "vit_large_patch16", (1280, 32, 14): "vit_huge_patch14"}
GENERIC_TIMM_NAME = "vit_base_patch16_224"  # for other shapes: its entry, with the shape given explicitly


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser("tools/convert_checkpoint.py", "Convert DeepMIM / MAE / timm checkpoints")
    p.add_argument("src", help="input checkpoint: a file, a published name (e.g. mae_pretrain_vit_base) or a URL")
    p.add_argument("dst", help="output file")
    p.add_argument("--to", required=True, choices=["ours", "reference", "timm", "encoder", "backbone", "detectron2"],
                   help="output layout: this repo's, the reference DeepMIM release's, a timm ViT state dict, the "
                        "encoder alone, the encoder with mmseg's 'backbone.' prefix, or detectron2's ViTDet backbone")
    p.add_argument("--format", choices=["torch", "safetensors"], default=None,
                   help="output format (default: safetensors when dst ends in .safetensors, else torch)")
    p.add_argument("--ds_layers", type=str2list(positive_int, increasing), default=None, metavar="LAYERS",
                   help="--to ours: the encoder layers of the reference decoders 1..N (default 6,8,10,12 for depth 12)")
    p.add_argument("--num_heads", type=positive_int, default=None, metavar="N",
                   help="encoder heads (weights do not show them; default: the checkpoint's model_cfg, else standard)")
    p.add_argument("--decoder_num_heads", type=positive_int, default=None, metavar="N",
                   help="--to ours: decoder heads (default: 16)")
    return p


def timm_call(sd: Dict[str, Any], file: Optional[str] = None, num_heads: Optional[int] = None) -> str:
    """The ``timm.create_model(...)`` call that builds the ViT ``sd`` fits (strictly), with
    ``pretrained=True`` and the weights of ``file`` when given.

    Args:
        num_heads: the encoder's heads (weights do not show them); default: standard for the width.
    """
    import timm

    enc = convert.infer_encoder_config(sd)
    standard = vit_heads(enc["embed_dim"])
    classes = sd["head.weight"].shape[0] if "head.weight" in sd else 0
    pool = "avg" if "fc_norm.weight" in sd else "token"  # timm adds fc_norm (and drops norm) for avg pooling
    base = TIMM_NAMES.get((enc["embed_dim"], enc["depth"], enc["patch_size"]))
    kwargs: Dict[str, Any] = {}
    if base and f"{base}_{enc['img_size']}" in timm.list_models():
        name = f"{base}_{enc['img_size']}"
    elif base:
        name, kwargs["img_size"] = f"{base}_224", enc["img_size"]
    else:
        name = GENERIC_TIMM_NAME
        kwargs.update(img_size=enc["img_size"], patch_size=enc["patch_size"], embed_dim=enc["embed_dim"],
                      depth=enc["depth"], num_heads=num_heads or standard)
    if base and num_heads and num_heads != standard:
        kwargs["num_heads"] = num_heads
    kwargs.update(num_classes=classes, global_pool=pool)
    # the overlay's num_classes must equal the model's, or timm drops the head and loads non-strictly
    weights = f"pretrained=True, pretrained_cfg_overlay=dict(file={file!r}, num_classes={classes}), " if file else ""
    return f"timm.create_model({name!r}, {weights}{', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"


def split_for_safetensors(out: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(tensors, other entries) of a converted checkpoint: safetensors holds a flat dict of tensors."""
    for key in ("model", "state_dict"):
        if isinstance(out.get(key), dict):
            return out[key], {k: v for k, v in out.items() if k != key}
    return out, {}


def main(args: argparse.Namespace) -> None:
    raw = read_checkpoint(args.src)
    sd = convert.state_dict_of(raw, args.src)
    meta = {k: raw[k] for k in ("epoch", "args") if isinstance(raw, dict) and k in raw}
    model_cfg = raw.get("model_cfg") if isinstance(raw, dict) and isinstance(raw.get("model_cfg"), dict) else {}
    heads = args.num_heads or model_cfg.get("num_heads")
    fmt = args.format or ("safetensors" if str(args.dst).endswith(".safetensors") else "torch")
    if args.to == "detectron2" and fmt == "safetensors":
        raise UserError("detectron2 reads .pth / .pkl checkpoints: give dst a .pth name for --to detectron2.")
    if args.to == "ours":
        kind, out_sd, cfg = release_to_ours(sd, args.src, args.ds_layers, args.num_heads, args.decoder_num_heads)
        out = {"model": out_sd, "epoch": int(meta.get("epoch", -1)), "args": meta.get("args", {}) if isinstance(
            meta.get("args"), dict) else {}, "model_cfg": cfg.to_dict()}
        what = f"{kind} release -> ours (decoders of layers {list(cfg.ds_layers)})"
    elif args.to == "reference":
        convert.require_layout(sd, ("ours",), args.src)
        out = {"model": convert.ours_to_reference(sd), "epoch": int(meta.get("epoch", -1)), "args": meta.get("args", {})}
        what = "ours -> reference DeepMIM names"
    elif args.to == "detectron2":
        out_sd = convert.to_detectron2_vitdet(sd, args.src)
        out = {"model": out_sd, "__author__": "DeepMIM"}
        what = "detectron2 ViTDet backbone (backbone.net.*)"
        if "pos_embed" in sd:  # an encoder (a detector's keys are net.*): say how to configure ViTDet for it
            enc = convert.infer_encoder_config(sd)
            what += (f"; in the ViTDet config set embed_dim={enc['embed_dim']}, depth={enc['depth']}, "
                     f"patch_size={enc['patch_size']}, pretrain_img_size={enc['img_size']} (relative position "
                     f"tables start at zero)")
    else:
        convert.require_layout(sd, ("ours", "reference", "mae", "encoder"), args.src)
        encoder = convert.encoder_only(sd, keep_head=args.to == "timm")
        if args.to == "timm":
            out = encoder
            what = f"timm state dict; load strictly with {timm_call(encoder, str(args.dst), heads)}"
        elif args.to == "encoder":
            if "fc_norm.weight" in sd and "norm.weight" not in sd:  # a fine-tuned ViT: fc_norm is its final norm
                encoder.update({k: v for k, v in sd.items() if k.startswith("fc_norm.")})
            out = {"model": encoder}
            what = f"encoder only ({{'model': ...}}); load strictly into {timm_call(encoder, num_heads=heads)}"
        else:
            out = {"state_dict": {f"backbone.{k}": v for k, v in encoder.items()}, "meta": {"source": str(args.src)}}
            what = "encoder with the 'backbone.' prefix ({'state_dict': ..., 'meta': ...})"
    if os.path.exists(args.src) and Path(args.dst).resolve() == Path(args.src).resolve():
        raise UserError("The output file must differ from the input file.")
    if fmt == "safetensors":
        tensors, extra = split_for_safetensors(out)
        serialization.save_safetensors(tensors, Path(args.dst), extra)
    else:
        save_atomic(out, Path(args.dst))
    print(f"wrote {args.dst} ({fmt}): {what}")


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
