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

Every file is read by :func:`read_checkpoint`, the one reader: local files, ``.safetensors``, OpenAI's
TorchScript CLIP archives and http(s) URLs, pickles with ``torch.load(weights_only=True)`` (a
downloaded file cannot run code). Saves write a temporary file in the same directory, flush it to
disk and ``os.replace`` it over the target, so a crash or ``kill -9`` never leaves a half-written
checkpoint under a real name.
"""
import errno
import hashlib
import logging
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import urlparse

import torch
from torch import nn

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


def fetch_url(url: str, sha256: Optional[str] = None) -> str:
    """Download ``url`` once into the torch hub cache (progress bar); verify ``sha256`` if given."""
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    cache.mkdir(parents=True, exist_ok=True)
    dest = cache / (os.path.basename(urlparse(url).path) or "checkpoint.pth")
    if not dest.exists():
        _log.info("downloading %s to %s", url, dest)
        try:
            torch.hub.download_url_to_file(url, str(dest), progress=True)
        except Exception as e:  # network errors come in many types
            raise UserError(f"Could not download {url} ({e}). Offline? Download it elsewhere and pass the file.") from None
    if sha256:
        digest = hashlib.sha256(dest.read_bytes()).hexdigest()
        if not digest.startswith(sha256.lower()):
            raise UserError(f"{dest} has sha256 {digest}, expected {sha256}. Delete it to download again.")
    return str(dest)


def is_torchscript(path: str) -> bool:
    """A TorchScript archive (OpenAI's CLIP release), told apart from a torch.save zip by content."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    return any(n.endswith("constants.pkl") or "/code/" in n for n in names)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def read_checkpoint(source: str, sha256: Optional[str] = None, *, what: str = "PyTorch checkpoint",
                    hint: str = "it may be truncated.", mmap: bool = False) -> Any:
    """The object stored in a checkpoint: a local file, ``.safetensors`` or an http(s) URL.

    Pickles are loaded with ``weights_only=True``; a TorchScript archive gives its state dict.

    Args:
        what / hint: how messages about an unreadable file name it and what they advise.
        mmap: map the tensors instead of reading them (cheap look at the non-tensor entries).
    """
    path = fetch_url(source, sha256) if source.startswith(("http://", "https://")) else source
    if not os.path.isfile(path):
        raise UserError(f"Checkpoint {path!r} not found.")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file as load_safetensors

            return load_safetensors(path, device="cpu")
        if is_torchscript(path):
            with warnings.catch_warnings():  # torch.jit is deprecated, but OpenAI ships CLIP in it
                warnings.simplefilter("ignore", FutureWarning)
                return torch.jit.load(path, map_location="cpu").state_dict()
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise UserError(
            f"{path!r} holds Python objects that a weights-only load refuses ({_first_line(e)}). It was not "
            f"written by this repo or MAE; if you trust it, re-save its state dict with plain tensors."
        ) from None
    except Exception as e:  # truncated or foreign files fail in many ways (zip, index, EOF errors)
        raise UserError(f"{path!r} could not be read as a {what} ({_first_line(e)}); {hint}") from None


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


def load_training_state(ckpt: Dict[str, Any], path: str, model: nn.Module,
                        optimizer: Optional[torch.optim.Optimizer] = None,
                        scaler: Optional[torch.amp.GradScaler] = None) -> None:
    """Load a training checkpoint into model (strictly) / optimizer / scaler, with clear errors."""
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise UserError(f"{path} is not a training checkpoint (no 'model' entry).")
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
