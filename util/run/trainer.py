"""The one training loop. Pre-training, fine-tuning, linear probing and segmentation are each a
:class:`Job` (a loss function plus hooks) that :class:`Trainer` runs; none has a loop of its own.

The trainer counts global steps (one step = one batch on every process; ``step // steps_per_epoch``
is the epoch, kept for MAE's flags, ``log.txt`` and the checkpoint's ``epoch`` field). Per step:

1. the learning rate of the step (``job.lr(step)``, at each accumulation boundary), and the seed of
   the step: masks, mixup, drop path, every random draw is a function of (seed, step, rank), so a
   resumed run continues with exactly the numbers an uninterrupted run would have drawn;
2. forward, backward (gradient accumulation without DDP's all-reduce on accumulation steps), loss
   scaling, clipping, the optimizer step (:func:`train_step`);
3. every ``log_every`` steps: the window's mean metrics (console, TensorBoard, and the job's own
   ``log.txt`` record where it has one); the non-finite guard (:class:`NonFiniteTracker`); where
   the time goes (:class:`Progress`: data-loading share, images/s, ETA of the epoch and the run,
   peak memory);
4. commit points, when the schedule (``util/run/schedule.py``) says: at the end of every epoch
   (epoch-based jobs: the job's epoch hook, e.g. evaluation and the best checkpoint, then ``log.txt``
   and the checkpoints) or every ``eval_every`` / ``save_every`` / ``save_last_every`` steps
   (iteration-based jobs);
5. preemption: SIGTERM / SIGUSR1 stop every rank after the same optimizer step
   (``util/run/preempt.py``); ``checkpoint-last.pth`` records the position and the running sums, and
   :class:`util.run.errors.Preempted` ends the script.

Host synchronisation happens only at log steps and commit points: metrics are summed on the device,
and the non-finite check keeps the first bad (step, metric) in a device tensor. A NaN therefore
stops training within ``log_every`` steps, before any checkpoint is written from corrupted weights.

**Crash consistency.** A commit writes ``checkpoint-last.pth`` first and names in it what follows; a
rerun completes an interrupted commit before it continues (``util/run/commit.py``), so a ``kill -9``
at any moment loses no log line or checkpoint and duplicates none. A mid-epoch checkpoint also
carries the epoch's running metric sums, so a resumed epoch logs the mean over the whole epoch.
"""
import contextlib
import dataclasses
import inspect
import io
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from util.checkpoints import convert
from util.checkpoints import reader as ckpt_util
from util.checkpoints.files import check_free_space
from util.config.typed import LoopConfig, TrainConfig
from util.data.build import TrainData
from util.run import dist as dist_util
from util.run.amp import autocast
from util.run.commit import CommitLog
from util.run.errors import UserError
from util.run.logs import fmt_seconds, peak_memory
from util.run.lr_sched import applied_lr, set_lr
from util.run.recovery import NONFINITE, Recovery, RecoveryConfig, RollbackNeeded, Trip, injected, scaled
from util.run.runner import Run
from util.run.schedule import EpochSchedule, IterationSchedule, Schedule
from util.run.seed import derive_seed, seed_everything

import torch
from torch import nn

_log = logging.getLogger(__name__)

Batch = Tuple[Any, ...]  # tensors, or nested lists / dicts of them (detection: images, targets)
# loss_fn(model, batch) -> (loss to back-propagate, detached metrics [M] summed into the logs)
LossFn = Callable[[nn.Module, Batch], Tuple[torch.Tensor, torch.Tensor]]


# --------------------------------------------------------------------------------------------
# one step


class NonFiniteTracker:
    """Remembers, on the device, the first (step, metric) that was NaN or infinite."""

    _NONE = 2**62  # no bad value seen (larger than any code)

    def __init__(self, labels: Sequence[str], device: torch.device) -> None:
        self.labels = list(labels)
        self.first = torch.full((), self._NONE, dtype=torch.long, device=device)

    def update(self, metrics: torch.Tensor, step: int) -> None:
        bad = ~torch.isfinite(metrics)
        code = step * len(self.labels) + torch.argmax(bad.to(torch.int32))
        self.first = torch.where(bad.any(), torch.minimum(self.first, code), self.first)

    def first_bad(self) -> Optional[Tuple[int, str]]:
        """(step, metric label) of the first non-finite value on any rank (the earliest step, then the
        first metric), or None: a collective, one host sync."""
        first = int(dist_util.all_reduce_min(self.first.clone()).item())
        if first == self._NONE:
            return None
        step, which = divmod(first, len(self.labels))
        return step, self.labels[which]

    def reset(self) -> None:
        self.first.fill_(self._NONE)


def to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor in it moved to ``device`` (asynchronously): a batch of tensors, or
    detection's (list of images, list of target dicts)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(x, device) for x in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def train_step(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    amp_dtype: Optional[torch.dtype],
    accum: int = 1,
    update: bool = True,
    clip_grad: Optional[float] = None,
) -> torch.Tensor:
    """Forward and backward of one batch, then (if ``update``) the optimizer step; returns the
    detached float metrics [M] (on the device, no host sync).

    Without ``update`` the gradients accumulate, and DDP skips its all-reduce (``no_sync``).
    """
    batch = to_device(batch, device)
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    with model.no_sync() if ddp and not update else contextlib.nullcontext():
        with autocast(device, amp_dtype):
            loss, metrics = loss_fn(model, batch)
        scaler.scale(loss / accum).backward()
    if update:
        if clip_grad:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    return metrics.detach().float()


def wrap(model: nn.Module, device: torch.device, distributed: bool, grad_checkpointing: bool = False,
         compile: bool = False) -> nn.Module:
    """The module to train: ``--grad_checkpointing``, DDP when there are several processes, then
    ``--compile``. Checkpoints are always written from the plain ``model``
    (``util.checkpoints.reader.unwrap``).

    No unused-parameter search (every parameter gets a gradient: only the supervised layers'
    decoders exist); buffers are synchronised once at start, not before every forward (the
    pre-training buffers are constants; a probe's BatchNorm statistics are synchronised before
    distributed evaluation instead).
    """
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    if distributed:
        ids = [device.index] if device.type == "cuda" else None
        # torch >= 2.14 renames broadcast_buffers (and deprecates the old name)
        new_name = "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
        no_sync = {"forward_sync_buffers": False} if new_name else {"broadcast_buffers": False}
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids, **no_sync)
    if compile:
        model = torch.compile(model)
    return model


# --------------------------------------------------------------------------------------------
# jobs


@dataclass
class Commit:
    """What a hook adds to a commit point: ``log.txt`` records and checkpoint names (e.g. the best)."""

    records: List[Dict[str, Any]]
    files: List[str]


class Job:
    """What differs between pre-training, fine-tuning, probing and segmentation.

    Subclasses set ``model`` / ``optimizer`` / ``scaler`` and ``metric_names``, and implement
    :meth:`loss` and :meth:`lr`; the hooks have defaults that do nothing.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    metric_names: Sequence[str] = ("loss",)
    metric_weights: Optional[Sequence[float]] = None  # weights of the metrics in the logged total loss

    def loss(self, model: nn.Module, batch: Batch) -> Tuple[torch.Tensor, torch.Tensor]:
        """(loss to back-propagate, detached metrics [M]) of one batch, under autocast."""
        raise NotImplementedError

    def lr(self, step: int) -> float:
        """The base learning rate of global step ``step`` (each param group scales it by ``lr_scale``)."""
        raise NotImplementedError

    def metric_labels(self) -> List[str]:
        """How the non-finite message names each metric."""
        return [f"the loss of {n}" for n in self.metric_names]

    def summary(self, values: Sequence[float]) -> Dict[str, float]:
        """The logged names of mean metric ``values``: ``loss`` (their weighted sum) and ``loss_<name>``."""
        names = list(self.metric_names)
        weights = list(self.metric_weights) if self.metric_weights is not None else [1.0] * len(names)
        out = {"loss": sum(w * v for w, v in zip(weights, values))}
        if len(names) > 1 or names[0] != "loss":
            out.update({f"loss_{n}": v for n, v in zip(names, values)})
        return out

    def progress(self, trainer: "Trainer", done: int, values: Sequence[float], summary: Dict[str, float], lr: float,
                 sec_per_it: float) -> str:
        """The console line of a log step (MAE's: ``epoch 3 [40/312] loss ... lr ... s/it``); the trainer
        adds the timing fields after it (:meth:`Progress.fields`)."""
        epoch, it = divmod(done - 1, trainer.steps_per_epoch)
        names = list(self.metric_names)
        parts = " ".join(f"{n} {v:.4f}" for n, v in zip(names, values)) if len(names) > 1 else ""
        return (f"epoch {epoch} [{it + 1}/{trainer.steps_per_epoch}] loss {summary['loss']:.4f}"
                f"{f' ({parts})' if parts else ''} lr {lr:.3e} {sec_per_it:.3f} s/it")

    def on_log(self, trainer: "Trainer", done: int, summary: Dict[str, float], lr: float,
               sec_per_it: float) -> Optional[Dict[str, Any]]:
        """A ``log.txt`` record for this log step (iteration-based jobs), or None."""
        return None

    def on_epoch_end(self, trainer: "Trainer", epoch: int, train: Dict[str, float]) -> Commit:
        """Epoch-based jobs: the epoch's ``log.txt`` record from the training stats (``train_*``: the
        epoch's mean metrics and mean lr), plus whatever the job adds (evaluation, the best
        checkpoint). The trainer adds ``epoch`` and ``n_parameters`` to each record (MAE's keys)."""
        return Commit([{f"train_{k}": v for k, v in train.items()}], [])

    def on_start(self, trainer: "Trainer", start: int) -> None:
        """Before the first step of this run (``start``: the step it begins at; 0 for a fresh run)."""

    def on_step(self, trainer: "Trainer", done: int) -> Commit:
        """Iteration-based jobs: evaluation records (and files) at step ``done``."""
        return Commit([], [])

    def check_resume(self, ckpt: Dict[str, Any], path: str) -> None:
        """Refuse a checkpoint with a clearer message than a state-dict mismatch would give."""

    def extra_state(self) -> Dict[str, Any]:
        """Entries the job adds to every checkpoint (``model_cfg``, the best accuracy, ...)."""
        return {}

    def load_extra_state(self, ckpt: Dict[str, Any]) -> None:
        """Take back what :meth:`extra_state` stored."""

    def result(self, trainer: "Trainer", elapsed: float) -> Dict[str, Any]:
        """What ``fit`` returns (and logs) when training is done."""
        _log.info("training time %s", fmt_seconds(elapsed))
        return dict(trainer.last_train)


# --------------------------------------------------------------------------------------------
# the trainer


@dataclass(frozen=True, kw_only=True)
class TrainerConfig(LoopConfig):
    """How the trainer runs a job: the loop's flags (:class:`util.config.typed.LoopConfig`, where each is
    declared with its flag) and what the script works out from the data and the schedule.

    ``by_epoch``: MAE's epoch-based jobs (log interval counted within each epoch; commit at every
    epoch end; ``save_every`` in epochs). Otherwise iteration-based (segmentation): log, evaluate
    (``eval_every``) and save (``save_every``, ``save_last_every``) every so many steps, and at the end.
    """

    total_steps: int
    steps_per_epoch: int
    seed: int = 0
    by_epoch: bool = True
    save_last_every: int = 0
    eval_every: int = 0

    def schedule(self) -> Schedule:
        """When to log, evaluate and save (``by_epoch``: :class:`EpochSchedule`, else :class:`IterationSchedule`)."""
        if self.by_epoch:
            return EpochSchedule(self.steps_per_epoch, self.log_every, self.save_every)
        return IterationSchedule(self.steps_per_epoch, self.log_every, self.save_every, self.save_last_every,
                                 self.eval_every)

    @classmethod
    def of(cls, loop: LoopConfig, **settings: Any) -> "TrainerConfig":
        """The loop flags of ``loop`` (e.g. a script's :class:`util.config.typed.TrainConfig`) and ``settings``."""
        return cls(**{f.name: getattr(loop, f.name) for f in dataclasses.fields(LoopConfig)}, **settings)


def epoch_trainer_config(train: TrainConfig, seed: int, steps_per_epoch: int) -> TrainerConfig:
    """The trainer settings of an epoch-based script (MAE's flags: ``--epochs``, ``--save_every`` in epochs)."""
    return TrainerConfig.of(train, total_steps=train.epochs * steps_per_epoch, steps_per_epoch=steps_per_epoch,
                            seed=seed)


class _Sums:
    """Metric sums on the device (this rank) plus a carried global part (from a resumed checkpoint)."""

    def __init__(self, k: int, device: torch.device) -> None:
        self.local = torch.zeros(k, device=device)
        self.n = 0
        self.carry: Optional[torch.Tensor] = None
        self.carry_n = 0

    def add(self, metrics: torch.Tensor) -> None:
        self.local += metrics
        self.n += 1

    def reset(self) -> None:
        self.local.zero_()
        self.n, self.carry, self.carry_n = 0, None, 0

    def total(self) -> Tuple[torch.Tensor, int]:
        """(sum over every rank and the carried part, number of batches summed): a collective."""
        total = dist_util.all_reduce_sum(self.local.clone())
        if self.carry is not None:
            total = total + self.carry
        return total, self.n * dist_util.get_world_size() + self.carry_n

    def mean(self) -> List[float]:
        """The mean metrics over every rank (NaN when every step was skipped: a rollback's skip)."""
        total, n = self.total()
        return (total / n).tolist() if n else [float("nan")] * total.numel()

    def state(self) -> Dict[str, Any]:
        total, n = self.total()
        return {"sums": total.tolist(), "count": n}

    def load(self, state: Optional[Dict[str, Any]]) -> None:
        if state:
            self.carry = torch.tensor(state["sums"], dtype=torch.float32, device=self.local.device)
            self.carry_n = int(state["count"])


class Progress:
    """Where the time goes, for the log lines: wall time per step, the part of it spent waiting for
    the next batch (``next(batches)``: data loading not hidden by the loader workers), images/s,
    the ETA of the epoch and of the run, peak memory. Host clocks and allocator counters only: no
    device synchronisation.

    Args:
        start: the step this process started at (a resumed run's rate counts its own steps only).
        images_per_step: images of one step over every process.
    """

    def __init__(self, start: int, images_per_step: int) -> None:
        self.start, self.images_per_step = start, images_per_step
        self.t_start = self.t_window = time.perf_counter()
        self.data = 0.0

    def waited(self, seconds: float) -> None:
        self.data += seconds

    def skip(self) -> None:
        """Leave the time since the last step (an epoch end: evaluation, monitor, saving) out of the
        window, so that s/it and images/s are those of training steps; the run's ETA keeps it."""
        self.t_window = time.perf_counter()

    def window(self, steps: int) -> Tuple[float, float]:
        """(wall seconds per step, data seconds per step) since the last call; starts the next window."""
        now = time.perf_counter()
        out = ((now - self.t_window) / max(1, steps), self.data / max(1, steps))
        self.t_window, self.data = now, 0.0
        return out

    def eta_run(self, done: int, total: int) -> float:
        """Seconds left at this process's mean rate so far, epoch-end work (evaluation, saving) included."""
        return (time.perf_counter() - self.t_start) / max(1, done - self.start) * (total - done)

    def fields(self, trainer: "Trainer", done: int, sec: float, data: float) -> Tuple[str, Dict[str, float]]:
        """The text after the job's progress line, and the same numbers as TensorBoard scalars."""
        ips = self.images_per_step / max(sec, 1e-9)
        gib, what = peak_memory(trainer.run.device)
        parts = [f"data {data:.3f} s/it ({100 * data / max(sec, 1e-9):.0f}%)", f"{ips:.1f} img/s"]
        left_in_epoch = trainer.schedule.left_in_epoch(done)
        if left_in_epoch is not None:  # iteration-based jobs print their own ETA
            parts.append(f"eta epoch {fmt_seconds(sec * left_in_epoch)} run "
                         f"{fmt_seconds(self.eta_run(done, trainer.total_steps))}")
        parts.append(f"{what} {gib:.2f} GB")
        scalars = {"perf/s_per_it": sec, "perf/data_s_per_it": data, "perf/images_per_s": ips,
                   "perf/peak_memory_gb": gib}
        return ", ".join(parts), scalars


class Trainer:
    """Runs a :class:`Job` from its resume point to ``total_steps`` (see the module docstring).

    Args:
        run: the started run (device, precision, output folder, logs, stop signal).
        job: the job.
        data: the training data, read by global step.
        cfg: the trainer's settings.
        saved_args: what checkpoints store as ``args`` (``Run.resolved_args``); also ``config.json``'s.
        config_extra: more entries of ``config.json`` (e.g. ``model_cfg``), written once resumed.
    """

    def __init__(self, run: Run, job: Job, data: TrainData, cfg: TrainerConfig, saved_args: Dict[str, Any],
                 config_extra: Optional[Dict[str, Any]] = None) -> None:
        self.run, self.job, self.data, self.cfg, self.saved_args = run, job, data, cfg, saved_args
        self.config_extra = dict(config_extra or {})
        self.steps_per_epoch = cfg.steps_per_epoch
        self.total_steps = cfg.total_steps
        self.schedule = cfg.schedule()
        self.commits = CommitLog(run.out_dir, cfg.steps_per_epoch)
        k = len(job.metric_names)
        self.epoch_sums = _Sums(k, run.device)
        self.window = _Sums(k, run.device)
        self.nonfinite = NonFiniteTracker(job.metric_labels(), run.device)
        self.recovery = Recovery(RecoveryConfig(cfg.on_nonfinite, cfg.max_rollbacks, cfg.loss_spike,
                                                cfg.loss_spike_window, cfg.fp32_after_rollback, cfg.steps_per_epoch,
                                                cfg.accum_iter))
        self._scale_loss = injected(run.info.rank)  # testing recovery (util/run/recovery.py)
        # --on_nonfinite rollback before this run's first checkpoint: the state it started from (bytes)
        self._start_state: Optional[bytes] = None
        self._resumed_last = False  # resumed from this folder's checkpoint-last.pth
        self.last_train: Dict[str, float] = {}
        self.lr = job.optimizer.param_groups[0]["lr"]
        # the lr the optimizer held at each step of the epoch, as read back from it (log.txt's train_lr)
        self.lr_sum, self.lr_count = 0.0, 0
        self.train_model: Optional[nn.Module] = None
        # MAE's log.txt field: the trained parameters
        self.n_parameters = sum(p.numel() for p in job.model.parameters() if p.requires_grad)

    # ---------------------------------------------------------------------------------------
    def state(self, done: int, **extra: Any) -> Dict[str, Any]:
        """The checkpoint after ``done`` steps (built on rank 0 only)."""
        job, pos = self.job, self.schedule.position(done)
        more = job.extra_state()
        model_cfg = more.pop("model_cfg", None)
        if "iteration" in pos:
            more = {"iteration": pos["iteration"], **more}
        return ckpt_util.training_state(job.model, job.optimizer, job.scaler, pos["epoch"], self.saved_args, model_cfg,
                                        step_in_epoch=pos["step_in_epoch"], **more, **self.recovery.state(), **extra)

    def commit(self, done: int, records: Sequence[Dict[str, Any]], files: Sequence[str],
               partial: Optional[Dict[str, Any]] = None) -> None:
        """Write this step's checkpoints and ``log.txt`` records (rank 0; every rank waits, a failure
        reaches every rank). ``checkpoint-last.pth`` goes first and names what follows."""
        if files:
            self._guard()  # never save a NaN's weights

        def write() -> None:
            state = self.state(done, **({"partial": partial} if partial else {})) if files else None
            self.commits.write(state, files, records)
            self.run.tb.flush()

        self.run.on_main(write)
        if ckpt_util.LAST in files:
            self._start_state = None  # a rollback now returns to checkpoint-last.pth

    # ---------------------------------------------------------------------------------------
    def resume(self) -> int:
        """Load ``--resume`` or the furthest checkpoint in the output folder; return the step to
        continue at. Also completes that checkpoint's commit and drops ``log.txt`` lines past it."""
        run, cfg, job = self.run, self.cfg, self.job
        check_free_space(run.out_dir, ckpt_util.estimated_size(job.model), "one checkpoint")
        path = ckpt_util.resume_source(run.out_dir, cfg.resume, cfg.auto_resume, run.is_main)
        if path is None:
            start = cfg.start_epoch * self.steps_per_epoch
            run.on_main(lambda: self.commits.tidy(start))
            return start
        ckpt = ckpt_util.read_checkpoint(path, check=bool(cfg.resume))  # find_resume verified its choice
        if not isinstance(ckpt, dict) or "model" not in ckpt:
            raise UserError(f"{path} is not a training checkpoint (no 'model' entry).")
        start = self._load(ckpt, path)
        self.recovery.load(ckpt)
        _log.info("resumed from %s: continuing at %s", path, self.schedule.where(start))
        same_folder = Path(path).resolve() == (run.out_dir / ckpt_util.LAST).resolve()
        self._resumed_last = same_folder
        run.on_main(lambda: self.commits.complete(ckpt if same_folder else {}, start))
        return start

    def _load(self, ckpt: Dict[str, Any], path: str) -> int:
        """Put the training state of ``ckpt`` (read from ``path``) in place; return the step it continues at."""
        cfg, job = self.cfg, self.job
        job.check_resume(ckpt, path)
        if convert.load_model_state(job.model, convert.model_state_of(ckpt, path), path):
            ckpt_util.load_optimizer_state(ckpt, path, job.optimizer, job.scaler)
        else:  # the parameter order of another code base's optimizer state is not ours
            _log.warning("%s is in another layout (converted on load): its optimizer state is not carried over; "
                         "the optimizer starts afresh at the stored position", path)
        job.load_extra_state(ckpt)
        start = self.schedule.start_of(ckpt, cfg.batch_size, self.run.info.world_size, cfg.accum_iter)
        partial = ckpt.get("partial") or {}
        self.window.reset()
        self.epoch_sums.reset()
        self.lr_sum, self.lr_count = 0.0, 0
        self.window.load(partial.get("window"))
        if self.schedule.keeps_epoch_means and int(ckpt.get("step_in_epoch", 0)):  # the epoch's running sums
            self.epoch_sums.load(partial.get("epoch"))
            self._load_lr_sum(partial.get("lr"), int(ckpt["epoch"]) * self.steps_per_epoch, start)
        return start

    def _partial(self) -> Dict[str, Any]:
        """The running sums a checkpoint written within a log window / an epoch carries (a collective)."""
        partial: Dict[str, Any] = {"window": self.window.state()}
        if self.schedule.keeps_epoch_means:
            partial["epoch"] = self.epoch_sums.state()
            partial["lr"] = {"sum": self.lr_sum, "count": self.lr_count}
        return partial

    # ---------------------------------------------------------------------------------------
    # recovery (util/run/recovery.py)

    def _guard(self) -> None:
        """Every rank, at the same points (log steps, commits): a non-finite value since the last
        check stops the run or rolls it back (:meth:`Recovery.decide`)."""
        bad = self.nonfinite.first_bad()
        if bad is not None:
            step, label = bad
            self.recovery.decide(Trip(NONFINITE, step, label, self.schedule.window_start(step)),
                                 self.schedule.where_step)

    def _keep_start_state(self, start: int) -> None:
        """``--on_nonfinite rollback``: the state a rollback before the first checkpoint returns to
        (held in host memory until this run writes ``checkpoint-last.pth``)."""
        if self.cfg.on_nonfinite != "rollback" or self._resumed_last:
            return
        partial = self._partial() if self.schedule.keeps_epoch_means and start % self.steps_per_epoch else None
        buffer = io.BytesIO()
        torch.save(self.state(start, **({"partial": partial} if partial else {})), buffer)
        self._start_state = buffer.getvalue()

    def _rollback(self, trip: Trip) -> int:
        """Every rank: return to the newest good state, plan the skip, drop what was logged past
        it; return the step to continue at."""
        run = self.run
        if self._start_state is not None:
            ckpt = torch.load(io.BytesIO(self._start_state), map_location="cpu", weights_only=True)
            source = "the state this run started from"
        else:  # this run's own checkpoint-last.pth (written after a passing check, atomically; verified here)
            path = run.out_dir / ckpt_util.LAST
            ckpt = ckpt_util.read_checkpoint(str(path), check=True)
            source = path.name
        start = self._load(ckpt, source)
        self.recovery.restored(ckpt)
        self.nonfinite.reset()
        self.job.optimizer.zero_grad(set_to_none=True)
        record = self.recovery.plan(trip, start, source, self.schedule.where_step)
        run.tb.scalars({"train/rollback": record["rollback"]}, trip.step)
        run.on_main(lambda: self.commits.tidy(start))  # the replay writes those lines again
        self._progress = Progress(start, self._progress.images_per_step)
        return start

    # ---------------------------------------------------------------------------------------
    def _log_step(self, done: int) -> None:
        job, run = self.job, self.run
        self._guard()
        n_local = self.window.n
        if not n_local and not self.window.carry_n:  # every step of the window skipped (a rollback)
            self._progress.window(1)
            return
        values = self.window.mean()
        summary = job.summary(values)
        sec, data = self._progress.window(n_local)
        timing, perf = self._progress.fields(self, done, sec, data)
        _log.info("%s, %s", job.progress(self, done, values, summary, self.lr, sec), timing)
        run.tb.scalars({f"train/{k}": v for k, v in summary.items()} | {"train/lr": self.lr} | perf, done)
        record = job.on_log(self, done, summary, self.lr, sec)
        if record is not None:
            self._pending.append(record)
        self.window.reset()
        trip = self.recovery.spike(summary["loss"], done, self.schedule.window_start(done - 1))
        if trip is not None:
            self.recovery.decide(trip, self.schedule.where_step)

    def _preempt_mid(self, done: int) -> None:
        """Every rank: write checkpoint-last.pth at ``done`` (with the running sums), then stop."""
        self._guard()
        self.commit(done, [], [ckpt_util.LAST], self._partial())
        self.run.preempted(self.schedule.where(done))

    def fit(self) -> Dict[str, Any]:
        """Train from the resume point to ``total_steps``; return ``job.result``."""
        cfg, job, run = self.cfg, self.job, self.run
        start = self.resume()
        run.save_config(self.saved_args, **self.config_extra)
        model = wrap(job.model, run.device, run.info.distributed, cfg.grad_checkpointing, cfg.compile)
        self.train_model = model
        job.on_start(self, start)
        self._keep_start_state(start)
        self._progress = Progress(start, cfg.batch_size * run.info.world_size)
        t0 = time.time()
        while True:
            try:
                self._train(model, start)
                break
            except RollbackNeeded as e:  # every rank, at the same point
                start = self._rollback(e.trip)
        self.run.tb.flush()
        return job.result(self, time.time() - t0)

    def _train(self, model: nn.Module, start: int) -> None:
        """Steps ``start`` to ``total_steps``: the loop of :meth:`fit`, which a rollback starts again."""
        cfg, job, run = self.cfg, self.job, self.run
        spe, total = self.steps_per_epoch, self.total_steps
        model.train(True)
        accum = max(1, cfg.accum_iter)
        rank = run.info.rank
        self._pending: List[Dict[str, Any]] = []
        job.optimizer.zero_grad(set_to_none=True)
        batches = self.data.batches(start)
        try:
            for step in range(start, total):
                t_wait = time.perf_counter()
                batch = next(batches)
                self._progress.waited(time.perf_counter() - t_wait)
                epoch, it = divmod(step, spe)
                update = (it + 1) % accum == 0 or it + 1 == spe
                if not self.recovery.skipped(step):
                    if it % accum == 0:
                        self.lr = set_lr(job.optimizer, job.lr(step))
                    self.lr_sum += applied_lr(job.optimizer)  # what this step applies, read back on the host
                    self.lr_count += 1
                    seed_everything(derive_seed(cfg.seed, step, rank))
                    loss_fn = scaled(job.loss, self._scale_loss[step]) if step in self._scale_loss else job.loss
                    amp_dtype = None if self.recovery.full_precision(step) else run.amp_dtype
                    metrics = train_step(model, loss_fn, batch, job.optimizer, job.scaler, run.device, amp_dtype,
                                         accum=accum, update=update, clip_grad=cfg.clip_grad)
                    self.nonfinite.update(metrics, step)
                    self.epoch_sums.add(metrics)
                    self.window.add(metrics)
                done = step + 1
                last = done == total
                self._pending += self.recovery.ending_at(done)
                if self.schedule.log_due(done, last):
                    self._log_step(done)
                if self.schedule.epoch_end(done):
                    self._end_epoch(epoch, last)
                    self._progress.skip()
                    model.train(True)
                    if not last and run.stop.sync():
                        run.preempted(f"the start of epoch {epoch + 1}")
                    continue
                if self._step_hooks(done, last):
                    model.train(True)
                if update and not last and run.stop():  # SIGTERM / SIGUSR1: every rank agreed after this step
                    self._preempt_mid(done)
        finally:
            batches.close()  # its loader workers go now, not when the traceback does

    def _load_lr_sum(self, carried: Optional[Dict[str, Any]], first: int, start: int) -> None:
        """The lr sum of a resumed epoch's steps before ``start``: as the checkpoint recorded it, or
        (a checkpoint without one) the schedule's values at those steps."""
        if carried:
            self.lr_sum, self.lr_count = float(carried["sum"]), int(carried["count"])
            return
        accum = max(1, self.cfg.accum_iter)
        self.lr_sum = sum(self.job.lr(first + it - it % accum) for it in range(start - first))
        self.lr_count = start - first

    def epoch_mean_lr(self) -> float:
        """The mean over the epoch's iterations of the lr the optimizer held (MAE logs its meter's
        average of ``param_groups[...]["lr"]`` as ``train_lr``): read back from the optimizer at every
        step, so an lr applied wrongly shows in ``log.txt``. Resets the sum for the next epoch."""
        mean = self.lr_sum / self.lr_count if self.lr_count else float("nan")  # (nan: a rollback skipped every step)
        self.lr_sum, self.lr_count = 0.0, 0
        return mean

    def _end_epoch(self, epoch: int, last: bool) -> None:
        self._guard()
        self.last_train = {**self.job.summary(self.epoch_sums.mean()), "lr": self.epoch_mean_lr()}
        self.epoch_sums.reset()
        hook = self.job.on_epoch_end(self, epoch, self.last_train)
        files = self.schedule.epoch_files(epoch, last) + hook.files
        records = self._pending + [{**r, "epoch": epoch, "n_parameters": self.n_parameters} for r in hook.records]
        self._pending = []
        self.commit((epoch + 1) * self.steps_per_epoch, records, files)

    def _step_hooks(self, done: int, last: bool) -> bool:
        """The commit after a step that ends no epoch: the job's evaluation when due, the checkpoints
        due, the pending ``log.txt`` records. Returns whether the job evaluated."""
        hook, evaluate = Commit([], []), self.schedule.evaluate_due(done, last)
        if evaluate:
            self._guard()
            hook = self.job.on_step(self, done)
        records = self._pending + hook.records
        self._pending = []
        files = self.schedule.step_files(done, last) + hook.files
        if records or files:
            self.commit(done, records, files)
        return evaluate


# --------------------------------------------------------------------------------------------
# --eval


def evaluate_checkpoint(model: nn.Module, path: Optional[str], evaluate: Callable[[Dict[str, Any]], Dict[str, Any]],
                        untrained: Optional[str] = None) -> Dict[str, Any]:
    """``--eval`` of every script: load the checkpoint ``path`` into ``model`` (verified first, the
    whole model, in any layout the reader converts), then return ``evaluate(checkpoint)``: the
    script's evaluation and report (the checkpoint tells it e.g. the iteration it was written at).

    Args:
        path: the checkpoint (``util.checkpoints.reader.resume_source``, or a script's own choice);
            None: evaluate ``model`` as it is (e.g. with the ``--finetune`` weights it was built with).
        untrained: the warning to log when ``path`` is None and ``model`` holds no trained weights.
    """
    ckpt: Dict[str, Any] = {}
    if path is not None:
        ckpt = ckpt_util.read_checkpoint(path, check=True)
        convert.load_model_state(model, convert.model_state_of(ckpt, path), path)
        _log.info("evaluating %s", path)
    elif untrained:
        _log.warning("%s", untrained)
    return evaluate(ckpt)
