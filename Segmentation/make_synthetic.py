"""A small synthetic segmentation dataset in the ADEChallengeData2016 layout (for the CPU demo and tests).

Each image is a textured background with one to four textured shapes on it. The annotation follows
ADE20K's convention: 0 is "unlabelled" (here the one-pixel rim of every shape, so the ignore label is
exercised), 1..5 are the classes, which the training code reduces to 0..4:

    background (smooth colour gradient), disc (noise), square (stripes), triangle (checkerboard),
    ring (dots)

The background is a muted, low-saturation gradient; each shape class has its own hue band and
texture (colours vary within the band, and the training's hue jitter moves them further), so a
small model learns them within minutes on a CPU. Images are JPEGs of 32-48 x 40-64 pixels,
annotations PNGs; ``classes.txt`` names the classes for the tables.

    python Segmentation/make_synthetic.py --out data/synthetic_ade20k
    python Segmentation/train.py --data_path synthetic ...     # builds it once under $DEEPMIM_CACHE
"""
import argparse
import os
import shutil
import tempfile
from pathlib import Path
from typing import Tuple

from util.config.cli import Parser, positive_int, seed_int
from util.run.errors import UserError, run_cli

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("background", "disc", "square", "triangle", "ring")  # label k + 1 in the PNGs
SPLIT_SIZES = {"training": 400, "validation": 60}


HUES = {"disc": 0.0, "square": 0.25, "triangle": 0.5, "ring": 0.75}  # each shape's hue band (fraction of the circle)
AREA_SCALE = {"disc": 1.0, "square": 1.25, "triangle": 1.55, "ring": 1.15}  # sqrt(disc area / shape area)


def colours(kind: str, rng: np.random.RandomState) -> np.ndarray:
    """Two RGB colours [2, 3] (0-255): muted greys for the background; for a shape, a saturated
    colour of its hue band (+- 0.06) and a darker shade of it."""
    from matplotlib.colors import hsv_to_rgb

    if kind == "background":
        hsv = np.stack([rng.uniform(0, 1, 2), rng.uniform(0, 0.2, 2), rng.uniform(0.3, 0.9, 2)], 1)
    else:
        hue = (HUES[kind] + rng.uniform(-0.06, 0.06)) % 1.0
        value = rng.uniform(0.6, 1.0)
        hsv = np.array([[hue, rng.uniform(0.6, 1.0), value], [hue, rng.uniform(0.6, 1.0), value * 0.5]])
    return hsv_to_rgb(hsv) * 255.0


def texture(kind: str, h: int, w: int, rng: np.random.RandomState) -> np.ndarray:
    """A float [h, w, 3] texture of the class's two colours."""
    c1, c2 = colours(kind, rng)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    u = xx * np.cos(angle) + yy * np.sin(angle)
    if kind == "background":
        t = (u - u.min()) / max(np.ptp(u), 1.0)
    elif kind == "disc":
        t = rng.uniform(0, 1, (h, w)) * 0.5
    elif kind == "square":
        t = (np.sin(2 * np.pi * u / rng.uniform(4, 7)) > 0).astype(np.float32)
    elif kind == "triangle":
        cell = rng.randint(3, 6)
        t = ((xx // cell + yy // cell) % 2).astype(np.float32)
    else:  # ring: dots on a plain colour
        period = rng.randint(4, 6)
        t = (((xx % period) - period / 2) ** 2 + ((yy % period) - period / 2) ** 2 < 2.0).astype(np.float32)
    return c1 + (c2 - c1) * t[..., None]


def shape_mask(kind: str, h: int, w: int, rng: np.random.RandomState) -> np.ndarray:
    """A boolean [h, w] mask of one shape at a random place and size."""
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    # radii scaled so that every class covers about the same area (a triangle inscribed in a circle
    # has 0.41 of its area): the rarer classes would otherwise be learnt last
    r = min(rng.uniform(0.15, 0.3) * AREA_SCALE[kind], 0.45) * min(h, w)
    cy, cx = rng.uniform(r, h - r), rng.uniform(r, w - r)
    if kind == "disc":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    elif kind == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
        draw.ellipse([cx - r / 2, cy - r / 2, cx + r / 2, cy + r / 2], fill=0)
    else:
        corners = 4 if kind == "square" else 3
        phase = rng.uniform(0, 2 * np.pi)
        draw.polygon([(cx + r * np.cos(phase + 2 * np.pi * k / corners), cy + r * np.sin(phase + 2 * np.pi * k / corners))
                      for k in range(corners)], fill=1)
    return np.asarray(canvas, dtype=bool)


def rim(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it."""
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def sample(rng: np.random.RandomState) -> Tuple[np.ndarray, np.ndarray]:
    """One (RGB uint8 image, uint8 annotation with ADE20K's 0 = unlabelled) pair."""
    h, w = rng.randint(32, 49), rng.randint(40, 65)
    img = texture("background", h, w, rng)
    ann = np.ones((h, w), np.uint8)
    for _ in range(rng.randint(1, 5)):
        cls = rng.randint(1, len(CLASSES))
        mask = shape_mask(CLASSES[cls], h, w, rng)
        img[mask] = texture(CLASSES[cls], h, w, rng)[mask]
        ann[mask] = cls + 1
        ann[rim(mask)] = 0
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), ann


def build(root: Path, seed: int = 0, sizes=None) -> Path:
    """Write the dataset to ``root`` once (a temporary folder renamed at the end, so an interrupted
    or concurrent build never leaves half a dataset); return ``root``."""
    root = Path(root)
    if (root / "images" / "validation").is_dir() and (root / "classes.txt").is_file():
        return root
    if root.exists() and any(root.iterdir()):
        raise UserError(f"{root} exists and does not hold the synthetic dataset; choose a new folder.")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        for k, (split, n) in enumerate((sizes or SPLIT_SIZES).items()):
            rng = np.random.RandomState([seed, k])  # the two splits draw different images
            (tmp / "images" / split).mkdir(parents=True)
            (tmp / "annotations" / split).mkdir(parents=True)
            for i in range(n):
                img, ann = sample(rng)
                Image.fromarray(img).save(tmp / "images" / split / f"synthetic_{i:05d}.jpg", quality=95)
                Image.fromarray(ann).save(tmp / "annotations" / split / f"synthetic_{i:05d}.png")
        (tmp / "classes.txt").write_text("\n".join(CLASSES) + "\n")
        try:
            os.rename(tmp, root)
        except OSError:  # another process finished first (or root exists): keep that copy
            if not (root / "classes.txt").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def main(args: argparse.Namespace) -> None:
    sizes = {"training": args.n_train, "validation": args.n_val}
    out = build(Path(args.out), args.seed, sizes)
    print(f"synthetic ADE20K-layout dataset in {out}: {args.n_train} training / {args.n_val} validation images, "
          f"{len(CLASSES)} classes")


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser("Segmentation/make_synthetic.py", "Write the synthetic ADE20K-layout dataset")
    p.add_argument("--out", required=True, help="folder to create (left as it is if it already holds the dataset)")
    p.add_argument("--n_train", type=positive_int, default=SPLIT_SIZES["training"], metavar="N", help="training images")
    p.add_argument("--n_val", type=positive_int, default=SPLIT_SIZES["validation"], metavar="N",
                   help="validation images")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the images (each split draws its own)")
    return p


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
