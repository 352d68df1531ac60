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
settings) and ``probe_layers.png`` (accuracy against layer, one curve per checkpoint and
pool) into ``--output_dir``.
"""
import argparse
import logging
import shlex
import sys
import warnings
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import models_vit  # noqa: E402
from tools.common import add_checkpoint_args, checkpoint_names  # noqa: E402
from util.cli import Parser, nonneg_int, positive_float, positive_int, seed_int  # noqa: E402
from util.datasets import classification_datasets, eval_transform  # noqa: E402
from util.misc import check_writable, run_cli, save_json, setup_logging  # noqa: E402

_log = logging.getLogger("probe_layers")


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser("tools/probe_layers.py", "Linear-probe accuracy of every encoder layer")
    add_checkpoint_args(p)
    p.add_argument("--data_path", default="digits", help="ImageFolder root with train/ and val/, or 'digits'")
    p.add_argument("--output_dir", default="output_dir/probe_layers", help="results (JSON) and the plot")
    p.add_argument("--recipe", default="fast", choices=["fast", "linprobe"],
                   help="fast: logistic regression on cached features; linprobe: print main_linprobe.py commands")
    p.add_argument("--pool", nargs="+", default=["token", "avg"], choices=["token", "avg"],
                   help="features probed: the cls token and / or the average of the patch tokens")
    p.add_argument("--train_per_class", nargs="+", type=nonneg_int, default=[0], metavar="N",
                   help="training images per class for the probe (0: all); several values give several probes")
    p.add_argument("--C", default=1.0, type=positive_float,
                   help="inverse L2 regularisation strength of the logistic regression")
    p.add_argument("--max_iter", default=1000, type=positive_int, metavar="N",
                   help="L-BFGS iterations of the logistic regression")
    p.add_argument("--seed", default=0, type=seed_int, help="seed of the training-image subsets")
    p.add_argument("--batch_size", default=256, type=positive_int, metavar="N", help="images per forward pass")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--nproc_per_node", default=8, type=positive_int, metavar="N",
                   help="--recipe linprobe: GPUs per command")
    return p


# --------------------------------------------------------------------------------------------
# features and probes


@torch.no_grad()
def extract_features(model: models_vit.ViT, dataset, batch_size: int, pools: Sequence[str],
                     device: torch.device) -> Tuple[Dict[str, np.ndarray], np.ndarray]:
    """Pooled features of every block, one forward pass per image.

    Returns:
        ``{pool: [depth, N, D] float32}`` and the labels [N].
    """
    layers = list(range(1, len(model.blocks) + 1))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    chunks: Dict[str, List[np.ndarray]] = {pool: [] for pool in pools}
    labels = []
    model.to(device).eval()
    for imgs, y in loader:
        feats = model.multi_layer_features(imgs.to(device), layers, pools)
        for pool in pools:
            chunks[pool].append(torch.stack(feats[pool]).float().cpu().numpy())  # [depth, n, D]
        labels.append(y.numpy())
    return {pool: np.concatenate(c, axis=1) for pool, c in chunks.items()}, np.concatenate(labels)


def probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                   C: float = 1.0, max_iter: int = 1000, seed: int = 0) -> float:
    """Top-1 (%) on val of a logistic regression fitted on standardized train features [N, D]."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    clf = LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings():
        # a probe that stops at max_iter is still a valid (slightly under-fitted) probe; it is logged
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(scaler.transform(train_x), train_y)
    if int(np.max(clf.n_iter_)) >= max_iter:
        _log.info("logistic regression stopped at --max_iter %d before converging", max_iter)
    return float(100.0 * (clf.predict(scaler.transform(val_x)) == val_y).mean())


def few_per_class(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Indices of ``k`` random samples of every class (all of a class that has fewer), sorted."""
    rng = np.random.RandomState(seed)
    picks = [rng.permutation(np.flatnonzero(labels == c))[:k] for c in np.unique(labels)]
    return np.sort(np.concatenate(picks))


def probe_layers(train: Tuple[Dict[str, np.ndarray], np.ndarray], val: Tuple[Dict[str, np.ndarray], np.ndarray],
                 C: float = 1.0, max_iter: int = 1000, seed: int = 0,
                 train_per_class: Sequence[int] = (0,)) -> Dict[str, List[float]]:
    """Accuracy of every layer: ``{key: [top-1 % of layer 1..depth]}``.

    The key is the pool (``token`` / ``avg``) for a probe trained on all training images, and
    ``{pool}_{k}shot`` for one trained on ``k`` images per class (the same seeded subset for every
    layer and checkpoint, so that they stay comparable).
    """
    (train_f, train_y), (val_f, val_y) = train, val
    out: Dict[str, List[float]] = {}
    for k in train_per_class:
        idx = few_per_class(train_y, k, seed) if k > 0 else np.arange(len(train_y))
        for pool, feats in train_f.items():
            out[pool if k <= 0 else f"{pool}_{k}shot"] = [
                probe_accuracy(feats[i][idx], train_y[idx], val_f[pool][i], val_y, C, max_iter, seed)
                for i in range(feats.shape[0])]
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
                    label=f"{name} ({'cls' if pool == 'token' else 'avg'}{', ' + shots if shots else ''})")
    ax.set_xlabel("encoder layer")
    ax.set_ylabel("linear-probe top-1 (%)")
    ax.set_title(title or "linear probe of every layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def linprobe_commands(checkpoints: Sequence[str], names: Sequence[str], depth_of, args) -> List[str]:
    """MAE's ImageNet linear-probing command line for every layer of every checkpoint."""
    cmds = []
    for ckpt, name in zip(checkpoints, names):
        for layer in range(1, depth_of(ckpt) + 1):
            out = Path(args.output_dir) / safe_name(name) / f"layer{layer}"
            cmds.append(shlex.join([
                "torchrun", f"--nproc_per_node={args.nproc_per_node}", "main_linprobe.py",
                "--model", args.model or "vit_base_patch16", "--cls_token", "--finetune", ckpt, "--probe_layer",
                str(layer), "--batch_size", "2048", "--epochs", "90", "--blr", "0.1", "--weight_decay", "0.0",
                "--warmup_epochs", "10", "--dist_eval", "--data_path", args.data_path, "--output_dir", str(out)]))
    return cmds


def safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("_") or "checkpoint"


# --------------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> Dict[str, Dict[str, List[float]]]:
    names = checkpoint_names(args)
    if args.recipe == "linprobe":
        from util.convert import infer_encoder_config, read_state_dict

        for cmd in linprobe_commands(args.checkpoints, names,
                                     lambda c: infer_encoder_config(read_state_dict(c))["depth"], args):
            print(cmd)
        return {}

    out = check_writable(args.output_dir)
    setup_logging(0)
    device = torch.device(args.device)
    results: Dict[str, Dict[str, List[float]]] = {}
    for ckpt, name in zip(args.checkpoints, names):
        model = models_vit.from_checkpoint(ckpt, args.model, args.input_size, args.num_heads)
        size = model.patch_embed.img_size[0]
        train_set, val_set, _ = classification_datasets(args.data_path, eval_transform(size), eval_transform(size))
        train = extract_features(model, train_set, args.batch_size, args.pool, device)
        val = extract_features(model, val_set, args.batch_size, args.pool, device)
        results[name] = probe_layers(train, val, args.C, args.max_iter, args.seed, args.train_per_class)
        for pool, accs in results[name].items():
            _log.info("%s (%s): %s", name, pool, " ".join(f"L{i + 1} {a:.1f}" for i, a in enumerate(accs)))
    settings = {k: getattr(args, k) for k in ("data_path", "pool", "train_per_class", "C", "max_iter", "seed", "model",
                                              "input_size")}
    save_json({"results": results, "checkpoints": dict(zip(names, args.checkpoints)), "settings": settings},
              out / "probe_layers.json")
    plot_curves(results, out / "probe_layers.png")
    print(f"wrote {out / 'probe_layers.json'} and {out / 'probe_layers.png'}")
    return results


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
