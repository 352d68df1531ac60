"""The project is installed, not put on the import path by its own files: no tracked Python file edits
``sys.path`` (nor carries the E402 noqa such an edit needs), and a fresh interpreter started outside
the checkout imports every top-level module and package from this checkout (``make install`` installs
it editable: ``pip install -e . --no-deps``). Importing every script does not import W&B and writes
nothing to the temp directory."""
import json
import re
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, clean_env

# spelled so that this file does not match itself
PATH_EDIT = re.compile(r"\bsys\.path\.(insert|append|extend)\(|#\s*noqa:[^#\n]*\bE402\b")
# the ones a user types or a test starts, at least; every other top-level module and package is added
REQUIRED = ("main_pretrain", "util", "targets", "tools.demo", "Segmentation.train", "Detection.models")
# every script a user starts (and the monitor they all may load)
SCRIPTS = ("main_pretrain", "main_finetune", "main_linprobe", "engine_monitor", "Segmentation.train",
           "Segmentation.inference", "Segmentation.demo", "tools.demo", "tools.linear_eval", "tools.probe_layers",
           "tools.attention_analysis", "tools.visualize", "tools.convert_checkpoint", "tools.make_shards",
           "tools.benchmark", "tools.benchmark_data", "tools.run_experiments", "tools.compare_logs")


def tracked(pattern: str):
    out = subprocess.run(["git", "ls-files", pattern], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [p for p in out.splitlines() if (ROOT / p).is_file()]


def test_no_file_edits_sys_path():
    files = tracked("*.py")
    assert len(files) > 50, files  # git saw the checkout
    found = [f"{name}:{i}: {line.strip()}" for name in files
             for i, line in enumerate((ROOT / name).read_text(encoding="utf-8").splitlines(), 1) if PATH_EDIT.search(line)]
    assert not found, "import the installed project instead (make install):\n" + "\n".join(found)


def top_level_names():
    """Every tracked top-level module, and every top-level folder with a tracked ``__init__.py``."""
    files = tracked("*.py")
    modules = [Path(f).stem for f in files if "/" not in f]
    packages = [f.split("/")[0] for f in files if f.count("/") == 1 and f.endswith("/__init__.py")]
    return sorted(set(modules) | set(packages))


def test_a_fresh_interpreter_outside_the_checkout_imports_the_project_and_not_wandb(tmp_path):
    """timm imports wandb whenever it is installed, and wandb leaves two folders in the temp directory
    at import that only a clean exit removes: no script, run without --wandb, may import it
    (util/__init__.py blocks it), so that a killed run leaves nothing behind."""
    names = sorted(set(REQUIRED) | set(top_level_names()) | set(SCRIPTS))
    assert {"main_pretrain", "models_deepmim", "util", "targets", "tools", "Segmentation", "Detection"} <= set(names)
    temp = tmp_path / "temp"
    temp.mkdir()
    code = ("import importlib, json, sys, tempfile\n"
            "tempfile.tempdir = sys.argv[1]\n"
            "files = {n: importlib.import_module(n).__file__ for n in sys.argv[2:]}\n"
            "print(json.dumps({'files': files, 'wandb': sys.modules.get('wandb') is not None, 'timm': 'timm' in sys.modules}))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(temp), *names], cwd=tmp_path, env=clean_env(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, ("the project is not importable outside its checkout: `make install` "
                                  f"(or `pip install -e . --no-deps`) installs it\n{proc.stderr}")
    out = json.loads(proc.stdout.splitlines()[-1])
    elsewhere = {n: f for n, f in out["files"].items() if not Path(f).resolve().is_relative_to(ROOT)}
    assert not elsewhere, f"imported from another copy of the project, not from {ROOT}: {elsewhere}"
    assert out["timm"] and not out["wandb"]  # timm loaded, W&B not
    assert list(temp.iterdir()) == []  # and nothing in the temp directory it was given
