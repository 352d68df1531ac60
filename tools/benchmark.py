"""Benchmark training steps (pre-training, fine-tuning, detection): images/s, where the time goes, FLOPs,
MFU, memory.

Everything after ``--`` is a ``main_pretrain.py`` command line (with ``--mode finetune``, a
``main_finetune.py`` one; with ``--mode detect``, a ``Detection/train.py`` one), so every model, target,
``--ds_layers``, ``--input_size``, ``--amp``, ``--compile`` and ``--grad_checkpointing`` setting of the
real scripts can be measured as the scripts build it::

    python tools/benchmark.py --steps 20 -- --model deepmim_vit_base_patch16 --batch_size 64 --amp bf16
    # several settings in one process, alternating (ratios survive a noisy machine):
    python tools/benchmark.py --compare "--ds_layers 12" "" "--compile" -- --model deepmim_vit_tiny_patch4
    # ViTDet's Mask R-CNN on ViT-B at 1024, one image per step (the recipe's per-GPU batch)
    python tools/benchmark.py --mode detect --steps 4 --no_flops -- --batch_size 1 --amp bf16

Each step is split into data (host-to-device copy of a fixed batch, or the real loader with
``--real_data``), teacher forward, encoder, decoders (with the loss), backward and optimizer; on
GPUs the split is measured with CUDA events, on CPU with the wall clock. With ``--compile`` the
student runs as one compiled graph, so encoder and decoders are reported together as ``student``.
A detection step is one ``forward`` (backbone, RPN and RoI heads with their losses) on a fixed batch
of ``--img_size`` images, each with 8 boxes and their masks.
FLOPs per image come from ``torch.utils.flop_counter`` (teacher forward + student forward and
backward); on GPUs the achieved TFLOP/s is compared with the device's dense bf16 peak (MFU).
``--random_clip`` builds a random CLIP ViT-B/16 image tower (OpenAI's shapes) so that the CLIP
target can be timed without the weights.
"""
import argparse
import resource
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from util.checkpoints.files import save_json
from util.config.cli import Parser, nonneg_int, positive_float, positive_int, usage_error
from util.run.amp import autocast, make_scaler, resolve_amp
from util.run.dist import resolve_device
from util.run.errors import run_cli
from util.run.optim import adamw, layer_decay_groups, weight_decay_groups
from util.run.seed import seed_everything

import torch
from torch.utils.flop_counter import FlopCounterMode

import main_finetune
import main_pretrain
import models_deepmim
import models_vit
from Detection import models as det_models
from Detection import train as det_train
from targets.base import compute_targets

# dense bf16 tensor-core peak, TFLOP/s (vendor data sheets, SXM parts)
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10": 125.0, "4090": 165.2,
                    "V100": 125.0}


class Timer:
    """Marks section boundaries; CUDA events on GPUs (read once per step), perf_counter on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: List[tuple] = []

    def mark(self, name: str) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append((name, ev))
        else:
            self.marks.append((name, time.perf_counter()))

    def sections(self) -> Dict[str, float]:
        """Milliseconds per section since the previous mark (synchronizes on GPUs)."""
        if self.cuda:
            torch.cuda.synchronize()
        out = {}
        for (_, a), (name, b) in zip(self.marks, self.marks[1:]):
            out[name] = a.elapsed_time(b) if self.cuda else (b - a) * 1e3
        self.marks = []
        return out


class Bench:
    """One setting: its model, optimizer, batch and a step function returning section times."""

    def __init__(self, label: str, mode: str, argv: List[str], bench_args: argparse.Namespace) -> None:
        self.label = label
        parser = {"pretrain": main_pretrain, "finetune": main_finetune, "detect": det_train}[mode].get_args_parser()
        args = parser.parse_args(argv)
        self.device = resolve_device(args.device)
        self.amp = resolve_amp(args.amp, self.device)
        self.batch = args.batch_size
        seed_everything(0)
        self.targets = None
        if mode == "pretrain":
            if bench_args.random_clip and not args.clip_path:
                args.clip_path = random_clip_file(models_deepmim.model_config(args.model, img_size=args.input_size))
            pcfg = main_pretrain.PretrainConfig.from_args(args)
            pcfg.validate()
            cfg, self.targets, self.layer_targets = main_pretrain.build_model_and_targets(
                pcfg.model, pcfg.targets, self.device, self.amp, pcfg.train.compile)
            self.model = models_deepmim.DeepMIM(cfg).to(self.device)
            groups, betas, size = weight_decay_groups(self.model, 0.05), (0.9, 0.95), cfg.img_size
            self.mask_ratio = args.mask_ratio
        elif mode == "detect":
            if bench_args.real_data:
                usage_error("--real_data times the loaders of pre-training and fine-tuning; --mode detect uses a "
                            "fixed batch")
            dflags = det_train.DetectionConfig.from_args(args).det
            self.model = det_models.create_model(args.model, **dflags.model_overrides(80)).to(self.device)
            groups, betas, size = layer_decay_groups(self.model, 0.1, args.layer_decay), (0.9, 0.999), \
                self.model.cfg.img_size
            self.det_targets = [detection_target(size, seed=i) for i in range(self.batch)]
        else:
            name = args.model or main_finetune.DEFAULT_MODEL
            size = args.input_size or models_vit.native_size(name)
            self.model = models_vit.create_model(name, num_classes=1000, img_size=size,
                                                 drop_path_rate=args.drop_path).to(self.device)
            groups, betas = layer_decay_groups(self.model, 0.05, args.layer_decay), (0.9, 0.999)
            self.labels = torch.randint(0, 1000, (self.batch,), device=self.device)
        if args.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.optimizer = adamw(groups, 1e-4, betas=betas, device=self.device, fused=args.fused_adamw)
        self.scaler = make_scaler(self.device, self.amp)
        self.compiled = bool(args.compile)
        self.student = torch.compile(self.model) if self.compiled else self.model  # targets: compiled by the builder
        self.mode = mode
        pin = self.device.type == "cuda"
        self.host_batch = torch.randn(self.batch, 3, size, size).pin_memory() if pin else torch.randn(
            self.batch, 3, size, size)
        self.loader = real_loader(args, size, mode, self.device) if bench_args.real_data else None
        self.timer = Timer(self.device)
        self.times: List[Dict[str, float]] = []
        self.flops_per_image: Optional[float] = None

    # -- one step --------------------------------------------------------------------------
    def step(self, record: bool = True) -> None:
        t = self.timer
        t.mark("start")
        host = next(self.loader)[0] if self.loader is not None else self.host_batch
        imgs = host.to(self.device, non_blocking=True)
        if self.mode == "detect":
            targets = [{k: v.to(self.device, non_blocking=True) for k, v in tgt.items()} for tgt in self.det_targets]
        t.mark("data")
        with autocast(self.device, self.amp):
            if self.mode == "detect":
                loss = sum(self.student(list(imgs.clamp(0, 1)), targets).values())
                t.mark("forward")
            elif self.mode == "pretrain":
                tgt = compute_targets(self.targets, imgs)
                t.mark("teacher")
                per_layer = [tgt[n] for n in self.layer_targets]
                if self.compiled:
                    loss = self.student(imgs, per_layer, mask_ratio=self.mask_ratio).loss
                    t.mark("student")
                else:
                    feats, mask, ids = self.model.forward_encoder(imgs, self.mask_ratio)
                    t.mark("encoder")
                    loss, _ = self.model.forward_loss(self.model.forward_decoders(feats, ids), per_layer, mask)
                    t.mark("decoders")
            else:
                loss = torch.nn.functional.cross_entropy(self.student(imgs), self.labels)
                t.mark("forward")
        self.scaler.scale(loss).backward()
        t.mark("backward")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        t.mark("optimizer")
        sections = t.sections()
        if record:
            self.times.append(sections)

    def count_flops(self) -> None:
        """FLOPs of one step (teacher forward + student forward and backward) per image.

        Counted on the eager modules (the same FLOPs): the counter's module hooks would make the
        compiled graphs recompile."""
        saved = self.compiled, self.student, self.targets
        self.compiled, self.student = False, self.model
        if self.targets is not None:
            self.targets = {n: getattr(t, "_orig_mod", t) for n, t in self.targets.items()}
        counter = FlopCounterMode(display=False)
        try:
            with counter:
                self.step(record=False)
        finally:
            self.compiled, self.student, self.targets = saved
        self.flops_per_image = counter.get_total_flops() / self.batch

    # -- results ---------------------------------------------------------------------------
    def summary(self, peak_tflops: Optional[float]) -> Dict[str, Any]:
        names = list(self.times[0])
        med = {n: statistics.median(t[n] for t in self.times) for n in names}
        totals = [sum(t.values()) for t in self.times]
        step_ms = statistics.median(totals)
        ips = self.batch / (step_ms / 1e3)
        out: Dict[str, Any] = {"setting": self.label, "images_per_s": ips, "step_ms": step_ms,
                               "step_ms_spread": [min(totals), max(totals)], "sections_ms": med,
                               "batch_size": self.batch, "steps_timed": len(self.times),
                               "gflops_per_image": self.flops_per_image / 1e9 if self.flops_per_image else None}
        if self.device.type == "cuda":
            out["peak_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            if self.flops_per_image:
                out["achieved_tflops"] = self.flops_per_image * ips / 1e12
                out["mfu"] = out["achieved_tflops"] / peak_tflops if peak_tflops else None
        return out


def detection_target(size: int, seed: int, n: int = 8) -> Dict[str, torch.Tensor]:
    """``n`` boxes (16 to size / 2 pixels a side) with box-shaped masks in a ``size`` square image."""
    g = torch.Generator().manual_seed(seed)
    wh = torch.randint(16, max(17, size // 2), (n, 2), generator=g)
    xy = (torch.rand(n, 2, generator=g) * (size - wh)).floor()
    boxes = torch.cat([xy, xy + wh], dim=1).float()
    masks = torch.zeros(n, size, size, dtype=torch.uint8)
    for m, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist()):
        m[y0:y1, x0:x1] = 1
    return {"boxes": boxes, "labels": torch.randint(1, 81, (n,), generator=g), "masks": masks}


def random_clip_file(cfg) -> str:
    """A random CLIP ViT-B/16-shaped image tower for the student's grid, saved as OpenAI-style keys."""
    from targets.clip import make_visual

    visual = make_visual(image_size=cfg.img_size, patch_size=cfg.patch_size, width=768, layers=12,
                         mlp_ratio=4.0, output_dim=512)
    path = Path(tempfile.mkdtemp(prefix="bench-clip-")) / "random_clip_vit_b16.pt"
    torch.save({f"visual.{k}": v for k, v in visual.state_dict().items()}, path)
    return str(path)


def real_loader(args: argparse.Namespace, size: int, mode: str, device: torch.device):
    """The training data the scripts read (``--data_path``, folder or shards, ``--decode``), without end."""
    from util.data.build import build_train_data
    from util.data.datasets import AugConfig, finetune_transform, pretrain_transform, with_decode

    tf = pretrain_transform(size, args.decode) if mode == "pretrain" else with_decode(
        finetune_transform(size, AugConfig.from_flags(args)), args.decode)
    return build_train_data(args.data_path, tf, args.batch_size, 0, 1, 0, args.num_workers, args.pin_mem,
                            args.shuffle_buffer, device).batches(0)


def peak_for(device: torch.device, override: Optional[float]) -> Optional[float]:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def print_table(results: List[Dict[str, Any]]) -> None:
    sections = list(results[0]["sections_ms"])
    head = ["setting", "img/s", "ms/step"] + [f"{s} ms" for s in sections] + ["GFLOP/img", "TFLOP/s", "MFU", "mem GB",
                                                                             "ratio"]
    rows = []
    base = results[0]["images_per_s"]
    for r in results:
        fmt = lambda v, p=1: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
        ips = r["images_per_s"]
        rows.append([r["setting"] or "(base)", fmt(ips, 1 if ips >= 10 else 3), fmt(r["step_ms"])]
                    + [fmt(r["sections_ms"].get(s)) for s in sections]
                    + [fmt(r["gflops_per_image"]), fmt(r.get("achieved_tflops")),
                       "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%", fmt(r.get("peak_memory_gb"), 2),
                       f"{r['images_per_s'] / base:.2f}x"])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    for line in [head] + rows:
        print("  ".join(str(x).rjust(w) for x, w in zip(line, widths)))


def say(msg: str) -> None:
    """One progress line on stdout, at once (a ViT-B setting takes minutes on a CPU)."""
    print(f"benchmark: {msg}", flush=True)


def main(bench_args: argparse.Namespace, base_argv: List[str]) -> List[Dict[str, Any]]:
    settings = bench_args.compare or [""]
    benches = []
    for s in settings:
        say(f"building {s or '(base)'}")
        benches.append(Bench(s, bench_args.mode, base_argv + shlex.split(s), bench_args))
    for b in benches:  # warm-up (and compilation), then FLOPs of one step
        t0 = time.perf_counter()
        for _ in range(bench_args.warmup):
            b.step(record=False)
        if not bench_args.no_flops:
            b.count_flops()
        say(f"{b.label or '(base)'}: {bench_args.warmup} warm-up step(s){'' if bench_args.no_flops else ' and the FLOP count'} "
            f"in {time.perf_counter() - t0:.1f} s")
    if benches[0].device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    per_round = max(1, bench_args.steps // bench_args.rounds)
    for r in range(bench_args.rounds):  # alternate settings so that drifts hit all of them alike
        for b in benches:
            for _ in range(per_round):
                b.step()
            ms = statistics.median(sum(t.values()) for t in b.times)
            say(f"round {r + 1}/{bench_args.rounds}, {b.label or '(base)'}: {len(b.times)} step(s) timed, median "
                f"{ms:.1f} ms/step ({b.batch / (ms / 1e3):.3g} img/s)")
    device = benches[0].device
    results = [b.summary(peak_for(device, bench_args.peak_tflops)) for b in benches]
    print_table(results)
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "mode": bench_args.mode,
            "base_args": base_argv, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "results": results}
    print(f"device: {info['device']}; torch {info['torch']}; {info['threads']} threads; "
          f"process peak RSS {info['peak_rss_gb']:.2f} GB")
    if bench_args.json:
        save_json(info, Path(bench_args.json), sort_keys=False)
    return results


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser("tools/benchmark.py", "DeepMIM training-step benchmark",
               epilog="Arguments after -- go to main_pretrain / main_finetune / Detection/train.py.")
    p.add_argument("--mode", choices=["pretrain", "finetune", "detect"], default="pretrain",
                   help="which script's step to time")
    p.add_argument("--steps", type=positive_int, default=20, metavar="N", help="timed steps per setting")
    p.add_argument("--warmup", type=nonneg_int, default=3, metavar="N",
                   help="untimed steps per setting first (compilation happens here)")
    p.add_argument("--rounds", type=positive_int, default=4, metavar="N", help="alternation rounds over the settings")
    p.add_argument("--compare", nargs="+", default=None, metavar="FLAGS",
                   help='settings to compare, each a string of script flags added to the base ("" = base; '
                        'default: the base alone)')
    p.add_argument("--random_clip", action="store_true", help="time the CLIP target with a random ViT-B/16 tower")
    p.add_argument("--real_data", action="store_true", help="load batches with the real loader from --data_path")
    p.add_argument("--no_flops", action="store_true", help="skip the FLOP count")
    p.add_argument("--peak_tflops", type=positive_float, default=None,
                   help="device peak for MFU (default: known GPUs' bf16)")
    p.add_argument("--json", default=None, help="write the results here (default: print only)")
    return p


def split_argv(argv: List[str], own_flags: List[str]):
    """(the benchmark's own arguments, the settings of ``--compare``, the script's arguments after ``--``).

    The settings are taken by hand, every argument after ``--compare`` up to the next of the
    benchmark's own flags or ``--``: argparse would read a setting such as ``"--compile"`` as an
    option of the benchmark."""
    rest: List[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1:]
    compare = None
    if "--compare" in argv:
        i = argv.index("--compare")
        j = i + 1
        while j < len(argv) and argv[j] not in own_flags:
            j += 1
        compare = argv[i + 1:j]
        if not compare:
            usage_error('--compare needs at least one setting (a string of flags, "" for the base)')
        argv = argv[:i] + argv[j:]
    return argv, compare, rest


def parse_cli(argv: List[str]):
    """The benchmark's arguments and the script's command line (after ``--``)."""
    parser = get_args_parser()
    own_flags = [s for a in parser._actions for s in a.option_strings]
    own, compare, rest = split_argv(argv, own_flags)
    parsed = parser.parse_args(own)
    if compare is not None:
        parsed.compare = compare
    return parsed, rest


if __name__ == "__main__":
    parsed, rest = parse_cli(sys.argv[1:])
    run_cli(lambda a: main(a, rest), parsed)
