"""Command-line flags: the parser every script uses, the per-flag range checks, the shared flags.

* :class:`Parser`: ``argparse`` with every flag's default in ``--help`` (:class:`HelpFormatter`) and
  mistakes answered by one ``error: --flag VALUE: what is valid`` line and exit status 2 (argparse
  prints a usage block and ``prog: error:`` instead).
* Per-flag ranges are ``type=`` validators (:func:`ranged` and its instances :data:`positive_int`,
  :data:`probability`, :data:`seed_int`, ...; :func:`str2list` for comma lists; :class:`OrderedPair` for
  ``MIN MAX`` pairs): a value out of range never reaches the code that would trip over it.
  Checks that need several flags or the model (mask ratio vs patch grid, heads vs widths, stride vs
  crop) are the scripts' ``validate()`` functions, which run before anything is built or written.
* The flags the ``main_*`` scripts share (MAE's names and meanings), in coherent groups.
"""
import argparse
import math
import re
from typing import Any, Callable, Dict, List, NoReturn, Optional, Sequence

from util.run.errors import say

Group = argparse._ArgumentGroup


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
# per-flag ranges: argparse ``type=`` functions (a bad value names itself and the valid range)


def _interval(kind: type, lo: Optional[float], hi: Optional[float], lo_open: bool, hi_open: bool) -> str:
    noun = "an integer" if kind is int else "a number"
    if lo is not None and hi is not None:
        if kind is int:
            return f"{noun} in {lo}..{hi}"
        return f"{noun} in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{noun} {'>' if lo_open else '>='} {lo:g}"
    if hi is not None:
        return f"{noun} {'<' if hi_open else '<='} {hi:g}"
    return noun


def ranged(kind: type, lo: Optional[float] = None, hi: Optional[float] = None, lo_open: bool = False,
           hi_open: bool = False, why: str = "", name: str = "") -> Callable[[str], Any]:
    """An argparse ``type=``: parse ``kind`` (int or float) and refuse values outside the interval.

    Args:
        kind: ``int`` or ``float`` (floats must also be finite: no nan / inf).
        lo / hi: bounds (None: unbounded); ``lo_open`` / ``hi_open``: exclusive bounds.
        why: appended to the message in parentheses (what the bound means).
        name: the function's name (argparse's fallback messages use it).

    The error reads ``VALUE: must be an integer >= 1 (why)``; :class:`Parser` puts the flag first.
    """
    expects = _interval(kind, lo, hi, lo_open, hi_open)

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except (TypeError, ValueError):
            value = None
        ok = value is not None and (kind is int or math.isfinite(value))
        ok = ok and (lo is None or (value > lo if lo_open else value >= lo))
        ok = ok and (hi is None or (value < hi if hi_open else value <= hi))
        if not ok:
            raise argparse.ArgumentTypeError(f"{text}: must be {expects}" + (f" ({why})" if why else ""))
        return value

    parse.__name__ = name or f"{kind.__name__}_range"
    parse.expects = expects  # type: ignore[attr-defined]  # read by str2list's messages
    return parse


positive_int = ranged(int, 1, name="positive_int")
nonneg_int = ranged(int, 0, name="nonneg_int")
positive_float = ranged(float, 0, lo_open=True, name="positive_float")
nonneg_float = ranged(float, 0, name="nonneg_float")
probability = ranged(float, 0, 1, name="probability")
rate = ranged(float, 0, 1, hi_open=True, name="rate")  # drop path, dropout, label smoothing: 1 would drop everything
share = ranged(float, 0, 1, lo_open=True, name="share")  # layer decay, crop areas, class shares: 0 would zero it
seed_int = ranged(int, 0, 2**32 - 1, why="numpy takes 32-bit seeds", name="seed_int")
port_number = ranged(int, 1, 65535, name="port_number")
mask_fraction = ranged(float, 0, 1, lo_open=True, hi_open=True, name="mask_fraction",
                    why="the fraction of patches removed: 0 would mask no patch, 1 every patch")


def str2list(kind: Callable[[str], Any], check: Optional[Callable[[List[Any]], Optional[str]]] = None
             ) -> Callable[[str], List[Any]]:
    """Parse ``"6,8,10,12"`` (or ``"6 8"``) into a non-empty list of ``kind`` (a type or a :func:`ranged`).

    Args:
        kind: the type of each value.
        check: an optional test of the whole list: returns what is wrong, or None.
    """
    expects = getattr(kind, "expects", f"a valid {getattr(kind, '__name__', 'value')}")

    def parse(s: str) -> List[Any]:
        items = s.replace(",", " ").split()
        if not items:
            raise argparse.ArgumentTypeError(f"{s!r}: give at least one value (comma-separated)")
        values = []
        for x in items:
            try:
                values.append(kind(x))
            except (argparse.ArgumentTypeError, TypeError, ValueError):
                raise argparse.ArgumentTypeError(f"{s}: {x} is not {expects}") from None
        problem = check(values) if check else None
        if problem:
            raise argparse.ArgumentTypeError(f"{s}: {problem}")
        return values

    parse.__name__ = f"{getattr(kind, '__name__', 'value')}_list"
    parse.is_list = True  # type: ignore[attr-defined]  # HelpFormatter shows its default comma-separated
    return parse


def increasing(values: Sequence[float]) -> Optional[str]:
    """A :func:`str2list` check: strictly increasing values."""
    return None if all(a < b for a, b in zip(values, values[1:])) else "values must be increasing and distinct"


def positive_sum(values: Sequence[float]) -> Optional[str]:
    """A :func:`str2list` check: at least one value above 0 (weights of a loss that must not vanish)."""
    return None if sum(values) > 0 else "at least one weight must be > 0 (the loss would be 0)"


class OrderedPair(argparse.Action):
    """``nargs=2`` values ``MIN MAX`` with ``MIN <= MAX`` (each value's range: its ``type=``).

    ``nargs='+'`` works too (the count is then checked here), for flags that must keep timm's
    spelling. Subclass with ``strict = True`` for ``MIN < MAX``.
    """

    strict = False

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        text = " ".join(map(str, values))
        if len(values) != 2:
            raise argparse.ArgumentError(self, f"{text}: give two values, MIN MAX")
        lo, hi = values
        if lo > hi or (self.strict and lo == hi):
            raise argparse.ArgumentError(self, f"{text}: MIN must be {'<' if self.strict else '<='} MAX")
        setattr(namespace, self.dest, list(values))  # what argparse itself stores for nargs


class StrictPair(OrderedPair):
    strict = True


hex_digest = re.compile(r"^[0-9a-fA-F]{1,64}$")


def sha256_prefix(text: str) -> str:
    """An argparse ``type=``: a sha256 hex digest or a prefix of one."""
    if not hex_digest.match(text):
        raise argparse.ArgumentTypeError(f"{text}: must be a sha256 hex digest or a prefix of one (1-64 of 0-9a-f)")
    return text.lower()


# --------------------------------------------------------------------------------------------
# the shared flags (MAE's names and meanings)


def add_training_args(parser: argparse.ArgumentParser, batch_size: int, epochs: int) -> Group:
    """``--batch_size``, ``--epochs``, ``--accum_iter`` (the epoch-based scripts)."""
    g = parser.add_argument_group("training")
    g.add_argument("--batch_size", default=batch_size, type=positive_int, metavar="N",
                   help="batch size per GPU (effective batch = batch_size * accum_iter * processes)")
    g.add_argument("--epochs", default=epochs, type=positive_int, metavar="N", help="training epochs")
    g.add_argument("--accum_iter", default=1, type=positive_int, metavar="N",
                   help="gradient accumulation iterations (an optimizer step every N batches)")
    return g


def add_run_args(parser: argparse.ArgumentParser, by_epoch: bool = True) -> Dict[str, Group]:
    """Data loading, output / checkpoint, device / precision / seed and distributed flags.

    ``by_epoch``: also MAE's epoch flags ``--start_epoch`` and ``--save_every`` (in epochs);
    iteration-based scripts add their own ``--save_every`` (in iterations) to the returned
    ``"output"`` group. Returns the groups (``data``, ``output``, ``run``, ``distributed``), so a
    script adds its own flags where they belong.
    """
    d = parser.add_argument_group("data")
    d.add_argument("--data_path", default="digits", type=str, metavar="DIR",
                   help="ImageFolder root with train/ (and val/) inside, 'digits' for the built-in dataset, or tar "
                        "shards (a folder of shards made by tools/make_shards.py, brace notation, pipe: URLs; "
                        "'digits-shards')")
    d.add_argument("--num_workers", default=10, type=nonneg_int, metavar="N",
                   help="data loading processes per GPU (0: load in the training process)")
    d.add_argument("--decode", default="auto", choices=["auto", "pil", "nvjpeg"],
                   help="image decoding: auto (JPEGs decoded at reduced size when the crop allows, libjpeg-turbo; "
                        "other formats as pil), pil (the reference: PIL decodes every image whole), nvjpeg (JPEGs "
                        "decoded on the GPU)")
    d.add_argument("--shuffle_buffer", default=1000, type=positive_int, metavar="N",
                   help="tar shards: samples each loader worker holds to shuffle")
    d.add_argument("--pin_mem", action="store_true",
                   help="pin CPU memory for faster host-to-device copies (the default)")
    d.add_argument("--no_pin_mem", action="store_false", dest="pin_mem", help="do not pin CPU memory")
    parser.set_defaults(pin_mem=True, auto_resume=True)

    o = parser.add_argument_group("output and checkpoints")
    o.add_argument("--output_dir", default="./output_dir", metavar="DIR", help="where checkpoints, log.txt and config.json go")
    o.add_argument("--log_dir", default=None, metavar="DIR", help="TensorBoard directory (default: --output_dir)")
    o.add_argument("--resume", default="", metavar="FILE", help="checkpoint to resume from (default: newest in --output_dir)")
    o.add_argument("--no_auto_resume", action="store_false", dest="auto_resume",
                   help="do not resume from the newest checkpoint found in --output_dir")
    if by_epoch:
        o.add_argument("--start_epoch", default=0, type=nonneg_int, metavar="N", help="first epoch when not resuming")
    o.add_argument("--log_every", default=20, type=positive_int, metavar="N",
                   help="iterations between log lines / TensorBoard points")
    if by_epoch:
        o.add_argument("--save_every", default=20, type=positive_int, metavar="N",
                       help="epochs between numbered checkpoints (checkpoint-<epoch>.pth; the last epoch always)")

    r = parser.add_argument_group("device, precision and seed")
    r.add_argument("--device", default="", help="cuda, cuda:N or cpu (default: cuda when available)")
    r.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"],
                   help="mixed precision (auto: bf16 on GPUs that support it, else fp16; none on CPU)")
    r.add_argument("--seed", default=0, type=seed_int, metavar="N",
                   help="seed of the initialisation, the data order and the masks")
    r.add_argument("--compile", action="store_true", help="torch.compile the model")
    r.add_argument("--grad_checkpointing", action="store_true",
                   help="recompute blocks in the backward pass: less activation memory, about 1/3 more compute")
    r.add_argument("--stop_check_every", default=10, type=positive_int, metavar="N",
                   help="optimizer steps between the checks that stop every process after the same step on "
                        "SIGTERM / SIGUSR1 (each check: one tiny all-reduce on the CPU)")

    dist = parser.add_argument_group("distributed")
    dist.add_argument("--world_size", default=1, type=positive_int, metavar="N",
                      help="MAE's flag, accepted for its command lines: the number of processes is the "
                           "launcher's (WORLD_SIZE, SLURM_NTASKS, OMPI_COMM_WORLD_SIZE)")
    dist.add_argument("--local_rank", "--local-rank", default=-1, type=ranged(int, -1, name="local_rank"),
                      dest="local_rank", metavar="N",
                      help="set by python -m torch.distributed.launch (either spelling); -1: not launched by it")
    dist.add_argument("--dist_on_itp", action="store_true", help="OpenMPI launch (OMPI_COMM_WORLD_* variables)")
    dist.add_argument("--dist_url", default="env://", metavar="URL", help="rendezvous URL")
    dist.add_argument("--dist_port", default=None, type=port_number, metavar="PORT",
                      help="master port for SLURM launches (default: MASTER_PORT, else 29500)")
    return {"data": d, "output": o, "run": r, "distributed": dist}


def add_adamw_args(g: Group, weight_decay: float, layer_decay: Optional[float] = None, fused: bool = True) -> None:
    """AdamW flags every training script shares: ``--weight_decay``, ``--layer_decay`` (where the
    script has one), ``--clip_grad``, ``--fused_adamw`` (``fused``: not for a script whose optimizer
    is not AdamW)."""
    g.add_argument("--weight_decay", type=nonneg_float, default=weight_decay, metavar="WD",
                   help="AdamW weight decay (not on biases, norms, tokens)")
    if layer_decay is not None:
        g.add_argument("--layer_decay", type=share, default=layer_decay, metavar="DECAY",
                       help="layer-wise lr decay (BEiT / MAE): block i of L gets lr * decay^(L + 1 - i)")
    g.add_argument("--clip_grad", type=nonneg_float, default=None, metavar="NORM",
                   help="clip the gradient norm to NORM (default: off; 0 is off too)")
    if fused:
        g.add_argument("--fused_adamw", default=None, action=argparse.BooleanOptionalAction,
                       help="fused AdamW kernels (default: on for CUDA and CPU)")


def add_optim_args(parser: argparse.ArgumentParser, blr: float, weight_decay: float, warmup_epochs: float,
                   layer_decay: Optional[float] = None, min_lr: float = 0.0, adamw: bool = True) -> Group:
    """Learning-rate schedule and optimizer (lr = blr * effective batch / 256 unless --lr is set)."""
    g = parser.add_argument_group("optimizer and schedule")
    g.add_argument("--lr", type=positive_float, default=None, metavar="LR",
                   help="absolute learning rate (default: from --blr)")
    g.add_argument("--blr", type=positive_float, default=blr, metavar="LR",
                   help="base learning rate: lr = blr * total batch size / 256")
    g.add_argument("--min_lr", type=nonneg_float, default=min_lr, metavar="LR",
                   help="lower bound of the cosine schedule")
    g.add_argument("--warmup_epochs", type=nonneg_float, default=warmup_epochs, metavar="N",
                   help="epochs of linear warm-up (fractions allowed)")
    add_adamw_args(g, weight_decay, layer_decay, fused=adamw)
    return g


def add_weights_args(parser: argparse.ArgumentParser) -> Group:
    """The "weights and evaluation" group with ``--finetune`` and ``--finetune_sha256`` (every script
    that starts from pre-trained weights)."""
    f = parser.add_argument_group("weights and evaluation")
    f.add_argument("--finetune", default="", metavar="CHECKPOINT",
                   help="pre-trained weights: a file (this repo's, MAE's, the reference DeepMIM's, timm / "
                        ".safetensors), a published name (e.g. mae_pretrain_vit_base), an http(s) URL or hf-hub:ORG/NAME "
                        "(default: none, random initialisation)")
    f.add_argument("--finetune_sha256", default=None, type=sha256_prefix, metavar="HEX",
                   help="expected sha256 (prefix) of a downloaded --finetune (default: not checked)")
    return f


def add_classification_args(parser: argparse.ArgumentParser, model: str, epochs: int, batch_size: int,
                            global_pool: bool) -> Dict[str, Group]:
    """Flags shared by fine-tuning and linear probing (MAE's names): the training, model, weights /
    evaluation and augmentation groups, returned so each script adds its own flags to them."""
    t = add_training_args(parser, batch_size, epochs)
    m = parser.add_argument_group("model")
    # None: not given (the default below, or with --eval what the checkpoint stores)
    m.add_argument("--model", default=None, type=str, metavar="MODEL",
                   help=f"registered ViT name (models_vit; default: {model}; with --eval: the checkpoint's)")
    m.add_argument("--input_size", default=None, type=positive_int, metavar="PX",
                   help="image size (default: the model's, 224 or 32; with --eval: the checkpoint's)")
    m.add_argument("--global_pool", action="store_true", default=None,
                   help="average-pool the patch tokens")
    m.add_argument("--cls_token", action="store_false", dest="global_pool",
                   help="use the cls token")
    m.add_argument("--nb_classes", default=None, type=positive_int, metavar="N",
                   help="classes (default: the number of class folders; with --eval: the checkpoint's head)")
    f = add_weights_args(parser)
    f.add_argument("--eval", action="store_true",
                   help="only evaluate --resume (its head), else --finetune, else the newest checkpoint in --output_dir, "
                        "on data_path/val, with the model the checkpoint stores")
    f.add_argument("--dist_eval", action="store_true", help="shard evaluation over processes (each image once)")
    a = parser.add_argument_group("augmentation")
    a.add_argument("--crop_scale", type=share, nargs=2, default=(0.08, 1.0), metavar=("MIN", "MAX"),
                   action=OrderedPair,
                   help="RandomResizedCrop area range, 0 < MIN <= MAX <= 1 (timm's default; small images such as "
                        "digits want ~0.5 1)")
    a.add_argument("--hflip", type=probability, default=0.5, help="horizontal flip probability (0 for digits, text, ...)")
    for action in m._group_actions:  # say which of --global_pool / --cls_token is the default
        if action.dest == "global_pool" and action.const is global_pool:
            action.help += " (the default)"
    return {"training": t, "model": m, "weights": f, "augmentation": a}
