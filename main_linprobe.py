"""Linear probing (MAE's recipe) of the last encoder layer or of any layer (``--probe_layer K``).

Frozen encoder; a BatchNorm without affine parameters and a linear layer on top, trained with LARS.
``--probe_layer K`` probes the features of encoder block K (1-based) instead of the last one: the
paper's claim that deep supervision improves shallow layers is checked with it.

    python main_linprobe.py --data_path digits --model vit_tiny_patch4 \
        --finetune output_dir/demo/pretrain/checkpoint-last.pth --probe_layer 6 --epochs 10
    torchrun --nproc_per_node 8 main_linprobe.py --model vit_base_patch16 --cls_token \
        --finetune checkpoint-1599.pth --batch_size 2048 --epochs 90 --blr 0.1 --weight_decay 0.0 \
        --dist_eval --data_path /imagenet
"""
import argparse
import logging

import torch
from timm.layers import trunc_normal_
from timm.optim import Lars
from torch import nn

import models_vit
from engine_finetune import classification_loss, run_classification
from util.cli import add_classification_args, add_optim_args, add_run_args
from util.convert import load_encoder
from util.datasets import classification_datasets, eval_transform, linprobe_transform
from util.errors import UserError
from util.misc import run_cli
from util.runner import Run, start_run

_log = logging.getLogger("main_linprobe")


class LinearProbe(nn.Module):
    """A frozen ViT encoder and a trainable ``BatchNorm1d(affine=False) + Linear`` head.

    Args:
        encoder: the ViT (its own head is unused).
        num_classes: classes.
        layer: encoder block whose features are probed (1-based).
        pool: ``'token'`` (cls token) or ``'avg'`` (mean of the patch tokens).
    """

    def __init__(self, encoder: models_vit.ViT, num_classes: int, layer: int, pool: str) -> None:
        super().__init__()
        self.encoder = encoder.requires_grad_(False)
        self.layer, self.pool = layer, pool
        dim = encoder.embed_dim
        self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
        trunc_normal_(self.head[1].weight, std=0.01)
        nn.init.zeros_(self.head[1].bias)

    def train(self, mode: bool = True) -> "LinearProbe":
        super().train(mode)
        self.encoder.eval()  # frozen: never in training mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            feats = self.encoder.layer_features(x, self.layer, self.pool)
        return self.head(feats.float())


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("DeepMIM linear probing")
    add_classification_args(p, model="vit_base_patch16", epochs=90, batch_size=512, global_pool=False)
    p.add_argument("--probe_layer", default=None, type=int, help="encoder block to probe, 1-based (default: the last)")
    add_optim_args(p, blr=0.1, weight_decay=0.0, warmup_epochs=10)
    add_run_args(p)
    p.set_defaults(save_every=10)
    return p


def main(args: argparse.Namespace) -> dict:
    with start_run(args) as run:
        return linprobe(run, args)


def linprobe(run: Run, args: argparse.Namespace) -> dict:
    args.input_size = args.input_size or models_vit.native_size(args.model)
    train_set, val_set, args.nb_classes = classification_datasets(
        args.data_path, linprobe_transform(args.input_size, args.crop_scale, args.hflip), eval_transform(args.input_size),
        args.nb_classes, need_train=not args.eval)

    encoder = models_vit.create_model(args.model, num_classes=0, img_size=args.input_size, global_pool="token")
    if args.finetune and not args.resume:
        load_encoder(encoder, args.finetune, args.finetune_sha256)
    elif not (args.finetune or args.resume or args.eval):
        raise UserError("Linear probing needs pre-trained weights: pass --finetune CHECKPOINT.")
    depth = len(encoder.blocks)
    args.probe_layer = args.probe_layer or depth
    if not 1 <= args.probe_layer <= depth:
        raise UserError(f"--probe_layer {args.probe_layer} is outside 1..{depth} for {args.model}.")
    model = LinearProbe(encoder, args.nb_classes, args.probe_layer, "avg" if args.global_pool else "token").to(run.device)

    eff_batch = args.batch_size * args.accum_iter * run.info.world_size
    if args.lr is None:
        args.lr = args.blr * eff_batch / 256
    linear = model.head[1]
    # MAE's LARS: weight decay and the trust ratio on the weight matrix only, plain momentum SGD on the bias
    optimizer = Lars([{"params": [linear.weight], "weight_decay": args.weight_decay, "always_adapt": True},
                      {"params": [linear.bias], "weight_decay": 0.0, "always_adapt": False}],
                     lr=args.lr, momentum=0.9)
    _log.info("%s: probing layer %d (%s) for %d classes; effective batch %d; lr %.3e (blr %.3e)", args.model,
              args.probe_layer, "avg pool" if args.global_pool else "cls token", args.nb_classes, eff_batch, args.lr,
              args.lr * 256 / eff_batch)
    return run_classification(run, model, optimizer, classification_loss(nn.CrossEntropyLoss()), train_set, val_set)


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
