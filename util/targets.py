"""Reconstruction targets: images -> target tokens on the student's patch grid, plus their loss.

A target is an ``nn.Module`` that maps a batch of ImageNet-normalized images [N, 3, H, W] to
target tokens [N, L, C] (L = number of patches of the student) and names the loss the decoders
are trained with. Targets are frozen and run without autograd (see ``compute_targets``).

Losses are computed per patch ([N, L]) and averaged over the masked patches only.
"""
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------------------------
# patch <-> image layout (MAE's: per patch, pixels row-major, channels last)


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[N, C, H, W] -> [N, L, p*p*C] with L = (H/p)*(W/p), row-major patches."""
    n, c, h, w = imgs.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by the patch size {p}")
    x = imgs.reshape(n, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, patch_size: int, grid: Tuple[int, int], channels: int = 3) -> torch.Tensor:
    """Inverse of :func:`patchify`: [N, L, p*p*C] -> [N, C, H, W]."""
    n = x.shape[0]
    p = patch_size
    gh, gw = grid
    x = x.reshape(n, gh, gw, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, channels, gh * p, gw * p)


# --------------------------------------------------------------------------------------------
# per-patch losses: (pred [N, L, C], target [N, L, C]) -> [N, L]


def mse_per_patch(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MAE's loss: mean squared error over the channels of each patch."""
    return (pred - target).pow(2).mean(dim=-1)


def cosine_per_patch(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``2 - 2 cos(pred, target)``: the squared distance of the L2-normalized vectors."""
    return 2.0 - 2.0 * (F.normalize(pred, dim=-1) * F.normalize(target, dim=-1)).sum(dim=-1)


def smooth_l1_per_patch(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Smooth-L1 (beta 1) averaged over the channels of each patch (used by feature teachers)."""
    return F.smooth_l1_loss(pred, target, reduction="none").mean(dim=-1)


LOSSES: Dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mse": mse_per_patch,
    "cosine": cosine_per_patch,
    "smooth_l1": smooth_l1_per_patch,
}


def masked_mean(per_patch: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average a [N, L] loss over the patches where ``mask`` is 1 (removed patches)."""
    return (per_patch * mask).sum() / mask.sum()


# --------------------------------------------------------------------------------------------
# targets


class Target(nn.Module):
    """Base class: a frozen map from images to target tokens on a patch grid.

    Attributes:
        dim: channels per target token (the decoders' prediction width).
        loss: key of :data:`LOSSES`.
        grid: (rows, cols) of the target tokens; must equal the student's patch grid.
    """

    dim: int
    loss: str
    grid: Tuple[int, int]

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class PixelTarget(Target):
    """MAE's pixel target: 16x16x3 patches of the (ImageNet-normalized) input.

    Args:
        img_size: input side in pixels.
        patch_size: the student's patch size.
        norm_pix: normalize each target patch by its own mean and ``sqrt(var + 1e-6)``
            (``--norm_pix_loss``); the variance is the unbiased one, as in MAE.
        in_chans: image channels.
    """

    def __init__(self, img_size: int, patch_size: int, norm_pix: bool = False, in_chans: int = 3) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.norm_pix = norm_pix
        self.dim = patch_size * patch_size * in_chans
        self.loss = "mse"
        self.grid = (img_size // patch_size, img_size // patch_size)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        target = patchify(imgs.float(), self.patch_size)  # [N, L, p*p*3]
        if self.norm_pix:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}, norm_pix={self.norm_pix}"


def compute_targets(targets: Dict[str, Target], imgs: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Run every target once on ``imgs`` without autograd.

    The targets run under ``torch.inference_mode`` (no graph, no version counters); the results are
    copied to ordinary float32 tensors, because the loss must save them for the backward pass of the
    predictions, which inference tensors do not allow.
    """
    with torch.inference_mode():
        out = {name: t(imgs) for name, t in targets.items()}
    return {name: v.to(torch.float32, copy=True) for name, v in out.items()}


def check_grid(target: Target, name: str, student_grid: Sequence[int], student_desc: str) -> None:
    """Raise a clear error when a target's token grid differs from the student's patch grid."""
    from util.errors import UserError

    if tuple(target.grid) != tuple(student_grid):
        raise UserError(
            f"The {name} target produces a {target.grid[0]}x{target.grid[1]} token grid but the student "
            f"has a {student_grid[0]}x{student_grid[1]} patch grid ({student_desc}). Pick a teacher whose "
            f"input size / patch size gives the same grid, or change --input_size / --model."
        )


def describe_targets(targets: Dict[str, Target], per_layer: Optional[Sequence[str]] = None) -> str:
    parts = [f"{n}: dim {t.dim}, loss {t.loss}" for n, t in targets.items()]
    s = "; ".join(parts)
    if per_layer is not None:
        s += f" (per supervised layer: {', '.join(per_layer)})"
    return s


def build_targets(args, grid: Tuple[int, int], img_size: int, patch_size: int, num_layers: int):
    """Targets named by the flags, and which one each supervised layer reconstructs.

    ``--clip_path`` / ``--clip_model`` select the CLIP target for every layer, else pixels
    (``--norm_pix_loss`` normalizes them per patch).

    Returns:
        (targets, layer_targets): name -> :class:`Target`, and one target name per supervised layer.
    """
    import logging

    if getattr(args, "clip_path", None) or getattr(args, "clip_model", None):
        from util.clip_teacher import CLIPTeacher, load_clip_visual

        if getattr(args, "norm_pix_loss", False):
            logging.getLogger(__name__).info("--norm_pix_loss has no effect with the CLIP target (cosine loss on features)")
        target: Target = CLIPTeacher(load_clip_visual(args.clip_path, args.clip_model, args.clip_pretrained))
        name = "clip"
    else:
        target = PixelTarget(img_size, patch_size, norm_pix=getattr(args, "norm_pix_loss", False))
        name = "pixel"
    check_grid(target, name, grid, f"{img_size}px / patch {patch_size}")
    return {name: target}, [name] * num_layers
