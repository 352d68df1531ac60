"""The frozen CLIP image tower used as DeepMIM's reconstruction target (built with open_clip).

``--clip_path`` accepts, and tells apart by content, not by file name:

* OpenAI's CLIP checkpoint as distributed (``ViT-B-16.pt``): a TorchScript archive. Its tensors are
  taken out of the archive without ``torch.jit.load`` (which would run the archive's code):
  ``util.checkpoints.serialization.load_torchscript_state_dict``;
* a plain state dict with ``visual.*`` keys (what the reference DeepMIM code expects), also with a
  ``module.`` prefix or the image tower alone (``conv1.weight``, ..., ``proj``);
* an open_clip checkpoint (``{'state_dict': ...}`` from open_clip training, or its ``.safetensors``
  / ``.bin`` weights).

Pickled files are read with ``weights_only=True``. Without ``--clip_model`` the architecture is
read off the weights (width, depth, patch size, image size, output width; the standard ViT head
count for the width, 64-wide heads for OpenAI's towers) with
OpenAI's QuickGELU activation, as in OpenAI's release. With ``--clip_model NAME`` the architecture
comes from open_clip's model config of that name and ``--clip_path`` / ``--clip_pretrained`` give
the weights (``--clip_pretrained openai`` downloads when online).
"""
import logging
import os
from typing import Dict, Optional, Sequence

from util.checkpoints.reader import read_checkpoint
from util.config.registry import vit_heads
from util.data.constants import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD
from util.run.errors import UserError

import torch
from torch import nn

from targets.base import FrozenTeacher, check_layer, preprocess_stats

_log = logging.getLogger(__name__)

_REQUIRED = ("conv1.weight", "class_embedding", "positional_embedding", "ln_post.weight", "proj")


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Read the tensors of a CLIP checkpoint file in any of the supported formats."""
    if not os.path.isfile(path):
        raise UserError(
            f"CLIP weights not found: {path!r}. Pass --clip_path with OpenAI's CLIP ViT-B/16 file "
            f"(ViT-B-16.pt), a state dict with visual.* keys or an open_clip checkpoint; or use "
            f"--clip_model ViT-B-16 --clip_pretrained openai when online."
        )
    sd = read_checkpoint(path, what="CLIP checkpoint", hint="expected OpenAI's TorchScript file, a state dict of "
                                                              "tensors or an open_clip checkpoint.")
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise UserError(f"{path!r} holds a {type(sd).__name__}, not a CLIP state dict.")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items() if torch.is_tensor(v)}


def visual_state_dict(sd: Dict[str, torch.Tensor], source: str) -> Dict[str, torch.Tensor]:
    """Keep the image tower's tensors, without the ``visual.`` prefix; refuse anything else."""
    visual = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    if not visual and all(k in sd for k in _REQUIRED):
        visual = dict(sd)  # the image tower alone
    missing = [k for k in _REQUIRED if k not in visual]
    if missing:
        sample = ", ".join(list(sd)[:5]) or "no tensors"
        raise UserError(
            f"{source} is not a CLIP checkpoint with a ViT image tower: missing "
            f"{', '.join('visual.' + k for k in missing)} (found {sample}, ...). ResNet CLIP towers "
            f"are not supported."
        )
    return {k: v.float() for k, v in visual.items()}


def make_visual(image_size: int, patch_size: int, width: int, layers: int, mlp_ratio: float, output_dim: int,
                quick_gelu: bool = True) -> nn.Module:
    """open_clip's ``VisionTransformer`` with OpenAI CLIP's conventions (64-wide heads, QuickGELU)."""
    from open_clip.model import QuickGELU
    from open_clip.transformer import VisionTransformer

    return VisionTransformer(
        image_size=image_size, patch_size=patch_size, width=width, layers=layers, heads=vit_heads(width),
        mlp_ratio=mlp_ratio, output_dim=output_dim, act_layer=QuickGELU if quick_gelu else nn.GELU,
    )


def build_visual_from_state_dict(visual: Dict[str, torch.Tensor], quick_gelu: bool = True) -> nn.Module:
    """Build the image tower with the shapes of ``visual`` and load it strictly."""
    width, _, patch, _ = visual["conv1.weight"].shape
    layers = sum(1 for k in visual if k.startswith("transformer.resblocks.") and k.endswith(".attn.in_proj_weight"))
    grid = round((visual["positional_embedding"].shape[0] - 1) ** 0.5)
    mlp_width = visual["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    net = make_visual(patch * grid, patch, width, layers, mlp_width / width, visual["proj"].shape[1], quick_gelu)
    try:
        net.load_state_dict(visual, strict=True)
    except RuntimeError as e:
        raise UserError(f"CLIP image tower weights do not fit a standard CLIP ViT: {e}") from None
    return net


def load_clip_visual(
    clip_path: Optional[str] = None, clip_model: Optional[str] = None, clip_pretrained: Optional[str] = None
) -> nn.Module:
    """Return open_clip's image tower for the given flags: a ``VisionTransformer``, or with
    ``--clip_model`` also a ``TimmModel`` (EVA-CLIP and other towers built on timm)."""
    if clip_model:
        import open_clip
        from open_clip.timm_model import TimmModel
        from open_clip.transformer import VisionTransformer

        if clip_model not in open_clip.list_models():
            raise UserError(f"Unknown --clip_model {clip_model!r}; open_clip knows: {', '.join(open_clip.list_models())}")
        weights = clip_path or clip_pretrained
        if not weights:  # open_clip would build a randomly initialised CLIP and only warn
            raise UserError(
                f"--clip_model {clip_model!r} needs weights: --clip_path FILE, or --clip_pretrained TAG when online."
            )
        if clip_path:
            read_state_dict(clip_path)  # the same clear errors as without --clip_model
        try:
            model = open_clip.create_model(clip_model, pretrained=weights or None)
        except Exception as e:  # network or format failures surface as many types
            raise UserError(
                f"open_clip could not build {clip_model!r} with weights {weights!r}: {e}. Offline, pass "
                f"the weights file with --clip_path."
            ) from None
        visual = model.visual
        if not isinstance(visual, (VisionTransformer, TimmModel)):
            raise UserError(f"--clip_model {clip_model!r} has a {type(visual).__name__} image tower; a ViT is needed.")
        return visual
    if not clip_path:
        raise UserError("The CLIP target needs --clip_path FILE or --clip_model NAME --clip_pretrained TAG.")
    return build_visual_from_state_dict(visual_state_dict(read_state_dict(clip_path), repr(clip_path)))


class CLIPTeacher(FrozenTeacher):
    """Frozen CLIP image tower (open_clip ``VisionTransformer``) as a target.

    By default (the ``clip`` target, the reference recipe) every patch token of the last block passes
    ``ln_post`` and the projection ``proj``: CLIP's own output space. With ``layer`` < depth (the
    ``teacher`` target with ``--teacher_model open_clip``) the raw tokens of that block are the
    target, at the tower's width: ``proj`` is only defined on the ``ln_post`` output, and the
    student's decoders predict any width directly, so no projection is needed.

    Args:
        visual: open_clip ``VisionTransformer``.
        layer: 1-based block whose tokens are the target (default: the last).
        loss: ``'cosine'`` (reference) or ``'smooth_l1'``.
        input_size: resize the images to this side first (it must be the tower's image size).
        input_mean / input_std: the statistics the input images were normalized with.
    """

    def __init__(
        self,
        visual: nn.Module,
        layer: Optional[int] = None,
        loss: str = "cosine",
        input_size: Optional[int] = None,
        input_mean: Sequence[float] = IMAGENET_MEAN,
        input_std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        from open_clip.transformer import VisionTransformer

        if not isinstance(visual, VisionTransformer):
            raise UserError(
                f"The clip target needs a ViT image tower; this CLIP has a {type(visual).__name__}. For open_clip "
                f"models with a timm tower use --target teacher --teacher_model open_clip."
            )
        depth = len(visual.transformer.resblocks)
        layer = check_layer(layer, depth, "CLIP image tower")
        if input_size and input_size != visual.image_size[0]:
            raise UserError(
                f"--teacher_input_size {input_size}: this CLIP tower takes {visual.image_size[0]}-px images only."
            )
        mean, std = preprocess_stats(visual, CLIP_MEAN, CLIP_STD)
        if layer < depth:  # drop the unused blocks, ln_post and proj from memory
            visual.prune_intermediate_layers([layer - 1], prune_norm=True, prune_head=True)
        super().__init__(visual, mean, std, loss, input_size, input_mean, input_std)
        self.layer, self.last = layer, layer == depth
        self.grid = tuple(visual.grid_size)
        self.dim = visual.proj.shape[1] if self.last and visual.proj is not None else visual.transformer.width

    @property
    def visual(self) -> nn.Module:
        return self.net

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """CLIP-normalized [N, 3, H, W] -> [N, L, dim] patch tokens (no cls token)."""
        out = self.net.forward_intermediates(
            x, indices=[self.layer - 1], stop_early=True, normalize_intermediates=self.last,
            intermediates_only=True, output_fmt="NLC",
        )
        tokens = out["image_intermediates"][0]  # [N, L, width]
        if self.last and self.net.proj is not None:
            tokens = tokens @ self.net.proj
        return tokens

    def extra_repr(self) -> str:
        return f"layer={self.layer}, loss={self.loss}"
