"""One optimizer step of pre-training, fine-tuning and detection, in one process or under DDP.

    torchrun --standalone --nproc_per_node 2 tests/dist_step.py OUT   # each rank: half of the batch
    python tests/dist_step.py OUT                                     # one process: the whole batch

Both use the repo's own pieces (``start_run``, the optimizer builders and the one trainer
``util.run.trainer.Trainer``, which wraps the model in DDP) on a fixed batch of 8 images with fixed masking noise. Rank 0
writes the updated weights and the gradients the step used to ``OUT/{pretrain,finetune,detect}-w{world}.pt``.

The gradients are compared too: AdamW's first step is ``lr * g / (|g| + eps)``, nearly blind to the
scale of ``g`` (a sum instead of a mean over ranks would give the same weights), and it turns the
rounding noise of gradients that are zero in exact arithmetic (the attention key bias) into
updates of up to ``lr / 10``; hence the small ``--lr``.

Why the two must agree: the pre-training loss is a mean over the masked patches; a fixed mask
ratio masks the same number of patches in every image, so every rank (and every accumulation
micro-batch) averages over the same number of patches, and the mean of the per-rank losses that
DDP's gradient averaging computes is the loss of the whole batch. The classification loss is a
mean over images, and the ranks hold equal halves. The pre-training step also accumulates two
micro-batches per rank (``--accum_iter 2``), which exercises DDP's ``no_sync``.
"""
import os
import sys
from pathlib import Path

from util.checkpoints.reader import unwrap
from util.config.typed import RunConfig
from util.run.lr_sched import cosine_schedule
from util.run.optim import adamw, layer_decay_groups, weight_decay_groups
from util.run.runner import start_run
from util.run.trainer import Job, Trainer, TrainerConfig

import torch
from timm.loss import LabelSmoothingCrossEntropy

import models_deepmim
import models_vit
from Detection import models as det_models
from Detection.train import LOSSES, detection_loss
from engine_finetune import classification_loss
from targets.base import compute_targets
from targets.pixel import PixelTarget

BATCH, SIZE, PATCH = 8, 16, 4


def fixed_batch():
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(BATCH, 3, SIZE, SIZE, generator=g)
    noise = torch.rand(BATCH, (SIZE // PATCH) ** 2, generator=g)
    labels = torch.randint(0, 10, (BATCH,), generator=g)
    return imgs, noise, labels


def my_share(rank: int, world: int, micro: int, *tensors):
    """This rank's contiguous share of the batch, split into ``micro`` equal micro-batches."""
    n = BATCH // world
    mine = [t[rank * n:(rank + 1) * n] for t in tensors]
    return [tuple(t[i * n // micro:(i + 1) * n // micro] for t in mine) for i in range(micro)]


def detection_sample(seed: int):
    """A 64 x 64 image with two boxes and their masks, in the detection job's target format."""
    g = torch.Generator().manual_seed(seed)
    image = (torch.rand(3, 64, 64, generator=g) * 255).to(torch.uint8)
    x0, y0 = torch.randint(2, 20, (2,), generator=g).tolist()
    boxes = torch.tensor([[x0, y0, x0 + 24, y0 + 30], [36, 20, 60, 58]], dtype=torch.float32)
    masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
    for m, (a, b, c, d) in zip(masks, boxes.int().tolist()):
        m[b:d, a:c] = 1
        image[:, b:d, a:c] = torch.tensor([200, 40, 40], dtype=torch.uint8)[:, None, None]
    return image, {"boxes": boxes, "labels": torch.tensor([1, 3]), "masks": masks}


class Batches:
    """The micro-batches of this rank as the trainer's data: one epoch, one optimizer step."""

    def __init__(self, batches):
        self.list, self.steps_per_epoch = batches, len(batches)

    def batches(self, start_step: int):
        yield from self.list[start_step:]


class OneStep(Job):
    def __init__(self, model, optimizer, loss_fn, names, lr):
        self.model, self.optimizer, self.loss, self.metric_names = model, optimizer, loss_fn, names
        self.scaler = torch.amp.GradScaler("cpu", enabled=False)
        self.lr = cosine_schedule(lr, 0.0, 0.0, 1, 1)


def step(run, lr, model, optimizer, loss_fn, names, batches):
    """One optimizer step through the trainer: the weights before and after, and the gradients used."""
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    grads = {}
    param_names = {p: n for n, p in model.named_parameters()}

    def keep_grads(opt, *_):
        grads.update({param_names[p]: p.grad.clone() for g in opt.param_groups for p in g["params"] if p.grad is not None})

    optimizer.register_step_pre_hook(keep_grads)
    cfg = TrainerConfig(total_steps=len(batches), steps_per_epoch=len(batches), batch_size=len(batches[0][0]),
                        accum_iter=len(batches), log_every=1, auto_resume=False)
    Trainer(run, OneStep(model, optimizer, loss_fn, names, lr), Batches(batches), cfg, {}).fit()
    return {"initial": initial, "weights": {k: v.detach().clone() for k, v in unwrap(model).state_dict().items()},
            "grads": grads}


def main(out: Path) -> None:
    lr = 1e-5
    # a folder per launch: the two launches run at the same time, and a run locks its folder
    run_dir = out / f"run-w{os.environ.get('WORLD_SIZE', '1')}"
    with start_run(RunConfig(device="cpu", output_dir=str(run_dir))) as run:
        rank, world = run.info.rank, run.info.world_size
        imgs, noise, labels = fixed_batch()
        results = {}

        # pre-training: DeepMIM (4 supervised layers), per-patch normalized pixel target
        torch.manual_seed(0)
        cfg = models_deepmim.model_config("deepmim_vit_tiny_patch4", img_size=SIZE, decoder_depth=1)
        model = models_deepmim.DeepMIM(cfg)
        target = {"pixel": PixelTarget(SIZE, PATCH, norm_pix=True)}

        def pretrain_loss(m, batch):
            x, z = batch
            tgt = compute_targets(target, x)["pixel"]
            o = m(x, tgt, mask_ratio=0.75, noise=z)
            return o.loss, o.layer_losses

        opt = adamw(weight_decay_groups(model, 0.05), lr, betas=(0.9, 0.95))
        micro = 2 if world > 1 else 1  # per rank: two accumulation micro-batches of 2 images
        results["pretrain"] = step(run, lr, model, opt, pretrain_loss, [f"L{x}" for x in cfg.ds_layers],
                                   my_share(rank, world, micro, imgs, noise))

        # fine-tuning: the real ViT with layer-wise lr decay and label smoothing (no drop path: it
        # draws different random numbers on each rank)
        torch.manual_seed(0)
        vit = models_vit.create_model("vit_tiny_patch4", num_classes=10, img_size=SIZE, drop_path_rate=0.0)
        opt = adamw(layer_decay_groups(vit, 0.05, 0.75), lr)
        results["finetune"] = step(run, lr, vit, opt, classification_loss(LabelSmoothingCrossEntropy(0.1)), ["loss"],
                                   my_share(rank, world, 1, imgs, labels))
        # detection: the tiny Mask R-CNN through its job's loss, one image per forward (rank r: image r; one
        # process: both, as two accumulation micro-batches). Its losses are means over the boxes sampled in a
        # forward, and which proposals survive top-k and NMS can flip with the rounding of a batched forward,
        # so each forward sees what it sees on its rank; every anchor (16,368 at strides 1-16) and proposal
        # is sampled (no random subset, which would draw differently on each rank)
        torch.manual_seed(0)
        det = det_models.create_model("vitdet_mask_rcnn_vit_tiny_patch4", num_classes=3, rpn_batch_size_per_image=1 << 15,
                                      box_batch_size_per_image=4096)
        opt = adamw(layer_decay_groups(det, 0.1, 0.7), lr)
        samples = [detection_sample(i) for i in range(2)]
        mine = [samples[rank]] if world > 1 else samples
        results["detect"] = step(run, lr, det, opt, detection_loss, list(LOSSES.values()),
                                 [([image], [target]) for image, target in mine])
        if run.is_main:
            for name, weights in results.items():
                torch.save(weights, out / f"{name}-w{world}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
