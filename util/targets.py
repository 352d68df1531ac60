"""Reconstruction targets: images -> target tokens on the student's patch grid, plus their loss.

A target is an ``nn.Module`` that maps a batch of ImageNet-normalized images [N, 3, H, W] to
target tokens [N, L, C] (L = number of patches of the student) and names the loss the decoders
are trained with. Targets are frozen and run without autograd (see ``compute_targets``).

The names ``--target`` / ``--ds_targets`` accept (:data:`TARGETS`): ``pixel`` (:class:`PixelTarget`),
``hog`` (``util/hog.py``), ``clip`` (``util/clip_teacher.py``) and ``teacher`` (any frozen network,
``util/teachers.py``). Network teachers share :class:`FrozenTeacher` (freezing, input
re-normalization, resizing). Each distinct target is built once and runs once per step, however
many supervised layers read it.

Losses are computed per patch ([N, L]) and averaged over the masked patches only.
"""
import logging
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from util.datasets import IMAGENET_MEAN, IMAGENET_STD
from util.errors import UserError
from util.registry import Registry

_log = logging.getLogger(__name__)

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


NORM_PIX_EPS = 1.0e-6  # MAE's variance offset for --norm_pix_loss


def patch_mean_std(patches: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-patch mean and ``sqrt(var + 1e-6)`` (unbiased variance) of [N, L, D] patches: what
    ``--norm_pix_loss`` normalizes by, and what a reconstruction is de-normalized with."""
    return patches.mean(dim=-1, keepdim=True), (patches.var(dim=-1, keepdim=True) + NORM_PIX_EPS) ** 0.5


def masked_mean(per_patch: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average a [N, L] loss over the patches where ``mask`` is 1 (removed patches)."""
    return (per_patch * mask).sum() / mask.sum()


# --------------------------------------------------------------------------------------------
# the interface


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


# --------------------------------------------------------------------------------------------
# the registry of targets: the names --target / --ds_targets accept


@dataclass(frozen=True)
class Student:
    """What a target must fit: the student's patch grid, image side and patch size."""

    grid: Tuple[int, int]
    img_size: int
    patch_size: int


TARGETS = Registry("reconstruction target")


def _pixel(args, student: Student) -> Target:
    return PixelTarget(student.img_size, student.patch_size, norm_pix=getattr(args, "norm_pix_loss", False))


def _hog(args, student: Student) -> Target:
    from util.hog import HOGTarget

    return HOGTarget(student.img_size, student.patch_size)


def _clip(args, student: Student) -> Target:
    from util.clip_teacher import CLIPTeacher, load_clip_visual

    return CLIPTeacher(load_clip_visual(args.clip_path, args.clip_model, args.clip_pretrained))


def _teacher(args, student: Student) -> Target:
    from util.teachers import build_teacher

    return build_teacher(args, student)


TARGETS.register(_pixel, "pixel")
TARGETS.register(_hog, "hog")
TARGETS.register(_clip, "clip")
TARGETS.register(_teacher, "teacher")


def _uses_clip_flags(args) -> bool:
    return bool(getattr(args, "clip_path", None) or getattr(args, "clip_model", None))


def layer_target_names(args, num_layers: int) -> List[str]:
    """One target name per supervised layer from ``--target`` / ``--ds_targets``.

    Default: ``clip`` when ``--clip_path`` / ``--clip_model`` is given (the reference command line),
    else ``pixel``.
    """
    target = getattr(args, "target", None)
    per_layer = getattr(args, "ds_targets", None)
    if per_layer:
        if target and any(n != target for n in per_layer):
            raise UserError(
                f"--target {target} and --ds_targets {','.join(per_layer)} disagree: give --target (one target for "
                f"every supervised layer) or --ds_targets (one per layer)."
            )
        if len(per_layer) != num_layers:
            layers = getattr(args, "ds_layers", None)
            raise UserError(
                f"--ds_targets names {len(per_layer)} target(s) but there are {num_layers} supervised layers"
                f"{' (--ds_layers ' + ','.join(map(str, layers)) + ')' if layers else ''}; give one per layer, "
                f"e.g. --ds_targets {','.join(['pixel'] * (num_layers - 1) + ['clip'])}."
            )
        names = list(per_layer)
    else:
        names = [target or ("clip" if _uses_clip_flags(args) else "pixel")] * num_layers
    for name in names:
        TARGETS.get(name)  # an unknown name lists the valid ones
    return names


def build_targets(args, grid: Tuple[int, int], img_size: int, patch_size: int, num_layers: int):
    """Targets named by the flags, each built once, and which one each supervised layer reconstructs.

    Returns:
        (targets, layer_targets): name -> :class:`Target` (each distinct target once, so each runs
        once per step), and one target name per supervised layer.
    """
    names = layer_target_names(args, num_layers)
    student = Student(tuple(grid), img_size, patch_size)
    targets: Dict[str, Target] = {}
    for name in dict.fromkeys(names):  # distinct, in layer order
        targets[name] = TARGETS.get(name)(args, student)
        check_grid(targets[name], name, grid, f"{img_size}px / patch {patch_size}")

    # flags that have no effect with these targets: say so rather than ignore them silently
    if getattr(args, "norm_pix_loss", False) and "pixel" not in targets:
        _log.info("--norm_pix_loss has no effect: no layer reconstructs pixels")
    open_clip_teacher = "teacher" in targets and str(getattr(args, "teacher_model", "")).startswith("open_clip")
    if _uses_clip_flags(args) and "clip" not in targets and not open_clip_teacher:
        _log.info("--clip_path / --clip_model have no effect: no layer uses the clip target")
    if "teacher" not in targets and any(getattr(args, f, None) for f in ("teacher_model", "teacher_weights", "teacher_layer")):
        _log.info("--teacher_* flags have no effect: no layer uses the teacher target")
    return targets, names
