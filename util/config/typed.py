"""Typed configuration: each flag declared once, as a field of a frozen dataclass.

A field declared with :func:`flag` carries everything about its flag: the name (the field's), the
default, the range check (an argparse ``type=`` from :mod:`util.config.ranges`), the help text and
the ``--help`` group. :func:`add_flags` turns declarations into argparse arguments (a script may give
its own default or wording, never a second declaration); :meth:`FlagConfig.from_flags` builds the
config back from the parsed flags, by field name.

Nothing below ``main_*`` reads or writes the ``argparse.Namespace``: each script builds the configs it
needs, resolves what depends on the run (the learning rate from the total batch, the model's input
size, ...) into new frozen instances, and hands those to the builders and the trainer. What a
checkpoint stores as ``args`` (MAE's format) is the flags as parsed plus the resolved values, as plain
types.
"""
import argparse
import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Type, TypeVar, Union

from util.config.ranges import (
    nonneg_float,
    nonneg_int,
    port_number,
    positive_float,
    positive_int,
    ranged,
    seed_int,
    sha256_prefix,
    share,
)
from util.run.errors import UserError

C = TypeVar("C", bound="FlagConfig")
S = TypeVar("S", bound="ScriptConfig")
Flags = Union[argparse.Namespace, Mapping[str, Any]]
Group = argparse._ArgumentGroup

# the --help groups of the shared flags
TRAINING, MODEL, DATA, OUTPUT = "training", "model", "data", "output and checkpoints"
RUN, DISTRIBUTED, OPTIM, WEIGHTS = "device, precision and seed", "distributed", "optimizer and schedule", "weights and evaluation"
RECOVERY = "recovery from a non-finite loss or a loss spike"

_FLAG = "flag"  # the dataclass field metadata key of a declaration


@dataclass(frozen=True)
class FlagSpec:
    """How a declared field appears on the command line (see :func:`flag`)."""

    help: str
    group: str
    type: Optional[Callable[[str], Any]] = None
    metavar: Any = None
    choices: Optional[Sequence[Any]] = None
    nargs: Any = None
    action: Any = None
    names: Tuple[str, ...] = ()
    off: Optional[Tuple[str, str]] = None

    def add(self, group: Group, dest: str, default: Any, help: Optional[str] = None) -> None:
        """Add the argument (and its ``off`` twin) to ``group``."""
        kwargs: Dict[str, Any] = {"dest": dest, "default": default, "help": help or self.help}
        for key in ("type", "metavar", "choices", "nargs", "action"):
            if getattr(self, key) is not None:
                kwargs[key] = getattr(self, key)
        group.add_argument(*(self.names or (f"--{dest}",)), **kwargs)
        if self.off is not None:
            group.add_argument(self.off[0], action="store_false", dest=dest, default=default, help=self.off[1])


def flag(default: Any, help: str, *, group: str, type: Optional[Callable[[str], Any]] = None, metavar: Any = None,
         choices: Optional[Sequence[Any]] = None, nargs: Any = None, action: Any = None, names: Sequence[str] = (),
         off: Optional[Tuple[str, str]] = None) -> Any:
    """Declare a config field and its flag, ``--<field name>`` unless ``names`` are given.

    Args:
        default: the field's default, and the flag's unless a script gives its own (:func:`add_flags`).
        help: what ``--help`` says (the parser appends the default).
        group: the ``--help`` group.
        type / metavar / choices / nargs / action: as argparse's (``type``: the range check).
        names: the option strings (e.g. both spellings of ``--local_rank``).
        off: ``(option, help)`` of a second flag that stores False (``--no_pin_mem``, ``--cls_token``).
    """
    spec = FlagSpec(help, group, type, metavar, choices, nargs, action, tuple(names), off)
    return dataclasses.field(default=default, metadata={_FLAG: spec})


def flag_dict(flags: Flags) -> Dict[str, Any]:
    """The flags as a plain dict (a Namespace, or a checkpoint's saved ``args``)."""
    return dict(vars(flags)) if isinstance(flags, argparse.Namespace) else dict(flags or {})


def declarations(*configs: Type["FlagConfig"]) -> Dict[str, dataclasses.Field]:
    """The declared fields (:func:`flag`) of ``configs`` by name; a name declared twice is a bug."""
    found: Dict[str, dataclasses.Field] = {}
    for config in configs:
        for f in dataclasses.fields(config):
            if _FLAG in f.metadata:
                if f.name in found and found[f.name] is not f:
                    raise TypeError(f"--{f.name} is declared twice ({config.__name__})")
                found[f.name] = f
    return found


def group_of(parser: argparse.ArgumentParser, title: str) -> Group:
    """The ``--help`` group ``title`` of ``parser``, created (after the existing ones) if missing."""
    for g in parser._action_groups:
        if g.title == title:
            return g
    return parser.add_argument_group(title)


def add_flags(parser: argparse.ArgumentParser, configs: Sequence[Type["FlagConfig"]], names: Sequence[str],
              defaults: Optional[Mapping[str, Any]] = None, help: Optional[Mapping[str, str]] = None
              ) -> Dict[str, Group]:
    """Add the flags ``names`` (in this order) declared by ``configs``, each in its ``--help`` group.

    Args:
        defaults: this script's defaults where they differ from the declaration's (its recipe).
        help: this script's wording of a flag's help (its units, its models).

    Returns the groups used, by title, so that a script adds its own flags where they belong.
    """
    declared = declarations(*configs)
    groups: Dict[str, Group] = {}
    for name in names:
        f = declared[name]
        spec: FlagSpec = f.metadata[_FLAG]
        group = groups.setdefault(spec.group, group_of(parser, spec.group))
        spec.add(group, name, (defaults or {}).get(name, f.default), (help or {}).get(name))
    return groups


@dataclass(frozen=True)
class FlagConfig:
    """Base of the configs: built from flags by field name; lists become tuples (frozen values)."""

    @classmethod
    def from_flags(cls: Type[C], flags: Flags, **overrides: Any) -> C:
        given = flag_dict(flags)
        values = {}
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            if f.name in overrides:
                values[f.name] = overrides[f.name]
            elif f.name in given:
                v = given[f.name]
                values[f.name] = tuple(v) if isinstance(v, list) else v
        return cls(**values)

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------------------------
# the flags every training script shares (MAE's names and meanings)


@dataclass(frozen=True)
class ScriptConfig:
    """Everything a script reads: each field a :class:`FlagConfig` built from the one parsed command
    line (:meth:`from_args`), and ``flags``, that command line as parsed (stored, with the resolved
    values, as the checkpoints' ``args``). Every script has the run, loop and optimizer configs; a
    subclass adds its own."""

    run: "RunConfig"
    train: "TrainConfig"
    optim: "OptimConfig"
    flags: Dict[str, Any]

    @classmethod
    def from_args(cls: Type[S], args: Flags) -> S:
        flags = flag_dict(args)
        hints = typing.get_type_hints(cls)
        return cls(**{f.name: flags if f.name == "flags" else hints[f.name].from_flags(flags)
                      for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class RunConfig(FlagConfig):
    """Start-up of every script: output folder, device, precision, seed, launcher, signals."""

    output_dir: str = flag("./output_dir", "where checkpoints, log.txt and config.json go", group=OUTPUT,
                           metavar="DIR")
    log_dir: Optional[str] = flag(None, "TensorBoard directory (default: --output_dir)", group=OUTPUT, metavar="DIR")
    device: str = flag("", "cuda, cuda:N or cpu (default: cuda when available)", group=RUN)
    amp: str = flag("auto", "mixed precision (auto: bf16 on GPUs that support it, else fp16; none on CPU)", group=RUN,
                    choices=["auto", "bf16", "fp16", "none"])
    seed: int = flag(0, "seed of the initialisation, the data order and the masks", group=RUN, type=seed_int,
                     metavar="N")
    stop_check_every: int = flag(
        10, "optimizer steps between the checks that stop every process after the same step on SIGTERM / SIGUSR1 "
            "(each check: one tiny all-reduce on the CPU)", group=RUN, type=positive_int, metavar="N")
    local_rank: int = flag(-1, "set by python -m torch.distributed.launch (either spelling); -1: not launched by it",
                           group=DISTRIBUTED, type=ranged(int, -1, name="local_rank"), metavar="N",
                           names=("--local_rank", "--local-rank"))
    dist_on_itp: bool = flag(False, "OpenMPI launch (OMPI_COMM_WORLD_* variables)", group=DISTRIBUTED,
                             action="store_true")
    dist_url: str = flag("env://", "rendezvous URL", group=DISTRIBUTED, metavar="URL")
    dist_port: Optional[int] = flag(None, "master port for SLURM launches (default: MASTER_PORT, else 29500)",
                                    group=DISTRIBUTED, type=port_number, metavar="PORT")


@dataclass(frozen=True)
class LoopConfig(FlagConfig):
    """The flags the trainer reads (``util.run.trainer.TrainerConfig`` adds the run's geometry to them)."""

    batch_size: int = flag(64, "batch size per GPU (effective batch = batch_size * accum_iter * processes)",
                           group=TRAINING, type=positive_int, metavar="N")
    accum_iter: int = flag(1, "gradient accumulation iterations (an optimizer step every N batches)", group=TRAINING,
                           type=positive_int, metavar="N")
    clip_grad: Optional[float] = flag(None, "clip the gradient norm to NORM (default: off; 0 is off too)", group=OPTIM,
                                      type=nonneg_float, metavar="NORM")
    log_every: int = flag(20, "iterations between log lines / TensorBoard points", group=OUTPUT, type=positive_int,
                          metavar="N")
    save_every: int = flag(20, "epochs between numbered checkpoints (checkpoint-<epoch>.pth; the last epoch always)",
                           group=OUTPUT, type=positive_int, metavar="N")
    resume: str = flag("", "checkpoint to resume from (default: newest in --output_dir)", group=OUTPUT, metavar="FILE")
    auto_resume: bool = flag(True, "do not resume from the newest checkpoint found in --output_dir", group=OUTPUT,
                             action="store_false", names=("--no_auto_resume",))
    start_epoch: int = flag(0, "first epoch when not resuming", group=OUTPUT, type=nonneg_int, metavar="N")
    on_nonfinite: str = flag(
        "stop", "what a non-finite loss (or a --loss_spike) does: stop (the run ends with an error line) or rollback "
                "(back to the newest checkpoint, skip the batches of the log window that diverged, go on; at most "
                "--max_rollbacks times)", group=RECOVERY, choices=["stop", "rollback"])
    max_rollbacks: int = flag(3, "rollbacks a run may make before it stops (--on_nonfinite rollback)", group=RECOVERY,
                              type=nonneg_int, metavar="N")
    loss_spike: Optional[float] = flag(
        None, "treat a log window whose mean loss is above K times the median of the last --loss_spike_window windows "
              "like a non-finite loss (default: off)", group=RECOVERY,
        type=ranged(float, 1, lo_open=True, why="a multiple of the running median", name="spike_factor"), metavar="K")
    loss_spike_window: int = flag(10, "log windows in the --loss_spike median", group=RECOVERY, type=positive_int,
                                  metavar="N")
    fp32_after_rollback: bool = flag(False, "after a rollback, train the rest of that epoch without mixed precision",
                                     group=RECOVERY, action="store_true")
    compile: bool = flag(False, "torch.compile the model", group=RUN, action="store_true")
    grad_checkpointing: bool = flag(
        False, "recompute blocks in the backward pass: less activation memory, about 1/3 more compute", group=RUN,
        action="store_true")


@dataclass(frozen=True)
class TrainConfig(LoopConfig):
    """The training flags the scripts share (MAE's names; ``save_every`` in epochs, or in iterations
    for segmentation, which sets ``iters`` instead of ``epochs``)."""

    data_path: str = flag(
        "digits", "ImageFolder root with train/ (and val/) inside, 'digits' for the built-in dataset, or tar shards "
                  "(a folder of shards made by tools/make_shards.py, brace notation, pipe: URLs; 'digits-shards')",
        group=DATA, type=str, metavar="DIR")
    epochs: int = flag(1, "training epochs", group=TRAINING, type=positive_int, metavar="N")
    iters: Optional[int] = flag(None, "training iterations (optimizer steps)", group=TRAINING, type=positive_int,
                                metavar="N")
    num_workers: int = flag(10, "data loading processes per GPU (0: load in the training process)", group=DATA,
                            type=nonneg_int, metavar="N")
    pin_mem: bool = flag(True, "pin CPU memory for faster host-to-device copies (the default)", group=DATA,
                         action="store_true", off=("--no_pin_mem", "do not pin CPU memory"))
    decode: str = flag(
        "auto", "image decoding: auto (JPEGs decoded at reduced size when the crop allows, libjpeg-turbo; other "
                "formats as pil), pil (the reference: PIL decodes every image whole), nvjpeg (JPEGs decoded on the GPU)",
        group=DATA, choices=["auto", "pil", "nvjpeg"])
    shuffle_buffer: int = flag(1000, "tar shards: samples each loader worker holds to shuffle", group=DATA,
                               type=positive_int, metavar="N")


@dataclass(frozen=True)
class OptimConfig(FlagConfig):
    """AdamW / LARS settings and the cosine schedule (``lr`` None: from ``blr``, see :meth:`resolved`)."""

    lr: Optional[float] = flag(None, "absolute learning rate (default: from --blr)", group=OPTIM,
                               type=positive_float, metavar="LR")
    blr: float = flag(1e-3, "base learning rate: lr = blr * total batch size / 256", group=OPTIM,
                      type=positive_float, metavar="LR")
    min_lr: float = flag(0.0, "lower bound of the cosine schedule", group=OPTIM, type=nonneg_float, metavar="LR")
    warmup_epochs: float = flag(0.0, "epochs of linear warm-up (fractions allowed)", group=OPTIM, type=nonneg_float,
                                metavar="N")
    weight_decay: float = flag(0.05, "AdamW weight decay (not on biases, norms, tokens)", group=OPTIM,
                               type=nonneg_float, metavar="WD")
    layer_decay: float = flag(1.0, "layer-wise lr decay (BEiT / MAE): block i of L gets lr * decay^(L + 1 - i)",
                              group=OPTIM, type=share, metavar="DECAY")
    fused_adamw: Optional[bool] = flag(None, "fused AdamW kernels (default: on for CUDA and CPU)", group=OPTIM,
                                       action=argparse.BooleanOptionalAction)

    def resolved(self, total_batch: int) -> "OptimConfig":
        """The one lr-scaling rule (MAE): ``lr = blr * total batch / 256`` unless ``--lr`` is given;
        total batch = per-process batch x accumulation steps x processes."""
        return self if self.lr is not None else self.replace(lr=self.blr * total_batch / 256)


@dataclass(frozen=True)
class WeightsConfig(FlagConfig):
    """Pre-trained weights to start from, and ``--eval`` (every script that fine-tunes an encoder)."""

    finetune: str = flag(
        "", "pre-trained weights: a file (this repo's, MAE's, the reference DeepMIM's, timm / .safetensors), a "
            "published name (e.g. mae_pretrain_vit_base), an http(s) URL or hf-hub:ORG/NAME (default: none, random "
            "initialisation)", group=WEIGHTS, metavar="CHECKPOINT")
    finetune_sha256: Optional[str] = flag(None, "expected sha256 (prefix) of a downloaded --finetune (default: not "
                                                "checked)", group=WEIGHTS, type=sha256_prefix, metavar="HEX")
    eval: bool = flag(False, "only evaluate --resume (default: newest in --output_dir)", group=WEIGHTS,
                      action="store_true")


SHARED_CONFIGS = (RunConfig, TrainConfig, OptimConfig, WeightsConfig)  # the flags of util/config/cli.py's groups


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


def check_iteration_schedule(train: TrainConfig, warmup_iters: int) -> List[str]:
    """The schedule check of an iteration-based script: a warm-up longer than ``--iters`` is legal but
    rarely meant (a warning for :func:`util.run.runner.start_run` to log)."""
    if warmup_iters > train.iters:
        return [f"--warmup_iters {warmup_iters} exceeds --iters {train.iters}: the learning rate stays in its "
                f"linear warm-up"]
    return []
