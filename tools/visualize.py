"""MAE-style reconstruction figure of a pre-training checkpoint: one column per supervised layer.

    python tools/visualize.py output_dir/pretrain/checkpoint-last.pth --data_path digits --num_images 4 \
        --out output_dir/reconstruction.png
    python tools/visualize.py clip_run/checkpoint-last.pth --clip_path ViT-B-16.pt --out cosine.png

One row per image; columns: the image, the masked input (removed patches shown as the dataset
mean, as in MAE's notebook), then one panel per supervised layer's decoder. The mask is the model's
own random masking with noise drawn from ``--seed``, so the figure is reproducible.

* Pixel targets: each layer's prediction is unpatchified; with ``--norm_pix_loss`` (read from the
  checkpoint's ``args``) every predicted patch is de-normalized with the mean and variance of the
  true patch, as MAE's visualization does; the visible patches are pasted over the reconstruction.
  The panel title gives the layer's loss on this image (masked patches, as in training).
* CLIP targets: the cosine similarity between the layer's prediction and the CLIP target token of
  every patch (-1 .. 1; masked patches outlined), which needs the CLIP weights (``--clip_path``,
  default: the checkpoint's own ``clip_path`` flag).

The checkpoint is a pre-training checkpoint of this repo (``model_cfg`` inside) or a reference
DeepMIM / MAE release with its decoders (renamed on load, as ``tools/convert_checkpoint.py --to ours``
does).
"""
import argparse
import itertools
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import models_deepmim  # noqa: E402
from targets.losses import LOSSES  # noqa: E402
from targets.pixel import PixelTarget, patch_mean_std, patchify, unpatchify  # noqa: E402
from tools.common import release_to_ours  # noqa: E402
from util import convert  # noqa: E402
from util.checkpoint import read_checkpoint  # noqa: E402
from util.cli import Parser, mask_fraction, positive_int, seed_int  # noqa: E402
from util.constants import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from util.datasets import classification_datasets, eval_transform  # noqa: E402
from util.errors import UserError  # noqa: E402
from util.misc import run_cli  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser("tools/visualize.py", "Reconstructions of every supervised layer")
    p.add_argument("checkpoint", help="pre-training checkpoint of this repo (with model_cfg)")
    p.add_argument("--data_path", default="digits", help="ImageFolder root with val/ inside, or 'digits'")
    p.add_argument("--num_images", default=4, type=positive_int, metavar="N",
                   help="images (rows): one per class, in class order")
    p.add_argument("--mask_ratio", default=None, type=mask_fraction,
                   help="fraction of patches removed (default: the checkpoint's, 0.75)")
    p.add_argument("--seed", default=0, type=seed_int, help="seed of the masking noise")
    p.add_argument("--clip_path", default=None, help="CLIP weights for a CLIP-target checkpoint (default: none)")
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


def pick_images(data_path: str, size: int, num_images: int) -> torch.Tensor:
    """``num_images`` validation images, one per class in turn: [N, 3, size, size], ImageNet-normalized."""
    _, val, _ = classification_datasets(data_path, None, eval_transform(size), need_train=False)
    by_class: Dict[int, List[int]] = {}
    for i, (_, label) in enumerate(val.samples):
        by_class.setdefault(label, []).append(i)
    # round robin over the classes: the first image of each class, then the second, ...
    order = [i for group in itertools.zip_longest(*by_class.values()) for i in group if i is not None]
    return torch.stack([val[i][0] for i in order[:max(1, num_images)]])


def to_display(imgs: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalized [N, 3, H, W] -> [N, H, W, 3] in 0..1."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (imgs * std + mean).clamp(0, 1).permute(0, 2, 3, 1)


@torch.no_grad()
def reconstruct(model: models_deepmim.DeepMIM, imgs: torch.Tensor, norm_pix: bool, mask_ratio: float,
                seed: int, targets: Optional[torch.Tensor] = None) -> Dict[str, Any]:
    """Predictions of every supervised layer for one fixed mask.

    Args:
        targets: [N, L, C] target tokens (CLIP); pixel targets are computed here.

    Returns:
        ``mask`` [N, L] (1 = removed), ``masked`` [N, 3, H, W] (removed patches zero, i.e. the mean),
        ``losses`` [K, N] (per image, masked patches), and for pixels ``recons`` (list of [N, 3, H, W],
        visible patches pasted, normalized like ``imgs``) or for CLIP ``cosine`` (list of [N, L]).
    """
    cfg = model.cfg
    p = cfg.patch_size
    pixel = all(name == "mse" for name in cfg.losses)
    if targets is None:
        if not pixel:
            raise UserError("This checkpoint reconstructs CLIP features: pass --clip_path with the CLIP weights.")
        targets = PixelTarget(imgs.shape[-1], p, norm_pix=norm_pix)(imgs)
    noise = torch.rand(imgs.shape[0], cfg.grid[0] * cfg.grid[1], generator=torch.Generator().manual_seed(seed))
    out = model(imgs, targets, mask_ratio=mask_ratio, noise=noise, return_pred=True)
    mask = out.mask
    patches = patchify(imgs, p)  # [N, L, p*p*3]
    result: Dict[str, Any] = {
        "mask": mask,
        "masked": unpatchify(patches * (1 - mask[..., None]), p, cfg.grid),
        "losses": torch.stack([(LOSSES[name](pred, targets) * mask).sum(1) / mask.sum(1)
                               for pred, name in zip(out.preds, cfg.losses)]),
    }
    if pixel:
        recons = []
        for pred in out.preds:
            if norm_pix:  # back from per-patch normalized pixels with the true patch's statistics (MAE)
                mean, std = patch_mean_std(patches)
                pred = pred * std + mean
            pasted = patches * (1 - mask[..., None]) + pred * mask[..., None]
            recons.append(unpatchify(pasted, p, cfg.grid))
        result["recons"] = recons
    else:
        result["cosine"] = [torch.nn.functional.cosine_similarity(pred.float(), targets.float(), dim=-1)
                            for pred in out.preds]
    return result


def draw(imgs: torch.Tensor, rec: Dict[str, Any], layers: List[int], grid: Tuple[int, int]):
    """The figure: rows = images; columns = image, masked input, one panel per supervised layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, k = imgs.shape[0], len(layers)
    fig, axes = plt.subplots(n, 2 + k, figsize=(1.6 * (2 + k), 1.7 * n), squeeze=False)
    originals, masked = to_display(imgs).numpy(), to_display(rec["masked"]).numpy()
    for r in range(n):
        axes[r, 0].imshow(originals[r])
        axes[r, 1].imshow(masked[r])
        for c, layer in enumerate(layers):
            ax = axes[r, 2 + c]
            loss = float(rec["losses"][c, r])
            if "recons" in rec:
                ax.imshow(to_display(rec["recons"][c])[r].numpy())
            else:
                cos = rec["cosine"][c][r].reshape(grid).numpy()
                ax.imshow(cos, cmap="RdBu_r", vmin=-1, vmax=1)
                for i in rec["mask"][r].nonzero().flatten().tolist():  # outline the removed patches
                    y, x = divmod(i, grid[1])
                    ax.add_patch(plt.Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, lw=0.5, ec="k"))
            ax.set_title(f"L{layer} loss {loss:.3f}" if r == 0 else f"{loss:.3f}", fontsize=7)
        if r == 0:
            axes[r, 0].set_title("image", fontsize=7)
            axes[r, 1].set_title("masked", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    what = "reconstruction (visible patches pasted)" if "recons" in rec else "cos(prediction, CLIP target) per patch"
    fig.suptitle(f"decoder of each supervised layer: {what}", fontsize=8)
    fig.tight_layout()
    return fig


def main(args: argparse.Namespace) -> Path:
    model, ckpt_args = load_pretrained(args.checkpoint)
    cfg = model.cfg
    imgs = pick_images(args.data_path, cfg.img_size, args.num_images)
    targets = None
    if not all(name == "mse" for name in cfg.losses):
        from targets.clip import CLIPTeacher, load_clip_visual

        clip_path = args.clip_path or ckpt_args.get("clip_path")
        clip_model = ckpt_args.get("clip_model")  # the architecture, when the run named an open_clip model
        if not (clip_path or clip_model):
            raise UserError("This checkpoint reconstructs CLIP features: pass --clip_path with the CLIP weights.")
        with torch.no_grad():
            targets = CLIPTeacher(load_clip_visual(clip_path, clip_model, ckpt_args.get("clip_pretrained")))(imgs)
    mask_ratio = args.mask_ratio if args.mask_ratio is not None else float(ckpt_args.get("mask_ratio", 0.75))
    models_deepmim.check_mask_ratio(cfg, mask_ratio, args.checkpoint)
    rec = reconstruct(model, imgs, bool(ckpt_args.get("norm_pix_loss", False)), mask_ratio, args.seed, targets)
    fig = draw(imgs, rec, list(cfg.ds_layers), cfg.grid)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    print(f"wrote {out}: {imgs.shape[0]} images x (image, masked, layers {list(cfg.ds_layers)})")
    return out


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
