"""Shared helpers for the DeepMIM training scripts (one concept per module).

Importing this package blocks ``import wandb`` until :func:`import_wandb` lifts the block: timm
imports wandb whenever it is installed (``timm.utils.summary``, reached from ``import timm``), and
wandb creates two temporary folders at import that only a clean interpreter exit removes, so every
killed or preempted run would leave them in the system temp directory (and pay about half a second
of import). Every project module imports ``util`` before any third-party package (ruff's isort
section ``project-setup`` in pyproject.toml keeps that order), so W&B is imported only for ``--wandb``.
"""
import importlib
import sys
from types import ModuleType

if "wandb" not in sys.modules:
    sys.modules["wandb"] = None  # type: ignore[assignment]  # `import wandb` raises ImportError


def import_wandb() -> ModuleType:
    """Lift the block above and import wandb (ImportError when it is not installed)."""
    if sys.modules.get("wandb", False) is None:
        del sys.modules["wandb"]
    return importlib.import_module("wandb")
