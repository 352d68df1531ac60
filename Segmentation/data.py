"""ADE20K in the ``ADEChallengeData2016`` layout, and the pipelines of mmseg's 512x512 ADE20K config.

Layout::

    root/images/{training,validation}/*.jpg
    root/annotations/{training,validation}/*.png     # uint8 class index per pixel, 0 = unlabelled

Labels follow ``reduce_zero_label``: 0 (unlabelled) becomes 255 (ignored), class k becomes k - 1,
so the 150 classes are 0..149. The training pipeline is mmseg's, step for step and in the same
order of random draws: random resize to the (2048, 512) scale with ratio 0.5-2, random crop 512 with
``cat_max_ratio`` 0.75, horizontal flip, photometric distortion, normalize, pad to the crop (image 0,
label 255). Images are resized bilinearly, labels by nearest neighbour only (``nearest-exact``: the
pixel centres of the bilinear image), so a label never takes a value that is not in the annotation.

Validation images are returned at their original size: the test-time resize to the (2048, 512) scale
(keeping the ratio) happens in :mod:`Segmentation.inference`, which also resizes the prediction
back, because mmseg scores every image at its original resolution.
"""
import logging
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from util.data.datasets import cache_root
from util.run.errors import UserError

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

_log = logging.getLogger(__name__)

IGNORE_INDEX = 255
IMG_MEAN = (123.675, 116.28, 103.53)  # RGB, 0-255 scale (mmseg's img_norm_cfg)
IMG_STD = (58.395, 57.12, 57.375)
SPLITS = {"train": "training", "val": "validation"}
IMG_SUFFIXES = (".jpg", ".jpeg", ".png")
SYNTHETIC = "synthetic"
CLASSES_FILE = "classes.txt"

# mmseg's ADE20KDataset.CLASSES (after reduce_zero_label), in label order; 'bed ' keeps its space
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed ", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag",
)


# --------------------------------------------------------------------------------------------
# files


def resolve_root(data_path: str) -> Path:
    """``synthetic`` -> the built-in synthetic dataset (written once to the cache); else the path."""
    if data_path == SYNTHETIC:
        from Segmentation.make_synthetic import build

        return build(cache_root() / "synthetic_ade20k")
    return Path(data_path)


def class_names(root: Path, num_classes: Optional[int] = None) -> List[str]:
    """Class names for the per-class table: ``root/classes.txt`` (one per line) if present, else
    ADE20K's 150; ``--num_classes`` other than these gets ``class_<i>`` names."""
    file = root / CLASSES_FILE
    names = [n for n in file.read_text().splitlines() if n] if file.is_file() else list(ADE20K_CLASSES)
    if num_classes is None or num_classes == len(names):
        return names
    _log.warning("--num_classes %d differs from the %d class names of %s; using generic names", num_classes,
                 len(names), root)
    return [f"class_{i}" for i in range(num_classes)]


def check_split(root: Path, split: str) -> None:
    """Refuse a root without ``images/<split>`` and ``annotations/<split>`` (ADE20K's layout)."""
    for d in (root / "images" / split, root / "annotations" / split):
        if not d.is_dir():
            raise UserError(
                f"{d} does not exist. --data_path must be an ADEChallengeData2016 folder with "
                f"images/{split}/*.jpg and annotations/{split}/*.png inside, or 'synthetic' for the built-in data."
            )


def list_pairs(root: Path, split: str) -> List[Tuple[Path, Path]]:
    """(image, annotation) paths of ``split`` ('training' / 'validation'), paired by file stem."""
    check_split(root, split)
    img_dir, ann_dir = root / "images" / split, root / "annotations" / split
    images = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMG_SUFFIXES)
    if not images:
        raise UserError(f"No images ({', '.join(IMG_SUFFIXES)}) in {img_dir}.")
    pairs = [(img, ann_dir / f"{img.stem}.png") for img in images]
    missing = [str(ann) for _, ann in pairs if not ann.is_file()]
    if missing:
        raise UserError(f"{len(missing)} image(s) in {img_dir} have no annotation, e.g. {missing[0]} is missing.")
    return pairs


def load_image(path: Path) -> np.ndarray:
    """RGB uint8 [H, W, 3]; an unreadable file names itself."""
    try:
        with Image.open(path) as img:
            return np.array(img.convert("RGB"))  # a writable copy (torch.from_numpy needs one)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"Cannot read image {path}: {e}. Remove or replace the file.") from None


def load_annotation(path: Path) -> np.ndarray:
    """Class indices uint8 [H, W] from a single-channel (L or P mode) PNG."""
    try:
        with Image.open(path) as img:
            if img.mode not in ("L", "P", "I", "I;16"):
                raise UserError(f"Annotation {path} is a {img.mode} image; it must hold one class index per "
                                f"pixel (a single-channel PNG as in ADEChallengeData2016).")
            ann = np.asarray(img)
    except (OSError, ValueError) as e:
        raise UserError(f"Cannot read annotation {path}: {e}. Remove or replace the file.") from None
    if ann.max(initial=0) > 255:
        raise UserError(f"Annotation {path} has class index {int(ann.max())} > 255.")
    return ann.astype(np.uint8)


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """mmseg's ``reduce_zero_label`` on uint8: 0 -> 255 (ignored), k -> k - 1, 255 stays 255."""
    label = label.copy()
    label[label == 0] = 255
    label = label - 1
    label[label == 254] = 255
    return label


# --------------------------------------------------------------------------------------------
# geometric transforms (numpy HWC uint8 in, out; torch only for the resampling)


def rescale_size(w: int, h: int, scale: Sequence[int]) -> Tuple[int, int]:
    """mmcv's ``rescale_size``: the size (w, h) with the same aspect ratio whose long edge is at most
    ``max(scale)`` and short edge at most ``min(scale)``, one of them reached."""
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(w * factor + 0.5), int(h * factor + 0.5)


def resize(img: np.ndarray, label: Optional[np.ndarray], size: Tuple[int, int]):
    """Resize to ``size`` (w, h): the image bilinearly (as cv2's INTER_LINEAR, no antialiasing), the
    label by nearest neighbour at the same pixel centres."""
    w, h = size
    t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float()
    t = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)
    img = t[0].permute(1, 2, 0).round_().clamp_(0, 255).to(torch.uint8).numpy()
    if label is not None:
        lbl = torch.from_numpy(np.ascontiguousarray(label))[None, None]
        label = F.interpolate(lbl, size=(h, w), mode="nearest-exact")[0, 0].numpy()
    return img, label


def random_resize(img: np.ndarray, label: np.ndarray, scale: Sequence[int], ratio_range: Sequence[float]):
    """mmseg ``Resize(img_scale, ratio_range)``: scale times a uniform ratio, then keep the aspect ratio."""
    ratio = np.random.random_sample() * (ratio_range[1] - ratio_range[0]) + ratio_range[0]
    target = (int(scale[0] * ratio), int(scale[1] * ratio))
    h, w = label.shape
    return resize(img, label, rescale_size(w, h, target))


def random_crop(img: np.ndarray, label: np.ndarray, crop: int, cat_max_ratio: float = 1.0,
                ignore_index: int = IGNORE_INDEX):
    """mmseg ``RandomCrop``: up to 10 draws until no class covers more than ``cat_max_ratio`` of the
    labelled pixels of the crop (and at least two classes are present), else the last draw."""

    def draw() -> Tuple[int, int]:
        return (np.random.randint(0, max(label.shape[0] - crop, 0) + 1),
                np.random.randint(0, max(label.shape[1] - crop, 0) + 1))

    y, x = draw()
    if cat_max_ratio < 1.0:
        for _ in range(10):
            labels, counts = np.unique(label[y:y + crop, x:x + crop], return_counts=True)
            counts = counts[labels != ignore_index]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            y, x = draw()
    return img[y:y + crop, x:x + crop], label[y:y + crop, x:x + crop]


def random_flip(img: np.ndarray, label: np.ndarray, prob: float = 0.5):
    if np.random.rand() < prob:
        return img[:, ::-1], label[:, ::-1]
    return img, label


def pad(img: torch.Tensor, label: torch.Tensor, size: int, ignore_index: int = IGNORE_INDEX):
    """Pad the normalized image [3, h, w] with 0 and the label [h, w] with ``ignore_index`` at the
    bottom and right up to ``size``."""
    ph, pw = size - label.shape[0], size - label.shape[1]
    if ph > 0 or pw > 0:
        img = F.pad(img, (0, max(pw, 0), 0, max(ph, 0)), value=0.0)
        label = F.pad(label, (0, max(pw, 0), 0, max(ph, 0)), value=ignore_index)
    return img, label


# --------------------------------------------------------------------------------------------
# photometric distortion (mmseg's PhotoMetricDistortion: each op with probability 1/2)


def _convert(img: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    return np.clip(img.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(img: np.ndarray, brightness_delta: int = 32, contrast: Tuple[float, float] = (0.5, 1.5),
                           saturation: Tuple[float, float] = (0.5, 1.5), hue_delta: int = 18) -> np.ndarray:
    """Brightness, then contrast before or after (at random) saturation and hue, in HSV.

    ``hue_delta`` is in OpenCV's 0-180 hue units, as in mmseg; "contrast" is mmseg's plain scaling.
    """
    from matplotlib.colors import hsv_to_rgb, rgb_to_hsv

    def hsv_op(img: np.ndarray, channel: int, fn) -> np.ndarray:
        hsv = rgb_to_hsv(img.astype(np.float32) / 255.0)
        hsv[..., channel] = fn(hsv[..., channel])
        return np.clip(hsv_to_rgb(hsv) * 255.0 + 0.5, 0, 255).astype(np.uint8)

    if np.random.randint(2):
        img = _convert(img, beta=np.random.uniform(-brightness_delta, brightness_delta))
    mode = np.random.randint(2)  # 1: contrast first, 0: contrast last
    if mode == 1 and np.random.randint(2):
        img = _convert(img, alpha=np.random.uniform(*contrast))
    if np.random.randint(2):
        alpha = np.random.uniform(*saturation)
        img = hsv_op(img, 1, lambda s: np.clip(s * 255.0 * alpha, 0, 255).astype(np.uint8) / 255.0)
    if np.random.randint(2):
        delta = np.random.randint(-hue_delta, hue_delta)
        img = hsv_op(img, 0, lambda h: ((h * 180.0).round() + delta) % 180 / 180.0)
    if mode == 0 and np.random.randint(2):
        img = _convert(img, alpha=np.random.uniform(*contrast))
    return img


def normalize(img: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float [3, H, W] with mmseg's ImageNet mean / std (0-255 scale)."""
    t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float()
    mean = torch.tensor(IMG_MEAN).view(3, 1, 1)
    std = torch.tensor(IMG_STD).view(3, 1, 1)
    return (t - mean) / std


class TrainTransform:
    """mmseg's ADE20K training pipeline after loading (draws from numpy's global generator, which
    :class:`util.data.datasets.SeededDataset` seeds per sample)."""

    def __init__(self, crop_size: int = 512, img_scale: Sequence[int] = (2048, 512),
                 ratio_range: Sequence[float] = (0.5, 2.0), cat_max_ratio: float = 0.75, flip_prob: float = 0.5,
                 photometric: bool = True) -> None:
        self.crop_size, self.img_scale, self.ratio_range = crop_size, tuple(img_scale), tuple(ratio_range)
        self.cat_max_ratio, self.flip_prob, self.photometric = cat_max_ratio, flip_prob, photometric

    def __call__(self, img: np.ndarray, label: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
        img, label = random_resize(img, label, self.img_scale, self.ratio_range)
        img, label = random_crop(img, label, self.crop_size, self.cat_max_ratio)
        img, label = random_flip(img, label, self.flip_prob)
        if self.photometric:
            img = photometric_distortion(img)
        return pad(normalize(img), torch.from_numpy(np.ascontiguousarray(label)).long(), self.crop_size)


# --------------------------------------------------------------------------------------------
# dataset and loaders


class ADE20K(Dataset):
    """``(image, label)`` pairs of one split.

    With ``transform`` (training): the transform's outputs, a normalized crop [3, S, S] and its label
    [S, S] (int64). Without (validation): the normalized image [3, H, W] and label [H, W] at the
    original size. Labels are reduced (0 -> 255, k -> k - 1); a class index >= ``num_classes`` other
    than 255 stops with the file's name instead of crashing the loss.
    """

    def __init__(self, root: Path, split: str, num_classes: int, transform: Optional[TrainTransform] = None) -> None:
        self.root, self.split, self.num_classes, self.transform = Path(root), split, num_classes, transform
        self.pairs = list_pairs(self.root, split)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, idx: int) -> Tuple[torch.Tensor, torch.Tensor]:
        img_path, ann_path = self.pairs[idx]
        img, label = load_image(img_path), reduce_zero_label(load_annotation(ann_path))
        if img.shape[:2] != label.shape:
            raise UserError(f"{img_path} is {img.shape[1]}x{img.shape[0]} but its annotation {ann_path} is "
                            f"{label.shape[1]}x{label.shape[0]}.")
        bad = (label != IGNORE_INDEX) & (label >= self.num_classes)
        if bad.any():
            raise UserError(f"{ann_path} holds class {int(label[bad].max()) + 1} (label {int(label[bad].max())} after "
                            f"reduce_zero_label) but --num_classes is {self.num_classes}.")
        if self.transform is not None:
            return self.transform(img, label)
        return normalize(img), torch.from_numpy(label).long()
