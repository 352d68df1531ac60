"""What every ``main_*`` script does around its training loop: start-up, resume, checkpoints, logs.

* start-up: distributed initialisation, device, output folder (checked writable before any work),
  logging (rank 0 only), mixed-precision dtype, seeding, TensorBoard;
* resume: ``--resume FILE``, else the newest readable checkpoint in ``--output_dir``;
* after each epoch: ``checkpoint-last.pth`` (atomic), ``checkpoint-{epoch}.pth`` every
  ``--save_every`` epochs and at the end, ``checkpoint-best.pth`` when asked, one JSON line in
  ``log.txt``.
"""
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from util import checkpoint as ckpt_util
from util import dist as dist_util
from util.misc import TensorBoard, append_jsonl, check_writable, resolve_amp, save_json, seed_everything, setup_logging, to_plain

_log = logging.getLogger(__name__)


@dataclass
class Run:
    """One training / evaluation job's environment."""

    info: dist_util.DistInfo
    device: torch.device
    out_dir: Path
    amp_dtype: Optional[torch.dtype]
    tb: TensorBoard
    args: Any

    @property
    def is_main(self) -> bool:
        return self.info.rank == 0

    def args_dict(self) -> Dict[str, Any]:
        return to_plain(vars(self.args))

    def save_config(self, **extra: Any) -> None:
        """The resolved flags (and e.g. the model config) as ``config.json``."""
        if self.is_main:
            save_json({"args": self.args_dict(), **extra}, self.out_dir / "config.json")

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP around ``model`` when there are several processes (no unused-parameter search)."""
        if not self.info.distributed:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)

    def resume(self, model: nn.Module, optimizer, scaler) -> Tuple[int, int, Dict[str, Any]]:
        """(start_epoch, start_step, checkpoint dict or {}) from --resume or the output folder."""
        a = self.args
        path = Path(a.resume) if a.resume else (ckpt_util.find_resume(self.out_dir) if a.auto_resume else None)
        if path is None:
            return a.start_epoch, 0, {}
        return ckpt_util.resume(path, model, optimizer, scaler)

    def end_epoch(self, state_fn: Callable[[], Dict[str, Any]], epoch: int, log: Dict[str, Any],
                  best: bool = False) -> None:
        """Write this epoch's checkpoints and its ``log.txt`` line (rank 0), then wait for all ranks."""
        files = [ckpt_util.LAST]
        if epoch % self.args.save_every == 0 or epoch + 1 == self.args.epochs:
            files.append(f"checkpoint-{epoch}.pth")
        if best:
            files.append("checkpoint-best.pth")
        self.write({**log, "epoch": epoch}, files, state_fn)

    def write(self, log: Optional[Dict[str, Any]] = None, files: Sequence[str] = (),
              state_fn: Optional[Callable[[], Dict[str, Any]]] = None) -> None:
        """Rank 0 saves ``state_fn()`` atomically under each name in ``files`` and appends ``log`` to
        ``log.txt``; then all ranks wait (iteration-based scripts call this directly)."""
        if self.is_main:
            if files:
                state = state_fn()
                for name in files:
                    ckpt_util.save_atomic(state, self.out_dir / name)
            if log is not None:
                append_jsonl(log, self.out_dir / "log.txt")
            self.tb.flush()
        dist_util.barrier()

    def finish(self) -> None:
        self.tb.close()
        dist_util.cleanup()


def start_run(args) -> Run:
    """Initialise everything a script needs before it builds data and models."""
    info = dist_util.init_distributed(args)
    device = torch.device(args.device)
    out_dir = check_writable(args.output_dir)
    dist_util.barrier()
    setup_logging(info.rank, str(out_dir) if info.rank == 0 else None)
    amp_dtype = resolve_amp(args.amp, device)
    seed_everything(args.seed)  # identical model initialisation on every rank
    tb = TensorBoard(args.log_dir or str(out_dir), enabled=info.rank == 0)
    return Run(info, device, out_dir, amp_dtype, tb, args)
