"""The ``teacher`` target: any frozen feature network, its patch tokens at a chosen block.

``--teacher_model`` names the network:

* a **timm** model name (``vit_base_patch14_dinov2.lvd142m``, ``eva02_base_patch16_clip_224.merged2b``,
  ``hf-hub:...``) with ``--teacher_weights FILE``: any file timm's own loader reads (its state
  dicts, ``.safetensors``, or an original release timm converts, e.g. DINOv2's), loaded
  weights-only. Without a file timm downloads the model's pretrained weights (online only). The
  model is built for the teacher's input size (its position embedding resized by MAE's rule, as
  every resize in this repo) and its input statistics come from its ``pretrained_cfg``. ViT-style
  models only (``patch_embed``, ``blocks``, ``forward_intermediates``: ViT, DeiT, DINOv2, EVA, ...).
* ``deepmim:PATH`` or a checkpoint path / URL: an encoder this repo reads with ``--finetune`` (its own
  pre-training or fine-tuning checkpoints, the reference DeepMIM and MAE releases, timm ViT state
  dicts). The ViT is rebuilt from the weights (heads from the checkpoint's ``model_cfg``, else the
  standard count for the width); input statistics ImageNet's, as these encoders were trained on.
* ``open_clip`` or ``open_clip:NAME``: the CLIP image tower given by ``--clip_path`` /
  ``--clip_model`` (or NAME) / ``--clip_pretrained``, as for the ``clip`` target; a ViT tower, or the
  timm trunk of a timm-based tower (EVA-CLIP), with open_clip's statistics for the model.

``--teacher_layer K`` (1-based, default: the last block) picks the block. The last block's tokens
pass the network's final norm (for a CLIP ViT tower also its projection ``proj``), like DeepMIM's
own last-layer features; other blocks give their raw output. Prefix tokens (cls, registers) are
dropped; blocks after K are removed and never run. No projection is added: each supervised layer's
decoder predicts the teacher's width directly.
"""
import difflib
import os
from typing import Callable, Optional, Sequence

from util.checkpoints.convert import HEAD_PREFIXES, read_encoder
from util.checkpoints.pos_embed import resize_pos_embed
from util.data.constants import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD
from util.run.errors import UserError

import torch
from torch import nn

from models_vit import build_from
from targets.base import FrozenTeacher, Student, TargetConfig, check_layer, preprocess_stats
from targets.clip import CLIPTeacher, load_clip_visual

CHECKPOINT_EXTS = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")


class ViTTeacher(FrozenTeacher):
    """Tokens of block ``layer`` of a timm-style ViT (timm ``VisionTransformer``, ``Eva``, ..., and
    this repo's ``models_vit.ViT``).

    Args:
        net: the ViT, built for the teacher's input size.
        layer: 1-based block (None: the last, after the final norm).
        mean / std: the statistics the ViT was trained with.
        loss: ``'cosine'`` or ``'smooth_l1'``.
        input_size: resize the student's images to this side first (must be the size ``net`` takes).
        name: how messages call the teacher.
        resizable: whether the teacher could be rebuilt for another input size (``--teacher_input_size``).
    """

    def __init__(self, net: nn.Module, layer: Optional[int], mean: Sequence[float], std: Sequence[float],
                 loss: str = "cosine", input_size: Optional[int] = None, name: str = "teacher",
                 resizable: bool = False) -> None:
        if not all(hasattr(net, a) for a in ("patch_embed", "blocks", "forward_intermediates")):
            raise UserError(
                f"The {name} is a {type(net).__name__}; the teacher target takes ViT-style timm models (patch_embed, "
                f"blocks, forward_intermediates), e.g. ViT, DeiT, DINOv2 or EVA."
            )
        native = net.patch_embed.img_size[0] if getattr(net.patch_embed, "img_size", None) else None
        if input_size and native and input_size != native:
            raise UserError(f"--teacher_input_size {input_size}: the {name} takes {native}-px images only.")
        depth = len(net.blocks)
        layer = check_layer(layer, depth, name)
        if hasattr(net, "prune_intermediate_layers"):  # drop the unused blocks (and head) from memory
            net.prune_intermediate_layers([layer - 1], prune_norm=layer < depth, prune_head=True)
        super().__init__(net, mean, std, loss, input_size)
        self.layer, self.last, self.name, self.resizable = layer, layer == depth, name, resizable
        self.grid = tuple(net.patch_embed.grid_size)
        self.patch = net.patch_embed.patch_size[0]
        self.dim = net.embed_dim

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher-normalized [N, 3, H, W] -> [N, L, embed_dim] patch tokens of block ``layer``."""
        (out,) = self.net.forward_intermediates(
            x, indices=[self.layer - 1], norm=self.last, stop_early=True, output_fmt="NLC", intermediates_only=True,
        )
        return out

    def grid_hint(self, student_grid: Sequence[int]) -> str:
        if self.resizable and student_grid[0] == student_grid[1]:
            size = student_grid[0] * self.patch
            return (f"Pass --teacher_input_size {size}: the images are then resized for the teacher so that each of "
                    f"its {self.patch}-px patches covers exactly one student patch.")
        return super().grid_hint(student_grid)

    def extra_repr(self) -> str:
        return f"{self.name}, layer={self.layer}, loss={self.loss}"


# --------------------------------------------------------------------------------------------
# the three kinds of --teacher_model


def timm_teacher(name: str, weights: Optional[str], layer: Optional[int], loss: str, size: int,
                 input_size: Optional[int]) -> ViTTeacher:
    """A timm model by name, weights from ``weights`` (or timm's download), built for ``size`` px."""
    import timm

    if not (timm.is_model(name) or name.startswith(("hf-hub:", "hf_hub:"))):
        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        raise UserError(
            f"--teacher_model {name!r} is not a timm model name{' (close: ' + ', '.join(close) + ')' if close else ''}, "
            f"nor deepmim:PATH (a checkpoint of this repo / MAE / the reference DeepMIM) or open_clip."
        )
    kwargs = dict(num_classes=0)
    if weights:
        if not os.path.isfile(weights):
            raise UserError(f"--teacher_weights {weights!r} not found.")
        kwargs["pretrained_cfg_overlay"] = dict(file=weights)
    try:
        net = _at_size(lambda **kw: timm.create_model(name, **kwargs, **kw), size)
    except TypeError as e:  # models without an img_size argument are not ViT-style
        raise UserError(f"timm's {name} is not a ViT-style model the teacher target can use ({e}).") from None
    except Exception as e:  # download and strict-load failures come in many types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if weights:
            raise UserError(
                f"--teacher_weights {weights!r} does not load into timm's {name} ({first}). Pass the weights of that "
                f"model: a timm state dict or the original release timm converts."
            ) from None
        raise UserError(
            f"timm could not fetch the pretrained weights of {name} ({first}). Offline, pass them with "
            f"--teacher_weights FILE."
        ) from None
    mean, std = preprocess_stats(net, IMAGENET_MEAN, IMAGENET_STD)
    return ViTTeacher(net, layer, mean, std, loss, input_size, f"timm model {name}", resizable=True)


def _at_size(build: Callable[..., nn.Module], size: int) -> nn.Module:
    """A pretrained timm model (``build(pretrained=..., img_size=...)``) for ``size`` px.

    Built at the size its weights were made for; a learned absolute position embedding is then
    resized by this repo's one rule (MAE's ``interpolate_pos_embed``:
    :func:`util.checkpoints.pos_embed.resize_pos_embed`), not by timm's loader (which uses the antialiased
    kernel). Models without such a table (rotary embeddings) are built at ``size`` by timm.
    """
    net = build(pretrained=True)
    patch_embed = getattr(net, "patch_embed", None)
    native = getattr(patch_embed, "img_size", None)
    if native is None or tuple(native) == (size, size):
        return net
    pos = getattr(net, "pos_embed", None)
    if not isinstance(pos, torch.Tensor):
        return build(pretrained=True, img_size=size)
    resized = build(pretrained=False, img_size=size)
    prefix = 0 if getattr(net, "no_embed_class", False) else int(getattr(net, "num_prefix_tokens", 1))
    state = net.state_dict()
    state["pos_embed"] = resize_pos_embed(pos.detach(), resized.patch_embed.grid_size, prefix,
                                          old_grid=patch_embed.grid_size)
    resized.load_state_dict(state)
    return resized


def checkpoint_teacher(path: str, layer: Optional[int], loss: str, size: int, input_size: Optional[int]) -> ViTTeacher:
    """The encoder of a checkpoint this repo reads, rebuilt as a ViT for ``size`` px."""
    ckpt = read_encoder(path)
    name = f"checkpoint {path}"
    depth = ckpt.arch["depth"]
    layer = check_layer(layer, depth, name)
    # the final norm is only needed when the last block is the target (fine-tuned files may lack it)
    missing_ok = HEAD_PREFIXES + (("norm.",) if layer < depth else ())
    vit = build_from(ckpt, img_size=size, allowed_missing=missing_ok, global_pool="token")
    return ViTTeacher(vit, layer, IMAGENET_MEAN, IMAGENET_STD, loss, input_size, name, resizable=True)


def open_clip_teacher(cfg: TargetConfig, name: Optional[str], layer: Optional[int], loss: str,
                      input_size: Optional[int]) -> FrozenTeacher:
    """The CLIP image tower of the ``--clip_*`` flags (``name`` overrides ``--clip_model``) at ``layer``."""
    from open_clip.timm_model import TimmModel

    visual = load_clip_visual(cfg.clip_path, name or cfg.clip_model, cfg.clip_pretrained)
    if isinstance(visual, TimmModel):  # e.g. EVA-CLIP: a timm trunk (its head pools, so it is not used)
        mean, std = preprocess_stats(visual, CLIP_MEAN, CLIP_STD)
        return ViTTeacher(visual.trunk, layer, mean, std, loss, input_size, f"open_clip tower {name or cfg.clip_model}")
    return CLIPTeacher(visual, layer, loss, input_size)


def _is_checkpoint(spec: str) -> bool:
    return (spec.startswith(("deepmim:", "http://", "https://")) or spec.endswith(CHECKPOINT_EXTS)
            or os.path.sep in spec or os.path.isfile(spec))


def build_teacher(cfg: TargetConfig, student: Student) -> FrozenTeacher:
    """The ``teacher`` target from ``--teacher_model / --teacher_weights / --teacher_layer /
    --teacher_loss / --teacher_input_size``, built for the student's image size."""
    spec = cfg.teacher_model
    if not spec:
        raise UserError(
            "The teacher target needs --teacher_model: a timm model name (with --teacher_weights FILE), "
            "deepmim:PATH (a checkpoint of this repo, MAE or the reference DeepMIM), or open_clip (the CLIP of "
            "--clip_path / --clip_model)."
        )
    weights, layer, input_size = cfg.teacher_weights, cfg.teacher_layer, cfg.teacher_input_size
    loss = cfg.teacher_loss or "cosine"
    if spec == "open_clip" or spec.startswith("open_clip:"):
        if weights:
            raise UserError("--teacher_weights is for timm teachers; an open_clip teacher reads --clip_path / --clip_pretrained.")
        return open_clip_teacher(cfg, spec.partition(":")[2] or None, layer, loss, input_size)
    if _is_checkpoint(spec):
        if weights:
            raise UserError("--teacher_weights is for timm teachers; a checkpoint teacher's weights are the file itself.")
        path = spec[len("deepmim:"):] if spec.startswith("deepmim:") else spec
        return checkpoint_teacher(path, layer, loss, input_size or student.img_size, input_size)
    return timm_teacher(spec, weights, layer, loss, input_size or student.img_size, input_size)
