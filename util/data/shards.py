"""Tar shards (the WebDataset layout): the format, its index, the writer, and the readers.

At ImageNet scale a job reads 1.28 M small files per epoch; a cluster file system serves a few
thousand large sequential files much better. Shards are plain POSIX tar files, each holding a few
hundred to a few thousand samples; a sample is the tar members sharing one key:
``<key>.jpg`` (or ``.png`` ...: the image file's bytes, unchanged) and ``<key>.cls`` (the class
index as decimal text). This is the layout open_clip and timm read, and the one published
ImageNet shards use, so the same files serve every tool. Shards without labels (img2dataset's
layout for LAION-style collections: ``<key>.jpg`` + ``<key>.json`` / ``<key>.txt``, no ``.cls``)
serve pre-training: their index records ``"labelled": false`` and no classes, and the readers give
their images the label ``util.data.datasets.NO_LABEL``; fine-tuning, probing and evaluation refuse them.

The library is ``webdataset``: it expands brace notation (``train-{000000..001023}.tar``), opens
local paths, ``pipe:`` commands (``pipe:aws s3 cp s3://bucket/train-000000.tar -``) and URLs, and
iterates tar streams without seeking (so a pipe works), and it writes tars. Its own pipeline
(shard shuffling, ``split_by_node`` / ``split_by_worker``, a shuffle buffer on Python's ``random``)
cannot resume mid-epoch or give every rank the same number of samples, so the order is ours:
a pure function of (seed, epoch, rank, number of workers) computed from sample counts alone, which
gives an exact resume. (litdata and mosaicml-streaming resume too, but with their own formats and
a heavier runtime; tar shards stay readable by everything else.)

Where the shards are (``--data_path``), see :func:`is_shard_spec`:

* a folder holding ``train-NNNNNN.tar`` ... with ``train.json`` (and ``val-*.tar``, ``val.json``), as
  ``tools/make_shards.py`` writes it: the split is chosen by name, like an ImageFolder root;
* brace notation, a single ``.tar``, several specs joined by ``::``, local or ``pipe:`` / URL; the
  index is looked for beside the first shard, named after it: ``.../train-{000000..000009}.tar``
  -> ``.../train.json`` (through the same pipe command or URL);
* ``digits-shards``: the built-in digits written as shards (tests, demo).

The index (``<split>.json``) lists every shard's name and sample count, and the class names: the
readers need the counts to split an epoch exactly, and ``num_samples`` is known before reading.

The training order of an epoch (:class:`ShardData`): the shards are permuted (seed, epoch); the
samples, concatenated in that order, are cut into ``world_size`` equal ranges of ``steps * batch``
samples (the remainder, fewer than ``world_size * batch``, is left out of that epoch, as
``drop_last`` does); each rank's range is cut into one contiguous stream per loader worker, each
read sequentially through a seeded shuffle buffer. A batch is one stream's next ``batch`` samples;
step ``g`` comes from stream ``g % num_workers``, which is the order in which the DataLoader takes
its workers' outputs. Each sample's augmentation is seeded from (seed, epoch, sample id), the id
being its position in the index, like the folder path's (seed, epoch, index).

Resume: the order is computed from the counts, so ``batches(start_step)`` knows which samples the
skipped steps used; each stream reads only the shards that still hold samples it needs, and only
those samples' bytes (tar members it does not need are streamed past, not decoded). The resumed
stream equals the tail of the uninterrupted one, batch for batch, provided the seed, the world
size, the batch size, ``num_workers`` and the shards are the same. With another ``num_workers`` the
epoch's order is a different (deterministic) one, so the resumed epoch may repeat or miss samples;
later epochs are complete again.
"""
import io
import json
import logging
import re
import tarfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from util.checkpoints.files import atomic_path, save_json
from util.data.datasets import NO_LABEL, build_digits, building, cache_root, finish_images, image_folder
from util.data.decode import EncodedImage, collate, open_rgb
from util.data.loader import build_loader
from util.run.errors import UserError
from util.run.seed import derive_seed, seed_host

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

_log = logging.getLogger(__name__)

INDEX_FORMAT = "deepmim-shards"
INDEX_VERSION = 1
BUILTIN_SHARDS = "digits-shards"
DIGITS_SHARD_SIZE = 256
SPLITS = ("train", "val")
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "pgm", "tif", "tiff")
DEFAULT_SHUFFLE_BUFFER = 1000  # samples held per worker (raw bytes: ~110 MB of ImageNet JPEGs)
_ORDER = 0x5AD0  # keeps the order's seeds apart from the samples' derive_seed(seed, epoch, id)
_BRACES = re.compile(r"\{[^{}]*\.\.[^{}]*\}")
_SHARD_SUFFIX = re.compile(r"[-_.]?(\{[^{}]*\}|\d+)?\.tar(?=\s|$|::)")


# --------------------------------------------------------------------------------------------
# where the shards are


def is_shard_spec(data_path: str) -> bool:
    """Whether ``--data_path`` names tar shards rather than an ImageFolder root (see the module docstring)."""
    s = str(data_path)
    if s == BUILTIN_SHARDS or s.startswith("pipe:") or "::" in s or _BRACES.search(s) or s.endswith(".tar"):
        return True
    p = Path(s)
    return p.is_dir() and any((p / f"{split}.json").is_file() for split in SPLITS) and any(p.glob("*.tar"))


@dataclass(frozen=True)
class ShardSet:
    """Resolved shards of one split: where each is, how many samples it holds, the class names."""

    urls: Tuple[str, ...]
    counts: Tuple[int, ...]
    classes: Tuple[str, ...]
    spec: str  # as given, for messages
    labelled: bool = True  # every sample has a class label (.cls); indexes without the field were written so

    @property
    def num_samples(self) -> int:
        return int(sum(self.counts))

    @property
    def starts(self) -> np.ndarray:
        """Id of each shard's first sample (ids number the samples in index order)."""
        return np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)


def index_location(spec: str) -> str:
    """Where a spec's index is: the first shard's name without its number, ``.json``.

    ``/d/train-{000000..000009}.tar`` -> ``/d/train.json``; ``pipe:cat /d/train-000003.tar`` ->
    ``pipe:cat /d/train.json``.
    """
    first = spec.split("::")[0]
    matches = list(_SHARD_SUFFIX.finditer(first))
    if not matches:
        raise UserError(f"{spec!r} does not name .tar shards; expected e.g. /data/imagenet/train-{{000000..001023}}.tar")
    m = matches[-1]
    return first[:m.start()] + ".json" + first[m.end():]


def _shard_name(url: str) -> str:
    names = re.findall(r"([^/\s:]+\.tar)(?=\s|$)", url)
    return names[-1] if names else url


def _open(url: str):
    import webdataset as wds

    try:
        return wds.gopen(url, "rb")
    except (OSError, ValueError) as e:
        raise UserError(f"Cannot open {url}: {e}.") from None


def read_index(url: str) -> Dict[str, Any]:
    """The index written by :func:`write_shards` / :func:`index_shards`, from a path, ``pipe:`` or URL."""
    try:
        with _open(url) as f:
            index = json.loads(f.read())
    except (UserError, OSError, ValueError) as e:
        raise UserError(f"Cannot read the shard index {url} ({e}). tools/make_shards.py writes one beside the shards "
                        f"it makes; for other shards, write it with: python tools/make_shards.py --index SPEC") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT or "shards" not in index:
        raise UserError(f"{url} is not a shard index written by tools/make_shards.py (format {INDEX_FORMAT!r}).")
    return index


def open_shards(data_path: str, split: str = "train", index: Optional[str] = None) -> ShardSet:
    """Resolve ``data_path`` (folder of shards, spec, or ``digits-shards``) to the :class:`ShardSet` of ``split``.

    Args:
        split: the split a folder of shards is read for (``train`` / ``val``); a spec names its shards itself.
        index: an explicit index location (path, ``pipe:`` or URL) instead of the one beside the shards.
    """
    spec = str(data_path)
    if spec == BUILTIN_SHARDS:
        spec = str(build_digits_shards(cache_root()))
    folder = Path(spec)
    if not _BRACES.search(spec) and not spec.endswith(".tar") and "::" not in spec and not spec.startswith("pipe:"):
        if not folder.is_dir():
            raise UserError(f"Shard folder {spec!r} does not exist.")
        idx = read_index(index or str(folder / f"{split}.json"))
        urls = [str(folder / s["name"]) for s in idx["shards"]]
    else:
        import webdataset as wds

        idx = read_index(index or index_location(spec))
        urls = wds.shardlists.expand_urls(spec)
    counts = {s["name"]: int(s["count"]) for s in idx["shards"]}
    missing = [u for u in urls if _shard_name(u) not in counts]
    if missing:
        raise UserError(f"{len(missing)} shard(s) of {spec!r} are not in its index (first: {missing[0]}); "
                        f"rewrite the index with: python tools/make_shards.py --index SPEC")
    shards = ShardSet(tuple(urls), tuple(counts[_shard_name(u)] for u in urls), tuple(idx.get("classes", [])), spec,
                      bool(idx.get("labelled", True)))
    if shards.num_samples == 0:
        raise UserError(f"The shards {spec!r} hold no samples.")
    return shards


def labelled_shards(data_path: str, split: str = "train") -> ShardSet:
    """:func:`open_shards` for a job that needs labels: shards without them stop it with one message."""
    shards = open_shards(data_path, split)
    if not shards.labelled:
        raise UserError(f"The shards {shards.spec!r} have no class labels (their index records none: no .cls members); "
                        f"unlabelled images serve pre-training only. Pass a labelled --data_path (shards with .cls "
                        f"members, or train/<class>/<image> and val/<class>/<image>).")
    return shards


# --------------------------------------------------------------------------------------------
# writing


def brace_spec(folder: Path, prefix: str, n_shards: int, width: int) -> str:
    """``folder/prefix-{000000..000009}.tar`` (a single shard: its name)."""
    if n_shards == 1:
        return str(folder / f"{prefix}-{0:0{width}d}.tar")
    return str(folder / f"{prefix}-{{{0:0{width}d}..{n_shards - 1:0{width}d}}}.tar")


def write_shards(src: Path, output: Path, split: str, shard_size: int, seed: Optional[int] = 0,
                 log: Optional[Callable[[str], None]] = None) -> Tuple[str, Dict[str, Any]]:
    """Write the ImageFolder ``src/split`` as tar shards ``output/split-NNNNNN.tar`` plus ``output/split.json``.

    Deterministic: the same folder, ``shard_size`` and ``seed`` give byte-identical files (fixed
    member times and owners). Samples are shuffled across shards with ``seed`` (None keeps the
    folder's order): sorted by class, a shard would otherwise hold one or two classes and a
    shuffle buffer could not mix them. A sample's key is its index in the sorted folder
    (``%08d``), its label the folder's class index; the class names go to the index file. Each
    shard is written under a temporary name and renamed, the index last.

    Returns:
        the brace spec of the shards written, and the index.
    """
    import webdataset as wds

    if shard_size < 1:
        raise UserError(f"--shard_size must be at least 1, not {shard_size}.")
    folder = image_folder(src / split, None, split)
    order = np.arange(len(folder.samples)) if seed is None else np.random.RandomState(seed).permutation(len(folder.samples))
    n_shards = -(-len(order) // shard_size)
    width = max(6, len(str(n_shards - 1)))
    output.mkdir(parents=True, exist_ok=True)
    shards = []
    for k in range(n_shards):
        name = f"{split}-{k:0{width}d}.tar"
        ids = order[k * shard_size:(k + 1) * shard_size]
        with (atomic_path(output / name) as tmp, open(tmp, "wb") as f,
              wds.TarWriter(f, encoder=False, mtime=0.0, user="deepmim", group="deepmim") as tar):
            for i in ids:
                path, label = folder.samples[i]
                data = Path(path).read_bytes()
                try:  # header only: refuse what no reader could decode, naming the file
                    Image.open(io.BytesIO(data))
                except (OSError, ValueError, Image.DecompressionBombError) as e:
                    raise UserError(f"Cannot read image {path}: {e}. Remove or replace the file.") from None
                ext = Path(path).suffix.lower().lstrip(".")
                tar.write({"__key__": f"{int(i):08d}", ext: data, "cls": str(label).encode()})
        shards.append({"name": name, "count": int(len(ids))})
        if log is not None and (k + 1 == n_shards or (k + 1) % max(1, n_shards // 10) == 0):
            log(f"{split}: {k + 1}/{n_shards} shards, {sum(s['count'] for s in shards)} images")
    index = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "split": split, "num_samples": len(order),
             "classes": list(folder.classes), "shard_size": shard_size, "shuffle_seed": seed,
             "keys": "index of the image in the sorted ImageFolder split", "labelled": True, "shards": shards}
    save_json(index, output / f"{split}.json", indent=1, sort_keys=False)
    return brace_spec(output, split, n_shards, width), index


def index_shards(spec: str, output: Optional[str] = None) -> Tuple[str, Dict[str, Any]]:
    """Count the samples of existing shards (made by another tool) and write their index.

    The class names are unknown there: they are the label values, ``"0"`` to the largest ``cls``
    seen. Shards whose samples do not all have a ``.cls`` label (img2dataset's ``<key>.jpg`` +
    ``.json`` / ``.txt``) are indexed as unlabelled: ``"labelled": false``, no classes (pre-training
    only). ``output`` defaults to :func:`index_location` (which must then be a local path).
    Returns the index's path and the index.
    """
    import webdataset as wds

    dest = output or index_location(spec)
    if dest.startswith("pipe:") or "://" in dest:
        raise UserError(f"Cannot write the index to {dest}; pass a local path (--index_out) and copy it there.")
    shards, top, labelled = [], -1, True
    for url in wds.shardlists.expand_urls(spec):
        n = 0
        for _, sample in _read_shard(url, None, None):
            n += 1
            label = _optional_label(sample)
            labelled = labelled and label != NO_LABEL
            top = max(top, label)
        shards.append({"name": _shard_name(url), "count": n})
    index = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "split": None,
             "num_samples": sum(s["count"] for s in shards),
             "classes": [str(c) for c in range(top + 1)] if labelled else [], "labelled": labelled,
             "keys": "as written by the tool that made the shards", "shards": shards}
    save_json(index, Path(dest), indent=1, sort_keys=False)
    return dest, index


def build_digits_shards(root: Path) -> Path:
    """The built-in digits as shards, ``root/digits-shards/{train,val}-NNNNNN.tar`` + index, written once."""
    dest = root / BUILTIN_SHARDS
    if all((dest / f"{split}.json").is_file() for split in SPLITS):
        return dest
    digits = build_digits(root)
    with building(dest) as tmp:
        for split in SPLITS:
            write_shards(digits, tmp, split, DIGITS_SHARD_SIZE)
    _log.info("built-in digits shards written to %s", dest)
    return dest


# --------------------------------------------------------------------------------------------
# reading


class _Done(Exception):
    """Raised inside the tar iterator once the last wanted sample has gone by (stop reading the shard)."""


class _Select:
    """``select_files`` for webdataset's tar iterator: counts samples by key, keeps wanted ones' members."""

    def __init__(self, wanted: Optional[set], last: Optional[int]) -> None:
        from webdataset.tariterators import base_plus_ext

        self.key_of = base_plus_ext
        self.wanted, self.last = wanted, last
        self.ordinal, self.key = -1, None

    def __call__(self, fname: str) -> bool:
        key = self.key_of(fname)[0]
        if key is None:
            return False
        if key != self.key:
            self.key, self.ordinal = key, self.ordinal + 1
            if self.last is not None and self.ordinal > self.last:
                raise _Done
        return self.wanted is None or self.ordinal in self.wanted


def _read_shard(url: str, wanted: Optional[Sequence[int]], expected: Optional[int]
                ) -> Iterator[Tuple[int, Dict[str, Any]]]:
    """``(ordinal, sample)`` for the samples of shard ``url`` whose ordinal is in ``wanted`` (None: all),
    in order; a sample is ``{"__key__": key, ext: bytes, ...}``. Members of other samples are streamed
    past without being kept, and reading stops after the last wanted one."""
    from webdataset.tariterators import tar_file_iterator

    sel = _Select(None if wanted is None else set(int(w) for w in wanted), None if wanted is None else int(max(wanted)))
    found = 0
    current: Optional[Dict[str, Any]] = None
    ordinal = -1
    stream = _open(url)
    try:
        for member in tar_file_iterator(stream, select_files=sel):
            if current is None or sel.ordinal != ordinal:
                if current is not None:
                    found += 1
                    yield ordinal, current
                current, ordinal = {"__key__": sel.key}, sel.ordinal
            current[member["fname"].rsplit("/", 1)[-1].split(".", 1)[1].lower()] = member["data"]
    except _Done:
        pass
    except (OSError, ValueError, EOFError, tarfile.TarError) as e:  # a truncated or corrupt shard
        raise UserError(f"Cannot read shard {url}: {e}.") from None
    finally:
        stream.close()
    if current is not None:
        found += 1
        yield ordinal, current
    if wanted is not None and found < len(sel.wanted):
        raise UserError(f"Shard {url} holds fewer samples than its index says ({sel.ordinal + 1} < "
                        f"{expected}); rewrite the index with: python tools/make_shards.py --index SPEC")


def read_samples(shards: ShardSet, ids: np.ndarray, needed: Optional[np.ndarray] = None
                 ) -> Iterator[Tuple[int, Dict[str, Any]]]:
    """``(id, sample)`` for ``ids`` (runs of consecutive members of shards, in reading order) that are in
    ``needed`` (None: all of them), reading nothing else; a shard without a needed sample is not opened."""
    if len(ids) == 0:
        return
    starts = shards.starts
    shard_of = np.searchsorted(starts, ids, side="right") - 1
    keep = np.ones(len(ids), bool) if needed is None else np.isin(ids, needed)
    cuts = np.flatnonzero(np.diff(shard_of)) + 1
    for run in np.split(np.arange(len(ids)), cuts):
        s = int(shard_of[run[0]])
        members = ids[run[keep[run]]] - starts[s]
        if len(members):
            for ordinal, sample in _read_shard(shards.urls[s], members, shards.counts[s]):
                yield int(starts[s] + ordinal), sample


def _label(sample: Dict[str, Any], where: str) -> int:
    try:
        return int(sample["cls"])
    except (KeyError, ValueError):
        raise UserError(f"Sample {sample.get('__key__')} of {where} has no class label (a .cls member holding an "
                        f"integer); fine-tuning, probing and evaluation need one (pre-training does not).") from None


def _optional_label(sample: Dict[str, Any]) -> int:
    """The sample's class label, or :data:`NO_LABEL` when it has none (a non-negative integer ``.cls``)."""
    try:
        label = int(sample["cls"])
    except (KeyError, ValueError):
        return NO_LABEL
    return label if label >= 0 else NO_LABEL


def decode_sample(sample: Dict[str, Any], where: str, transform, need_label: bool = True) -> Tuple[Any, int]:
    """``(transformed image, label)``: the transform gets the bytes when it decodes itself, else a PIL image.
    Without ``need_label`` (pre-training) a sample without a label gets :data:`NO_LABEL`."""
    ext = next((k for k in IMAGE_KEYS if k in sample), None)
    if ext is None:
        raise UserError(f"Sample {sample.get('__key__')} of {where} has no image (members: {sorted(sample)}).")
    img = EncodedImage(sample[ext], f"{where}:{sample['__key__']}.{ext}")
    label = _label(sample, where) if need_label else _optional_label(sample)
    if transform is None:
        return open_rgb(img), label
    return (transform(img) if getattr(transform, "accepts_encoded", False) else transform(open_rgb(img))), label


def shuffle_order(ids: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """The order in which a shuffle buffer of ``size`` emits ``ids`` read in order.

    The buffer fills up, then each newly read item takes the place of a random one, which leaves;
    at the end the rest leave in random order. A pure function of (ids, size, rng), so it is
    computed without reading: a reader emitting in this order never holds more than ``size``
    read-but-not-emitted samples.
    """
    n = len(ids)
    size = min(int(size), n)
    if size <= 1:
        return ids.copy()
    buf, src = ids[:size].tolist(), ids.tolist()
    out = []
    for t, k in enumerate(rng.integers(0, size, n - size).tolist()):
        out.append(buf[k])
        buf[k] = src[size + t]
    out.extend(np.asarray(buf)[rng.permutation(size)].tolist())
    return np.asarray(out, dtype=ids.dtype)


def _emit(shards: ShardSet, read_ids: np.ndarray, order: np.ndarray) -> Iterator[Tuple[int, Dict[str, Any]]]:
    """Samples in ``order``, reading ``read_ids`` (their reading order) and holding only what comes later."""
    reader = read_samples(shards, read_ids, order)
    held: Dict[int, Dict[str, Any]] = {}
    for i in order.tolist():
        while i not in held:
            got, sample = next(reader)
            held[got] = sample
        yield i, held.pop(i)


class _Stream(IterableDataset):
    """Runs in each loader worker: the batches of that worker's steps (or all of them without workers)."""

    def __init__(self, batches: Callable[[int], Iterator]) -> None:
        self.batches = batches

    def __iter__(self):
        info = get_worker_info()
        return self.batches(info.id if info is not None else 0)


def _loader(stream: _Stream, num_workers: int, pin_mem: bool) -> DataLoader:
    # batch_size=None: the workers make whole batches; the DataLoader takes one from each worker
    # in turn (worker 0, 1, ..., 0, ...), which is the order the batches are planned in
    return build_loader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_mem)


class ShardData:
    """A training data source over tar shards (``util.data.build.TrainData``); the order and its resume are
    described in the module docstring.

    Args:
        shards: from :func:`open_shards`.
        transform: the training transform (a ``util.data.decode.DecodeTransform`` gets the bytes).
        batch_size: per process.
        rank, world_size: this process's place in the job.
        seed: the run's seed (order and augmentation).
        num_workers: loader workers (each reads its own stream of shards); the order depends on it.
        pin_mem: pin batches in page-locked memory.
        shuffle_buffer: samples each stream holds to shuffle (raw bytes).
        finish: applied to each batch's images in this process (``--decode nvjpeg``).
        return_ids: batches are ``(images, labels, ids)`` (ids: positions in the index), for tests and tools.
        labels: whether the job needs labels; False (pre-training): never parsed as required, a sample
            without one gets ``NO_LABEL``.
    """

    def __init__(self, shards: ShardSet, transform, batch_size: int, rank: int, world_size: int, seed: int,
                 num_workers: int, pin_mem: bool, shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
                 finish: Optional[Callable[[List[Any]], Any]] = None, return_ids: bool = False,
                 labels: bool = True) -> None:
        self.shards, self.transform, self.labels = shards, transform, labels
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.num_workers, self.pin_mem = num_workers, pin_mem
        self.streams = max(1, num_workers)
        self.shuffle_buffer, self.finish, self.return_ids = shuffle_buffer, finish, return_ids
        self.num_samples = shards.num_samples
        self.steps_per_epoch = (self.num_samples // world_size) // batch_size
        if self.steps_per_epoch == 0:
            raise UserError(f"The training shards hold {self.num_samples} images, fewer than one batch of {batch_size} "
                            f"x {world_size} process(es). Lower --batch_size.")

    # -- the plan: pure functions of (seed, epoch, rank, streams) and the counts --------------
    def owned_steps(self, epoch: int, stream: int) -> List[int]:
        """Steps (within ``epoch``) whose batch comes from ``stream``: global step ``g`` -> stream ``g % streams``."""
        return [j for j in range(self.steps_per_epoch) if (epoch * self.steps_per_epoch + j) % self.streams == stream]

    def stream_ids(self, epoch: int, stream: int) -> Tuple[np.ndarray, np.ndarray]:
        """``(reading order, emitting order)`` of the ids ``stream`` of this rank reads in ``epoch``."""
        counts, starts = np.asarray(self.shards.counts), self.shards.starts
        perm = np.random.default_rng(derive_seed(self.seed, epoch, _ORDER)).permutation(len(counts))
        per_rank = self.steps_per_epoch * self.batch_size
        lengths = [len(self.owned_steps(epoch, w)) * self.batch_size for w in range(self.streams)]
        first = self.rank * per_rank + sum(lengths[:stream])
        # the epoch's ids in shard order, only as far as this stream needs them
        ends = np.cumsum(counts[perm])
        last = int(np.searchsorted(ends, first + lengths[stream], side="left")) + 1
        epoch_ids = np.concatenate([starts[s] + np.arange(counts[s]) for s in perm[:last]])
        read = epoch_ids[first:first + lengths[stream]]
        rng = np.random.default_rng(derive_seed(self.seed, epoch, _ORDER, self.rank, stream))
        return read, shuffle_order(read, self.shuffle_buffer, rng)

    # -- reading -------------------------------------------------------------------------------
    def _stream_batches(self, epoch: int, stream: int, skip: int) -> Iterator:
        read, order = self.stream_ids(epoch, stream)
        order = order[skip * self.batch_size:]
        samples = _emit(self.shards, read, order)
        for _ in range(len(order) // self.batch_size):
            items = []
            for _ in range(self.batch_size):
                i, sample = next(samples)
                seed_host(derive_seed(self.seed, epoch, i))  # as SeededDataset does for folders
                img, label = decode_sample(sample, self.shards.spec, self.transform, self.labels)
                items.append((img, label, i) if self.return_ids else (img, label))
            yield collate(items)

    def _worker_batches(self, start_step: int, worker: int) -> Iterator:
        """Worker ``worker``'s batches: global steps ``start_step + worker + k * streams``, k = 0, 1, ..."""
        stream = (start_step + worker) % self.streams
        epoch = start_step // self.steps_per_epoch
        while True:
            done = sum(1 for j in self.owned_steps(epoch, stream) if epoch * self.steps_per_epoch + j < start_step)
            yield from self._stream_batches(epoch, stream, done)
            epoch += 1

    def batches(self, start_step: int = 0) -> Iterator:
        """Every batch from global step ``start_step`` on, epoch after epoch, without end."""
        loader = _loader(_Stream(partial(self._worker_batches, start_step)), self.num_workers, self.pin_mem)
        for batch in loader:
            yield finish_images(batch, self.finish)


class ShardEvalData:
    """Evaluation batches over shards: every sample exactly once across ranks, no padding, index order.

    Rank ``r`` reads ids ``[r N / W, (r + 1) N / W)`` (contiguous: each rank reads only its shards),
    split the same way over its loader workers; each worker's last batch may be short.
    ``len()`` is this rank's number of batches; ``count`` its number of samples.
    """

    def __init__(self, shards: ShardSet, transform, batch_size: int, rank: int, world_size: int, num_workers: int,
                 pin_mem: bool, return_ids: bool = False) -> None:
        self.shards, self.transform, self.batch_size = shards, transform, batch_size
        self.num_workers, self.pin_mem, self.return_ids = num_workers, pin_mem, return_ids
        n = shards.num_samples
        self.lo, self.hi = rank * n // world_size, (rank + 1) * n // world_size
        self.num_samples, self.count = n, self.hi - self.lo
        self.streams = max(1, num_workers)

    def _range(self, worker: int) -> np.ndarray:
        n = self.hi - self.lo
        return np.arange(self.lo + worker * n // self.streams, self.lo + (worker + 1) * n // self.streams)

    def __len__(self) -> int:
        return sum(-(-len(self._range(w)) // self.batch_size) for w in range(self.streams))

    def _worker_batches(self, worker: int) -> Iterator:
        ids = self._range(worker)
        items = []
        for i, sample in read_samples(self.shards, ids):
            img, label = decode_sample(sample, self.shards.spec, self.transform)
            items.append((img, label, i) if self.return_ids else (img, label))
            if len(items) == self.batch_size:
                yield collate(items)
                items = []
        if items:
            yield collate(items)

    def __iter__(self) -> Iterator:
        return iter(_loader(_Stream(self._worker_batches), self.num_workers, self.pin_mem))
