"""COCO detection (Detection/): ViTDet's backbone and pyramid, the Mask R-CNN, the COCO data and its
training transform, COCOeval, pre-trained weights and the export to detectron2's ViTDet layout."""
import json
import math
import signal
import subprocess
import sys

from util.checkpoints import convert
from util.checkpoints.pos_embed import resize_pos_embed
from util.run.errors import UserError
from util.run.lr_sched import multistep_schedule
from util.run.optim import layer_decay_groups

import det_eval_dist
import numpy as np
import pytest
import torch
from conftest import ROOT, TINY_DET, assert_same_weights, clean_env, read_log, weights
from PIL import Image
from pycocotools import mask as mask_util

import models_vit
from Detection import data, models
from Detection import train as det_train
from Detection.make_synthetic import CATEGORIES
from Detection.make_synthetic import build as build_synthetic
from evaluation import coco as evaluation
from tools import convert_checkpoint

TINY = "vitdet_mask_rcnn_vit_tiny_patch4"  # ViT-Ti/4, 4 blocks, 64 px, window 4, global blocks 2 and 4
LOSSES = {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}

# detectron2's ViTDet ViT-B (modeling/backbone/vit.py with configs/common/models/mask_rcnn_vitdet.py),
# written out: name -> shape. Global blocks (0-based 2, 5, 8, 11) have 2 * 64 - 1 rel-pos rows, the
# windowed ones 2 * 14 - 1.
D2_GLOBAL = (2, 5, 8, 11)
D2_VITDET_B = {"backbone.net.patch_embed.proj.weight": (768, 3, 16, 16), "backbone.net.patch_embed.proj.bias": (768,),
               "backbone.net.pos_embed": (1, 197, 768)}
for _i in range(12):
    _rows = 127 if _i in D2_GLOBAL else 27
    D2_VITDET_B.update({
        f"backbone.net.blocks.{_i}.norm1.weight": (768,), f"backbone.net.blocks.{_i}.norm1.bias": (768,),
        f"backbone.net.blocks.{_i}.attn.qkv.weight": (2304, 768), f"backbone.net.blocks.{_i}.attn.qkv.bias": (2304,),
        f"backbone.net.blocks.{_i}.attn.proj.weight": (768, 768), f"backbone.net.blocks.{_i}.attn.proj.bias": (768,),
        f"backbone.net.blocks.{_i}.attn.rel_pos_h": (_rows, 64), f"backbone.net.blocks.{_i}.attn.rel_pos_w": (_rows, 64),
        f"backbone.net.blocks.{_i}.norm2.weight": (768,), f"backbone.net.blocks.{_i}.norm2.bias": (768,),
        f"backbone.net.blocks.{_i}.mlp.fc1.weight": (3072, 768), f"backbone.net.blocks.{_i}.mlp.fc1.bias": (3072,),
        f"backbone.net.blocks.{_i}.mlp.fc2.weight": (768, 3072), f"backbone.net.blocks.{_i}.mlp.fc2.bias": (768,),
    })
# its simple feature pyramid (SimpleFeaturePyramid: simfp_<log2 stride>, layers in detectron2's order)
D2_SIMFP_B = {
    "backbone.simfp_2.0.weight": (768, 384, 2, 2), "backbone.simfp_2.0.bias": (384,), "backbone.simfp_2.1.weight": (384,),
    "backbone.simfp_2.1.bias": (384,), "backbone.simfp_2.3.weight": (384, 192, 2, 2), "backbone.simfp_2.3.bias": (192,),
    "backbone.simfp_2.4.weight": (256, 192, 1, 1), "backbone.simfp_2.4.norm.weight": (256,),
    "backbone.simfp_2.4.norm.bias": (256,), "backbone.simfp_2.5.weight": (256, 256, 3, 3),
    "backbone.simfp_2.5.norm.weight": (256,), "backbone.simfp_2.5.norm.bias": (256,),
    "backbone.simfp_3.0.weight": (768, 384, 2, 2), "backbone.simfp_3.0.bias": (384,),
    "backbone.simfp_3.1.weight": (256, 384, 1, 1), "backbone.simfp_3.1.norm.weight": (256,),
    "backbone.simfp_3.1.norm.bias": (256,), "backbone.simfp_3.2.weight": (256, 256, 3, 3),
    "backbone.simfp_3.2.norm.weight": (256,), "backbone.simfp_3.2.norm.bias": (256,),
    "backbone.simfp_4.0.weight": (256, 768, 1, 1), "backbone.simfp_4.0.norm.weight": (256,),
    "backbone.simfp_4.0.norm.bias": (256,), "backbone.simfp_4.1.weight": (256, 256, 3, 3),
    "backbone.simfp_4.1.norm.weight": (256,), "backbone.simfp_4.1.norm.bias": (256,),
    "backbone.simfp_5.1.weight": (256, 768, 1, 1), "backbone.simfp_5.1.norm.weight": (256,),
    "backbone.simfp_5.1.norm.bias": (256,), "backbone.simfp_5.2.weight": (256, 256, 3, 3),
    "backbone.simfp_5.2.norm.weight": (256,), "backbone.simfp_5.2.norm.bias": (256,),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one torch thread (two busy-waiting OpenMP threads slow a shared 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def synthetic(small_coco):
    return small_coco


def tiny(**overrides) -> models.ViTDetMaskRCNN:
    torch.manual_seed(0)
    return models.create_model(TINY, num_classes=3, **overrides)


def box_target(x0: int, y0: int, x1: int, y1: int, label: int = 1, size: int = 64) -> dict:
    masks = torch.zeros(1, size, size, dtype=torch.uint8)
    masks[0, y0:y1, x0:x1] = 1
    return {"boxes": torch.tensor([[x0, y0, x1, y1]], dtype=torch.float32), "labels": torch.tensor([label]),
            "masks": masks}


# --------------------------------------------------------------------------------------------
# backbone


def test_vit_b_matches_detectron2_vitdet_definition():
    """ViT-B: global attention in blocks 3, 6, 9, 12 (1-based), window 14 elsewhere; every backbone
    tensor has detectron2's name and shape (built on the meta device: no memory, no time)."""
    cfg = models.model_config("vitdet_mask_rcnn_vit_base_patch16")
    assert cfg.global_indices == (3, 6, 9, 12) and cfg.drop_path == 0.1 and cfg.window_size == 14
    assert models.model_config("vitdet_mask_rcnn_vit_large_patch16").global_indices == (6, 12, 18, 24)
    with torch.device("meta"):
        model = models.ViTDetMaskRCNN(cfg)
    blocks = model.backbone.net.blocks
    assert [b.window_size for b in blocks] == [0 if i in D2_GLOBAL else 14 for i in range(12)]
    assert all(b.norm1.eps == 1e-6 and b.attn.use_rel_pos for b in blocks)
    sd = model.state_dict()
    backbone = {k: tuple(v.shape) for k, v in sd.items() if k.startswith("backbone.")}
    assert backbone == {**D2_VITDET_B, **D2_SIMFP_B}
    assert model.backbone.strides == (4, 8, 16, 32, 64)


def test_windowed_block_is_local_and_global_block_is_not():
    net = tiny().backbone.net.eval()
    windowed, global_ = net.blocks[0], net.blocks[3]
    assert (windowed.window_size, global_.window_size) == (4, 0)
    with torch.no_grad():
        for blk in (windowed, global_):  # non-zero relative position tables, so they are exercised too
            blk.attn.rel_pos_h.normal_(0, 0.5)
            blk.attn.rel_pos_w.normal_(0, 0.5)
        x = torch.randn(1, 16, 16, 192)
        y = x.clone()
        y[0, 13, 14] += 3.0 * torch.randn(192)  # a token of the bottom-right window (not a constant: LayerNorm)
        for blk, changes_far in ((windowed, False), (global_, True)):
            a, b = blk(x), blk(y)
            assert not torch.equal(a[0, 12:, 12:], b[0, 12:, 12:])  # its own window changes
            far = (a[0, :12, :12] - b[0, :12, :12]).abs().max().item()
            assert far > 1e-4 if changes_far else far == 0.0, far  # other windows: bit for bit the same
        # a grid that is not a multiple of the window is zero-padded inside the block, outside windows stay local
        x = torch.randn(1, 18, 10, 192)
        assert windowed(x).shape == x.shape


def test_pyramid_shapes_and_strides():
    """Strides patch/4, patch/2, patch, 2 patch and the pooled 4 patch, 'p<log2 stride>', C channels."""
    model = tiny()
    with torch.no_grad():
        feats = model.backbone(torch.randn(2, 3, 64, 64))
    assert {k: tuple(v.shape) for k, v in feats.items()} == {
        "p0": (2, 32, 64, 64), "p1": (2, 32, 32, 32), "p2": (2, 32, 16, 16), "p3": (2, 32, 8, 8), "p4": (2, 32, 4, 4)}
    # patch 16, as ViT-B: p2..p6 at strides 4..64
    cfg = models.DetConfig(embed_dim=64, depth=2, num_heads=2, img_size=128, pretrain_img_size=64, window_size=4,
                           global_blocks=(2,), channels=16, num_classes=2)
    backbone = models.ViTDetBackbone(cfg)
    with torch.no_grad():
        feats = backbone(torch.randn(1, 3, 128, 128))
    assert {k: tuple(v.shape[2:]) for k, v in feats.items()} == {
        "p2": (32, 32), "p3": (16, 16), "p4": (8, 8), "p5": (4, 4), "p6": (2, 2)}
    assert backbone.strides == (4, 8, 16, 32, 64)


def test_bad_configs_are_refused():
    with pytest.raises(UserError, match="global attention blocks"):
        models.create_model(TINY, global_blocks=(5,))
    with pytest.raises(UserError, match="multiples of the patch size"):
        models.create_model(TINY, img_size=66)
    with pytest.raises(UserError, match="Unknown detection model"):
        models.create_model("vitdet_mask_rcnn_vit_gigantic")


# --------------------------------------------------------------------------------------------
# Mask R-CNN


def test_mask_rcnn_trains_and_predicts():
    model = tiny()
    images = [torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8) for _ in range(2)]
    targets = [box_target(4, 6, 30, 40, 1), box_target(20, 10, 60, 50, 3)]
    losses = model(images, targets)
    assert set(losses) == LOSSES and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    net = model.backbone.net
    for p in (net.blocks[0].attn.qkv.weight, net.blocks[3].attn.rel_pos_h, net.pos_embed, model.backbone.simfp_0[0].weight,
              model.roi_heads.mask_predictor.mask_fcn_logits.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0

    model.eval()
    with torch.no_grad():  # outputs at each image's own size (the model resizes and pads internally)
        out = model([torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8), torch.rand(3, 64, 40)])
    for o, (h, w) in zip(out, ((50, 70), (64, 40))):
        n = len(o["boxes"])
        assert 0 < n <= 100 and o["masks"].shape == (n, 1, h, w) and o["labels"].min() >= 1
        assert o["boxes"][:, 2].max() <= w + 1e-3 and o["boxes"][:, 3].max() <= h + 1e-3  # clipped to the image
        assert (o["scores"] >= 0.05).all()


def test_layer_decay_follows_vitdet_rule():
    """lr scale = 0.7 ** (depth + 1 - layer_id): embeddings 0, block i (0-based) i + 1, the rest depth + 1."""
    model = tiny()
    scale = {}
    for g in layer_decay_groups(model, 0.1, 0.7):
        for p in g["params"]:
            scale[p] = g["lr_scale"]
    names = dict(model.named_parameters())
    expected = {"backbone.net.pos_embed": 0.7 ** 5, "backbone.net.patch_embed.proj.weight": 0.7 ** 5,
                "backbone.net.blocks.0.attn.qkv.weight": 0.7 ** 4, "backbone.net.blocks.3.attn.rel_pos_h": 0.7 ** 1,
                "backbone.simfp_0.4.weight": 1.0, "rpn.head.cls_logits.weight": 1.0,
                "roi_heads.box_predictor.cls_score.weight": 1.0}
    for name, want in expected.items():
        assert scale[names[name]] == pytest.approx(want), name


# --------------------------------------------------------------------------------------------
# pre-trained weights


def save_tiny_encoder(path, img_size=32, depth=4, seed=1, drop=()):
    torch.manual_seed(seed)
    # a pre-training encoder (MAE's: cls token, final norm)
    vit = models_vit.create_model("vit_tiny_patch4", img_size=img_size, depth=depth, num_classes=0, global_pool="token")
    sd = {k: v for k, v in vit.state_dict().items() if not k.startswith(drop)} if drop else vit.state_dict()
    torch.save({"model": sd, "epoch": 3, "args": {}}, path)
    return sd


def test_pretrained_encoder_loads(tmp_path):
    sd = save_tiny_encoder(tmp_path / "enc.pth")
    model = tiny()
    missing, _ = models.load_pretrained(model, str(tmp_path / "enc.pth"))
    net = model.backbone.net
    assert torch.equal(net.blocks[2].attn.qkv.weight, sd["blocks.2.attn.qkv.weight"])
    assert torch.equal(net.patch_embed.proj.weight, sd["patch_embed.proj.weight"])
    assert torch.equal(net.pos_embed, sd["pos_embed"])  # same grid: stored as is, cls row included
    assert sorted(missing) == sorted(net.new_keys()) and all(torch.all(net.state_dict()[k] == 0) for k in missing)

    # another pre-training size: the table is resized with the repo's rule to the model's grid
    small = save_tiny_encoder(tmp_path / "enc16.pth", img_size=16)
    models.load_pretrained(model, str(tmp_path / "enc16.pth"))
    assert torch.allclose(net.pos_embed, resize_pos_embed(small["pos_embed"], (8, 8), num_prefix_tokens=1))


def test_missing_pretrained_weights_are_an_error(tmp_path):
    save_tiny_encoder(tmp_path / "short.pth", depth=4, drop=("blocks.3.",))
    with pytest.raises(UserError, match=r"blocks\.3\.attn\.qkv\.weight"):
        models.load_pretrained(tiny(), str(tmp_path / "short.pth"))
    torch.manual_seed(0)
    wide = models_vit.create_model("vit_small_patch16", img_size=32, depth=4, num_classes=0)
    torch.save({"model": wide.state_dict()}, tmp_path / "wide.pth")
    with pytest.raises(UserError, match="does not fit the model"):
        models.load_pretrained(tiny(), str(tmp_path / "wide.pth"))


# --------------------------------------------------------------------------------------------
# data


def write_coco(root, images, annotations, categories=({"id": 5, "name": "thing"},), split="val"):
    """A COCO-layout folder from entries (images get real files of their size)."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / f"{split}2017").mkdir(exist_ok=True)
    for img in images:
        Image.new("RGB", (img["width"], img["height"]), (90, 90, 90)).save(root / f"{split}2017" / img["file_name"])
    doc = {"images": images, "annotations": annotations, "categories": list(categories)}
    (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(doc))
    return root / "annotations" / f"instances_{split}2017.json"


def square_ann(ann_id, image_id, x, y, s, crowd=0, w=None):
    return {"id": ann_id, "image_id": image_id, "category_id": 5, "iscrowd": crowd, "area": float(s * s),
            "bbox": [x, y, s if w is None else w, s], "segmentation": [[x, y, x + s, y, x + s, y + s, x, y + s]]}


def test_crowd_empty_and_degenerate_annotations(tmp_path):
    images = [{"id": i, "file_name": f"{i}.png", "height": 40, "width": 48} for i in (1, 2, 3)]
    anns = [square_ann(1, 1, 4, 4, 12), square_ann(2, 1, 20, 20, 10, crowd=1), square_ann(3, 1, 30, 5, 6, w=0),
            square_ann(4, 2, 8, 8, 10, crowd=1)]
    anns[1]["segmentation"] = evaluation_rle(np.pad(np.ones((10, 10), np.uint8), ((20, 10), (20, 18))))
    write_coco(tmp_path, images, anns, split="train")
    train = data.CocoDetection(tmp_path, "train", data.LargeScaleJitter(64, scale_range=(1.0, 1.0), flip_prob=0.0))
    assert train.ids == [1]  # image 2 holds only a crowd, image 3 nothing
    assert data.CocoDetection(tmp_path, "train").ids == [1, 2, 3]  # evaluation keeps every image
    img, target = train[0]
    assert img.shape == (3, 64, 64) and target["labels"].tolist() == [1] and target["image_id"] == 1
    # resized x 4/3 (40 x 48 -> 53 x 64): the square covers about (5.3, 5.3)-(21.3, 21.2); the degenerate
    # annotation (w = 0) and the crowd are no targets
    assert torch.allclose(target["boxes"], torch.tensor([[5.0, 5.0, 21.0, 21.0]]), atol=1.0)


def evaluation_rle(mask: np.ndarray) -> dict:
    rle = mask_util.encode(np.asfortranarray(mask))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


class Draws:
    """Fixed values for LargeScaleJitter's draws: flip, scale, crop position."""

    def __init__(self, *values):
        self.values = list(values)

    def uniform(self, lo=0.0, hi=1.0):
        return self.values.pop(0) * (hi - lo) + lo


def test_large_scale_jitter_geometry():
    """20 x 40 image, scale 1.25 of 64 -> resized x2 to 40 x 80, cropped at x 8 (half the 16 spare
    columns), padded at the bottom with 128. A 10 px square at (10, 5) lands at (12, 10)-(32, 30);
    flipped at (32, 10)-(52, 30); a square at x 36-40 leaves the crop and is dropped."""
    img = np.zeros((20, 40, 3), np.uint8)
    poly = [[10, 5, 20, 5, 20, 15, 10, 15]]
    rle_mask = np.zeros((20, 40), np.uint8)
    rle_mask[5:15, 10:20] = 1
    outside = [[36, 5, 40, 5, 40, 9, 36, 9]]
    lsj = data.LargeScaleJitter(64)
    scale = (1.25 - 0.1) / 1.9  # the unit draw that gives scale 1.25 in (0.1, 2.0)
    out, t = lsj(img, [poly, evaluation_rle(rle_mask), outside], [1, 2, 3], rng=Draws(0.9, scale, 0.5))
    assert out.shape == (3, 64, 64) and (out[:, 40:] == 128).all() and (out[:, :40] == 0).all()
    assert t["labels"].tolist() == [1, 2] and t["masks"].shape == (2, 64, 64)
    assert t["boxes"].tolist() == [[12, 10, 32, 30], [12, 10, 32, 30]]
    _, t = lsj(img, [poly], [1], rng=Draws(0.1, scale, 0.5))
    assert t["boxes"].tolist() == [[32, 10, 52, 30]]


def test_synthetic_dataset(synthetic):
    doc = json.loads(data.annotation_path(synthetic, "val").read_text())
    assert [c["id"] for c in doc["categories"]] == list(CATEGORIES)
    segs = [a["segmentation"] for a in doc["annotations"]]
    assert any(isinstance(s, list) for s in segs) and any(isinstance(s, dict) for s in segs)
    val = data.CocoDetection(synthetic, "val")
    assert len(val) == 12 and val.cat_ids == [1, 3, 7]
    img, t = val[0]
    assert img.dtype == torch.uint8 and img.shape[1:] == (doc["images"][0]["height"], doc["images"][0]["width"])
    assert build_synthetic(synthetic) == synthetic  # built once


def test_bad_annotation_files_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="instances_val2017.json not found"):
        data.CocoDetection(tmp_path, "val")
    images = [{"id": 1, "file_name": "1.png", "height": 20, "width": 20}]
    path = write_coco(tmp_path, images, [square_ann(1, 1, 2, 2, 5)])
    path.write_text(path.read_text()[:-20])  # truncated download
    with pytest.raises(UserError, match=f"Cannot read annotation file {path}"):
        data.CocoDetection(tmp_path, "val")
    write_coco(tmp_path, images, [square_ann(1, 9, 2, 2, 5)])
    with pytest.raises(UserError, match="annotation id 1 refers to image id 9"):
        data.CocoDetection(tmp_path, "val")
    write_coco(tmp_path, images + [{"id": 2, "file_name": "2.png", "height": 20, "width": 20}], [])
    (tmp_path / "val2017" / "2.png").unlink()
    with pytest.raises(UserError, match=r"1 image\(s\) listed in .* are missing from .*e\.g\. 2\.png"):
        data.CocoDetection(tmp_path, "val")


# --------------------------------------------------------------------------------------------
# evaluation


def ground_truth_results(coco, shift: float = 0.0):
    """Every non-crowd annotation as a detection with score 1, moved right by ``shift`` x its width."""
    out = []
    for ann in coco.dataset["annotations"]:
        if ann["iscrowd"]:
            continue
        info = coco.imgs[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        dx = int(round(shift * w))
        mask = np.roll(coco.annToMask(ann), dx, axis=1)
        out.append({"image_id": ann["image_id"], "category_id": ann["category_id"], "bbox": [x + dx, y, w, h],
                    "score": 1.0, "segmentation": evaluation_rle(mask)})
        assert mask.shape == (info["height"], info["width"])
    return out


def test_coco_eval_perfect_and_shifted(synthetic, tmp_path):
    coco = data.load_coco(data.annotation_path(synthetic, "val"))
    perfect, text = evaluation.coco_evaluate(coco, ground_truth_results(coco))
    for iou_type in ("bbox", "segm"):
        assert perfect[iou_type]["AP"] == pytest.approx(100.0) and perfect[iou_type]["AP50"] == pytest.approx(100.0)
        assert math.isnan(perfect[iou_type]["APl"])  # no large object: COCOeval's -1 becomes NaN
    assert "Average Precision" in text
    shifted, _ = evaluation.coco_evaluate(coco, ground_truth_results(coco, shift=0.3))
    for iou_type in ("bbox", "segm"):
        assert shifted[iou_type]["AP"] < 60 and shifted[iou_type]["AP50"] > shifted[iou_type]["AP75"]
    # the results JSON is COCO's format: pycocotools reads it back
    evaluation.write_results(tmp_path / evaluation.RESULTS_FILE, ground_truth_results(coco))
    assert len(coco.loadRes(str(tmp_path / evaluation.RESULTS_FILE)).anns) == len(ground_truth_results(coco))
    # an image without any prediction still counts against the AP
    missing_one, _ = evaluation.coco_evaluate(coco, [r for r in ground_truth_results(coco) if r["image_id"] != 1])
    assert missing_one["bbox"]["AP"] < 100.0


def test_evaluate_loop_writes_results(synthetic, tmp_path):
    val = data.CocoDetection(synthetic, "val")
    loader = torch.utils.data.DataLoader(val, batch_size=4, collate_fn=data.collate)
    model = tiny(score_thresh=0.0)
    metrics = evaluation.evaluate(model, loader, val.coco, val.cat_ids, torch.device("cpu"),
                                  results_path=tmp_path / "res.json")
    assert set(metrics) == {"bbox", "segm"} and set(metrics["bbox"]) == set(evaluation.METRICS)
    assert 0.0 <= metrics["bbox"]["AP"] < 100.0 and model.training  # the model's mode is restored
    res = json.loads((tmp_path / "res.json").read_text())
    assert res and {"image_id", "category_id", "bbox", "score", "segmentation"} <= set(res[0])
    assert {r["category_id"] for r in res} <= set(CATEGORIES)
    assert evaluation.gather_to_main([1, 2]) == [1, 2]  # a single process keeps its list


# --------------------------------------------------------------------------------------------
# export to detectron2


def test_detectron2_export_names_and_shapes():
    with torch.device("meta"):  # a MAE ViT-B/16 release's encoder (cls token, final norm)
        vit = models_vit.create_model("vit_base_patch16", num_classes=0, global_pool="token")
        detector = models.create_model("vitdet_mask_rcnn_vit_base_patch16")
    out = convert.to_detectron2_vitdet(dict(vit.state_dict()))
    rel_pos = {k for k in D2_VITDET_B if k.endswith(("rel_pos_h", "rel_pos_w"))}
    assert {k: tuple(v.shape) for k, v in out.items()} == {k: v for k, v in D2_VITDET_B.items() if k not in rel_pos}
    # a detector of this repo exports its whole backbone: relative position tables and pyramid included
    sd = convert.state_dict_of({"model": detector.state_dict()}, "detector")
    out = convert.to_detectron2_vitdet(sd)
    assert {k: tuple(v.shape) for k, v in out.items()} == {**D2_VITDET_B, **D2_SIMFP_B}


def test_convert_checkpoint_to_detectron2_cli(tmp_path):
    sd = save_tiny_encoder(tmp_path / "enc.pth")
    args = convert_checkpoint.get_args_parser().parse_args([str(tmp_path / "enc.pth"), str(tmp_path / "d2.pth"),
                                                            "--to", "detectron2"])
    convert_checkpoint.main(args)
    out = torch.load(tmp_path / "d2.pth", weights_only=True)["model"]
    assert set(out) == {f"backbone.net.{k}" for k in sd if k not in ("cls_token", "norm.weight", "norm.bias")}
    assert torch.equal(out["backbone.net.blocks.1.mlp.fc1.weight"], sd["blocks.1.mlp.fc1.weight"])
    assert torch.equal(out["backbone.net.pos_embed"], sd["pos_embed"])


@pytest.mark.slow  # three processes; sibling: test_distributed's 2-process --dist_eval (the same gather)
def test_two_processes_evaluate_like_one(synthetic, tmp_path):
    """2 gloo processes, each predicting every other image, gathered on rank 0 = this process alone."""
    env = clean_env(tmp_path)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(ROOT / "tests" / "det_eval_dist.py"), str(synthetic), str(tmp_path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    det_eval_dist.main(str(synthetic), tmp_path)  # world size 1, the same seed and batches of one image
    r1, r2 = (json.loads((tmp_path / f"results-w{w}.json").read_text()) for w in (1, 2))
    key = lambda r: (r["image_id"], r["score"], r["category_id"], r["bbox"])  # noqa: E731
    assert len(r1) > 0 and sorted(r1, key=key) == sorted(r2, key=key)
    assert (tmp_path / "metrics-w1.json").read_text() == (tmp_path / "metrics-w2.json").read_text()


# --------------------------------------------------------------------------------------------
# the training job (Detection/train.py): the one trainer, COCO evaluation, --eval, crash consistency


def train_det(*args) -> dict:
    return det_train.main(det_train.get_args_parser().parse_args([str(a) for a in args]))


@pytest.fixture(scope="module")
def det_run(synthetic, tmp_path_factory):
    """The tiny detection job, uninterrupted: its output folder and what ``main`` returned."""
    out = tmp_path_factory.mktemp("det_run")
    return out, train_det(*TINY_DET, "--data_path", synthetic, "--output_dir", out)


def test_training_logs_evaluates_and_keeps_the_best_checkpoint(det_run):
    out, stats = det_run
    log = read_log(out)
    assert [(r["mode"], r["iteration"]) for r in log] == [("train", 2), ("train", 4), ("val", 4), ("train", 6),
                                                          ("train", 8), ("val", 8)]
    train_keys = {"lr", "loss", "loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls", "loss_rpn_loc", "time"}
    assert train_keys <= set(log[0]) and all(math.isfinite(log[0][k]) for k in train_keys)
    assert log[0]["loss"] == pytest.approx(sum(log[0][f"loss_{k}"] for k in det_train.LOSSES.values()))
    val = [r for r in log if r["mode"] == "val"]
    assert val[-1]["bbox"]["AP"] == pytest.approx(stats["bbox"]["AP"]) and val[-1]["images"] == 12
    assert val[-1]["best_box_ap"] == max(r["bbox"]["AP"] for r in val) == stats["best_box_ap"]
    assert {p.name for p in out.glob("checkpoint-*.pth")} == {"checkpoint-last.pth", "checkpoint-8.pth",
                                                            "checkpoint-best.pth"}
    ckpt = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert ckpt["iteration"] == 8 and ckpt["cat_ids"] == sorted(CATEGORIES)
    assert ckpt["model_cfg"]["num_classes"] == 3 and ckpt["args"]["milestones"] == [7, 8]  # ViTDet's fractions of 8
    # the results JSON is COCO's format, of the last evaluation
    res = json.loads((out / evaluation.RESULTS_FILE).read_text())
    assert res and {r["category_id"] for r in res} <= set(CATEGORIES)


def test_eval_of_a_checkpoint_gives_its_training_numbers(det_run, synthetic, tmp_path, capsys):
    out, stats = det_run
    again = train_det(*TINY_DET, "--data_path", synthetic, "--eval", "--resume", out / "checkpoint-last.pth",
                      "--output_dir", tmp_path)
    for iou_type in ("bbox", "segm"):
        assert again[iou_type] == stats[iou_type]  # COCOeval's numbers, to the last digit
    assert f"box AP {stats['bbox']['AP']:.2f}" in capsys.readouterr().out
    assert json.loads((tmp_path / evaluation.RESULTS_FILE).read_text()) == json.loads(
        (out / evaluation.RESULTS_FILE).read_text())


@pytest.mark.parametrize("kill_after", ["checkpoint-best.pth:1", "log.txt:3"])
def test_a_kill_during_a_commit_loses_and_duplicates_nothing(kill_after, det_run, synthetic, tmp_path):
    """kill -9 right after a file of the evaluation commit at iteration 4, then the same command: the
    run ends as the uninterrupted one, every log line once."""
    ref, _ = det_run
    argv = [*TINY_DET, "--data_path", str(synthetic), "--output_dir", str(tmp_path)]
    proc = subprocess.run([sys.executable, str(ROOT / "Detection" / "train.py"), *argv], cwd=ROOT,
                          env=clean_env(tmp_path, DEEPMIM_KILL_AFTER=kill_after), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    train_det(*argv)  # the rerun
    a, b = read_log(ref), read_log(tmp_path)
    assert [(r["mode"], r["iteration"]) for r in a] == [(r["mode"], r["iteration"]) for r in b]
    for ra, rb in zip(a, b):
        for key, value in ra.items():
            if key != "time" and isinstance(value, float):
                assert rb[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (key, ra, rb)
        assert ra.get("bbox") == rb.get("bbox")
    assert_same_weights(weights(ref / "checkpoint-last.pth"), weights(tmp_path / "checkpoint-last.pth"))
    assert_same_weights(weights(ref / "checkpoint-best.pth"), weights(tmp_path / "checkpoint-best.pth"))


def test_bad_flags_and_data_stop_before_anything_is_written(synthetic, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"--milestones 9 at or after --iters 8"):
        train_det(*TINY_DET, "--data_path", synthetic, "--milestones", "4,9", "--output_dir", out)
    with pytest.raises(UserError, match=r"Annotation file .*instances_train2017.json not found"):
        train_det(*TINY_DET, "--data_path", tmp_path / "nowhere", "--output_dir", out)
    with pytest.raises(UserError, match=r"image size 66 .* multiples of the patch size 4"):
        train_det(*TINY_DET, "--data_path", synthetic, "--img_size", "66", "--output_dir", out)
    assert not out.exists()
    with pytest.raises(UserError, match=r"--num_classes 5 but .*instances_val2017.json has 3 categories"):
        train_det(*TINY_DET, "--data_path", synthetic, "--num_classes", "5", "--output_dir", out)


def test_lr_schedule_is_vitdets_warmup_then_steps():
    """detectron2's WarmupParamScheduler(MultiStepParamScheduler([1, 0.1, 0.01], [163889, 177546]), 250 /
    184375, 0.001), written out: factor 0.001 at iteration 0, linear to 1 at 250, x0.1 at each milestone."""
    at = multistep_schedule(1e-4, det_train.VITDET_MILESTONES, 0.1, 250, 0.001)
    assert at(0) == pytest.approx(1e-7)
    assert at(125) == pytest.approx(1e-4 * (0.001 * 0.5 + 0.5))
    assert at(250) == at(163888) == pytest.approx(1e-4)
    assert at(163889) == at(177545) == pytest.approx(1e-5)
    assert at(177546) == at(184374) == pytest.approx(1e-6)
    flags = det_train.get_args_parser().parse_args(["--iters", "90000"])
    assert det_train.DetectionConfig.from_args(flags).det.lr_milestones(90000) == (80000, 86667)  # the same fractions


def test_inference_writes_coco_results_and_pictures(det_run, synthetic, tmp_path):
    from Detection import inference

    out, _ = det_run
    images = sorted((synthetic / "val2017").iterdir())[:3]
    args = inference.get_args_parser().parse_args(["--checkpoint", str(out / "checkpoint-last.pth"), "--images",
                                                   *map(str, images), "--output_dir", str(tmp_path / "vis"),
                                                   "--score_thresh", "0.0", "--device", "cpu"])
    results = inference.main(args)
    # the same detections as the evaluation of the same weights on the same images
    ckpt_results = json.loads((out / evaluation.RESULTS_FILE).read_text())
    coco = data.load_coco(data.annotation_path(synthetic, "val"))
    ids = {img["file_name"]: img["id"] for img in coco.dataset["images"]}
    for i, path in enumerate(images):
        mine = sorted((r["score"], r["bbox"]) for r in results if r["image_id"] == i)
        theirs = sorted((r["score"], r["bbox"]) for r in ckpt_results if r["image_id"] == ids[path.name])
        assert mine == theirs
    listed = json.loads((tmp_path / "vis" / "images.json").read_text())
    assert [x["file_name"] for x in listed] == list(map(str, images))
    for path in images:
        with Image.open(tmp_path / "vis" / f"{path.stem}.png") as pic:
            assert pic.size == Image.open(path).size
    save_tiny_encoder(tmp_path / "enc.pth")  # an encoder is not a detector
    with pytest.raises(UserError, match="is not a checkpoint of Detection/train.py"):
        inference.load_detector(str(tmp_path / "enc.pth"))


@pytest.mark.slow  # half a minute (two synthetic sets, three runs); sibling: test_eval_of_a_checkpoint_gives_its_training_numbers
def test_demo_runs_both_detectors_and_its_checkpoints_evaluate_to_its_numbers(tmp_path, capsys):
    """make det-demo's pipeline at its smallest: 1 pre-training epoch, 4 detection iterations each."""
    from Detection import demo

    out = tmp_path / "demo"
    results = demo.main(demo.get_args_parser().parse_args(["--output_dir", str(out), "--pretrain_epochs", "1",
                                                           "--iters", "4", "--num_workers", "0"]))
    printed = capsys.readouterr().out
    assert "det-demo, pre-trained backbone: box AP" in printed and "det-demo: pre-training adds" in printed
    assert set(results) == {"pre-trained", "random"}
    for name, folder in (("pre-trained", "pre_trained"), ("random", "random")):
        argv = [*demo.fill(demo.DETECT, iters=4, data=demo.labelled_data()), "--num_workers", "0", "--eval",
                "--output_dir", str(out / folder)]
        again = det_train.main(det_train.get_args_parser().parse_args(argv))
        assert again["bbox"] == results[name]["bbox"] and again["segm"] == results[name]["segm"]
    # the two detectors differ only in their start: the pre-trained one loaded the encoder
    a, b = (torch.load(out / f / "checkpoint-last.pth", weights_only=True)["model"] for f in ("pre_trained", "random"))
    assert not torch.equal(a["backbone.net.blocks.0.attn.qkv.weight"], b["backbone.net.blocks.0.attn.qkv.weight"])
