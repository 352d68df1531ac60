"""DeepMIM pre-training (MAE's command line, plus deep supervision).

    python main_pretrain.py --data_path digits --model deepmim_vit_tiny_patch4 --epochs 10   # CPU demo
    torchrun --nproc_per_node 8 main_pretrain.py --model mae_vit_base_patch16 \
        --clip_path ViT-B-16.pt --batch_size 128 --epochs 1600 --blr 1.5e-4 --data_path /imagenet
"""
import argparse
import dataclasses
import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from util.config.cli import (
    Parser,
    add_optim_args,
    add_run_args,
    add_training_args,
    increasing,
    mask_fraction,
    nonneg_float,
    nonneg_int,
    positive_int,
    positive_sum,
    set_help,
    str2list,
)
from util.config.typed import (
    MODEL,
    FlagConfig,
    ScriptConfig,
    add_flags,
    check_schedule,
    flag,
)
from util.data.build import build_train_data, check_pretrain_data
from util.data.datasets import pretrain_transform
from util.run.amp import make_scaler
from util.run.errors import run_cli
from util.run.logs import WandB
from util.run.lr_sched import cosine_schedule
from util.run.optim import adamw, weight_decay_groups
from util.run.runner import Run, start_run
from util.run.trainer import Trainer, epoch_trainer_config

import torch

import models_deepmim
from engine_monitor import MonitorConfig, add_monitor_args, build_monitor
from engine_pretrain import PretrainJob
from targets.base import Target, TargetConfig, describe_targets
from targets.registry import TARGETS, build_targets, layer_target_names

_log = logging.getLogger("main_pretrain")


@dataclass(frozen=True)
class ModelFlags(FlagConfig):
    """The model flags of pre-training (None: the registered model's default)."""

    model: str = flag("deepmim_vit_base_patch16", "registered model name (mae_vit_base_patch16 builds the same DeepMIM "
                                                  "model)", group=MODEL, type=str, metavar="MODEL")
    input_size: Optional[int] = flag(None, "image size, a multiple of the patch size (default: the model's, 224 or 32)",
                                     group=MODEL, type=positive_int, metavar="PX")
    mask_ratio: float = flag(0.75, "fraction of patches removed; at least one patch must stay and one be removed",
                             group=MODEL, type=mask_fraction, metavar="R")
    ds_layers: Optional[Tuple[int, ...]] = flag(
        None, "supervised encoder layers, 1-based, increasing, ending with the last (default: 6,8,10,12 for depth 12); "
              "12 alone = MAE", group=MODEL, type=str2list(positive_int, increasing), metavar="LAYERS")
    ds_weights: Optional[Tuple[float, ...]] = flag(
        None, "loss weight per supervised layer, >= 0 with a positive sum (default: 1 each)", group=MODEL,
        type=str2list(nonneg_float, positive_sum), metavar="WEIGHTS")
    decoder_embed_dim: Optional[int] = flag(None, "decoder width (default: the model's, 512)", group=MODEL,
                                            type=positive_int, metavar="DIM")
    decoder_depth: Optional[int] = flag(None, "decoder blocks (default: the model's, 4)", group=MODEL, type=nonneg_int,
                                        metavar="N")
    decoder_num_heads: Optional[int] = flag(None, "decoder heads, dividing the decoder width (default: the model's, 16)",
                                            group=MODEL, type=positive_int, metavar="N")

    def model_config(self) -> models_deepmim.DeepMIMConfig:
        return models_deepmim.model_config(
            self.model, img_size=self.input_size, ds_layers=self.ds_layers, ds_weights=self.ds_weights,
            decoder_embed_dim=self.decoder_embed_dim, decoder_depth=self.decoder_depth,
            decoder_num_heads=self.decoder_num_heads)


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser("main_pretrain.py", "DeepMIM pre-training: MAE with a decoder on several encoder layers")
    add_training_args(p, batch_size=64, epochs=400)

    add_flags(p, [ModelFlags], [f.name for f in dataclasses.fields(ModelFlags)])
    t = p.add_argument_group("reconstruction targets", "what the decoders reconstruct (docs/PRETRAIN.md: Reconstruction targets)")
    t.add_argument("--target", default=None, choices=TARGETS.names(),
                   help="the target of every supervised layer: pixel (MAE), hog (MaskFeat), clip (--clip_path), "
                        "teacher (--teacher_model). Default: clip when --clip_path / --clip_model is given, else pixel")
    t.add_argument("--ds_targets", default=None, type=str2list(str), metavar="NAMES",
                   help="one target per --ds_layers entry instead, e.g. pixel,pixel,clip,clip; each distinct "
                        "target runs once per step (default: --target for every layer)")
    t.add_argument("--norm_pix_loss", action="store_true", help="pixel target: normalize each patch by its mean and std")
    t.add_argument("--clip_path", default=None, type=str, metavar="FILE",
                   help="clip target: OpenAI's ViT-B-16.pt, a visual.* state dict or an open_clip checkpoint "
                        "(default: none)")
    t.add_argument("--clip_model", default=None, type=str, metavar="NAME",
                   help="clip target: open_clip model name (default: read off the --clip_path weights)")
    t.add_argument("--clip_pretrained", default=None, type=str, metavar="TAG",
                   help="clip target: open_clip pretrained tag, downloaded when online (default: none)")
    t.add_argument("--teacher_model", default=None, type=str, metavar="SPEC",
                   help="teacher target: a timm model name (weights: --teacher_weights), deepmim:PATH (a checkpoint "
                        "of this repo / MAE / the reference DeepMIM: its encoder), or open_clip[:NAME] (the CLIP of "
                        "the --clip_* flags at any layer) (default: none)")
    t.add_argument("--teacher_weights", default=None, type=str, metavar="FILE",
                   help="teacher target: local weights of the timm model (default: timm downloads them when online)")
    t.add_argument("--teacher_layer", default=None, type=positive_int, metavar="K",
                   help="teacher target: 1-based teacher block whose tokens are reconstructed (default: the last, "
                        "after its final norm)")
    t.add_argument("--teacher_loss", default="cosine", choices=["cosine", "smooth_l1"],
                   help="teacher target: loss (smooth_l1 on tokens standardized per token)")
    t.add_argument("--teacher_input_size", default=None, type=positive_int, metavar="PX",
                   help="teacher target: resize the images to this side for a teacher with another patch size "
                        "(grid x teacher patch, e.g. 196 for a /14 teacher and a /16 student at 224; default: no resize)")
    add_optim_args(p, blr=1.5e-4, weight_decay=0.05, warmup_epochs=40)
    add_run_args(p)
    set_help(p, compile="torch.compile the model (and each frozen target network, separately)")
    add_monitor_args(p)
    return p


@dataclass(frozen=True)
class PretrainConfig(ScriptConfig):
    """Everything pre-training reads, built once from the flags (:meth:`from_args`)."""

    model: ModelFlags
    targets: TargetConfig
    monitor: MonitorConfig

    def validate(self) -> List[str]:
        """The cross-flag checks, before anything is built or written (the per-flag ranges are the
        parser's, ``util/config/cli.py``): the model config (name, ``--ds_layers`` / ``--ds_weights``,
        ``--input_size``, heads dividing widths), the mask ratio on its patch grid, the targets'
        names, the data folder, the monitor's flags and the schedule. Returns warnings for
        ``start_run`` to log."""
        cfg = self.model.model_config()  # cheap: a dataclass, no weights
        models_deepmim.check_mask_ratio(cfg, self.model.mask_ratio, self.model.model)
        layer_target_names(self.targets, len(cfg.ds_layers), cfg.ds_layers)
        check_pretrain_data(self.train.data_path)  # labels optional: pre-training never reads one
        self.monitor.validate(self.train.data_path, cfg.depth)
        return check_schedule(self.train, self.optim)


def build_model_and_targets(model: ModelFlags, targets_cfg: TargetConfig, device: torch.device,
                            amp_dtype: Optional[torch.dtype], compile: bool = False
                            ) -> Tuple[models_deepmim.DeepMIMConfig, Dict[str, Target], List[str]]:
    """The model config and the targets the flags ask for (targets on ``device``, frozen, in the amp dtype).

    The config comes first because the targets need its patch grid; then the decoders' prediction
    widths and losses come from the targets.
    """
    cfg = model.model_config()
    targets, layer_targets = build_targets(targets_cfg, cfg.grid, cfg.img_size, cfg.patch_size, len(cfg.ds_layers),
                                           cfg.ds_layers)
    cfg = dataclasses.replace(cfg, pred_dims=tuple(targets[n].dim for n in layer_targets),
                              losses=tuple(targets[n].loss for n in layer_targets))
    for t in targets.values():
        t.to(device=device, dtype=amp_dtype or torch.float32)
    if compile:  # the frozen teacher is compiled on its own (inference graph)
        targets = {name: torch.compile(t) for name, t in targets.items()}
    return cfg, targets, layer_targets


def main(args: argparse.Namespace) -> dict:
    cfg = PretrainConfig.from_args(args)
    warnings = cfg.validate()  # a bad combination of flags stops here: nothing written yet
    with start_run(cfg.run, warnings) as run:
        return pretrain(run, cfg)


def pretrain(run: Run, c: PretrainConfig) -> dict:
    device, amp_dtype, train = run.device, run.amp_dtype, c.train
    cfg, targets, layer_targets = build_model_and_targets(c.model, c.targets, device, amp_dtype, train.compile)

    data = build_train_data(train.data_path, pretrain_transform(cfg.img_size, train.decode), train.batch_size,
                            run.info.rank, run.info.world_size, c.run.seed, train.num_workers,
                            train.pin_mem and device.type == "cuda", train.shuffle_buffer, device, labels=False)

    model = models_deepmim.DeepMIM(cfg).to(device)
    eff_batch = train.batch_size * train.accum_iter * run.info.world_size
    optim = c.optim.resolved(eff_batch)
    optimizer = adamw(weight_decay_groups(model, optim.weight_decay), optim.lr, betas=(0.9, 0.95), device=device,
                      fused=optim.fused_adamw)
    scaler = make_scaler(device, amp_dtype)
    mon = c.monitor.resolved(train.data_path, data.num_samples)
    # the resolved choice, as plain types in config.json and the checkpoints' args
    saved = run.resolved_args(c.flags, input_size=cfg.img_size, ds_layers=list(cfg.ds_layers),
                              ds_weights=list(cfg.ds_weights), ds_targets=list(layer_targets),
                              target=layer_targets[0] if len(set(layer_targets)) == 1 else None, lr=optim.lr,
                              knn_every=mon.knn_every, recon_every=mon.recon_every)
    if mon.wandb and run.is_main:
        run.tb.attach(WandB(mon.wandb_project, mon.wandb_name, saved, run.out_dir))
    monitor = build_monitor(run, model, targets, layer_targets, mon, c.model.mask_ratio, c.run.seed, train.num_workers)
    job = PretrainJob(model, optimizer, scaler, targets, layer_targets, c.model.mask_ratio,
                      cosine_schedule(optim.lr, optim.min_lr, optim.warmup_epochs, train.epochs,
                                      data.steps_per_epoch), monitor)
    trainer = Trainer(run, job, data, epoch_trainer_config(train, c.run.seed, data.steps_per_epoch), saved,
                      config_extra={"model_cfg": cfg.to_dict()})

    _log.info("model %s: %s", c.model.model, cfg.to_dict())
    _log.info("targets: %s", describe_targets(targets, layer_targets))
    _log.info("%d training images; effective batch %d; lr %.3e (blr %.3e); amp %s; %d iterations/epoch",
              data.num_samples, eff_batch, optim.lr, optim.lr * 256 / eff_batch, amp_dtype, data.steps_per_epoch)
    return trainer.fit()


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
