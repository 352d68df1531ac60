"""Checkpoint I/O: atomic saves, safe loads, automatic resume.

Format (MAE's, so released checkpoints and MAE-derived tools keep working)::

    {'model': state_dict, 'optimizer': ..., 'epoch': int, 'scaler': ..., 'args': dict,
     'model_cfg': dict,          # plain-type model config: rebuild without the CLI
     'step_in_epoch': int}       # > 0 only for a mid-epoch (preemption) checkpoint

Iteration-based training (segmentation) adds ``'iteration'``: the optimizer steps done; its
``epoch`` then counts the completed passes over the training set.

``epoch`` is the last epoch the checkpoint covers completely (MAE: resume at ``epoch + 1``); a
mid-epoch checkpoint stores the running epoch and the number of iterations already done in it.

Every file is loaded with ``torch.load(weights_only=True)``: a downloaded file cannot run code. Saves
write a temporary file in the same directory, flush it to disk and ``os.replace`` it over the
target, so a crash or ``kill -9`` never leaves a half-written checkpoint under a real name.
"""
import errno
import logging
import os
import pickle
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from util.errors import UserError

_log = logging.getLogger(__name__)

LAST = "checkpoint-last.pth"
_NUMBERED = re.compile(r"^checkpoint-(\d+)\.pth$")
_TMP = ".tmp-"  # save_atomic writes ".<name>.tmp-<pid>" next to the target


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP and ``torch.compile`` wrappers (what gets saved)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        else:
            return model


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


def load_file(path: str) -> Any:
    """Load a checkpoint with ``weights_only=True``; clear errors for missing / foreign / broken files."""
    if not os.path.isfile(path):
        raise UserError(f"Checkpoint {path!r} not found.")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file as load_safetensors

        try:
            return load_safetensors(path, device="cpu")
        except Exception as e:  # safetensors raises its own error types
            raise UserError(f"{path!r} is not a readable safetensors file ({e}).") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(
            f"{path!r} holds Python objects that a weights-only load refuses ({first}). It was not "
            f"written by this repo or MAE; if you trust it, re-save its state dict with plain tensors."
        ) from None
    except Exception as e:  # truncated or foreign files fail in many ways (zip, index, EOF errors)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path!r} is not a readable PyTorch checkpoint ({first}); it may be truncated.") from None


def checkpoint_files(output_dir: Path) -> List[Path]:
    """This run's checkpoints in ``output_dir``, newest first (by modification time)."""
    if not output_dir.is_dir():
        return []
    files = [p for p in output_dir.iterdir() if p.name == LAST or _NUMBERED.match(p.name)]
    return sorted(files, key=lambda p: p.stat().st_mtime_ns, reverse=True)


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


def find_resume(output_dir: Path) -> Optional[Path]:
    """The newest checkpoint in ``output_dir`` that loads; broken files are skipped with a warning."""
    for path in checkpoint_files(output_dir):
        try:
            # mmap: reads the index and the pickle, not the tensors (a truncated file still fails,
            # its zip directory being at the end); resume() then reads the file once
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # any unreadable file: fall back to an older one
            _log.warning("skipping unreadable checkpoint %s (%s)", path, str(e).splitlines()[0] if str(e) else e)
            continue
        if isinstance(ckpt, dict) and "model" in ckpt and "epoch" in ckpt:
            return path
    return None


def estimated_size(model: nn.Module, optimizer_states_per_param: int = 2) -> int:
    """Bytes of a training checkpoint: the state dict plus optimizer moments (AdamW: 2) per trainable parameter."""
    state = sum(t.numel() * t.element_size() for t in unwrap(model).state_dict().values())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return state + optimizer_states_per_param * trainable


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
    """The dictionary this repo saves (MAE's keys plus ``model_cfg`` / ``step_in_epoch``)."""
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


def resume(
    path: Path,
    model: nn.Module,
    optimizer: Optional[torch.optim.Optimizer],
    scaler: Optional[torch.amp.GradScaler],
    check: Optional[Callable[[Dict[str, Any], str], None]] = None,
) -> Tuple[int, int, Dict[str, Any]]:
    """Load a training checkpoint into model / optimizer / scaler.

    Args:
        check: called with (checkpoint, path) before anything is loaded; raises a ``UserError``
            that says more than a state-dict mismatch would (e.g. other targets).

    Returns:
        (start_epoch, start_step, checkpoint): where training continues (``start_step`` iterations
        into ``start_epoch``) and the loaded dictionary (for extra keys such as the best accuracy).
    """
    ckpt = load_file(str(path))
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise UserError(f"{path} is not a training checkpoint (no 'model' entry).")
    if check is not None:
        check(ckpt, str(path))
    try:
        unwrap(model).load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as e:
        raise UserError(
            f"Checkpoint {path} was written for a different model or flags: "
            f"{str(e).splitlines()[0]} ... Pass the flags it was trained with, or use a fresh --output_dir."
        ) from None
    if optimizer is not None and ckpt.get("optimizer"):
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except ValueError as e:
            raise UserError(f"Optimizer state in {path} does not match this run's parameter groups ({e}).") from None
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    step = int(ckpt.get("step_in_epoch", 0))
    epoch = int(ckpt["epoch"])
    start_epoch, start_step = (epoch, step) if step > 0 else (epoch + 1, 0)
    if "iteration" in ckpt:  # iteration-based training (segmentation) continues from its own counter
        _log.info("resumed from %s: continuing at iteration %d", path, int(ckpt["iteration"]))
    else:
        _log.info("resumed from %s: continuing at epoch %d%s", path, start_epoch,
                  f", iteration {start_step}" if start_step else "")
    return start_epoch, start_step, ckpt
