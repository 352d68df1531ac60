"""The small reproducible study (``make experiments``): plain MAE against DeepMIM on the built-in digits.

    python tools/run_experiments.py --output_dir experiments --work_dir output_dir/experiments

For each seed (0, 1, 2) and each config, ``mae`` (``--ds_layers 12``) and ``deepmim``
(``--ds_layers 6,8,10,12``), with the same epochs:

1. pre-training with the demo's recipe (``tools/demo.py``: ``deepmim_vit_tiny_patch4`` at 16 px,
   normalized-pixel target), ``--epochs`` epochs, ``--seed`` = the seed;
2. fine-tuning with the demo's recipe for ``--ft_epochs`` epochs, same seed;
3. ``tools/probe_layers.py`` (logistic regression on every layer's cls / avg features) and
   ``tools/attention_analysis.py`` (256 validation images) on the pre-trained encoder.

The same probes and attention measures also run on the untrained encoders (the initialisation of
each seed), the floor any pre-training has to beat. The stages call the scripts' own ``main()`` (as
``tools/demo.py`` does) in ``--jobs`` worker processes of one thread each (default: one per core,
at most 2); results do not depend on the number of threads. Stages already complete in
``--work_dir`` are skipped, so an interrupted study continues where it stopped.

``--output_dir`` receives what is committed: ``results.json`` (every run's numbers, the means and
sample standard deviations over seeds, the wall times), ``RESULTS.md`` (the tables) and the plots
``pretrain_loss.png``, ``finetune_acc.png``, ``probe_layers.png``, ``attention.png``,
``reconstruction_{mae,deepmim}.png``. Checkpoints stay in ``--work_dir``.
"""
import argparse
import contextlib
import json
import logging
import multiprocessing as mp
import os
import resource
import shutil
import time
from concurrent.futures import Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from util.checkpoints.files import check_writable, save_json, write_text
from util.config.cli import Parser, positive_int, seed_int
from util.data.datasets import resolve_data_path
from util.run.errors import run_cli
from util.run.logs import fmt_seconds

import numpy as np

from tools.demo import FINETUNE, PRETRAIN

CONFIGS = {"mae": "12", "deepmim": "6,8,10,12"}
SHOTS = 10  # the low-shot probe: 10 training images per class
LABELS = {"init": "random init", "mae": "MAE (L12)", "deepmim": "DeepMIM (6/8/10/12)"}
COLORS = {"init": "0.6", "mae": "C0", "deepmim": "C3"}


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser("tools/run_experiments.py", "MAE vs DeepMIM on the built-in digits")
    p.add_argument("--output_dir", default="experiments", help="results, tables and plots (committed)")
    p.add_argument("--work_dir", default="output_dir/experiments", help="checkpoints and logs of every run")
    p.add_argument("--seeds", nargs="+", type=seed_int, default=[0, 1, 2], help="one run of each config per seed")
    p.add_argument("--epochs", type=positive_int, default=20, metavar="N", help="pre-training epochs (both configs)")
    p.add_argument("--ft_epochs", type=positive_int, default=6, metavar="N", help="fine-tuning epochs")
    p.add_argument("--jobs", type=positive_int, default=min(2, os.cpu_count() or 1), metavar="N",
                   help="processes at once")
    p.add_argument("--num_images", type=positive_int, default=256, metavar="N",
                   help="validation images for the attention analysis")
    return p


# --------------------------------------------------------------------------------------------
# the stages: each runs in a worker process and calls the scripts' own main(), as tools/demo.py does
# (one interpreter start-up per worker instead of one per stage: importing torch + timm costs seconds)


def flag(args: Sequence[str], name: str, value: str) -> List[str]:
    """``args`` with ``name`` set to ``value`` (replaced where present, else appended)."""
    out = list(args)
    if name in out:
        out[out.index(name) + 1] = value
        return out
    return out + [name, value]


def log_lines(path: Path) -> List[Dict[str, Any]]:
    """The epoch lines of a log.txt (a rollback's line, if any, left out)."""
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
    return [r for r in lines if "rollback" not in r]


def run_dir(work: Path, config: str, seed: int) -> Path:
    return work / f"{config}_seed{seed}"


def pretrain_and_finetune(work: Path, config: str, seed: int, epochs: int, ft_epochs: int) -> None:
    """One run: pre-training, then fine-tuning of its encoder; a stage complete on disk is skipped."""
    import main_finetune
    import main_pretrain

    out = run_dir(work, config, seed)
    ckpt = out / "pretrain" / "checkpoint-last.pth"
    if not (ckpt.exists() and len(log_lines(out / "pretrain" / "log.txt")) == epochs):
        shutil.rmtree(out / "pretrain", ignore_errors=True)  # an incomplete run starts over (the recipe does not resume)
        argv = flag(flag(flag(PRETRAIN, "--epochs", str(epochs)), "--save_every", str(epochs)), "--num_workers", "0")
        main_pretrain.main(main_pretrain.get_args_parser().parse_args(
            [*argv, "--ds_layers", CONFIGS[config], "--seed", str(seed), "--output_dir", str(out / "pretrain")]))
        for f in (out / "pretrain").glob("checkpoint-*.pth"):  # keep the last one only: 85 MB each
            if f.name != ckpt.name:
                f.unlink()
    if len(log_lines(out / "finetune" / "log.txt")) != ft_epochs:
        shutil.rmtree(out / "finetune", ignore_errors=True)
        argv = flag(flag(FINETUNE, "--epochs", str(ft_epochs)), "--num_workers", "0")
        main_finetune.main(main_finetune.get_args_parser().parse_args(
            [*argv, "--seed", str(seed), "--finetune", str(ckpt), "--output_dir", str(out / "finetune")]))
        for f in (out / "finetune").glob("checkpoint-*.pth"):  # only log.txt is read
            f.unlink()


def initial_encoders(work: Path, seeds: Sequence[int]) -> List[Path]:
    """The untrained encoder of every seed (what pre-training starts from), saved as checkpoints."""
    from util.run.seed import seed_everything

    import torch

    import models_deepmim

    paths = []
    for seed in seeds:
        path = work / "init" / f"seed{seed}.pth"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            seed_everything(seed)  # as main_pretrain does before building the model
            model = models_deepmim.create_model("deepmim_vit_tiny_patch4", img_size=16, ds_layers=[12])
            torch.save({"model": model.state_dict(), "model_cfg": model.cfg.to_dict(), "epoch": -1}, path)
        paths.append(path)
    return paths


def finished(done: Optional[Path]) -> bool:
    """Whether a tool's output file is there and complete (``probe_layers.json`` is written as the
    probes go, with ``complete`` false until the last one; the tool then continues where it stopped)."""
    if done is None or not done.exists():
        return False
    try:
        return bool(json.loads(done.read_text()).get("complete", True))
    except ValueError:
        return False


def tool(module_name: str, argv: Sequence[str], done: Optional[Path]) -> None:
    """Run ``tools/<module_name>.py`` with ``argv`` unless its output ``done`` is complete."""
    import importlib

    if not finished(done):
        module = importlib.import_module(f"tools.{module_name}")
        module.main(module.get_args_parser().parse_args([str(a) for a in argv]))


def logged(name: str, log: Path, fn, *args) -> Dict[str, float]:
    """Run ``fn(*args)`` with its output in ``log``; return its wall and CPU seconds."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.time(), time.process_time()
    try:
        with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            fn(*args)
    finally:
        logging.getLogger().handlers.clear()  # they write to the closed log; the next stage sets up its own
    return {"wall": round(time.time() - t0, 1), "cpu": round(time.process_time() - c0, 1)}


def worker_init() -> None:
    import torch

    torch.set_num_threads(1)  # one core per job: N single-thread jobs beat one N-thread job, and stay deterministic


class Study:
    """Schedules the stages on ``--jobs`` worker processes and reports each one's wall time (and a
    progress bar over the stages: done / all, elapsed, ETA)."""

    def __init__(self, args: argparse.Namespace) -> None:
        from tools.common import progress

        self.args = args
        self.work = Path(args.work_dir)
        self.timings: Dict[str, Dict[str, float]] = {}
        self.pool = ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=mp.get_context("spawn"),
                                        initializer=worker_init)
        # every run (pre-training + fine-tuning), one probe per seed, the attention analysis, one figure per config
        stages = len(CONFIGS) * len(args.seeds) + len(args.seeds) + 1 + len(CONFIGS)
        self.bar = progress(total=stages, desc="study", unit="stage")

    def submit(self, name: str, log: Path, fn, *args) -> Future:
        print(f"[{time.strftime('%H:%M:%S')}] queued {name} (log: {log})", flush=True)
        future = self.pool.submit(logged, name, log, fn, *args)

        def report(f: Future) -> None:
            self.bar.update()
            if f.exception() is None:
                self.timings[name] = f.result()
                print(f"[{time.strftime('%H:%M:%S')}] done   {name} in {f.result()['wall']:.0f} s "
                      f"({f.result()['cpu']:.0f} s CPU)", flush=True)
            else:
                print(f"[{time.strftime('%H:%M:%S')}] FAILED {name}: {f.exception()} (see {log})", flush=True)

        future.add_done_callback(report)
        return future

    def run(self) -> None:
        a, work = self.args, self.work
        runs = [(config, seed) for config in ("deepmim", "mae") for seed in a.seeds]  # longest first
        init = initial_encoders(work, a.seeds)
        wait([self.submit(f"pretrain + finetune {c} seed {s}", run_dir(work, c, s) / "run.log", pretrain_and_finetune,
                          work, c, s, a.epochs, a.ft_epochs) for c, s in runs])
        ckpts = {f"{c}_seed{s}": run_dir(work, c, s) / "pretrain" / "checkpoint-last.pth" for c, s in runs}
        ckpts.update({f"init_seed{s}": p for s, p in zip(a.seeds, init)})
        data = ["--data_path", "digits"]
        jobs = []
        # the probes are the longest analysis: one task per seed, so that every worker stays busy
        for seed in a.seeds:
            names = [f"{c}_seed{seed}" for c in ("init", *CONFIGS)]
            out = work / "analysis" / f"probe_seed{seed}"
            jobs.append(self.submit(f"probe seed {seed}", out / "probe.log", tool, "probe_layers",
                                    [*[ckpts[n] for n in names], "--names", *names, *data, "--train_per_class", 0,
                                     SHOTS, "--output_dir", out], out / "probe_layers.json"))
        out = work / "analysis" / "attention"
        jobs.append(self.submit("attention", out / "attention.log", tool, "attention_analysis",
                                [*ckpts.values(), "--names", *ckpts, *data, "--num_images", a.num_images,
                                 "--output_dir", out], out / "attention.json"))
        for config in CONFIGS:
            png = Path(a.output_dir) / f"reconstruction_{config}.png"
            jobs.append(self.submit(f"visualize {config}", work / "analysis" / f"visualize_{config}.log", tool,
                                    "visualize", [ckpts[f"{config}_seed{a.seeds[0]}"], "--num_images", 5, "--out", png],
                                    None))  # always redrawn: cheap
        wait(jobs)
        self.pool.shutdown()
        self.bar.close()
        for f in jobs:
            f.result()  # re-raise a failure


# --------------------------------------------------------------------------------------------
# collecting, tables and plots


def mean_std(values: Sequence[float]) -> Dict[str, Any]:
    """Mean and sample standard deviation (ddof 1; 0 for one value) of the values over seeds."""
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "values": v.tolist()}


def collect(work: Path, seeds: Sequence[int]) -> Dict[str, Any]:
    """Every run's numbers (from the files the scripts wrote) and their statistics over seeds."""
    probes: Dict[str, Any] = {}
    for path in sorted((work / "analysis").glob("probe_*/probe_layers.json")):
        probes.update(json.loads(path.read_text())["results"])
    attention = json.loads((work / "analysis" / "attention" / "attention.json").read_text())["results"]
    runs: Dict[str, Dict[str, Any]] = {}
    for config in ["init", *CONFIGS]:
        per_seed = []
        for seed in seeds:
            name = f"{config}_seed{seed}"
            run = {"probe": probes[name], "distance": [e["mean_distance"] for e in attention[name]],
                   "diversity": [e["diversity"] for e in attention[name]]}
            if config != "init":
                base = run_dir(work, config, seed)
                run.update(loss_L12=[e["train_loss_L12"] for e in log_lines(base / "pretrain" / "log.txt")],
                           ft_acc=[e["test_acc1"] for e in log_lines(base / "finetune" / "log.txt")])
            per_seed.append(run)
        stats = {key: [mean_std(col) for col in zip(*[r[key] for r in per_seed])]
                 for key in ("distance", "diversity", "loss_L12", "ft_acc") if key in per_seed[0]}
        stats["probe"] = {key: [mean_std(col) for col in zip(*[r["probe"][key] for r in per_seed])]
                          for key in per_seed[0]["probe"]}
        if "ft_acc" in per_seed[0]:
            stats["ft_final"] = mean_std([r["ft_acc"][-1] for r in per_seed])
            stats["ft_best"] = mean_std([max(r["ft_acc"]) for r in per_seed])
        runs[config] = {"seeds": list(seeds), "runs": per_seed, "stats": stats}
    return runs


def pm(s: Dict[str, Any], digits: int = 1) -> str:
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def diff(a: Dict[str, Any], b: Dict[str, Any], n: int, digits: int = 1) -> str:
    """Difference of means ± its standard error, sqrt(sd_a^2 / n + sd_b^2 / n)."""
    se = (a["std"] ** 2 / n + b["std"] ** 2 / n) ** 0.5
    return f"{a['mean'] - b['mean']:+.{digits}f} ± {se:.{digits}f}"


def probe_title(key: str) -> str:
    """``avg_10shot`` -> 'average-pooled patch tokens, 10 training images per class'."""
    pool, _, shots = key.partition("_")
    what = "average-pooled patch tokens" if pool == "avg" else "cls token"
    return f"{what}, {shots[:-4]} training images per class" if shots else f"{what}, all training images"


def tables(res: Dict[str, Any], meta: Dict[str, Any]) -> str:
    """The Markdown tables of RESULTS.md."""
    n = len(meta["seeds"])
    init, mae, dm = (res[k]["stats"] for k in ("init", "mae", "deepmim"))
    lines = [
        "# Results: MAE vs DeepMIM on the built-in digits",
        "",
        f"Generated by `tools/run_experiments.py` ({meta['epochs']} pre-training epochs, {meta['ft_epochs']} "
        f"fine-tuning epochs, seeds {', '.join(map(str, meta['seeds']))}; wall time {meta['wall_time']} on "
        f"{meta['cpus']} CPU cores with {meta['jobs']} jobs at once, {meta['cpu_seconds']:.0f} CPU seconds, i.e. "
        f"about {meta['idle_machine_estimate']} on an idle machine). Every cell: mean ± sample standard deviation "
        f"over the {n} seeds; Δ = DeepMIM − MAE, ± the standard error of that difference, "
        f"sqrt(sd_DeepMIM²/{n} + sd_MAE²/{n}).",
        "",
        "## Fine-tuning (val top-1 %, 359 images)",
        "",
        "| | MAE | DeepMIM | Δ |",
        "| --- | --- | --- | --- |",
        f"| last epoch | {pm(mae['ft_final'])} | {pm(dm['ft_final'])} | {diff(dm['ft_final'], mae['ft_final'], n)} |",
        f"| best epoch | {pm(mae['ft_best'])} | {pm(dm['ft_best'])} | {diff(dm['ft_best'], mae['ft_best'], n)} |",
        "",
        "Per seed (last epoch): MAE " + ", ".join(f"{v:.1f}" for v in mae["ft_final"]["values"])
        + "; DeepMIM " + ", ".join(f"{v:.1f}" for v in dm["ft_final"]["values"]) + ".",
        "",
    ]
    for key in mae["probe"]:
        lines += [f"## Linear probe of every layer ({probe_title(key)}; val top-1 %)", "",
                  "| layer | random init | MAE | DeepMIM | Δ |", "| --- | --- | --- | --- | --- |"]
        for i, (a, b, c) in enumerate(zip(init["probe"][key], mae["probe"][key], dm["probe"][key])):
            lines.append(f"| {i + 1} | {pm(a)} | {pm(b)} | {pm(c)} | {diff(c, b, n)} |")
        lines.append("")
    epochs = len(mae["loss_L12"])
    shown = sorted({0, 1, 2, 4, epochs // 2 - 1, epochs - 1} & set(range(epochs)))
    lines += ["## Pre-training loss of the last layer (L12, normalized-pixel MSE on masked patches; epoch mean)", "",
              "| epoch | MAE | DeepMIM | Δ |", "| --- | --- | --- | --- |"]
    for e in shown:
        lines.append(f"| {e + 1} | {pm(mae['loss_L12'][e], 4)} | {pm(dm['loss_L12'][e], 4)} | "
                     f"{diff(dm['loss_L12'][e], mae['loss_L12'][e], n, 4)} |")
    lines += ["", "## Attention of the pre-trained encoders (256 val images)", "",
              "Mean attention distance (px, mean over heads) and diversity (mean pairwise JS divergence between "
              "heads, bits); definitions in `tools/attention_analysis.py`.", "",
              "| layer | distance init | distance MAE | distance DeepMIM | diversity init | diversity MAE | diversity DeepMIM |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for i in range(len(mae["distance"])):
        lines.append(f"| {i + 1} | {pm(init['distance'][i], 2)} | {pm(mae['distance'][i], 2)} | "
                     f"{pm(dm['distance'][i], 2)} | {pm(init['diversity'][i], 3)} | {pm(mae['diversity'][i], 3)} | "
                     f"{pm(dm['diversity'][i], 3)} |")
    lines.append("")
    return "\n".join(lines)


def band(ax, xs, stats, key: str, **kw) -> None:
    """A mean curve with a ±1 std band."""
    mean = np.array([s["mean"] for s in stats])
    std = np.array([s["std"] for s in stats])
    ax.plot(xs, mean, color=COLORS[key], label=LABELS[key], **kw)
    ax.fill_between(xs, mean - std, mean + std, color=COLORS[key], alpha=0.2, lw=0)


def plots(res: Dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(fig, name: str) -> None:
        for ax in fig.axes:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / name, dpi=90)
        plt.close(fig)

    curves = [("loss_L12", "pre-training epoch", "loss of layer 12 (epoch mean)", "pre-training loss, last layer",
               "pretrain_loss.png"),
              ("ft_acc", "fine-tuning epoch", "val top-1 (%)", "fine-tuning", "finetune_acc.png")]
    for stat, xlabel, ylabel, title, name in curves:
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for key in CONFIGS:
            s = res[key]["stats"][stat]
            band(ax, range(1, len(s) + 1), s, key, marker="o", ms=2)
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
        save(fig, name)

    keys = sorted(res["mae"]["stats"]["probe"], key=lambda k: ("shot" in k, k))  # full probes on the top row
    cols = 2
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    for ax, probe in zip(axes.flat, keys):
        for key in ["init", *CONFIGS]:
            s = res[key]["stats"]["probe"][probe]
            band(ax, range(1, len(s) + 1), s, key, marker="o", ms=2)
        ax.set(xlabel="encoder layer", ylabel="linear-probe val top-1 (%)")
        ax.set_title(probe_title(probe), fontsize=9)
    save(fig, "probe_layers.png")

    fig, (ax_d, ax_v) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key in ["init", *CONFIGS]:
        s = res[key]["stats"]
        band(ax_d, range(1, len(s["distance"]) + 1), s["distance"], key, marker="o", ms=2)
        band(ax_v, range(1, len(s["diversity"]) + 1), s["diversity"], key, marker="o", ms=2)
    ax_d.set(xlabel="encoder layer", ylabel="mean attention distance (px)", title="attention distance")
    ax_v.set(xlabel="encoder layer", ylabel="mean pairwise JS divergence (bits)", title="attention diversity")
    save(fig, "attention.png")


# --------------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> Dict[str, Any]:
    t0 = time.time()
    load_start = os.getloadavg()
    out = check_writable(args.output_dir)
    check_writable(args.work_dir, "--work_dir")
    resolve_data_path("digits")  # write the built-in data once, before the processes start
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the workers before they import torch
    study = Study(args)
    study.run()
    wall = time.time() - t0
    # CPU seconds of everything (driver, workers with their start-up, all stages): on an otherwise idle
    # machine the study takes about cpu / jobs; on a shared one the wall time is longer
    cpu = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for f in ("ru_utime", "ru_stime"))
    meta = {"epochs": args.epochs, "ft_epochs": args.ft_epochs, "seeds": args.seeds, "jobs": args.jobs,
            "cpus": os.cpu_count(), "wall_time": fmt_seconds(wall), "wall_seconds": round(wall, 1),
            "cpu_seconds": round(cpu, 1), "idle_machine_estimate": fmt_seconds(cpu / max(1, args.jobs)),
            "load_average_start": [round(x, 2) for x in load_start],
            "load_average_end": [round(x, 2) for x in os.getloadavg()],
            "stage_seconds": dict(sorted(study.timings.items())),
            "pretrain_recipe": PRETRAIN, "finetune_recipe": FINETUNE}
    res = collect(Path(args.work_dir), args.seeds)
    save_json({"meta": meta, "results": res}, out / "results.json")
    write_text(out / "RESULTS.md", tables(res, meta))
    plots(res, out)
    print(f"study done in {fmt_seconds(wall)} ({cpu:.0f} CPU seconds: about {meta['idle_machine_estimate']} on an idle "
          f"machine with {args.jobs} cores); results in {out}")
    return res


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args())
