"""Datasets, transforms and loaders.

* ImageFolder at ``data_path/train`` (and ``/val``) with clear errors for missing / empty folders and
  unreadable images.
* ``--data_path digits``: scikit-learn's bundled handwritten digits (1,797 8x8 images, 10 classes),
  written once to a cache folder as an ImageFolder of 32x32 RGB PNGs with a fixed train / val split,
  so the very same ImageFolder code runs on it.
* Reproducible randomness: the training sampler yields ``(index, seed)`` pairs, and each sample's
  augmentation is seeded from (base seed, epoch, index). A resumed run therefore sees exactly the
  crops an uninterrupted run would have seen, whatever the number of workers.
"""
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterator, Optional, Sequence, Tuple

from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision import datasets, transforms

from util.config import FlagConfig
from util.constants import IMAGENET_MEAN, IMAGENET_STD
from util.errors import UserError
from util.misc import derive_seed, seed_everything
from util.preempt import worker_init

_log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
BUILTIN = "digits"
DIGITS_SIZE = 32
DIGITS_VAL_FRACTION = 0.2
SPLIT_NAMES = {"train": "training", "val": "validation"}  # folder -> what the messages call it


# --------------------------------------------------------------------------------------------
# the built-in dataset


def cache_root() -> Path:
    """Where built-in data is written: ``$DEEPMIM_CACHE`` or ``~/.cache/deepmim``."""
    return Path(os.environ.get("DEEPMIM_CACHE") or Path.home() / ".cache" / "deepmim")


def build_digits(root: Path) -> Path:
    """Write scikit-learn's digits as ``root/digits/{train,val}/<class>/<id>.png`` once; return the folder.

    Each 8x8 image (values 0..16) is scaled to 0..255, resized to 32x32 (bicubic) and stored as RGB.
    The split is fixed: a stratified 20 % of each class (seeded shuffle) goes to ``val``. The folder
    is written under a temporary name and renamed, so an interrupted or concurrent build never leaves
    a half-written dataset behind.
    """
    import numpy as np
    from sklearn.datasets import load_digits

    dest = root / BUILTIN
    if (dest / "train").is_dir() and (dest / "val").is_dir():
        return dest
    root.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    rng = np.random.RandomState(0)
    tmp = Path(tempfile.mkdtemp(prefix=".digits-", dir=root))
    try:
        for cls in range(10):
            idx = np.flatnonzero(digits.target == cls)
            rng.shuffle(idx)
            n_val = int(round(len(idx) * DIGITS_VAL_FRACTION))
            for split, ids in (("val", idx[:n_val]), ("train", idx[n_val:])):
                folder = tmp / split / str(cls)
                folder.mkdir(parents=True, exist_ok=True)
                for i in ids:
                    pixels = (digits.images[i] * (255.0 / 16.0)).round().astype(np.uint8)
                    img = Image.fromarray(pixels, mode="L").resize((DIGITS_SIZE, DIGITS_SIZE), Image.BICUBIC)
                    img.convert("RGB").save(folder / f"{i:04d}.png")
        try:
            os.rename(tmp, dest)
        except OSError:  # another process finished first: keep its copy
            if not (dest / "train").is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _log.info("built-in digits written to %s", dest)
    return dest


def resolve_data_path(data_path: str) -> Path:
    """``digits`` -> the cached built-in dataset (written on first use); anything else as given."""
    if data_path == BUILTIN:
        return build_digits(cache_root())
    return Path(data_path)


# --------------------------------------------------------------------------------------------
# image folders


def _load_image(path: str) -> Image.Image:
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"Cannot read image {path}: {e}. Remove or replace the file.") from None


def _require_folder(root: Path, split: str) -> None:
    if not root.is_dir():
        raise UserError(
            f"{split} folder {str(root)!r} does not exist. --data_path must contain {root.name}/<class>/<image> "
            f"(the ImageNet layout), or be 'digits' for the built-in dataset."
        )


def check_folders(data_path: str, folders: Sequence[str]) -> None:
    """Refuse a ``--data_path`` without these sub-folders (``train``, ``val``) before a run starts:
    the message :func:`image_folder` would give later, once the output folder exists. The built-in
    dataset is not checked (it is written on first use)."""
    if data_path != BUILTIN:
        for name in folders:
            _require_folder(Path(data_path) / name, SPLIT_NAMES.get(name, name))


def image_folder(root: Path, transform, split: str) -> datasets.ImageFolder:
    """``torchvision`` ImageFolder at ``root`` with clear errors for what users get wrong.

    Args:
        split: what the folder holds, for the messages (``"training"``, ``"validation"``).
    """
    _require_folder(root, split)
    try:
        ds = datasets.ImageFolder(str(root), transform=transform, loader=_load_image)
    except FileNotFoundError as e:
        raise UserError(
            f"No images found in {str(root)!r} ({e}). Expected one sub-folder per class holding images "
            f"with extensions {', '.join(IMG_EXTENSIONS)}."
        ) from None
    return ds


def pretrain_transform(input_size: int) -> transforms.Compose:
    """MAE's pre-training augmentation: RandomResizedCrop(scale 0.2-1, bicubic) + flip + normalize."""
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(input_size, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


# --------------------------------------------------------------------------------------------
# reproducible sampling


class SeededSampler(Sampler):
    """Wraps a ``DistributedSampler`` and yields ``(index, seed)`` pairs.

    The seed is a function of (base seed, epoch, index) only, so the augmentation of a sample does
    not depend on the worker that loads it or on what was loaded before. ``skip`` drops the first
    ``skip`` samples of this rank's epoch (mid-epoch resume).
    """

    def __init__(self, base: DistributedSampler, seed: int) -> None:
        self.base = base
        self.seed = seed
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch = epoch
        self.skip = skip
        self.base.set_epoch(epoch)

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        for i, idx in enumerate(self.base):
            if i >= self.skip:
                yield idx, derive_seed(self.seed, self.epoch, idx)

    def __len__(self) -> int:
        return len(self.base) - self.skip


class SeededDataset(Dataset):
    """Applies the wrapped dataset's random transform under the seed that comes with the index."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: Tuple[int, int]):
        idx, seed = key
        seed_everything(seed)
        return self.base[idx]


def train_loader(
    dataset: Dataset,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    num_workers: int,
    pin_mem: bool,
    collate_fn=None,
) -> DataLoader:
    """Shuffled, seeded, distributed training loader (also in a single process: 1 replica)."""
    needed = batch_size * world_size
    if len(dataset) < needed:
        raise UserError(
            f"The training set has {len(dataset)} images, fewer than one batch of {batch_size} x "
            f"{world_size} process(es). Lower --batch_size."
        )
    base = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    return DataLoader(
        SeededDataset(dataset),
        sampler=SeededSampler(base, seed),
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=pin_mem,
        drop_last=True,
        persistent_workers=num_workers > 0,
        collate_fn=collate_fn,
        worker_init_fn=partial(worker_init, os.getpid()),
    )


class FolderData:
    """The training data of the epoch-based scripts, read by global step (``util.trainer.TrainData``).

    Epoch ``e`` is one pass of :func:`train_loader`'s seeded, distributed sampler; a run resumed at
    step ``s`` skips the first ``s % steps_per_epoch`` batches of its epoch without loading them.
    """

    def __init__(self, dataset: Dataset, loader: DataLoader, batch_size: int) -> None:
        self.dataset, self.loader, self.batch_size = dataset, loader, batch_size
        self.num_samples = len(dataset)
        self.steps_per_epoch = len(loader.sampler) // batch_size  # drop_last; the sampler has no skip yet

    def batches(self, start_step: int) -> Iterator:
        epoch, skip = divmod(start_step, self.steps_per_epoch)
        while True:
            self.loader.sampler.set_epoch(epoch, skip=skip * self.batch_size)
            yield from self.loader
            epoch, skip = epoch + 1, 0


class ShardSampler(Sampler):
    """Evaluation sampler: rank r takes indices r, r + W, r + 2W, ... with no padding.

    Unlike ``DistributedSampler`` it never repeats a sample to even out the shards, so summing
    correct counts over ranks counts every validation image exactly once.
    """

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.indices: Sequence[int] = range(rank, length, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def eval_loader(
    dataset: Dataset, batch_size: int, rank: int, world_size: int, num_workers: int, pin_mem: bool
) -> DataLoader:
    """Sequential loader over this rank's shard (the whole set in a single process)."""
    return DataLoader(
        dataset,
        sampler=ShardSampler(len(dataset), rank, world_size),
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=pin_mem,
        drop_last=False,
        persistent_workers=num_workers > 0,
        worker_init_fn=partial(worker_init, os.getpid()),
    )


# --------------------------------------------------------------------------------------------
# classification (fine-tuning, linear probing)


def eval_transform(input_size: int):
    """Resize to ``input_size / 0.875`` (bicubic), center crop, normalize (MAE / DeiT evaluation)."""
    from timm.data import create_transform

    crop_pct = 224 / 256 if input_size <= 224 else 1.0
    return create_transform(input_size, is_training=False, interpolation="bicubic", crop_pct=crop_pct,
                            mean=IMAGENET_MEAN, std=IMAGENET_STD)


def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """Posterize that also accepts 0 bits (a black image), as Pillow did before 13.0.

    timm's RandAugment asks for 0 bits at the top magnitude of ``PosterizeIncreasing`` (m9 with
    ``mstd0.5`` reaches it); Pillow >= 13 raises on it, which would crash fine-tuning mid-epoch.
    """
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point([0] * 256 * len(img.getbands()))
    return ImageOps.posterize(img, bits_to_keep)


def _fix_posterize(transform):
    """Point the posterize ops of timm's RandAugment / AutoAugment inside ``transform`` at :func:`_posterize`."""
    for t in getattr(transform, "transforms", []):
        for op in getattr(t, "ops", []):
            if getattr(op, "name", "").startswith("Posterize"):
                op.aug_fn = _posterize
    return transform


@dataclass(frozen=True)
class AugConfig(FlagConfig):
    """The augmentation flags of fine-tuning (timm's) and linear probing (crop and flip only)."""

    crop_scale: Tuple[float, float] = (0.08, 1.0)
    hflip: float = 0.5
    color_jitter: Optional[float] = None
    aa: str = "rand-m9-mstd0.5-inc1"
    smoothing: float = 0.1
    reprob: float = 0.25
    remode: str = "pixel"
    recount: int = 1
    resplit: bool = False
    mixup: float = 0.0
    cutmix: float = 0.0
    cutmix_minmax: Optional[Tuple[float, ...]] = None
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"


def finetune_transform(input_size: int, aug: AugConfig):
    """timm's training transform: RandomResizedCrop, flip, RandAugment (``--aa``), random erasing."""
    from timm.data import create_transform

    return _fix_posterize(create_transform(
        input_size, is_training=True, scale=tuple(aug.crop_scale), hflip=aug.hflip, color_jitter=aug.color_jitter,
        auto_augment=None if aug.aa in ("", "none") else aug.aa,
        interpolation="bicubic", re_prob=aug.reprob, re_mode=aug.remode, re_count=aug.recount,
        mean=IMAGENET_MEAN, std=IMAGENET_STD,
    ))


def check_augmentation(aug: AugConfig, input_size: int) -> None:
    """Build the fine-tuning transform once, so that a policy timm cannot parse (``--aa``) stops the
    script before a run starts, with one message instead of timm's assertion."""
    try:
        finetune_transform(input_size, aug)
    except Exception as e:  # timm asserts deep inside its policy parser
        raise UserError(
            f"--aa {aug.aa!r}: timm cannot build this augmentation ({e}). Use a RandAugment policy such as "
            f"rand-m9-mstd0.5-inc1, an AutoAugment one (original, v0), augmix-m5, or none."
        ) from None


def linprobe_transform(input_size: int, crop_scale: Sequence[float] = (0.08, 1.0), hflip: float = 0.5
                       ) -> transforms.Compose:
    """MAE's linear-probing augmentation: RandomResizedCrop (bicubic) + flip + normalize."""
    return transforms.Compose([
        transforms.RandomResizedCrop(input_size, scale=tuple(crop_scale), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(hflip),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def classification_datasets(data_path: str, train_transform, val_transform, nb_classes: Optional[int] = None,
                            need_train: bool = True):
    """``(train, val, nb_classes)`` from ``data_path/{train,val}``; ``train`` is None if not needed.

    ``nb_classes`` defaults to the number of class folders; fewer classes than folders is refused
    (labels would run past the head), more is allowed with a warning.
    """
    root = resolve_data_path(data_path)
    val = image_folder(root / "val", val_transform, SPLIT_NAMES["val"])
    train = image_folder(root / "train", train_transform, SPLIT_NAMES["train"]) if need_train else None
    found = len((train or val).classes)
    if train is not None and train.classes != val.classes:
        raise UserError(f"{root}/train and {root}/val have different class folders; they must match.")
    if nb_classes is None:
        nb_classes = found
    elif nb_classes < found:
        raise UserError(f"--nb_classes {nb_classes} but {root} has {found} class folders. Pass --nb_classes {found}.")
    elif nb_classes > found:
        _log.warning("--nb_classes %d but only %d class folders in %s", nb_classes, found, root)
    return train, val, nb_classes
