"""Write an ImageFolder (or the built-in ``digits``) as tar shards, or index shards made elsewhere.

    # ImageNet: train/ and val/ -> /data/imagenet-shards/{train,val}-NNNNNN.tar + {train,val}.json
    python tools/make_shards.py --data_path /data/imagenet --output /data/imagenet-shards --shard_size 1250
    # then: --data_path /data/imagenet-shards   (or the printed train-{000000..001024}.tar spec)

    # shards from another tool (webdataset layout: <key>.jpg + <key>.cls): write the index beside them
    python tools/make_shards.py --index "/data/in1k-wds/imagenet1k-train-{0000..1023}.tar"
    # img2dataset's shards (<key>.jpg + <key>.json / <key>.txt, no labels): indexed as unlabelled,
    # for pre-training only
    python tools/make_shards.py --index "/data/laion/part-{00000..00999}.tar"

Each sample keeps the image file's bytes unchanged (no re-encoding) and its class index (``.cls``);
the class names go to ``<split>.json`` with every shard's sample count. Samples are shuffled across
shards (``--seed``); the output is byte-for-byte deterministic. The brace spec of each split is
printed at the end; a progress bar per split shows the shards written, the rate and the ETA. See
``util/data/shards.py`` for the format and how training reads it.
"""
import argparse
import re
from pathlib import Path
from typing import Any, Dict

from util.data.datasets import resolve_data_path
from util.data.shards import SPLITS, index_shards, write_shards
from util.run.errors import run_cli

from tools.common import progress


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("Write tar shards from an ImageFolder", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", help="ImageFolder root (train/<class>/<image>, val/...) or 'digits'")
    p.add_argument("--output", help="folder to write <split>-NNNNNN.tar and <split>.json into")
    p.add_argument("--splits", nargs="+", default=list(SPLITS), help="sub-folders of --data_path to write")
    p.add_argument("--shard_size", type=int, default=1000,
                   help="samples per shard (ImageNet: 1000-1250 gives ~110-140 MB shards, ~1000 train shards)")
    p.add_argument("--seed", type=int, default=0, help="shuffle across shards; -1 keeps the folder's order")
    p.add_argument("--index", metavar="SPEC", help="instead: count the samples of existing shards and write their index")
    p.add_argument("--index_out", help="where --index writes (default: beside the first shard, <name>.json)")
    return p


class ShardProgress:
    """``write_shards``' messages (``"<split>: k/n shards, m images"``, every tenth of the shards) drive a
    progress bar per split; any other message is printed as it is."""

    PATTERN = re.compile(r"(?P<split>\S+): (?P<k>\d+)/(?P<n>\d+) shards, (?P<rest>.*)")

    def __init__(self) -> None:
        self.bars: Dict[str, Any] = {}

    def __call__(self, msg: str) -> None:
        m = self.PATTERN.fullmatch(msg)
        if m is None:
            print(msg, flush=True)
            return
        split, k, n = m["split"], int(m["k"]), int(m["n"])
        bar = self.bars.get(split)
        if bar is None:
            bar = self.bars[split] = progress(total=n, desc=f"{split} shards", unit="shard", every=0)
        bar.set_postfix_str(m["rest"], refresh=False)
        if k < n:
            bar.update(k - bar.n)
        else:  # the last message: one final line
            bar.n = k
            bar.close()


def main(args: argparse.Namespace) -> None:
    if args.index:
        dest, index = index_shards(args.index, args.index_out)
        labels = (f"{len(index['classes'])} classes" if index["labelled"]
                  else "no class labels (.cls): pre-training only")
        print(f"{index['num_samples']} samples in {len(index['shards'])} shards, {labels}; index written to {dest}")
        return
    if not args.data_path or not args.output:
        raise SystemExit("error: --data_path and --output are required (or --index SPEC)")
    src, out = resolve_data_path(args.data_path), Path(args.output)
    specs = []
    for split in args.splits:
        spec, index = write_shards(src, out, split, args.shard_size, None if args.seed < 0 else args.seed,
                                   log=ShardProgress())
        specs.append(spec)
        print(f"{split}: {index['num_samples']} images, {len(index['classes'])} classes -> {spec}", flush=True)
    print(f"done; train with --data_path {out} (or a spec above)")


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
