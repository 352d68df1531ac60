"""HOG target (MaskFeat): histograms of oriented gradients, computed on the device in the step.

What one target token holds, for a student patch of ``p`` pixels (MaskFeat's choices, from its code):

* per RGB channel, the gradients ``gx``, ``gy`` from 3x3 Sobel filters (``[-1, 0, 1]`` smoothed by
  ``[1, 2, 1]`` across), on the image padded by reflection;
* each pixel votes with its gradient magnitude, weighted by a Gaussian window over its patch
  (sigma = p / 2, as MaskFeat's 16-px window with sigma 8), for one of 9 unsigned orientation bins
  (0-180 degrees; bin ``b`` is centred on ``b * 20`` degrees, so bin 0 holds horizontal gradients,
  i.e. vertical edges);
* votes are summed over cells of ``cell`` x ``cell`` pixels (8; smaller when the patch is, see
  :func:`default_cell`), and each cell's 9-bin histogram is L2-normalized per channel;
* a token concatenates the cells of its patch, row-major, each as (channel, bin):
  ``dim = (p / cell)^2 * 3 * 9`` (108 for 16-px patches, 27 for the 4-px demo model).

The input is the ImageNet-normalized image the student sees: each channel's histograms are
normalized per cell, so a per-channel affine map of the pixels (normalization) changes nothing.
Everything is tensor ops on the device (shifted differences and one ``scatter_add``, no loop over
pixels), in float32 outside autocast.
"""
import math
from typing import Optional, Tuple

from util.errors import UserError

import torch
import torch.nn.functional as F

from targets.base import Target


def default_cell(patch_size: int, max_cell: int = 8) -> int:
    """MaskFeat's 8-px cells, or the largest divisor of the patch size below 8 (4 for patch 4, 7 for 14)."""
    return max(c for c in range(1, min(max_cell, patch_size) + 1) if patch_size % c == 0)


def gaussian_window(size: int, sigma: float) -> torch.Tensor:
    """[size, size] separable Gaussian centred on the window (peak 1)."""
    n = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    w = torch.exp(-0.5 * (n / sigma) ** 2)
    return w[:, None] * w[None, :]


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
        win = gaussian_window(patch_size, patch_size / 2) if window else torch.ones(patch_size, patch_size)
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
        magnitude = torch.hypot(gx, gy) * self.window.float().repeat(gh, gw)
        # unsigned orientation in bins centred on multiples of 180/nbins degrees
        bins = torch.round(torch.atan2(gy, gx) * (nb / math.pi)).long() % nb
        rows = torch.arange(h, device=x.device) // cell
        cols = torch.arange(w, device=x.device) // cell
        cell_id = rows[:, None] * (w // cell) + cols[None, :]  # [H, W]
        index = (cell_id * nb + bins).reshape(n * c, h * w)  # one (cell, bin) slot per pixel
        hist = torch.zeros(n * c, (h // cell) * (w // cell) * nb, device=x.device, dtype=torch.float32)
        hist.scatter_add_(1, index, magnitude.reshape(n * c, h * w))
        hist = F.normalize(hist.view(n, c, h // cell, w // cell, nb), dim=-1)  # L2 per (channel, cell)
        k = p // cell  # cells per patch side
        hist = hist.view(n, c, gh, k, gw, k, nb).permute(0, 2, 4, 3, 5, 1, 6)  # [N, gh, gw, k, k, C, nb]
        return hist.reshape(n, gh * gw, k * k * c * nb)

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}, cell={self.cell}, nbins={self.nbins}"
