"""The classification job (fine-tuning and linear probing): the loss, evaluation, the best checkpoint.

Used by ``main_finetune.py`` and ``main_linprobe.py``: the two differ only in model, optimizer and
augmentation, never in how an epoch runs or how accuracy is counted. The loop is ``util/trainer.py``.
"""
import argparse
import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

import models_vit
from util import checkpoint as ckpt_util
from util import dist as dist_util
from util.config import FlagConfig, OptimConfig, RunConfig, TrainConfig, check_schedule, flag_dict
from util.datasets import AugConfig, FolderData, check_augmentation, check_folders, eval_loader, train_loader
from util.errors import UserError
from util.lr_sched import cosine_schedule
from util.misc import autocast, fmt_seconds, make_scaler
from util.runner import Run
from util.trainer import Commit, Job, Trainer, epoch_trainer_config

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassifierFlags(FlagConfig):
    """The model and weights flags of fine-tuning and linear probing (MAE's names)."""

    model: str = "vit_base_patch16"
    input_size: Optional[int] = None
    global_pool: bool = True
    nb_classes: Optional[int] = None
    finetune: str = ""
    finetune_sha256: Optional[str] = None
    eval: bool = False
    dist_eval: bool = False
    drop_path: float = 0.0
    layer_decay: float = 1.0
    probe_layer: Optional[int] = None


@dataclass(frozen=True)
class ClassifyConfig:
    """Everything fine-tuning / linear probing reads, built once from the flags (:meth:`from_args`)."""

    run: RunConfig
    train: TrainConfig
    optim: OptimConfig
    model: ClassifierFlags
    aug: AugConfig
    flags: Dict[str, Any]  # the command line as parsed: stored (with the resolved values) as the checkpoints' args

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ClassifyConfig":
        flags = flag_dict(args)
        return cls(RunConfig.from_flags(flags), TrainConfig.from_flags(flags), OptimConfig.from_flags(flags),
                   ClassifierFlags.from_flags(flags), AugConfig.from_flags(flags), flags)

    def validate(self, timm_augment: bool) -> List[str]:
        """The cross-flag checks, before anything is built or written (the per-flag ranges are the
        parser's, ``util/cli.py``): the model name, ``--probe_layer`` within its depth, timm's
        ``--aa`` policy (``timm_augment``: fine-tuning), the data folders and the schedule. Returns
        warnings for ``start_run`` to log."""
        m = self.model
        with torch.device("meta"):  # the architecture only: no memory, no initialisation cost
            vit = models_vit.create_model(m.model, num_classes=0, img_size=m.input_size)
        depth = len(vit.blocks)
        if m.probe_layer is not None and not 1 <= m.probe_layer <= depth:
            raise UserError(f"--probe_layer {m.probe_layer} is outside 1..{depth} for {m.model}.")
        if timm_augment and not m.eval:
            check_augmentation(self.aug, vit.patch_embed.img_size[0])
        check_folders(self.train.data_path, ["val"] if m.eval else ["train", "val"])
        return [] if m.eval else check_schedule(self.train, self.optim)


def classification_loss(criterion: nn.Module, mixup_fn: Optional[Callable] = None):
    """Loss of one (images, labels) batch; Mixup / CutMix (timm) mixes images and labels first."""

    def loss_fn(model: nn.Module, batch):
        imgs, labels = batch
        if mixup_fn is not None:
            imgs, labels = mixup_fn(imgs, labels)
        loss = criterion(model(imgs), labels)
        return loss, loss.detach()[None]

    return loss_fn


@torch.no_grad()
def evaluate(model: nn.Module, loader: torch.utils.data.DataLoader, device: torch.device,
             amp_dtype: Optional[torch.dtype], reduce: bool) -> Dict[str, float]:
    """Top-1 / top-5 accuracy (%) and cross-entropy over ``loader``.

    Counts are summed on the device and read once at the end. With ``reduce`` (``--dist_eval``)
    each rank holds a disjoint shard (no padding) and the counts are summed over ranks, so every
    validation image is counted exactly once.
    """
    model.eval()
    if reduce and dist_util.get_world_size() > 1:
        # every shard must see the model that rank 0 saves: buffers (a probe's BatchNorm statistics)
        # are not synchronised during training (broadcast_buffers=False)
        for buf in model.buffers():
            torch.distributed.broadcast(buf, src=0)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # correct@1, correct@5, loss sum, count
    for imgs, labels in loader:
        imgs = imgs.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            logits = model(imgs)
        logits = logits.float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top == labels[:, None]
        sums += torch.stack([
            hit[:, 0].sum().double(), hit.any(dim=1).sum().double(),
            nn.functional.cross_entropy(logits, labels, reduction="sum").double(),
            torch.tensor(float(labels.numel()), dtype=torch.float64, device=device),
        ])
    if reduce:
        dist_util.all_reduce_sum(sums)
    c1, c5, loss, n = sums.tolist()
    n = max(n, 1.0)
    return {"acc1": 100.0 * c1 / n, "acc5": 100.0 * c5 / n, "loss": loss / n, "count": int(n)}


def evaluate_and_report(run: Run, model: nn.Module, val_loader, dist_eval: bool) -> Dict[str, float]:
    """``--eval``: evaluate once, log, and print MAE's accuracy line."""
    stats = evaluate(model, val_loader, run.device, run.amp_dtype, reduce=dist_eval)
    _log.info("val top-1 %.2f%% top-5 %.2f%% loss %.4f on %d images", stats["acc1"], stats["acc5"], stats["loss"],
              stats["count"])
    if run.is_main:
        print(f"Accuracy of the network on the {stats['count']} test images: {stats['acc1']:.2f}%")
    return stats


class ClassificationJob(Job):
    """Fine-tuning / linear probing: evaluated after every epoch; ``checkpoint-best.pth`` whenever
    validation top-1 improves (the best accuracy survives resume: every checkpoint stores it as
    ``max_accuracy``).

    Args:
        model / optimizer / scaler: the plain model and its optimizer and loss scaler.
        loss_fn: :func:`classification_loss`.
        lr: the schedule, step -> learning rate.
        val_loader: the validation loader (this rank's shard with ``dist_eval``).
        dist_eval: sum the counts over ranks (each image once).
    """

    metric_names = ("loss",)

    def __init__(self, run: Run, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                 loss_fn, lr: Callable[[int], float], val_loader, dist_eval: bool) -> None:
        self.run, self.model, self.optimizer, self.scaler = run, model, optimizer, scaler
        self.loss, self._lr, self.val_loader, self.dist_eval = loss_fn, lr, val_loader, dist_eval
        self.max_accuracy = 0.0
        self.test: Dict[str, float] = {}

    def lr(self, step: int) -> float:
        return self._lr(step)

    def metric_labels(self):
        return ["the classification loss"]

    def on_epoch_end(self, trainer: Trainer, epoch: int, train: Dict[str, float]) -> Commit:
        run = self.run
        test = evaluate(self.model, self.val_loader, run.device, run.amp_dtype, reduce=self.dist_eval)
        best = test["acc1"] > self.max_accuracy
        self.max_accuracy = max(self.max_accuracy, test["acc1"])
        self.test = test
        _log.info("epoch %d: val top-1 %.2f%% top-5 %.2f%% on %d images (best %.2f%%)", epoch, test["acc1"],
                  test["acc5"], test["count"], self.max_accuracy)
        run.tb.scalars({"test/acc1": test["acc1"], "test/acc5": test["acc5"], "test/loss": test["loss"]}, epoch)
        record = {**{f"train_{k}": v for k, v in train.items()}, **{f"test_{k}": v for k, v in test.items()},
                  "max_accuracy": self.max_accuracy}
        return Commit([record], [ckpt_util.BEST] if best else [])

    def extra_state(self) -> Dict[str, Any]:
        return {"max_accuracy": self.max_accuracy}

    def load_extra_state(self, ckpt: Dict[str, Any]) -> None:
        self.max_accuracy = float(ckpt.get("max_accuracy", 0.0))

    def result(self, trainer: Trainer, elapsed: float) -> Dict[str, Any]:
        _log.info("training time %s; best val top-1 %.2f%%", fmt_seconds(elapsed), self.max_accuracy)
        return {**self.test, "max_accuracy": self.max_accuracy}


def run_classification(run: Run, c: ClassifyConfig, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn,
                       optim: OptimConfig, train_set, val_set, saved_args: Dict[str, Any]) -> Dict[str, Any]:
    """``--eval`` (evaluate the checkpoint and return), or train with the :class:`ClassificationJob`.

    ``--eval`` reads ``--resume`` (else the furthest checkpoint in ``--output_dir``, else the
    ``--finetune`` weights already in ``model``); any file holding ``{'model': ...}`` works, MAE's
    released fine-tuned weights included.
    """
    train, device = c.train, run.device
    pin = train.pin_mem and device.type == "cuda"
    eval_rank, eval_world = (run.info.rank, run.info.world_size) if c.model.dist_eval else (0, 1)
    val_loader = eval_loader(val_set, train.batch_size, eval_rank, eval_world, train.num_workers, pin)
    if c.model.eval:
        path: Optional[str] = train.resume or None
        if path is None and train.auto_resume:
            found = ckpt_util.find_resume(run.out_dir) if run.is_main else None
            path = dist_util.broadcast_object(str(found) if found else None)
        if path is not None:
            ckpt_util.load_training_state(ckpt_util.read_checkpoint(path), path, model)
            _log.info("evaluating %s", path)
        elif not c.model.finetune:
            _log.warning("--eval without --resume / --finetune: evaluating a randomly initialised model")
        return evaluate_and_report(run, model, val_loader, c.model.dist_eval)
    loader = train_loader(train_set, train.batch_size, run.info.rank, run.info.world_size, c.run.seed,
                          train.num_workers, pin)
    data = FolderData(train_set, loader, train.batch_size)
    schedule = cosine_schedule(optim.lr, optim.min_lr, optim.warmup_epochs, train.epochs, data.steps_per_epoch)
    job = ClassificationJob(run, model, optimizer, make_scaler(device, run.amp_dtype), loss_fn, schedule, val_loader,
                            c.model.dist_eval)
    trainer = Trainer(run, job, data, epoch_trainer_config(train, c.run.seed, data.steps_per_epoch), saved_args)
    _log.info("%d training / %d validation images, %d iterations per epoch", len(train_set), len(val_set),
              data.steps_per_epoch)
    return trainer.fit()
