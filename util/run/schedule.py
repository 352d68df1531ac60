"""When the trainer logs, evaluates and saves, and how it names a position: one small object per
kind of job, :class:`EpochSchedule` (MAE's jobs: pre-training, fine-tuning, probing) or
:class:`IterationSchedule` (segmentation). The trainer asks; it has no branch of its own per kind.

Steps are global (``done``: the steps completed so far; ``done // steps_per_epoch`` passes over the
data). A checkpoint's position fields are MAE's ``epoch`` / ``step_in_epoch``, plus ``iteration``
for iteration-based jobs (``util/checkpoints/reader.py``).
"""
import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Union

from util.checkpoints import reader as ckpt_util

_log = logging.getLogger(__name__)


def rescale_step(step: int, old_batch: int, new_batch: int, accum_iter: int = 1) -> int:
    """Iterations into an epoch that cover the samples ``step`` iterations of ``old_batch`` covered.

    The distributed sampler deals one global permutation round-robin, so after ``step`` iterations
    the samples used are its first ``step * old_batch`` (total batch = processes x per-process batch),
    whatever the number of processes. Rounded down to a whole batch and to an accumulation boundary.
    """
    new = step * old_batch // new_batch
    return new - new % max(1, accum_iter)


@dataclass(frozen=True)
class EpochSchedule:
    """MAE's epoch-based jobs: a log line every ``log_every`` iterations of an epoch and at its end;
    at every epoch end a commit (the job's epoch hook: evaluation, the best checkpoint; ``log.txt``;
    ``checkpoint-last.pth``, and ``checkpoint-<epoch>.pth`` every ``save_every`` epochs and at the
    last). A mid-epoch checkpoint carries the epoch's running means (``keeps_epoch_means``)."""

    steps_per_epoch: int
    log_every: int = 20
    save_every: int = 20
    keeps_epoch_means = True

    def log_due(self, done: int, last: bool) -> bool:
        return ((done - 1) % self.steps_per_epoch + 1) % self.log_every == 0 or self.epoch_end(done)

    def epoch_end(self, done: int) -> bool:
        return done % self.steps_per_epoch == 0

    def epoch_files(self, epoch: int, last: bool) -> List[str]:
        """The checkpoints the commit at the end of ``epoch`` writes."""
        return [ckpt_util.LAST] + ([ckpt_util.numbered(epoch)] if epoch % self.save_every == 0 or last else [])

    def evaluate_due(self, done: int, last: bool) -> bool:
        return False  # the job evaluates in its epoch hook

    def step_files(self, done: int, last: bool) -> List[str]:
        return []  # every commit with checkpoints is an epoch end

    def position(self, done: int) -> Dict[str, int]:
        """The checkpoint's ``epoch`` (the last one complete, or the running one) and ``step_in_epoch``."""
        epoch, it = divmod(done, self.steps_per_epoch)
        return {"epoch": epoch - 1, "step_in_epoch": 0} if it == 0 else {"epoch": epoch, "step_in_epoch": it}

    def start_of(self, ckpt: Dict[str, Any], batch_size: int, world_size: int, accum_iter: int) -> int:
        """The step to continue at after ``ckpt``; a mid-epoch checkpoint written with another total
        batch continues after the same samples (:func:`rescale_step`)."""
        epoch, step = int(ckpt["epoch"]), int(ckpt.get("step_in_epoch", 0))
        if not step:
            return (epoch + 1) * self.steps_per_epoch
        saved = ckpt.get("args") or {}
        old = int(saved.get("batch_size", batch_size)) * int(saved.get("world_size", world_size))
        new = batch_size * world_size
        if old != new:
            rescaled = rescale_step(step, old, new, accum_iter)
            _log.warning("the checkpoint was written with a total batch of %d, this run has %d: continuing at "
                         "iteration %d instead of %d (the same samples done)", old, new, rescaled, step)
            step = rescaled
        return epoch * self.steps_per_epoch + step

    def where(self, done: int) -> str:
        """A position for messages: ``epoch 3, iteration 120`` (``epoch 3`` at its start)."""
        epoch, it = divmod(done, self.steps_per_epoch)
        return f"epoch {epoch}" + (f", iteration {it}" if it else "")

    def where_step(self, step: int) -> str:
        """The step a non-finite value was seen at, for its message."""
        epoch, it = divmod(step, self.steps_per_epoch)
        return f"step {step} (epoch {epoch}, iteration {it})"

    def window_start(self, step: int) -> int:
        """The first step of the log window ``step`` is in (windows restart at every epoch)."""
        epoch, it = divmod(step, self.steps_per_epoch)
        return epoch * self.steps_per_epoch + it - it % self.log_every

    def left_in_epoch(self, done: int) -> Optional[int]:
        """Steps to the end of the epoch (the log line's epoch ETA)."""
        return (self.steps_per_epoch - done % self.steps_per_epoch) % self.steps_per_epoch


@dataclass(frozen=True)
class IterationSchedule:
    """Iteration-based jobs (segmentation): a log line every ``log_every`` steps and at the end;
    evaluation every ``eval_every`` steps (0: only at the end) and at the end; ``checkpoint-last.pth``
    and ``checkpoint-<iteration>.pth`` every ``save_every`` steps and at the end, ``checkpoint-last.pth``
    alone every ``save_last_every`` steps (0: never alone)."""

    steps_per_epoch: int
    log_every: int = 20
    save_every: int = 20
    save_last_every: int = 0
    eval_every: int = 0
    keeps_epoch_means = False

    def log_due(self, done: int, last: bool) -> bool:
        return done % self.log_every == 0 or last

    def epoch_end(self, done: int) -> bool:
        return False  # no epoch hook: the passes over the data are not commit points

    def evaluate_due(self, done: int, last: bool) -> bool:
        return bool(self.eval_every and done % self.eval_every == 0) or last

    def step_files(self, done: int, last: bool) -> List[str]:
        """The checkpoints the commit after step ``done`` writes."""
        if done % self.save_every == 0 or last:
            return [ckpt_util.LAST, ckpt_util.numbered(done)]
        if self.save_last_every and done % self.save_last_every == 0:
            return [ckpt_util.LAST]
        return []

    def position(self, done: int) -> Dict[str, int]:
        """The checkpoint's ``epoch`` (completed passes over the data), ``step_in_epoch`` (0) and ``iteration``."""
        return {"epoch": done // self.steps_per_epoch, "step_in_epoch": 0, "iteration": done}

    def start_of(self, ckpt: Dict[str, Any], batch_size: int, world_size: int, accum_iter: int) -> int:
        return int(ckpt.get("iteration", 0))

    def where(self, done: int) -> str:
        return f"iteration {done}"

    def where_step(self, step: int) -> str:
        return f"iteration {step}"

    def window_start(self, step: int) -> int:
        return step - step % self.log_every

    def left_in_epoch(self, done: int) -> Optional[int]:
        return None  # the job's own log line says the ETA


Schedule = Union[EpochSchedule, IterationSchedule]
