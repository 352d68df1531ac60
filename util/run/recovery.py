"""Recovery without a human: ``--on_nonfinite rollback`` and the ``--loss_spike`` rule.

A *trip* is a non-finite loss (the first NaN / inf step of any rank, agreed by every rank) or, with
``--loss_spike K``, a log window whose mean loss is above K times the median of the last
``--loss_spike_window`` windows. With ``--on_nonfinite stop`` (the default) a trip ends the run with
one ``error:`` line. With ``rollback`` the trainer (``util/run/trainer.py``):

1. returns to the newest intact checkpoint of the run (``checkpoint-last.pth``; before the run's
   first checkpoint, the state it started from, kept in memory until then);
2. skips the batches from the start of the log window that tripped to the tripping step (whole
   accumulation groups): those steps train nothing and draw nothing, the data position passes them,
   the learning-rate schedule keeps its step count; every other step is the step an uninterrupted
   run would have made, so a rerun of the same command makes the same decision;
3. with ``--fp32_after_rollback``, trains the rest of that epoch without mixed precision;
4. writes one console line, a ``log.txt`` record (``{"rollback": n, ...}``, at the step the skip
   ends) and a TensorBoard point (``train/rollback``), and goes on.

The rollbacks are part of every checkpoint (``rollbacks``; the spike rule's window means as
``loss_history``), so a resumed run skips and counts what the interrupted one did. After
``--max_rollbacks`` the next trip stops the run as ``stop`` would.

Testing: ``DEEPMIM_SCALE_LOSS=<step>[@<rank>]:<factor>,...`` multiplies the loss (and its logged
metrics) of a global step by ``factor`` (``nan``: a non-finite loss; ``1000``: a spike), on every
rank or on ``rank`` only.
"""
import logging
import os
import statistics
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from util.run.errors import UserError

import torch
from torch import nn

_log = logging.getLogger(__name__)

NONFINITE, SPIKE = "non-finite loss", "loss spike"


@dataclass(frozen=True)
class Trip:
    """What tripped: ``kind`` (:data:`NONFINITE` / :data:`SPIKE`), at global ``step`` (the first
    bad step; a spike: the window's last), ``what`` in words, and ``window``: the first step of the
    log window it belongs to."""

    kind: str
    step: int
    what: str
    window: int


class RollbackNeeded(Exception):
    """Raised on every rank at the same point when a trip is to be rolled back (caught by ``Trainer.fit``)."""

    def __init__(self, trip: Trip) -> None:
        super().__init__(trip.what)
        self.trip = trip


@dataclass(frozen=True)
class RecoveryConfig:
    """The flags (``util.config.typed.LoopConfig``) and the run's geometry."""

    on_nonfinite: str = "stop"
    max_rollbacks: int = 3
    loss_spike: Optional[float] = None
    loss_spike_window: int = 10
    fp32_after_rollback: bool = False
    steps_per_epoch: int = 1
    accum_iter: int = 1


class Recovery:
    """A run's rollbacks (what they skipped), the spike rule's window history, and the decision
    between a rollback and the stop."""

    def __init__(self, cfg: RecoveryConfig) -> None:
        self.cfg = cfg
        self.rollbacks: List[Dict[str, Any]] = []
        self.history: List[float] = []

    # -------------------------------------------------------------------------------------
    # checkpoints

    def state(self) -> Dict[str, Any]:
        """Entries of a checkpoint (none for a run that never rolled back nor watches spikes)."""
        out: Dict[str, Any] = {}
        if self.rollbacks:
            out["rollbacks"] = [dict(r) for r in self.rollbacks]
        if self.cfg.loss_spike:
            out["loss_history"] = list(self.history)
        return out

    def load(self, ckpt: Dict[str, Any]) -> None:
        """A resumed run: the rollbacks and window history of the checkpoint."""
        self.rollbacks = [dict(r) for r in ckpt.get("rollbacks") or []]
        self.history = [float(x) for x in ckpt.get("loss_history") or []]

    def restored(self, ckpt: Dict[str, Any]) -> None:
        """A rollback: the window history goes back with the weights; the rollbacks made since stay
        (they count, and a replay skips what they skipped)."""
        self.history = [float(x) for x in ckpt.get("loss_history") or []]

    # -------------------------------------------------------------------------------------
    # the loop

    def skipped(self, step: int) -> bool:
        return any(r["skipped"][0] <= step < r["skipped"][1] for r in self.rollbacks)

    def full_precision(self, step: int) -> bool:
        """Whether ``step`` trains without mixed precision (``--fp32_after_rollback``)."""
        return any(r["skipped"][1] <= step < r.get("fp32_until", 0) for r in self.rollbacks)

    def ending_at(self, done: int) -> List[Dict[str, Any]]:
        """The ``log.txt`` records of the rollbacks whose skip ends after step ``done``."""
        return [dict(r) for r in self.rollbacks if r["skipped"][1] == done]

    def spike(self, loss: float, done: int, window: int) -> Optional[Trip]:
        """The spike rule at the log step after ``done`` steps (``loss``: the window's mean over every
        rank; ``window``: its first step). Records the window otherwise."""
        k, n = self.cfg.loss_spike, self.cfg.loss_spike_window
        if not k:
            return None
        if len(self.history) >= n:
            median = statistics.median(self.history[-n:])
            if loss > k * median:
                return Trip(SPIKE, done - 1, f"the mean loss {loss:.4g} of the log window above {k:g} x {median:.4g}, "
                                             f"the median of the last {n} windows", window)
        self.history = (self.history + [float(loss)])[-n:]
        return None

    def decide(self, trip: Trip, where: Callable[[int], str]) -> None:
        """Raise :class:`RollbackNeeded` (``--on_nonfinite rollback`` with rollbacks left) or the
        :class:`UserError` that stops the run."""
        cfg = self.cfg
        if cfg.on_nonfinite == "rollback" and len(self.rollbacks) < cfg.max_rollbacks:
            raise RollbackNeeded(trip)
        made = ""
        if cfg.on_nonfinite == "rollback":
            made = (f" after {len(self.rollbacks)} rollback{'s' if len(self.rollbacks) != 1 else ''} "
                    f"(--max_rollbacks {cfg.max_rollbacks})")
        subject = "Non-finite loss" if trip.kind == NONFINITE else "Loss spike"
        raise UserError(
            f"{subject} at {where(trip.step)} in {trip.what}. Training stopped{made}; checkpoints already written "
            f"are intact. Lower the learning rate (--blr / --lr), add --clip_grad, or try --amp bf16 / --amp none"
            f"{'' if cfg.on_nonfinite == 'rollback' else '; --on_nonfinite rollback recovers by itself'}."
        )

    def plan(self, trip: Trip, restored_at: int, source: str, where: Callable[[int], str]) -> Dict[str, Any]:
        """The rollback of ``trip`` to the state after ``restored_at`` steps (read from ``source``):
        the steps it skips, recorded (and returned as its ``log.txt`` record)."""
        spe, accum = self.cfg.steps_per_epoch, max(1, self.cfg.accum_iter)
        first = max(trip.window, restored_at)
        first -= (first % spe) % accum  # whole accumulation groups
        first = max(first, restored_at)
        last = trip.step
        end = min(last - (last % spe) % accum + accum, (last // spe + 1) * spe)  # its group's end, in its epoch
        record = {"rollback": len(self.rollbacks) + 1, "trigger": trip.kind, "step": trip.step,
                  "where": where(trip.step), "what": trip.what, "restored": source, "restored_step": restored_at,
                  "skipped": [first, end]}
        if self.cfg.fp32_after_rollback:
            record["fp32_until"] = (end // spe + 1) * spe
        self.rollbacks.append(record)
        n = record["rollback"]
        skipped = f"step {first}" if end - first == 1 else f"steps {first}-{end - 1} ({end - first} batches)"
        fp32 = f"; steps {end}-{record['fp32_until'] - 1} without mixed precision" if "fp32_until" in record else ""
        _log.warning("rollback %d of at most %d: %s at %s in %s; back to %s (step %d), skipping %s%s", n,
                     self.cfg.max_rollbacks, trip.kind, where(trip.step), trip.what, source, restored_at, skipped, fp32)
        return record


# --------------------------------------------------------------------------------------------
# testing


def injected(rank: int) -> Dict[int, float]:
    """``DEEPMIM_SCALE_LOSS`` (module docstring): global step -> the factor of this rank's loss."""
    spec = os.environ.get("DEEPMIM_SCALE_LOSS", "")
    out: Dict[int, float] = {}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        where, _, factor = item.partition(":")
        step, _, only = where.partition("@")
        if not only or int(only) == rank:
            out[int(step)] = float(factor or "nan")
    return out


def scaled(loss_fn: Callable[[nn.Module, Any], Tuple[torch.Tensor, torch.Tensor]], factor: float
           ) -> Callable[[nn.Module, Any], Tuple[torch.Tensor, torch.Tensor]]:
    """``loss_fn`` with its loss and metrics multiplied by ``factor`` (testing recovery)."""

    def loss(model: nn.Module, batch: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        value, metrics = loss_fn(model, batch)
        return value * factor, metrics * factor

    return loss
