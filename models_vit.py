"""The Vision Transformer used for fine-tuning and linear probing: timm's ``VisionTransformer``.

Global average pooling of the patch tokens followed by ``fc_norm`` is the default (as in MAE /
DeepMIM fine-tuning); ``global_pool='token'`` uses the cls token after the final norm. Parameter
names are MAE's / timm's (``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.{i}``,
``norm`` or ``fc_norm``, ``head``), so pre-training checkpoints, MAE releases and timm state dicts
load directly.
"""
from functools import partial
from typing import Any, Dict

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from util.errors import UserError
from util.registry import Registry

MODELS = Registry("fine-tuning model")

ARCHS: Dict[str, Dict[str, int]] = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
    "huge": dict(embed_dim=1280, depth=32, num_heads=16),
}


class ViT(VisionTransformer):
    """timm's ViT plus the per-layer features that linear probing of any layer needs."""

    def layer_features(self, x: torch.Tensor, layer: int, pool: str = "token") -> torch.Tensor:
        """Pooled features of encoder layer ``layer`` (1-based): [N, 3, H, W] -> [N, D].

        Args:
            layer: block index, 1..depth. Blocks after it are not run.
            pool: ``'token'`` (cls token) or ``'avg'`` (mean of the patch tokens). The last layer's
                cls token passes the final norm, as in MAE's linear probing; other layers give
                their raw block output.
        """
        depth = len(self.blocks)
        if not 1 <= layer <= depth:
            raise UserError(f"--probe_layer {layer} is outside 1..{depth} for this {depth}-block model.")
        (patches, prefix), = self.forward_intermediates(
            x, indices=[layer - 1], return_prefix_tokens=True, norm=layer == depth and pool == "token",
            stop_early=True, output_fmt="NLC", intermediates_only=True,
        )
        return prefix[:, 0] if pool == "token" else patches.mean(dim=1)


def build_vit(**kwargs: Any) -> ViT:
    """Build a :class:`ViT` with MAE's choices (qkv bias, LayerNorm eps 1e-6, avg pool + fc_norm)."""
    cfg = dict(img_size=224, patch_size=16, num_classes=1000, global_pool="avg", qkv_bias=True,
               norm_layer=partial(nn.LayerNorm, eps=1e-6))
    cfg.update({k: v for k, v in kwargs.items() if v is not None})
    return ViT(**cfg)


def _entry(size: str, patch_size: int, **defaults: Any):
    def factory(**kwargs: Any) -> ViT:
        return build_vit(**{**ARCHS[size], "patch_size": patch_size, **defaults, **kwargs})

    factory.__doc__ = f"ViT-{size}/{patch_size} ({ARCHS[size]})."
    return factory


for _size in ("tiny", "small", "base", "large"):
    MODELS.register(_entry(_size, 16), f"vit_{_size}_patch16")
MODELS.register(_entry("huge", 14), "vit_huge_patch14")
MODELS.register(_entry("tiny", 4, img_size=32), "vit_tiny_patch4")  # the built-in 32x32 data


def create_model(name: str, **kwargs: Any) -> ViT:
    """Build a registered ViT (unknown names raise an error listing the valid ones).

    Keyword arguments are timm ``VisionTransformer`` arguments: ``num_classes``, ``img_size``,
    ``drop_path_rate``, ``global_pool`` ('avg' or 'token'), ... ``None`` keeps the default.
    """
    return MODELS.get(name)(**kwargs)


def native_size(name: str) -> int:
    """The input size a registered model is built for by default (224; 32 for ``vit_tiny_patch4``)."""
    return create_model(name, num_classes=0, depth=1).patch_embed.img_size[0]
