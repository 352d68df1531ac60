"""Fixed 2-D sin-cos position embeddings and position-embedding resampling.

The sin-cos table reproduces MAE's layout exactly, because released MAE / DeepMIM checkpoints and
the tools built on them depend on it:

* the first half of the channels encodes the **w** (column) coordinate, the second half the
  **h** (row) coordinate (MAE builds its grid with ``meshgrid(w, h)``, so "w first");
* within each half, ``sin`` of all frequencies comes before ``cos``; frequency ``k`` of a half of
  width ``d`` is ``1 / 10000 ** (k / (d / 2))``;
* tokens are in row-major order (row 0 left to right, then row 1, ...);
* with a class token, a row of zeros is prepended.
"""
from typing import Sequence, Tuple, Union

import torch
from timm.layers import resample_abs_pos_embed


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
    pos_embed: torch.Tensor, new_grid: Sequence[int], num_prefix_tokens: int = 1
) -> torch.Tensor:
    """Resample a [1, prefix + H*W, D] position embedding to a new (square or given) patch grid.

    Bicubic interpolation of the patch part (timm's ``resample_abs_pos_embed``); the prefix (class
    token) rows are kept. Identity when the grid already matches.
    """
    num_patches = pos_embed.shape[1] - num_prefix_tokens
    old = int(round(num_patches**0.5))
    if old * old != num_patches:
        raise ValueError(f"position embedding with {num_patches} patch rows is not a square grid")
    new_grid = list(new_grid)
    if [old, old] == new_grid:
        return pos_embed
    return resample_abs_pos_embed(
        pos_embed, new_size=new_grid, old_size=[old, old], num_prefix_tokens=num_prefix_tokens
    )
