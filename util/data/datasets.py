"""Datasets, transforms and loaders.

* ImageFolder at ``data_path/train`` (and ``/val``) with clear errors for missing / empty folders and
  unreadable images.
* Unlabelled images for pre-training (:func:`pretrain_images`): a flat folder (``data_path`` holding
  images itself, or ``train/`` holding them directly), listed recursively in sorted path order; each
  image comes with the label :data:`NO_LABEL`, which pre-training never reads.
* ``--data_path digits``: scikit-learn's bundled handwritten digits (1,797 8x8 images, 10 classes),
  written once to a cache folder as an ImageFolder of 32x32 RGB PNGs with a fixed train / val split,
  so the very same ImageFolder code runs on it.
* Reproducible randomness: the training sampler yields ``(index, seed)`` pairs, and each sample's
  augmentation is seeded from (base seed, epoch, index). A resumed run therefore sees exactly the
  crops an uninterrupted run would have seen, whatever the number of workers.
* :class:`FolderData`: the step-counted training data source (``batches(start_step)``) over a
  folder; ``util.data.shards.ShardData`` is the same over tar shards, ``util.data`` picks one.
* A transform with ``accepts_encoded`` (``util.data.decode.DecodeTransform``: ``pretrain_transform(size,
  decode='auto')``) gets the file's bytes and decodes them itself (faster JPEG path).
"""
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

from util.config.ranges import OrderedPair, StrictPair, nonneg_float, positive_int, probability, rate, share
from util.config.typed import FlagConfig, flag
from util.data.constants import IMAGENET_MEAN, IMAGENET_STD
from util.data.decode import DecodeTransform, read_encoded, rgb8
from util.data.loader import build_loader
from util.run.errors import UserError
from util.run.seed import derive_seed, seed_host

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision import datasets, transforms

_log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
BUILTIN = "digits"
DIGITS_SIZE = 32
DIGITS_VAL_FRACTION = 0.2
SPLIT_NAMES = {"train": "training", "val": "validation"}  # folder -> what the messages call it
NO_LABEL = -1  # the label of an image that has none (unlabelled data: pre-training only)


# --------------------------------------------------------------------------------------------
# the built-in dataset


def cache_root() -> Path:
    """Where built-in data is written: ``$DEEPMIM_CACHE`` or ``~/.cache/deepmim``."""
    return Path(os.environ.get("DEEPMIM_CACHE") or Path.home() / ".cache" / "deepmim")


@contextmanager
def building(dest: Path) -> Iterator[Path]:
    """A temporary folder beside ``dest`` to write a built-in dataset into, renamed to ``dest`` when
    the block succeeds: an interrupted or concurrent build never leaves a half-written folder (when
    another process finished first, its copy is kept)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        yield tmp
        try:
            os.rename(tmp, dest)
        except OSError:  # another process finished first: keep its copy
            if not dest.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_digits(root: Path) -> Path:
    """Write scikit-learn's digits as ``root/digits/{train,val}/<class>/<id>.png`` once; return the folder.

    Each 8x8 image (values 0..16) is scaled to 0..255, resized to 32x32 (bicubic) and stored as RGB.
    The split is fixed: a stratified 20 % of each class (seeded shuffle) goes to ``val``. The folder
    is written under a temporary name and renamed, so an interrupted or concurrent build never leaves
    a half-written dataset behind.
    """
    from sklearn.datasets import load_digits

    dest = root / BUILTIN
    if (dest / "train").is_dir() and (dest / "val").is_dir():
        return dest
    digits = load_digits()
    rng = np.random.RandomState(0)
    with building(dest) as tmp:
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
    _log.info("built-in digits written to %s", dest)
    return dest


def resolve_data_path(data_path: str) -> Path:
    """``digits`` -> the cached built-in dataset (written on first use); anything else as given."""
    if data_path == BUILTIN:
        return build_digits(cache_root())
    return Path(data_path)


# --------------------------------------------------------------------------------------------
# image folders


# Pillow's modes of 16-bit single-channel images: PNG / TIFF / PGM (``I;16*``), and ``I`` (32-bit
# integers: how Pillow before 10 opened 16-bit PNGs)


def _load_image(path: str) -> Image.Image:
    try:
        with open(path, "rb") as f:
            return rgb8(Image.open(f))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"Cannot read image {path}: {e}. Remove or replace the file.") from None


def _require_folder(root: Path, split: str) -> None:
    if not root.is_dir():
        raise UserError(
            f"{split} folder {str(root)!r} does not exist. --data_path must contain {root.name}/<class>/<image> "
            f"(the ImageNet layout), or be 'digits' for the built-in dataset."
        )


def check_folders(data_path: str, folders: Sequence[str]) -> None:
    """Refuse a ``--data_path`` without these sub-folders (``train``, ``val``), or whose sub-folders hold
    images without class folders (labels are needed), before a run starts:
    the message :func:`image_folder` would give later, once the output folder exists. The built-in
    dataset is not checked (it is written on first use)."""
    if data_path != BUILTIN:
        for name in folders:
            _require_folder(Path(data_path) / name, SPLIT_NAMES.get(name, name))
            check_labelled(Path(data_path) / name, SPLIT_NAMES.get(name, name))


def image_folder(root: Path, transform, split: str) -> datasets.ImageFolder:
    """``torchvision`` ImageFolder at ``root`` with clear errors for what users get wrong.

    Args:
        split: what the folder holds, for the messages (``"training"``, ``"validation"``).
    """
    _require_folder(root, split)
    # a transform that decodes itself (util.decode) gets the file's bytes
    loader = read_encoded if getattr(transform, "accepts_encoded", False) else _load_image
    try:
        ds = datasets.ImageFolder(str(root), transform=transform, loader=loader)
    except FileNotFoundError as e:
        check_labelled(root, split)
        raise UserError(
            f"No images found in {str(root)!r} ({e}). Expected one sub-folder per class holding images "
            f"with extensions {', '.join(IMG_EXTENSIONS)}."
        ) from None
    return ds


def check_labelled(root: Path, split: str) -> None:
    """Refuse a flat folder (images without class sub-folders) where a job needs labels."""
    if holds_images(root):
        raise UserError(
            f"The {split} folder {str(root)!r} holds images without class sub-folders: {split} data needs labels "
            f"({root.name}/<class>/<image>); unlabelled images serve pre-training only. Pass a labelled --data_path."
        )


def holds_images(folder: Path) -> bool:
    """Whether ``folder`` holds image files itself (a flat folder rather than class sub-folders)."""
    try:
        with os.scandir(folder) as entries:
            return any(not e.name.startswith(".") and e.name.lower().endswith(IMG_EXTENSIONS) and e.is_file()
                       for e in entries)
    except OSError:
        return False


def list_images(root: Path) -> List[str]:
    """Every image file under ``root`` (the extensions of :data:`IMG_EXTENSIONS`, any case), recursively,
    following links, hidden files and folders skipped; sorted by path, so the order (and with it every
    sample's index and seed) is the same on every machine."""
    found = []
    for folder, subfolders, files in os.walk(root, followlinks=True):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        found += [os.path.join(folder, f) for f in files if not f.startswith(".") and f.lower().endswith(IMG_EXTENSIONS)]
    return sorted(found)


class UnlabelledImages(Dataset):
    """The images of a flat folder (:func:`list_images`), each as ``(transformed image, NO_LABEL)``.

    ``samples`` and ``classes`` (none) as ImageFolder has them.
    """

    def __init__(self, root: Path, transform) -> None:
        self.root, self.transform = root, transform
        self.samples = [(path, NO_LABEL) for path in list_images(root)]
        self.classes: List[str] = []
        if not self.samples:
            raise UserError(f"No images found in {str(root)!r} (extensions {', '.join(IMG_EXTENSIONS)}).")
        self.loader = read_encoded if getattr(transform, "accepts_encoded", False) else _load_image

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int) -> Tuple[Any, int]:
        img = self.loader(self.samples[idx][0])
        return (self.transform(img) if self.transform is not None else img), NO_LABEL


def pretrain_root(data_path: str) -> Path:
    """The folder pre-training reads: ``train/`` when there is one, else ``data_path`` itself when it
    holds images (a flat folder of unlabelled images). Refuses anything else (before a run starts)."""
    root = resolve_data_path(data_path)
    if (root / "train").is_dir():
        return root / "train"
    if holds_images(root):
        return root
    raise UserError(
        f"training folder {str(root / 'train')!r} does not exist. --data_path must contain train/<class>/<image> "
        f"(the ImageNet layout) or images itself (a flat folder of unlabelled images, for pre-training), or be "
        f"'digits' for the built-in dataset."
    )


def pretrain_images(data_path: str, transform) -> Dataset:
    """Pre-training's images of ``data_path``: an ImageFolder (labels kept, never read) where the folder
    has class sub-folders, else the unlabelled images of a flat folder (:class:`UnlabelledImages`)."""
    folder = pretrain_root(data_path)
    if holds_images(folder):
        return UnlabelledImages(folder, transform)
    return image_folder(folder, transform, "training")


def with_decode(transform, decode: str = "auto"):
    """``transform`` as is for ``decode='pil'`` (PIL decodes the whole image first: the reference),
    else wrapped in :class:`util.data.decode.DecodeTransform` (``auto``: the fast path for JPEGs, the
    reference for every other format; ``nvjpeg``: GPU decoding). Works for the pre-training, linear
    probing and timm fine-tuning transforms (all start with a random resized crop)."""
    return transform if decode == "pil" else DecodeTransform(transform, decode)


def pretrain_transform(input_size: int, decode: str = "auto"):
    """MAE's pre-training augmentation: RandomResizedCrop(scale 0.2-1, bicubic) + flip + normalize.

    ``decode``: see :func:`with_decode`. The default only changes how JPEG bytes are decoded; PIL
    images and every other format get exactly the reference's output.
    """
    return with_decode(transforms.Compose(
        [
            transforms.RandomResizedCrop(input_size, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    ), decode)


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
        seed_host(seed)
        return self.base[idx]


class IterationSampler(Sampler):
    """``(index, seed)`` pairs for iterations ``start_iter .. iters - 1`` of this rank.

    The data are read in epochs, each a seeded permutation of the whole set (as a shuffled
    ``DistributedSampler`` with ``drop_last``); iteration ``it`` takes the ``batch_size * world_size``
    consecutive entries ``it`` of its epoch, and rank r the r-th ``batch_size`` of them. The seed of a
    sample is a function of (seed, epoch, index), so a resumed run sees exactly the crops and colours
    an uninterrupted run would have seen.
    """

    def __init__(self, length: int, batch_size: int, rank: int, world_size: int, seed: int, start_iter: int,
                 iters: int) -> None:
        self.length, self.batch_size, self.rank, self.world_size = length, batch_size, rank, world_size
        self.seed, self.start_iter, self.iters = seed, start_iter, iters
        self.per_epoch = length // (batch_size * world_size)

    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator()
        g.manual_seed(derive_seed(self.seed, epoch))
        return torch.randperm(self.length, generator=g)

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        perm, perm_epoch = None, -1
        for it in range(self.start_iter, self.iters):
            epoch, j = divmod(it, self.per_epoch)
            if epoch != perm_epoch:
                perm, perm_epoch = self._permutation(epoch), epoch
            first = (j * self.world_size + self.rank) * self.batch_size
            for idx in perm[first:first + self.batch_size].tolist():
                yield idx, derive_seed(self.seed, epoch, idx)

    def __len__(self) -> int:
        return max(self.iters - self.start_iter, 0) * self.batch_size


class IterationData:
    """The training data of iteration-based training (segmentation, detection), read by global step
    (``util.data.build.TrainData``): the batches of iterations ``start_step .. iters - 1`` of this rank
    (:class:`IterationSampler`), put together by ``collate_fn`` (default: stacked)."""

    def __init__(self, dataset: Dataset, batch_size: int, rank: int, world_size: int, seed: int, iters: int,
                 num_workers: int, pin_mem: bool, collate_fn: Optional[Callable[[list], Any]] = None) -> None:
        if len(dataset) < batch_size * world_size:
            raise UserError(f"The training set has {len(dataset)} images, fewer than one batch of {batch_size} x "
                            f"{world_size} process(es). Lower --batch_size.")
        self.dataset, self.batch_size, self.rank, self.world_size = dataset, batch_size, rank, world_size
        self.seed, self.iters, self.num_workers, self.pin_mem = seed, iters, num_workers, pin_mem
        self.collate_fn = collate_fn
        self.num_samples = len(dataset)
        self.steps_per_epoch = max(1, len(dataset) // (batch_size * world_size))

    def loader(self, start_step: int) -> DataLoader:
        """The loader of iterations ``start_step .. iters - 1``."""
        sampler = IterationSampler(len(self.dataset), self.batch_size, self.rank, self.world_size, self.seed,
                                   start_step, self.iters)
        return build_loader(SeededDataset(self.dataset), sampler=sampler, batch_size=self.batch_size,
                            num_workers=self.num_workers, pin_memory=self.pin_mem, drop_last=True,
                            collate_fn=self.collate_fn)

    def batches(self, start_step: int) -> Iterator:
        yield from self.loader(start_step)


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
    return build_loader(SeededDataset(dataset), sampler=SeededSampler(base, seed), batch_size=batch_size,
                        num_workers=num_workers, pin_memory=pin_mem, drop_last=True, persistent=True,
                        collate_fn=collate_fn)


class FolderData:
    """A training data source over an ImageFolder, counted in global steps (``util.data.build.TrainData``).

    The batches are exactly those of the epoch loop it replaces: per epoch ``e``,
    ``loader.sampler.set_epoch(e, skip=skip * batch_size)`` then the loader, with ``skip`` the steps
    already done in the resumed epoch. ``steps_per_epoch`` is counted at skip 0 (``len(loader)``
    shrinks with the skip).

    Args:
        dataset: the training ImageFolder (its transform applied under each sample's seed).
        finish: applied to the images of each batch in this process (the GPU decode stage of
            ``--decode nvjpeg``, ``util.data.decode.nvjpeg_finisher``); None: batches as the loader makes them.
        Others: as :func:`train_loader`.
    """

    def __init__(self, dataset: Dataset, batch_size: int, rank: int, world_size: int, seed: int, num_workers: int,
                 pin_mem: bool, collate_fn=None, finish: Optional[Callable[[List[Any]], Any]] = None) -> None:
        self.loader = train_loader(dataset, batch_size, rank, world_size, seed, num_workers, pin_mem, collate_fn)
        self.batch_size = batch_size
        self.steps_per_epoch = len(self.loader)
        self.num_samples = len(dataset)
        self.finish = finish

    def batches(self, start_step: int = 0) -> Iterator:
        """Every batch from global step ``start_step`` on, epoch after epoch, without end."""
        epoch, skip = divmod(start_step, self.steps_per_epoch)
        while True:
            self.loader.sampler.set_epoch(epoch, skip=skip * self.batch_size)
            for batch in self.loader:
                yield finish_images(batch, self.finish)
            epoch, skip = epoch + 1, 0


def finish_images(batch, finish: Optional[Callable[[List[Any]], Any]]):
    """``batch`` with ``finish`` applied to its images (first element) when there is one."""
    if finish is None:
        return batch
    return (finish(batch[0]), *batch[1:])


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
    dataset: Dataset, batch_size: int, rank: int, world_size: int, num_workers: int, pin_mem: bool,
    collate_fn: Optional[Callable[[list], Any]] = None,
) -> DataLoader:
    """Sequential loader over this rank's shard (the whole set in a single process)."""
    return build_loader(dataset, sampler=ShardSampler(len(dataset), rank, world_size), batch_size=batch_size,
                        num_workers=num_workers, pin_memory=pin_mem, persistent=True, collate_fn=collate_fn)


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


AUG = "augmentation"  # its --help group


@dataclass(frozen=True)
class AugConfig(FlagConfig):
    """The augmentation flags of fine-tuning (timm's names and meanings) and linear probing (crop and
    flip only)."""

    crop_scale: Tuple[float, float] = flag(
        (0.08, 1.0), "RandomResizedCrop area range, 0 < MIN <= MAX <= 1 (timm's default; small images such as digits "
                     "want ~0.5 1)", group=AUG, type=share, nargs=2, metavar=("MIN", "MAX"), action=OrderedPair)
    hflip: float = flag(0.5, "horizontal flip probability (0 for digits, text, ...)", group=AUG, type=probability)
    color_jitter: Optional[float] = flag(None, "color jitter factor, only without --aa (default: off)", group=AUG,
                                         type=nonneg_float, metavar="PCT")
    aa: str = flag("rand-m9-mstd0.5-inc1", "RandAugment / AutoAugment policy ('none' to disable)", group=AUG,
                   type=str, metavar="NAME")
    smoothing: float = flag(0.1, "label smoothing", group=AUG, type=rate)
    reprob: float = flag(0.25, "random erasing probability", group=AUG, type=probability, metavar="PCT")
    remode: str = flag("pixel", "random erasing fill: per-pixel noise, per-channel noise or zeros", group=AUG,
                       type=str, choices=["pixel", "rand", "const"])
    recount: int = flag(1, "random erasing count", group=AUG, type=positive_int)
    resplit: bool = flag(False, "no random erasing on the first split", group=AUG, action="store_true")
    mixup: float = flag(0, "mixup alpha (enabled if > 0)", group=AUG, type=nonneg_float)
    cutmix: float = flag(0, "cutmix alpha (enabled if > 0)", group=AUG, type=nonneg_float)
    cutmix_minmax: Optional[Tuple[float, ...]] = flag(
        None, "cutmix box size range as fractions of the image, MIN < MAX; enables cutmix (default: from --cutmix "
              "alpha)", group=AUG, type=probability, nargs="+", metavar=("MIN", "MAX"), action=StrictPair)
    mixup_prob: float = flag(1.0, "probability of mixup or cutmix per batch", group=AUG, type=probability)
    mixup_switch_prob: float = flag(0.5, "probability of cutmix when both are on", group=AUG, type=probability)
    mixup_mode: str = flag("batch", "mix per batch, per pair of images or per image", group=AUG, type=str,
                           choices=["batch", "pair", "elem"])


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
    nb_classes = check_classes(train.classes if train is not None else None, val.classes, nb_classes, str(root),
                               "class folders")
    return train, val, nb_classes


def check_classes(train: Optional[Sequence[str]], val: Sequence[str], nb_classes: Optional[int], where: str,
                  what: str = "classes") -> int:
    """The number of classes: ``--nb_classes``, else the classes found; train and val must agree, and a
    head with fewer classes than the data is refused (labels would run past it)."""
    found = len(train if train is not None else val)
    if train is not None and list(train) != list(val):
        raise UserError(f"{where}: the training and validation {what} differ; they must match.")
    if nb_classes is None:
        return found
    if nb_classes < found:
        raise UserError(f"--nb_classes {nb_classes} but {where} has {found} {what}. Pass --nb_classes {found}.")
    if nb_classes > found:
        _log.warning("--nb_classes %d but only %d %s in %s", nb_classes, found, what, where)
    return nb_classes
