"""The project is installed, not put on the import path by its own files: no tracked Python file edits
``sys.path`` (nor carries the E402 noqa such an edit needs), and a fresh interpreter started outside
the checkout imports every top-level module and package from this checkout (``make install`` installs
it editable: ``pip install -e . --no-deps``)."""
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


def test_a_fresh_interpreter_outside_the_checkout_imports_the_project(tmp_path):
    names = sorted(set(REQUIRED) | set(top_level_names()))
    assert {"main_pretrain", "models_deepmim", "util", "targets", "tools", "Segmentation", "Detection"} <= set(names)
    code = ("import importlib, json, sys\n"
            "print(json.dumps({n: importlib.import_module(n).__file__ for n in sys.argv[1:]}))\n")
    proc = subprocess.run([sys.executable, "-c", code, *names], cwd=tmp_path, env=clean_env(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, ("the project is not importable outside its checkout: `make install` "
                                  f"(or `pip install -e . --no-deps`) installs it\n{proc.stderr}")
    where = json.loads(proc.stdout.splitlines()[-1])
    elsewhere = {n: f for n, f in where.items() if not Path(f).resolve().is_relative_to(ROOT)}
    assert not elsewhere, f"imported from another copy of the project, not from {ROOT}: {elsewhere}"
