"""Benchmark the training input pipeline: images/s per worker and in total, per data source and decoder.

    python tools/benchmark_data.py                           # 1000 JPEGs, workers 0 (main process) and 1
    python tools/benchmark_data.py --workers 1 4 8 --images 4000 --json data.json
    python tools/benchmark_data.py --mode finetune           # timm's fine-tuning transform (RandAugment ...)

It first writes its own JPEG folder (``--work_dir``, a temporary one by default) at ImageNet's size
distribution, then the same files as tar shards, and measures the real loaders
(``util.data.datasets.FolderData``, ``util.data.shards.ShardData``: seeded samplers, DataLoader workers,
collation) on them, for each row and each ``--workers`` value, alternating rows over ``--rounds``
rounds (the median is reported, so a busy machine slows every row alike):

* ``folder / pil``: the reference pipeline, MAE's: PIL open + convert + RandomResizedCrop(scale
  0.2-1, bicubic) + flip + ToTensor + Normalize on an ImageFolder. The baseline (speed-up 1.00);
* ``folder / auto``: the fast decode path (``util.decode``) on the same folder;
* ``shards / pil`` and ``shards / auto``: the same two on tar shards of the same JPEGs.

The JPEGs: the two photographs scikit-learn ships (``sklearn.datasets.load_sample_images``:
``china.jpg`` and ``flower.jpg``, 640 x 427), cut into random crops (a quarter to all of the photo,
random aspect) and resized to ImageNet-like sizes: three in four have a long side of 500 pixels and
an aspect of 4:3 or 3:2 (most ImageNet photos are 500 x 375 or 500 x 333), the rest a long side of
250 to 800 pixels; a quarter are portrait; encoded by PIL (libjpeg-turbo) at ``--quality`` 90
with 4:2:0 chroma subsampling. Their mean size and file size are printed (ImageNet's train set:
about 400 x 350 on average, 110 KB).

Every worker runs one thread (the DataLoader sets one torch thread in workers; run the tool with
``OMP_NUM_THREADS=1``). Two rates are reported: images/s on the wall clock (the total), and images
per CPU second of all the pipeline's processes (the main process and its workers, from ``/proc``),
which is images/s per core and holds on a busy machine; with ``--workers 0`` the main process does
the work.
The pixel differences of the fast path to the reference (same random draws) are measured on the
JPEGs too, and the share of crops decoded at reduced size.
"""
import argparse
import io
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

from util.checkpoints.files import save_json
from util.data.datasets import IMAGENET_STD, FolderData, finetune_transform, image_folder, pretrain_transform, with_decode
from util.data.decode import mean_abs_diff, read_encoded, stats_summary
from util.data.shards import ShardData, open_shards, write_shards
from util.run.errors import run_cli
from util.run.seed import derive_seed, seed_everything

import numpy as np
import torch
from PIL import Image


def make_jpegs(root: Path, n: int, quality: int, seed: int = 0) -> Dict[str, float]:
    """Write ``n`` JPEGs at ImageNet-like sizes to ``root/train/<class>/`` (10 classes); return their stats."""
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    rng = np.random.default_rng(seed)
    sizes, nbytes = [], []
    for k in range(n):
        if rng.random() < 0.75:
            long, aspect = 500, float(rng.choice([4 / 3, 3 / 2]))
        else:
            long, aspect = int(rng.integers(250, 801)), float(np.exp(rng.uniform(np.log(1.0), np.log(2.0))))
        w, h = long, max(16, int(round(long / aspect)))
        if rng.random() < 0.25:
            w, h = h, w
        photo = photos[k % len(photos)]
        pw, ph = photo.size
        # a random crop of the photo with the target's aspect, a quarter to all of its area
        area = rng.uniform(0.25, 1.0) * pw * ph
        cw = int(min(pw, round(np.sqrt(area * w / h))))
        ch = int(min(ph, round(cw * h / w)))
        x0, y0 = int(rng.integers(0, pw - cw + 1)), int(rng.integers(0, ph - ch + 1))
        img = photo.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.BICUBIC)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        folder = root / "train" / f"c{k % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality)
        (folder / f"{k:06d}.jpg").write_bytes(buf.getvalue())
        sizes.append((w, h))
        nbytes.append(len(buf.getvalue()))
    s = np.asarray(sizes)
    return {"images": n, "mean_width": float(s[:, 0].mean()), "mean_height": float(s[:, 1].mean()),
            "mean_kb": float(np.mean(nbytes) / 1e3), "quality": quality}


def make_transform(mode: str, size: int, decode: str):
    if mode == "pretrain":
        return pretrain_transform(size, decode)
    args = argparse.Namespace(input_size=size, crop_scale=(0.08, 1.0), hflip=0.5, color_jitter=None,
                              aa="rand-m9-mstd0.5-inc1", reprob=0.25, remode="pixel", recount=1)
    return with_decode(finetune_transform(args), decode)


def build(source: str, root: Path, shard_dir: Path, transform, batch: int, workers: int):
    if source == "folder":
        return FolderData(image_folder(root / "train", transform, "training"), batch, 0, 1, 0, workers, False)
    return ShardData(open_shards(str(shard_dir), "train"), transform, batch, 0, 1, 0, workers, False)


def cpu_seconds() -> float:
    """CPU time of this process and of its live child processes (the loader workers).

    The children's times come from ``/proc`` (Linux); elsewhere only this process counts.
    """
    total = time.process_time()
    me, tick = os.getpid(), os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for pid in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) ": state, ppid, ..., utime, stime
        if int(fields[1]) == me:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def measure(data, warmup: int, steps: int, batch: int) -> Dict[str, float]:
    """Images/s (wall clock) and images per CPU second (all processes of the pipeline) over ``steps``
    batches after ``warmup`` (workers started, queues and buffers full)."""
    it = data.batches(0)
    try:
        for _ in range(warmup):
            next(it)
        t, c = time.perf_counter(), cpu_seconds()
        for _ in range(steps):
            next(it)
        wall, cpu = time.perf_counter() - t, cpu_seconds() - c
        return {"images_s": steps * batch / wall, "images_cpu_s": steps * batch / max(cpu, 1e-9)}
    finally:
        it.close()  # shuts the workers down


def pixel_check(root: Path, size: int, n: int) -> Dict[str, Any]:
    """Fast vs reference on the same draws: mean |difference| per image (grey levels), and the paths taken."""
    ref = pretrain_transform(size, "pil")
    fast = pretrain_transform(size, "auto")
    files = sorted((root / "train").rglob("*.jpg"))[:n]
    diffs = {"exact": [], "reduced": []}
    for k, f in enumerate(files):
        enc = read_encoded(str(f))
        seed_everything(derive_seed(0, k))
        r = ref(Image.open(f).convert("RGB"))
        before = dict(fast.stats)
        seed_everything(derive_seed(0, k))
        x = fast(enc)
        reduced = fast.stats.get("fast/1", 0) == before.get("fast/1", 0)
        diffs["reduced" if reduced else "exact"].append(mean_abs_diff(r, x, IMAGENET_STD))
    out = {"paths": dict(fast.stats), "paths_text": stats_summary(fast.stats)}
    for k, v in diffs.items():
        if v:
            a = np.asarray(v)
            out[k] = {"crops": len(v), "mean": float(a[:, 0].mean()), "worst_image_mean": float(a[:, 0].max()),
                      "worst_pixel": float(a[:, 1].max())}
    return out


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="deepmim-bench-data-"))
    root, shard_dir = work / "jpegs", work / "shards"
    t0 = time.time()
    if not (root / "train").is_dir():
        print(f"writing {args.images} JPEGs to {root} ...", flush=True)
        stats = make_jpegs(root, args.images, args.quality)
        save_json(stats, work / "jpegs.json", indent=None, sort_keys=False)
    stats = json.loads((work / "jpegs.json").read_text())
    print(f"JPEGs: {stats['images']}, mean {stats['mean_width']:.0f} x {stats['mean_height']:.0f} px, "
          f"{stats['mean_kb']:.0f} KB, quality {stats['quality']} ({time.time() - t0:.0f} s)", flush=True)
    if not (shard_dir / "train.json").is_file():
        print(f"writing shards to {shard_dir} ...", flush=True)
        spec, _ = write_shards(root, shard_dir, "train", args.shard_size)
        print(f"shards: {spec}", flush=True)

    rows = [(src, dec) for src in args.sources for dec in args.decoders]
    results: Dict[str, List[Dict[str, float]]] = {}
    for r in range(args.rounds):
        for workers in args.workers:
            for src, dec in rows:
                tf = make_transform(args.mode, args.input_size, dec)
                data = build(src, root, shard_dir, tf, args.batch_size, workers)
                rate = measure(data, args.warmup, args.steps, args.batch_size)
                results.setdefault(f"{src}|{dec}|{workers}", []).append(rate)
                print(f"round {r + 1}/{args.rounds} workers {workers} {src:6s} {dec:4s}: {rate['images_s']:7.1f} images/s, "
                      f"{rate['images_cpu_s']:7.1f} images per CPU second", flush=True)

    check = None
    if args.mode == "pretrain":
        print("checking the fast path's pixels against the reference ...", flush=True)
        check = pixel_check(root, args.input_size, args.check_images)

    def median(key: str, what: str) -> float:
        return statistics.median(r[what] for r in results[key])

    table = []
    for workers in args.workers:
        ref = f"folder|pil|{workers}"
        for src, dec in rows:
            key = f"{src}|{dec}|{workers}"
            per_core = median(key, "images_cpu_s")
            table.append({"source": src, "decode": dec, "workers": workers, "images_s": median(key, "images_s"),
                          "images_cpu_s": per_core,
                          "speedup_per_core": per_core / median(ref, "images_cpu_s") if ref in results else None})
    print(f"\n{args.mode}, {args.input_size} px, batch {args.batch_size}, median of {args.rounds} rounds "
          f"(per core: images per CPU second of all the pipeline's processes):")
    print("| source | decode | workers | images/s | images/s per core | per core vs reference |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for t in table:
        sp = f"{t['speedup_per_core']:.2f}x" if t["speedup_per_core"] else "-"
        print(f"| {t['source']} | {t['decode']} | {t['workers']} | {t['images_s']:.0f} | {t['images_cpu_s']:.0f} | {sp} |")
    if check:
        print(f"\nfast path on {args.check_images} crops: {check['paths_text']}")
        for k in ("exact", "reduced"):
            if k in check:
                c = check[k]
                print(f"  {k}: {c['crops']} crops, mean |diff| {c['mean']:.3f} grey levels (worst image "
                      f"{c['worst_image_mean']:.2f}, worst pixel {c['worst_pixel']:.0f})")
    if args.json:
        save_json({"mode": args.mode, "input_size": args.input_size, "jpegs": stats, "batch_size": args.batch_size,
                   "rounds": args.rounds, "rows": table, "raw": results, "pixel_check": check},
                  Path(args.json), indent=1, sort_keys=False)
        print(f"written to {args.json}")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("Input pipeline benchmark", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("pretrain", "finetune"), default="pretrain")
    p.add_argument("--input_size", type=int, default=224)
    p.add_argument("--images", type=int, default=1000, help="JPEGs to write")
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--shard_size", type=int, default=250)
    p.add_argument("--work_dir", help="keep the JPEGs and shards here (reused when present)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1], help="DataLoader workers to measure")
    p.add_argument("--sources", nargs="+", choices=("folder", "shards"), default=["folder", "shards"])
    p.add_argument("--decoders", nargs="+", choices=("pil", "auto"), default=["pil", "auto"])
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--warmup", type=int, default=3, help="batches before timing (per measurement)")
    p.add_argument("--steps", type=int, default=10, help="batches timed (per measurement)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--check_images", type=int, default=200, help="crops compared with the reference")
    p.add_argument("--json", help="write the results here")
    return p


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
