"""Convert checkpoints between this repo, the reference DeepMIM / MAE releases, timm and mmseg.

    # reference DeepMIM (or MAE) pre-training release -> this repo (resume / visualize / fine-tune)
    python tools/convert_checkpoint.py deepmim_release.pth ours.pth --to ours
    # this repo -> the reference release's key names
    python tools/convert_checkpoint.py output_dir/checkpoint-1599.pth reference.pth --to reference
    # this repo (pre-trained or fine-tuned) -> a timm VisionTransformer state dict (strict load)
    python tools/convert_checkpoint.py output_dir/checkpoint-1599.pth vit_timm.pth --to timm
    # encoder only ({'model': ...}), or with the 'backbone.' prefix mmseg-based code expects
    python tools/convert_checkpoint.py output_dir/checkpoint-1599.pth encoder.pth --to encoder
    python tools/convert_checkpoint.py output_dir/checkpoint-1599.pth backbone.pth --to backbone

Every direction refuses a file whose layout it does not recognise. The optimizer state is not
carried across layouts (the parameter order differs); a converted pre-training checkpoint resumes
with the stored epoch and a fresh optimizer.
"""
import argparse
import sys
from pathlib import Path
from typing import Any, Dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models_deepmim import DeepMIMConfig, default_ds_layers  # noqa: E402
from util import convert  # noqa: E402
from util.checkpoint import read_checkpoint, save_atomic  # noqa: E402
from util.cli import str2list  # noqa: E402
from util.errors import UserError  # noqa: E402
from util.misc import run_cli  # noqa: E402
from util.registry import vit_heads  # noqa: E402

TIMM_NAMES = {(192, 12, 16): "vit_tiny_patch16", (384, 12, 16): "vit_small_patch16", (768, 12, 16): "vit_base_patch16",
              (1024, 24, 16): "vit_large_patch16", (1280, 32, 14): "vit_huge_patch14"}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("Convert DeepMIM / MAE / timm checkpoints")
    p.add_argument("src", help="input checkpoint")
    p.add_argument("dst", help="output file")
    p.add_argument("--to", required=True, choices=["ours", "reference", "timm", "encoder", "backbone"])
    p.add_argument("--ds_layers", type=str2list(int), default=None,
                   help="--to ours: the encoder layers of the reference decoders 1..N (default 6,8,10,12 for depth 12)")
    p.add_argument("--num_heads", type=int, default=None, help="--to ours: encoder heads (default: standard for the width)")
    p.add_argument("--decoder_num_heads", type=int, default=None, help="--to ours: decoder heads (default 16)")
    return p


def timm_hint(sd: Dict[str, Any]) -> str:
    enc = convert.infer_encoder_config(sd)
    has_head = "head.weight" in sd
    pool = "avg" if "fc_norm.weight" in sd else "token"
    classes = sd["head.weight"].shape[0] if has_head else 0
    name = TIMM_NAMES.get((enc["embed_dim"], enc["depth"], enc["patch_size"]))
    extra = f"num_classes={classes}, global_pool='{pool}'" + ("" if pool == "token" else ", fc_norm=True")
    if name:
        return f"timm.create_model('{name}_{enc['img_size']}', {extra})"
    heads = vit_heads(enc["embed_dim"])
    return (f"timm.models.VisionTransformer(img_size={enc['img_size']}, patch_size={enc['patch_size']}, "
            f"embed_dim={enc['embed_dim']}, depth={enc['depth']}, num_heads={heads}, {extra})")


def main(args: argparse.Namespace) -> None:
    raw = read_checkpoint(args.src)
    sd = convert.read_state_dict(args.src)
    meta = {k: raw[k] for k in ("epoch", "args") if isinstance(raw, dict) and k in raw}
    if args.to == "ours":
        kind = convert.require_layout(sd, ("reference", "mae"), args.src)
        depth = convert.infer_encoder_config(sd)["depth"]
        layers = args.ds_layers or ((depth,) if kind == "mae" else default_ds_layers(depth))
        out_sd = convert.reference_to_ours(sd, layers)
        cfg = DeepMIMConfig(**convert.infer_pretrain_config(out_sd, args.num_heads, args.decoder_num_heads))
        out = {"model": out_sd, "epoch": int(meta.get("epoch", -1)), "args": meta.get("args", {}) if isinstance(
            meta.get("args"), dict) else {}, "model_cfg": cfg.to_dict()}
        what = f"{kind} release -> ours (decoders of layers {list(cfg.ds_layers)})"
    elif args.to == "reference":
        convert.require_layout(sd, ("ours",), args.src)
        out = {"model": convert.ours_to_reference(sd), "epoch": int(meta.get("epoch", -1)), "args": meta.get("args", {})}
        what = "ours -> reference DeepMIM names"
    else:
        convert.require_layout(sd, ("ours", "reference", "mae", "encoder"), args.src)
        encoder = convert.encoder_only(sd, keep_head=args.to == "timm")
        if args.to == "timm":
            out = encoder
            what = f"timm state dict; load strictly with {timm_hint(encoder)}"
        elif args.to == "encoder":
            out = {"model": encoder}
            what = "encoder only ({'model': ...})"
        else:
            out = {"state_dict": {f"backbone.{k}": v for k, v in encoder.items()}, "meta": {"source": str(args.src)}}
            what = "encoder with the 'backbone.' prefix ({'state_dict': ..., 'meta': ...})"
    if Path(args.dst).resolve() == Path(args.src).resolve():
        raise UserError("The output file must differ from the input file.")
    save_atomic(out, Path(args.dst))
    print(f"wrote {args.dst}: {what}")


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
