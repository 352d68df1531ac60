"""What a researcher watches during pre-training, beside the losses: the k-NN accuracy of chosen
encoder layers and the reconstruction figure of every supervised layer.

* **k-NN monitor** (:class:`KnnMonitor`): DINO's weighted k-NN (``evaluation/knn.py``: k = 20, T = 0.07,
  cosine of L2-normalized features, votes ``exp(cos / T)``) on the cls token and on the average of
  the patch tokens of each chosen layer, with a fixed, seeded, class-balanced subset of the training
  folder as the labelled set and one of the validation folder as the test set. The encoder is the
  pre-training model's own encoder without masking, in eval mode, without gradients, under the run's
  autocast: a timm ViT whose parameters *are* the DeepMIM model's (no copy), read through
  ``models_vit.ViT.multi_layer_features``, the per-layer features linear probing uses (raw block
  output for intermediate layers, the last layer's cls token after the final norm; ``evaluation.features``).
  Each process extracts its share of the batches; the features are gathered into full matrices on
  every process (``evaluation.features.gather_by_index``: copied, never added), so several processes
  give exactly the single-process numbers.
* **Reconstructions** (:func:`reconstruct`, :func:`draw`): MAE's figure, one column per supervised
  layer, for every target. ``tools/visualize.py`` draws the same figure from a checkpoint.

Both run at epoch ends (``engine_pretrain.PretrainJob.on_epoch_end``) and leave every random
generator as they found it, so training computes the same numbers with and without them.
"""
import argparse
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from util.config.cli import increasing, nonneg_int, positive_float, positive_int, str2list
from util.config.typed import FlagConfig
from util.data.constants import IMAGENET_MEAN, IMAGENET_STD
from util.data.datasets import eval_transform, holds_images, image_folder, resolve_data_path
from util.data.loader import build_loader
from util.data.shards import is_shard_spec
from util.run import dist as dist_util
from util.run.amp import autocast
from util.run.errors import UserError
from util.run.runner import Run

import torch
from torch import nn

import models_vit
from evaluation import knn
from evaluation.features import POOLS, extract, gather_by_index
from models_deepmim import DeepMIM
from targets.base import Target, compute_targets
from targets.losses import LOSSES
from targets.pixel import PixelTarget, patch_mean_std, patchify, unpatchify

_log = logging.getLogger(__name__)

AUTO_MAX_IMAGES = 200_000  # --knn_every / --recon_every auto: on for training folders up to this size
AUTO_EVERY = 2  # epochs between evaluations when auto turns the monitor on
CACHE_BYTES = 256 * 2**20  # a process keeps its decoded k-NN images when they take at most this


def add_monitor_args(parser: argparse.ArgumentParser) -> None:
    """The monitor's flags (k-NN accuracy, reconstructions in TensorBoard, W&B) for ``main_pretrain.py``."""
    g = parser.add_argument_group("monitoring", "what is watched during pre-training (docs/PRETRAIN.md: Monitoring)")
    g.add_argument("--knn_every", default=None, type=nonneg_int, metavar="N",
                   help=f"k-NN accuracy every N epochs and at the last (0: off; default: every {AUTO_EVERY} for an "
                        f"image folder with train/ and val/ of at most {AUTO_MAX_IMAGES} training images, else off)")
    g.add_argument("--knn_layers", default=None, type=str2list(positive_int, increasing), metavar="LAYERS",
                   help="encoder layers (1-based) the k-NN monitor reads (default: the supervised layers)")
    g.add_argument("--knn_train_per_class", default=20, type=nonneg_int, metavar="N",
                   help="labelled training images per class of the k-NN monitor (seeded; 0: all)")
    g.add_argument("--knn_val_per_class", default=10, type=nonneg_int, metavar="N",
                   help="validation images per class the k-NN monitor classifies (seeded; 0: all)")
    g.add_argument("--knn_k", default=knn.DEFAULT_K, type=positive_int, metavar="K", help="neighbours of the k-NN classifier")
    g.add_argument("--knn_temperature", default=knn.DEFAULT_TEMPERATURE, type=positive_float, metavar="T",
                   help="temperature T of the k-NN votes exp(cos / T)")
    g.add_argument("--knn_batch_size", default=256, type=positive_int, metavar="N",
                   help="images per forward pass of the k-NN monitor")
    g.add_argument("--monitor_data_path", default=None, type=str, metavar="FOLDER",
                   help="image folder (train/, val/) the monitor reads (default: --data_path; needed with shards)")
    g.add_argument("--recon_every", default=None, type=nonneg_int, metavar="N",
                   help="reconstruction figure in TensorBoard every N epochs and at the last (0: off; default: "
                        "twice the --knn_every interval)")
    g.add_argument("--recon_images", default=4, type=positive_int, metavar="N",
                   help="validation images (rows) of the reconstruction figure, one per class in turn")
    g.add_argument("--wandb", action="store_true", help="also log to Weights & Biases (pip install wandb; offline: "
                                                         "WANDB_MODE=offline)")
    g.add_argument("--wandb_project", default="deepmim", type=str, help="W&B project")
    g.add_argument("--wandb_name", default=None, type=str, help="W&B run name (default: W&B's)")


@dataclass(frozen=True)
class MonitorConfig(FlagConfig):
    """The monitor's flags (:func:`add_monitor_args`); ``None`` intervals are resolved by :meth:`resolved`."""

    knn_every: Optional[int] = None
    knn_layers: Optional[Tuple[int, ...]] = None
    knn_train_per_class: int = 20
    knn_val_per_class: int = 10
    knn_k: int = knn.DEFAULT_K
    knn_temperature: float = knn.DEFAULT_TEMPERATURE
    knn_batch_size: int = 256
    monitor_data_path: Optional[str] = None
    recon_every: Optional[int] = None
    recon_images: int = 4
    wandb: bool = False
    wandb_project: str = "deepmim"
    wandb_name: Optional[str] = None

    def validate(self, data_path: str, depth: int) -> None:
        """Refuse bad monitor flags before the run starts (nothing is written yet).

        Args:
            data_path: ``--data_path``.
            depth: the encoder's number of blocks (``--knn_layers`` are 1-based block indices).
        """
        for name in ("knn_every", "recon_every", "knn_train_per_class", "knn_val_per_class"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise UserError(f"--{name} {value}: must be 0 or more.")
        for name in ("knn_k", "knn_batch_size", "recon_images"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} {getattr(self, name)}: must be at least 1.")
        if not self.knn_temperature > 0:
            raise UserError(f"--knn_temperature {self.knn_temperature}: must be positive.")
        bad = [x for x in self.knn_layers or () if not 1 <= x <= depth]
        if bad:
            raise UserError(f"--knn_layers {bad} outside 1..{depth}: layers are 1-based block indices of this "
                            f"{depth}-block encoder.")
        folder = self.monitor_data_path or data_path
        asked = bool(self.knn_every) or bool(self.recon_every)
        if asked and is_shard_spec(folder):
            raise UserError(f"--knn_every / --recon_every read images from an image folder, but --data_path "
                            f"{data_path!r} is tar shards: pass --monitor_data_path FOLDER (with train/ and val/), "
                            f"or --knn_every 0 --recon_every 0.")
        if asked:
            root = resolve_data_path(folder)
            for split in ("train", "val"):
                if not (root / split).is_dir():
                    raise UserError(f"The k-NN monitor and the reconstructions read labelled images from {root}/train "
                                    f"and {root}/val, and {root / split} does not exist: pass --monitor_data_path "
                                    f"FOLDER (ImageFolder layout, train/ and val/), or --knn_every 0 --recon_every 0.")
                if holds_images(root / split):
                    raise UserError(f"The k-NN monitor and the reconstructions need labelled images, and {root / split} "
                                    f"holds images without class sub-folders: pass --monitor_data_path FOLDER "
                                    f"(ImageFolder layout, train/<class>/<image> and val/<class>/<image>), or "
                                    f"--knn_every 0 --recon_every 0.")

    def resolved(self, data_path: str, num_train_images: int) -> "MonitorConfig":
        """The intervals this run uses. Default (``None``): every :data:`AUTO_EVERY` epochs when the
        training data is a labelled image folder with ``train/`` and ``val/`` of at most :data:`AUTO_MAX_IMAGES`
        training images (the built-in digits, CIFAR-sized sets), else off (ImageNet-sized data: ask
        with ``--knn_every N``).

        The flags are checked first (:meth:`validate`).
        """
        folder = self.monitor_data_path or data_path
        with_val = not is_shard_spec(folder) and all(  # labelled: class sub-folders, not a flat folder
            (resolve_data_path(folder) / s).is_dir() and not holds_images(resolve_data_path(folder) / s)
            for s in ("train", "val"))
        auto = AUTO_EVERY if with_val and num_train_images <= AUTO_MAX_IMAGES else 0
        knn_every = auto if self.knn_every is None else self.knn_every
        # a figure costs about what a k-NN evaluation costs (digits: 0.7 against 1.5 s): half as often
        recon_every = 2 * knn_every if self.recon_every is None else self.recon_every
        return self.replace(knn_every=knn_every, recon_every=recon_every, monitor_data_path=folder)


def due(every: Optional[int], epoch: int, epochs: int) -> bool:
    """Whether a monitor with interval ``every`` runs after ``epoch`` (0-based) of ``epochs``."""
    return bool(every) and ((epoch + 1) % every == 0 or epoch + 1 == epochs)


# --------------------------------------------------------------------------------------------
# the encoder without masking


def shared_encoder(model: DeepMIM) -> models_vit.ViT:
    """A headless timm ViT whose parameters are ``model``'s encoder tensors themselves (no copy).

    Built on the meta device, then given the DeepMIM tensors with ``assign``: it always sees the
    current weights and costs no memory. Its forward is the DeepMIM encoder's without masking
    (patch embedding + fixed sin-cos position, cls token, the same timm blocks, the final norm).
    """
    cfg = model.cfg
    with torch.device("meta"):
        vit = models_vit.build_vit(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                                   embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads,
                                   mlp_ratio=cfg.mlp_ratio, num_classes=0, global_pool="token")
    own = model.state_dict(keep_vars=True)
    vit.load_state_dict({k: own[k] for k in vit.state_dict()}, strict=True, assign=True)
    return vit.eval()


# --------------------------------------------------------------------------------------------
# k-NN monitor


class KnnMonitor:
    """k-NN top-1 of chosen layers on fixed train / val subsets (module docstring).

    Args:
        model: the DeepMIM model (plain, unwrapped).
        cfg: the resolved monitor settings.
        device / amp_dtype: where and in which precision the encoder runs.
        seed: the run's seed (the subsets are drawn with it).
        num_workers: loader processes that decode the subsets.
    """

    def __init__(self, model: DeepMIM, cfg: MonitorConfig, device: torch.device, amp_dtype: Optional[torch.dtype],
                 seed: int, num_workers: int = 0) -> None:
        cfg.validate(cfg.monitor_data_path, model.cfg.depth)
        self.layers = tuple(cfg.knn_layers or model.cfg.ds_layers)
        self.cfg, self.device, self.amp_dtype = cfg, device, amp_dtype
        self.encoder = shared_encoder(model)
        root = resolve_data_path(cfg.monitor_data_path)
        transform = eval_transform(model.cfg.img_size)
        self.sets, self.num_classes = {}, 0
        for split, per_class, what in (("train", cfg.knn_train_per_class, "training"),
                                       ("val", cfg.knn_val_per_class, "validation")):
            ds = image_folder(root / split, transform, what)
            idx = knn.balanced_subset(ds.targets, per_class, seed + (split == "val"))
            self.sets[split] = (torch.utils.data.Subset(ds, idx), torch.tensor([ds.targets[i] for i in idx]))
            self.num_classes = max(self.num_classes, len(ds.classes))
        bs = cfg.knn_batch_size
        # fixed batches: batch b holds the same images in every run, whatever the number of processes
        self.rows = {split: [list(range(s, min(s + bs, len(subset)))) for s in range(0, len(subset), bs)]
                     for split, (subset, _) in self.sets.items()}
        self.num_workers = num_workers
        self._cache: Dict[str, Dict[int, torch.Tensor]] = {}
        # (layer, ViT pool) pairs read, and their names in logs: L6_cls, L6_avg, ...
        self.pairs = [(layer, POOLS[pool]) for layer in self.layers for pool in POOLS]
        self.names = [f"L{layer}_{pool}" for layer in self.layers for pool in POOLS]

    def describe(self) -> str:
        n_train, n_val = (len(self.sets[s][0]) for s in ("train", "val"))
        return (f"k-NN monitor: layers {list(self.layers)} (cls, avg), k={self.cfg.knn_k}, T={self.cfg.knn_temperature}, "
                f"{n_train} train / {n_val} val images of {self.cfg.monitor_data_path}, every {self.cfg.knn_every} "
                f"epoch(s)")

    def _my_batches(self, split: str) -> Iterable[Tuple[int, torch.Tensor]]:
        """(batch number, images) of this process's share of ``split``'s batches: every world-th batch.

        The images are decoded once and kept when this share is small (at most :data:`CACHE_BYTES`),
        else read again at every evaluation.
        """
        if split in self._cache:
            return self._cache[split].items()
        subset, _ = self.sets[split]
        rows, world, rank = self.rows[split], dist_util.get_world_size(), dist_util.get_rank()
        mine = list(range(rank, len(rows), world))
        loader = build_loader(subset, batch_sampler=[rows[b] for b in mine], num_workers=self.num_workers if mine else 0)
        batches = ((b, imgs) for b, (imgs, _) in zip(mine, loader))
        side = self.encoder.patch_embed.img_size
        if sum(len(rows[b]) for b in mine) * 3 * side[0] * side[1] * 4 <= CACHE_BYTES:
            self._cache[split] = dict(batches)
            return self._cache[split].items()
        return batches

    @torch.no_grad()
    def features(self, split: str) -> Dict[str, torch.Tensor]:
        """Features of every chosen layer and pool on ``split``'s subset, the same on every process:
        name (``L6_cls`` ...) -> [n, D] float32 on the device."""
        subset, labels = self.sets[split]
        rows = self.rows[split]
        batches = ((imgs, torch.as_tensor(rows[b])) for b, imgs in self._my_batches(split))
        feats, ids = extract(self.encoder, self.pairs, batches, self.device, self.amp_dtype)
        feats, _ = gather_by_index(feats, labels[ids], ids, len(subset), self.device)
        return {name: f.to(self.device) for name, f in zip(self.names, feats)}

    def evaluate(self) -> Dict[str, float]:
        """k-NN top-1 (%) of every layer and pool: ``{'L6_cls': ..., 'L6_avg': ..., ...}``."""
        train, val = self.features("train"), self.features("val")
        train_y, val_y = self.sets["train"][1], self.sets["val"][1]
        return {name: knn.knn_accuracy(train[name], train_y, val[name], val_y, self.num_classes, self.cfg.knn_k,
                                       self.cfg.knn_temperature) for name in self.names}


def knn_line(epoch: int, acc: Dict[str, float], seconds: float) -> str:
    """``epoch 3: k-NN top-1 L6 41.0/45.0 L8 ... (cls/avg, 1.2 s)``."""
    layers = dict.fromkeys(name.split("_")[0] for name in acc)
    parts = " ".join(f"{layer} {acc[f'{layer}_cls']:.1f}/{acc[f'{layer}_avg']:.1f}" for layer in layers)
    return f"epoch {epoch}: k-NN top-1 {parts} (cls/avg, {seconds:.1f} s)"


# --------------------------------------------------------------------------------------------
# reconstructions


def pick_images(data_path: str, size: int, num_images: int) -> torch.Tensor:
    """``num_images`` validation images, one per class in turn: [N, 3, size, size], ImageNet-normalized."""
    val = image_folder(resolve_data_path(data_path) / "val", eval_transform(size), "validation")
    by_class: Dict[int, List[int]] = {}
    for i, (_, label) in enumerate(val.samples):
        by_class.setdefault(label, []).append(i)
    # round robin over the classes: the first image of each class, then the second, ...
    order = [i for group in itertools.zip_longest(*by_class.values()) for i in group if i is not None]
    return torch.stack([val[i][0] for i in order[:max(1, num_images)]])


def pca_rgb(reference: torch.Tensor, others: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Tokens in a feature space as colours: the 3 principal components of ``reference`` [N, L, C],
    scaled to 0..1 by its own range; ``others`` (predictions in the same space) go through the same
    projection and scale, so equal colours mean equal features.

    Returns:
        reference [N, L, 3] and each of ``others`` [N, L, 3], in 0..1.
    """
    x = reference.float().reshape(-1, reference.shape[-1])
    mean = x.mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)
    basis = vh[:3]
    basis = basis * torch.sign(basis.gather(1, basis.abs().argmax(1, keepdim=True)))  # a fixed sign per component
    if basis.shape[0] < 3:
        basis = torch.cat([basis, torch.zeros(3 - basis.shape[0], basis.shape[1])])
    proj = (x - mean) @ basis.T
    lo, hi = proj.min(0).values, proj.max(0).values
    scale = (hi - lo).clamp_min(1e-8)

    def colour(t: torch.Tensor) -> torch.Tensor:
        p = (t.float().reshape(-1, t.shape[-1]) - mean) @ basis.T
        return ((p - lo) / scale).clamp(0, 1).reshape(*t.shape[:-1], 3)

    return colour(reference), [colour(o) for o in others]


@torch.no_grad()
def reconstruct(model: DeepMIM, targets: Dict[str, Target], layer_targets: Sequence[str], imgs: torch.Tensor,
                mask_ratio: float, seed: int, amp_dtype: Optional[torch.dtype] = None) -> Dict[str, Any]:
    """Every supervised layer's prediction for one fixed mask (the model's own masking, seeded noise).

    Args:
        targets / layer_targets: the run's targets and the one each supervised layer reconstructs.
        imgs: [N, 3, H, W] ImageNet-normalized, on the model's device.

    Returns (on the CPU): ``mask`` [N, L] (1 = removed), ``masked`` [N, 3, H, W] (removed patches zero,
    i.e. the mean), ``losses`` [K, N] (per image, masked patches, as in training), and per layer
    ``panels[k]``: ``{'recon': [N, 3, H, W]}`` for pixels (visible patches pasted, de-normalized
    with the true patch's statistics under ``--norm_pix_loss``), else ``{'pca': [N, L, 3],
    'cosine': [N, L]}`` (the prediction in the target's PCA colours; its cosine to the target);
    ``target_pca``: name -> [N, L, 3] for each feature target.
    """
    cfg = model.cfg
    p, device = cfg.patch_size, imgs.device
    was_training = model.training
    model.eval()
    tgt = compute_targets(targets, imgs)
    noise = torch.rand(imgs.shape[0], cfg.grid[0] * cfg.grid[1], generator=torch.Generator().manual_seed(seed))
    with autocast(device, amp_dtype):
        out = model(imgs, [tgt[n] for n in layer_targets], mask_ratio=mask_ratio, noise=noise.to(device),
                    return_pred=True)
    model.train(was_training)
    mask = out.mask.float().cpu()
    preds = [pr.float().cpu() for pr in out.preds]
    tgt = {n: t.cpu() for n, t in tgt.items()}
    patches = patchify(imgs.float().cpu(), p)  # [N, L, p*p*3]
    losses = torch.stack([(LOSSES[name](pred, tgt[t]) * mask).sum(1) / mask.sum(1)
                          for pred, name, t in zip(preds, cfg.losses, layer_targets)])
    panels: List[Dict[str, torch.Tensor]] = [{} for _ in preds]
    target_pca: Dict[str, torch.Tensor] = {}
    for name in dict.fromkeys(layer_targets):
        ks = [k for k, t in enumerate(layer_targets) if t == name]
        if isinstance(targets[name], PixelTarget):
            for k in ks:
                pred = preds[k]
                if targets[name].norm_pix:  # back from per-patch normalized pixels with the true patch's statistics
                    mean, std = patch_mean_std(patches)
                    pred = pred * std + mean
                pasted = patches * (1 - mask[..., None]) + pred * mask[..., None]
                panels[k] = {"recon": unpatchify(pasted, p, cfg.grid)}
        else:  # features: the target's PCA colours for the target and its layers' predictions
            target_pca[name], mapped = pca_rgb(tgt[name], [preds[k] for k in ks])
            for k, colours in zip(ks, mapped):
                panels[k] = {"pca": colours, "cosine": nn.functional.cosine_similarity(preds[k], tgt[name], dim=-1)}
    return {"mask": mask, "masked": unpatchify(patches * (1 - mask[..., None]), p, cfg.grid), "losses": losses,
            "panels": panels, "target_pca": target_pca, "layer_targets": list(layer_targets)}


def to_display(imgs: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalized [N, 3, H, W] -> [N, H, W, 3] in 0..1."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (imgs.float().cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1)


def draw(imgs: torch.Tensor, rec: Dict[str, Any], layers: Sequence[int], grid: Tuple[int, int], title: str = ""):
    """The figure of :func:`reconstruct`: one row per image; columns: the image, the masked input,
    each feature target in PCA colours, then per supervised layer its reconstruction (pixels) or its
    prediction in the target's PCA colours and its per-patch cosine to the target (colour bar),
    with removed patches outlined. Titles give each layer's loss on the image (masked patches)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels, names = rec["panels"], rec["layer_targets"]
    columns: List[Tuple[str, Any]] = [("image", None), ("masked", None)]
    columns += [(f"{name} target (PCA)", ("target", name)) for name in rec["target_pca"]]
    for k, layer in enumerate(layers):
        if "recon" in panels[k]:
            columns.append((f"L{layer}", ("recon", k)))
        else:
            columns += [(f"L{layer} {names[k]} (PCA)", ("pca", k)), (f"L{layer} cos", ("cosine", k))]
    n = imgs.shape[0]
    fig, axes = plt.subplots(n, len(columns), figsize=(1.5 * len(columns) + 0.8, 1.6 * n + 0.4), squeeze=False,
                             layout="constrained")
    originals, masked = to_display(imgs).numpy(), to_display(rec["masked"]).numpy()
    cos_image, cos_axes = None, []
    for r in range(n):
        removed = rec["mask"][r].nonzero().flatten().tolist()
        for c, (label, what) in enumerate(columns):
            ax = axes[r, c]
            if what is None:
                ax.imshow(originals[r] if c == 0 else masked[r])
                ax.set_title(label if r == 0 else "", fontsize=7)
            elif what[0] == "target":
                ax.imshow(rec["target_pca"][what[1]][r].reshape(*grid, 3).numpy())
                ax.set_title(label if r == 0 else "", fontsize=7)
            else:
                k = what[1]
                loss = float(rec["losses"][k, r])
                if what[0] == "recon":
                    ax.imshow(to_display(panels[k]["recon"][r:r + 1])[0].numpy())
                elif what[0] == "pca":
                    ax.imshow(panels[k]["pca"][r].reshape(*grid, 3).numpy())
                else:
                    cos_image = ax.imshow(panels[k]["cosine"][r].reshape(grid).numpy(), cmap="RdBu_r", vmin=-1,
                                          vmax=1)
                    cos_axes.append(ax)
                if what[0] != "recon":
                    for i in removed:  # outline the removed patches
                        y, x = divmod(i, grid[1])
                        ax.add_patch(plt.Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, lw=0.4, ec="k"))
                ax.set_title(f"{label} loss {loss:.3f}" if r == 0 else f"{loss:.3f}", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
    if cos_image is not None:
        fig.colorbar(cos_image, ax=cos_axes, shrink=0.8, label="cos(prediction, target)")
    fig.suptitle(title or "decoder of each supervised layer (removed patches predicted, visible ones pasted)",
                 fontsize=8)
    return fig


class ReconstructionMonitor:
    """The reconstruction figure of fixed validation images every ``--recon_every`` epochs (rank 0).

    Args:
        model / targets / layer_targets: the run's model and targets.
        cfg: the resolved monitor settings.
        mask_ratio: the run's.
        device / amp_dtype: where and in which precision the model runs.
        seed: the seed of the masking noise (the same mask every time).
    """

    def __init__(self, model: DeepMIM, targets: Dict[str, Target], layer_targets: Sequence[str], cfg: MonitorConfig,
                 mask_ratio: float, device: torch.device, amp_dtype: Optional[torch.dtype], seed: int) -> None:
        self.model, self.targets, self.layer_targets = model, targets, list(layer_targets)
        self.mask_ratio, self.amp_dtype, self.seed = mask_ratio, amp_dtype, seed
        self.imgs = pick_images(cfg.monitor_data_path, model.cfg.img_size, cfg.recon_images).to(device)

    def figure(self, epoch: int):
        rec = reconstruct(self.model, self.targets, self.layer_targets, self.imgs, self.mask_ratio, self.seed,
                          self.amp_dtype)
        return draw(self.imgs, rec, self.model.cfg.ds_layers, self.model.cfg.grid, f"epoch {epoch}: decoder of each "
                    f"supervised layer (mask ratio {self.mask_ratio})")


class Monitor:
    """Both monitors of a run, called at every epoch end (:meth:`on_epoch_end`)."""

    def __init__(self, knn_monitor: Optional[KnnMonitor], recon: Optional[ReconstructionMonitor],
                 cfg: MonitorConfig) -> None:
        self.knn, self.recon, self.cfg = knn_monitor, recon, cfg

    def before_training(self, run: Run) -> Dict[str, float]:
        """The k-NN accuracy of the encoder before its first step (the baseline every later value is
        compared with): ``{'knn_init_L6_cls': ...}`` for the epoch-0 line of ``log.txt``, and the
        TensorBoard scalars ``knn/*`` at step 0. Random generators restored afterwards."""
        if self.knn is None:
            return {}
        cuda = [run.device] if run.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            t0 = time.perf_counter()
            acc = self.knn.evaluate()
        _log.info("%s", knn_line(-1, acc, time.perf_counter() - t0).replace("epoch -1", "before training"))
        run.tb.scalars({f"knn/{k}": v for k, v in acc.items()}, 0)
        return {f"knn_init_{k}": v for k, v in acc.items()}

    def on_epoch_end(self, run: Run, epoch: int, epochs: int, step: int) -> Dict[str, float]:
        """Run what is due after ``epoch`` of ``epochs``: returns the ``log.txt`` fields
        (``knn_L6_cls`` ...); writes the TensorBoard scalars (``knn/L6_cls`` ...) and the figure
        (``reconstruction``) on rank 0 at global step ``step``, the x-axis of the ``train/*`` curves.

        Every random generator torch keeps is restored afterwards (``torch.random.fork_rng``), so that
        training continues with exactly the numbers it would have drawn without the monitor.
        """
        record: Dict[str, float] = {}
        cuda = [run.device] if run.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            if self.knn is not None and due(self.cfg.knn_every, epoch, epochs):
                t0 = time.perf_counter()
                acc = self.knn.evaluate()
                _log.info("%s", knn_line(epoch, acc, time.perf_counter() - t0))
                run.tb.scalars({f"knn/{k}": v for k, v in acc.items()}, step)
                record = {f"knn_{k}": v for k, v in acc.items()}
            if self.recon is not None and run.is_main and due(self.cfg.recon_every, epoch, epochs):
                run.tb.figure("reconstruction", self.recon.figure(epoch), step)
        return record


def build_monitor(run: Run, model: DeepMIM, targets: Dict[str, Target], layer_targets: Sequence[str],
                  cfg: MonitorConfig, mask_ratio: float, seed: int, num_workers: int) -> Optional[Monitor]:
    """The run's monitor from the resolved settings (None when both parts are off). The k-NN part
    runs on every process (each extracts its share); the figure only on rank 0."""
    knn_monitor = KnnMonitor(model, cfg, run.device, run.amp_dtype, seed, num_workers) if cfg.knn_every else None
    recon = None
    if cfg.recon_every and run.is_main:
        recon = ReconstructionMonitor(model, targets, layer_targets, cfg, mask_ratio, run.device, run.amp_dtype, seed)
    if knn_monitor is not None:
        _log.info("%s", knn_monitor.describe())
    if cfg.recon_every:
        _log.info("reconstruction figure of %d validation images in TensorBoard every %d epoch(s)", cfg.recon_images,
                  cfg.recon_every)
    return Monitor(knn_monitor, recon, cfg) if knn_monitor is not None or cfg.recon_every else None
