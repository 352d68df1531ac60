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

from util.checkpoints import reader as ckpt_util
from util.config.cli import (
    OrderedPair,
    Parser,
    add_iteration_run_args,
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
from util.config.typed import (
    DATA,
    MODEL,
    OPTIM,
    OUTPUT,
    SHARED_CONFIGS,
    WEIGHTS,
    OptimConfig,
    ScriptConfig,
    WeightsConfig,
    add_flags,
    check_iteration_schedule,
    flag,
)
from util.data.datasets import IterationData, eval_loader
from util.run.amp import make_scaler
from util.run.errors import run_cli
from util.run.logs import fmt_seconds
from util.run.lr_sched import poly_schedule
from util.run.optim import adamw, layer_decay_groups
from util.run.runner import Run, start_run
from util.run.trainer import Commit, Job, Trainer, TrainerConfig, evaluate_checkpoint

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

@dataclass(frozen=True)
class SegFlags(WeightsConfig):
    """The segmentation flags besides the shared run / loop / optimizer ones (see :func:`get_args_parser`)."""

    model: str = flag("vit_base_patch16", "registered ViT name (models_vit)", group=MODEL)
    num_classes: Optional[int] = flag(None, "classes after reduce_zero_label (default: the dataset's; 150 for ADE20K)",
                                      group=MODEL, type=positive_int, metavar="N")
    out_indices: Optional[Tuple[int, ...]] = flag(
        None, "4 increasing 1-based blocks feeding strides 4,8,16,32 (default: depth/3, /2, 2/3, 1: 4,6,8,12 for ViT-B)",
        group=MODEL, type=str2list(positive_int, increasing), metavar="LAYERS")
    drop_path: float = flag(0.1, "drop path rate", group=MODEL, type=rate)
    rel_pos_bias: bool = flag(True, "no relative position bias (the reference uses one per block)", group=MODEL,
                              action="store_false", names=("--no_rel_pos_bias",))
    init_values: float = flag(1.0, "layer scale initial value (0: no layer scale)", group=MODEL, type=nonneg_float)
    channels: int = flag(768, "UPerHead channels", group=MODEL, type=positive_int, metavar="N")
    pool_scales: Tuple[int, ...] = flag((1, 2, 3, 6), "PPM pooling scales", group=MODEL, type=str2list(positive_int),
                                        metavar="SCALES")
    aux_channels: int = flag(256, "auxiliary FCN head channels", group=MODEL, type=positive_int, metavar="N")
    aux_weight: float = flag(0.4, "auxiliary loss weight (0: no auxiliary head)", group=MODEL, type=nonneg_float)
    dropout_ratio: float = flag(0.1, "dropout before the classifiers", group=MODEL, type=rate)
    warmup_iters: int = flag(1500, "linear warm-up iterations", group=OPTIM, type=nonneg_int, metavar="N")
    warmup_ratio: float = flag(1e-6, "lr factor at iteration 0 of the warm-up", group=OPTIM, type=probability)
    power: float = flag(1.0, "poly schedule power", group=OPTIM, type=nonneg_float)
    mode: str = flag("slide", "test mode: sliding windows of --crop_size every --stride pixels, or the whole image",
                     group=WEIGHTS, choices=["slide", "whole"])
    stride: int = flag(341, "sliding-window stride, at most --crop_size (the reference: 2/3 of the crop)",
                       group=WEIGHTS, type=positive_int, metavar="PX")
    aug_test: bool = flag(False, "multi-scale (--aug_ratios) + flip testing", group=WEIGHTS, action="store_true")
    aug_ratios: Tuple[float, ...] = flag(AUG_RATIOS, "scales of --aug_test", group=WEIGHTS,
                                         type=str2list(positive_float), metavar="RATIOS")
    crops_per_batch: int = flag(8, "sliding windows per forward pass", group=WEIGHTS, type=positive_int, metavar="N")
    eval_every: int = flag(16000, "iterations between evaluations (0: only at the end)", group=WEIGHTS,
                           type=nonneg_int, metavar="N")
    save_last_every: int = flag(
        1000, "iterations between checkpoint-last.pth writes (0: only with the numbered ones and at the end)",
        group=OUTPUT, type=nonneg_int, metavar="N")
    crop_size: int = flag(512, "training crop and sliding window, a multiple of the patch size and >= 32", group=DATA,
                          type=positive_int, metavar="PX")
    img_scale: Tuple[int, int] = flag((2048, 512), "resize scale: long edge <= LONG and short edge <= SHORT, keeping "
                                                   "the ratio", group=DATA, type=positive_int, nargs=2,
                                      metavar=("LONG", "SHORT"))
    ratio_range: Tuple[float, float] = flag((0.5, 2.0), "random scale factor of the training resize, MIN <= MAX",
                                            group=DATA, type=positive_float, nargs=2, metavar=("MIN", "MAX"),
                                            action=OrderedPair)
    cat_max_ratio: float = flag(0.75, "largest share of one class in a training crop (1: no limit)", group=DATA,
                                type=share)

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


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser("Segmentation/train.py", "DeepMIM semantic segmentation: UperNet on the ViT (ADE20K)")
    configs = (*SHARED_CONFIGS, SegFlags)
    add_flags(p, configs, ["batch_size", "iters"], defaults={"batch_size": 2, "iters": 160000},
              help={"batch_size": "images per GPU (reference: 2 x 8 GPUs = 16)"})
    add_flags(p, configs, ["model", "num_classes", "out_indices", "drop_path", "rel_pos_bias", "init_values", "channels",
                           "pool_scales", "aux_channels", "aux_weight", "dropout_ratio"])
    add_flags(p, configs, ["lr", "warmup_iters", "warmup_ratio", "power", "min_lr", "weight_decay", "layer_decay",
                           "clip_grad", "fused_adamw"],
              defaults={"lr": 5e-5, "weight_decay": 0.05, "layer_decay": 0.9},
              help={"lr": "AdamW learning rate for the total batch (DeepMIM's 5e-5; MAE's recipe: 1e-4 with "
                          "--layer_decay 0.65)", "min_lr": "lr at the last iteration"})
    add_iteration_run_args(p, configs, ["crop_size", "img_scale", "ratio_range", "cat_max_ratio"], save_every=16000,
                           evaluation=["mode", "stride", "aug_test", "aug_ratios", "crops_per_batch"])
    p.set_defaults(data_path="data/ade/ADEChallengeData2016", log_every=50, num_workers=4)
    set_help(p, data_path="ADEChallengeData2016 folder (images/ and annotations/ inside), or 'synthetic' for the "
                          "built-in data")
    return p


@dataclass(frozen=True)
class SegmentationConfig(ScriptConfig):
    """Everything segmentation reads, built once from the flags (:meth:`from_args`)."""

    seg: SegFlags

    def validate(self) -> List[str]:
        """The cross-flag checks, before anything is built or written (the per-flag ranges are the
        parser's, ``util/config/ranges.py``): the model (name, ``--out_indices`` within its depth,
        ``--crop_size`` vs its patch size), the sliding windows and resize scales, the data folders, the
        schedule. Returns warnings for ``start_run`` to log."""
        f, train = self.seg, self.train
        with torch.device("meta"):  # the architecture only: no memory, no initialisation cost
            ViTBackbone(f.model_config(f.num_classes or len(data.ADE20K_CLASSES)))
        ratios = tuple(f.aug_ratios) if f.aug_test else (1.0,)
        check_inference(f.crop_size, f.stride, f.mode, f.img_scale, ratios if f.eval else (*ratios, f.ratio_range[0]))
        if train.data_path != data.SYNTHETIC:
            for split in ["val"] if f.eval else ["train", "val"]:
                data.check_split(Path(train.data_path), data.SPLITS[split])
        return [] if f.eval else check_iteration_schedule(train, f.warmup_iters)


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

    def __init__(self, run: Run, model: Segmentor, optimizer, scaler, flags: SegFlags, optim: OptimConfig, iters: int,
                 val_loader, test_cfg: InferenceConfig, names: List[str]) -> None:
        self.run, self.model, self.optimizer, self.scaler = run, model, optimizer, scaler
        self.flags, self.iters, self.val_loader, self.test_cfg, self.names = flags, iters, val_loader, test_cfg, names
        self.loss = segmentation_loss(flags.aux_weight)
        self.schedule = poly_schedule(optim.lr, iters, flags.warmup_iters, flags.warmup_ratio, flags.power, optim.min_lr)
        self.stats: Dict[str, Any] = {}

    def lr(self, step: int) -> float:
        return self.schedule(step)

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
    cfg = SegmentationConfig.from_args(args)
    warnings = cfg.validate()  # a bad combination of flags stops here: nothing written yet
    with start_run(cfg.run, warnings) as run:
        return segment(run, cfg)


def segment(run: Run, c: SegmentationConfig) -> Dict[str, Any]:
    """Train (or ``--eval``) the segmentation model inside a started run."""
    train, f, optim = c.train, c.seg, c.optim
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
        def report(ckpt: Dict[str, Any]) -> Dict[str, Any]:
            stats = validate(run, model, val_loader, test_cfg, names, int(ckpt.get("iteration", 0)))
            print(f"mIoU {stats['mIoU']:.2f}  mAcc {stats['mAcc']:.2f}  aAcc {stats['aAcc']:.2f}  on {stats['images']} "
                  f"images")
            return stats

        path = ckpt_util.resume_source(run.out_dir, train.resume, train.auto_resume, run.is_main)
        return evaluate_checkpoint(model, path, report,
                                   "--eval without a checkpoint (--resume, or one in --output_dir): the heads are random")

    train_set = data.ADE20K(root, data.SPLITS["train"], num_classes,
                            data.TrainTransform(f.crop_size, f.img_scale, f.ratio_range, f.cat_max_ratio))
    optimizer = adamw(layer_decay_groups(model, optim.weight_decay, optim.layer_decay), optim.lr, betas=(0.9, 0.999),
                      device=run.device, fused=optim.fused_adamw)
    scaler = make_scaler(run.device, run.amp_dtype)
    iters = train.iters
    stream = IterationData(train_set, train.batch_size, run.info.rank, run.info.world_size, run.cfg.seed, iters,
                                train.num_workers, pin)
    job = SegmentationJob(run, model, optimizer, scaler, f, optim, iters, val_loader, test_cfg, names)
    trainer_cfg = TrainerConfig.of(train, total_steps=iters, steps_per_epoch=stream.steps_per_epoch, seed=run.cfg.seed,
                                   by_epoch=False, save_last_every=f.save_last_every, eval_every=f.eval_every)
    saved = run.resolved_args(c.flags, num_classes=num_classes, out_indices=list(model.cfg.out_indices))
    _log.info("%s UperNet, %d classes, %.1fM parameters; %d training / %d validation images; total batch %d; "
              "lr %.2e, layer decay %.2f; amp %s", f.model, num_classes,
              sum(p.numel() for p in model.parameters()) / 1e6, len(train_set), len(val_set),
              train.batch_size * run.info.world_size, optim.lr, optim.layer_decay, run.amp_dtype)
    return Trainer(run, job, stream, trainer_cfg, saved, config_extra={"model_cfg": model.cfg.to_dict()}).fit()


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
