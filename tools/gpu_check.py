"""The Python half of ``tools/gpu_check.sh`` (tools/GPU_CHECK.md): install what is missing, fetch the
wheels that travel to an offline GPU machine, record the environment, and write ``summary.json``.

    python tools/gpu_check.py wheels .whl                  # here, with PyPI: the wheels the device lacks
    python tools/gpu_check.py install --wheels .whl --target /tmp/site   # there: only what is missing
    python tools/gpu_check.py env                          # versions, the GPU
    python tools/gpu_check.py summary --out OUT --work WORK

Only the standard library and ``packaging`` at import time: ``install`` runs before the requirements
are there (torch is imported by ``env`` and ``summary`` only).
"""
import argparse
import importlib.metadata
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from packaging.requirements import Requirement
from packaging.tags import sys_tags
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]

# the torch build must match the machine's CUDA driver: it is never installed from here
NEVER_INSTALL = {"torch", "torchvision"}
# what a GPU node's image with its own torch typically lacks: open_clip and its two small dependencies;
# timm travels too, installed only where the node's is older than requirements.txt
DEVICE_WHEELS = ("open_clip_torch", "ftfy", "wcwidth", "timm")
# manylinux tags pip matches one by one (pip download for another machine's platform)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")

# gpu_check.sh names its benchmark rows; these two carry the targets (tools/GPU_CHECK.md)
REFERENCE_ROW, DEFAULT_ROW, COMPILE_ROW = "reference", "default", "compile"
TARGET_SPEEDUP, TARGET_MFU = 1.5, 0.40


# --------------------------------------------------------------------------------------------
# install


@dataclass(frozen=True)
class Wheel:
    path: Path
    name: str  # canonical
    version: Version


def read_requirements(paths: Iterable[Path], extra: Sequence[str] = ()) -> List[Requirement]:
    """The requirements of pip-style files (comments, blank and ``-r`` lines skipped) plus ``extra``."""
    lines = [ln.split("#", 1)[0].strip() for p in paths for ln in Path(p).read_text().splitlines()]
    return [Requirement(s) for s in [*lines, *extra] if s and not s.startswith("-")]


def installed_version(name: str) -> Optional[Version]:
    try:
        return Version(importlib.metadata.version(name))
    except importlib.metadata.PackageNotFoundError:
        return None


def satisfied(req: Requirement) -> bool:
    """Installed (anywhere on sys.path, PYTHONPATH targets included) in a version the requirement allows."""
    version = installed_version(req.name)
    return version is not None and req.specifier.contains(version, prereleases=True)


def find_wheels(folder: Optional[Path]) -> Dict[str, List[Wheel]]:
    """The wheels in ``folder`` this interpreter can install, by canonical name, newest first."""
    out: Dict[str, List[Wheel]] = {}
    if not folder or not Path(folder).is_dir():
        return out
    supported = set(sys_tags())
    for path in sorted(Path(folder).glob("*.whl")):
        name, version, _, tags = parse_wheel_filename(path.name)
        if tags & supported:
            out.setdefault(name, []).append(Wheel(path, name, version))
    for ws in out.values():
        ws.sort(key=lambda w: w.version, reverse=True)
    return out


def wheel_requirements(path: Path) -> List[Requirement]:
    """A wheel's ``Requires-Dist`` entries that apply here (no extras)."""
    with zipfile.ZipFile(path) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        text = zf.read(meta).decode("utf-8")
    reqs = [Requirement(ln.split(":", 1)[1].strip()) for ln in text.splitlines() if ln.startswith("Requires-Dist:")]
    return [r for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})]


def plan_install(reqs: Iterable[Requirement], wheels: Dict[str, List[Wheel]]) -> Tuple[List[Wheel], List[str]]:
    """The wheels to install for the unmet requirements (and, from their metadata, their unmet
    dependencies), one version per package; and the unmet requirements no wheel serves."""
    chosen: Dict[str, Wheel] = {}
    missing: List[str] = []
    queue = list(reqs)
    while queue:
        req = queue.pop(0)
        name = canonicalize_name(req.name)
        if name in chosen or satisfied(req):
            continue
        fits = [w for w in wheels.get(name, []) if req.specifier.contains(w.version, prereleases=True)]
        if name in NEVER_INSTALL or not fits:
            missing.append(str(req))
            continue
        chosen[name] = fits[0]
        queue.extend(wheel_requirements(fits[0].path))
    return list(chosen.values()), missing


def cmd_install(args: argparse.Namespace) -> int:
    reqs = read_requirements(args.requirements, args.also)
    wheels = find_wheels(args.wheels)
    plan, missing = plan_install(reqs, wheels)
    if plan:
        print("installing from", args.wheels, "into", args.target, ":", " ".join(w.path.name for w in plan))
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", str(args.target), *map(str, (w.path for w in plan))],
                       check=True)
    torch_missing = [m for m in missing if canonicalize_name(Requirement(m).name) in NEVER_INSTALL]
    if torch_missing:
        print(f"error: {', '.join(torch_missing)} missing: install the torch build for this machine's CUDA first "
              f"(https://pytorch.org/get-started/locally/)", file=sys.stderr)
        return 2
    if missing and wheels:  # an offline machine: the index cannot help, say what to bring
        print(f"error: {', '.join(missing)} missing and not among the wheels in {args.wheels}: add them there "
              f"(python tools/gpu_check.py wheels {args.wheels}, on a machine with PyPI)", file=sys.stderr)
        return 2
    if missing:  # no wheels brought: a machine with an index
        print("installing from the package index:", " ".join(missing))
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--retries", "1", "--timeout", "15", *missing],
                       check=True)
    if not plan and not missing:
        print("requirements: all present")
    return 0


def cmd_wheels(args: argparse.Namespace) -> int:
    """Download the wheels in DEVICE_WHEELS at the versions installed here (the ones tested here)."""
    pins = []
    for name in DEVICE_WHEELS:
        version = installed_version(name)
        if version is None:
            print(f"error: {name} is not installed here, so its tested version is unknown: `make install` first",
                  file=sys.stderr)
            return 2
        pins.append(f"{name}=={version}")
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    Path(args.folder).mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", args.python_version, "--implementation", "cp", *platforms,
                    "-d", str(args.folder), *pins], check=True)
    print("wheels in", args.folder, ":", " ".join(sorted(p.name for p in Path(args.folder).glob("*.whl"))))
    return 0


# --------------------------------------------------------------------------------------------
# environment and summary


def environment() -> Dict[str, Any]:
    """Versions of what the check runs on, and the GPU (None fields on CPU)."""
    import torch

    info: Dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
                            "cudnn": torch.backends.cudnn.version(), "gpu": None}
    for name in ("triton", "timm", "open_clip_torch", "numpy", "pytest"):
        version = installed_version(name)
        info[name] = str(version) if version else None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                       "memory_gib": round(props.total_memory / 2**30, 1), "multiprocessors": props.multi_processor_count,
                       "bf16": torch.cuda.is_bf16_supported(), "count": torch.cuda.device_count()}
    return info


def cmd_env(args: argparse.Namespace) -> int:
    print(json.dumps(environment(), indent=2))
    return 0


def read_parts(path: Path) -> Dict[str, Dict[str, Any]]:
    """gpu_check.sh's part log: one ``name<TAB>rc<TAB>seconds<TAB>limit`` line per part (rc 124: timed out)."""
    parts: Dict[str, Dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            name, rc, seconds, limit = line.split("\t")
            parts[name] = {"rc": None if rc == "skipped" else int(rc), "seconds": int(seconds), "limit_s": int(limit),
                           "timed_out": rc in ("124", "137"), "skipped": rc == "skipped"}
    return parts


def read_junit(path: Path) -> Optional[Dict[str, Any]]:
    """Counts, and the names of the tests that did not pass (with the first line of why)."""
    if not path.is_file():
        return None
    root = ET.parse(path).getroot()
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    problems: List[Dict[str, str]] = []
    skip_reasons: Dict[str, int] = {}
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
        if outcome is None:
            counts["passed"] += 1
            continue
        kind = {"failure": "failed", "error": "errors", "skipped": "skipped"}[outcome.tag]
        counts[kind] += 1
        message = (outcome.get("message") or outcome.text or "").strip().splitlines()
        if kind == "skipped":
            reason = message[0] if message else ""
            skip_reasons[reason] = skip_reasons.get(reason, 0) + 1
        else:
            problems.append({"test": name, "outcome": kind, "message": message[0][:300] if message else ""})
    return {**counts, "not_passed": problems, "skip_reasons": skip_reasons}


def bench_row(info: Dict[str, Any]) -> Dict[str, Any]:
    """The numbers of one benchmark JSON (one setting per file) that the summary keeps."""
    r = info["results"][0]
    keep = ("images_per_s", "step_ms", "step_ms_spread", "sections_ms", "gflops_per_image", "achieved_tflops", "mfu",
            "peak_memory_gb", "batch_size", "steps_timed")
    return {"args": " ".join(info["base_args"]), "mode": info["mode"], **{k: r.get(k) for k in keep}}


def targets(rows: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """The issue's targets, for the default and the compiled pre-training rows (None: a row is missing)."""
    ref = rows.get(REFERENCE_ROW, {}).get("images_per_s")
    out: Dict[str, Any] = {"speedup_target": TARGET_SPEEDUP, "mfu_target": TARGET_MFU}
    for name in (DEFAULT_ROW, COMPILE_ROW):
        row = rows.get(name)
        if row is None:
            out[name] = None
            continue
        speedup = row["images_per_s"] / ref if ref else None
        mfu = row.get("mfu")
        out[name] = {"speedup_vs_reference": speedup, "mfu": mfu,
                     "speedup_met": None if speedup is None else speedup >= TARGET_SPEEDUP,
                     "mfu_met": None if mfu is None else mfu >= TARGET_MFU}
    return out


def summarize(out: Path, work: Path, dry_run: bool) -> Dict[str, Any]:
    """Collect the parts' exit codes, the test outcomes and the benchmark rows into one dict;
    write the rows' full benchmark JSON to ``out/bench.json`` and the dict to ``out/summary.json``."""
    parts = read_parts(work / "parts.tsv")
    # the rows in the order they ran
    files = [work / f"{name}.json" for name in parts if name.startswith("bench_")]
    full = {p.stem[len("bench_"):]: json.loads(p.read_text()) for p in files if p.is_file()}
    rows = {name: bench_row(info) for name, info in full.items()}
    tests = read_junit(out / "junit.xml")
    ok = all(p["rc"] == 0 for p in parts.values()) and (tests is None or not (tests["failed"] or tests["errors"]))
    try:
        env = environment()
    except Exception as e:  # a setup that failed (no torch): the summary still says so
        env = {"error": repr(e)}
    summary = {"ok": ok, "dry_run": dry_run, "env": env, "parts": parts, "tests": tests, "bench": rows,
               "targets": None if dry_run else targets(rows)}
    (out / "bench.json").write_text(json.dumps(full, indent=2) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def print_summary(summary: Dict[str, Any]) -> None:
    """A short table, printed last (where only the end of the output is kept, it is what is read)."""
    fmt = lambda v, spec, unit="": "-" if v is None else format(v, spec) + unit  # noqa: E731
    for name, p in summary["parts"].items():
        state = "skipped (no time left)" if p["skipped"] else ("TIMED OUT" if p["timed_out"] else f"rc {p['rc']}")
        print(f"{name:18s} {state:22s} {p['seconds']:4d}s of {p['limit_s']}s")
    t = summary["tests"]
    if t:
        print(f"tests: {t['passed']} passed, {t['failed']} failed, {t['errors']} errors, {t['skipped']} skipped")
        for prob in t["not_passed"]:
            print(f"  {prob['outcome']}: {prob['test']}: {prob['message']}")
    ref = summary["bench"].get(REFERENCE_ROW, {}).get("images_per_s")
    if summary["bench"]:
        print(f"{'row':10s} {'img/s':>9s} {'vs ref':>7s} {'ms/step':>8s} {'TFLOP/s':>8s} {'MFU':>6s} {'mem GB':>7s}  sections ms")
    for name, r in summary["bench"].items():
        sections = " ".join(f"{k} {v:.1f}" for k, v in r["sections_ms"].items())
        ratio = r["images_per_s"] / ref if ref and r["mode"] == "pretrain" else None
        print(f"{name:10s} {r['images_per_s']:9.1f} {fmt(ratio, '6.2f', 'x'):>7s} {r['step_ms']:8.1f} "
              f"{fmt(r['achieved_tflops'], '8.1f'):>8s} {fmt(r['mfu'] and 100 * r['mfu'], '5.1f', '%'):>6s} "
              f"{fmt(r['peak_memory_gb'], '7.2f'):>7s}  {sections}")
    for name, t in (summary["targets"] or {}).items():
        if isinstance(t, dict):
            print(f"target, {name} row: {fmt(t['speedup_vs_reference'], '.2f', 'x')} the reference's img/s "
                  f"(>= {TARGET_SPEEDUP}x: {t['speedup_met']}), MFU {fmt(t['mfu'], '.3f')} (>= {TARGET_MFU}: {t['mfu_met']})")
    print("ok" if summary["ok"] else "NOT OK: see env.txt, tests.log, bench.log")


def cmd_summary(args: argparse.Namespace) -> int:
    summary = summarize(Path(args.out), Path(args.work), args.dry_run)
    print_summary(summary)
    return 0 if summary["ok"] else 1


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("DeepMIM GPU check helpers (tools/gpu_check.sh)")
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("install", help="install the unmet requirements (from --wheels when given)")
    i.add_argument("--requirements", nargs="+", type=Path, default=[ROOT / "requirements.txt"])
    i.add_argument("--also", nargs="*", default=["pytest>=7.4"], help="further requirements (the test runner)")
    i.add_argument("--wheels", type=Path, default=None, help="a folder of wheels (an offline machine)")
    i.add_argument("--target", type=Path, default=None, help="install the wheels here (a PYTHONPATH entry)")
    i.set_defaults(fn=cmd_install)
    w = sub.add_parser("wheels", help="download the wheels the GPU machine lacks, at the versions installed here")
    w.add_argument("folder", type=Path)
    w.add_argument("--python_version", default="3.12", help="the GPU machine's Python")
    w.set_defaults(fn=cmd_wheels)
    sub.add_parser("env", help="print versions and the GPU as JSON").set_defaults(fn=cmd_env)
    s = sub.add_parser("summary", help="write OUT/summary.json and OUT/bench.json, print the table")
    s.add_argument("--out", required=True)
    s.add_argument("--work", required=True, help="gpu_check.sh's scratch folder (parts.tsv, bench_*.json)")
    s.add_argument("--dry_run", action="store_true")
    s.set_defaults(fn=cmd_summary)
    return p


if __name__ == "__main__":
    parsed = get_args_parser().parse_args()
    if parsed.command == "install" and parsed.wheels and not parsed.target:
        raise SystemExit("error: install --wheels needs --target (a folder on PYTHONPATH)")
    raise SystemExit(parsed.fn(parsed))
