"""DeepMIM pre-training (MAE's command line, plus deep supervision).

    python main_pretrain.py --data_path digits --model deepmim_vit_tiny_patch4 --epochs 10   # CPU demo
    torchrun --nproc_per_node 8 main_pretrain.py --model mae_vit_base_patch16 \
        --clip_path ViT-B-16.pt --batch_size 128 --epochs 1600 --blr 1.5e-4 --data_path /imagenet
"""
import argparse
import dataclasses
import logging
import time

import torch

import models_deepmim
from engine_pretrain import train_one_epoch
from util import checkpoint as ckpt_util
from util.cli import add_optim_args, add_run_args, str2list
from util.datasets import image_folder, pretrain_transform, resolve_data_path, train_loader
from util.misc import fmt_seconds, make_scaler, run_cli
from util.optim import adamw, weight_decay_groups
from util.runner import Run, start_run
from util.targets import build_targets, describe_targets

_log = logging.getLogger("main_pretrain")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("DeepMIM pre-training")
    p.add_argument("--batch_size", default=64, type=int,
                   help="batch size per GPU (effective batch = batch_size * accum_iter * processes)")
    p.add_argument("--epochs", default=400, type=int)
    p.add_argument("--accum_iter", default=1, type=int, help="gradient accumulation iterations")

    m = p.add_argument_group("model")
    m.add_argument("--model", default="deepmim_vit_base_patch16", type=str, metavar="MODEL",
                   help="registered model name (mae_vit_base_patch16 builds the same DeepMIM model)")
    m.add_argument("--input_size", default=None, type=int, help="image size (default: the model's, 224 or 32)")
    m.add_argument("--mask_ratio", default=0.75, type=float, help="fraction of patches removed")
    m.add_argument("--norm_pix_loss", action="store_true", help="per-patch normalized pixels as the pixel target")
    m.add_argument("--ds_layers", default=None, type=str2list(int),
                   help="supervised encoder layers, 1-based (default 6,8,10,12 for depth 12); 12 alone = MAE")
    m.add_argument("--ds_weights", default=None, type=str2list(float), help="loss weight per supervised layer (default 1)")
    m.add_argument("--decoder_embed_dim", default=None, type=int, help="decoder width (default: the model's, 512)")
    m.add_argument("--decoder_depth", default=None, type=int, help="decoder blocks (default: the model's, 4)")
    m.add_argument("--decoder_num_heads", default=None, type=int, help="decoder heads (default: the model's, 16)")
    m.add_argument("--clip_path", default=None, type=str,
                   help="CLIP weights for the CLIP target: OpenAI's ViT-B-16.pt, a visual.* state dict or open_clip file")
    m.add_argument("--clip_model", default=None, type=str, help="open_clip model name (architecture of the CLIP teacher)")
    m.add_argument("--clip_pretrained", default=None, type=str, help="open_clip pretrained tag (downloads when online)")
    m.add_argument("--clip_grad", default=None, type=float, help="clip gradient norm (default: off)")
    add_optim_args(p, blr=1.5e-4, weight_decay=0.05, warmup_epochs=40)
    add_run_args(p)
    return p


def main(args: argparse.Namespace) -> dict:
    with start_run(args) as run:
        return pretrain(run, args)


def pretrain(run: Run, args: argparse.Namespace) -> dict:
    device, amp_dtype = run.device, run.amp_dtype

    # model config first: the targets need its patch grid, the decoders need the targets' widths
    cfg = models_deepmim.model_config(
        args.model, img_size=args.input_size, ds_layers=args.ds_layers, ds_weights=args.ds_weights,
        decoder_embed_dim=args.decoder_embed_dim, decoder_depth=args.decoder_depth,
        decoder_num_heads=args.decoder_num_heads,
    )
    targets, layer_targets = build_targets(args, cfg.grid, cfg.img_size, cfg.patch_size, len(cfg.ds_layers))
    cfg = dataclasses.replace(cfg, pred_dims=tuple(targets[n].dim for n in layer_targets),
                              losses=tuple(targets[n].loss for n in layer_targets))
    args.input_size, args.ds_layers, args.ds_weights = cfg.img_size, list(cfg.ds_layers), list(cfg.ds_weights)
    for t in targets.values():
        t.to(device=device, dtype=amp_dtype or torch.float32)

    dataset = image_folder(resolve_data_path(args.data_path) / "train", pretrain_transform(cfg.img_size), "training")
    loader = train_loader(dataset, args.batch_size, run.info.rank, run.info.world_size, args.seed, args.num_workers,
                          args.pin_mem and device.type == "cuda")

    model = models_deepmim.DeepMIM(cfg).to(device)
    eff_batch = args.batch_size * args.accum_iter * run.info.world_size
    if args.lr is None:
        args.lr = args.blr * eff_batch / 256
    optimizer = adamw(weight_decay_groups(model, args.weight_decay), args.lr, betas=(0.9, 0.95), device=device,
                      fused=args.fused_adamw)
    scaler = make_scaler(device, amp_dtype)
    start_epoch, start_step, _ = run.resume(model, optimizer, scaler)

    _log.info("model %s: %s", args.model, cfg.to_dict())
    _log.info("targets: %s", describe_targets(targets, layer_targets))
    _log.info("%d training images; effective batch %d; lr %.3e (blr %.3e); amp %s; %d iterations/epoch",
              len(dataset), eff_batch, args.lr, args.lr * 256 / eff_batch, amp_dtype, len(loader))
    train_model = run.wrap(model)
    run.save_config(model_cfg=cfg.to_dict())

    t0 = time.time()
    stats: dict = {}
    for epoch in range(start_epoch, args.epochs):
        skip = start_step if epoch == start_epoch else 0
        loader.sampler.set_epoch(epoch, skip=skip * args.batch_size)
        stats = train_one_epoch(train_model, targets, layer_targets, loader, optimizer, scaler, device, amp_dtype,
                                epoch, args, run.tb, start_step=skip, should_stop=run.stop)
        run.end_epoch(lambda step_in_epoch=0, epoch=epoch: ckpt_util.training_state(
                          model, optimizer, scaler, epoch, run.args_dict(), cfg.to_dict(), step_in_epoch=step_in_epoch),
                      epoch, {f"train_{k}": v for k, v in stats.items()}, stopped_at=stats.get("stopped_at"))
    _log.info("training time %s", fmt_seconds(time.time() - t0))
    return stats


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
