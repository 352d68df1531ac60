"""UperNet on the pre-trained ViT: backbone adapter, UPerHead, auxiliary FCNHead, loss.

The reference (mmseg 0.x config ``upernet_mae_base_12_512_slide_160k_ade20k``, backbone from
mae_segmentation) in native PyTorch:

* **backbone**: the fine-tuning ViT of :mod:`models_vit` (timm blocks, MAE names), drop path 0.1,
  layer scale (``init_values`` 1.0, timm's ``ls1`` / ``ls2``) and a BEiT relative position bias per
  block (``blocks.i.attn.relative_position_bias_table``, zero-initialised, added to the attention
  logits through ``scaled_dot_product_attention(attn_mask=bias)``). The absolute position embedding
  of the checkpoint is kept and resized to the crop's grid. The raw outputs of blocks 4, 6, 8, 12
  (no final norm) become strides 4, 8, 16, 32: two transposed convs (BN + GELU between), one
  transposed conv, identity, max-pool (``necks``; the reference's ``fpn1..fpn4``).
* **decode head**: UPerHead (PPM with scales 1, 2, 3, 6 on the stride-32 map, FPN, 768 channels,
  Conv-BN-ReLU everywhere, dropout 0.1); **auxiliary head**: FCNHead with one 3x3 conv of 256
  channels on the stride-16 map, loss weight 0.4.

Module names inside the heads are mmseg's (``psp_modules``, ``bottleneck``, ``lateral_convs``,
``fpn_convs``, ``fpn_bottleneck``, ``conv_seg``, ``convs``; ``conv`` / ``bn`` inside each
ConvModule), so :mod:`Segmentation.convert_mmseg` only renames the backbone's few differences.
"""
import dataclasses
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from util.checkpoints.convert import load_encoder
from util.checkpoints.pos_embed import resize_pos_embed
from util.run.errors import UserError

import torch
import torch.nn.functional as F
from timm.layers import gen_relative_position_index, resize_rel_pos_bias_table_simple
from torch import nn
from torch.utils.checkpoint import checkpoint

import models_vit
from Segmentation.data import IGNORE_INDEX

STRIDES = (4, 8, 16, 32)


@dataclass(frozen=True)
class SegConfig:
    """Everything that defines the network (stored in checkpoints as ``model_cfg``)."""

    model: str = "vit_base_patch16"  # a models_vit name
    img_size: int = 512  # training crop: the native grid of the position embedding and rel-pos tables
    num_classes: int = 150
    out_indices: Optional[Tuple[int, ...]] = None  # 1-based blocks for strides 4, 8, 16, 32 (None: 4, 6, 8, 12 at depth 12)
    drop_path: float = 0.1
    rel_pos_bias: bool = True
    init_values: Optional[float] = 1.0  # layer scale; None: none
    channels: int = 768  # UPerHead width
    pool_scales: Tuple[int, ...] = (1, 2, 3, 6)
    aux_channels: int = 256  # FCNHead width
    aux_weight: float = 0.4  # 0: no auxiliary head
    dropout: float = 0.1

    def to_dict(self) -> Dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "SegConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names})


def default_out_indices(depth: int) -> Tuple[int, ...]:
    """Blocks d/3, d/2, 2d/3, d (1-based): 4, 6, 8, 12 for ViT-B, 8, 12, 16, 24 for ViT-L."""
    return (depth // 3, depth // 2, 2 * depth // 3, depth)


# --------------------------------------------------------------------------------------------
# backbone


def conv_module(cin: int, cout: int, kernel: int) -> nn.Sequential:
    """mmcv's ConvModule: conv (no bias) -> BatchNorm -> ReLU, keys ``conv.*`` / ``bn.*``."""
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False),
        bn=nn.BatchNorm2d(cout),
        activate=nn.ReLU(inplace=True),
    ))


def pyramid_neck(dim: int, patch: int, stride: int) -> nn.Module:
    """Resample the patch-grid feature (stride ``patch``) to ``stride``: transposed convs 2x2/2
    (BN + GELU between consecutive ones) up, identity, or max-pool down."""
    if stride < patch:
        steps = int(round(math.log2(patch / stride)))
        layers: List[nn.Module] = [nn.ConvTranspose2d(dim, dim, 2, stride=2)]
        for _ in range(steps - 1):
            layers += [nn.BatchNorm2d(dim), nn.GELU(), nn.ConvTranspose2d(dim, dim, 2, stride=2)]
        return nn.Sequential(*layers)
    if stride == patch:
        return nn.Identity()
    return nn.MaxPool2d(stride // patch, stride // patch)


class ViTBackbone(nn.Module):
    """The fine-tuning ViT's embedding and blocks (MAE / timm names, so ``load_encoder`` fills them
    from any pre-training checkpoint) plus the relative position bias and the pyramid necks.

    Blocks after the last of ``out_indices`` are dropped: they would get no gradient.
    """

    def __init__(self, cfg: SegConfig) -> None:
        super().__init__()
        vit = models_vit.create_model(cfg.model, num_classes=0, global_pool="", img_size=cfg.img_size,
                                      drop_path_rate=cfg.drop_path, init_values=cfg.init_values, dynamic_img_size=True)
        depth, patch = len(vit.blocks), vit.patch_embed.patch_size[0]
        out = tuple(cfg.out_indices) if cfg.out_indices else default_out_indices(depth)
        if sorted(set(out)) != list(out) or len(out) != len(STRIDES) or not 1 <= out[0] <= out[-1] <= depth:
            raise UserError(f"--out_indices {','.join(map(str, out))}: give 4 increasing block numbers in 1..{depth} "
                            f"(the reference uses {','.join(map(str, default_out_indices(depth)))}).")
        if any(2 ** round(math.log2(patch / s)) != patch / s for s in STRIDES):
            raise UserError(f"{cfg.model} has patch size {patch}; the pyramid needs a power of two (4, 8, 16, 32).")
        if cfg.img_size % patch or cfg.img_size < STRIDES[-1]:  # the stride-32 map needs at least 32 pixels
            smallest = math.ceil(STRIDES[-1] / patch) * patch
            raise UserError(f"--crop_size {cfg.img_size}: the crop must be a multiple of {cfg.model}'s patch size {patch} "
                            f"and at least {STRIDES[-1]} pixels (the coarsest feature stride). Use e.g. "
                            f"--crop_size {max(smallest, cfg.img_size // patch * patch)}.")
        self.out_indices = out
        self.patch_embed, self.cls_token, self.pos_embed, self.pos_drop = (
            vit.patch_embed, vit.cls_token, vit.pos_embed, vit.pos_drop)
        self.blocks = vit.blocks[: self.out_indices[-1]]
        self.grid = tuple(vit.patch_embed.grid_size)
        self.patch_size = patch
        self.embed_dim = vit.embed_dim
        self.num_heads = self.blocks[0].attn.num_heads
        if cfg.rel_pos_bias:
            entries = (2 * self.grid[0] - 1) * (2 * self.grid[1] - 1) + 3  # + cls->token, token->cls, cls->cls
            for blk in self.blocks:  # BEiT's name and zero init; the timm attention module stays as it is
                blk.attn.relative_position_bias_table = nn.Parameter(torch.zeros(entries, self.num_heads))
            self.register_buffer("relative_position_index",
                                 gen_relative_position_index(self.grid, class_token=True), persistent=False)
        self.rel_pos_bias = cfg.rel_pos_bias
        self.grad_checkpointing = False
        self.necks = nn.ModuleList(pyramid_neck(self.embed_dim, patch, s) for s in STRIDES)

    def new_keys(self) -> List[str]:
        """Parameters a pre-training checkpoint does not have (relative position tables, layer
        scales, necks): the only keys :func:`load_pretrained` accepts as missing."""
        return [k for k in self.state_dict() if k.startswith("necks.") or k.endswith(
            ("relative_position_bias_table", "ls1.gamma", "ls2.gamma"))]

    def attention_bias(self, table: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        """[heads, 1 + h*w, 1 + h*w] bias from a block's table; other grids than the native one
        (whole-image inference) interpolate the table (bicubic) to their range of offsets."""
        if grid == self.grid:
            index = self.relative_position_index
        else:
            n = (2 * grid[0] - 1) * (2 * grid[1] - 1) + 3
            table = resize_rel_pos_bias_table_simple(table, grid, (n, table.shape[1]))
            index = gen_relative_position_index(grid, class_token=True, device=table.device)
        tokens = grid[0] * grid[1] + 1
        return table[index.view(-1)].view(tokens, tokens, -1).permute(2, 0, 1)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        """[B, 3, H, W] (H, W multiples of the patch size) -> 4 maps [B, D, H/s, W/s], s = 4, 8, 16, 32."""
        B = x.shape[0]
        x = self.patch_embed(x)  # [B, h, w, D]
        grid = (x.shape[1], x.shape[2])
        pos = resize_pos_embed(self.pos_embed, grid, num_prefix_tokens=1, old_grid=self.grid)  # MAE's rule
        x = self.pos_drop(torch.cat([self.cls_token.expand(B, -1, -1), x.flatten(1, 2)], dim=1) + pos)
        feats = []
        for i, blk in enumerate(self.blocks):
            mask = self.attention_bias(blk.attn.relative_position_bias_table, grid)[None] if self.rel_pos_bias else None
            if self.grad_checkpointing and torch.is_grad_enabled():  # recomputed in the backward pass
                x = checkpoint(blk, x, attn_mask=mask, use_reentrant=False)
            else:
                x = blk(x, attn_mask=mask)
            if i + 1 in self.out_indices:
                feats.append(x[:, 1:].transpose(1, 2).reshape(B, -1, *grid))  # raw block output, no norm
        return [neck(f) for neck, f in zip(self.necks, feats)]


# --------------------------------------------------------------------------------------------
# heads


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """mmseg's ``resize`` as the heads use it (bilinear, align_corners False)."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class UPerHead(nn.Module):
    """mmseg's UPerHead: PPM on the last map, FPN over all four, fused, 1x1 classifier."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, pool_scales: Sequence[int] = (1, 2, 3, 6),
                 levels: int = len(STRIDES), dropout: float = 0.1) -> None:
        super().__init__()
        self.psp_modules = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_module(in_channels, channels, 1))
                                         for s in pool_scales)
        self.bottleneck = conv_module(in_channels + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(conv_module(in_channels, channels, 1) for _ in range(levels - 1))
        self.fpn_convs = nn.ModuleList(conv_module(channels, channels, 3) for _ in range(levels - 1))
        self.fpn_bottleneck = conv_module(levels * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        top = feats[-1]
        psp = [top] + [resize(m(top), top.shape[2:]) for m in self.psp_modules]
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)] + [self.bottleneck(torch.cat(psp, 1))]
        for i in range(len(laterals) - 1, 0, -1):  # top-down path
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals)] + [laterals[-1]]
        outs = [outs[0]] + [resize(o, outs[0].shape[2:]) for o in outs[1:]]
        return self.conv_seg(self.dropout(self.fpn_bottleneck(torch.cat(outs, 1))))


class FCNHead(nn.Module):
    """mmseg's FCNHead with ``concat_input=False``: ``num_convs`` 3x3 ConvModules, 1x1 classifier."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, num_convs: int = 1,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.convs = nn.Sequential(*[conv_module(in_channels if i == 0 else channels, channels, 3)
                                     for i in range(num_convs)])
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(self.convs(x)))


class Segmentor(nn.Module):
    """mmseg's EncoderDecoder: ``backbone`` -> ``decode_head`` (+ ``auxiliary_head`` on stride 16)."""

    AUX_LEVEL = 2  # the stride-16 map, mmseg's in_index=2

    def __init__(self, cfg: SegConfig) -> None:
        super().__init__()
        self.backbone = ViTBackbone(cfg)
        self.cfg = dataclasses.replace(cfg, out_indices=self.backbone.out_indices)  # resolved defaults
        dim = self.backbone.embed_dim
        self.decode_head = UPerHead(dim, cfg.channels, cfg.num_classes, cfg.pool_scales, dropout=cfg.dropout)
        self.auxiliary_head = (FCNHead(dim, cfg.aux_channels, cfg.num_classes, dropout=cfg.dropout)
                               if cfg.aux_weight > 0 else None)
        self._init_heads()

    def _init_heads(self) -> None:
        # mmseg's initialisation of the heads: kaiming (fan-out) for ConvModules, N(0, 0.01) classifiers;
        # the necks keep PyTorch's default, as in the reference backbone
        for name, m in self.named_modules():
            if not name.startswith(("decode_head", "auxiliary_head")):
                continue
            if isinstance(m, nn.Conv2d):
                if name.endswith("conv_seg"):
                    nn.init.normal_(m.weight, 0, 0.01)
                else:
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """``--grad_checkpointing``: recompute the ViT's blocks in the backward pass (less activation memory)."""
        self.backbone.grad_checkpointing = enable

    def forward(self, img: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Logits of the decode head (stride 4) and, in training, of the auxiliary head (stride 16)."""
        feats = self.backbone(img)
        aux = self.auxiliary_head(feats[self.AUX_LEVEL]) if self.training and self.auxiliary_head is not None else None
        return self.decode_head(feats), aux

    def encode_decode(self, img: torch.Tensor) -> torch.Tensor:
        """Logits at the input's size [N, C, H, W] (inference). Any H, W: padded at the bottom and
        right to a multiple of the patch size (and to at least the coarsest stride, which a tiny image
        would not reach), and the padding cut off the logits again."""
        h, w = img.shape[2:]
        p = self.backbone.patch_size
        ph, pw = (max(math.ceil(n / p) * p, STRIDES[-1]) - n for n in (h, w))
        x = F.pad(img, (0, pw, 0, ph)) if ph or pw else img
        logits, _ = self(x)
        return resize(logits, x.shape[2:])[:, :, :h, :w]

    # layer-wise lr decay (util.run.optim.layer_decay_groups): stem 0, block i -> i, necks and heads last
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r"^backbone\.(?:cls_token|pos_embed|patch_embed)", blocks=[(r"^backbone\.blocks\.(\d+)", None)])

    def no_weight_decay(self) -> set:
        return {"backbone.cls_token", "backbone.pos_embed"}


def seg_cross_entropy(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """mmseg 0.x's decode-head loss: logits resized to the label (bilinear), pixel-wise cross-entropy
    with 255 ignored, **averaged over all pixels** (ignored ones count as 0; ``avg_non_ignore=False``)."""
    logits = resize(logits, label.shape[-2:])
    return F.cross_entropy(logits.float(), label, ignore_index=IGNORE_INDEX, reduction="none").mean()


def pixel_accuracy(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Share (%) of labelled pixels predicted right (mmseg's ``acc_seg``, ignored pixels left out)."""
    with torch.no_grad():
        pred = resize(logits, label.shape[-2:]).argmax(1)
        valid = label != IGNORE_INDEX
        return 100.0 * (pred == label)[valid].float().sum() / valid.sum().clamp(min=1)


def load_pretrained(model: Segmentor, source: str, sha256: Optional[str] = None) -> Tuple[List[str], List[str]]:
    """Load a pre-trained encoder (anything ``main_finetune.py --finetune`` accepts) into the backbone.

    Only the backbone's new parameters (relative position tables, layer scales, necks) may be missing;
    any other missing weight stops the run. Returns (missing, unexpected) backbone keys.
    """
    return load_encoder(model.backbone, source, sha256, allowed_missing=tuple(model.backbone.new_keys()))
