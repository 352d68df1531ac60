"""Linear evaluation of every encoder layer in one run (DINOv2's linear evaluation design).

    # every block x (cls token, avg pool) x 9 learning rates, one frozen forward per batch
    python tools/linear_eval.py --finetune output_dir/demo/pretrain/checkpoint-last.pth --data_path digits \
        --epochs 10 --batch_size 64 --crop_scale 0.5 1 --hflip 0 --output_dir output_dir/linear_eval
    # the same on cached features (no augmentation: the encoder sees every image once)
    python tools/linear_eval.py --finetune checkpoint.pth --cache_features --output_dir out/linear_eval_cached
    # ImageNet, 8 GPUs, MAE's probe (LARS, BatchNorm head, 90 epochs) for layers 6 / 8 / 10 / 12
    torchrun --nproc_per_node 8 tools/linear_eval.py --finetune checkpoint-1599.pth --recipe mae \
        --layers 6,8,10,12 --pool token --batch_size 1024 --data_path /imagenet --output_dir out/linear_eval

The encoder of ``--finetune`` (any checkpoint ``models_vit.build_from`` reads: this repo's, MAE's,
the reference DeepMIM's, timm; the ViT read off the file or ``--model``) stays frozen. Each batch
passes it once; the pooled features of every chosen layer (``--layers``, default every block) and
pooling (``--pool``: ``token`` = cls token, after the final norm for the last block as in
``main_linprobe.py``; ``avg`` = mean of the patch tokens) feed one linear head per base learning
rate of ``--blrs`` (``lr = blr x total batch / 256``, the repo's one scaling rule). All heads train
together, on the one trainer (``util/run/trainer.py``): the loss is the sum of every head's
cross-entropy, one optimizer holds every head in its own parameter groups.

Recipes (``--recipe``):

* ``dinov2`` (default): a plain linear head (weights ~ N(0, 0.01), zero bias), SGD with momentum 0.9,
  no weight decay, cosine schedule without warm-up, 10 epochs, blr grid 1e-5 .. 1e-1 (half decades);
* ``mae``: MAE's linear probe (``main_linprobe.py``): BatchNorm without affine parameters + linear,
  LARS (momentum 0.9, trust ratio on the weights), 10 warm-up epochs then cosine, 90 epochs,
  blr grid 0.01 .. 1 around MAE's 0.1.

The heads are independent: each one's initialisation comes from its own generator seeded by
(``--seed``, layer, pooling), the data order and augmentation from the trainer's seeds, the heads
run in float32 outside autocast and without loss scaling, and nothing is shared between them in the
update (no gradient clipping, no global norm). A head of the all-layer run therefore computes
exactly what the same head computes in a run of its own (``--layers K --pool P --blrs B``), to the
bit; a head whose loss diverges (too high a learning rate) is flagged and leaves the others alone.
The logged ``loss`` is the mean over the heads whose loss is finite; ``lr`` is the schedule's factor
(1 -> 0), each head's learning rate its own lr times it.

``--cache_features``: the training images pass the encoder once, without augmentation (the
evaluation transform), sharded over the processes and gathered; the heads then train on the cached
features (``[K features, N, D]`` float32 in host memory: count the size before caching ImageNet).

After every ``--eval_every`` epochs (and the last) every head is evaluated on ``data_path/val``
(each process its share, the counts summed), and ``linear_eval.json`` / ``linear_eval.md`` are
rewritten (atomically) with the table so far: per layer and pooling, the best base learning rate
and its top-1, and the top-1 of every learning rate. As in DINOv2, the learning rate is chosen on
the validation set it is reported on. ``log.txt`` gets per epoch the training loss, the best top-1
over the heads and the best of each (layer, pooling); TensorBoard ``linear_eval/L{k}_{pool}``.
Checkpoints (heads, optimizer, the epoch, the results so far) follow the trainer's rules, so a
stopped (SIGTERM / SIGUSR1) or killed run continues where it stopped when rerun and writes the same
table; a rerun of a finished run rewrites the table without training.
"""
import argparse
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from util.checkpoints import convert
from util.checkpoints.files import save_json, write_text
from util.config.cli import (
    OrderedPair,
    Parser,
    add_run_args,
    increasing,
    nonneg_float,
    positive_float,
    positive_int,
    probability,
    sha256_prefix,
    share,
    str2list,
)
from util.config.typed import FlagConfig, RunConfig, TrainConfig, flag_dict
from util.data.build import build_eval_data, check_data, classification_data
from util.data.datasets import eval_transform, linprobe_transform, with_decode
from util.data.shards import ShardEvalData, is_shard_spec, open_shards
from util.run.amp import autocast, make_scaler
from util.run.errors import UserError, run_cli
from util.run.logs import fmt_seconds
from util.run.lr_sched import cosine_schedule
from util.run.runner import Run, start_run
from util.run.trainer import Commit, Job, Trainer, epoch_trainer_config

import torch
import torch.nn.functional as F
from timm.optim import Lars
from torch import nn
from torch.utils.data import DistributedSampler

import models_vit
from evaluation.features import POOL_LABEL, VIT_POOLS, extract, gather_by_index, indexed_batches, pool_arg, pooled_features
from evaluation.heads import HeadSpec, LinearHeads, evaluate_heads, head_specs
from tools.common import progress, progress_logging

_log = logging.getLogger("linear_eval")

RESULTS_JSON, RESULTS_MD = "linear_eval.json", "linear_eval.md"


@dataclass(frozen=True)
class Recipe:
    """The defaults of a recipe (``--epochs``, ``--warmup_epochs``, ``--blrs`` override them)."""

    epochs: int
    warmup_epochs: float
    blrs: Tuple[float, ...]
    batch_norm: bool  # MAE: BatchNorm1d(affine=False) before the linear layer
    what: str  # one line for the table's header


RECIPES = {
    "dinov2": Recipe(10, 0.0, (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1), False,
                     "DINOv2's linear evaluation: linear heads, SGD momentum 0.9, cosine schedule"),
    "mae": Recipe(90, 10.0, (0.01, 0.03, 0.1, 0.3, 1.0), True,
                  "MAE's linear probing: BatchNorm (no affine) + linear heads, LARS momentum 0.9, warm-up + cosine"),
}


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser("tools/linear_eval.py", "Linear evaluation of every encoder layer in one run")
    e = p.add_argument_group("encoder")
    e.add_argument("--finetune", default="", metavar="CHECKPOINT",
                   help="the checkpoint whose encoder is evaluated (any layout, published name, hub name or URL)")
    e.add_argument("--finetune_sha256", default=None, type=sha256_prefix, metavar="HEX",
                   help="expected sha256 (prefix) of a downloaded --finetune (default: not checked)")
    e.add_argument("--model", default=None, help="registered ViT name (default: read off the checkpoint)")
    e.add_argument("--num_heads", default=None, type=positive_int, metavar="N",
                   help="encoder heads when inferring (default: the checkpoint's)")
    e.add_argument("--input_size", default=None, type=positive_int, metavar="PX",
                   help="image size (default: the checkpoint's)")
    h = p.add_argument_group("heads")
    h.add_argument("--layers", default=None, type=str2list(positive_int, increasing), metavar="K,K,...",
                   help="encoder blocks, 1-based, e.g. 6,8,10,12 (default: all)")
    h.add_argument("--pool", nargs="+", default=list(VIT_POOLS), type=pool_arg, choices=VIT_POOLS,
                   help="token (or cls): the cls token; avg: the mean patch token")
    h.add_argument("--recipe", default="dinov2", choices=sorted(RECIPES), help="dinov2: SGD + cosine; mae: LARS + BN head")
    h.add_argument("--blrs", nargs="+", type=positive_float, default=None, metavar="BLR",
                   help="base learning rates, one head each (lr = blr * total batch / 256; default: the recipe's grid)")
    h.add_argument("--epochs", default=None, type=positive_int, metavar="N",
                   help="training epochs (default: dinov2 10, mae 90)")
    h.add_argument("--warmup_epochs", default=None, type=nonneg_float, metavar="N",
                   help="linear warm-up epochs (default: dinov2 0, mae 10)")
    h.add_argument("--weight_decay", default=0.0, type=nonneg_float, help="weight decay of the head weights (not biases)")
    h.add_argument("--batch_size", default=256, type=positive_int, metavar="N", help="images per process and step")
    h.add_argument("--nb_classes", default=None, type=positive_int, metavar="N", help="classes (default: the data's)")
    h.add_argument("--cache_features", action="store_true",
                   help="encode every image once, without augmentation, and train the heads on the cached features")
    h.add_argument("--crop_scale", nargs=2, default=(0.08, 1.0), type=share, action=OrderedPair, metavar=("MIN", "MAX"),
                   help="RandomResizedCrop area range (without --cache_features)")
    h.add_argument("--hflip", type=probability, default=0.5,
                   help="horizontal flip probability (without --cache_features)")
    h.add_argument("--eval_every", default=1, type=positive_int, metavar="N",
                   help="epochs between evaluations of every head (and the last)")
    add_run_args(p)
    p.set_defaults(output_dir="output_dir/linear_eval", save_every=10)
    return p


# --------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class EvalFlags(FlagConfig):
    """The encoder and head flags (the recipe's defaults filled in by :meth:`LinearEvalConfig.from_args`)."""

    finetune: str = ""
    finetune_sha256: Optional[str] = None
    model: Optional[str] = None
    num_heads: Optional[int] = None
    input_size: Optional[int] = None
    layers: Optional[Tuple[int, ...]] = None
    pool: Tuple[str, ...] = VIT_POOLS
    recipe: str = "dinov2"
    blrs: Tuple[float, ...] = ()
    warmup_epochs: float = 0.0
    weight_decay: float = 0.0
    nb_classes: Optional[int] = None
    cache_features: bool = False
    crop_scale: Tuple[float, float] = (0.08, 1.0)
    hflip: float = 0.5
    eval_every: int = 1


@dataclass(frozen=True)
class LinearEvalConfig:
    run: RunConfig
    train: TrainConfig
    eval: EvalFlags
    flags: Dict[str, Any]  # the command line with the recipe's defaults: the checkpoints' args

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "LinearEvalConfig":
        flags = flag_dict(args)
        recipe = RECIPES[flags.get("recipe") or "dinov2"]
        for key in ("epochs", "warmup_epochs", "blrs"):
            if flags.get(key) is None:
                flags[key] = getattr(recipe, key)
        flags["blrs"] = sorted(set(flags["blrs"]))  # ascending: among equal top-1s the smallest lr wins
        for name in ("compile", "grad_checkpointing"):
            if flags.get(name):
                raise UserError(f"--{name} does nothing for linear heads on a frozen encoder; drop it.")
        return cls(RunConfig.from_flags(flags), TrainConfig.from_flags(flags), EvalFlags.from_flags(flags), flags)


# --------------------------------------------------------------------------------------------
# the heads


def head_optimizer(heads: LinearHeads, recipe: str, weight_decay: float) -> torch.optim.Optimizer:
    """One optimizer over every head, two parameter groups per head (weights, biases without weight
    decay) whose ``lr_scale`` is the head's lr: the trainer's schedule factor times it is the head's lr."""
    groups = []
    for spec, linear in zip(heads.specs, heads.linears()):
        extra = [{"always_adapt": True}, {"always_adapt": False}] if recipe == "mae" else [{}, {}]
        groups += [{"params": [linear.weight], "weight_decay": weight_decay, "lr": spec.lr, "lr_scale": spec.lr, **extra[0]},
                   {"params": [linear.bias], "weight_decay": 0.0, "lr": spec.lr, "lr_scale": spec.lr, **extra[1]}]
    if recipe == "mae":  # MAE's LARS: the trust ratio on the weight matrix only, plain momentum SGD on the bias
        return Lars(groups, lr=1.0, momentum=0.9)
    return torch.optim.SGD(groups, lr=1.0, momentum=0.9)


# --------------------------------------------------------------------------------------------
# cached features


class CachedFeatures:
    """Training data of ``--cache_features`` (a ``util.data.build.TrainData``): batches of cached features
    ``([K, B, D], labels [B])`` by global step, in the order of the image loader's distributed
    sampler (the same seed gives the same samples in the same steps).

    Args:
        fill: returns the whole training set's (features [K, N, D], labels [N]); called when the
            first batch is asked for (a finished run being rerun encodes nothing).
        num_samples: N; batch_size: per process.
    """

    def __init__(self, fill: Callable[[], Tuple[torch.Tensor, torch.Tensor]], num_samples: int, batch_size: int,
                 rank: int, world_size: int, seed: int) -> None:
        if num_samples < batch_size * world_size:
            raise UserError(f"The training set has {num_samples} images, fewer than one batch of {batch_size} x "
                            f"{world_size} process(es). Lower --batch_size.")
        self.fill, self.num_samples, self.batch_size = fill, num_samples, batch_size
        self.steps_per_epoch = num_samples // world_size // batch_size
        self.sampler = DistributedSampler(range(num_samples), num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                          drop_last=True)

    def batches(self, start_step: int = 0) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        feats, labels = self.fill()
        epoch, skip = divmod(start_step, self.steps_per_epoch)
        b = self.batch_size
        while True:
            self.sampler.set_epoch(epoch)
            order = torch.as_tensor(list(self.sampler))
            for step in range(skip, self.steps_per_epoch):
                idx = order[step * b:(step + 1) * b]
                yield feats[:, idx], labels[idx]
            epoch, skip = epoch + 1, 0


# --------------------------------------------------------------------------------------------
# the job


def results_table(specs: Sequence[HeadSpec], top1: Dict[str, float], diverged: Sequence[str]) -> List[Dict[str, Any]]:
    """Per (layer, pooling), in the order of ``specs``: the best base lr among the heads that did not
    diverge (the smallest of equal top-1s), its lr and top-1, and every lr's top-1."""
    rows: Dict[Tuple[int, str], Dict[str, Any]] = {}
    for s in specs:
        row = rows.setdefault(s.feature, {"layer": s.layer, "pool": s.pool, "top1": None, "best_blr": None,
                                          "best_lr": None, "top1_by_blr": {}, "diverged_blrs": []})
        row["top1_by_blr"][f"{s.blr:g}"] = top1[s.name]
        if s.name in diverged:
            row["diverged_blrs"].append(f"{s.blr:g}")
        elif row["top1"] is None or top1[s.name] > row["top1"]:
            row.update(top1=top1[s.name], best_blr=s.blr, best_lr=s.lr)
    return list(rows.values())


def markdown(doc: Dict[str, Any]) -> str:
    """``linear_eval.md``: the best lr per layer and pooling, then every lr's top-1."""
    rows, blrs = doc["table"], [f"{b:g}" for b in doc["blrs"]]
    pools = [p for p in VIT_POOLS if any(r["pool"] == p for r in rows)]
    done = doc["epochs_done"]
    state = "" if doc["complete"] else f" (partial: after {done} of {doc['epochs']} epochs)"
    lines = [f"# Linear evaluation of every layer{state}", "",
             f"`{doc['checkpoint']}` ({doc['model']}, {doc['input_size']} px), frozen. {doc['recipe_text']}; "
             f"{doc['epochs']} epochs, total batch {doc['total_batch']}, lr = blr x {doc['total_batch']} / 256; "
             f"{'cached features (no augmentation)' if doc['cache_features'] else 'augmented images'}. "
             f"Top-1 (%) on {doc['val_images']} validation images after epoch {done}, at the base learning rate "
             f"that is best on them (DINOv2's choice).", ""]
    head = ["layer"] + [f"{POOL_LABEL[p]} {w}" for p in pools for w in ("top-1", "best blr")]
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for layer in sorted({r["layer"] for r in rows}):
        cells = [str(layer)]
        for p in pools:
            r = next((r for r in rows if r["layer"] == layer and r["pool"] == p), None)
            cells += ["" if r is None or r["top1"] is None else f"{r['top1']:.2f}",
                      "" if r is None or r["best_blr"] is None else f"{r['best_blr']:g}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Every learning rate (top-1 %; * diverged)", "",
              "| layer | pool | " + " | ".join(f"blr {b}" for b in blrs) + " |", "|" + " --- |" * (2 + len(blrs))]
    for r in rows:
        cells = [f"{r['top1_by_blr'][b]:.2f}{'*' if b in r['diverged_blrs'] else ''}" for b in blrs]
        lines.append(f"| {r['layer']} | {POOL_LABEL[r['pool']]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


class LinearEvalJob(Job):
    """Every linear head at once on one frozen encoder (see the module docstring).

    Args:
        run: the run.
        encoder: the frozen ViT (eval mode, on the device); unused with cached features.
        heads / optimizer: :class:`LinearHeads` and :func:`head_optimizer`.
        schedule: step -> the schedule's factor (1 -> 0).
        features: the (layer, pool) pairs, in the order of the stacked features.
        val: () -> the validation batches (images or cached features [K, B, D], labels), this
            process's share.
        epochs / eval_every / total_steps: as the flags; ``meta``: the fixed part of ``linear_eval.json``.
    """

    metric_names = ("loss",)

    def __init__(self, run: Run, encoder: models_vit.ViT, heads: LinearHeads, optimizer: torch.optim.Optimizer,
                 schedule: Callable[[int], float], features: Sequence[Tuple[int, str]],
                 val: Callable[[], Iterable[Tuple[torch.Tensor, torch.Tensor]]], epochs: int, eval_every: int,
                 total_steps: int, meta: Dict[str, Any]) -> None:
        self.run, self.encoder, self.model, self.optimizer = run, encoder, heads, optimizer
        # the heads run in float32: no loss scaling, whose skipped steps would couple the heads
        self.scaler = make_scaler(run.device, None)
        self.schedule, self.features, self.val = schedule, list(features), val
        self.epochs, self.eval_every, self.total_steps, self.meta = epochs, max(1, eval_every), total_steps, meta
        self.names = list(heads.heads)
        self.history: List[Dict[str, Any]] = []
        self.bar = None

    # training ---------------------------------------------------------------------------------
    def metric_labels(self) -> List[str]:
        return ["the mean loss of the linear heads (every head's loss is non-finite)"]

    def lr(self, step: int) -> float:
        self._advance(step)
        return self.schedule(step)

    def loss(self, model: nn.Module, batch) -> Tuple[torch.Tensor, torch.Tensor]:
        x, labels = batch
        feats = pooled_features(self.encoder, x, self.features) if x.dim() == 4 else x
        with torch.autocast(x.device.type, enabled=False):
            losses = torch.stack([F.cross_entropy(logits, labels) for logits in model(feats.float())])
        finite = torch.isfinite(losses)
        mean = torch.where(finite, losses, torch.zeros_like(losses)).sum() / finite.sum()  # NaN only if all diverged
        return losses.sum(), mean.detach()[None]  # the sum: each head gets exactly its own gradient

    def _advance(self, step: int) -> None:
        if self.bar is None:
            self.bar = progress(total=self.total_steps, initial=step, desc="linear eval", unit="step",
                                enabled=self.run.is_main)
        else:
            self.bar.update(step - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.update(max(0, self.total_steps - self.bar.n))
            self.bar.close()
            self.bar = None

    # evaluation -------------------------------------------------------------------------------
    def evaluate(self) -> Tuple[Dict[str, float], int, List[str]]:
        """Every head's top-1 (%) on the validation set, the number of images, the diverged heads."""
        device, amp_dtype = self.run.device, self.run.amp_dtype

        def features_of(x: torch.Tensor) -> torch.Tensor:
            if x.dim() != 4:  # cached features
                return x
            with autocast(device, amp_dtype):
                return pooled_features(self.encoder, x, self.features)

        return evaluate_heads(self.model, self.val(), device, features_of)

    def on_epoch_end(self, trainer: Trainer, epoch: int, train: Dict[str, float]) -> Commit:
        record = {f"train_{k}": v for k, v in train.items()}
        if "train_lr" in record:
            record["train_lr_factor"] = record.pop("train_lr")  # each head's lr is its own lr times this
        if (epoch + 1) % self.eval_every and epoch + 1 < self.epochs:
            return Commit([record], [])
        top1, n, diverged = self.evaluate()
        self.history.append({"epoch": epoch, "top1": top1, "diverged": diverged, "val_images": n})
        rows = results_table(self.model.specs, top1, diverged)
        best = {f"L{r['layer']}_{r['pool']}": r["top1"] for r in rows if r["top1"] is not None}
        record.update({"test_acc1": max(best.values(), default=0.0), **{f"test_acc1_{k}": v for k, v in best.items()}})
        self.run.tb.scalars({f"linear_eval/{k}": v for k, v in best.items()}, epoch)
        _log.info("epoch %d: best top-1 per layer and pooling: %s%s", epoch,
                  " ".join(f"{k} {v:.1f}" for k, v in best.items()),
                  f"; {len(diverged)} head(s) diverged" if diverged else "")
        if self.bar is not None:
            self.bar.set_postfix_str(f"epoch {epoch} best top-1 {record['test_acc1']:.1f}")
        self.run.on_main(lambda: self.write(complete=False))
        return Commit([record], [])

    # results ----------------------------------------------------------------------------------
    def document(self, complete: bool) -> Dict[str, Any]:
        """``linear_eval.json``: the table after the last evaluation, every head, every evaluation."""
        last = self.history[-1] if self.history else {"epoch": -1, "top1": {n: 0.0 for n in self.names},
                                                      "diverged": [], "val_images": 0}
        rows = results_table(self.model.specs, last["top1"], last["diverged"])
        heads = {s.name: {"layer": s.layer, "pool": s.pool, "blr": s.blr, "lr": s.lr, "top1": last["top1"][s.name],
                          "diverged": s.name in last["diverged"]} for s in self.model.specs}
        return {**self.meta, "complete": complete, "epochs_done": last["epoch"] + 1, "val_images": last["val_images"],
                "table": rows, "heads": heads, "history": self.history}

    def write(self, complete: bool) -> None:
        """Rewrite ``linear_eval.json`` and ``linear_eval.md`` (each atomically; rank 0)."""
        doc = self.document(complete)
        out = self.run.out_dir
        save_json(doc, out / RESULTS_JSON)
        write_text(out / RESULTS_MD, markdown(doc))

    def check_resume(self, ckpt: Dict[str, Any], path: str) -> None:
        saved = ckpt.get("linear_eval") or {}
        if saved.get("heads") != self.names or saved.get("checkpoint") != self.meta["checkpoint"]:
            raise UserError(
                f"{path} holds a linear evaluation of {len(saved.get('heads') or [])} other heads or of another "
                f"encoder ({saved.get('checkpoint')}); this run trains {len(self.names)} heads on "
                f"{self.meta['checkpoint']}. Pass the flags of that run, or use a fresh --output_dir.")

    def extra_state(self) -> Dict[str, Any]:
        return {"linear_eval": {"heads": self.names, "checkpoint": self.meta["checkpoint"], "history": self.history}}

    def load_extra_state(self, ckpt: Dict[str, Any]) -> None:
        self.history = list((ckpt.get("linear_eval") or {}).get("history") or [])

    def result(self, trainer: Trainer, elapsed: float) -> Dict[str, Any]:
        self.close()
        _log.info("training time %s", fmt_seconds(elapsed))
        self.run.on_main(lambda: self.write(complete=True))
        doc = self.document(complete=True)
        if self.run.is_main:
            print(markdown(doc), flush=True)
            print(f"wrote {self.run.out_dir / RESULTS_JSON} and {self.run.out_dir / RESULTS_MD}", flush=True)
        return doc


# --------------------------------------------------------------------------------------------


def checkpoint_id(source: str) -> str:
    """How the results name the encoder: a local file by its absolute path (a rerun from elsewhere
    still matches), a published name or URL as given."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.is_file() else source


def main(args: argparse.Namespace) -> Dict[str, Any]:
    cfg = LinearEvalConfig.from_args(args)
    encoder, ckpt, layers = read_encoder(cfg)  # every check before the output folder is claimed
    with start_run(cfg.run) as run:
        return linear_eval(run, cfg, encoder, ckpt, layers)


def read_encoder(c: LinearEvalConfig) -> Tuple[models_vit.ViT, convert.EncoderFile, List[int]]:
    """The frozen encoder of ``--finetune`` (on the CPU), its file and the blocks the heads read, with
    every check of the flags against the checkpoint and the data made before anything is written."""
    f = c.eval
    if not f.finetune:
        raise UserError("Linear evaluation needs an encoder: pass --finetune CHECKPOINT.")
    ckpt = convert.read_encoder(f.finetune, f.finetune_sha256)
    encoder = models_vit.build_from(ckpt, f.model, f.input_size, f.num_heads).eval().requires_grad_(False)
    depth = len(encoder.blocks)
    layers = list(f.layers) if f.layers else list(range(1, depth + 1))
    bad = [k for k in layers if not 1 <= k <= depth]
    if bad:
        raise UserError(f"--layers {','.join(map(str, bad))}: outside 1..{depth} for this {depth}-block encoder.")
    check_data(c.train.data_path, ["train", "val"])
    return encoder, ckpt, layers


def linear_eval(run: Run, c: LinearEvalConfig, encoder: models_vit.ViT, ckpt: convert.EncoderFile,
                layers: Sequence[int]) -> Dict[str, Any]:
    """Train and evaluate every head (:func:`read_encoder` gives the encoder, its file and the layers)."""
    f, t, device = c.eval, c.train, run.device
    encoder = encoder.to(device)
    _log.info("frozen encoder of %s", ckpt.source)
    depth, size = len(encoder.blocks), encoder.patch_embed.img_size[0]
    features = [(layer, pool) for layer in sorted(set(layers)) for pool in VIT_POOLS if pool in f.pool]
    spec = models_vit.checkpoint_spec(ckpt)
    model_name = f.model or spec["model"] or (f"ViT width {ckpt.arch['embed_dim']}, depth {depth}, "
                                              f"patch {ckpt.arch['patch_size']}")

    info, eval_t = run.info, eval_transform(size)
    train_t = eval_t if f.cache_features else linprobe_transform(size, f.crop_scale, f.hflip)
    pin = t.pin_mem and device.type == "cuda"
    train_data, val_reader, nb_classes = classification_data(
        t.data_path, with_decode(train_t, t.decode), eval_t, f.nb_classes, True, t.batch_size, info.rank,
        info.world_size, c.run.seed, t.num_workers, pin, True, t.shuffle_buffer, device)
    total_batch = t.batch_size * info.world_size
    specs = head_specs(features, f.blrs, total_batch)
    recipe = RECIPES[f.recipe]
    heads = LinearHeads(specs, features, encoder.embed_dim, nb_classes, c.run.seed, recipe.batch_norm).to(device)
    optimizer = head_optimizer(heads, f.recipe, f.weight_decay)

    show = run.is_main
    if f.cache_features:
        def fill() -> Tuple[torch.Tensor, torch.Tensor]:
            if is_shard_spec(t.data_path):
                reader = ShardEvalData(open_shards(t.data_path, "train"), eval_t, t.batch_size, info.rank, info.world_size,
                                       t.num_workers, pin, return_ids=True)
            else:
                reader = build_eval_data(t.data_path, eval_t, t.batch_size, info.rank, info.world_size, t.num_workers,
                                         pin, split="train")
            batches = progress(indexed_batches(reader), desc="encoding train", unit="batch", enabled=show)
            feats, labels, ids = extract(encoder, features, batches, device, run.amp_dtype, columns=2)
            feats, labels = gather_by_index(feats, labels, ids, train_data.num_samples, device)
            _log.info("cached %d training features of %d dims x %d (layer, pool) pairs: %.1f MB", labels.numel(),
                      feats.shape[2], feats.shape[0], feats.numel() * feats.element_size() / 2 ** 20)
            return feats, labels

        data = CachedFeatures(fill, train_data.num_samples, t.batch_size, info.rank, info.world_size, c.run.seed)
        cache: List[Tuple[torch.Tensor, torch.Tensor]] = []

        def val() -> Iterable[Tuple[torch.Tensor, torch.Tensor]]:
            if not cache:
                batches = progress(val_reader, desc="encoding val", unit="batch", enabled=show)
                feats, labels = extract(encoder, features, batches, device, run.amp_dtype)
                cache.extend((feats[:, i:i + t.batch_size], labels[i:i + t.batch_size])
                             for i in range(0, labels.numel(), t.batch_size))
            return cache
    else:
        data = train_data

        def val() -> Iterable[Tuple[torch.Tensor, torch.Tensor]]:
            return progress(val_reader, desc="evaluating", unit="batch", leave=False, enabled=show)

    steps = data.steps_per_epoch
    schedule = cosine_schedule(1.0, 0.0, f.warmup_epochs, t.epochs, steps)
    source = checkpoint_id(f.finetune)
    meta = {"checkpoint": source, "model": model_name, "input_size": size, "recipe": f.recipe,
            "recipe_text": recipe.what, "epochs": t.epochs, "total_batch": total_batch, "blrs": list(f.blrs),
            "layers": sorted(set(layers)), "pools": [p for p in VIT_POOLS if p in f.pool], "cache_features": f.cache_features,
            "seed": c.run.seed, "weight_decay": f.weight_decay, "warmup_epochs": f.warmup_epochs}
    trainer_cfg = epoch_trainer_config(t, c.run.seed, steps)
    job = LinearEvalJob(run, encoder, heads, optimizer, schedule, features, val, t.epochs, f.eval_every,
                        trainer_cfg.total_steps, meta)
    saved = run.resolved_args(c.flags, model=model_name, input_size=size, nb_classes=nb_classes, layers=meta["layers"],
                              total_batch=total_batch, lrs=[s.lr for s in specs])
    _log.info("%s: %d linear heads (%d layers x %s x %d learning rates, %s recipe) on %d classes; %d training images, "
              "%d steps per epoch, total batch %d; the logged lr is the schedule's factor (each head: its lr times it)",
              model_name, len(specs), len(set(layers)), "/".join(POOL_LABEL[p] for p in meta["pools"]), len(f.blrs),
              f.recipe, nb_classes, data.num_samples, steps, total_batch)
    trainer = Trainer(run, job, data, dataclasses.replace(trainer_cfg, clip_grad=None), saved)
    with progress_logging():
        try:
            return trainer.fit()
        finally:
            job.close()


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
