"""Fixed 2-D sin-cos position embeddings and position-embedding resizing.

The sin-cos table reproduces MAE's layout exactly, because released MAE / DeepMIM checkpoints and
the tools built on them depend on it:

* the first half of the channels encodes the **w** (column) coordinate, the second half the
  **h** (row) coordinate (MAE builds its grid with ``meshgrid(w, h)``, so "w first");
* within each half, ``sin`` of all frequencies comes before ``cos``; frequency ``k`` of a half of
  width ``d`` is ``1 / 10000 ** (k / (d / 2))``;
* tokens are in row-major order (row 0 left to right, then row 1, ...);
* with a class token, a row of zeros is prepended.

Resizing a pre-trained table to another patch grid follows MAE's ``interpolate_pos_embed`` (which the
reference DeepMIM also uses for fine-tuning and segmentation), to the bit: the prefix rows are kept
as they are, the patch rows are reshaped to ``[1, D, H, W]`` and resized by
``F.interpolate(mode='bicubic', align_corners=False)`` -- the plain bicubic kernel (a = -0.75), not
the antialiased one (PIL's, a = -0.5) that timm's ``resample_abs_pos_embed`` uses by default.
"""
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """1-D sin-cos embedding: ``pos`` [M] -> [M, dim] (``dim`` even), float64."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding width must be even, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # [dim/2]
    out = pos.to(torch.float64).reshape(-1, 1) * omega.reshape(1, -1)  # [M, dim/2]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(dim: int, grid_size: Union[int, Tuple[int, int]], cls_token: bool = False) -> torch.Tensor:
    """2-D sin-cos table in MAE's layout.

    Args:
        dim: embedding width, divisible by 4.
        grid_size: patches per side, or (rows, cols).
        cls_token: prepend a zero row for the class token.

    Returns:
        float32 tensor [rows * cols (+1), dim].
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding width must be divisible by 4, got {dim}")
    rows, cols = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
    hh, ww = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")  # [rows, cols] each
    emb = torch.cat([sincos_1d(dim // 2, ww.flatten()), sincos_1d(dim // 2, hh.flatten())], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()


def resize_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: Sequence[int],
    num_prefix_tokens: int = 1,
    old_grid: Optional[Sequence[int]] = None,
    antialias: bool = False,
) -> torch.Tensor:
    """Resize a [1, prefix + H*W, D] position embedding to the patch grid ``new_grid`` (rows, cols).

    MAE's ``interpolate_pos_embed``: prefix (class token) rows untouched, the patch rows as a
    [1, D, H, W] map through ``F.interpolate(mode='bicubic', align_corners=False)``, in the table's
    own dtype. Identity (the same tensor) when the grid already matches.

    Args:
        pos_embed: [1, prefix + H*W, D] table, tokens row-major.
        new_grid: (rows, cols) of the new patch grid; non-square grids are allowed.
        num_prefix_tokens: leading rows that are not patches (1 for a class token, 0 for none).
        old_grid: (rows, cols) of the table; None: a square grid.
        antialias: use the antialiased bicubic kernel instead (not MAE's; never the default).
    """
    num_patches = pos_embed.shape[1] - num_prefix_tokens
    if old_grid is None:
        old = int(round(num_patches**0.5))
        if old * old != num_patches:
            raise ValueError(f"position embedding with {num_patches} patch rows is not a square grid")
        old_grid = (old, old)
    old_h, old_w = (int(v) for v in old_grid)
    if old_h * old_w != num_patches:
        raise ValueError(f"position embedding with {num_patches} patch rows is not a {old_h}x{old_w} grid")
    new_h, new_w = (int(v) for v in new_grid)
    if (old_h, old_w) == (new_h, new_w):
        return pos_embed
    dim = pos_embed.shape[-1]
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    patches = patches.reshape(-1, old_h, old_w, dim).permute(0, 3, 1, 2)  # [1, D, H, W]
    patches = F.interpolate(patches, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=antialias)
    patches = patches.permute(0, 2, 3, 1).flatten(1, 2)  # [1, new_h * new_w, D]
    return torch.cat((prefix, patches), dim=1)
