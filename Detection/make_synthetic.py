"""A small synthetic instance-segmentation dataset in COCO's layout (for the CPU demo and the tests).

Each image (48-80 pixels a side) is a muted gradient with zero to four non-overlapping shapes, each
an instance with a box and a mask, in three categories whose ids are not contiguous (as COCO's are):

    1 rectangle (rotated; polygon mask)   3 ellipse (compressed RLE mask)   7 triangle (polygon mask)

Every category has its own hue band. About one image in ten also holds a crowd: a cluster of small
dots annotated once with ``iscrowd=1`` and an uncompressed RLE (COCO's convention for crowds), and
about one in twenty has no object at all, so the handling of both is exercised. Boxes and areas are
computed from the masks as drawn; the JSON is COCO's ``instances`` format.

    python Detection/make_synthetic.py --out data/synthetic_coco
    --data_path synthetic     # the training code builds it once under $DEEPMIM_CACHE
"""
import argparse
import colorsys
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from util.config.cli import Parser, positive_int, seed_int
from util.data.datasets import building
from util.run.errors import UserError, run_cli

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_util

CATEGORIES = {1: "rectangle", 3: "ellipse", 7: "triangle"}
HUES = {1: 0.0, 3: 0.33, 7: 0.66}
SPLIT_SIZES = {"train": 400, "val": 60}
CROWD_PROB, EMPTY_PROB = 0.1, 0.05


def _colour(rng: np.random.RandomState, cat: Optional[int]) -> np.ndarray:
    """An RGB colour (0-255): a muted grey for the background, a saturated one of the category's band."""
    if cat is None:
        h, s, v = rng.uniform(0, 1), rng.uniform(0, 0.2), rng.uniform(0.3, 0.8)
    else:
        h, s, v = (HUES[cat] + rng.uniform(-0.06, 0.06)) % 1.0, rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0)
    return np.array(colorsys.hsv_to_rgb(h, s, v)) * 255.0


def _polygon(cat: int, box: Tuple[float, float, float, float], rng: np.random.RandomState) -> List[float]:
    """A rectangle (rotated up to 30 degrees) or a triangle inside ``box`` (x0, y0, x1, y1), flat [x, y, ...]."""
    x0, y0, x1, y1 = box
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    if cat == 1:
        a = rng.uniform(-np.pi / 6, np.pi / 6)
        hw, hh = rx * rng.uniform(0.6, 0.7), ry * rng.uniform(0.6, 0.7)  # a rotated rectangle stays in its box
        corners = [(-hw, -hh), (hw, -hh), (hw, hh), (-hw, hh)]
        pts = [(cx + u * np.cos(a) - v * np.sin(a), cy + u * np.sin(a) + v * np.cos(a)) for u, v in corners]
    else:
        phase = rng.uniform(0, 2 * np.pi)
        pts = [(cx + rx * np.cos(phase + 2 * np.pi * k / 3), cy + ry * np.sin(phase + 2 * np.pi * k / 3))
               for k in range(3)]
    return [round(float(c), 2) for p in pts for c in p]


def _ellipse_mask(box: Tuple[float, float, float, float], h: int, w: int) -> np.ndarray:
    canvas = Image.new("L", (w, h), 0)
    ImageDraw.Draw(canvas).ellipse(list(box), fill=1)
    return np.asarray(canvas, dtype=np.uint8)


def _free(box: Tuple[float, ...], taken: List[Tuple[float, ...]], margin: float = 2.0) -> bool:
    return all(box[2] + margin <= t[0] or t[2] + margin <= box[0] or box[3] + margin <= t[1] or t[3] + margin <= box[1]
               for t in taken)


def _place(rng: np.random.RandomState, h: int, w: int, lo: int, hi: int,
           taken: List[Tuple[float, ...]]) -> Optional[Tuple[float, float, float, float]]:
    for _ in range(30):
        bw, bh = rng.randint(lo, hi + 1), rng.randint(lo, hi + 1)
        if bw >= w - 2 or bh >= h - 2:
            continue
        x0, y0 = rng.uniform(1, w - bw - 1), rng.uniform(1, h - bh - 1)
        box = (x0, y0, x0 + bw, y0 + bh)
        if _free(box, taken):
            return box
    return None


def _annotation(mask: np.ndarray, segm: Any, cat: int, crowd: bool = False) -> Dict[str, Any]:
    rle = mask_util.encode(np.asfortranarray(mask))
    return {"category_id": cat, "segmentation": segm, "area": float(mask_util.area(rle)),
            "bbox": [float(v) for v in mask_util.toBbox(rle)], "iscrowd": int(crowd)}


def uncompressed_rle(mask: np.ndarray) -> Dict[str, Any]:
    """COCO's uncompressed RLE (``counts`` a list of run lengths, column-major, starting with zeros)."""
    flat = mask.flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    if flat[0]:
        runs = [0] + runs
    return {"counts": runs, "size": list(mask.shape)}


def sample(rng: np.random.RandomState) -> Tuple[np.ndarray, List[Dict[str, Any]]]:
    """One (RGB uint8 image, annotations without ids) pair."""
    h, w = rng.randint(48, 81), rng.randint(48, 81)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    c0, c1 = _colour(rng, None), _colour(rng, None)
    a = rng.uniform(0, np.pi)
    t = xx * np.cos(a) + yy * np.sin(a)
    t = (t - t.min()) / max(float(np.ptp(t)), 1.0)
    img = c0 + (c1 - c0) * t[..., None]
    anns: List[Dict[str, Any]] = []
    taken: List[Tuple[float, ...]] = []
    n = 0 if rng.uniform() < EMPTY_PROB else rng.randint(1, 5)
    for _ in range(n):
        box = _place(rng, h, w, 10, 30, taken)
        if box is None:
            continue
        cat = list(CATEGORIES)[rng.randint(len(CATEGORIES))]
        if cat == 3:
            mask = _ellipse_mask(box, h, w)
            rle = mask_util.encode(np.asfortranarray(mask))
            segm: Any = {"counts": rle["counts"].decode("ascii"), "size": [h, w]}
        else:
            poly = _polygon(cat, box, rng)
            segm = [poly]
            mask = mask_util.decode(mask_util.merge(mask_util.frPyObjects(segm, h, w)))
        if mask.sum() == 0:
            continue
        taken.append(box)
        img[mask.astype(bool)] = _colour(rng, cat)
        anns.append(_annotation(mask, segm, cat))
    if rng.uniform() < CROWD_PROB:
        region = _place(rng, h, w, 12, 20, taken)
        if region is not None:
            mask = np.zeros((h, w), np.uint8)
            for _ in range(rng.randint(5, 9)):
                cx, cy = rng.uniform(region[0] + 2, region[2] - 2), rng.uniform(region[1] + 2, region[3] - 2)
                mask |= _ellipse_mask((cx - 1.5, cy - 1.5, cx + 1.5, cy + 1.5), h, w)
            img[mask.astype(bool)] = _colour(rng, 3)
            anns.append(_annotation(mask, uncompressed_rle(mask), 3, crowd=True))
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), anns


def write_split(root: Path, split: str, n: int, rng: np.random.RandomState) -> None:
    """``root/{split}2017/*.jpg`` and ``root/annotations/instances_{split}2017.json``."""
    folder = root / f"{split}2017"
    folder.mkdir(parents=True)
    images, annotations = [], []
    for image_id in range(1, n + 1):
        img, anns = sample(rng)
        name = f"{image_id:012d}.jpg"
        Image.fromarray(img).save(folder / name, quality=95)
        images.append({"id": image_id, "file_name": name, "height": img.shape[0], "width": img.shape[1]})
        for ann in anns:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **ann})
    doc = {"info": {"description": "DeepMIM synthetic shapes"}, "licenses": [], "images": images,
           "annotations": annotations,
           "categories": [{"id": c, "name": name, "supercategory": "shape"} for c, name in CATEGORIES.items()]}
    (root / "annotations").mkdir(exist_ok=True)
    (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(doc))


def build(root: Path, seed: int = 0, sizes: Optional[Dict[str, int]] = None) -> Path:
    """Write the dataset to ``root`` once (a temporary folder renamed at the end, so an interrupted or
    concurrent build never leaves half a dataset); return ``root``."""
    root = Path(root)
    if (root / "annotations" / "instances_val2017.json").is_file():
        return root
    if root.exists() and any(root.iterdir()):
        raise UserError(f"{root} exists and does not hold the synthetic dataset; choose a new folder.")
    with building(root) as tmp:
        for k, (split, n) in enumerate((sizes or SPLIT_SIZES).items()):
            write_split(tmp, split, n, np.random.RandomState([seed, k]))  # each split draws its own images
    return root


def main(args: argparse.Namespace) -> None:
    out = build(Path(args.out), args.seed, {"train": args.n_train, "val": args.n_val})
    print(f"synthetic COCO-layout dataset in {out}: {args.n_train} training / {args.n_val} validation images, "
          f"{len(CATEGORIES)} categories")


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser("Detection/make_synthetic.py", "Write the synthetic COCO-layout dataset")
    p.add_argument("--out", required=True, help="folder to create (left as it is if it already holds the dataset)")
    p.add_argument("--n_train", type=positive_int, default=SPLIT_SIZES["train"], metavar="N", help="training images")
    p.add_argument("--n_val", type=positive_int, default=SPLIT_SIZES["val"], metavar="N", help="validation images")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the images (each split draws its own)")
    return p


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
