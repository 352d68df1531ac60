"""HOG target (MaskFeat): histograms of oriented gradients, computed on the device in the step.

What one target token holds, for a student patch of ``p`` pixels (MaskFeat's choices, from its
``HOGLayerC`` operator and its label layout):

* per RGB channel, the gradients ``gx``, ``gy`` from 3x3 Sobel filters (``[-1, 0, 1]`` smoothed by
  ``[1, 2, 1]`` across), on the image padded by reflection;
* each pixel votes with its gradient magnitude, weighted by a Gaussian window over its patch
  (MaskFeat's ``get_gkern``: side p, sigma p // 2, summing to 1), for one of 9 **unsigned**
  orientation bins binned exactly as MaskFeat does (:func:`orientation_bin`): both signs of an
  orientation in one bin, numbered as MaskFeat numbers them. With the gradient direction
  ``theta = atan2(gy, gx)`` (y down), bin ``b`` holds ``theta`` in ``(70 - 20 b, 90 - 20 b]`` degrees
  modulo 180: bin 0 vertical gradients (horizontal edges), bin 4 horizontal gradients (vertical
  edges), edges on odd multiples of 10 degrees;
* votes are summed over cells of ``cell`` x ``cell`` pixels (8; smaller when the patch is, see
  :func:`default_cell`), and each cell's 9-bin histogram is L2-normalized per channel;
* a token is MaskFeat's label of its patch: ``(channel, bin, cell row, cell col)`` flattened,
  ``dim = 3 * 9 * (p / cell)^2`` (108 for 16-px patches, 27 for the 4-px demo model).

The input is the ImageNet-normalized image the student sees: each channel's histograms are
normalized per cell, so a per-channel affine map of the pixels (normalization) changes nothing.
Everything is tensor ops on the device (shifted differences and one ``scatter_add``, no loop over
pixels), in float32 outside autocast.

Against MaskFeat's operator the only differences are float rounding: the gradients are shifted
differences rather than a convolution (exact zeros on flat regions; no TF32 convolution on GPUs) and
the votes of a cell are summed in another order.
"""
import math
from typing import Optional, Tuple

from util.run.errors import UserError

import torch
import torch.nn.functional as F

from targets.base import Target


def default_cell(patch_size: int, max_cell: int = 8) -> int:
    """MaskFeat's 8-px cells, or the largest divisor of the patch size below 8 (4 for patch 4, 7 for 14)."""
    return max(c for c in range(1, min(max_cell, patch_size) + 1) if patch_size % c == 0)


def gaussian_window(size: int, sigma: float) -> torch.Tensor:
    """[size, size] separable Gaussian centred on the window, summing to 1 (MaskFeat's ``get_gkern``)."""
    n = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    w = torch.exp(-0.5 * (n / sigma) ** 2)
    win = torch.outer(w, w)
    return win / win.sum()


def orientation_bin(gx: torch.Tensor, gy: torch.Tensor, nbins: int = 9) -> torch.Tensor:
    """MaskFeat's unsigned orientation bin (long, in [0, nbins)) of gradients ``gx`` (x to the right)
    and ``gy`` (y down).

    MaskFeat's Sobel kernels yield ``(-gx, -gy)``, and it takes the angle of the x-gradient over the
    y-gradient, ``atan2(-gx, -gy)``, in [-pi, pi]; scaled to [-nbins, nbins] and floored, modulo
    nbins: opposite gradients (angle + pi, i.e. + nbins) land in the same bin, and an angle exactly
    on an edge goes to the bin above it. The same float steps in the same order (divide by pi, then
    multiply by nbins), so that even the exact edges fall as in MaskFeat.
    """
    phase = torch.atan2(-gx, -gy) / math.pi * nbins  # [-nbins, nbins]
    return torch.floor(phase).long() % nbins


def sobel(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sobel gradients (x to the right, y down) of [N, C, H, W] with reflect padding.

    Written as separable shifted differences rather than a convolution: a flat region then gives
    exactly zero (convolution kernels may leave ~1e-7 there, which the per-cell L2 normalization
    would blow up into a unit histogram).
    """
    xp = F.pad(x, (1, 1, 1, 1), mode="reflect")
    dx = xp[..., :, 2:] - xp[..., :, :-2]  # [N, C, H + 2, W]
    dy = xp[..., 2:, :] - xp[..., :-2, :]  # [N, C, H, W + 2]
    gx = dx[..., :-2, :] + 2 * dx[..., 1:-1, :] + dx[..., 2:, :]
    gy = dy[..., :, :-2] + 2 * dy[..., :, 1:-1] + dy[..., :, 2:]
    return gx, gy


class HOGTarget(Target):
    """MaskFeat's HOG of every patch: [N, 3, H, W] -> [N, L, (p/cell)^2 * 3 * nbins], MSE loss.

    Args:
        img_size: input side in pixels.
        patch_size: the student's patch size.
        cell_size: HOG cell side in pixels; must divide the patch size (default :func:`default_cell`).
        nbins: orientation bins over 0-180 degrees.
        window: weight the votes by a Gaussian over each patch (MaskFeat's ``gaussian_window``).

    Output: [N, L, C * nbins * k * k] with k = patch_size / cell: per token (channel, bin, cell row,
    cell col), MaskFeat's label layout.
    """

    def __init__(self, img_size: int, patch_size: int, cell_size: Optional[int] = None, nbins: int = 9,
                 window: bool = True) -> None:
        super().__init__()
        cell = cell_size or default_cell(patch_size)
        if patch_size % cell:
            raise UserError(f"HOG cell size {cell} does not divide the patch size {patch_size}; pick a divisor.")
        self.patch_size, self.cell, self.nbins = patch_size, cell, nbins
        self.grid = (img_size // patch_size, img_size // patch_size)
        self.dim = (patch_size // cell) ** 2 * 3 * nbins
        self.loss = "mse"
        win = gaussian_window(patch_size, patch_size // 2) if window else torch.ones(patch_size, patch_size)
        self.register_buffer("window", win, persistent=False)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        # float32 even under autocast: bf16 gradients would move votes between orientation bins
        with torch.autocast(imgs.device.type, enabled=False):
            return self._hog(imgs.float())

    def _hog(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        p, cell, nb = self.patch_size, self.cell, self.nbins
        gh, gw = h // p, w // p
        gx, gy = sobel(x)  # [N, C, H, W]
        # the magnitude as MaskFeat takes it (the 2-norm of the stacked gradients, not hypot)
        magnitude = torch.linalg.vector_norm(torch.stack((gx, gy), dim=-1), dim=-1) * self.window.float().repeat(gh, gw)
        bins = orientation_bin(gx, gy, nb)
        rows = torch.arange(h, device=x.device) // cell
        cols = torch.arange(w, device=x.device) // cell
        cell_id = rows[:, None] * (w // cell) + cols[None, :]  # [H, W]
        index = (cell_id * nb + bins).reshape(n * c, h * w)  # one (cell, bin) slot per pixel
        hist = torch.zeros(n * c, (h // cell) * (w // cell) * nb, device=x.device, dtype=torch.float32)
        hist.scatter_add_(1, index, magnitude.reshape(n * c, h * w))
        hist = F.normalize(hist.view(n, c, h // cell, w // cell, nb), dim=-1)  # L2 per (channel, cell)
        k = p // cell  # cells per patch side
        hist = hist.view(n, c, gh, k, gw, k, nb).permute(0, 2, 4, 1, 6, 3, 5)  # [N, gh, gw, C, nb, k, k]
        return hist.reshape(n, gh * gw, c * nb * k * k)

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}, cell={self.cell}, nbins={self.nbins}"
