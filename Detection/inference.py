"""Run a trained detector on images: COCO-format results and pictures with the boxes and masks drawn.

    python Detection/inference.py --checkpoint ./out_det/checkpoint-best.pth --images photo.jpg more_photos/ \
        --output_dir ./out_det/vis --score_thresh 0.5

The model is rebuilt from the checkpoint (``model_cfg``, the category ids and names it was trained
with) and loaded strictly. Writes into ``--output_dir``:

* ``coco_instances_results.json``: every detection above ``--score_thresh`` in COCO's results format
  (``image_id`` is the image's index in ``images.json``; category ids are the training set's);
* ``images.json``: ``[{"id", "file_name", "height", "width"}]``, COCO's ``images`` entries of the inputs;
* ``<image name>.png`` for each input (``<image name>-<index>.png`` where two inputs share a name): the
  image with the masks, boxes, class names and scores drawn.
"""
import argparse
import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Tuple

from util.checkpoints import convert
from util.checkpoints import reader as ckpt_util
from util.checkpoints.files import write_atomic
from util.config.cli import Parser, rate
from util.data.datasets import IMG_EXTENSIONS, list_images
from util.run.dist import resolve_device
from util.run.errors import UserError, run_cli

import numpy as np
import torch
from PIL import Image
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from Detection.data import load_image
from Detection.models import DetConfig, ViTDetMaskRCNN
from evaluation.coco import RESULTS_FILE, to_coco_results, write_results

_log = logging.getLogger("Detection.inference")

PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40)]


def load_detector(path: str) -> Tuple[ViTDetMaskRCNN, List[int], List[str]]:
    """The detector a checkpoint of ``Detection/train.py`` holds (in evaluation mode), the COCO category
    ids of its labels 1..K and their names."""
    ckpt = ckpt_util.read_checkpoint(path, check=True)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model_cfg"), dict) or "cat_ids" not in ckpt:
        raise UserError(f"{path} is not a checkpoint of Detection/train.py (it has no model_cfg and cat_ids). "
                        f"Give a checkpoint-*.pth of a detection run.")
    model = ViTDetMaskRCNN(DetConfig.from_dict(ckpt["model_cfg"]))
    convert.load_model_state(model, convert.model_state_of(ckpt, path), path)
    cat_ids = [int(c) for c in ckpt["cat_ids"]]
    return model.eval(), cat_ids, list(ckpt.get("classes") or map(str, cat_ids))


def gather_inputs(paths: List[str]) -> List[Path]:
    """The image files named, and those under the folders named, in order; none is an error."""
    found: List[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += [Path(f) for f in list_images(p)]
        elif p.is_file():
            found.append(p)
        else:
            raise UserError(f"--images: {p} is neither a file nor a folder.")
    if not found:
        raise UserError(f"--images: no image files ({', '.join(IMG_EXTENSIONS)}) in {', '.join(paths)}.")
    return found


def draw(image: torch.Tensor, output: Dict[str, torch.Tensor], names: List[str], score_thresh: float) -> np.ndarray:
    """[H, W, 3] uint8: ``image`` ([3, H, W] uint8) with the detections above ``score_thresh``."""
    keep = output["scores"] >= score_thresh
    boxes, labels, scores = output["boxes"][keep], output["labels"][keep], output["scores"][keep]
    colours = [PALETTE[int(k) % len(PALETTE)] for k in labels]
    out = image
    if "masks" in output and keep.any():
        out = draw_segmentation_masks(out, output["masks"][keep][:, 0] > 0.5, alpha=0.45, colors=colours)
    if len(boxes):
        text = [f"{names[int(k) - 1]} {s:.2f}" for k, s in zip(labels, scores)]
        out = draw_bounding_boxes(out, boxes, labels=text, colors=colours, width=max(1, min(image.shape[1:]) // 200))
    return out.permute(1, 2, 0).numpy()


@torch.no_grad()
def main(args: argparse.Namespace) -> List[Dict[str, Any]]:
    device = resolve_device(args.device)
    inputs = gather_inputs(args.images)  # before anything is read or written
    model, cat_ids, names = load_detector(args.checkpoint)
    model.to(device)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: List[Dict[str, Any]] = []
    images: List[Dict[str, Any]] = []
    stems = [p.stem for p in inputs]
    for i, path in enumerate(inputs):
        img = torch.from_numpy(load_image(path)).permute(2, 0, 1).contiguous()
        output = {k: v.cpu() for k, v in model([img.to(device)])[0].items()}
        found = [r for r in to_coco_results(output, i, cat_ids) if r["score"] >= args.score_thresh]
        results += found
        images.append({"id": i, "file_name": str(path), "height": img.shape[1], "width": img.shape[2]})
        picture = Image.fromarray(draw(img, output, names, args.score_thresh))
        name = out / (f"{path.stem}.png" if stems.count(path.stem) == 1 else f"{path.stem}-{i}.png")  # unique
        write_atomic(name, lambda f, pic=picture: pic.save(f, format="PNG"))
        _log.info("%s: %d detections above %.2f -> %s", path, len(found), args.score_thresh, name)
    write_results(out / RESULTS_FILE, results)
    data = json.dumps(images, indent=1).encode()
    write_atomic(out / "images.json", lambda f: f.write(data))
    print(f"{len(results)} detections on {len(inputs)} images; results and pictures in {out}")
    return results


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser("Detection/inference.py", "Run a trained detector on images: COCO results JSON and pictures")
    p.add_argument("--checkpoint", required=True, help="a checkpoint of Detection/train.py")
    p.add_argument("--images", required=True, nargs="+", help="image files and folders (searched recursively)")
    p.add_argument("--output_dir", required=True, help="where the results and the pictures go")
    p.add_argument("--score_thresh", default=0.5, type=rate, metavar="S",
                   help="keep detections scoring at least S (the model itself keeps those above its own 0.05)")
    p.add_argument("--device", default="", help="cuda, cuda:N or cpu (default: cuda when available)")
    return p


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
