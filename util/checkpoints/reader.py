"""Checkpoint I/O: the one reader, atomic saves, and which checkpoint to resume.

Format (MAE's, so released checkpoints and MAE-derived tools keep working)::

    {'model': state_dict, 'optimizer': ..., 'epoch': int, 'scaler': ..., 'args': dict,
     'model_cfg': dict,          # plain-type model config: rebuild without the CLI
     'step_in_epoch': int,       # > 0 only for a mid-epoch (preemption) checkpoint
     'commit': dict,             # what the trainer writes after this file (util/run/trainer.py)
     'partial': dict}            # a mid-epoch checkpoint's running metric sums

Iteration-based training (segmentation) adds ``'iteration'``: the optimizer steps done; its
``epoch`` then counts the completed passes over the training set.

``epoch`` is the last epoch the checkpoint covers completely (MAE: resume at ``epoch + 1``); a
mid-epoch checkpoint stores the running epoch and the number of iterations already done in it.

Every file is read by :func:`read_checkpoint`, the one reader: local files, published names, URLs
and hub names (``util/checkpoints/hub.py``); pickles with ``torch.load(weights_only=True)`` and MAE's
``argparse.Namespace`` allowed, ``.safetensors``, OpenAI's TorchScript CLIP archives without
``torch.jit`` (``util/checkpoints/serialization.py``): a downloaded file cannot run code. Saves write a temporary
file in the same directory, flush it to disk and ``os.replace`` it over the target, so a crash or
``kill -9`` never leaves a half-written checkpoint under a real name (``util.checkpoints.files.write_atomic``);
a full disk stops with one message and removes the partial file.

**Integrity.** ``torch.save`` writes a zip archive whose every record (the pickle, each tensor's
storage) carries its CRC-32, computed as it is written; ``torch.load`` does not check them, so a
flipped bit in a tensor loads silently. :func:`verify` recomputes them: auto-resume
(:func:`find_resume`) and ``--resume`` verify before use, so a checkpoint that changed on disk is
skipped or refused with a message. This needs no change to MAE's format and works for any torch
zip, released checkpoints included. Cost: one more pass over the file, once per run, shorter than
the ``torch.load`` that follows (which then finds the file in the page cache; docs/PERFORMANCE.md). A sha256
stored inside the file would cost a pass at save time as well and a slower hash, and could not
cover the pickle that holds it. CRC-32 detects accidental corruption, not deliberate tampering:
downloads are checked against their published sha256 (``util/checkpoints/hub.py``).
"""
import logging
import os
import re
import socket
import time
import zipfile
import zlib
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from util.checkpoints import hub, serialization
from util.checkpoints.files import parse_temp, pid_running, write_atomic
from util.run import dist as dist_util
from util.run.errors import UserError

import torch
from torch import nn

_log = logging.getLogger(__name__)

LAST = "checkpoint-last.pth"
BEST = "checkpoint-best.pth"
_NUMBERED = re.compile(r"^checkpoint-(\d+)\.pth$")
# a partial file of another host is taken for a dead writer's once it has not changed for this long
# (a live save writes continuously; this host's writers are checked by PID instead)
STALE_AFTER_S = 600


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


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` atomically; a failed write (full disk, quota, permission, I/O
    error) raises one :class:`UserError` with the path and the free space, removes its temporary
    file and keeps the old ``path`` (:func:`util.checkpoints.files.write_atomic`)."""
    write_atomic(Path(path), lambda f: torch.save(obj, f))


def remove_stale_temps(output_dir: Path) -> Tuple[List[str], List[str]]:
    """Delete the partial checkpoints that :func:`save_atomic` leaves when its process dies mid-save;
    returns (names removed, names kept with the reason).

    Only a dead writer's: the temporary name holds the writer's host and PID. This host's file is
    removed when that PID is not running; another host's, when it has not changed for
    :data:`STALE_AFTER_S` seconds (a live save writes continuously). Call at start-up, with the
    folder's lock held (``util/run/lock.py``) and before any free-space check: the space is then back.
    """
    removed: List[str] = []
    kept: List[str] = []
    if not output_dir.is_dir():
        return removed, kept
    host = socket.gethostname()
    for p in sorted(output_dir.iterdir()):
        parsed = parse_temp(p.name)
        if parsed is None or not parsed[0].startswith("checkpoint"):
            continue
        _, writer_host, pid = parsed
        if writer_host in (None, host):
            if pid_running(pid):
                kept.append(f"{p.name} (its writer, PID {pid}, is running)")
                continue
        else:
            try:
                age = time.time() - p.stat().st_mtime
            except FileNotFoundError:
                continue
            if age < STALE_AFTER_S:
                kept.append(f"{p.name} (written on host {writer_host} {age:.0f} s ago; removed once it is "
                            f"{STALE_AFTER_S // 60} minutes old)")
                continue
        try:
            p.unlink()
        except FileNotFoundError:
            continue
        removed.append(p.name)
    return removed, kept


# --------------------------------------------------------------------------------------------
# reading: the one reader


class CorruptCheckpoint(UserError):
    """A checkpoint whose contents changed after it was written (a record's CRC-32 differs)."""

    def __init__(self, path: str, detail: str) -> None:
        super().__init__(
            f"Checkpoint {path} is corrupt ({detail}): it changed after it was written (a disk, memory or "
            f"copy error), so its weights cannot be trusted. Use another checkpoint, or copy it again.")
        self.detail = detail


def verify(path: str) -> bool:
    """Check every record of a torch zip checkpoint against the CRC-32 stored with it.

    Returns True when verified, False when the file holds no checksums to check (the legacy
    pickle format, safetensors, an archive written with torch's CRC computation turned off).

    Raises:
        CorruptCheckpoint: a record whose CRC-32 differs, or a damaged archive.
    """
    path = str(path)
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            if not any(i.CRC for i in infos if i.file_size):
                return False  # written after torch.serialization.set_crc32_options(False): zeros
            for info in infos:
                with zf.open(info) as f:  # ZipExtFile checks the CRC-32 when it reaches the end
                    while f.read(1 << 22):
                        pass
    except (zipfile.BadZipFile, EOFError, zlib.error, ValueError) as e:
        raise CorruptCheckpoint(path, str(e).strip() or type(e).__name__) from None
    return True


def read_checkpoint(source: str, sha256: Optional[str] = None, *, what: Optional[str] = None, hint: str = "",
                    mmap: bool = False, check: bool = False) -> Any:
    """The object stored in a checkpoint: a file, a published name, a URL or a hub name
    (:func:`util.checkpoints.hub.resolve`), read without running code from it (:func:`util.checkpoints.serialization.load_torch`).

    Args:
        sha256: expected digest of a download.
        what / hint: how a message about an unreadable file names it and what it advises
            (default: the generic message).
        mmap: map the tensors instead of reading them (cheap look at the non-tensor entries).
        check: :func:`verify` the file first (one more pass over it); a corrupt file raises
            :class:`CorruptCheckpoint`.
    """
    path = hub.resolve(source, sha256)
    if check and os.path.isfile(path) and not verify(path):
        _log.info("%s holds no checksums (legacy or safetensors format): read without verification", path)
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
    """The intact checkpoint in ``output_dir`` that got furthest, by the training position stored
    inside it (:func:`position`; not by name or modification time); at equal positions,
    ``checkpoint-last.pth``. Each file skipped is named in a warning with the reason: unreadable,
    not a training checkpoint, or corrupt (:func:`verify`, run on the furthest file, then on the
    next one if that fails)."""
    found: List[Tuple[Tuple[int, int, int], bool, Path]] = []
    for path in checkpoint_files(output_dir):
        try:
            # mmap: reads the index and the pickle, not the tensors (a truncated file still fails,
            # its zip directory being at the end); the trainer then reads the chosen file once
            ckpt = read_checkpoint(str(path), mmap=True)
        except UserError as e:
            try:  # a damaged record is the likelier story, and the clearer reason
                verify(str(path))
                reason = getattr(e, "detail", str(e))
            except CorruptCheckpoint as c:
                reason = f"corrupt: {c.detail}"
            _log.warning("skipping checkpoint %s: unreadable (%s)", path, reason)
            continue
        if not is_training_checkpoint(ckpt):
            _log.warning("skipping checkpoint %s: not a training checkpoint (no 'model' and 'epoch' entries)", path)
            continue
        found.append((position(ckpt), path.name == LAST, path))
    for _, _, path in sorted(found, key=lambda c: c[:2], reverse=True):
        try:
            verify(str(path))
        except CorruptCheckpoint as e:
            _log.warning("skipping checkpoint %s: corrupt (%s); trying the next furthest", path, e.detail)
            continue
        return path
    return None


def resume_source(output_dir: Path, resume: Optional[str], auto_resume: bool, is_main: bool) -> Optional[str]:
    """The checkpoint a run continues from, the same on every process: ``--resume FILE`` as given;
    else, with auto-resume, :func:`find_resume` in ``output_dir`` (searched by rank 0, its choice
    broadcast, so that every rank loads the same file); else None (a fresh start)."""
    if resume:
        return resume
    if not auto_resume:
        return None
    found = find_resume(output_dir) if is_main else None
    return dist_util.broadcast_object(str(found) if found else None)


def estimated_size(model: nn.Module, optimizer_states_per_param: int = 2) -> int:
    """Bytes of a training checkpoint: the state dict plus optimizer moments (AdamW: 2) per trainable parameter."""
    state = sum(t.numel() * t.element_size() for t in unwrap(model).state_dict().values())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return state + optimizer_states_per_param * trainable


def load_optimizer_state(ckpt: Dict[str, Any], path: str, optimizer: Optional[torch.optim.Optimizer] = None,
                         scaler: Optional[torch.amp.GradScaler] = None) -> None:
    """Load a training checkpoint's optimizer and loss-scaler state.

    The weights: ``util.checkpoints.convert.load_model_state``."""
    if optimizer is not None and ckpt.get("optimizer"):
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except ValueError as e:
            raise UserError(f"Optimizer state in {path} does not match this run's parameter groups ({e}).") from None
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
