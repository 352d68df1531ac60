"""What the analysis tools share: the checkpoints they compare, their labels and the encoder flags."""
import argparse
from typing import List

from util.cli import positive_int
from util.errors import UserError


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


def checkpoint_names(args: argparse.Namespace) -> List[str]:
    """One distinct label per checkpoint (they key the results): ``--names``, else the paths."""
    names = args.names or list(args.checkpoints)
    if len(names) != len(args.checkpoints):
        raise UserError(f"--names gives {len(names)} labels for {len(args.checkpoints)} checkpoints; give one each.")
    if len(set(names)) != len(names):
        raise UserError("--names must be distinct (they key the results).")
    return names
