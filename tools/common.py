"""What the tools share: the checkpoints they compare, their labels and the encoder flags; the device
flag; progress bars; reading a released pre-training checkpoint (reference DeepMIM, MAE) as this
repo's model."""
import argparse
import contextlib
import sys
from typing import Any, Dict, Iterable, List, Optional, Sequence, TextIO, Tuple

from util.checkpoints import convert
from util.config.cli import positive_int
from util.run.dist import resolve_device
from util.run.errors import UserError

import torch

from models_deepmim import DeepMIMConfig, default_ds_layers

# seconds between two progress lines where stderr is not a terminal (a log file, a pipe, a batch job)
PROGRESS_EVERY = 30.0


def add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    """Positional checkpoints, ``--names`` and the flags that build each encoder
    (``models_vit.from_checkpoint``)."""
    p.add_argument("checkpoints", nargs="+", help="checkpoints of any layout util/convert.load_encoder reads")
    p.add_argument("--names", nargs="+", default=None, help="one label per checkpoint (default: the paths)")
    p.add_argument("--model", default=None, help="registered ViT name (default: read the shapes off the checkpoint)")
    p.add_argument("--num_heads", default=None, type=positive_int, metavar="N",
                   help="encoder heads when inferring (default: the standard count for the width)")
    p.add_argument("--input_size", default=None, type=positive_int, metavar="PX",
                   help="image size (default: the checkpoint's)")


def add_device_arg(p: argparse.ArgumentParser) -> None:
    """``--device``: empty (the default) means CUDA when available, else the CPU (:func:`tool_device`)."""
    p.add_argument("--device", default="", help="cuda, cuda:N or cpu (default: cuda when available)")


def tool_device(name: str) -> torch.device:
    """The device of ``--device`` (``util.run.dist.resolve_device``: empty picks CUDA when available)."""
    return resolve_device(name)


class _Lines:
    """A file for tqdm off a terminal: each redraw becomes one plain line (no carriage returns), a
    repeated line is written once."""

    def __init__(self, stream: TextIO) -> None:
        self.stream, self.last = stream, ""

    def write(self, text: str) -> int:
        line = text.replace("\r", "").replace("\x1b[A", "").strip()
        if line and line != self.last:
            self.stream.write(line + "\n")
            self.stream.flush()
            self.last = line
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def progress(iterable: Optional[Iterable] = None, total: Optional[int] = None, desc: str = "", unit: str = "it",
             leave: bool = True, enabled: bool = True, every: Optional[float] = None, **kwargs: Any):
    """A tqdm progress bar on stderr: redrawn in place on a terminal; elsewhere one plain line at most
    every ``every`` seconds (default :data:`PROGRESS_EVERY`), so that a long run in a batch job's log
    still shows how far it is and its rate / ETA. ``enabled=False`` (ranks other than 0): silent.
    """
    from tqdm import tqdm

    if sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, disable=not enabled, dynamic_ncols=True,
                    **kwargs)
    interval = PROGRESS_EVERY if every is None else every
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    # no bar drawn in a log: the counts, rate and ETA (tqdm's own format where the total is unknown)
    fmt = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]" if total else None
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, disable=not enabled, file=_Lines(sys.stderr),
                mininterval=interval, maxinterval=max(interval, 10.0), bar_format=fmt, **kwargs)


def progress_logging() -> contextlib.AbstractContextManager:
    """While a bar is drawn on a terminal, log lines go through tqdm (the bar is redrawn below them)."""
    if not sys.stderr.isatty():
        return contextlib.nullcontext()
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm()


def checkpoint_names(args: argparse.Namespace) -> List[str]:
    """One distinct label per checkpoint (they key the results): ``--names``, else the paths."""
    names = args.names or list(args.checkpoints)
    if len(names) != len(args.checkpoints):
        raise UserError(f"--names gives {len(names)} labels for {len(args.checkpoints)} checkpoints; give one each.")
    if len(set(names)) != len(names):
        raise UserError("--names must be distinct (they key the results).")
    return names


def release_to_ours(sd: Dict[str, torch.Tensor], source: str, ds_layers: Optional[Sequence[int]] = None,
                    num_heads: Optional[int] = None, decoder_num_heads: Optional[int] = None
                    ) -> Tuple[str, Dict[str, torch.Tensor], DeepMIMConfig]:
    """A reference DeepMIM / MAE pre-training state dict -> (its layout, our names, the model config).

    The reference's decoders k = 1..N belong to ``ds_layers`` (default: 6, 8, 10, 12 for depth 12); MAE's
    one decoder to the last layer.
    """
    kind = convert.require_layout(sd, ("reference", "mae"), source)
    depth = convert.infer_encoder_config(sd)["depth"]
    layers = ds_layers or ((depth,) if kind == "mae" else default_ds_layers(depth))
    ours = convert.reference_to_ours(sd, layers)
    return kind, ours, DeepMIMConfig(**convert.infer_pretrain_config(ours, num_heads, decoder_num_heads))
