"""Test-time inference (mmseg's ``slide`` / ``whole`` modes, single scale or multi-scale + flip) and
the evaluation loop.

``fn`` below is any callable mapping images [N, 3, h, w] to logits [N, C, h, w] at the same size
(:meth:`Segmentation.models.Segmentor.encode_decode`, or a 1x1 conv in the tests).

* **slide**: windows of ``crop`` pixels every ``stride`` pixels, the last window of each row and
  column flush with the border (mmseg's grid), logits summed and divided by the number of windows
  covering each pixel. Windows of an image smaller than the crop are padded to the crop (so the
  network always sees its training grid) and the padding cut off the logits again. Windows are
  batched ``crops_per_batch`` at a time.
* **whole**: the image in one pass.
* **predict**: resize the image keeping its ratio to ``img_scale`` times each ratio (1.0 alone for
  single scale; 0.5 ... 1.75 with ``--aug_test``), optionally also flipped; the logits of each pass are
  resized to the original image, turned into probabilities and averaged (mmseg's ``aug_test``).
"""
import logging
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

from util.run import dist as dist_util
from util.run.amp import autocast
from util.run.errors import UserError

import torch
import torch.nn.functional as F

from Segmentation.data import rescale_size
from Segmentation.metrics import intersect_and_union

_log = logging.getLogger(__name__)

LogitsFn = Callable[[torch.Tensor], torch.Tensor]
AUG_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


@dataclass
class InferenceConfig:
    """How a validation image is predicted (mmseg's ``test_cfg`` and test pipeline)."""

    num_classes: int
    mode: str = "slide"  # or "whole"
    crop: int = 512
    stride: int = 341
    img_scale: Tuple[int, int] = (2048, 512)
    ratios: Tuple[float, ...] = (1.0,)
    flip: bool = False
    crops_per_batch: int = 8


def default_stride(crop: int) -> int:
    """The reference's sliding-window stride for a crop: 2/3 of it (341 for 512, 21 for 32)."""
    return max(1, crop * 2 // 3)


def check_inference(crop: int, stride: int, mode: str, img_scale: Sequence[int], ratios: Sequence[float]) -> None:
    """Refuse test settings that cannot predict every pixel, with the setting to use instead.

    Args:
        crop / stride: sliding-window size and step (``slide`` mode): windows further apart than
            their size would leave pixels uncovered.
        mode: ``slide`` or ``whole``.
        img_scale / ratios: the resize (LONG, SHORT) and the scale factors it is used with (test
            ratios, the smallest training ratio), which must leave at least one pixel.
    """
    if mode == "slide" and stride > crop:
        raise UserError(
            f"--stride {stride} is larger than --crop_size {crop}: sliding windows {crop} px wide every {stride} px "
            f"would leave pixels uncovered. Use --stride {default_stride(crop)} (2/3 of the crop, as the reference's "
            f"341 for 512), or any value in 1..{crop}."
        )
    for ratio in ratios:
        short = int(min(img_scale) * ratio)
        if short < 1:
            raise UserError(
                f"--img_scale {' '.join(map(str, img_scale))} at ratio {ratio:g} resizes images to a {short}-pixel short "
                f"edge. Use a larger --img_scale or larger ratios (--ratio_range, --aug_ratios; the reference: 2048 512, "
                f"0.5 2.0 and 0.5 ... 1.75)."
            )


def windows(h: int, w: int, crop: int, stride: int) -> List[Tuple[int, int, int, int]]:
    """mmseg's sliding windows (y1, y2, x1, x2) over an h x w image."""
    h_grids = max(h - crop + stride - 1, 0) // stride + 1
    w_grids = max(w - crop + stride - 1, 0) // stride + 1
    out = []
    for i in range(h_grids):
        for j in range(w_grids):
            y2, x2 = min(i * stride + crop, h), min(j * stride + crop, w)
            out.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    return out


def slide_inference(fn: LogitsFn, img: torch.Tensor, num_classes: int, crop: int, stride: int,
                    crops_per_batch: int = 8) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sliding-window logits [N, C, H, W] (float32) and the window count per pixel [1, 1, H, W]."""
    n, _, h, w = img.shape
    logits = img.new_zeros((n, num_classes, h, w), dtype=torch.float32)
    count = img.new_zeros((1, 1, h, w), dtype=torch.float32)
    wins = windows(h, w, crop, stride)
    for start in range(0, len(wins), crops_per_batch):
        chunk = wins[start:start + crops_per_batch]
        crops = [F.pad(img[:, :, y1:y2, x1:x2], (0, crop - (x2 - x1), 0, crop - (y2 - y1))) for y1, y2, x1, x2 in chunk]
        out = fn(torch.cat(crops)).float()
        for k, (y1, y2, x1, x2) in enumerate(chunk):
            logits[:, :, y1:y2, x1:x2] += out[k * n:(k + 1) * n, :, :y2 - y1, :x2 - x1]
            count[:, :, y1:y2, x1:x2] += 1
    if (count == 0).any():  # cannot happen with mmseg's grid; a wrong grid must not pass silently
        raise RuntimeError("sliding windows left pixels uncovered")
    return logits / count, count


def whole_inference(fn: LogitsFn, img: torch.Tensor) -> torch.Tensor:
    return fn(img).float()


@torch.no_grad()
def predict(fn: LogitsFn, img: torch.Tensor, cfg: InferenceConfig) -> torch.Tensor:
    """Class probabilities [N, C, H, W] at the size of ``img`` (the original image, normalized)."""
    h0, w0 = img.shape[2:]
    total: Optional[torch.Tensor] = None
    passes = 0
    for ratio in cfg.ratios:
        w, h = rescale_size(w0, h0, (int(cfg.img_scale[0] * ratio), int(cfg.img_scale[1] * ratio)))
        x = img if (h, w) == (h0, w0) else F.interpolate(img, size=(h, w), mode="bilinear", align_corners=False)
        for flip in (False, True) if cfg.flip else (False,):
            xi = x.flip(-1) if flip else x
            if cfg.mode == "slide":
                logits = slide_inference(fn, xi, cfg.num_classes, cfg.crop, cfg.stride, cfg.crops_per_batch)[0]
            else:
                logits = whole_inference(fn, xi)
            if logits.shape[2:] != (h0, w0):
                logits = F.interpolate(logits, size=(h0, w0), mode="bilinear", align_corners=False)
            probs = logits.softmax(dim=1)
            probs = probs.flip(-1) if flip else probs
            total = probs if total is None else total + probs
            passes += 1
    return total / passes


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: torch.utils.data.DataLoader, cfg: InferenceConfig, device: torch.device,
             amp_dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, int]:
    """Areas [4, C] (intersection, union, prediction, label) summed over this rank's images and then
    over all ranks, and the number of images. Each rank reads a disjoint shard, so every image
    counts once. ``model`` must have ``encode_decode``; it is left in eval mode."""
    model.eval()

    def fn(x: torch.Tensor) -> torch.Tensor:
        with autocast(device, amp_dtype):
            return model.encode_decode(x)

    areas = torch.zeros(4, cfg.num_classes, dtype=torch.int64, device=device)
    images = torch.zeros((), dtype=torch.int64, device=device)
    for img, label in loader:
        img, label = img.to(device, non_blocking=True), label.to(device, non_blocking=True)
        pred = predict(fn, img, cfg).argmax(dim=1)
        areas += intersect_and_union(pred, label, cfg.num_classes)
        images += img.shape[0]
    dist_util.all_reduce_sum(areas)
    dist_util.all_reduce_sum(images)
    return areas, int(images)
