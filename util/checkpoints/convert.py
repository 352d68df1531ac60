"""Weight adaptation, in one place: reading weights from anywhere, key renames between layouts,
head removal and position-embedding resizing (timm's ``checkpoint_filter_fn`` idea).

Layouts this module knows:

* **ours** (``models_deepmim``): encoder under MAE/timm names, decoders as ``decoders.{layer}.{embed,
  mask_token, blocks.j, norm, pred}`` plus one shared ``decoder_pos_embed``;
* **reference DeepMIM release**: ``decoder_embed{k}``, ``mask_token{k}``, ``decoder_blocks{k}.{j}``,
  ``decoder_norm{k}``, ``decoder_pred{k}`` for k = 1..N (the supervised layers in order) and one
  ``decoder_pos_embed``;
* **MAE release**: one decoder named ``decoder_embed``, ``mask_token``, ``decoder_blocks.{j}``,
  ``decoder_norm``, ``decoder_pred`` (the last layer's);
* **timm / encoder-only**: the encoder alone (``cls_token``, ``pos_embed``, ``patch_embed.proj``,
  ``blocks``, ``norm`` / ``fc_norm``, ``head``); ``backbone.`` / ``module.`` / ``encoder.`` prefixes
  are removed.
"""
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from util.checkpoints.pos_embed import resize_pos_embed
from util.checkpoints.reader import read_checkpoint
from util.config.registry import vit_heads
from util.run.errors import UserError

import torch
from torch import nn

_log = logging.getLogger(__name__)

ENCODER_PREFIXES = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.", "fc_norm.", "head.")
HEAD_PREFIXES = ("head.", "fc_norm.")
WRAPPER_PREFIXES = ("module.", "backbone.", "encoder.", "_orig_mod.")
REF_DECODER = re.compile(r"^(decoder_embed|mask_token|decoder_blocks|decoder_norm|decoder_pred)(\d+)(\..*)?$")
MAE_DECODER = re.compile(r"^(decoder_embed|mask_token|decoder_blocks|decoder_norm|decoder_pred)(\..*)?$")
OUR_DECODER = re.compile(r"^decoders\.(\d+)\.(embed|mask_token|blocks|norm|pred)(\..*)?$")
_REF_TO_OURS = {"decoder_embed": "embed", "mask_token": "mask_token", "decoder_blocks": "blocks",
                "decoder_norm": "norm", "decoder_pred": "pred"}
_OURS_TO_REF = {v: k for k, v in _REF_TO_OURS.items()}


# --------------------------------------------------------------------------------------------
# reading


def read_state_dict(source: str, sha256: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """Tensors of a checkpoint (any source :func:`util.checkpoints.reader.read_checkpoint` reads), unwrapped from
    ``{'model': ...}`` / ``{'state_dict': ...}`` / ``{'module': ...}`` and wrapper prefixes."""
    return state_dict_of(read_checkpoint(source, sha256), source)


def state_dict_of(obj: Any, source: str) -> Dict[str, torch.Tensor]:
    """The tensors of a loaded checkpoint object (see :func:`read_state_dict`)."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "module", "model_ema"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not any(torch.is_tensor(v) for v in obj.values()):
        raise UserError(f"{source} does not hold a state dict of tensors.")
    sd = {}
    for k, v in obj.items():
        if not torch.is_tensor(v):
            continue
        for p in WRAPPER_PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
        sd[k] = v
    return sd


def model_state_of(obj: Any, source: str) -> Dict[str, torch.Tensor]:
    """The weights a model was saved with: a checkpoint's ``'model'`` entry key for key (a linear
    probe's ``encoder.*`` names stay), else :func:`state_dict_of` (released files of other layouts)."""
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        return {k: v for k, v in obj["model"].items() if torch.is_tensor(v)}
    return state_dict_of(obj, source)


def layout(sd: Dict[str, torch.Tensor]) -> str:
    """``'ours'``, ``'reference'``, ``'mae'``, ``'encoder'`` or ``'unknown'`` for a state dict."""
    has_encoder = "patch_embed.proj.weight" in sd and any(k.startswith("blocks.") for k in sd)
    if not has_encoder:
        return "unknown"
    if any(OUR_DECODER.match(k) for k in sd):
        return "ours"
    if any(REF_DECODER.match(k) for k in sd):
        return "reference"
    if any(MAE_DECODER.match(k) for k in sd):
        return "mae"
    return "encoder"


def require_layout(sd: Dict[str, torch.Tensor], allowed: Sequence[str], source: str) -> str:
    kind = layout(sd)
    if kind not in allowed:
        sample = ", ".join(list(sd)[:6])
        raise UserError(
            f"{source} is not a {' / '.join(allowed)} checkpoint (found the {kind} layout; keys {sample}, ...)."
        )
    return kind


# --------------------------------------------------------------------------------------------
# key renames between layouts


def reference_to_ours(sd: Dict[str, torch.Tensor], ds_layers: Sequence[int]) -> Dict[str, torch.Tensor]:
    """Reference DeepMIM (``decoder_embed{k}``...) or MAE (one decoder) keys -> ours."""
    out = {}
    for k, v in sd.items():
        m = REF_DECODER.match(k)
        if m:
            kind, idx, rest = m.group(1), int(m.group(2)), m.group(3) or ""
            if not 1 <= idx <= len(ds_layers):
                raise UserError(f"decoder {idx} in the checkpoint but --ds_layers names {len(ds_layers)} layers")
            out[f"decoders.{ds_layers[idx - 1]}.{_REF_TO_OURS[kind]}{rest}"] = v
            continue
        m = MAE_DECODER.match(k)
        if m:
            out[f"decoders.{ds_layers[-1]}.{_REF_TO_OURS[m.group(1)]}{m.group(2) or ''}"] = v
            continue
        out[k] = v
    return out


def ours_to_reference(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Ours -> the reference release's numbered decoder names (k = 1..N in layer order)."""
    layers = sorted({int(m.group(1)) for k in sd if (m := OUR_DECODER.match(k))})
    index = {layer: i + 1 for i, layer in enumerate(layers)}
    out = {}
    for k, v in sd.items():
        m = OUR_DECODER.match(k)
        if m:
            out[f"{_OURS_TO_REF[m.group(2)]}{index[int(m.group(1))]}{m.group(3) or ''}"] = v
        else:
            out[k] = v
    return out


def encoder_only(sd: Dict[str, torch.Tensor], keep_head: bool = True) -> Dict[str, torch.Tensor]:
    """The encoder's tensors (drops decoders, mask tokens, decoder position table)."""
    prefixes = ENCODER_PREFIXES if keep_head else tuple(p for p in ENCODER_PREFIXES if p not in HEAD_PREFIXES)
    return {k: v for k, v in sd.items() if k.startswith(prefixes)}


def infer_encoder_config(sd: Dict[str, torch.Tensor]) -> Dict[str, int]:
    """Encoder shape from the tensors: width, depth, patch size, image size (square grid)."""
    width, _, patch, _ = sd["patch_embed.proj.weight"].shape
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    grid = round((sd["pos_embed"].shape[1] - 1) ** 0.5)
    return dict(embed_dim=width, depth=depth, patch_size=patch, img_size=grid * patch)


@dataclass
class EncoderFile:
    """A checkpoint read for its encoder: the tensors, what else the file holds, the shapes."""

    source: str
    state: Dict[str, torch.Tensor]  # unwrapped tensors, any of the layouts above
    meta: Dict[str, Any] = field(default_factory=dict)  # the file's other entries (args, model_cfg, epoch, ...)
    layout: str = "encoder"
    arch: Dict[str, int] = field(default_factory=dict)  # embed_dim, depth, patch_size, img_size (from the weights)

    @property
    def saved_args(self) -> Dict[str, Any]:
        args = self.meta.get("args")
        return dict(args) if isinstance(args, dict) else {}

    @property
    def model_cfg(self) -> Dict[str, Any]:
        cfg = self.meta.get("model_cfg")
        return dict(cfg) if isinstance(cfg, dict) else {}


def read_encoder(source: str, sha256: Optional[str] = None) -> EncoderFile:
    """Read any checkpoint that holds a ViT encoder (every layout above); refuse anything else."""
    obj = read_checkpoint(source, sha256)
    sd = state_dict_of(obj, source)
    kind = require_layout(sd, ("ours", "reference", "mae", "encoder"), repr(source))
    meta = {k: v for k, v in obj.items() if not isinstance(v, dict) or k in ("args", "model_cfg")} \
        if isinstance(obj, dict) else {}
    return EncoderFile(source, sd, meta, kind, infer_encoder_config(sd))


# --------------------------------------------------------------------------------------------
# loading an encoder into a ViT for fine-tuning / probing / segmentation


def adapt_to_vit(sd: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """checkpoint_filter_fn: encoder keys only, pos-embed resized to the model's grid, and a head /
    fc_norm whose shape differs from the model's dropped (it is re-initialised)."""
    sd = encoder_only(sd)
    target = model.state_dict()
    if "pos_embed" in sd and "pos_embed" in target and sd["pos_embed"].shape != target["pos_embed"].shape:
        grid = model.patch_embed.grid_size
        old = sd["pos_embed"].shape
        sd["pos_embed"] = resize_pos_embed(sd["pos_embed"], grid, num_prefix_tokens=1)
        _log.info("position embedding resized from %s to %s", tuple(old), tuple(sd["pos_embed"].shape))
    for k in [k for k in sd if k.startswith(HEAD_PREFIXES)]:
        if k in target and target[k].shape != sd[k].shape:
            _log.warning("%s has shape %s in the checkpoint but %s in the model (another class count): it starts "
                         "from a new initialisation", k, tuple(sd[k].shape), tuple(target[k].shape))
        if k not in target or target[k].shape != sd[k].shape:
            del sd[k]
    return sd


def load_encoder(model: nn.Module, source: str, sha256: Optional[str] = None,
                 allowed_missing: Tuple[str, ...] = HEAD_PREFIXES) -> Tuple[List[str], List[str]]:
    """Load a pre-trained encoder from any supported source into ``model`` (non-strict, checked).

    Every model key must be present in the checkpoint except those starting with
    ``allowed_missing`` (the head and ``fc_norm``): a missing encoder weight would silently stay
    random, so it stops the run instead. :func:`load_encoder_state` takes tensors already read.

    Returns:
        (missing, unexpected) key lists, also logged.
    """
    return load_encoder_state(model, read_state_dict(source, sha256), source, allowed_missing)


def load_encoder_state(model: nn.Module, sd: Dict[str, torch.Tensor], source: str,
                       allowed_missing: Tuple[str, ...] = HEAD_PREFIXES) -> Tuple[List[str], List[str]]:
    """:func:`load_encoder` for a state dict already read from ``source``."""
    require_layout(sd, ("ours", "reference", "mae", "encoder"), repr(source))
    sd = adapt_to_vit(sd, model)
    target = model.state_dict()
    shapes = [k for k, v in sd.items() if k in target and target[k].shape != v.shape]
    if shapes:
        raise UserError(f"{source} does not fit the model (pick the --model that matches the checkpoint): "
                        f"{describe_mismatch(target, sd, keys=False)}")
    result = model.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(allowed_missing)]
    if missing:
        raise UserError(
            f"{source} lacks {len(missing)} encoder weight(s) of this model: {', '.join(missing)}; refusing to start "
            f"from a partly random encoder. Check --model against the checkpoint."
        )
    _log.info("loaded %s: missing %s, unexpected %s", source, result.missing_keys, result.unexpected_keys)
    return list(result.missing_keys), list(result.unexpected_keys)


def describe_mismatch(model_sd: Dict[str, torch.Tensor], file_sd: Dict[str, torch.Tensor], keys: bool = True) -> str:
    """Every difference between a model's state dict and a file's, uncut: missing and unexpected keys
    (with ``keys``) and every shape difference (``key has shape (file) but the model expects (model)``)."""
    parts = []
    if keys:
        missing = [k for k in model_sd if k not in file_sd]
        unexpected = [k for k in file_sd if k not in model_sd]
        if missing:
            parts.append(f"missing from the file ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            parts.append(f"not in the model ({len(unexpected)}): {', '.join(unexpected)}")
    shapes = [f"{k} has shape {tuple(v.shape)} but the model expects {tuple(model_sd[k].shape)}" for k, v in file_sd.items()
              if k in model_sd and tuple(model_sd[k].shape) != tuple(v.shape)]
    if shapes:
        parts.append(f"{len(shapes)} other shape(s): {'; '.join(shapes)}")
    return ". ".join(parts) + "." if parts else "no difference."


def load_model_state(model: nn.Module, sd: Dict[str, torch.Tensor], source: str) -> bool:
    """Load a training checkpoint's weights into ``model`` strictly; every difference is named.

    A pre-training model of this repo (it has ``decoders``) also takes the reference DeepMIM's and
    MAE's decoder names, renamed on the way in. Returns whether the file was in the model's own
    layout (only then does its optimizer state belong to these parameters).
    """
    target = model.state_dict()
    own = True
    if any(k.startswith("decoders.") for k in target) and layout(sd) in ("reference", "mae"):
        layers = sorted({int(k.split(".")[1]) for k in target if k.startswith("decoders.")})
        sd, own = reference_to_ours(sd, layers), False
    if set(sd) != set(target) or any(tuple(sd[k].shape) != tuple(v.shape) for k, v in target.items()):
        raise UserError(
            f"Checkpoint {source} was written for a different model or flags ({describe_mismatch(target, sd)}) "
            f"Pass the flags it was trained with, or use a fresh --output_dir."
        )
    model.load_state_dict(sd, strict=True)
    return own


# --------------------------------------------------------------------------------------------
# rebuilding a pre-training config from weights alone (for converted reference / MAE releases)

def infer_pretrain_config(sd: Dict[str, torch.Tensor], num_heads: Optional[int] = None,
                          decoder_num_heads: Optional[int] = None) -> Dict[str, Any]:
    """A ``DeepMIMConfig`` dict for a state dict in our layout (heads cannot be read off weights:
    the standard ViT head count for the width, or ``num_heads``; decoders default to 16 heads)."""
    enc = infer_encoder_config(sd)
    layers = sorted({int(m.group(1)) for k in sd if (m := OUR_DECODER.match(k))})
    first = f"decoders.{layers[0]}"
    dec_dim = sd[f"{first}.embed.weight"].shape[0]
    dec_depth = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith(f"{first}.blocks."))
    pred_dims = [sd[f"decoders.{layer}.pred.weight"].shape[0] for layer in layers]
    pixel_dim = enc["patch_size"] ** 2 * 3
    return dict(
        **enc, num_heads=num_heads or vit_heads(enc["embed_dim"]),
        decoder_embed_dim=dec_dim, decoder_depth=dec_depth, decoder_num_heads=decoder_num_heads or 16,
        ds_layers=layers, pred_dims=pred_dims, losses=["mse" if d == pixel_dim else "cosine" for d in pred_dims],
    )


# --------------------------------------------------------------------------------------------
# export to detectron2's ViTDet layout (projects/ViTDet; detectron2/modeling/backbone/vit.py)

D2_VIT_PREFIX = "backbone.net."
# a block's tensors under detectron2's names, which are MAE's / timm's (ViTDet adds attn.rel_pos_h / _w)
D2_BLOCK_KEYS = ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
                 "attn.rel_pos_h", "attn.rel_pos_w", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                 "mlp.fc2.weight", "mlp.fc2.bias")


def to_detectron2_vitdet(sd: Dict[str, torch.Tensor], source: str = "the checkpoint") -> Dict[str, torch.Tensor]:
    """An encoder of any layout above, or a ViTDet detector of this repo (``Detection/``), as the state
    dict of detectron2's ViTDet (``backbone.net.*``; for a detector also ``backbone.simfp_*``).

    * Encoder: ``patch_embed.proj.*``, ``pos_embed`` (kept whole, cls row included: detectron2's ViT
      with ``pretrain_use_cls_token=True`` stores it so and resizes it to the input each forward) and
      the blocks. ``cls_token``, the final ``norm``, ``fc_norm``, ``head`` and the decoders are dropped:
      detectron2's ViT has none of them. The relative position tables are absent, as from any
      pre-trained encoder: detectron2 starts them at zero.
    * Detector (``state_dict_of`` has stripped its ``backbone.`` prefix: ``net.*``, ``simfp_*``): the
      ViT with its relative position tables and the pyramid (detectron2's module names), not the
      torchvision heads (their layout differs).

    A block tensor detectron2's ViT has no place for (layer scale, separate q / v biases) stops with
    its name rather than being dropped silently.
    """
    if any(k.startswith("net.") for k in sd):
        return {f"backbone.{k}": v for k, v in sd.items() if k.startswith(("net.", "simfp_"))}
    require_layout(sd, ("ours", "reference", "mae", "encoder"), source)
    enc = encoder_only(sd, keep_head=False)
    out = {}
    for k, v in enc.items():
        if k in ("cls_token", "norm.weight", "norm.bias"):
            continue
        if k.startswith("blocks.") and k.split(".", 2)[2] not in D2_BLOCK_KEYS:
            raise UserError(f"{source} has {k}, which detectron2's ViT has no place for (it has "
                            f"{', '.join(D2_BLOCK_KEYS)} per block); it cannot be exported to ViTDet.")
        out[D2_VIT_PREFIX + k] = v
    return out
