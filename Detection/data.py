"""COCO instances data: the files, the annotations as COCO's tools read them, ViTDet's training transform.

Layout (``--data_path``)::

    root/annotations/instances_train2017.json    root/train2017/*.jpg
    root/annotations/instances_val2017.json      root/val2017/*.jpg

``--data_path synthetic`` is the built-in synthetic set in the same layout (``make_synthetic.py``),
written once under ``$DEEPMIM_CACHE``.

Annotations are handled as detectron2 (ViTDet's code) and COCO's tools do:

* crowd annotations (``iscrowd=1``) are never training targets; COCOeval uses them to ignore the
  detections that fall on them;
* training skips images without a usable annotation (detectron2's ``filter_empty``); evaluation keeps
  every image;
* an annotation with ``w <= 0`` or ``h <= 0``, or without a valid mask (a polygon needs 3 points), is
  not a training target; after the transform an instance whose mask left the crop is dropped, and
  the boxes are recomputed from the cropped masks (ViTDet's ``recompute_boxes``);
* labels are 1..K in the order of the sorted category ids (0 is torchvision's background);
  :attr:`CocoDetection.cat_ids` maps them back for COCO's results format.

A missing or broken annotation file, an entry that breaks COCO's format, a missing image folder or
image, or an image whose size differs from its entry stops with one :class:`UserError` naming it.

The test-time resize (shortest edge 1024, longest at most 1024, then the square padding) is done by
the model (``Detection.models.ViTDetTransform``), so that torchvision's post-processing maps boxes and
masks back to the original image, as detectron2 does; evaluation images come here at their own size.
"""
import contextlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from util.data.datasets import cache_root
from util.run.errors import UserError

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from torch.utils.data import Dataset

_log = logging.getLogger(__name__)

SYNTHETIC = "synthetic"
SPLITS = ("train", "val")
MIN_BOX_SIZE = 1e-5  # detectron2's filter_empty_instances threshold, after the transform


def resolve_root(data_path: str) -> Path:
    """``synthetic`` -> the built-in synthetic dataset (written once to the cache); else the path."""
    if data_path == SYNTHETIC:
        from Detection.make_synthetic import build

        return build(cache_root() / "synthetic_coco")
    return Path(data_path)


def annotation_path(root: Path, split: str) -> Path:
    return Path(root) / "annotations" / f"instances_{split}2017.json"


def image_folder(root: Path, split: str) -> Path:
    return Path(root) / f"{split}2017"


# --------------------------------------------------------------------------------------------
# annotations


def _check_format(d: Any, path: Path) -> None:
    """The fields COCO's tools rely on; the first entry that lacks one is named."""
    def fail(what: str) -> None:
        raise UserError(f"Annotation file {path} is not in COCO's instances format: {what}.")

    if not isinstance(d, dict):
        fail("the top level is not an object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(d.get(key), list):
            fail(f"no '{key}' list")
    image_ids, cat_ids = set(), set()
    for i, img in enumerate(d["images"]):
        if not isinstance(img, dict) or not all(k in img for k in ("id", "file_name", "height", "width")):
            fail(f"images[{i}] lacks one of id, file_name, height, width")
        image_ids.add(img["id"])
    for i, cat in enumerate(d["categories"]):
        if not isinstance(cat, dict) or "id" not in cat:
            fail(f"categories[{i}] has no id")
        cat_ids.add(cat["id"])
    for i, ann in enumerate(d["annotations"]):
        if not isinstance(ann, dict) or not all(k in ann for k in ("id", "image_id", "category_id", "bbox")):
            fail(f"annotations[{i}] lacks one of id, image_id, category_id, bbox")
        box = ann["bbox"]
        if not isinstance(box, list) or len(box) != 4 or not all(isinstance(v, (int, float)) for v in box):
            fail(f"annotation id {ann['id']} has bbox {box!r}, not [x, y, w, h]")
        if ann["image_id"] not in image_ids:
            fail(f"annotation id {ann['id']} refers to image id {ann['image_id']}, which is not in 'images'")
        if ann["category_id"] not in cat_ids:
            fail(f"annotation id {ann['id']} has category id {ann['category_id']}, which is not in 'categories'")


def load_coco(path: Path) -> COCO:
    """A pycocotools ``COCO`` for an instances file, checked (one clear error instead of a KeyError)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Annotation file {path} not found. --data_path must hold COCO's layout: "
                        f"annotations/instances_{{train,val}}2017.json and the folders train2017/, val2017/ "
                        f"(or use --data_path {SYNTHETIC}).")
    try:
        with open(path, "rb") as f:
            d = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"Cannot read annotation file {path}: {e}. Download it again.") from None
    _check_format(d, path)
    coco = COCO()
    coco.dataset = d
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco.createIndex()
    return coco


def valid_polygons(segm: Any) -> List[List[float]]:
    """The polygons of a polygon segmentation with at least 3 points (detectron2 drops the others)."""
    return [p for p in segm if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]


def is_training_target(ann: Dict[str, Any]) -> bool:
    """Not crowd, a box of positive size and a usable mask."""
    if ann.get("iscrowd", 0) or ann["bbox"][2] <= 0 or ann["bbox"][3] <= 0:
        return False
    segm = ann.get("segmentation")
    if isinstance(segm, list):
        return bool(valid_polygons(segm))
    return isinstance(segm, dict) and "counts" in segm and "size" in segm


def decode_mask(segm: Any, h: int, w: int) -> np.ndarray:
    """[h, w] uint8 mask of a polygon list or an RLE (compressed or not)."""
    if isinstance(segm, list):
        rle = mask_util.merge(mask_util.frPyObjects(valid_polygons(segm), h, w))
    elif isinstance(segm["counts"], list):
        rle = mask_util.frPyObjects(segm, h, w)
    else:
        rle = segm
    return mask_util.decode(rle)


# --------------------------------------------------------------------------------------------
# the training transform


def boxes_from_masks(masks: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """xyxy boxes [N, 4] (float32, pixel edges: a one-pixel mask at (x, y) gives (x, y, x+1, y+1)) of
    [N, H, W] masks, and which masks are not empty [N]."""
    n, h, w = masks.shape
    rows, cols = masks.any(axis=2), masks.any(axis=1)  # [N, H], [N, W]
    keep = rows.any(axis=1)
    y0, x0 = rows.argmax(axis=1), cols.argmax(axis=1)
    y1, x1 = h - rows[:, ::-1].argmax(axis=1), w - cols[:, ::-1].argmax(axis=1)
    return np.stack([x0, y0, x1, y1], axis=1).astype(np.float32), keep


class LargeScaleJitter:
    """ViTDet's training augmentation (detectron2 ``RandomFlip``, ``ResizeScale(0.1, 2.0, 1024, 1024)``,
    ``FixedSizeCrop(1024)``), in its order of random draws:

    1. horizontal flip with probability ``flip_prob``;
    2. resize keeping the aspect ratio so that the image fits ``s * size`` squared, ``s`` uniform in
       ``scale_range`` (PIL bilinear, antialiased when shrinking);
    3. a random ``size`` crop (one uniform draw places it on both axes), padded at the bottom and right
       with ``pad_value`` when the image is smaller;
    4. masks follow (polygons are transformed as coordinates and drawn at the output size; RLE masks are
       resized by nearest neighbour); boxes are recomputed from the cropped masks and instances whose
       mask left the crop are dropped.

    ``rng``: anything with numpy's ``uniform`` (the ``np.random`` module by default, which the
    repository's samplers seed per sample).
    """

    def __init__(self, size: int = 1024, scale_range: Sequence[float] = (0.1, 2.0), flip_prob: float = 0.5,
                 pad_value: int = 128) -> None:
        self.size, self.scale_range, self.flip_prob, self.pad_value = size, tuple(scale_range), flip_prob, pad_value

    def __call__(self, img: np.ndarray, segms: Sequence[Any], labels: Sequence[int],
                 rng: Any = np.random) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """[H, W, 3] uint8 image, segmentations and labels -> the [3, S, S] uint8 crop and its target:
        ``boxes`` [N, 4] float32 (xyxy), ``labels`` [N] int64, ``masks`` [N, S, S] uint8."""
        h, w = img.shape[:2]
        size = self.size
        flip = rng.uniform() < self.flip_prob
        scale = rng.uniform(*self.scale_range)
        ratio = min(scale * size / h, scale * size / w)
        nh, nw = max(1, int(round(h * ratio))), max(1, int(round(w * ratio)))
        u = rng.uniform()
        oy, ox = int(round(max(nh - size, 0) * u)), int(round(max(nw - size, 0) * u))
        ch, cw = min(nh, size), min(nw, size)

        pil = Image.fromarray(img)
        if flip:
            pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pil = pil.resize((nw, nh), Image.Resampling.BILINEAR).crop((ox, oy, ox + cw, oy + ch))
        out = np.full((size, size, 3), self.pad_value, dtype=np.uint8)
        out[:ch, :cw] = np.asarray(pil)

        masks = np.zeros((len(segms), size, size), dtype=np.uint8)
        sx, sy = nw / w, nh / h
        for i, segm in enumerate(segms):
            if isinstance(segm, list):  # polygons: move the points, draw once at the output size
                polys = []
                for p in valid_polygons(segm):
                    xy = np.asarray(p, dtype=np.float64).reshape(-1, 2)
                    x = (w - xy[:, 0]) if flip else xy[:, 0]
                    polys.append(np.stack([x * sx - ox, xy[:, 1] * sy - oy], axis=1).ravel().tolist())
                m = mask_util.decode(mask_util.merge(mask_util.frPyObjects(polys, size, size)))
                masks[i, :ch, :cw] = m[:ch, :cw]
            else:
                m = decode_mask(segm, h, w)
                if flip:
                    m = m[:, ::-1]
                m = np.asarray(Image.fromarray(np.ascontiguousarray(m)).resize((nw, nh), Image.Resampling.NEAREST))
                masks[i, :ch, :cw] = m[oy:oy + ch, ox:ox + cw]
        boxes, keep = boxes_from_masks(masks)
        keep &= (boxes[:, 2] - boxes[:, 0] > MIN_BOX_SIZE) & (boxes[:, 3] - boxes[:, 1] > MIN_BOX_SIZE)
        target = {"boxes": torch.from_numpy(boxes[keep]).reshape(-1, 4),
                  "labels": torch.as_tensor(np.asarray(labels, dtype=np.int64)[keep]).reshape(-1),
                  "masks": torch.from_numpy(masks[keep])}
        return torch.from_numpy(out).permute(2, 0, 1).contiguous(), target


# --------------------------------------------------------------------------------------------
# the dataset


def load_image(path: Path) -> np.ndarray:
    """[H, W, 3] uint8 RGB; an unreadable file stops with its name."""
    try:
        with Image.open(path) as img:
            return np.array(img.convert("RGB"))  # writable: torch.from_numpy shares it
    except (OSError, ValueError) as e:
        raise UserError(f"Cannot read image {path}: {e}. Remove or replace the file.") from None


class CocoDetection(Dataset):
    """One split of a COCO-layout dataset.

    With ``transform`` (training): images that have a training target, each as ``(image [3, S, S] uint8,
    {'boxes', 'labels', 'masks', 'image_id'})`` from :class:`LargeScaleJitter`. Without (evaluation):
    every image at its own size, ``(image [3, H, W] uint8, {'image_id'})``.
    """

    def __init__(self, root: Path, split: str, transform: Optional[LargeScaleJitter] = None) -> None:
        self.root, self.split, self.transform = Path(root), split, transform
        self.coco = load_coco(annotation_path(self.root, split))
        self.cat_ids: List[int] = sorted(self.coco.cats)  # label k (1-based) is category cat_ids[k - 1]
        self.label_of = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.class_names = [self.coco.cats[c].get("name", str(c)) for c in self.cat_ids]
        self.folder = image_folder(self.root, split)
        if not self.folder.is_dir():
            raise UserError(f"Image folder {self.folder} not found (COCO's layout: {split}2017/ beside annotations/).")
        present = set(os.listdir(self.folder))
        missing = [img["file_name"] for img in self.coco.dataset["images"] if img["file_name"] not in present]
        if missing:
            raise UserError(f"{len(missing)} image(s) listed in {annotation_path(self.root, split)} are missing from "
                            f"{self.folder}, e.g. {missing[0]}.")
        ids = sorted(self.coco.imgs)
        if transform is not None:
            ids = [i for i in ids if any(is_training_target(a) for a in self.coco.imgToAnns[i])]
            if len(ids) < len(self.coco.imgs):
                _log.info("%s: %d of %d images have no training target (no annotation, only crowd or degenerate "
                          "ones) and are left out of training", split, len(self.coco.imgs) - len(ids), len(self.coco.imgs))
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, idx: int) -> Tuple[torch.Tensor, Dict[str, Any]]:
        image_id = self.ids[idx]
        info = self.coco.imgs[image_id]
        path = self.folder / info["file_name"]
        img = load_image(path)
        if img.shape[:2] != (info["height"], info["width"]):
            raise UserError(f"{path} is {img.shape[1]}x{img.shape[0]} but {annotation_path(self.root, self.split)} says "
                            f"{info['width']}x{info['height']}.")
        if self.transform is None:
            return torch.from_numpy(img).permute(2, 0, 1).contiguous(), {"image_id": image_id}
        anns = [a for a in self.coco.imgToAnns[image_id] if is_training_target(a)]
        image, target = self.transform(img, [a["segmentation"] for a in anns], [self.label_of[a["category_id"]]
                                                                                for a in anns])
        target["image_id"] = image_id
        return image, target


def collate(batch: Sequence[Tuple[torch.Tensor, Dict[str, Any]]]) -> Tuple[List[torch.Tensor], List[Dict[str, Any]]]:
    """Images of different sizes stay a list (the model pads them)."""
    images, targets = zip(*batch)
    return list(images), list(targets)
