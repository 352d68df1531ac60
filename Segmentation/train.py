"""Semantic segmentation (ADE20K): UperNet on the pre-trained ViT, trained by iteration; ``--eval``.

    # the reference recipe: 8 GPUs x 2 images, 160k iterations, sliding-window evaluation
    torchrun --nproc_per_node 8 Segmentation/train.py --data_path /data/ADEChallengeData2016 \
        --model vit_base_patch16 --finetune ./output_dir/checkpoint-1599.pth --output_dir ./out_seg
    # evaluate a checkpoint (add --aug_test for multi-scale + flip)
    python Segmentation/train.py --eval --resume ./out_seg/checkpoint-160000.pth \
        --data_path /data/ADEChallengeData2016
    # CPU demo on the built-in synthetic data: make seg-demo (Segmentation/demo.py)

See Segmentation/README.md for the recipe, the metric definitions and the mmseg export.
"""
import argparse
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from util.checkpoints import convert
from util.checkpoints import reader as ckpt_util
from util.config.cli import (
    OrderedPair,
    Parser,
    add_adamw_args,
    add_run_args,
    add_weights_args,
    increasing,
    nonneg_float,
    nonneg_int,
    positive_float,
    positive_int,
    probability,
    rate,
    set_help,
    share,
    str2list,
)
from util.config.typed import FlagConfig, RunConfig, TrainConfig, flag_dict
from util.data.datasets import eval_loader
from util.run.amp import make_scaler
from util.run.errors import run_cli
from util.run.logs import fmt_seconds
from util.run.lr_sched import poly_schedule
from util.run.optim import adamw, layer_decay_groups
from util.run.runner import Run, start_run
from util.run.trainer import Commit, Job, Trainer, TrainerConfig

import torch
from torch import nn

from Segmentation import data
from Segmentation.inference import AUG_RATIOS, InferenceConfig, check_inference, evaluate
from Segmentation.metrics import format_table, summarize
from Segmentation.models import (
    SegConfig,
    Segmentor,
    ViTBackbone,
    load_pretrained,
    pixel_accuracy,
    seg_cross_entropy,
)

_log = logging.getLogger("Segmentation.train")

def get_args_parser() -> argparse.ArgumentParser:
    p = Parser("Segmentation/train.py", "DeepMIM semantic segmentation: UperNet on the ViT (ADE20K)")
    g = p.add_argument_group("training")
    g.add_argument("--batch_size", default=2, type=positive_int, metavar="N",
                   help="images per GPU (reference: 2 x 8 GPUs = 16)")
    g.add_argument("--iters", default=160000, type=positive_int, metavar="N", help="training iterations (optimizer steps)")

    m = p.add_argument_group("model")
    m.add_argument("--model", default="vit_base_patch16", help="registered ViT name (models_vit)")
    m.add_argument("--num_classes", default=None, type=positive_int, metavar="N",
                   help="classes after reduce_zero_label (default: the dataset's; 150 for ADE20K)")
    m.add_argument("--out_indices", default=None, type=str2list(positive_int, increasing), metavar="LAYERS",
                   help="4 increasing 1-based blocks feeding strides 4,8,16,32 (default: depth/3, /2, 2/3, 1: "
                        "4,6,8,12 for ViT-B)")
    m.add_argument("--drop_path", default=0.1, type=rate, help="drop path rate")
    m.add_argument("--no_rel_pos_bias", action="store_false", dest="rel_pos_bias",
                   help="no relative position bias (the reference uses one per block)")
    m.add_argument("--init_values", default=1.0, type=nonneg_float, help="layer scale initial value (0: no layer scale)")
    m.add_argument("--channels", default=768, type=positive_int, metavar="N", help="UPerHead channels")
    m.add_argument("--pool_scales", default=(1, 2, 3, 6), type=str2list(positive_int), metavar="SCALES",
                   help="PPM pooling scales")
    m.add_argument("--aux_channels", default=256, type=positive_int, metavar="N", help="auxiliary FCN head channels")
    m.add_argument("--aux_weight", default=0.4, type=nonneg_float, help="auxiliary loss weight (0: no auxiliary head)")
    m.add_argument("--dropout_ratio", default=0.1, type=rate, help="dropout before the classifiers")

    o = p.add_argument_group("optimizer and schedule")
    o.add_argument("--lr", default=5e-5, type=positive_float, metavar="LR",
                   help="AdamW learning rate for the total batch (DeepMIM's 5e-5; MAE's recipe: 1e-4 with --layer_decay 0.65)")
    o.add_argument("--warmup_iters", default=1500, type=nonneg_int, metavar="N", help="linear warm-up iterations")
    o.add_argument("--warmup_ratio", default=1e-6, type=probability, help="lr factor at iteration 0 of the warm-up")
    o.add_argument("--power", default=1.0, type=nonneg_float, help="poly schedule power")
    o.add_argument("--min_lr", default=0.0, type=nonneg_float, metavar="LR", help="lr at the last iteration")
    add_adamw_args(o, weight_decay=0.05, layer_decay=0.9)

    e = add_weights_args(p)
    e.add_argument("--eval", action="store_true", help="only evaluate --resume (default: newest in --output_dir)")
    e.add_argument("--mode", default="slide", choices=["slide", "whole"],
                   help="test mode: sliding windows of --crop_size every --stride pixels, or the whole image")
    e.add_argument("--stride", default=341, type=positive_int, metavar="PX",
                   help="sliding-window stride, at most --crop_size (the reference: 2/3 of the crop)")
    e.add_argument("--aug_test", action="store_true", help="multi-scale (--aug_ratios) + flip testing")
    e.add_argument("--aug_ratios", default=AUG_RATIOS, type=str2list(positive_float), metavar="RATIOS",
                   help="scales of --aug_test")
    e.add_argument("--crops_per_batch", default=8, type=positive_int, metavar="N",
                   help="sliding windows per forward pass")
    e.add_argument("--eval_every", default=16000, type=nonneg_int, metavar="N",
                   help="iterations between evaluations (0: only at the end)")
    groups = add_run_args(p, by_epoch=False)
    groups["output"].add_argument("--save_every", default=16000, type=positive_int, metavar="N",
                                  help="iterations between numbered checkpoints (checkpoint-<iteration>.pth)")
    groups["output"].add_argument("--save_last_every", default=1000, type=nonneg_int, metavar="N",
                                  help="iterations between checkpoint-last.pth writes (0: only with the numbered ones "
                                       "and at the end)")

    d = groups["data"]
    d.add_argument("--crop_size", default=512, type=positive_int, metavar="PX",
                   help="training crop and sliding window, a multiple of the patch size and >= 32")
    d.add_argument("--img_scale", default=(2048, 512), type=positive_int, nargs=2, metavar=("LONG", "SHORT"),
                   help="resize scale: long edge <= LONG and short edge <= SHORT, keeping the ratio")
    d.add_argument("--ratio_range", default=(0.5, 2.0), type=positive_float, nargs=2, metavar=("MIN", "MAX"),
                   action=OrderedPair, help="random scale factor of the training resize, MIN <= MAX")
    d.add_argument("--cat_max_ratio", default=0.75, type=share,
                   help="largest share of one class in a training crop (1: no limit)")
    p.set_defaults(data_path="data/ade/ADEChallengeData2016", log_every=50, num_workers=4)
    set_help(p, data_path="ADEChallengeData2016 folder (images/ and annotations/ inside), or 'synthetic' for the "
                          "built-in data",
             log_every="iterations between log lines, log.txt lines and TensorBoard points",
             finetune="pre-trained encoder: any checkpoint main_finetune.py --finetune accepts (default: none, random "
                      "initialisation)")
    return p


@dataclass(frozen=True)
class SegFlags(FlagConfig):
    """The segmentation flags besides the shared run / loop ones (see :func:`get_args_parser`)."""

    model: str = "vit_base_patch16"
    num_classes: Optional[int] = None
    out_indices: Optional[Tuple[int, ...]] = None
    drop_path: float = 0.1
    rel_pos_bias: bool = True
    init_values: float = 1.0
    channels: int = 768
    pool_scales: Tuple[int, ...] = (1, 2, 3, 6)
    aux_channels: int = 256
    aux_weight: float = 0.4
    dropout_ratio: float = 0.1
    lr: float = 5e-5
    layer_decay: float = 0.9
    weight_decay: float = 0.05
    warmup_iters: int = 1500
    warmup_ratio: float = 1e-6
    power: float = 1.0
    min_lr: float = 0.0
    fused_adamw: Optional[bool] = None
    crop_size: int = 512
    img_scale: Tuple[int, int] = (2048, 512)
    ratio_range: Tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    finetune: str = ""
    finetune_sha256: Optional[str] = None
    eval: bool = False
    mode: str = "slide"
    stride: int = 341
    aug_test: bool = False
    aug_ratios: Tuple[float, ...] = AUG_RATIOS
    crops_per_batch: int = 8
    eval_every: int = 16000
    save_last_every: int = 1000

    def validate(self, train: TrainConfig) -> List[str]:
        """The cross-flag checks, before anything is built or written (the per-flag ranges are the
        parser's, ``util/config/cli.py``): the model (name, ``--out_indices`` within its depth, ``--crop_size``
        vs its patch size), the sliding windows and resize scales, the data folders, the schedule.
        Returns warnings for ``start_run`` to log."""
        with torch.device("meta"):  # the architecture only: no memory, no initialisation cost
            ViTBackbone(self.model_config(self.num_classes or len(data.ADE20K_CLASSES)))
        ratios = tuple(self.aug_ratios) if self.aug_test else (1.0,)
        check_inference(self.crop_size, self.stride, self.mode, self.img_scale,
                        ratios if self.eval else (*ratios, self.ratio_range[0]))
        if train.data_path != data.SYNTHETIC:
            for split in ["val"] if self.eval else ["train", "val"]:
                data.check_split(Path(train.data_path), data.SPLITS[split])
        if not self.eval and self.warmup_iters > train.iters:
            return [f"--warmup_iters {self.warmup_iters} exceeds --iters {train.iters}: the learning rate stays in "
                    f"its linear warm-up"]
        return []

    def model_config(self, num_classes: int) -> SegConfig:
        return SegConfig(
            model=self.model, img_size=self.crop_size, num_classes=num_classes, out_indices=self.out_indices,
            drop_path=self.drop_path, rel_pos_bias=self.rel_pos_bias, init_values=self.init_values or None,
            channels=self.channels, pool_scales=tuple(self.pool_scales), aux_channels=self.aux_channels,
            aux_weight=self.aux_weight, dropout=self.dropout_ratio,
        )

    def inference_config(self, num_classes: int) -> InferenceConfig:
        """How validation images are predicted (``--aug_test``: ratios 0.5-1.75 and flip)."""
        ratios: Sequence[float] = tuple(self.aug_ratios) if self.aug_test else (1.0,)
        return InferenceConfig(num_classes=num_classes, mode=self.mode, crop=self.crop_size, stride=self.stride,
                               img_scale=tuple(self.img_scale), ratios=tuple(ratios), flip=self.aug_test,
                               crops_per_batch=self.crops_per_batch)


def segmentation_loss(aux_weight: float):
    """Loss of one (images, labels) batch: decode + aux_weight * auxiliary cross-entropy."""

    def loss_fn(model: nn.Module, batch):
        img, label = batch
        logits, aux_logits = model(img)
        decode = seg_cross_entropy(logits, label)
        aux = seg_cross_entropy(aux_logits, label) if aux_logits is not None else torch.zeros_like(decode)
        return decode + aux_weight * aux, torch.stack([decode.detach(), aux.detach(), pixel_accuracy(logits, label)])

    return loss_fn


def _json_safe(values: Sequence[float], names: Sequence[str]) -> Dict[str, Optional[float]]:
    return {n: None if math.isnan(v) else v for n, v in zip(names, values)}  # NaN is not JSON


def validate(run: Run, model: Segmentor, loader, cfg: InferenceConfig, names: Sequence[str],
             iteration: int) -> Dict[str, Any]:
    """Evaluate, log mmseg's table, return the metrics and the ``log.txt`` record."""
    t0 = time.time()
    areas, images = evaluate(model, loader, cfg, run.device, run.amp_dtype)
    stats = summarize(areas)
    how = f"{cfg.mode}, " + ("multi-scale + flip" if cfg.flip else "single scale")
    _log.info("evaluation at iteration %d on %d images (%s) in %s\n%s", iteration, images, how,
              fmt_seconds(time.time() - t0), format_table(stats, names))
    run.tb.scalars({f"val/{k}": stats[k] for k in ("mIoU", "mAcc", "aAcc")}, iteration)
    record = {"mode": "val", "iteration": iteration, "images": images, "mIoU": stats["mIoU"], "mAcc": stats["mAcc"],
              "aAcc": stats["aAcc"], "IoU": _json_safe(stats["IoU"], names), "Acc": _json_safe(stats["Acc"], names)}
    return {**stats, "images": images, "record": record}


class SegmentationJob(Job):
    """UperNet training by iteration: decode + auxiliary loss, pixel accuracy; a ``log.txt`` record
    per log step, mIoU evaluation every ``--eval_every`` iterations and at the end."""

    metric_names = ("decode", "aux", "acc_seg")  # per-step metrics: the two losses and the pixel accuracy

    def __init__(self, run: Run, model: Segmentor, optimizer, scaler, flags: SegFlags, iters: int, val_loader,
                 test_cfg: InferenceConfig, names: List[str]) -> None:
        self.run, self.model, self.optimizer, self.scaler = run, model, optimizer, scaler
        self.flags, self.iters, self.val_loader, self.test_cfg, self.names = flags, iters, val_loader, test_cfg, names
        self.loss = segmentation_loss(flags.aux_weight)
        self.lr = poly_schedule(flags.lr, iters, flags.warmup_iters, flags.warmup_ratio, flags.power, flags.min_lr)
        self.stats: Dict[str, Any] = {}

    def metric_labels(self) -> List[str]:
        return ["the loss of the decode head", "the loss of the auxiliary head", "the pixel accuracy"]

    def summary(self, values: Sequence[float]) -> Dict[str, float]:
        decode, aux, acc = values
        return {"loss": decode + self.flags.aux_weight * aux, "loss_decode": decode, "loss_aux": aux, "acc_seg": acc}

    def progress(self, trainer: Trainer, done: int, values, summary, lr: float, sec_per_it: float) -> str:
        return (f"iter [{done}/{self.iters}] lr {lr:.3e} loss {summary['loss']:.4f} (decode {summary['loss_decode']:.4f}, "
                f"aux {summary['loss_aux']:.4f}) acc_seg {summary['acc_seg']:.2f}  {sec_per_it:.3f} s/it, eta "
                f"{fmt_seconds(sec_per_it * (self.iters - done))}")

    def on_log(self, trainer: Trainer, done: int, summary: Dict[str, float], lr: float, sec_per_it: float):
        return {"mode": "train", "iteration": done, "lr": lr, **summary, "time": sec_per_it}

    def on_step(self, trainer: Trainer, done: int) -> Commit:
        self.stats = validate(self.run, self.model, self.val_loader, self.test_cfg, self.names, done)
        return Commit([self.stats["record"]], [])

    def extra_state(self) -> Dict[str, Any]:
        return {"model_cfg": self.model.cfg.to_dict(), "classes": list(self.names)}

    def result(self, trainer: Trainer, elapsed: float) -> Dict[str, Any]:
        if not self.stats:
            _log.info("already trained for %d iterations; evaluating", self.iters)
            self.stats = validate(self.run, self.model, self.val_loader, self.test_cfg, self.names, self.iters)
        _log.info("training time %s; mIoU %.2f", fmt_seconds(elapsed), self.stats.get("mIoU", float("nan")))
        return self.stats


def main(args: argparse.Namespace) -> Dict[str, Any]:
    flags = flag_dict(args)
    cfg = (RunConfig.from_flags(flags), TrainConfig.from_flags(flags), SegFlags.from_flags(flags))
    warnings = cfg[2].validate(cfg[1])  # a bad combination of flags stops here: nothing written yet
    with start_run(cfg[0], warnings) as run:
        return segment(run, *cfg[1:], flags)


def segment(run: Run, train: TrainConfig, f: SegFlags, flags: Dict[str, Any]) -> Dict[str, Any]:
    """Train (or ``--eval``) the segmentation model inside a started run."""
    root = data.resolve_root(train.data_path)
    names = data.class_names(root, f.num_classes)
    num_classes = len(names)
    val_set = data.ADE20K(root, data.SPLITS["val"], num_classes)
    pin = train.pin_mem and run.device.type == "cuda"
    val_loader = eval_loader(val_set, 1, run.info.rank, run.info.world_size, train.num_workers, pin)
    test_cfg = f.inference_config(num_classes)

    model = Segmentor(f.model_config(num_classes))
    if f.finetune and not train.resume:
        load_pretrained(model, f.finetune, f.finetune_sha256)
    model.to(run.device)
    if run.info.distributed:
        if run.device.type == "cuda":  # BatchNorm over the total batch, as the reference's SyncBN
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            _log.warning("SyncBatchNorm needs CUDA: BatchNorm statistics stay per process on %s", run.device)

    if f.eval:
        path = ckpt_util.resume_source(run.out_dir, train.resume, train.auto_resume, run.is_main)
        ckpt: Dict[str, Any] = {}
        if path is not None:
            ckpt = ckpt_util.read_checkpoint(path, check=True)
            convert.load_model_state(model, convert.model_state_of(ckpt, path), path)
        else:
            _log.warning("--eval without a checkpoint (--resume, or one in --output_dir): the heads are random")
        stats = validate(run, model, val_loader, test_cfg, names, int(ckpt.get("iteration", 0)))
        print(f"mIoU {stats['mIoU']:.2f}  mAcc {stats['mAcc']:.2f}  aAcc {stats['aAcc']:.2f}  on {stats['images']} images")
        return stats

    train_set = data.ADE20K(root, data.SPLITS["train"], num_classes,
                            data.TrainTransform(f.crop_size, f.img_scale, f.ratio_range, f.cat_max_ratio))
    optimizer = adamw(layer_decay_groups(model, f.weight_decay, f.layer_decay), f.lr, betas=(0.9, 0.999),
                      device=run.device, fused=f.fused_adamw)
    scaler = make_scaler(run.device, run.amp_dtype)
    iters = train.iters
    stream = data.IterationData(train_set, train.batch_size, run.info.rank, run.info.world_size, run.cfg.seed, iters,
                                train.num_workers, pin)
    job = SegmentationJob(run, model, optimizer, scaler, f, iters, val_loader, test_cfg, names)
    trainer_cfg = TrainerConfig(
        total_steps=iters, steps_per_epoch=stream.steps_per_epoch, batch_size=train.batch_size,
        clip_grad=train.clip_grad, log_every=train.log_every, seed=run.cfg.seed, by_epoch=False,
        save_every=train.save_every, save_last_every=f.save_last_every, eval_every=f.eval_every, resume=train.resume,
        auto_resume=train.auto_resume, compile=train.compile, grad_checkpointing=train.grad_checkpointing)
    saved = run.resolved_args(flags, num_classes=num_classes, out_indices=list(model.cfg.out_indices))
    _log.info("%s UperNet, %d classes, %.1fM parameters; %d training / %d validation images; total batch %d; "
              "lr %.2e, layer decay %.2f; amp %s", f.model, num_classes,
              sum(p.numel() for p in model.parameters()) / 1e6, len(train_set), len(val_set),
              train.batch_size * run.info.world_size, f.lr, f.layer_decay, run.amp_dtype)
    return Trainer(run, job, stream, trainer_cfg, saved, config_extra={"model_cfg": model.cfg.to_dict()}).fit()


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
