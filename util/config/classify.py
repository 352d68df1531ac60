"""The flags of fine-tuning and linear probing (MAE's names): the classifier's model and weights
flags, declared once (:class:`ClassifierFlags`), and the groups both scripts add to their parser."""
import argparse
from dataclasses import dataclass, fields
from typing import Dict, Optional, Sequence

from util.config.cli import add_training_args
from util.config.ranges import positive_int, rate
from util.config.typed import MODEL, SHARED_CONFIGS, WEIGHTS, Group, WeightsConfig, add_flags, flag
from util.data.datasets import AugConfig
from util.run.errors import UserError

DEFAULT_MODEL = "vit_base_patch16"  # MAE's fine-tuning and linear-probing model


@dataclass(frozen=True)
class ClassifierFlags(WeightsConfig):
    """The model and weights flags of fine-tuning and linear probing (``None``: the script's default,
    or with ``--eval`` what the checkpoint stores)."""

    model: Optional[str] = flag(
        None, f"registered ViT name (models_vit; default: {DEFAULT_MODEL}; with --eval: the checkpoint's)",
        group=MODEL, type=str, metavar="MODEL")
    input_size: Optional[int] = flag(None, "image size (default: the model's, 224 or 32; with --eval: the checkpoint's)",
                                     group=MODEL, type=positive_int, metavar="PX")
    global_pool: Optional[bool] = flag(None, "average-pool the patch tokens", group=MODEL, action="store_true",
                                       off=("--cls_token", "use the cls token"))
    nb_classes: Optional[int] = flag(
        None, "classes (default: the number of class folders; with --eval: the checkpoint's head)", group=MODEL,
        type=positive_int, metavar="N")
    drop_path: float = flag(0.1, "drop path rate", group=MODEL, type=rate, metavar="PCT")
    probe_layer: Optional[int] = flag(None, "encoder block to probe, 1-based (default: the last)", group=MODEL,
                                      type=positive_int, metavar="K")
    dist_eval: bool = flag(False, "shard evaluation over processes (each image once)", group=WEIGHTS,
                           action="store_true")


def add_classification_args(parser: argparse.ArgumentParser, epochs: int, batch_size: int, global_pool: bool,
                            model: Sequence[str] = (), timm_augment: bool = False) -> Dict[str, Group]:
    """The flags fine-tuning and linear probing share: training, model (``model``: the script's own
    model flags after the shared ones), weights / evaluation, augmentation (crop and flip; with
    ``timm_augment`` all of timm's, :class:`util.data.datasets.AugConfig`); returned by group title."""
    add_training_args(parser, batch_size, epochs)
    configs = (*SHARED_CONFIGS, ClassifierFlags, AugConfig)
    groups = add_flags(parser, configs, ["model", "input_size", "global_pool", "nb_classes", *model])
    eval_help = ("only evaluate --resume (its head), else --finetune, else the newest checkpoint in --output_dir, "
                 "on data_path/val, with the model the checkpoint stores")
    groups.update(add_flags(parser, configs, ["finetune", "finetune_sha256", "eval", "dist_eval"],
                            help={"eval": eval_help}))
    augment = [f.name for f in fields(AugConfig)] if timm_augment else ["crop_scale", "hflip"]
    groups.update(add_flags(parser, configs, augment))
    for action in groups[MODEL]._group_actions:  # say which of --global_pool / --cls_token is the default
        if action.dest == "global_pool" and action.const is global_pool:
            action.help += " (the default)"
    return groups


def probe_layer_of(probe_layer: Optional[int], depth: int, model: str) -> int:
    """The encoder block ``--probe_layer`` names (default: the last), refused outside ``1..depth``.

    Checked with the flags (the model they name) or, with ``--eval``, once the checkpoint has given
    the model."""
    layer = probe_layer or depth
    if not 1 <= layer <= depth:
        raise UserError(f"--probe_layer {layer} is outside 1..{depth} for {model}.")
    return layer
