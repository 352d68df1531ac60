"""MAE-style reconstruction figure of a pre-training checkpoint: one column per supervised layer, for
every target.

    python tools/visualize.py output_dir/pretrain/checkpoint-last.pth --data_path digits --num_images 4 \
        --out output_dir/reconstruction.png
    python tools/visualize.py clip_run/checkpoint-last.pth --clip_path ViT-B-16.pt --out clip.png
    python tools/visualize.py teacher_run/checkpoint-last.pth --teacher_model deepmim:teacher.pth --out t.png

One row per image; columns: the image, the masked input (removed patches shown as the dataset
mean, as in MAE's notebook), then every supervised layer's decoder. The mask is the model's own
random masking with noise drawn from ``--seed``, so the figure is reproducible. Pre-training draws
the same figure into TensorBoard every ``--recon_every`` epochs (``engine_monitor.draw``).

* Pixel targets: each layer's prediction is unpatchified; with ``--norm_pix_loss`` (read from the
  checkpoint's ``args``) every predicted patch is de-normalized with the mean and variance of the
  true patch, as MAE's visualization does; the visible patches are pasted over the reconstruction.
* Feature targets (HOG, CLIP, any teacher): the target tokens in colours, the 3 principal
  components of the target's tokens mapped to RGB, and each layer's prediction through the same
  projection (equal colours, equal features), plus the per-patch cosine between prediction and
  target (-1 .. 1, colour bar; removed patches outlined).

Panel titles give each layer's loss on the image (masked patches, as in training). The targets are
rebuilt from the checkpoint's saved flags (``--target`` / ``--ds_targets``, ``--clip_path``,
``--teacher_model`` ...); ``--clip_path``, ``--clip_model``, ``--teacher_model`` and
``--teacher_weights`` given here replace the saved ones (weights moved to another machine).

The checkpoint is a pre-training checkpoint of this repo (``model_cfg`` inside) or a reference
DeepMIM / MAE release with its decoders (renamed on load, as ``tools/convert_checkpoint.py --to ours``
does).
"""
import argparse
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from util.checkpoints import convert
from util.checkpoints.reader import read_checkpoint
from util.config.cli import Parser, mask_fraction, positive_int, seed_int
from util.run.dist import resolve_device
from util.run.errors import UserError, run_cli

import models_deepmim
from engine_monitor import draw, pick_images, reconstruct
from targets.base import Target, TargetConfig
from targets.registry import build_targets
from tools.common import release_to_ours

PATH_FLAGS = ("clip_path", "clip_model", "teacher_model", "teacher_weights")  # given here, they replace the saved ones


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser("tools/visualize.py", "Reconstructions of every supervised layer")
    p.add_argument("checkpoint", help="pre-training checkpoint of this repo (with model_cfg)")
    p.add_argument("--data_path", default="digits", help="ImageFolder root with val/ inside, or 'digits'")
    p.add_argument("--num_images", default=4, type=positive_int, metavar="N",
                   help="images (rows): one per class, in class order")
    p.add_argument("--mask_ratio", default=None, type=mask_fraction,
                   help="fraction of patches removed (default: the checkpoint's, 0.75)")
    p.add_argument("--seed", default=0, type=seed_int, help="seed of the masking noise")
    p.add_argument("--clip_path", default=None, help="CLIP weights of a CLIP-target checkpoint (default: the saved path)")
    p.add_argument("--clip_model", default=None, help="open_clip architecture of the CLIP target (default: the saved one)")
    p.add_argument("--teacher_model", default=None, help="teacher of a teacher-target checkpoint (default: the saved one)")
    p.add_argument("--teacher_weights", default=None, help="local weights of a timm teacher (default: the saved path)")
    p.add_argument("--device", default="", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--out", default="output_dir/reconstruction.png", help="PNG to write")
    return p


def load_pretrained(path: str) -> Tuple[models_deepmim.DeepMIM, Dict[str, Any]]:
    """The DeepMIM model of a pre-training checkpoint (eval mode) and the checkpoint's ``args``."""
    ckpt = read_checkpoint(path)
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model_cfg"), dict) and "model" in ckpt:
        model, sd = models_deepmim.model_from_config(ckpt["model_cfg"]), convert.model_state_of(ckpt, path)
    else:  # a reference DeepMIM / MAE release: renamed on the way in
        sd = convert.state_dict_of(ckpt, path)
        if convert.layout(sd) not in ("reference", "mae"):
            raise UserError(f"{path} is not a pre-training checkpoint of this repo (with 'model_cfg') nor a reference "
                            f"DeepMIM / MAE release with its decoders: it holds the {convert.layout(sd)} layout.")
        _, sd, cfg = release_to_ours(sd, path)
        model = models_deepmim.DeepMIM(cfg)
    convert.load_model_state(model, sd, path)
    return model.eval(), dict(ckpt.get("args") or {}) if isinstance(ckpt, dict) else {}


def rebuild_targets(model: models_deepmim.DeepMIM, saved_args: Dict[str, Any], source: str,
                    overrides: Optional[Dict[str, Optional[str]]] = None) -> Tuple[Dict[str, Target], List[str]]:
    """The targets a checkpoint was trained with, from its saved flags (``TargetConfig.from_flags``);
    ``overrides`` (None values ignored) replace saved flags such as ``clip_path``. The targets must
    give the widths and losses of the model's decoders.

    Returns:
        (targets, layer_targets) as :func:`targets.registry.build_targets` gives them.
    """
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    cfg = model.cfg
    widths, losses = list(cfg.pred_dims), list(cfg.losses)
    pixel = [d == cfg.patch_size ** 2 * cfg.in_chans and name == "mse" for d, name in zip(widths, losses)]
    hint = ("pass --clip_path with the CLIP weights (a CLIP target) or --teacher_model (a teacher target)"
            if not all(pixel) else "check the checkpoint")
    tcfg = TargetConfig.from_flags(saved_args, **given)
    try:
        targets, layer_targets = build_targets(tcfg, cfg.grid, cfg.img_size, cfg.patch_size, len(cfg.ds_layers),
                                               cfg.ds_layers)
    except UserError as e:
        raise UserError(f"{source}: its targets could not be rebuilt from its saved flags ({e}); {hint}.") from None
    got_w, got_l = [targets[n].dim for n in layer_targets], [targets[n].loss for n in layer_targets]
    if got_w != widths or got_l != losses:
        raise UserError(f"{source}: its decoders predict widths {widths} with losses {losses}, but the targets "
                        f"{','.join(layer_targets)} give widths {got_w}, losses {got_l}; {hint}.")
    return targets, layer_targets


def main(args: argparse.Namespace) -> Path:
    model, ckpt_args = load_pretrained(args.checkpoint)
    device = resolve_device(args.device)
    cfg = model.cfg
    targets, layer_targets = rebuild_targets(model, ckpt_args, args.checkpoint,
                                             {k: getattr(args, k) for k in PATH_FLAGS})
    model.to(device)
    for t in targets.values():
        t.to(device)
    imgs = pick_images(args.data_path, cfg.img_size, args.num_images).to(device)
    mask_ratio = args.mask_ratio if args.mask_ratio is not None else float(ckpt_args.get("mask_ratio", 0.75))
    models_deepmim.check_mask_ratio(cfg, mask_ratio, args.checkpoint)
    rec = reconstruct(model, targets, layer_targets, imgs, mask_ratio, args.seed)
    fig = draw(imgs, rec, list(cfg.ds_layers), cfg.grid)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    print(f"wrote {out}: {imgs.shape[0]} images x (image, masked, layers {list(cfg.ds_layers)}; targets "
          f"{', '.join(dict.fromkeys(layer_targets))})")
    return out


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
