"""Mean attention distance per layer and head, and attention diversity across heads.

    python tools/attention_analysis.py mae/checkpoint-last.pth deepmim/checkpoint-last.pth \
        --names MAE DeepMIM --data_path digits --num_images 256 --output_dir output_dir/attention

The encoder of each checkpoint (any layout ``util/convert.load_encoder`` reads) runs on
``--num_images`` images of ``data_path/val`` (``eval_transform``), a class-balanced seeded sample
(round robin over the classes, each class in a ``--seed``-ed random order: 256 images of 10 classes
are 26 or 25 of each), the same images for every checkpoint. timm's blocks use fused attention,
which does not return the weights, so a forward pre-hook on every block's ``attn`` recomputes
``softmax(q k^T / sqrt(d_head))`` from the block's own ``qkv`` projection (and ``q_norm`` /
``k_norm``) of its normed input; the model code is unchanged.

Definitions (``A[h, i, j]``: the weight head ``h`` of a layer gives key token ``j`` for query ``i``;
token 0 is the cls token, tokens 1..L the patches):

* **mean attention distance** of a head (pixels, as in the ViT and MAE analyses): for each patch
  query ``i``, ``sum_j A'[h, i, j] * d(i, j)`` over the patch keys ``j``, where ``d`` is the
  Euclidean distance between the patch centres in pixels (patch size x grid distance) and ``A'`` is
  the row restricted to the patch keys and renormalised to sum to 1 (the cls token has no position,
  so it is dropped as query and as key); averaged over the patch queries and the images. All mass on
  the query itself gives 0; uniform attention gives the mean distance between two patches of the
  grid. The mass a head gives the cls key is reported separately (``cls_attention``).
* **attention diversity** of a layer: the Jensen-Shannon divergence (base 2, so in [0, 1]) between
  the attention distributions of two heads for the same patch query (full rows, cls key included:
  no renormalisation needed), averaged over all pairs of heads, the patch queries and the images.
  0 when all heads attend alike; 1 when every pair of heads attends to disjoint tokens.

Writes ``attention.json`` (per checkpoint, per layer: ``distance`` per head, ``mean_distance``,
``diversity``, ``cls_attention`` per head) and ``attention.png`` (distance per head against layer
and diversity against layer, side by side, one colour per checkpoint) into ``--output_dir``.
"""
import argparse
import itertools
import logging
import math
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from util.checkpoints.files import check_writable, save_json
from util.config.cli import Parser, positive_int, seed_int
from util.data.datasets import classification_datasets, eval_transform
from util.run.errors import UserError, run_cli
from util.run.logs import setup_logging

import numpy as np
import torch

import models_vit
from tools.common import add_checkpoint_args, add_device_arg, checkpoint_names, progress, tool_device

_log = logging.getLogger("attention_analysis")


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser("tools/attention_analysis.py", "Attention distance and diversity per layer")
    add_checkpoint_args(p)
    p.add_argument("--data_path", default="digits", help="ImageFolder root with val/ inside, or 'digits'")
    p.add_argument("--num_images", default=256, type=positive_int, metavar="N",
                   help="validation images: a class-balanced seeded sample")
    p.add_argument("--seed", default=0, type=seed_int, help="seed of the image sample")
    p.add_argument("--batch_size", default=64, type=positive_int, metavar="N", help="images per forward pass")
    p.add_argument("--output_dir", default="output_dir/attention", help="results (JSON) and the plots")
    add_device_arg(p)
    return p


# --------------------------------------------------------------------------------------------
# the measures (pure functions of attention maps, so they can be checked by hand)


def patch_distances(grid: Tuple[int, int], patch_size: int) -> torch.Tensor:
    """[L, L] Euclidean distances in pixels between the centres of the patches (row-major grid)."""
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    centres = torch.stack([rows.flatten(), cols.flatten()], dim=1).double() * patch_size
    return torch.cdist(centres, centres)


def mean_attention_distance(attn: torch.Tensor, grid: Tuple[int, int], patch_size: int,
                            num_prefix: int = 1) -> torch.Tensor:
    """Mean attention distance of every head in pixels: [N, H, T, T] -> [H] (see the module docstring)."""
    a = attn[..., num_prefix:, num_prefix:].double()  # patch queries, patch keys
    a = a / a.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    dist = patch_distances(grid, patch_size).to(a.device)
    return (a * dist).sum(dim=-1).mean(dim=(0, 2))


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence in bits between distributions along the last dimension."""
    m = 0.5 * (p + q)
    kl_pm = (torch.xlogy(p, p) - torch.xlogy(p, m)).sum(dim=-1)  # xlogy(0, .) = 0: empty bins add nothing
    kl_qm = (torch.xlogy(q, q) - torch.xlogy(q, m)).sum(dim=-1)
    return (0.5 * (kl_pm + kl_qm) / math.log(2.0)).clamp_min(0.0)


def attention_diversity(attn: torch.Tensor, num_prefix: int = 1) -> float:
    """Mean over head pairs, patch queries and images of the JS divergence of the heads' rows.

    attn: [N, H, T, T]. A layer with one head has no pair: its diversity is 0.
    """
    a = attn[:, :, num_prefix:, :].double()  # patch queries, every key
    pairs = list(itertools.combinations(range(a.shape[1]), 2))
    if not pairs:
        return 0.0
    return float(torch.stack([js_divergence(a[:, h], a[:, g]).mean() for h, g in pairs]).mean())


# --------------------------------------------------------------------------------------------
# attention maps of a timm ViT


class AttentionRecorder:
    """Recomputes every block's attention weights from its ``qkv`` projection in a forward pre-hook.

    ``maps[i]`` holds block ``i``'s [N, H, T, T] weights of the last forward pass.
    """

    def __init__(self, model: models_vit.ViT) -> None:
        self.maps: List[torch.Tensor] = [torch.empty(0)] * len(model.blocks)
        self.handles = [blk.attn.register_forward_pre_hook(self._hook(i)) for i, blk in enumerate(model.blocks)]

    def _hook(self, index: int):
        def hook(attn: torch.nn.Module, inputs: Tuple[torch.Tensor, ...]) -> None:
            x = inputs[0]  # the block's norm1 output [N, T, C]
            n, t, _ = x.shape
            qkv = attn.qkv(x).reshape(n, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
            q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
            self.maps[index] = ((q * attn.scale) @ k.transpose(-2, -1)).float().softmax(dim=-1)

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def analyze(model: models_vit.ViT, imgs: torch.Tensor, batch_size: int = 64, desc: str = "attention"
            ) -> List[Dict[str, Any]]:
    """Per layer: ``distance`` (per head, px), ``mean_distance``, ``diversity``, ``cls_attention`` (per head)."""
    grid = tuple(model.patch_embed.grid_size)
    patch = model.patch_embed.patch_size[0]
    prefix = model.num_prefix_tokens
    depth = len(model.blocks)
    sums: Dict[str, List[Any]] = {"distance": [0.0] * depth, "diversity": [0.0] * depth, "cls": [0.0] * depth}
    recorder = AttentionRecorder(model.eval())
    try:
        for start in progress(range(0, imgs.shape[0], batch_size), desc=desc, unit="batch", leave=False):
            batch = imgs[start:start + batch_size]
            model.forward_features(batch)
            w = batch.shape[0] / imgs.shape[0]  # every measure is a mean over images: weight by batch size
            for i, a in enumerate(recorder.maps):
                sums["distance"][i] = sums["distance"][i] + w * mean_attention_distance(a, grid, patch, prefix)
                sums["diversity"][i] += w * attention_diversity(a, prefix)
                sums["cls"][i] = sums["cls"][i] + w * a[:, :, prefix:, 0].double().mean(dim=(0, 2))
    finally:
        recorder.close()
    return [{"layer": i + 1, "distance": sums["distance"][i].tolist(),
             "mean_distance": float(sums["distance"][i].mean()), "diversity": sums["diversity"][i],
             "cls_attention": sums["cls"][i].tolist()} for i in range(depth)]


def plot(results: Dict[str, List[Dict[str, Any]]], path: Path) -> None:
    """Left: distance of every head against layer (dots) and its mean (line); right: diversity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_d, ax_v) = plt.subplots(1, 2, figsize=(10, 4))
    n = max(1, len(results))
    for c, (name, layers) in enumerate(results.items()):
        color = f"C{c}"
        offset = (c - (n - 1) / 2) * 0.15  # side by side dots per layer
        for entry in layers:
            ax_d.scatter([entry["layer"] + offset] * len(entry["distance"]), entry["distance"], s=10, color=color,
                         alpha=0.6)
        xs = [e["layer"] for e in layers]
        ax_d.plot(xs, [e["mean_distance"] for e in layers], color=color, label=name)
        ax_v.plot(xs, [e["diversity"] for e in layers], color=color, marker="o", ms=3, label=name)
    ax_d.set(xlabel="encoder layer", ylabel="mean attention distance (px)", title="attention distance (dots: heads)")
    ax_v.set(xlabel="encoder layer", ylabel="mean pairwise JS divergence (bits)", title="attention diversity across heads")
    for ax in (ax_d, ax_v):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def balanced_sample(labels: Sequence[int], num: int, seed: int = 0) -> List[int]:
    """``num`` indices taken round robin over the classes (every class's first pick, then every class's
    second, ...), each class in a seeded random order; sorted. Classes that run out drop out of the
    rotation; ``num`` >= the number of labels takes them all."""
    labels = np.asarray(labels)
    rng = np.random.RandomState(seed)
    queues = [rng.permutation(np.flatnonzero(labels == c)).tolist() for c in np.unique(labels)]
    picks: List[int] = []
    for rank in range(max((len(q) for q in queues), default=0)):
        picks += [q[rank] for q in queues if rank < len(q)][:num - len(picks)]
        if len(picks) >= num:
            break
    return sorted(picks)


def load_images(data_path: str, size: int, num_images: int, seed: int = 0) -> torch.Tensor:
    """``num_images`` validation images (:func:`balanced_sample`), ImageNet-normalized: [N, 3, size, size]."""
    _, val, _ = classification_datasets(data_path, None, eval_transform(size), need_train=False)
    if num_images < 1:
        raise UserError("--num_images must be at least 1.")
    return torch.stack([val[i][0] for i in balanced_sample(val.targets, num_images, seed)])


def main(args: argparse.Namespace) -> Dict[str, List[Dict[str, Any]]]:
    names = checkpoint_names(args)
    out = check_writable(args.output_dir)
    setup_logging(0)
    device = tool_device(args.device)
    results: Dict[str, List[Dict[str, Any]]] = {}
    for ckpt, name in zip(args.checkpoints, names):
        model = models_vit.from_checkpoint(ckpt, args.model, args.input_size, args.num_heads).to(device)
        imgs = load_images(args.data_path, model.patch_embed.img_size[0], args.num_images, args.seed).to(device)
        results[name] = analyze(model, imgs, args.batch_size, desc=name)
        _log.info("%s: distance %s px; diversity %s", name,
                  " ".join(f"{e['mean_distance']:.1f}" for e in results[name]),
                  " ".join(f"{e['diversity']:.3f}" for e in results[name]))
    save_json({"results": results, "checkpoints": dict(zip(names, args.checkpoints)),
               "settings": {"data_path": args.data_path, "num_images": args.num_images, "seed": args.seed,
                            "model": args.model}},
              out / "attention.json")
    plot(results, out / "attention.png")
    print(f"wrote {out / 'attention.json'} and {out / 'attention.png'}")
    return results


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
