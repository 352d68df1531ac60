"""The Vision Transformer used for fine-tuning and linear probing: timm's ``VisionTransformer``.

Global average pooling of the patch tokens followed by ``fc_norm`` is the default (as in MAE /
DeepMIM fine-tuning); ``global_pool='token'`` uses the cls token after the final norm. Parameter
names are MAE's / timm's (``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.{i}``,
``norm`` or ``fc_norm``, ``head``), so pre-training checkpoints, MAE releases and timm state dicts
load directly.
"""
import logging
from functools import partial
from typing import Any, Dict, List, Optional, Sequence

from util.checkpoints import convert
from util.config.registry import VIT_ARCHS, Registry, vit_heads
from util.run.errors import UserError

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

MODELS = Registry("fine-tuning model")
_log = logging.getLogger(__name__)

ARCHS = VIT_ARCHS


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
        return self.multi_layer_features(x, [layer], (pool,))[pool][0]

    def multi_layer_features(self, x: torch.Tensor, layers: Sequence[int],
                             pools: Sequence[str] = ("token",)) -> Dict[str, List[torch.Tensor]]:
        """Pooled features of several layers from one forward pass (stopping after the deepest one).

        Returns:
            ``{pool: [features [N, D] of each of layers, in the order given]}``; pooling as in
            :meth:`layer_features`.
        """
        depth = len(self.blocks)
        for layer in layers:
            if not 1 <= layer <= depth:
                raise UserError(f"--probe_layer {layer} is outside 1..{depth} for this {depth}-block model.")
        unknown = set(pools) - {"token", "avg"}
        if unknown:
            raise UserError(f"Unknown pooling {sorted(unknown)}; use 'token' (cls token) or 'avg'.")
        taken = sorted(set(layers))  # timm returns the blocks in depth order
        outputs = self.forward_intermediates(
            x, indices=[k - 1 for k in taken], return_prefix_tokens=True, norm=False, stop_early=True,
            output_fmt="NLC", intermediates_only=True,
        )
        by_layer = dict(zip(taken, outputs))
        feats: Dict[str, List[torch.Tensor]] = {pool: [] for pool in pools}
        for layer in layers:
            patches, prefix = by_layer[layer]
            for pool in pools:
                if pool == "avg":
                    feats[pool].append(patches.mean(dim=1))
                else:  # LayerNorm acts per token: norm(x)[:, 0] == norm(x[:, 0])
                    feats[pool].append(self.norm(prefix[:, 0]) if layer == depth else prefix[:, 0])
        return feats


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
    factory.arch = {**ARCHS[size], "patch_size": patch_size}  # the sizes, readable without building the model
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


def from_checkpoint(source: str, name: Optional[str] = None, img_size: Optional[int] = None,
                    num_heads: Optional[int] = None, **kwargs: Any) -> ViT:
    """A ViT holding the encoder of any checkpoint :func:`util.checkpoints.convert.read_encoder` reads (eval mode).

    The one "encoder from a checkpoint" builder (:func:`build_from` on the file's tensors): analysis
    tools, teachers and evaluation use it. Keyword arguments go to the ViT (``num_classes``,
    default 0: headless; ``global_pool``; ``drop_path_rate``).
    """
    return build_from(convert.read_encoder(source), name, img_size, num_heads, **kwargs).eval()


def build_from(ckpt: convert.EncoderFile, name: Optional[str] = None, img_size: Optional[int] = None,
               num_heads: Optional[int] = None, allowed_missing: Sequence[str] = convert.HEAD_PREFIXES,
               **kwargs: Any) -> ViT:
    """Build a ViT for the encoder in ``ckpt`` and load it (every encoder weight must be there).

    The architecture is the registered ``name``, else the checkpoint's own model name (``args['model']``
    of a fine-tuning checkpoint of this repo), else read off the weights (width, depth, patch size, MLP
    width). Heads cannot be read off weights: ``num_heads``, else the checkpoint's ``model_cfg`` (this
    repo's pre-training), else the standard count for the width. The image size defaults to the
    checkpoint's own (its position grid times the patch size), so the encoder sees the resolution it
    was trained at. ``global_pool`` defaults to ``'avg'`` for a fine-tuned file with ``fc_norm`` and
    no final norm, else ``'token'``.
    """
    sd, enc = ckpt.state, ckpt.arch
    img_size = img_size or enc["img_size"]
    kwargs.setdefault("num_classes", 0)
    # a fine-tuned checkpoint (global pool) has fc_norm instead of the final norm
    kwargs.setdefault("global_pool", "avg" if "fc_norm.weight" in sd and "norm.weight" not in sd else "token")
    if not name and not num_heads and ckpt.saved_args.get("model") in MODELS:
        name = ckpt.saved_args["model"]  # a fine-tuned checkpoint of this repo names its ViT
    if name:
        heads = {"num_heads": num_heads} if num_heads else {}  # None would replace the entry's own count
        model = create_model(name, img_size=img_size, **heads, **kwargs)
    else:
        heads = num_heads or ckpt.model_cfg.get("num_heads")
        if not heads:
            heads = vit_heads(enc["embed_dim"])
            _log.info("%s: %d heads assumed for width %d (pass --num_heads otherwise)", ckpt.source, heads,
                      enc["embed_dim"])
        model = build_vit(embed_dim=enc["embed_dim"], depth=enc["depth"], patch_size=enc["patch_size"], num_heads=heads,
                          mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / enc["embed_dim"], img_size=img_size,
                          **kwargs)
    convert.load_encoder_state(model, sd, ckpt.source, tuple(allowed_missing))
    return model


def registered_name(embed_dim: int, depth: int, patch_size: int, at_least: bool = False) -> Optional[str]:
    """The registered name of a ViT of this width, depth (``at_least``: this many blocks or more) and patch
    size, or None."""
    for name in MODELS.names():
        arch = MODELS.get(name).arch
        if (arch["embed_dim"], arch["patch_size"]) == (embed_dim, patch_size) and (
                arch["depth"] >= depth if at_least else arch["depth"] == depth):
            return name
    return None


def checkpoint_spec(ckpt: convert.EncoderFile) -> Dict[str, Any]:
    """What a checkpoint says about the ViT it holds: its registered ``model`` name (None if it has
    none), ``input_size``, ``patch_size``, ``global_pool`` and ``num_classes`` (None without a head).

    This repo's files store them in ``args``; for others (MAE's released weights) they are read off
    the weights: the position grid gives the input size, ``fc_norm`` without ``norm`` means global
    average pooling, the head's rows the classes.
    """
    args, arch, sd = ckpt.saved_args, ckpt.arch, ckpt.state
    name = args.get("model") if args.get("model") in MODELS else registered_name(
        arch["embed_dim"], arch["depth"], arch["patch_size"])
    pool = args.get("global_pool")
    if isinstance(pool, bool):
        pool = "avg" if pool else "token"
    else:
        pool = "avg" if "fc_norm.weight" in sd and "norm.weight" not in sd else "token"
    head = sd.get("head.weight")
    return dict(model=name, input_size=int(args.get("input_size") or arch["img_size"]), patch_size=arch["patch_size"],
                global_pool=pool, num_classes=int(head.shape[0]) if head is not None and head.ndim == 2 else None)


def native_size(name: str) -> int:
    """The input size a registered model is built for by default (224; 32 for ``vit_tiny_patch4``)."""
    return create_model(name, num_classes=0, depth=1).patch_embed.img_size[0]
