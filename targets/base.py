"""The target interface: a frozen map from images to target tokens on the student's patch grid.

A target is an ``nn.Module`` that maps a batch of ImageNet-normalized images [N, 3, H, W] to
target tokens [N, L, C] (L = number of patches of the student) and names the loss the decoders
are trained with (``targets/losses.py``). Targets are frozen and run without autograd (see
:func:`compute_targets`). Network teachers (CLIP, timm models, checkpoints) share
:class:`FrozenTeacher` (freezing, input re-normalization, resizing).

The package: ``base`` (this interface), ``losses``, ``pixel`` (MAE), ``hog`` (MaskFeat), ``clip``
(the reference's CLIP target), ``teachers`` (any frozen ViT) and ``registry`` (the names
``--target`` / ``--ds_targets`` accept, built from a :class:`TargetConfig`).
"""
import logging
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

from util.config.typed import FlagConfig
from util.data.constants import IMAGENET_MEAN, IMAGENET_STD
from util.run.errors import UserError

import torch
import torch.nn.functional as F
from torch import nn

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TargetConfig(FlagConfig):
    """The reconstruction-target flags of ``main_pretrain.py`` (docs/PRETRAIN.md: Reconstruction targets)."""

    target: Optional[str] = None
    ds_targets: Optional[Tuple[str, ...]] = None
    norm_pix_loss: bool = False
    clip_path: Optional[str] = None
    clip_model: Optional[str] = None
    clip_pretrained: Optional[str] = None
    teacher_model: Optional[str] = None
    teacher_weights: Optional[str] = None
    teacher_layer: Optional[int] = None
    teacher_loss: str = "cosine"
    teacher_input_size: Optional[int] = None

    @property
    def uses_clip_flags(self) -> bool:
        return bool(self.clip_path or self.clip_model)


@dataclass(frozen=True)
class Student:
    """What a target must fit: the student's patch grid, image side and patch size."""

    grid: Tuple[int, int]
    img_size: int
    patch_size: int


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

    def grid_hint(self, student_grid: Sequence[int]) -> str:
        """What to do when the grid differs from the student's (subclasses that can adapt say how)."""
        return "Pick a teacher whose input size / patch size gives the same grid, or change --input_size / --model."

FEATURE_LOSSES = ("cosine", "smooth_l1")


class FrozenTeacher(Target):
    """What every network teacher shares (CLIP, timm models, this repo's checkpoints).

    * the network is frozen: ``requires_grad=False`` and always in eval mode (``train()`` is a no-op);
    * the student's images are ImageNet-normalized; the teacher gets the same pixels re-normalized
      to its own statistics by one per-channel affine map ``x * a + b``;
    * ``input_size``: the images are resized (bicubic, antialiased) to this side first, for a teacher
      whose patch size differs from the student's: at ``grid * teacher_patch`` pixels each teacher
      patch covers exactly the pixels of one student patch;
    * with the smooth-L1 loss the target tokens are standardized per token (LayerNorm without
      affine, as in data2vec / MaskDistill), so that the loss's beta of 1 means the same for every
      teacher whatever the scale of its features; the cosine loss needs no such step.

    Subclasses set ``grid`` and ``dim`` and implement :meth:`tokens`.

    Args:
        net: the teacher network.
        mean / std: the statistics the teacher was trained with.
        loss: ``'cosine'`` or ``'smooth_l1'``.
        input_size: side of the teacher's input (None: the student's images as they are).
        input_mean / input_std: the statistics the student's images are normalized with.
    """

    def __init__(
        self,
        net: nn.Module,
        mean: Sequence[float],
        std: Sequence[float],
        loss: str = "cosine",
        input_size: Optional[int] = None,
        input_mean: Sequence[float] = IMAGENET_MEAN,
        input_std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        if loss not in FEATURE_LOSSES:
            raise UserError(f"--teacher_loss {loss!r}: a feature teacher is trained with one of {', '.join(FEATURE_LOSSES)}.")
        self.net = net.eval().requires_grad_(False)
        in_mean, in_std = torch.tensor(input_mean), torch.tensor(input_std)
        t_mean, t_std = torch.tensor(tuple(mean), dtype=torch.float32), torch.tensor(tuple(std), dtype=torch.float32)
        self.register_buffer("scale", (in_std / t_std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", ((in_mean - t_mean) / t_std).view(1, 3, 1, 1), persistent=False)
        self.loss = loss
        self.input_size = input_size

    def train(self, mode: bool = True) -> "FrozenTeacher":
        return super().train(False)  # always in eval mode (no dropout, no drop path)

    def prepare(self, imgs: torch.Tensor) -> torch.Tensor:
        """ImageNet-normalized [N, 3, H, W] -> the teacher's input (its statistics, its size)."""
        x = imgs.to(self.scale.dtype)
        if self.input_size and tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic", align_corners=False,
                              antialias=True)
        return x * self.scale + self.shift

    def tokens(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        """Teacher-normalized images -> [N, L, dim] patch tokens (no prefix tokens)."""
        raise NotImplementedError

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        out = self.tokens(self.prepare(imgs))
        if self.loss == "smooth_l1":
            out = F.layer_norm(out.float(), out.shape[-1:])
        return out


def check_layer(layer: Optional[int], depth: int, what: str) -> int:
    """``--teacher_layer`` resolved against a teacher of ``depth`` blocks (None: the last)."""
    if layer is None:
        return depth
    if not 1 <= layer <= depth:
        raise UserError(f"--teacher_layer {layer} is outside 1..{depth}: the {what} has {depth} blocks (1-based).")
    return layer


def preprocess_stats(net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> Tuple[Tuple[float, ...], ...]:
    """The (mean, std) a network was trained with: timm's ``pretrained_cfg`` or open_clip's
    ``preprocess_cfg`` when the network carries one, else the given defaults."""
    for attr in ("preprocess_cfg", "pretrained_cfg"):
        cfg = getattr(net, attr, None)
        if isinstance(cfg, dict) and cfg.get("mean") is not None and cfg.get("std") is not None:
            mean, std = cfg["mean"], cfg["std"]
            break
    as3 = lambda v: tuple(float(x) for x in v) if isinstance(v, (list, tuple)) else (float(v),) * 3
    return as3(mean), as3(std)


# --------------------------------------------------------------------------------------------
# running and checking targets


def compute_targets(targets: Dict[str, Target], imgs: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Run every target once on ``imgs`` without autograd (however many layers read it).

    The targets run under ``torch.inference_mode`` (no graph, no version counters); the results are
    copied to ordinary float32 tensors, because the loss must save them for the backward pass of the
    predictions, which inference tensors do not allow. A target whose tokens do not have the shape
    it declared (grid, width) stops here, before the loss hides it behind broadcasting.
    """
    with torch.inference_mode():
        out = {name: t(imgs) for name, t in targets.items()}
    for name, t in targets.items():
        expected = (t.grid[0] * t.grid[1], t.dim)
        if tuple(out[name].shape[1:]) != expected:
            raise UserError(
                f"The {name} target returned tokens of shape {tuple(out[name].shape)} but declares "
                f"{expected[0]} tokens ({t.grid[0]}x{t.grid[1]}) of width {t.dim}: the teacher does not fit the "
                f"student. Check --teacher_model / --teacher_input_size against --input_size / --model."
            )
    return {name: v.to(torch.float32, copy=True) for name, v in out.items()}


def check_grid(target: Target, name: str, student_grid: Sequence[int], student_desc: str) -> None:
    """Raise a clear error when a target's token grid differs from the student's patch grid."""
    if tuple(target.grid) != tuple(student_grid):
        raise UserError(
            f"The {name} target produces a {target.grid[0]}x{target.grid[1]} token grid but the student "
            f"has a {student_grid[0]}x{student_grid[1]} patch grid ({student_desc}). {target.grid_hint(student_grid)}"
        )


def check_resume_targets(ckpt: Dict, pred_dims: Sequence[int], losses: Sequence[str], layer_targets: Sequence[str],
                         source: str) -> None:
    """Refuse to resume a checkpoint whose decoders predict other targets than this run's.

    Without this the state-dict load fails on the first mismatching ``pred`` weight, which does not
    say that the target flags changed.
    """
    old = ckpt.get("model_cfg") or {}
    old_dims, old_losses = list(old.get("pred_dims") or []), list(old.get("losses") or [])
    if len(old_dims) != len(pred_dims):
        return  # another --ds_layers: the generic "different model or flags" message is the right one
    if old_dims != list(pred_dims) or old_losses != list(losses):
        was = (ckpt.get("args") or {}).get("ds_targets")
        raise UserError(
            f"{source} was trained with targets {','.join(was) if was else '(unknown)'} (widths {old_dims}, losses "
            f"{old_losses}) but this run's targets {','.join(layer_targets)} need widths {list(pred_dims)}, losses "
            f"{list(losses)}. Rerun with the targets it was trained with, or use a fresh --output_dir."
        )


def describe_targets(targets: Dict[str, Target], per_layer: Optional[Sequence[str]] = None) -> str:
    parts = [f"{n}: dim {t.dim}, loss {t.loss}" for n, t in targets.items()]
    s = "; ".join(parts)
    if per_layer is not None:
        s += f" (per supervised layer: {', '.join(per_layer)})"
    return s

