"""What the tools share: the checkpoints they compare, their labels and the encoder flags; reading a
released pre-training checkpoint (reference DeepMIM, MAE) as this repo's model."""
import argparse
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from models_deepmim import DeepMIMConfig, default_ds_layers
from util import convert
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
