"""Linear-probe accuracy of every encoder layer, for one or more checkpoints.

    # fast frozen-feature probe (small data): one forward pass per image gives every layer's features
    python tools/probe_layers.py mae/checkpoint-last.pth deepmim/checkpoint-last.pth --names MAE DeepMIM \
        --data_path digits --output_dir output_dir/probe
    # ImageNet: print MAE's linear-probing command line (main_linprobe.py --probe_layer K) for every layer
    python tools/probe_layers.py checkpoint-1599.pth --recipe linprobe --data_path /imagenet

``--recipe fast`` (default): the images of ``data_path/train`` and ``/val`` pass the frozen encoder
once, without augmentation (``eval_transform``); the pooled features of every block are cached
(``--pool token``: cls token, ``avg``: mean of the patch tokens; both by default; the last layer's
cls token passes the final norm, as in ``main_linprobe.py``). Per layer and pool the features are
standardized (mean / std of the training set) and a multinomial logistic regression (scikit-learn,
L-BFGS, ``--C``, ``--max_iter``, fixed seed) is fitted on train and scored on val.
``--train_per_class 0 10`` adds a low-shot probe trained on 10 seeded images per class: on small,
nearly linearly separable data (the digits) the full probe saturates even on random features, the
low-shot one still tells representations apart.

Writes ``probe_layers.json`` (``{"results": {name: {key: [top-1 % of layer 1, ..., layer depth]}}}``
with key ``token`` / ``avg``, or ``token_10shot`` / ``avg_10shot`` for the low-shot probe; plus the
settings and ``complete``) and ``probe_layers.png`` (accuracy against layer, one curve per checkpoint
and pool) into ``--output_dir``. The JSON is rewritten (atomically) after every layer's probe, so an
interrupted run keeps what it finished; a rerun with the same settings skips every checkpoint and
layer already there (other settings start over). Progress bars show the feature extraction and
the probes.

``--recipe linprobe`` reads each checkpoint's model off the file (``models_vit.checkpoint_spec``:
the registered ViT of its width / depth / patch, its input size and pooling), so the printed
commands build the encoder the checkpoint holds. For every layer at once, in one run, see
``tools/linear_eval.py``.
"""
import argparse
import json
import logging
import shlex
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from util.checkpoints import convert
from util.checkpoints.files import check_writable, save_json, to_plain
from util.config.cli import Parser, nonneg_int, positive_float, positive_int, seed_int
from util.data.datasets import classification_datasets, eval_transform
from util.data.loader import build_loader
from util.run.errors import run_cli
from util.run.logs import setup_logging

import numpy as np
import torch

import models_vit
from evaluation.features import POOL_LABEL, VIT_POOLS, extract, pool_arg
from evaluation.probes import few_per_class, probe_accuracy
from tools.common import add_checkpoint_args, add_device_arg, checkpoint_names, progress, tool_device

_log = logging.getLogger("probe_layers")


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser("tools/probe_layers.py", "Linear-probe accuracy of every encoder layer")
    add_checkpoint_args(p)
    p.add_argument("--data_path", default="digits", help="ImageFolder root with train/ and val/, or 'digits'")
    p.add_argument("--output_dir", default="output_dir/probe_layers", help="results (JSON) and the plot")
    p.add_argument("--recipe", default="fast", choices=["fast", "linprobe"],
                   help="fast: logistic regression on cached features; linprobe: print main_linprobe.py commands")
    p.add_argument("--pool", nargs="+", default=list(VIT_POOLS), type=pool_arg, choices=VIT_POOLS,
                   help="features probed: the cls token (token, or cls) and / or the average of the patch tokens (avg)")
    p.add_argument("--train_per_class", nargs="+", type=nonneg_int, default=[0], metavar="N",
                   help="training images per class for the probe (0: all); several values give several probes")
    p.add_argument("--C", default=1.0, type=positive_float,
                   help="inverse L2 regularisation strength of the logistic regression")
    p.add_argument("--max_iter", default=1000, type=positive_int, metavar="N",
                   help="L-BFGS iterations of the logistic regression")
    p.add_argument("--seed", default=0, type=seed_int, help="seed of the training-image subsets")
    p.add_argument("--batch_size", default=256, type=positive_int, metavar="N", help="images per forward pass")
    add_device_arg(p)
    p.add_argument("--nproc_per_node", default=8, type=positive_int, metavar="N",
                   help="--recipe linprobe: GPUs per command")
    return p


# --------------------------------------------------------------------------------------------
# features and probes


def extract_features(model: models_vit.ViT, dataset, batch_size: int, pools: Sequence[str],
                     device: torch.device, desc: str = "features") -> Tuple[Dict[str, np.ndarray], np.ndarray]:
    """Pooled features of every block, one forward pass per image (``evaluation.features.extract``).

    Returns:
        ``{pool: [depth, N, D] float32}`` and the labels [N].
    """
    depth = len(model.blocks)
    features = [(layer, pool) for pool in pools for layer in range(1, depth + 1)]
    loader = build_loader(dataset, batch_size=batch_size)  # in order, in this process
    model.to(device).eval()
    feats, labels = extract(model, features, progress(loader, desc=desc, unit="batch", leave=False), device)
    return {pool: feats[i * depth:(i + 1) * depth].numpy() for i, pool in enumerate(pools)}, labels.numpy()


def probe_keys(pools: Sequence[str], train_per_class: Sequence[int]) -> List[Tuple[str, str, int]]:
    """``(key, pool, k)`` of every probe: key ``pool`` (all training images, ``k`` <= 0) or ``{pool}_{k}shot``."""
    return [(pool if k <= 0 else f"{pool}_{k}shot", pool, k) for k in train_per_class for pool in pools]


def probe_layers(train: Tuple[Dict[str, np.ndarray], np.ndarray], val: Tuple[Dict[str, np.ndarray], np.ndarray],
                 C: float = 1.0, max_iter: int = 1000, seed: int = 0, train_per_class: Sequence[int] = (0,),
                 done: Optional[Dict[str, List[float]]] = None,
                 on_layer: Optional[Callable[[Dict[str, List[float]]], None]] = None) -> Dict[str, List[float]]:
    """Accuracy of every layer: ``{key: [top-1 % of layer 1..depth]}``.

    The key is the pool (``token`` / ``avg``) for a probe trained on all training images, and
    ``{pool}_{k}shot`` for one trained on ``k`` images per class (the same seeded subset for every
    layer and checkpoint, so that they stay comparable).

    Args:
        done: results of an earlier run (the first layers of some keys): kept, the missing layers added.
        on_layer: called with the results so far after every layer probed (to save them as it goes).
    """
    (train_f, train_y), (val_f, val_y) = train, val
    out: Dict[str, List[float]] = {key: list(accs) for key, accs in (done or {}).items()}
    for key, pool, k in probe_keys(list(train_f), train_per_class):
        idx = few_per_class(train_y, k, seed) if k > 0 else np.arange(len(train_y))
        feats, accs = train_f[pool], out.setdefault(key, [])
        for i in range(len(accs), feats.shape[0]):
            accs.append(probe_accuracy(feats[i][idx], train_y[idx], val_f[pool][i], val_y, C, max_iter, seed))
            if on_layer is not None:
                on_layer(out)
    return out


def plot_curves(results: Dict[str, Dict[str, List[float]]], path: Path, title: str = "") -> None:
    """Accuracy against layer: one curve per checkpoint (and pool)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    styles = {"token": "-", "avg": "--"}
    for name, per_key in results.items():
        for key, accs in per_key.items():
            pool, _, shots = key.partition("_")
            ax.plot(range(1, len(accs) + 1), accs, styles[pool], marker="o", ms=3,
                    label=f"{name} ({POOL_LABEL[pool]}{', ' + shots if shots else ''})")
    ax.set_xlabel("encoder layer")
    ax.set_ylabel("linear-probe top-1 (%)")
    ax.set_title(title or "linear probe of every layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def linprobe_model(ckpt: convert.EncoderFile, model: Optional[str] = None, input_size: Optional[int] = None
                   ) -> Tuple[str, int, str]:
    """(``--model``, ``--input_size``, pooling flag) of ``main_linprobe.py`` for the encoder in ``ckpt``.

    Read off the file (``models_vit.checkpoint_spec``): a fine-tuned file names its ViT, a pre-training
    file gives the registered ViT of the same width, depth and patch size. A ViT no registered model
    has prints the placeholder ``MODEL`` (with a warning): ``main_linprobe.py`` builds registered models only.
    """
    spec = models_vit.checkpoint_spec(ckpt)
    name = model or spec["model"]
    if name is None:
        arch = ckpt.arch
        _log.warning("%s holds a ViT (width %d, depth %d, patch %d) that no registered model has: replace MODEL in "
                     "its commands by a registered name, or pass --model", ckpt.source, arch["embed_dim"],
                     arch["depth"], arch["patch_size"])
        name = "MODEL"
    return name, int(input_size or spec["input_size"]), "--global_pool" if spec["global_pool"] == "avg" else "--cls_token"


def linprobe_commands(checkpoints: Sequence[str], names: Sequence[str], args) -> List[str]:
    """MAE's ImageNet linear-probing command line for every layer of every checkpoint, each building the
    encoder the checkpoint holds (:func:`linprobe_model`)."""
    cmds = []
    for path, name in zip(checkpoints, names):
        ckpt = convert.read_encoder(path)
        model, size, pool = linprobe_model(ckpt, args.model, args.input_size)
        for layer in range(1, ckpt.arch["depth"] + 1):
            out = Path(args.output_dir) / safe_name(name) / f"layer{layer}"
            cmds.append(shlex.join([
                "torchrun", f"--nproc_per_node={args.nproc_per_node}", "main_linprobe.py", "--model", model,
                "--input_size", str(size), pool, "--finetune", path, "--probe_layer", str(layer), "--batch_size", "2048",
                "--epochs", "90", "--blr", "0.1", "--weight_decay", "0.0", "--warmup_epochs", "10", "--dist_eval",
                "--data_path", args.data_path, "--output_dir", str(out)]))
    return cmds


def safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("_") or "checkpoint"


# --------------------------------------------------------------------------------------------


def earlier_results(path: Path, settings: Dict[str, Any], checkpoints: Dict[str, str]) -> Dict[str, Dict[str, List[float]]]:
    """What an earlier run with the same settings left in ``path`` (per name, for the same checkpoint file)."""
    if not path.exists():
        return {}
    try:
        saved = json.loads(path.read_text())
    except ValueError:
        return {}
    if saved.get("settings") != to_plain(settings):
        _log.info("%s was written with other settings: probing again", path)
        return {}
    same = {name for name, ckpt in saved.get("checkpoints", {}).items() if checkpoints.get(name) == ckpt}
    return {name: per_key for name, per_key in saved.get("results", {}).items() if name in same}


def main(args: argparse.Namespace) -> Dict[str, Dict[str, List[float]]]:
    names = checkpoint_names(args)
    setup_logging(0)
    if args.recipe == "linprobe":
        for cmd in linprobe_commands(args.checkpoints, names, args):
            print(cmd)
        _log.info("tools/linear_eval.py trains linear heads on every layer (and a grid of learning rates) in one run")
        return {}

    out = check_writable(args.output_dir)
    device = tool_device(args.device)
    settings = {k: getattr(args, k) for k in ("data_path", "pool", "train_per_class", "C", "max_iter", "seed", "model",
                                              "input_size", "num_heads")}
    checkpoints = dict(zip(names, args.checkpoints))
    path = out / "probe_layers.json"
    earlier = earlier_results(path, settings, checkpoints)
    keys = [key for key, _, _ in probe_keys(args.pool, args.train_per_class)]
    results: Dict[str, Dict[str, List[float]]] = {}

    def save(complete: bool) -> None:  # atomic: an interrupted run leaves the last complete file
        save_json({"results": results, "checkpoints": checkpoints, "settings": settings, "complete": complete}, path)

    for ckpt, name in zip(args.checkpoints, names):
        model = models_vit.from_checkpoint(ckpt, args.model, args.input_size, args.num_heads)
        depth = len(model.blocks)
        done = {k: v[:depth] for k, v in earlier.get(name, {}).items() if k in keys}
        missing = sum(depth - len(done.get(k, [])) for k in keys)
        if missing == 0:
            _log.info("%s: every layer already probed in %s", name, path)
            results[name] = done
            continue
        size = model.patch_embed.img_size[0]
        train_set, val_set, _ = classification_datasets(args.data_path, eval_transform(size), eval_transform(size))
        train = extract_features(model, train_set, args.batch_size, args.pool, device, desc=f"{name}: train features")
        val = extract_features(model, val_set, args.batch_size, args.pool, device, desc=f"{name}: val features")
        with progress(total=missing, desc=f"{name}: probes", unit="probe") as bar:
            def saved(partial: Dict[str, List[float]], name: str = name) -> None:
                results[name] = partial
                save(False)
                bar.update()

            results[name] = probe_layers(train, val, args.C, args.max_iter, args.seed, args.train_per_class, done, saved)
        for pool, accs in results[name].items():
            _log.info("%s (%s): %s", name, pool, " ".join(f"L{i + 1} {a:.1f}" for i, a in enumerate(accs)))
    save(True)
    plot_curves(results, out / "probe_layers.png")
    print(f"wrote {path} and {out / 'probe_layers.png'}")
    return results


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
