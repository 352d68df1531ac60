"""DeepMIM pre-training model: an MAE encoder with one decoder per supervised encoder layer.

Data flow of one forward pass (shapes for ViT-B/16 at 224: L = 196 patches, D = 768)::

    imgs [N, 3, H, W] -> patch embed + fixed sin-cos pos -> [N, L, D]
      -> random masking, keep int(L * (1 - r)) -> [N, L_keep, D]  (+ cls token -> [N, 1 + L_keep, D])
      -> blocks 1..depth; for each supervised layer l: feature_l [N, 1 + L_keep, D]
         (raw block output for intermediate layers, after the final norm for the last layer)
      -> decoder_l: embed -> + mask tokens -> unshuffle -> + pos -> blocks -> norm -> pred [N, L, C]
      -> loss_l = per-patch loss(pred, target) averaged over masked patches
    loss = sum_l w_l * loss_l

Mask semantics (as in MAE): ``mask`` is [N, L] with 0 = kept (visible), 1 = removed (to predict).

All N decoders are instances of one :class:`Decoder` in a ``ModuleDict`` keyed by the 1-based layer
number (``decoders.6.*``, ``decoders.12.*``); they share one fixed sin-cos position table.
Only the decoders of the supervised layers exist, so every parameter receives a gradient (DDP needs
no ``find_unused_parameters``).
"""
import math
from dataclasses import asdict, dataclass, fields
from functools import partial
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

from util.checkpoints.pos_embed import sincos_2d
from util.config.registry import VIT_ARCHS, Registry
from util.run.errors import UserError

import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint

from targets.losses import LOSSES, masked_mean

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


def default_ds_layers(depth: int) -> Tuple[int, ...]:
    """Supervised layers at 1/2, 2/3, 5/6 and all of the depth: (6, 8, 10, 12) for depth 12."""
    layers = sorted({max(1, round(depth * f)) for f in (1 / 2, 2 / 3, 5 / 6)} | {depth})
    return tuple(layers)


@dataclass
class DeepMIMConfig:
    """Everything needed to rebuild the model; stored in checkpoints as plain types.

    ``ds_layers`` are 1-based block indices; ``pred_dims`` / ``losses`` give, per supervised layer,
    the width of its target tokens and the key of its loss in ``targets.losses.LOSSES``.
    """

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    decoder_embed_dim: int = 512
    decoder_depth: int = 4
    decoder_num_heads: int = 16
    ds_layers: Tuple[int, ...] = ()
    ds_weights: Tuple[float, ...] = ()
    pred_dims: Tuple[int, ...] = ()
    losses: Tuple[str, ...] = ()
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        self.ds_layers = tuple(int(x) for x in (self.ds_layers or default_ds_layers(self.depth)))
        k = len(self.ds_layers)
        if len(set(self.ds_layers)) != k or list(self.ds_layers) != sorted(self.ds_layers):
            raise UserError(f"--ds_layers must be increasing and distinct, got {list(self.ds_layers)}")
        bad = [x for x in self.ds_layers if not 1 <= x <= self.depth]
        if bad:
            raise UserError(
                f"--ds_layers {bad} outside 1..{self.depth}: layers are 1-based block indices of this "
                f"{self.depth}-block encoder."
            )
        if self.ds_layers[-1] != self.depth:
            raise UserError(
                f"--ds_layers must include the last layer ({self.depth}); without it the last blocks "
                f"and the final norm would get no gradient. Use e.g. --ds_layers "
                f"{','.join(map(str, self.ds_layers + (self.depth,)))}."
            )
        self.ds_weights = tuple(float(w) for w in (self.ds_weights or (1.0,) * k))
        if len(self.ds_weights) != k:
            raise UserError(
                f"--ds_weights has {len(self.ds_weights)} values but --ds_layers names {k} layers; "
                f"give one weight per supervised layer."
            )
        default_dim = self.patch_size * self.patch_size * self.in_chans
        self.pred_dims = tuple(int(d) for d in (self.pred_dims or (default_dim,) * k))
        self.losses = tuple(self.losses or ("mse",) * k)
        if len(self.pred_dims) != k or len(self.losses) != k:
            raise ValueError("pred_dims and losses need one entry per supervised layer")
        unknown = [name for name in self.losses if name not in LOSSES]
        if unknown:
            raise UserError(f"Unknown loss {unknown}; valid: {sorted(LOSSES)}")
        if self.img_size % self.patch_size:
            below = self.img_size // self.patch_size * self.patch_size
            raise UserError(
                f"--input_size {self.img_size} is not a multiple of the patch size {self.patch_size}. Use e.g. "
                f"--input_size {below or self.patch_size} or {below + self.patch_size}."
            )
        for heads, width, names in ((self.num_heads, self.embed_dim, ("the encoder's num_heads", "embed_dim")),
                                    (self.decoder_num_heads, self.decoder_embed_dim,
                                     ("--decoder_num_heads", "--decoder_embed_dim"))):
            if width % heads:  # attention splits the width evenly over the heads
                divisors = [d for d in range(1, 65) if width % d == 0]
                raise UserError(
                    f"{names[0]} {heads} does not divide {names[1]} {width}: each head takes width / heads "
                    f"channels. Use one of {', '.join(map(str, divisors))}."
                )

    @property
    def grid(self) -> Tuple[int, int]:
        return (self.img_size // self.patch_size, self.img_size // self.patch_size)

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        for k in ("ds_layers", "ds_weights", "pred_dims", "losses"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "DeepMIMConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class DeepMIMOutput(NamedTuple):
    """What :meth:`DeepMIM.forward` returns.

    loss: weighted sum of the layer losses (scalar, float32).
    layer_losses: [K] float32, one per supervised layer, in ``ds_layers`` order (unweighted).
    mask: [N, L], 0 = kept, 1 = removed.
    preds: per supervised layer [N, L, C_l] predictions for every patch, or None unless asked for.
    """

    loss: torch.Tensor
    layer_losses: torch.Tensor
    mask: torch.Tensor
    preds: Optional[List[torch.Tensor]]


class Decoder(nn.Module):
    """One MAE decoder: embed -> add mask tokens -> unshuffle -> + pos -> blocks -> norm -> pred."""

    def __init__(self, embed_dim: int, dim: int, depth: int, num_heads: int, mlp_ratio: float, pred_dim: int) -> None:
        super().__init__()
        self.embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(
            [Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm) for _ in range(depth)]
        )
        self.norm = LayerNorm(dim)
        self.pred = nn.Linear(dim, pred_dim)

    def forward(self, x: torch.Tensor, ids_restore: torch.Tensor, pos_embed: torch.Tensor) -> torch.Tensor:
        """x [N, 1 + L_keep, D], ids_restore [N, L], pos_embed [1, 1 + L, Dd] -> [N, L, pred_dim]."""
        x = self.embed(x)  # [N, 1 + L_keep, Dd]
        n, num_kept, d = x.shape
        num_masked = ids_restore.shape[1] + 1 - num_kept
        patches = torch.cat([x[:, 1:], self.mask_token.expand(n, num_masked, d)], dim=1)  # [N, L, Dd]
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, d))  # unshuffle
        x = torch.cat([x[:, :1], patches], dim=1) + pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.pred(self.norm(x))[:, 1:]  # drop the cls token


class DeepMIM(nn.Module):
    """MAE encoder + one decoder per supervised encoder layer (deep supervision).

    Args:
        cfg: the model configuration (see :class:`DeepMIMConfig`).
    """

    def __init__(self, cfg: DeepMIMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        # fixed sin-cos tables: buffers, saved in the state dict under MAE's names
        self.register_buffer("pos_embed", sincos_2d(cfg.embed_dim, cfg.grid, cls_token=True)[None])
        dpr = torch.linspace(0, cfg.drop_path_rate, cfg.depth).tolist()
        self.blocks = nn.ModuleList(
            [
                Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, qkv_bias=True, norm_layer=LayerNorm, drop_path=dpr[i])
                for i in range(cfg.depth)
            ]
        )
        self.norm = LayerNorm(cfg.embed_dim)

        self.register_buffer(
            "decoder_pos_embed", sincos_2d(cfg.decoder_embed_dim, cfg.grid, cls_token=True)[None]
        )
        self.decoders = nn.ModuleDict(
            {
                str(layer): Decoder(
                    cfg.embed_dim, cfg.decoder_embed_dim, cfg.decoder_depth, cfg.decoder_num_heads, cfg.mlp_ratio, pred_dim
                )
                for layer, pred_dim in zip(cfg.ds_layers, cfg.pred_dims)
            }
        )
        self.register_buffer("ds_weights", torch.tensor(cfg.ds_weights, dtype=torch.float32), persistent=False)
        self.grad_checkpointing = False
        self.initialize_weights()

    # ----------------------------------------------------------------------------------------
    def initialize_weights(self) -> None:
        """MAE's initialisation: xavier-uniform linears (patch embed as a linear), N(0, .02) tokens."""
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        for dec in self.decoders.values():
            nn.init.normal_(dec.mask_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set:
        """Parameter names excluded from weight decay besides biases and norms (1-D params)."""
        return {"cls_token"} | {f"decoders.{k}.mask_token" for k in self.decoders}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute encoder and decoder blocks in the backward pass to save activation memory."""
        self.grad_checkpointing = enable

    @property
    def ds_layers(self) -> Tuple[int, ...]:
        return self.cfg.ds_layers

    # ----------------------------------------------------------------------------------------
    def random_masking(
        self, x: torch.Tensor, mask_ratio: float, noise: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample random masking by sorting noise: the smallest ``int(L * (1 - r))`` values stay.

        Args:
            x: [N, L, D] patch tokens.
            mask_ratio: fraction of patches removed.
            noise: optional [N, L] noise that fixes the mask (same noise, same mask).

        Returns:
            x_kept [N, L_keep, D], mask [N, L] (0 keep, 1 remove), ids_restore [N, L].
        """
        n, length, d = x.shape
        len_keep = num_kept(length, mask_ratio)
        if noise is None:
            noise = torch.rand(n, length, device=x.device)
        elif noise.shape != (n, length):
            raise ValueError(f"noise must have shape {(n, length)}, got {tuple(noise.shape)}")
        ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
        mask = torch.ones(n, length, device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return x_kept, mask, ids_restore

    def _run(self, module: nn.Module, *args: torch.Tensor) -> torch.Tensor:
        """Call ``module``, recomputing it in the backward pass under ``--grad_checkpointing``."""
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, noise: Optional[torch.Tensor] = None
    ) -> Tuple[List[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Encode the visible patches.

        Returns:
            feats: per supervised layer [N, 1 + L_keep, D] (the last one after the final norm),
            mask [N, L], ids_restore [N, L].
        """
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        feats = []
        supervised = set(self.cfg.ds_layers)
        for i, blk in enumerate(self.blocks, start=1):
            x = self._run(blk, x)
            if i in supervised and i != self.cfg.depth:
                feats.append(x)
        feats.append(self.norm(x))
        return feats, mask, ids_restore

    def forward_decoders(self, feats: Sequence[torch.Tensor], ids_restore: torch.Tensor) -> List[torch.Tensor]:
        """Run each supervised layer's decoder: list of [N, L, C_l] predictions."""
        return [
            self._run(dec, feat, ids_restore, self.decoder_pos_embed)
            for feat, dec in zip(feats, self.decoders.values())
        ]

    def forward(
        self,
        imgs: torch.Tensor,
        targets: Union[torch.Tensor, Sequence[torch.Tensor]],
        mask_ratio: float = 0.75,
        noise: Optional[torch.Tensor] = None,
        return_pred: bool = False,
    ) -> DeepMIMOutput:
        """Masked reconstruction with deep supervision.

        Args:
            imgs: [N, 3, H, W] ImageNet-normalized images.
            targets: target tokens [N, L, C] for every supervised layer, or one per layer.
            mask_ratio: fraction of patches removed.
            noise: optional [N, L] masking noise (reproducible masks).
            return_pred: also return each layer's predictions.
        """
        feats, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        preds = self.forward_decoders(feats, ids_restore)
        loss, layer_losses = self.forward_loss(preds, targets, mask)
        return DeepMIMOutput(loss, layer_losses, mask, preds if return_pred else None)

    def forward_loss(
        self, preds: Sequence[torch.Tensor], targets: Union[torch.Tensor, Sequence[torch.Tensor]], mask: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Each layer's loss averaged over the masked patches (in float32), and their weighted sum.

        Returns:
            (loss, layer_losses [K]).
        """
        k = len(self.cfg.ds_layers)
        if isinstance(targets, torch.Tensor):
            targets = [targets] * k
        if len(targets) != k:
            raise ValueError(f"expected {k} targets (one per supervised layer), got {len(targets)}")
        layer_losses = torch.stack([
            masked_mean(LOSSES[name](pred.float(), tgt.float()), mask)
            for pred, tgt, name in zip(preds, targets, self.cfg.losses)
        ])
        return (layer_losses * self.ds_weights).sum(), layer_losses


# --------------------------------------------------------------------------------------------
# registry: entry points declare hyper-parameters and call one builder

MODELS = Registry("pre-training model")

ENCODERS = VIT_ARCHS


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """Patches left visible by :meth:`DeepMIM.random_masking` (MAE's rounding: ``int(L * (1 - r))``)."""
    return int(num_patches * (1 - mask_ratio))


def check_mask_ratio(cfg: DeepMIMConfig, mask_ratio: float, model: str = "the model") -> None:
    """Refuse a mask ratio that leaves no patch visible or removes none on ``cfg``'s patch grid.

    Args:
        cfg: the model config (its grid: ``img_size // patch_size`` squared).
        mask_ratio: ``--mask_ratio``.
        model: the model's name, for the message.
    """
    rows, cols = cfg.grid
    length = rows * cols
    where = f"the {rows}x{cols} patch grid of {model} at {cfg.img_size} px"
    if length < 2:
        raise UserError(f"--input_size {cfg.img_size} gives {model} a {rows}x{cols} patch grid: masking needs at least "
                        f"2 patches (one kept, one removed). Use --input_size {2 * cfg.patch_size} or more.")
    kept = num_kept(length, mask_ratio)
    if 1 <= kept <= length - 1:
        return
    top = math.floor((1 - 1 / length) * 1000) / 1000  # the largest 3-decimal ratio that keeps a patch
    while num_kept(length, top) < 1:
        top -= 0.001
    raise UserError(
        f"--mask_ratio {mask_ratio:g} keeps {kept} of the {length} patches of {where}: "
        f"{'no patch would stay visible' if kept < 1 else 'no patch would be masked'}. "
        f"Use 0 < --mask_ratio <= {top:.3f} (MAE: 0.75)."
    )


def _entry(size: str, patch_size: int, **defaults: Any):
    """An entry point: the encoder size, patch size and defaults; keyword overrides win (None = keep)."""

    def config(**overrides: Any) -> DeepMIMConfig:
        cfg = {**ENCODERS[size], "patch_size": patch_size, **defaults}
        cfg.update({k: v for k, v in overrides.items() if v is not None})
        return DeepMIMConfig(**cfg)

    config.__doc__ = f"DeepMIM ViT-{size}/{patch_size} ({ENCODERS[size]})."
    return config


for _size in ENCODERS:
    for _patch in (16, 14):
        MODELS.register(_entry(_size, _patch), f"deepmim_vit_{_size}_patch{_patch}")
# the reference README launches DeepMIM with MAE's model names: they build the same model
MODELS.register(_entry("base", 16), "mae_vit_base_patch16")
MODELS.register(_entry("large", 16), "mae_vit_large_patch16")
MODELS.register(_entry("huge", 14), "mae_vit_huge_patch14")
# MAE's published recipe as the baseline: one decoder, on the last layer, 512 wide, 8 blocks, 16 heads
# (MAE's models_mae.py names it mae_vit_base_patch16_dec512d8b); --ds_layers 12 alone keeps this repo's
# 4-block decoder, a lighter baseline than MAE's
MAE_RECIPES: Tuple[str, ...] = ()
for _size, _patch in (("base", 16), ("large", 16), ("huge", 14)):
    _mae = _entry(_size, _patch, ds_layers=(ENCODERS[_size]["depth"],), decoder_embed_dim=512, decoder_depth=8,
                  decoder_num_heads=16)
    _mae.__doc__ = f"MAE ViT-{_size}/{_patch} with MAE's published decoder (512 wide, 8 blocks, 16 heads, last layer)."
    for _name in (f"mae_vit_{_size}_patch{_patch}_dec8", f"mae_vit_{_size}_patch{_patch}_dec512d8b"):
        MODELS.register(_mae, _name)
        MAE_RECIPES += (_name,)
# for the built-in 32x32 data: patch 4 (8x8 grid), depth 12 so that layers 6/8/10/12 mean what they
# mean in ViT-B, and a small decoder so that the CPU demo stays quick
MODELS.register(
    _entry("tiny", 4, img_size=32, decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4),
    "deepmim_vit_tiny_patch4",
)


def model_config(name: str, **overrides: Any) -> DeepMIMConfig:
    """The config of a registered model; unknown names raise an error that lists the valid ones."""
    return MODELS.get(name)(**overrides)


def create_model(name: str, **overrides: Any) -> DeepMIM:
    """Build a registered model by name (``None`` overrides keep the model's defaults)."""
    return DeepMIM(model_config(name, **overrides))


def model_from_config(cfg: Union[DeepMIMConfig, Dict[str, Any]]) -> DeepMIM:
    """Rebuild a model from the config stored in a checkpoint (``checkpoint['model_cfg']``)."""
    return DeepMIM(cfg if isinstance(cfg, DeepMIMConfig) else DeepMIMConfig.from_dict(cfg))
