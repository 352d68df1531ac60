"""MAE's pixel target, and the patch <-> image layout (per patch, pixels row-major, channels last)."""
from typing import Tuple

import torch

from targets.base import Target


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


NORM_PIX_EPS = 1.0e-6  # MAE's variance offset for --norm_pix_loss


def patch_mean_std(patches: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-patch mean and ``sqrt(var + 1e-6)`` (unbiased variance) of [N, L, D] patches: what
    ``--norm_pix_loss`` normalizes by, and what a reconstruction is de-normalized with."""
    return patches.mean(dim=-1, keepdim=True), (patches.var(dim=-1, keepdim=True) + NORM_PIX_EPS) ** 0.5
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
            mean, std = patch_mean_std(target)
            target = (target - mean) / std
        return target

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}, norm_pix={self.norm_pix}"
