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
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

if __package__ in (None, ""):  # run as a script (python / torchrun Segmentation/train.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from Segmentation import data  # noqa: E402
from Segmentation.inference import AUG_RATIOS, InferenceConfig, evaluate, inference_config  # noqa: E402
from Segmentation.metrics import format_table, summarize  # noqa: E402
from Segmentation.models import (  # noqa: E402
    SegConfig,
    Segmentor,
    load_pretrained,
    pixel_accuracy,
    seg_cross_entropy,
)
from util import checkpoint as ckpt_util  # noqa: E402
from util import dist as dist_util  # noqa: E402
from util.cli import add_run_args, str2list  # noqa: E402
from util.datasets import eval_loader  # noqa: E402
from util.loop import NonFiniteTracker, train_step  # noqa: E402
from util.lr_sched import poly_lr_at, set_lr  # noqa: E402
from util.misc import derive_seed, fmt_seconds, make_scaler, run_cli, seed_everything  # noqa: E402
from util.optim import adamw, layer_decay_groups  # noqa: E402
from util.runner import Run, start_run  # noqa: E402

_log = logging.getLogger("Segmentation.train")

METRICS = ["decode", "aux", "acc_seg"]  # per-step metrics: the two losses and the pixel accuracy
METRIC_NAMES = ["the decode head", "the auxiliary head", "the pixel accuracy"]  # for the non-finite message


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("DeepMIM semantic segmentation: UperNet on the ViT (ADE20K)")
    p.add_argument("--batch_size", default=2, type=int, help="images per GPU (reference: 2 x 8 GPUs = 16)")
    p.add_argument("--iters", default=160000, type=int, help="training iterations (optimizer steps)")

    m = p.add_argument_group("model")
    m.add_argument("--model", default="vit_base_patch16", help="registered ViT name (models_vit)")
    m.add_argument("--num_classes", default=None, type=int,
                   help="classes after reduce_zero_label (default: the dataset's; 150 for ADE20K)")
    m.add_argument("--out_indices", default=None, type=str2list(int),
                   help="1-based blocks feeding strides 4,8,16,32 (default depth/3, /2, 2/3, 1: 4,6,8,12 for ViT-B)")
    m.add_argument("--drop_path", default=0.1, type=float, help="drop path rate")
    m.add_argument("--no_rel_pos_bias", action="store_false", dest="rel_pos_bias",
                   help="no relative position bias (the reference uses one per block)")
    m.add_argument("--init_values", default=1.0, type=float, help="layer scale initial value (0: no layer scale)")
    m.add_argument("--channels", default=768, type=int, help="UPerHead channels")
    m.add_argument("--pool_scales", default=(1, 2, 3, 6), type=str2list(int), help="PPM pooling scales")
    m.add_argument("--aux_channels", default=256, type=int, help="auxiliary FCN head channels")
    m.add_argument("--aux_weight", default=0.4, type=float, help="auxiliary loss weight (0: no auxiliary head)")
    m.add_argument("--dropout_ratio", default=0.1, type=float, help="dropout before the classifiers")
    m.add_argument("--clip_grad", default=None, type=float, metavar="NORM", help="clip gradient norm (default: off)")

    o = p.add_argument_group("optimizer and schedule")
    o.add_argument("--lr", default=5e-5, type=float,
                   help="AdamW learning rate for the total batch (DeepMIM's 5e-5; MAE's recipe: 1e-4 with --layer_decay 0.65)")
    o.add_argument("--layer_decay", default=0.9, type=float, help="layer-wise lr decay")
    o.add_argument("--weight_decay", default=0.05, type=float)
    o.add_argument("--warmup_iters", default=1500, type=int, help="linear warm-up iterations")
    o.add_argument("--warmup_ratio", default=1e-6, type=float, help="lr factor at iteration 0 of the warm-up")
    o.add_argument("--power", default=1.0, type=float, help="poly schedule power")
    o.add_argument("--min_lr", default=0.0, type=float)
    o.add_argument("--fused_adamw", default=None, action=argparse.BooleanOptionalAction,
                   help="fused AdamW kernels (default: on for CUDA and CPU)")

    d = p.add_argument_group("data")
    d.add_argument("--crop_size", default=512, type=int, help="training crop (and sliding window) size")
    d.add_argument("--img_scale", default=(2048, 512), type=int, nargs=2, metavar=("LONG", "SHORT"),
                   help="resize scale: long edge <= LONG and short edge <= SHORT, keeping the ratio")
    d.add_argument("--ratio_range", default=(0.5, 2.0), type=float, nargs=2, metavar=("MIN", "MAX"),
                   help="random scale factor of the training resize")
    d.add_argument("--cat_max_ratio", default=0.75, type=float, help="largest share of one class in a training crop")

    e = p.add_argument_group("weights and evaluation")
    e.add_argument("--finetune", default="", help="pre-trained encoder: any checkpoint main_finetune.py --finetune accepts")
    e.add_argument("--finetune_sha256", default=None, help="expected sha256 (prefix) of a downloaded --finetune")
    e.add_argument("--eval", action="store_true", help="only evaluate --resume (default: newest in --output_dir)")
    e.add_argument("--mode", default="slide", choices=["slide", "whole"], help="test mode")
    e.add_argument("--stride", default=341, type=int, help="sliding-window stride")
    e.add_argument("--aug_test", action="store_true", help="multi-scale (--aug_ratios) + flip testing")
    e.add_argument("--aug_ratios", default=AUG_RATIOS, type=str2list(float), help="scales of --aug_test")
    e.add_argument("--crops_per_batch", default=8, type=int, help="sliding windows per forward pass")
    e.add_argument("--eval_every", default=16000, type=int, help="iterations between evaluations")
    e.add_argument("--save_last_every", default=1000, type=int, help="iterations between checkpoint-last.pth writes")
    add_run_args(p)
    p.set_defaults(data_path="data/ade/ADEChallengeData2016", save_every=16000, log_every=50, num_workers=4)
    for action in p._actions:  # the shared flags, in this script's units
        action.help = {
            "data_path": "ADEChallengeData2016 folder (images/ and annotations/ inside), or 'synthetic' for the built-in data",
            "save_every": "iterations between numbered checkpoints (checkpoint-<iteration>.pth)",
            "log_every": "iterations between log lines, log.txt lines and TensorBoard points",
            "start_epoch": argparse.SUPPRESS,
        }.get(action.dest, action.help)
    return p


def model_config(args: argparse.Namespace) -> SegConfig:
    return SegConfig(
        model=args.model, img_size=args.crop_size, num_classes=args.num_classes,
        out_indices=tuple(args.out_indices) if args.out_indices else None, drop_path=args.drop_path,
        rel_pos_bias=args.rel_pos_bias, init_values=args.init_values or None, channels=args.channels,
        pool_scales=tuple(args.pool_scales), aux_channels=args.aux_channels, aux_weight=args.aux_weight,
        dropout=args.dropout_ratio,
    )


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


def fit(run: Run, model: Segmentor, optimizer, scaler, loader, val_loader, test_cfg: InferenceConfig,
        names: List[str], start_iter: int, train_len: int) -> Dict[str, Any]:
    """Train from ``start_iter`` to ``--iters``; evaluate every ``--eval_every`` iterations and at the end."""
    args, device = run.args, run.device
    world = run.info.world_size
    train_model = run.wrap(model)
    loss_fn = segmentation_loss(args.aux_weight)
    nonfinite = NonFiniteTracker(len(METRICS), device)
    window = torch.zeros(len(METRICS), device=device)
    window_n, t_window, t0 = 0, time.perf_counter(), time.time()
    stats: Dict[str, Any] = {}

    def state(done: int) -> Dict[str, Any]:
        epoch = data.epochs_done(done, args.batch_size, world, train_len)
        return ckpt_util.training_state(model, optimizer, scaler, epoch, run.args_dict(), model.cfg.to_dict(),
                                        iteration=done, classes=list(names))

    model.train()
    for it, batch in enumerate(loader, start=start_iter):
        lr = set_lr(optimizer, poly_lr_at(it, args.lr, args.iters, args.warmup_iters, args.warmup_ratio, args.power,
                                          args.min_lr))
        seed_everything(derive_seed(args.seed, it, args.rank))  # drop path, dropout: a function of (seed, it, rank)
        metrics = train_step(train_model, loss_fn, batch, optimizer, scaler, device, run.amp_dtype,
                             clip_grad=args.clip_grad)
        nonfinite.update(metrics, it)
        window += metrics
        window_n += 1
        done = it + 1
        last = done == args.iters

        if done % args.log_every == 0 or last:
            nonfinite.check(METRIC_NAMES)
            decode, aux, acc = (dist_util.all_reduce_sum(window.clone()) / (window_n * world)).tolist()
            sec = (time.perf_counter() - t_window) / window_n
            loss = decode + args.aux_weight * aux
            _log.info("iter [%d/%d] lr %.3e loss %.4f (decode %.4f, aux %.4f) acc_seg %.2f  %.3f s/it, eta %s", done,
                      args.iters, lr, loss, decode, aux, acc, sec, fmt_seconds(sec * (args.iters - done)))
            run.tb.scalars({"train/loss": loss, "train/loss_decode": decode, "train/loss_aux": aux,
                            "train/acc_seg": acc, "train/lr": lr}, done)
            run.write({"mode": "train", "iteration": done, "lr": lr, "loss": loss, "loss_decode": decode,
                       "loss_aux": aux, "acc_seg": acc, "time": sec})
            window.zero_()
            window_n, t_window = 0, time.perf_counter()
        if done % args.eval_every == 0 or last:
            nonfinite.check(METRIC_NAMES)
            stats = validate(run, model, val_loader, test_cfg, names, done)
            run.write(stats["record"])
            model.train()
        if done % args.save_every == 0 or last:
            nonfinite.check(METRIC_NAMES)  # never save weights a NaN has reached
            run.write(None, [ckpt_util.LAST, f"checkpoint-{done}.pth"], lambda done=done: state(done))
        elif done % args.save_last_every == 0:
            nonfinite.check(METRIC_NAMES)
            run.write(None, [ckpt_util.LAST], lambda done=done: state(done))
        if not last and run.stop():  # SIGTERM / SIGUSR1: every rank agreed to stop after this iteration
            nonfinite.check(METRIC_NAMES)
            run.write(None, [ckpt_util.LAST], lambda done=done: state(done))
            run.preempted(f"iteration {done}")

    if start_iter >= args.iters:
        _log.info("already trained for %d iterations; evaluating", start_iter)
        stats = validate(run, model, val_loader, test_cfg, names, start_iter)
    _log.info("training time %s; mIoU %.2f", fmt_seconds(time.time() - t0), stats.get("mIoU", float("nan")))
    return stats


def main(args: argparse.Namespace) -> Dict[str, Any]:
    with start_run(args) as run:
        return segment(run, args)


def segment(run: Run, args: argparse.Namespace) -> Dict[str, Any]:
    """Train (or ``--eval``) the segmentation model inside a started run."""
    root = data.resolve_root(args.data_path)
    names = data.class_names(root, args.num_classes)
    args.num_classes = len(names)
    val_set = data.ADE20K(root, data.SPLITS["val"], args.num_classes)
    pin = args.pin_mem and run.device.type == "cuda"
    val_loader = eval_loader(val_set, 1, run.info.rank, run.info.world_size, args.num_workers, pin)
    test_cfg = inference_config(args, args.num_classes)

    model = Segmentor(model_config(args))
    args.out_indices = list(model.cfg.out_indices)
    if args.finetune and not args.resume:
        load_pretrained(model, args.finetune, args.finetune_sha256)
    model.to(run.device)
    if run.info.distributed:
        if run.device.type == "cuda":  # BatchNorm over the total batch, as the reference's SyncBN
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            _log.warning("SyncBatchNorm needs CUDA: BatchNorm statistics stay per process on %s", run.device)

    if args.eval:
        _, _, ckpt = run.resume(model, None, None)
        if not ckpt:
            _log.warning("--eval without a checkpoint (--resume, or one in --output_dir): the heads are random")
        stats = validate(run, model, val_loader, test_cfg, names, int(ckpt.get("iteration", 0)))
        print(f"mIoU {stats['mIoU']:.2f}  mAcc {stats['mAcc']:.2f}  aAcc {stats['aAcc']:.2f}  on {stats['images']} images")
        return stats

    train_set = data.ADE20K(root, data.SPLITS["train"], args.num_classes,
                            data.TrainTransform(args.crop_size, args.img_scale, args.ratio_range, args.cat_max_ratio))
    optimizer = adamw(layer_decay_groups(model, args.weight_decay, args.layer_decay), args.lr, betas=(0.9, 0.999),
                      device=run.device, fused=args.fused_adamw)
    scaler = make_scaler(run.device, run.amp_dtype)
    _, _, ckpt = run.resume(model, optimizer, scaler)
    start_iter = int(ckpt.get("iteration", 0))
    loader = data.train_loader(train_set, args.batch_size, run.info.rank, run.info.world_size, args.seed, start_iter,
                               args.iters, args.num_workers, pin)
    _log.info("%s UperNet, %d classes, %.1fM parameters; %d training / %d validation images; total batch %d; "
              "lr %.2e, layer decay %.2f; amp %s", args.model, args.num_classes,
              sum(p.numel() for p in model.parameters()) / 1e6, len(train_set), len(val_set),
              args.batch_size * run.info.world_size, args.lr, args.layer_decay, run.amp_dtype)
    run.save_config(model_cfg=model.cfg.to_dict())
    return fit(run, model, optimizer, scaler, loader, val_loader, test_cfg, names, start_iter, len(train_set))


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
