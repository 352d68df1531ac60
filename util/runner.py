"""What every ``main_*`` script does around its training loop: start-up, resume, checkpoints, logs.

* start-up: distributed initialisation, device, output folder (checked writable before any work),
  logging (rank 0 only), mixed-precision dtype, seeding, TensorBoard;
* resume: ``--resume FILE``, else the newest readable checkpoint in ``--output_dir``;
* after each epoch: ``checkpoint-last.pth`` (atomic), ``checkpoint-{epoch}.pth`` every
  ``--save_every`` epochs and at the end, ``checkpoint-best.pth`` when asked, one JSON line in
  ``log.txt``;
* preemption (``util/preempt.py``): on SIGTERM / SIGUSR1 the epoch ends after an agreed optimizer
  step, ``checkpoint-last.pth`` records how far it got, and :class:`Preempted` ends the script.

Rank 0 takes the decisions that depend on the file system (which checkpoint to resume, whether a
save worked) and shares them, so ranks never disagree because of a stale network-file-system view
and never wait forever in a collective for a rank 0 that failed.
"""
import inspect
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from util import checkpoint as ckpt_util
from util import dist as dist_util
from util.errors import Preempted, UserError
from util.misc import (
    TensorBoard,
    append_jsonl,
    check_free_space,
    check_writable,
    resolve_amp,
    save_json,
    seed_everything,
    setup_logging,
    to_plain,
)
from util.preempt import StopSignal

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
    stop: StopSignal = field(default_factory=StopSignal)

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.finish()

    @property
    def is_main(self) -> bool:
        return self.info.rank == 0

    def on_main(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on rank 0 while the others wait; if it fails, every rank raises (none hangs).

        A :class:`UserError` (a full disk, say) reaches every rank with its message; any other
        exception is re-raised on rank 0 and reported on the others.
        """
        error, failure = None, None
        if self.is_main:
            try:
                fn()
            except UserError as e:
                error = ("user", str(e))
            except Exception as e:
                failure, error = e, ("bug", f"{type(e).__name__}: {e}")
        error = dist_util.broadcast_object(error)  # also the barrier
        if failure is not None:
            raise failure
        if error is not None:
            kind, msg = error
            raise UserError(msg) if kind == "user" else RuntimeError(f"rank 0 failed: {msg}")

    def args_dict(self) -> Dict[str, Any]:
        return to_plain(vars(self.args))

    def save_config(self, **extra: Any) -> None:
        """The resolved flags (and e.g. the model config) as ``config.json``."""
        if self.is_main:
            save_json({"args": self.args_dict(), **extra}, self.out_dir / "config.json")

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to train: ``--grad_checkpointing``, DDP when there are several processes,
        then ``--compile``. Checkpoints are always written from the plain ``model``
        (``util.checkpoint.unwrap``).

        No unused-parameter search (every parameter gets a gradient: only the supervised layers'
        decoders exist); buffers are synchronised once at start, not before every forward (the
        pre-training buffers are constants; a probe's BatchNorm statistics are synchronised
        before distributed evaluation instead).
        """
        if getattr(self.args, "grad_checkpointing", False):
            model.set_grad_checkpointing(True)
        if self.info.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            # torch >= 2.14 renames broadcast_buffers (and deprecates the old name)
            new_name = "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
            no_sync = {"forward_sync_buffers": False} if new_name else {"broadcast_buffers": False}
            model = nn.parallel.DistributedDataParallel(model, device_ids=ids, **no_sync)
        if getattr(self.args, "compile", False):
            model = torch.compile(model)
        return model

    def resume(self, model: nn.Module, optimizer, scaler,
               check: Optional[Callable[[Dict[str, Any], str], None]] = None) -> Tuple[int, int, Dict[str, Any]]:
        """(start_epoch, start_step, checkpoint dict or {}) from --resume or the output folder.

        ``check(checkpoint, path)`` may refuse it first (see ``ckpt_util.resume``). Rank 0 chooses
        the checkpoint and every rank loads that one. A mid-epoch checkpoint written with another
        total batch (processes x --batch_size) continues after the same samples
        (:func:`rescale_step`). Also checks that a checkpoint fits on the disk, unless only
        evaluating.
        """
        a = self.args
        if not getattr(a, "eval", False):
            check_free_space(self.out_dir, ckpt_util.estimated_size(model), "one checkpoint")
        path: Optional[str] = a.resume or None
        if path is None and a.auto_resume:
            found = ckpt_util.find_resume(self.out_dir) if self.is_main else None
            path = dist_util.broadcast_object(str(found) if found else None)
        if path is None:
            return a.start_epoch, 0, {}
        start_epoch, start_step, ckpt = ckpt_util.resume(Path(path), model, optimizer, scaler, check)
        if start_step:
            saved = ckpt.get("args") or {}
            old = int(saved.get("batch_size", a.batch_size)) * int(saved.get("world_size", self.info.world_size))
            new = a.batch_size * self.info.world_size
            if old != new:
                step = rescale_step(start_step, old, new, a.accum_iter)
                _log.warning("the checkpoint was written with a total batch of %d, this run has %d: continuing at "
                             "iteration %d instead of %d (the same samples done)", old, new, step, start_step)
                start_step = step
        return start_epoch, start_step, ckpt

    def end_epoch(self, state_fn: Callable[..., Dict[str, Any]], epoch: int, log: Dict[str, Any],
                  best: bool = False, stopped_at: Optional[int] = None) -> None:
        """Write this epoch's checkpoints and its ``log.txt`` line (rank 0), then wait for all ranks.

        Args:
            state_fn: ``state_fn(step_in_epoch=0)`` builds the checkpoint (called on rank 0 only).
            stopped_at: iterations done when a signal ended the epoch early (``train_one_epoch``'s
                ``stopped_at``): only ``checkpoint-last.pth`` is written, with ``step_in_epoch``,
                and :class:`Preempted` is raised. A signal agreed on during evaluation or saving
                stops the run once this epoch's checkpoints are written.
        """
        if stopped_at:
            self.write(files=[ckpt_util.LAST], state_fn=lambda: state_fn(step_in_epoch=stopped_at))
            self.preempted(f"epoch {epoch}, iteration {stopped_at}")
        files = [ckpt_util.LAST]
        if epoch % self.args.save_every == 0 or epoch + 1 == self.args.epochs:
            files.append(f"checkpoint-{epoch}.pth")
        if best:
            files.append("checkpoint-best.pth")
        self.write({**log, "epoch": epoch}, files, state_fn)
        if epoch + 1 < self.args.epochs and self.stop.sync():
            self.preempted(f"the start of epoch {epoch + 1}")

    def write(self, log: Optional[Dict[str, Any]] = None, files: Sequence[str] = (),
              state_fn: Optional[Callable[[], Dict[str, Any]]] = None) -> None:
        """Rank 0 saves ``state_fn()`` atomically under each name in ``files`` and appends ``log`` to
        ``log.txt`` while the others wait; a failure (a full disk) reaches every rank
        (:meth:`on_main`). Iteration-based scripts call this directly."""

        def save() -> None:
            if files:
                state = state_fn()
                for name in files:
                    ckpt_util.save_atomic(state, self.out_dir / name)
            if log is not None:
                append_jsonl(log, self.out_dir / "log.txt")
            self.tb.flush()

        self.on_main(save)

    def preempted(self, where: str) -> None:
        """Every rank: after checkpoint-last.pth is on disk, requeue (rank 0), then raise :class:`Preempted`.

        Args:
            where: the position the checkpoint holds, for the message (``"epoch 3, iteration 120"``).
        """
        msg = (f"{self.stop.signal_name} received: wrote {self.out_dir / ckpt_util.LAST} at {where}; "
               f"rerun the same command to continue")
        _log.info("%s", msg)
        # requeue before any rank exits: `srun --kill-on-bad-exit` may kill rank 0 once one rank has left
        job = dist_util.broadcast_object(self.stop.requeue() if self.is_main else None)
        if job:
            msg += f" (SLURM job {job} requeued)"
        self.finish()
        raise Preempted(msg)

    def finish(self) -> None:
        """Close the logs, leave the process group, put back the signal handlers (idempotent)."""
        self.stop.restore()
        self.tb.close()
        dist_util.cleanup()


def rescale_step(step: int, old_batch: int, new_batch: int, accum_iter: int = 1) -> int:
    """Iterations into an epoch that cover the samples ``step`` iterations of ``old_batch`` covered.

    The distributed sampler deals one global permutation round-robin, so after ``step`` iterations
    the samples used are its first ``step * old_batch`` (total batch = processes x per-process batch),
    whatever the number of processes. Rounded down to a whole batch and to an accumulation boundary.
    """
    new = step * old_batch // new_batch
    return new - new % max(1, accum_iter)


def start_run(args) -> Run:
    """Initialise everything a script needs before it builds data and models.

    Use it as a context manager (``with start_run(args) as run:``): the signal handlers are put
    back and the process group is left however the script ends.
    """
    stop = StopSignal(getattr(args, "stop_check_every", 10))
    stop.install()  # first: a signal during start-up is then recorded, not fatal
    try:
        info = dist_util.init_distributed(args)
        device = torch.device(args.device)
        out_dir = check_writable(args.output_dir)
        dist_util.barrier()
        setup_logging(info.rank, str(out_dir) if info.rank == 0 else None)
        if info.distributed:
            _log.info("distributed (%s, %s): %d processes; master %s:%s", info.launcher, torch.distributed.get_backend(),
                      info.world_size, info.master_addr, info.master_port)
        if info.rank == 0:
            ckpt_util.remove_stale_temps(out_dir)
        amp_dtype = resolve_amp(args.amp, device)
    except BaseException:
        stop.restore()
        dist_util.cleanup()
        raise
    seed_everything(args.seed)  # identical model initialisation on every rank
    tb = TensorBoard(args.log_dir or str(out_dir), enabled=info.rank == 0)
    return Run(info, device, out_dir, amp_dtype, tb, args, stop)
