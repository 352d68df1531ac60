"""Checkpoint I/O: the one reader, atomic saves, and which checkpoint to resume.

Format (MAE's, so released checkpoints and MAE-derived tools keep working)::

    {'model': state_dict, 'optimizer': ..., 'epoch': int, 'scaler': ..., 'args': dict,
     'model_cfg': dict,          # plain-type model config: rebuild without the CLI
     'step_in_epoch': int,       # > 0 only for a mid-epoch (preemption) checkpoint
     'commit': dict,             # what the trainer writes after this file (util/trainer.py)
     'partial': dict}            # a mid-epoch checkpoint's running metric sums

Iteration-based training (segmentation) adds ``'iteration'``: the optimizer steps done; its
``epoch`` then counts the completed passes over the training set.

``epoch`` is the last epoch the checkpoint covers completely (MAE: resume at ``epoch + 1``); a
mid-epoch checkpoint stores the running epoch and the number of iterations already done in it.

Every file is read by :func:`read_checkpoint`, the one reader: local files, published names, URLs
and hub names (``util/hub.py``); pickles with ``torch.load(weights_only=True)`` and MAE's
``argparse.Namespace`` allowed, ``.safetensors``, OpenAI's TorchScript CLIP archives without
``torch.jit`` (``util/serialization.py``): a downloaded file cannot run code. Saves write a temporary
file in the same directory, flush it to disk and ``os.replace`` it over the target, so a crash or
``kill -9`` never leaves a half-written checkpoint under a real name.
"""
import errno
import logging
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from util import hub, serialization
from util.errors import UserError

_log = logging.getLogger(__name__)

LAST = "checkpoint-last.pth"
BEST = "checkpoint-best.pth"
_NUMBERED = re.compile(r"^checkpoint-(\d+)\.pth$")
_TMP = ".tmp-"  # save_atomic writes ".<name>.tmp-<pid>" next to the target


def numbered(n: int) -> str:
    """``checkpoint-{n}.pth``: epoch n (MAE) or, for segmentation, iteration n."""
    return f"checkpoint-{n}.pth"


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP and ``torch.compile`` wrappers (what gets saved)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        else:
            return model


# --------------------------------------------------------------------------------------------
# writing


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}{_TMP}{os.getpid()}")


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` atomically; a full disk raises a clear error and keeps the old file."""
    path = Path(path)
    tmp = _temp_name(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        try:  # make the rename itself durable
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(
                f"No space left on the device while writing {path}; the previous checkpoints are intact. "
                f"Free some space (or choose another --output_dir) and rerun the same command to resume."
            ) from None
        raise UserError(f"Cannot write {path}: {e.strerror or e}.") from None


def remove_stale_temps(output_dir: Path) -> List[Path]:
    """Delete the partial files that :func:`save_atomic` leaves when its process is killed mid-save.

    Call once at start-up, before this run saves anything (only one job may use an output folder).
    """
    if not output_dir.is_dir():
        return []
    stale = [p for p in output_dir.iterdir() if p.name.startswith(".checkpoint") and _TMP in p.name]
    for p in stale:
        p.unlink(missing_ok=True)
    if stale:
        _log.info("removed %d partial checkpoint file(s) left by a killed run: %s", len(stale),
                  ", ".join(p.name for p in stale))
    return stale


# --------------------------------------------------------------------------------------------
# reading: the one reader


def read_checkpoint(source: str, sha256: Optional[str] = None, *, what: Optional[str] = None, hint: str = "",
                    mmap: bool = False) -> Any:
    """The object stored in a checkpoint: a file, a published name, a URL or a hub name
    (:func:`util.hub.resolve`), read without running code from it (:func:`util.serialization.load_torch`).

    Args:
        sha256: expected digest of a download.
        what / hint: how a message about an unreadable file names it and what it advises
            (default: the generic message).
        mmap: map the tensors instead of reading them (cheap look at the non-tensor entries).
    """
    path = hub.resolve(source, sha256)
    try:
        return serialization.load_torch(path, mmap=mmap)
    except serialization.UnreadableFile as e:
        if what is None:
            raise
        raise UserError(f"{path!r} could not be read as a {what} ({e.detail}); {hint}") from None


# --------------------------------------------------------------------------------------------
# training checkpoints


def training_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: Optional[torch.amp.GradScaler],
    epoch: int,
    args_dict: Dict[str, Any],
    model_cfg: Optional[Dict[str, Any]] = None,
    step_in_epoch: int = 0,
    **extra: Any,
) -> Dict[str, Any]:
    """The dictionary this repo saves (MAE's keys plus ``model_cfg`` / ``step_in_epoch`` / extras)."""
    state = {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": int(epoch),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "args": args_dict,
        "step_in_epoch": int(step_in_epoch),
    }
    if model_cfg is not None:
        state["model_cfg"] = model_cfg
    state.update(extra)
    return state


def is_training_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and "model" in obj and "epoch" in obj


def position(ckpt: Dict[str, Any]) -> Tuple[int, int, int]:
    """How far training got, comparable between the checkpoints of one run (larger: later).

    Iteration-based files: their iteration; epoch-based files: (epochs done, iterations into the next).
    """
    if "iteration" in ckpt:
        return int(ckpt["iteration"]), 0, 0
    step = int(ckpt.get("step_in_epoch", 0))
    epoch = int(ckpt["epoch"])
    return -1, (epoch if step else epoch + 1), step


def checkpoint_files(output_dir: Path) -> List[Path]:
    """This run's checkpoints in ``output_dir`` (``checkpoint-last.pth``, ``checkpoint-<n>.pth``)."""
    if not output_dir.is_dir():
        return []
    return sorted(p for p in output_dir.iterdir() if p.name == LAST or _NUMBERED.match(p.name))


def find_resume(output_dir: Path) -> Optional[Path]:
    """The checkpoint in ``output_dir`` that got furthest, by the position stored inside it (not by
    name or modification time); files that do not load are skipped with a warning that says why."""
    best: Optional[Tuple[Tuple[int, int, int], bool, Path]] = None
    for path in checkpoint_files(output_dir):
        try:
            # mmap: reads the index and the pickle, not the tensors (a truncated file still fails,
            # its zip directory being at the end); the trainer then reads the chosen file once
            ckpt = read_checkpoint(str(path), mmap=True)
        except UserError as e:
            _log.warning("skipping checkpoint %s: %s", path, e)
            continue
        if not is_training_checkpoint(ckpt):
            _log.warning("skipping %s: not a training checkpoint (no 'model' and 'epoch' entries)", path)
            continue
        key = (position(ckpt), path.name == LAST, path)  # at equal positions, the last checkpoint
        if best is None or key[:2] > best[:2]:
            best = key
    return best[2] if best else None


def estimated_size(model: nn.Module, optimizer_states_per_param: int = 2) -> int:
    """Bytes of a training checkpoint: the state dict plus optimizer moments (AdamW: 2) per trainable parameter."""
    state = sum(t.numel() * t.element_size() for t in unwrap(model).state_dict().values())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return state + optimizer_states_per_param * trainable


def load_optimizer_state(ckpt: Dict[str, Any], path: str, optimizer: Optional[torch.optim.Optimizer] = None,
                         scaler: Optional[torch.amp.GradScaler] = None) -> None:
    """Load a training checkpoint's optimizer and loss-scaler state (the weights: ``util.convert.load_model_state``)."""
    if optimizer is not None and ckpt.get("optimizer"):
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except ValueError as e:
            raise UserError(f"Optimizer state in {path} does not match this run's parameter groups ({e}).") from None
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
