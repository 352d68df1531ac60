"""The classification job (fine-tuning and linear probing): the loss, evaluation, the best checkpoint.

Used by ``main_finetune.py`` and ``main_linprobe.py``: the two differ only in model, optimizer and
augmentation, never in how an epoch runs or how accuracy is counted. The loop is ``util/run/trainer.py``.
"""
import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from util.checkpoints import convert
from util.checkpoints import reader as ckpt_util
from util.config.classify import DEFAULT_MODEL, ClassifierFlags, probe_layer_of
from util.config.typed import OptimConfig, ScriptConfig, check_schedule
from util.data.build import check_data
from util.data.build import classification_data as build_classification_data
from util.data.datasets import AugConfig, check_augmentation, with_decode
from util.run.amp import make_scaler
from util.run.errors import UserError
from util.run.logs import fmt_seconds
from util.run.lr_sched import cosine_schedule
from util.run.runner import Run
from util.run.trainer import Commit, Job, Trainer, epoch_trainer_config, evaluate_checkpoint

import torch
from torch import nn

import models_vit
from evaluation.classification import evaluate

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassifyConfig(ScriptConfig):
    """Everything fine-tuning / linear probing reads, built once from the flags (:meth:`from_args`)."""

    model: ClassifierFlags
    aug: AugConfig

    def validate(self, timm_augment: bool) -> List[str]:
        """The cross-flag checks, before anything is built or written (the per-flag ranges are the
        parser's, ``util/config/cli.py``): the model name, ``--probe_layer`` within its depth, timm's
        ``--aa`` policy (``timm_augment``: fine-tuning), the data folders and the schedule. Returns
        warnings for ``start_run`` to log."""
        m = self.model
        name = m.model or DEFAULT_MODEL
        with torch.device("meta"):  # the architecture only: no memory, no initialisation cost
            vit = models_vit.create_model(name, num_classes=0, img_size=m.input_size)
        if not m.eval:  # with --eval the model may come from the checkpoint: checked once it is read
            probe_layer_of(m.probe_layer, len(vit.blocks), name)
        if timm_augment and not m.eval:
            check_augmentation(self.aug, vit.patch_embed.img_size[0])
        check_data(self.train.data_path, ["val"] if m.eval else ["train", "val"])
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


def eval_sources(run: Run, c: ClassifyConfig) -> Tuple[Optional[str], Optional[str]]:
    """``--eval``: (the checkpoint whose model to rebuild, the checkpoint to load strictly).

    ``--resume FILE`` is loaded as it is (its head included), ``--finetune FILE`` through the encoder
    loader (a fine-tuned file's head included); without either, the furthest checkpoint in
    ``--output_dir``.
    """
    if c.train.resume:
        return c.train.resume, c.train.resume
    if c.model.finetune:
        return c.model.finetune, None
    found = ckpt_util.resume_source(run.out_dir, None, c.train.auto_resume, run.is_main)
    return found, found


def checkpoint_flags(m: ClassifierFlags, source: str) -> ClassifierFlags:
    """The model flags with what ``source`` stores filled in where the command line gives none
    (``models_vit.checkpoint_spec``); a flag that contradicts the file stops with both values."""
    ckpt = convert.read_encoder(source)
    spec, saved = models_vit.checkpoint_spec(ckpt), ckpt.saved_args
    pool = None if m.global_pool is None else ("avg" if m.global_pool else "token")
    given = {"--model": (m.model, spec["model"]), "--input_size": (m.input_size, spec["input_size"]),
             "--nb_classes": (m.nb_classes, spec["num_classes"] or saved.get("nb_classes")),
             "--global_pool / --cls_token": (pool, spec["global_pool"])}
    for flag, (value, stored) in given.items():
        if value is not None and stored is not None and value != stored:
            raise UserError(f"{flag} {value} contradicts {source}, which holds {stored}: drop {flag} to evaluate the "
                            f"checkpoint as it was trained, or pass the checkpoint that fits {flag} {value}.")
    if spec["model"] is None and m.model is None:
        raise UserError(f"{source} holds a ViT of width {ckpt.arch['embed_dim']} and patch "
                        f"{spec['patch_size']} that no registered model has: pass --model.")
    return m.replace(model=m.model or spec["model"], input_size=m.input_size or spec["input_size"],
                     nb_classes=m.nb_classes or spec["num_classes"] or saved.get("nb_classes"),
                     global_pool=spec["global_pool"] == "avg" if m.global_pool is None else m.global_pool,
                     probe_layer=m.probe_layer or saved.get("probe_layer"))


def classification_data(run: Run, c: ClassifyConfig, train_transform, val_transform) -> Tuple[Any, Any, int]:
    """(training source, validation reader, number of classes) of ``--data_path`` (folder or shards);
    no training source with ``--eval``."""
    t = c.train
    return build_classification_data(
        t.data_path, with_decode(train_transform, t.decode), val_transform, c.model.nb_classes, not c.model.eval,
        t.batch_size, run.info.rank, run.info.world_size, c.run.seed, t.num_workers,
        t.pin_mem and run.device.type == "cuda", c.model.dist_eval, t.shuffle_buffer, run.device)


def run_classification(run: Run, c: ClassifyConfig, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn,
                       optim: OptimConfig, data, val_loader, saved_args: Dict[str, Any],
                       eval_path: Optional[str] = None) -> Dict[str, Any]:
    """``--eval`` (evaluate and return), or train with the :class:`ClassificationJob`.

    ``eval_path``: the checkpoint ``--eval`` loads strictly into ``model`` (:func:`eval_sources`); any
    file holding ``{'model': ...}`` works, MAE's released fine-tuned weights included. None: the
    ``--finetune`` weights already in ``model``.
    """
    train, device = c.train, run.device
    if c.model.eval:
        untrained = None if c.model.finetune else "--eval without --resume / --finetune: evaluating a randomly initialised model"
        return evaluate_checkpoint(model, eval_path, lambda _: evaluate_and_report(run, model, val_loader, c.model.dist_eval),
                                   untrained)
    schedule = cosine_schedule(optim.lr, optim.min_lr, optim.warmup_epochs, train.epochs, data.steps_per_epoch)
    job = ClassificationJob(run, model, optimizer, make_scaler(device, run.amp_dtype), loss_fn, schedule, val_loader,
                            c.model.dist_eval)
    trainer = Trainer(run, job, data, epoch_trainer_config(train, c.run.seed, data.steps_per_epoch), saved_args)
    _log.info("%d training images, %d iterations per epoch", data.num_samples, data.steps_per_epoch)
    return trainer.fit()
