"""COCO object detection and instance segmentation: ViTDet's Mask R-CNN on the pre-trained ViT, trained
by iteration; ``--eval``.

    # ViTDet's ViT-B recipe: total batch 64 (8 nodes x 8 GPUs x 1 image), 184,375 iterations (100 epochs)
    torchrun --nnodes 8 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 Detection/train.py \
        --data_path /data/coco --finetune ./output_dir/checkpoint-1599.pth --output_dir ./out_det
    # evaluate a checkpoint: box and mask AP (pycocotools), coco_instances_results.json in --output_dir
    python Detection/train.py --eval --resume ./out_det/checkpoint-best.pth --data_path /data/coco
    # CPU demo on the built-in synthetic data: make det-demo (Detection/demo.py)

See Detection/README.md for the recipe, the expected numbers and the detectron2 export.
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
    nonneg_int,
    positive_float,
    positive_int,
    probability,
    rate,
    set_help,
    str2list,
)
from util.config.typed import (
    DATA,
    MODEL,
    OPTIM,
    OUTPUT,
    SHARED_CONFIGS,
    WEIGHTS,
    ScriptConfig,
    WeightsConfig,
    add_flags,
    check_iteration_schedule,
    flag,
)
from util.data.datasets import IterationData, eval_loader
from util.run import dist as dist_util
from util.run.amp import make_scaler
from util.run.errors import UserError, run_cli
from util.run.logs import fmt_seconds
from util.run.lr_sched import multistep_schedule
from util.run.optim import adamw, layer_decay_groups
from util.run.runner import Run, start_run
from util.run.trainer import Commit, Job, Trainer, TrainerConfig, evaluate_checkpoint

import torch
from torch import nn

from Detection import data
from Detection.models import MODELS, ViTDetMaskRCNN, check_config, load_pretrained, model_config
from evaluation import coco as coco_eval

_log = logging.getLogger("Detection.train")

# ViTDet's COCO schedule (detectron2 projects/ViTDet/configs/COCO/mask_rcnn_vitdet_b_100ep.py): 184,375
# iterations at total batch 64, the lr x0.1 at iterations 163,889 and 177,546; as fractions of --iters
VITDET_ITERS = 184375
VITDET_MILESTONES = (163889, 177546)
# torchvision's loss names -> the logged names (detectron2's: loss_cls, loss_box_reg, loss_mask, loss_rpn_cls, loss_rpn_loc)
LOSSES = {"loss_classifier": "cls", "loss_box_reg": "box_reg", "loss_mask": "mask", "loss_objectness": "rpn_cls",
          "loss_rpn_box_reg": "rpn_loc"}


@dataclass(frozen=True)
class DetFlags(WeightsConfig):
    """The detection flags besides the shared run / loop / optimizer ones (see :func:`get_args_parser`)."""

    model: str = flag("vitdet_mask_rcnn_vit_base_patch16", "registered detector (Detection/models.py)", group=MODEL,
                      choices=MODELS.names())
    num_classes: Optional[int] = flag(None, "object categories (default: the annotation file's; 80 for COCO)",
                                      group=MODEL, type=positive_int, metavar="N")
    img_size: Optional[int] = flag(None, "training crop and test size, a multiple of the patch size (default: the "
                                         "model's, 1024 for ViT-B)", group=MODEL, type=positive_int, metavar="PX")
    drop_path: Optional[float] = flag(None, "drop path rate (default: the model's, ViTDet's 0.1 for ViT-B)",
                                      group=MODEL, type=rate)
    warmup_iters: int = flag(250, "linear warm-up iterations", group=OPTIM, type=nonneg_int, metavar="N")
    warmup_factor: float = flag(0.001, "lr factor at iteration 0 of the warm-up", group=OPTIM, type=probability)
    milestones: Optional[Tuple[int, ...]] = flag(
        None, "iterations at which the lr drops x0.1 (default: ViTDet's 163889,177546 of 184375, scaled to --iters)",
        group=OPTIM, type=str2list(positive_int, increasing), metavar="ITERS")
    eval_every: int = flag(5000, "iterations between evaluations (0: only at the end)", group=WEIGHTS,
                           type=nonneg_int, metavar="N")
    save_last_every: int = flag(
        1000, "iterations between checkpoint-last.pth writes (0: only with the numbered ones and at the end)",
        group=OUTPUT, type=nonneg_int, metavar="N")
    scale_range: Tuple[float, float] = flag((0.1, 2.0), "large-scale jitter: the random resize factor of the crop size",
                                            group=DATA, type=positive_float, nargs=2, metavar=("MIN", "MAX"),
                                            action=OrderedPair)

    def model_overrides(self, num_classes: int) -> Dict[str, Any]:
        over: Dict[str, Any] = {"num_classes": num_classes}
        if self.img_size is not None:
            over["img_size"] = self.img_size
        if self.drop_path is not None:
            over["drop_path"] = self.drop_path
        return over

    def lr_milestones(self, iters: int) -> Tuple[int, ...]:
        """``--milestones``, or ViTDet's at the same fractions of ``iters``."""
        if self.milestones is not None:
            return tuple(self.milestones)
        return tuple(round(m * iters / VITDET_ITERS) for m in VITDET_MILESTONES)


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser("Detection/train.py", "DeepMIM object detection and instance segmentation: ViTDet's Mask R-CNN (COCO)")
    configs = (*SHARED_CONFIGS, DetFlags)
    add_flags(p, configs, ["batch_size", "iters"], defaults={"batch_size": 1, "iters": VITDET_ITERS},
              help={"batch_size": "images per GPU (ViTDet: 1 x 64 GPUs = 64)"})
    add_flags(p, configs, ["model", "num_classes", "img_size", "drop_path"])
    add_flags(p, configs, ["lr", "warmup_iters", "warmup_factor", "milestones", "weight_decay", "layer_decay",
                           "clip_grad", "fused_adamw"],
              defaults={"lr": 1e-4, "weight_decay": 0.1, "layer_decay": 0.7},
              help={"lr": "AdamW learning rate for the total batch (ViTDet: 1e-4 at 64 images)"})
    add_iteration_run_args(p, configs, ["scale_range"], save_every=5000)
    p.set_defaults(data_path="data/coco", log_every=20, num_workers=4)
    set_help(p, data_path="COCO folder (annotations/instances_{train,val}2017.json, train2017/, val2017/), or "
                          "'synthetic' for the built-in data")
    return p


@dataclass(frozen=True)
class DetectionConfig(ScriptConfig):
    """Everything detection reads, built once from the flags (:meth:`from_args`)."""

    det: DetFlags

    def validate(self) -> List[str]:
        """The cross-flag checks, before anything is built or written: the model (name, image size, its
        patch), the data files, the schedule. Returns warnings for ``start_run`` to log."""
        f, train = self.det, self.train
        check_config(model_config(f.model, **f.model_overrides(f.num_classes or 1)))
        if train.data_path != data.SYNTHETIC:
            root = Path(train.data_path)
            for split in ["val"] if f.eval else ["train", "val"]:
                if not data.annotation_path(root, split).is_file():
                    raise UserError(f"Annotation file {data.annotation_path(root, split)} not found. --data_path must "
                                    f"hold COCO's layout: annotations/instances_{{train,val}}2017.json and the folders "
                                    f"train2017/, val2017/ (or use --data_path {data.SYNTHETIC}).")
        if f.eval:
            return []
        late = [m for m in f.lr_milestones(train.iters) if m >= train.iters]
        if f.milestones is not None and late:
            raise UserError(f"--milestones {','.join(map(str, late))} at or after --iters {train.iters}: give "
                            f"iterations below it.")
        return check_iteration_schedule(train, f.warmup_iters)


def detection_loss(model: nn.Module, batch) -> Tuple[torch.Tensor, torch.Tensor]:
    """The sum of Mask R-CNN's five losses, and the five detached (:data:`LOSSES` order)."""
    images, targets = batch
    losses = model(list(images), list(targets))
    values = torch.stack([losses[k] for k in LOSSES])
    return values.sum(), values.detach()


def _json_safe(metrics: Dict[str, float]) -> Dict[str, Optional[float]]:
    return {k: None if math.isnan(v) else v for k, v in metrics.items()}  # NaN is not JSON


class Evaluator:
    """COCO evaluation of the model on the validation split: every rank predicts its shard, rank 0
    runs COCOeval and writes ``coco_instances_results.json``; every rank gets the numbers back."""

    def __init__(self, run: Run, model: ViTDetMaskRCNN, val_set: data.CocoDetection, num_workers: int) -> None:
        self.run, self.model, self.val_set = run, model, val_set
        pin = run.device.type == "cuda"
        self.loader = eval_loader(val_set, 1, run.info.rank, run.info.world_size, num_workers, pin,
                                  collate_fn=data.collate)

    def __call__(self, iteration: int) -> Dict[str, Any]:
        run, t0 = self.run, time.time()
        metrics = coco_eval.evaluate(self.model, self.loader, self.val_set.coco, self.val_set.cat_ids, run.device,
                                     results_path=run.out_dir / coco_eval.RESULTS_FILE)
        metrics = dist_util.broadcast_object(metrics if run.is_main else None)
        images = len(self.val_set)
        _log.info("evaluation at iteration %d on %d images in %s: box AP %.2f, mask AP %.2f", iteration, images,
                  fmt_seconds(time.time() - t0), metrics["bbox"]["AP"], metrics["segm"]["AP"])
        run.tb.scalars({f"val/{t}_{m}": v for t, ms in metrics.items() for m, v in ms.items() if not math.isnan(v)},
                       iteration)
        record = {"mode": "val", "iteration": iteration, "images": images,
                  **{t: _json_safe(ms) for t, ms in metrics.items()}}
        return {**metrics, "images": images, "record": record}


class DetectionJob(Job):
    """Mask R-CNN training by iteration: the five losses; a ``log.txt`` record per log step; COCO
    evaluation every ``--eval_every`` iterations and at the end; ``checkpoint-best.pth`` whenever the
    box AP improves (the best AP survives resume: every checkpoint stores it as ``best_box_ap``)."""

    metric_names = tuple(LOSSES.values())

    def __init__(self, run: Run, model: ViTDetMaskRCNN, optimizer, scaler, schedule, iters: int,
                 evaluator: Evaluator, classes: Sequence[str], cat_ids: Sequence[int]) -> None:
        self.run, self.model, self.optimizer, self.scaler = run, model, optimizer, scaler
        self.schedule, self.iters, self.evaluator = schedule, iters, evaluator
        self.classes, self.cat_ids = list(classes), list(cat_ids)
        self.loss = detection_loss
        self.best_box_ap = -1.0
        self.stats: Dict[str, Any] = {}

    def lr(self, step: int) -> float:
        return self.schedule(step)

    def metric_labels(self) -> List[str]:
        return ["the box classification loss", "the box regression loss", "the mask loss", "the RPN objectness loss",
                "the RPN box regression loss"]

    def progress(self, trainer: Trainer, done: int, values, summary, lr: float, sec_per_it: float) -> str:
        parts = ", ".join(f"{n} {v:.4f}" for n, v in zip(self.metric_names, values))
        return (f"iter [{done}/{self.iters}] lr {lr:.3e} loss {summary['loss']:.4f} ({parts})  {sec_per_it:.3f} s/it, "
                f"eta {fmt_seconds(sec_per_it * (self.iters - done))}")

    def on_log(self, trainer: Trainer, done: int, summary: Dict[str, float], lr: float, sec_per_it: float):
        return {"mode": "train", "iteration": done, "lr": lr, **summary, "time": sec_per_it}

    def on_step(self, trainer: Trainer, done: int) -> Commit:
        self.stats = self.evaluator(done)
        box_ap = self.stats["bbox"]["AP"]
        best = box_ap > self.best_box_ap
        self.best_box_ap = max(self.best_box_ap, box_ap)
        record = {**self.stats["record"], "best_box_ap": self.best_box_ap}
        return Commit([record], [ckpt_util.BEST] if best else [])

    def extra_state(self) -> Dict[str, Any]:
        return {"model_cfg": self.model.cfg.to_dict(), "classes": self.classes, "cat_ids": self.cat_ids,
                "best_box_ap": self.best_box_ap}

    def load_extra_state(self, ckpt: Dict[str, Any]) -> None:
        self.best_box_ap = float(ckpt.get("best_box_ap", -1.0))

    def result(self, trainer: Trainer, elapsed: float) -> Dict[str, Any]:
        if not self.stats:
            _log.info("already trained for %d iterations; evaluating", self.iters)
            self.stats = self.evaluator(self.iters)
        _log.info("training time %s; box AP %.2f, mask AP %.2f (best box AP %.2f)", fmt_seconds(elapsed),
                  self.stats["bbox"]["AP"], self.stats["segm"]["AP"], self.best_box_ap)
        return {**self.stats, "best_box_ap": self.best_box_ap}


def report(stats: Dict[str, Any]) -> str:
    """One line: box and mask AP, AP50, AP75."""
    return "  ".join(f"{name} AP {stats[t]['AP']:.2f} AP50 {stats[t]['AP50']:.2f} AP75 {stats[t]['AP75']:.2f}"
                     for t, name in (("bbox", "box"), ("segm", "mask")))


def main(args: argparse.Namespace) -> Dict[str, Any]:
    cfg = DetectionConfig.from_args(args)
    warnings = cfg.validate()  # a bad combination of flags stops here: nothing written yet
    with start_run(cfg.run, warnings) as run:
        return detect(run, cfg)


def detect(run: Run, c: DetectionConfig) -> Dict[str, Any]:
    """Train (or ``--eval``) the detector inside a started run."""
    train, f, optim = c.train, c.det, c.optim
    root = data.resolve_root(train.data_path)
    val_set = data.CocoDetection(root, "val")
    num_classes = f.num_classes or len(val_set.cat_ids)
    if num_classes != len(val_set.cat_ids):
        raise UserError(f"--num_classes {num_classes} but {data.annotation_path(root, 'val')} has "
                        f"{len(val_set.cat_ids)} categories.")
    model = ViTDetMaskRCNN(model_config(f.model, **f.model_overrides(num_classes)))
    if f.finetune and not train.resume:
        load_pretrained(model, f.finetune, f.finetune_sha256)
    model.to(run.device)
    evaluator = Evaluator(run, model, val_set, train.num_workers)

    if f.eval:
        def show(ckpt: Dict[str, Any]) -> Dict[str, Any]:
            stats = evaluator(int(ckpt.get("iteration", 0)))
            print(f"{report(stats)}  on {stats['images']} images")
            return stats

        path = ckpt_util.resume_source(run.out_dir, train.resume, train.auto_resume, run.is_main)
        return evaluate_checkpoint(model, path, show,
                                   "--eval without a checkpoint (--resume, or one in --output_dir): the heads are random")

    cfg = model.cfg
    train_set = data.CocoDetection(root, "train", data.LargeScaleJitter(cfg.img_size, f.scale_range))
    if train_set.cat_ids != val_set.cat_ids:
        raise UserError(f"{data.annotation_path(root, 'train')} and {data.annotation_path(root, 'val')} list different "
                        f"categories.")
    optimizer = adamw(layer_decay_groups(model, optim.weight_decay, optim.layer_decay), optim.lr, betas=(0.9, 0.999),
                      device=run.device, fused=optim.fused_adamw)
    iters = train.iters
    schedule = multistep_schedule(optim.lr, f.lr_milestones(iters), 0.1, f.warmup_iters, f.warmup_factor)
    pin = train.pin_mem and run.device.type == "cuda"
    stream = IterationData(train_set, train.batch_size, run.info.rank, run.info.world_size, run.cfg.seed, iters,
                           train.num_workers, pin, collate_fn=data.collate)
    job = DetectionJob(run, model, optimizer, make_scaler(run.device, run.amp_dtype), schedule, iters, evaluator,
                       train_set.class_names, train_set.cat_ids)
    trainer_cfg = TrainerConfig.of(train, total_steps=iters, steps_per_epoch=stream.steps_per_epoch, seed=run.cfg.seed,
                                   by_epoch=False, save_last_every=f.save_last_every, eval_every=f.eval_every)
    saved = run.resolved_args(c.flags, num_classes=num_classes, img_size=cfg.img_size, drop_path=cfg.drop_path,
                              milestones=list(f.lr_milestones(iters)))
    _log.info("%s, %d classes, %.1fM parameters; %d training / %d validation images; total batch %d; lr %.2e "
              "(x0.1 at %s), layer decay %.2f; amp %s", f.model, num_classes,
              sum(p.numel() for p in model.parameters()) / 1e6, len(train_set), len(val_set),
              train.batch_size * run.info.world_size, optim.lr, list(f.lr_milestones(iters)), optim.layer_decay,
              run.amp_dtype)
    return Trainer(run, job, stream, trainer_cfg, saved, config_extra={"model_cfg": cfg.to_dict()}).fit()


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
