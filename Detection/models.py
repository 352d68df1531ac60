"""ViTDet's Mask R-CNN on the pre-trained plain ViT (Li, Mao, Girshick, He 2022), torchvision heads.

The reference is detectron2's ``projects/ViTDet/configs/COCO/mask_rcnn_vitdet_b_100ep.py`` with
``configs/common/models/mask_rcnn_vitdet.py``; here in native PyTorch:

* **backbone** (``backbone.net``): the plain ViT with MAE / timm parameter names (``patch_embed.proj``,
  ``pos_embed``, ``blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``), so every
  pre-training checkpoint loads through :func:`util.checkpoints.convert.load_encoder`. Its blocks are timm's
  ``vision_transformer_sam.Block``: ViTDet's block, with windowed attention (window 14, zero padding to
  a multiple of the window) in every block except the global ones (ViT-B: 3, 6, 9, 12, 1-based) and
  decomposed relative position biases ``attn.rel_pos_h`` / ``rel_pos_w`` (zero-initialised: the
  parameters a pre-trained encoder lacks). No cls token and no final norm. The stored absolute
  position table keeps the pre-training grid and its cls row (detectron2's ``pretrain_use_cls_token``);
  each forward drops the cls row and resizes the table to the input's grid with the repo's one rule,
  :func:`util.checkpoints.pos_embed.resize_pos_embed`.
* **simple feature pyramid** (``backbone.simfp_{k}``, detectron2's names): from the stride-16 map,
  scale 4 (deconv, LayerNorm, GELU, deconv), 2 (deconv), 1, 1/2 (max-pool), each followed by a 1x1 and
  a 3x3 conv without bias, each with a channel LayerNorm; ``p6`` = stride-2 max-pool of ``p5``.
* **heads** (torchvision's): RPN with 2 convs, anchors 32..512 x ratios (0.5, 1, 2); RoIAlign with
  ``aligned=True`` (detectron2's ROIAlignV2) and adaptive sampling; box head of 4 convs + 1 fc with
  LayerNorm; mask head of 4 convs with LayerNorm; detectron2's sampling and test settings.
* **input**: :class:`ViTDetTransform`: uint8 or [0, 1] images, ImageNet normalisation, padding to a
  square of ``img_size``. Training images arrive already jittered and cropped (``Detection.data``); test
  images are resized here (shortest edge ``img_size``, longest at most ``img_size``: detectron2's
  ``ResizeShortestEdge(1024, max_size=1024)``), so torchvision's post-processing returns boxes and
  pastes masks at the original resolution, as detectron2's ``detector_postprocess`` does.
"""
import dataclasses
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Tuple

from util.checkpoints.convert import load_encoder
from util.checkpoints.pos_embed import resize_pos_embed
from util.config.registry import VIT_ARCHS, Registry
from util.data.constants import IMAGENET_MEAN, IMAGENET_STD
from util.run.errors import UserError

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d, PatchEmbed, trunc_normal_
from timm.models.vision_transformer_sam import Block
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNN, MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.poolers import LevelMapper

_log = logging.getLogger(__name__)

SUPPORTED_SCALES = (4.0, 2.0, 1.0, 0.5)


@dataclass(frozen=True)
class DetConfig:
    """Everything that defines the detector (plain types: stored in checkpoints as ``model_cfg``)."""

    # the ViT
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    patch_size: int = 16
    mlp_ratio: float = 4.0
    img_size: int = 1024  # the square every batch is padded to; the test resize's target
    pretrain_img_size: int = 224  # the stored position table's grid is pretrain_img_size / patch_size
    window_size: int = 14
    global_blocks: Optional[Tuple[int, ...]] = None  # 1-based; None: depth/4, depth/2, 3 depth/4, depth
    rel_pos: bool = True
    drop_path: float = 0.1
    # pyramid and heads
    num_classes: int = 80  # without the background
    channels: int = 256  # pyramid and head width
    scale_factors: Tuple[float, ...] = SUPPORTED_SCALES
    anchor_sizes: Tuple[int, ...] = (32, 64, 128, 256, 512)  # one per pyramid level, p6 included
    canonical_box_size: int = 224  # a box of this size pools from the stride-16 level (FPN's rule)
    rpn_convs: int = 2
    box_convs: int = 4
    box_fc: int = 1024
    mask_convs: int = 4
    rpn_batch_size_per_image: int = 256
    box_batch_size_per_image: int = 512
    rpn_pre_nms_top_n: Tuple[int, int] = (2000, 1000)  # (training, test), per level
    rpn_post_nms_top_n: Tuple[int, int] = (1000, 1000)  # (training, test), per image
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100

    def to_dict(self) -> Dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "DetConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names})

    @property
    def global_indices(self) -> Tuple[int, ...]:
        """1-based blocks with global attention (ViTDet: every quarter of the depth)."""
        if self.global_blocks is not None:
            return tuple(self.global_blocks)
        return tuple(self.depth // 4 * k for k in range(1, 5)) if self.depth >= 4 else (self.depth,)

    @property
    def strides(self) -> Tuple[int, ...]:
        """Strides of the pyramid levels, the pooled top level included (ViT-B: 4, 8, 16, 32, 64)."""
        s = [int(self.patch_size / f) for f in self.scale_factors]
        return tuple(s + [2 * s[-1]])


def check_config(cfg: DetConfig) -> None:
    """Refuse a configuration the model cannot be built with, saying what to change."""
    if cfg.img_size % cfg.patch_size or cfg.pretrain_img_size % cfg.patch_size:
        raise UserError(f"image size {cfg.img_size} and pre-training size {cfg.pretrain_img_size} must be multiples "
                        f"of the patch size {cfg.patch_size}.")
    bad = [b for b in cfg.global_indices if not 1 <= b <= cfg.depth]
    if bad:
        raise UserError(f"global attention blocks {bad} are outside 1..{cfg.depth}.")
    if list(cfg.scale_factors) != sorted(set(cfg.scale_factors), reverse=True) or \
            any(f not in SUPPORTED_SCALES for f in cfg.scale_factors):
        raise UserError(f"pyramid scale factors {list(cfg.scale_factors)}: give decreasing values out of "
                        f"{list(SUPPORTED_SCALES)}.")
    if any(cfg.patch_size / f != int(cfg.patch_size / f) for f in cfg.scale_factors):
        raise UserError(f"patch size {cfg.patch_size} cannot be scaled by {list(cfg.scale_factors)} to whole strides.")
    if len(cfg.anchor_sizes) != len(cfg.scale_factors) + 1:
        raise UserError(f"{len(cfg.anchor_sizes)} anchor sizes for {len(cfg.scale_factors) + 1} pyramid levels.")
    if cfg.embed_dim % 4:
        raise UserError(f"width {cfg.embed_dim} must be divisible by 4 (the stride-4 level has width / 4 channels).")


# --------------------------------------------------------------------------------------------
# backbone


class PlainViT(nn.Module):
    """ViTDet's ViT: [B, 3, H, W] (H, W multiples of the patch) -> last block's map [B, D, H/p, W/p]."""

    def __init__(self, cfg: DetConfig) -> None:
        super().__init__()
        grid = cfg.img_size // cfg.patch_size
        # img_size here only sets patch_embed.grid_size, the stored table's grid, which
        # util.checkpoints.convert.adapt_to_vit resizes a checkpoint's table to; any input size is accepted
        self.patch_embed = PatchEmbed(img_size=cfg.pretrain_img_size, patch_size=cfg.patch_size,
                                      embed_dim=cfg.embed_dim, output_fmt="NHWC", strict_img_size=False)
        pretrain_grid = cfg.pretrain_img_size // cfg.patch_size
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + pretrain_grid ** 2, cfg.embed_dim))  # + the cls row
        # stochastic depth grows linearly with depth (torch.linspace's values, without a tensor: builds on 'meta')
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        globals_ = set(cfg.global_indices)
        self.blocks = nn.ModuleList(
            Block(cfg.embed_dim, cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True, drop_path=rates[i],
                  norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=cfg.rel_pos,
                  window_size=0 if i + 1 in globals_ else cfg.window_size, input_size=(grid, grid))
            for i in range(cfg.depth))
        self.embed_dim = cfg.embed_dim
        self.patch_size = cfg.patch_size
        self.grad_checkpointing = False
        self._init_weights()

    def _init_weights(self) -> None:
        # detectron2's ViT init (what a randomly initialised backbone starts from); rel-pos tables stay 0
        trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def new_keys(self) -> List[str]:
        """Parameters a pre-training checkpoint does not have: the relative position tables."""
        return [k for k in self.state_dict() if k.endswith(("attn.rel_pos_h", "attn.rel_pos_w"))]

    def position(self, grid: Tuple[int, int]) -> torch.Tensor:
        """The absolute position embedding for a patch grid: [1, h, w, D], cls row dropped."""
        pos = resize_pos_embed(self.pos_embed, grid, num_prefix_tokens=1)[:, 1:]
        return pos.reshape(1, grid[0], grid[1], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # [B, h, w, D]
        x = x + self.position((x.shape[1], x.shape[2]))
        for blk in self.blocks:  # windowed blocks partition [B, h, w, D] into windows themselves
            if self.grad_checkpointing and torch.is_grad_enabled():  # recomputed in the backward pass
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x.permute(0, 3, 1, 2)


class ConvNorm(nn.Conv2d):
    """Conv without bias, then a channel LayerNorm: detectron2's ``Conv2d(norm='LN')``, with its keys
    (``weight``, ``norm.weight``, ``norm.bias``)."""

    def __init__(self, cin: int, cout: int, kernel: int) -> None:
        super().__init__(cin, cout, kernel, padding=kernel // 2, bias=False)
        self.norm = LayerNorm2d(cout, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(super().forward(x))


def pyramid_stage(dim: int, channels: int, scale: float) -> nn.Sequential:
    """One level of the simple feature pyramid from the [B, dim, h, w] map (detectron2's layer order)."""
    if scale == 4.0:
        layers: List[nn.Module] = [nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), LayerNorm2d(dim // 2, eps=1e-6),
                                   nn.GELU(), nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2)]
        width = dim // 4
    elif scale == 2.0:
        layers, width = [nn.ConvTranspose2d(dim, dim // 2, 2, stride=2)], dim // 2
    elif scale == 1.0:
        layers, width = [], dim
    else:
        layers, width = [nn.MaxPool2d(2, stride=2)], dim
    return nn.Sequential(*layers, ConvNorm(width, channels, 1), ConvNorm(channels, channels, 3))


class ViTDetBackbone(nn.Module):
    """``net`` (the ViT) and the simple feature pyramid: [B, 3, H, W] -> ``{'p2': [B, C, H/4, W/4], ...,
    'p6': [B, C, H/64, W/64]}`` for ViT-B/16 (level k has stride 2^k)."""

    def __init__(self, cfg: DetConfig) -> None:
        super().__init__()
        self.net = PlainViT(cfg)
        self.strides = cfg.strides
        self.level_names = [f"p{int(math.log2(s))}" for s in self.strides]
        self.stage_names = [f"simfp_{int(math.log2(s))}" for s in self.strides[:-1]]
        for name, scale in zip(self.stage_names, cfg.scale_factors):
            self.add_module(name, pyramid_stage(cfg.embed_dim, cfg.channels, scale))
        self.out_channels = cfg.channels  # torchvision's detectors read it

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        feat = self.net(x)
        maps = [getattr(self, name)(feat) for name in self.stage_names]
        maps.append(F.max_pool2d(maps[-1], kernel_size=1, stride=2))  # detectron2's LastLevelMaxPool
        return OrderedDict(zip(self.level_names, maps))


# --------------------------------------------------------------------------------------------
# Mask R-CNN


class AlignedRoIAlign(MultiScaleRoIAlign):
    """torchvision's ``MultiScaleRoIAlign`` with ``aligned=True`` (the half-pixel correction of
    detectron2's ROIAlignV2, which ViTDet uses; torchvision's pooler has ``aligned=False``) and with the
    level scales fixed from the pyramid's strides instead of inferred from the first batch."""

    def __init__(self, featmap_names: Sequence[str], strides: Sequence[int], output_size: int,
                 sampling_ratio: int = 0, canonical_box_size: int = 224) -> None:
        super().__init__(list(featmap_names), output_size, sampling_ratio, canonical_scale=canonical_box_size)
        self.scales = [1.0 / s for s in strides]
        self.map_levels = LevelMapper(int(math.log2(strides[0])), int(math.log2(strides[-1])),
                                      canonical_scale=canonical_box_size, canonical_level=4)

    def forward(self, x: Dict[str, torch.Tensor], boxes: List[torch.Tensor],
                image_shapes: List[Tuple[int, int]]) -> torch.Tensor:
        """[K, C, S, S] features of all images' boxes (xyxy in image pixels), in order."""
        feats = [x[k] for k in self.featmap_names]
        rois = torch.cat([torch.cat([b.new_full((len(b), 1), i), b], dim=1) for i, b in enumerate(boxes)])
        levels = self.map_levels(boxes)
        out = feats[0].new_zeros((len(rois), feats[0].shape[1], *self.output_size))
        for level, (feat, scale) in enumerate(zip(feats, self.scales)):
            idx = torch.where(levels == level)[0]
            out[idx] = roi_align(feat, rois[idx], self.output_size, spatial_scale=scale,
                                 sampling_ratio=self.sampling_ratio, aligned=True).to(out.dtype)
        return out


class ViTDetTransform(GeneralizedRCNNTransform):
    """Normalisation, the test resize and padding to a fixed square (ViTDet's ``square_pad``).

    Training images come resized and cropped by the data pipeline and are only padded here; in
    evaluation each image is resized so that its shortest edge is ``size`` and its longest at most
    ``size`` (torchvision's rule, bilinear), and predictions are mapped back to the original size.
    uint8 images are accepted ([0, 255]), floats are taken as [0, 1].
    """

    def __init__(self, size: int, divisor: int) -> None:
        super().__init__(min_size=size, max_size=size, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
                         size_divisible=divisor)
        self.size = size

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        if not image.is_floating_point():
            image = image.float().div_(255.0)
        return super().normalize(image)

    def resize(self, image: torch.Tensor, target: Optional[Dict[str, torch.Tensor]] = None):
        if self.training:
            return image, target
        return super().resize(image, target)

    def batch_images(self, images: List[torch.Tensor], size_divisible: int = 32) -> torch.Tensor:
        """[B, 3, S, S]: every image top-left in a zero (after normalisation) square of ``size``; a larger
        image widens the square to the next multiple of ``size_divisible``."""
        d = size_divisible
        side = max([self.size] + [math.ceil(n / d) * d for img in images for n in img.shape[-2:]])
        out = images[0].new_zeros((len(images), images[0].shape[0], side, side))
        for dst, img in zip(out, images):
            dst[:, :img.shape[1], :img.shape[2]].copy_(img)
        return out


class ViTDetMaskRCNN(MaskRCNN):
    """torchvision's Mask R-CNN on :class:`ViTDetBackbone` with ViTDet's heads and settings.

    ``forward(images, targets)`` as torchvision's: ``images`` a list of [3, H, W] (uint8 or [0, 1]);
    in training, targets with ``boxes`` [N, 4] (xyxy, pixels), ``labels`` [N] (1..num_classes; 0 is the
    background) and ``masks`` [N, H, W] (uint8) give a dict of the five losses; in evaluation, a list of
    ``{'boxes', 'labels', 'scores', 'masks' [N, 1, H, W] probabilities}`` at each input's own size.
    """

    def __init__(self, cfg: DetConfig) -> None:
        check_config(cfg)
        backbone = ViTDetBackbone(cfg)
        c, names, strides = cfg.channels, backbone.level_names, backbone.strides
        pooled, pooled_strides = names[:-1], strides[:-1]  # RoIs pool from p2..p5, not from p6 (FPN's rule)
        anchors = AnchorGenerator(sizes=tuple((s,) for s in cfg.anchor_sizes),
                                  aspect_ratios=((0.5, 1.0, 2.0),) * len(cfg.anchor_sizes))
        norm = partial(LayerNorm2d, eps=1e-6)
        super().__init__(
            backbone, num_classes=None,
            rpn_anchor_generator=anchors,
            rpn_head=RPNHead(c, anchors.num_anchors_per_location()[0], conv_depth=cfg.rpn_convs),
            rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n[0], rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n[1],
            rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n[0], rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n[1],
            rpn_batch_size_per_image=cfg.rpn_batch_size_per_image,
            box_roi_pool=AlignedRoIAlign(pooled, pooled_strides, 7, canonical_box_size=cfg.canonical_box_size),
            box_head=FastRCNNConvFCHead((c, 7, 7), [c] * cfg.box_convs, [cfg.box_fc], norm_layer=norm),
            box_predictor=FastRCNNPredictor(cfg.box_fc, cfg.num_classes + 1),
            box_score_thresh=cfg.score_thresh, box_nms_thresh=cfg.nms_thresh,
            box_detections_per_img=cfg.detections_per_img, box_batch_size_per_image=cfg.box_batch_size_per_image,
            mask_roi_pool=AlignedRoIAlign(pooled, pooled_strides, 14, canonical_box_size=cfg.canonical_box_size),
            mask_head=MaskRCNNHeads(c, [c] * cfg.mask_convs, 1, norm_layer=norm),
            mask_predictor=MaskRCNNPredictor(c, c, cfg.num_classes + 1),
        )
        # padding to the coarsest stride keeps every level's map aligned with the image
        self.transform = ViTDetTransform(cfg.img_size, strides[-1])
        self.cfg = cfg

    # the uniform model API (util.run.optim.layer_decay_groups): ViTDet's layer ids, the embeddings 0, block
    # i (0-based) i + 1, everything else (pyramid, heads) depth + 1
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r"^backbone\.net\.(?:pos_embed|patch_embed)", blocks=[(r"^backbone\.net\.blocks\.(\d+)", None)])

    def no_weight_decay(self) -> set:
        return {"backbone.net.pos_embed"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """``--grad_checkpointing``: recompute the ViT's blocks in the backward pass (less activation memory)."""
        self.backbone.net.grad_checkpointing = enable


def load_pretrained(model: ViTDetMaskRCNN, source: str, sha256: Optional[str] = None) -> Tuple[List[str], List[str]]:
    """Load a pre-trained encoder (this repo's, the reference DeepMIM's, MAE's, timm's; any source the
    one checkpoint reader takes) into ``model.backbone.net``.

    Only the relative position tables may be missing (they start at zero, as in ViTDet); any other
    missing or misshapen weight stops with a :class:`UserError` naming it. The checkpoint's position
    table is resized to the model's pre-training grid if it differs. Returns (missing, unexpected) keys.
    """
    net = model.backbone.net
    return load_encoder(net, source, sha256, allowed_missing=tuple(net.new_keys()))


# --------------------------------------------------------------------------------------------
# registry: entries declare hyper-parameters and call one builder

MODELS = Registry("detection model")


def _entry(size: str, patch_size: int, **defaults: Any):
    def factory(**overrides: Any) -> DetConfig:
        arch = dict(VIT_ARCHS[size])
        return DetConfig(**{**arch, "patch_size": patch_size, **defaults, **overrides})

    factory.__doc__ = f"ViTDet Mask R-CNN on ViT-{size}/{patch_size}."
    return factory


# ViTDet's COCO settings; ViT-L: drop path 0.4, global blocks 6, 12, 18, 24 (the depth/4 rule)
MODELS.register(_entry("base", 16, drop_path=0.1), "vitdet_mask_rcnn_vit_base_patch16")
MODELS.register(_entry("large", 16, drop_path=0.4), "vitdet_mask_rcnn_vit_large_patch16")
# a small detector for the CPU demo and the tests: ViT-Ti/4 (the demo's pre-training model) cut to 4
# blocks at 64 px, window 4 with global blocks 2 and 4, narrow heads; anchors 8 x the stride as in
# ViT-B (32 at stride 4); every detection kept (a test's few iterations score below ViTDet's 0.05)
MODELS.register(_entry("tiny", 4, depth=4, img_size=64, pretrain_img_size=32, window_size=4, global_blocks=(2, 4),
                       drop_path=0.0,
                       channels=32, box_fc=128, anchor_sizes=(8, 16, 32, 64, 128),
                       rpn_batch_size_per_image=64, box_batch_size_per_image=64, rpn_pre_nms_top_n=(500, 250),
                       rpn_post_nms_top_n=(200, 100), score_thresh=0.0), "vitdet_mask_rcnn_vit_tiny_patch4")


def model_config(name: str, **overrides: Any) -> DetConfig:
    """The :class:`DetConfig` of a registered detector, fields replaced by ``overrides``."""
    return MODELS.get(name)(**overrides)


def create_model(name: str, **overrides: Any) -> ViTDetMaskRCNN:
    """Build a registered detector (randomly initialised; :func:`load_pretrained` fills the ViT)."""
    return ViTDetMaskRCNN(model_config(name, **overrides))
