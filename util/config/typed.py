"""Typed configuration: frozen dataclasses built once from the parsed flags and passed down.

Nothing below ``main_*`` reads or writes the ``argparse.Namespace``: each script builds the
configs it needs with :meth:`FlagConfig.from_flags` (fields are picked by flag name), resolves what
depends on the run (the learning rate from the total batch, the model's input size, ...) into new
frozen instances, and hands those to the builders and the trainer. What a checkpoint stores as
``args`` (MAE's format) is the flags as parsed plus the resolved values, as plain types.
"""
import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Type, TypeVar, Union

from util.run.errors import UserError

C = TypeVar("C", bound="FlagConfig")
Flags = Union[argparse.Namespace, Mapping[str, Any]]


def flag_dict(flags: Flags) -> Dict[str, Any]:
    """The flags as a plain dict (a Namespace, or a checkpoint's saved ``args``)."""
    return dict(vars(flags)) if isinstance(flags, argparse.Namespace) else dict(flags or {})


@dataclass(frozen=True)
class FlagConfig:
    """Base of the configs: built from flags by field name; lists become tuples (frozen values)."""

    @classmethod
    def from_flags(cls: Type[C], flags: Flags, **overrides: Any) -> C:
        given = flag_dict(flags)
        values = {}
        for f in dataclasses.fields(cls):
            if f.name in overrides:
                values[f.name] = overrides[f.name]
            elif f.name in given:
                v = given[f.name]
                values[f.name] = tuple(v) if isinstance(v, list) else v
        return cls(**values)

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class RunConfig(FlagConfig):
    """Start-up of every script: output folder, device, precision, seed, launcher, signals."""

    output_dir: str = "./output_dir"
    log_dir: Optional[str] = None
    device: str = ""
    amp: str = "auto"
    seed: int = 0
    stop_check_every: int = 10
    local_rank: int = -1
    dist_on_itp: bool = False
    dist_url: str = "env://"
    dist_port: Optional[int] = None


@dataclass(frozen=True)
class TrainConfig(FlagConfig):
    """The training-loop flags the scripts share (MAE's names; ``save_every`` in epochs, or in
    iterations for segmentation, which also sets ``iters``)."""

    data_path: str = "digits"
    batch_size: int = 64
    accum_iter: int = 1
    epochs: int = 1
    iters: Optional[int] = None
    log_every: int = 20
    save_every: int = 20
    clip_grad: Optional[float] = None
    compile: bool = False
    grad_checkpointing: bool = False
    resume: str = ""
    auto_resume: bool = True
    start_epoch: int = 0
    num_workers: int = 10
    pin_mem: bool = True
    decode: str = "auto"
    shuffle_buffer: int = 1000


@dataclass(frozen=True)
class OptimConfig(FlagConfig):
    """AdamW / LARS settings and the cosine schedule (``lr`` None: from ``blr``, see :meth:`resolved`)."""

    lr: Optional[float] = None
    blr: float = 1e-3
    min_lr: float = 0.0
    warmup_epochs: float = 0.0
    weight_decay: float = 0.05
    fused_adamw: Optional[bool] = None

    def resolved(self, total_batch: int) -> "OptimConfig":
        """The one lr-scaling rule (MAE): ``lr = blr * total batch / 256`` unless ``--lr`` is given;
        total batch = per-process batch x accumulation steps x processes."""
        return self if self.lr is not None else self.replace(lr=self.blr * total_batch / 256)


def check_schedule(train: TrainConfig, optim: OptimConfig) -> List[str]:
    """The cross-flag checks of an epoch-based schedule (the per-flag ranges are the parser's).

    Returns warnings for :func:`util.run.runner.start_run` to log: a warm-up longer than the run is
    legal (short test runs use it) but rarely meant.
    """
    if train.start_epoch >= train.epochs:
        raise UserError(f"--start_epoch {train.start_epoch} is not below --epochs {train.epochs}: nothing would be "
                        f"trained. Use --start_epoch 0..{train.epochs - 1}, or raise --epochs.")
    if optim.warmup_epochs > train.epochs:
        return [f"--warmup_epochs {optim.warmup_epochs:g} exceeds --epochs {train.epochs}: the learning rate stays in "
                f"its linear warm-up and ends at {train.epochs / optim.warmup_epochs:.0%} of its peak"]
    return []
