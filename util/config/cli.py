"""The command line: the parser every script uses and the groups of flags the scripts share.

* :class:`Parser`: ``argparse`` with every flag's default in ``--help`` (:class:`HelpFormatter`) and
  mistakes answered by one ``error: --flag VALUE: what is valid`` line and exit status 2 (argparse
  prints a usage block and ``prog: error:`` instead).
* Per-flag ranges are ``type=`` validators (``util/config/ranges.py``, re-exported here): a value out
  of range never reaches the code that would trip over it. Checks that need several flags or the
  model (mask ratio vs patch grid, heads vs widths, stride vs crop) are the scripts' ``validate()``
  functions, which run before anything is built or written.
* The flags the ``main_*`` scripts share (MAE's names and meanings), in coherent groups: each is
  declared once, as a field of a typed config (``util/config/typed.py``); the functions below add
  them to a parser with the script's defaults.
"""
import argparse
import re
from typing import Any, Dict, NoReturn, Optional, Sequence

from util.config.ranges import (
    OrderedPair,
    StrictPair,
    increasing,
    mask_fraction,
    nonneg_float,
    nonneg_int,
    port_number,
    positive_float,
    positive_int,
    positive_sum,
    probability,
    ranged,
    rate,
    seed_int,
    sha256_prefix,
    share,
    str2list,
)
from util.config.typed import DISTRIBUTED, SHARED_CONFIGS, Group, add_flags, group_of
from util.run.errors import say

__all__ = [  # the ranges, for the scripts that import them with the parser
    "OrderedPair", "StrictPair", "increasing", "mask_fraction", "nonneg_float", "nonneg_int", "port_number",
    "positive_float", "positive_int", "positive_sum", "probability", "ranged", "rate", "seed_int", "sha256_prefix",
    "share", "str2list",
]


# --------------------------------------------------------------------------------------------
# the parser


class UsageError(SystemExit):
    """A bad command line: exit status 2 (as argparse's), ``str()`` the message (for tests and callers)."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def usage_error(message: str) -> NoReturn:
    """Print ``error: message`` (one line, stderr) and exit with status 2."""
    say(f"error: {message}")
    raise UsageError(message)


def default_text(action: argparse.Action) -> str:
    """How ``--help`` shows a flag's default: lists of ``nargs`` flags space-separated, comma lists
    (:func:`str2list`) comma-separated, the empty string as ``''``."""
    value = action.default
    if isinstance(value, (list, tuple)):
        sep = "," if getattr(action.type, "is_list", False) else " "
        return sep.join(map(str, value))
    return repr(value) if value == "" else str(value)


class HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to each flag's help, unless the help already says its default (as a
    flag whose default is None must, in words) or the flag takes no value (``store_true``)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.option_strings and action.nargs != 0 and action.default is not None
                and action.default is not argparse.SUPPRESS and "default" not in text.lower()):
            text += " (default: " + default_text(action).replace("%", "%%") + ")"
        return text


class Parser(argparse.ArgumentParser):
    """The parser of every script: defaults in ``--help``; one ``error:`` line and exit 2 on a bad
    command line (argparse's ``argument --x: msg`` becomes ``--x msg``).

    Args:
        prog: the script as it is run (``main_pretrain.py``), shown in the usage line.
        description: one line on what the script does.
    """

    def __init__(self, prog: str, description: str, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(prog=prog, description=description, **kwargs)

    def error(self, message: str) -> NoReturn:
        # argparse's "argument --amp: invalid choice: 'x' (choose from 'a', 'b')" -> "--amp 'x': choose from a, b"
        choice = re.match(r"^argument ([^:]+): invalid choice: (.*) \(choose from (.*)\)$", message)
        if choice:
            flag, value, valid = choice.groups()
            message = f"{flag} {value}: invalid choice; choose from {valid.replace(chr(39), '')}"
        message = re.sub(r"^argument ([^:]+): ", r"\1 ", message)
        if message.startswith("unrecognized arguments"):
            message += f" ({self.prog} --help lists the flags)"
        usage_error(message)


def set_help(parser: argparse.ArgumentParser, **texts: str) -> None:
    """Replace the help of shared flags (by dest) with this script's wording (its units, its models)."""
    for action in parser._actions:
        if action.dest in texts:
            action.help = texts[action.dest]


# --------------------------------------------------------------------------------------------
# the shared flags (MAE's names and meanings), declared in util/config/typed.py


def add_training_args(parser: argparse.ArgumentParser, batch_size: int, epochs: int) -> Group:
    """``--batch_size``, ``--epochs``, ``--accum_iter`` (the epoch-based scripts)."""
    groups = add_flags(parser, SHARED_CONFIGS, ["batch_size", "epochs", "accum_iter"],
                       defaults={"batch_size": batch_size, "epochs": epochs})
    return groups["training"]


def add_run_args(parser: argparse.ArgumentParser, by_epoch: bool = True) -> Dict[str, Group]:
    """Data loading, output / checkpoint, device / precision / seed and distributed flags.

    ``by_epoch``: also MAE's epoch flags ``--start_epoch`` and ``--save_every`` (in epochs);
    iteration-based scripts add ``--save_every`` (in iterations) themselves. Returns the groups
    (``data``, ``output``, ``run``, ``distributed``), so a script adds its own flags where they belong.
    """
    data = add_flags(parser, SHARED_CONFIGS, ["data_path", "num_workers", "decode", "shuffle_buffer", "pin_mem"])
    epoch = ["start_epoch"] if by_epoch else []
    output = add_flags(parser, SHARED_CONFIGS, ["output_dir", "log_dir", "resume", "auto_resume", *epoch, "log_every",
                                        *(["save_every"] if by_epoch else [])])
    run = add_flags(parser, SHARED_CONFIGS, ["device", "amp", "seed", "compile", "grad_checkpointing", "stop_check_every"])
    add_flags(parser, SHARED_CONFIGS, ["on_nonfinite", "max_rollbacks", "loss_spike", "loss_spike_window",
                                       "fp32_after_rollback"])
    dist = group_of(parser, DISTRIBUTED)
    # MAE's flag, kept so that its command lines run: the launcher's environment is what counts
    dist.add_argument("--world_size", default=1, type=positive_int, metavar="N",
                      help="accepted for MAE's command lines and not read: the launcher (torchrun, SLURM, the "
                           "environment) sets the number of processes")
    add_flags(parser, SHARED_CONFIGS, ["local_rank", "dist_on_itp", "dist_url", "dist_port"])
    return {"data": data["data"], "output": output["output and checkpoints"],
            "run": run["device, precision and seed"], "distributed": dist}



def add_iteration_run_args(parser: argparse.ArgumentParser, configs, names, save_every: int,
                           evaluation: Sequence[str] = ()) -> Dict[str, Group]:
    """The flags of an iteration-based script (segmentation, detection) after its model and optimizer
    flags: the pre-trained encoder and evaluation (``--finetune``, ``--finetune_sha256``, ``--eval``, the
    script's ``evaluation`` flags, ``--eval_every``), :func:`add_run_args`, ``--save_every`` (in
    iterations, default ``save_every``), ``--save_last_every`` and the script's flags ``names`` of
    ``configs`` in their groups; ``--log_every`` counts iterations."""
    add_flags(parser, configs, ["finetune", "finetune_sha256", "eval", *evaluation, "eval_every"],
              help={"finetune": "pre-trained encoder: any checkpoint main_finetune.py --finetune accepts (default: "
                                "none, random initialisation)"})
    groups = add_run_args(parser, by_epoch=False)
    add_flags(parser, configs, ["save_every", "save_last_every", *names], defaults={"save_every": save_every},
              help={"save_every": "iterations between numbered checkpoints (checkpoint-<iteration>.pth)"})
    set_help(parser, log_every="iterations between log lines, log.txt lines and TensorBoard points")
    return groups

def add_optim_args(parser: argparse.ArgumentParser, blr: float, weight_decay: float, warmup_epochs: float,
                   layer_decay: Optional[float] = None, min_lr: float = 0.0, adamw: bool = True) -> Group:
    """Learning-rate schedule and optimizer (lr = blr * effective batch / 256 unless --lr is set);
    ``--layer_decay`` where the script has one; ``--fused_adamw`` where it trains with AdamW."""
    names = ["lr", "blr", "min_lr", "warmup_epochs", "weight_decay", *(["layer_decay"] if layer_decay else []),
             "clip_grad", *(["fused_adamw"] if adamw else [])]
    defaults = {"blr": blr, "weight_decay": weight_decay, "warmup_epochs": warmup_epochs, "min_lr": min_lr,
                "layer_decay": layer_decay}
    return add_flags(parser, SHARED_CONFIGS, names, defaults)["optimizer and schedule"]


def add_weights_args(parser: argparse.ArgumentParser, eval_help: str) -> Group:
    """The "weights and evaluation" group: ``--finetune``, ``--finetune_sha256`` and ``--eval`` (in
    the script's words: what it evaluates)."""
    return add_flags(parser, SHARED_CONFIGS, ["finetune", "finetune_sha256", "eval"], help={"eval": eval_help})[
        "weights and evaluation"]

