"""What a reproduction needs to know about a run: the code (git commit, dirty tree and a hash of its
diff), the versions of the stack, the hardware, the launch (world size, hosts, the command line) and the
environment variables that change numerics or speed. Written into ``config.json`` and printed once at
start as a short block."""
import hashlib
import importlib.metadata
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

# the checkout this code runs from (util/run/provenance.py -> the repository root)
ROOT = Path(__file__).resolve().parents[2]
# (pillow, simplejpeg and torchcodec decode the images: their versions can move pixels)
PACKAGES = ("torch", "torchvision", "timm", "open_clip_torch", "numpy", "pillow", "simplejpeg", "torchcodec")
# variables that change what the numbers are, or how fast they come
ENV_NAMES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUBLAS_WORKSPACE_CONFIG", "CUDA_VISIBLE_DEVICES",
             "PYTORCH_CUDA_ALLOC_CONF", "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "NVIDIA_TF32_OVERRIDE")
ENV_PREFIXES = ("NCCL_",)


def git_state(root: Path = ROOT) -> Dict[str, Any]:
    """``{"commit", "dirty", "diff_sha256"}`` of the checkout; ``{"commit": None}`` outside a git checkout
    (an installed copy, an unpacked archive) or without git."""
    def git(*args: str) -> Optional[str]:
        try:
            proc = subprocess.run(["git", *args], cwd=root, capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return proc.stdout.decode("utf-8", "replace") if proc.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None}
    diff = git("diff", "HEAD", "--binary") or ""
    untracked = git("ls-files", "--others", "--exclude-standard") or ""
    dirty = bool(diff.strip() or untracked.strip())
    digest = hashlib.sha256((diff + untracked).encode()).hexdigest()[:16] if dirty else None
    return {"commit": commit.strip(), "dirty": dirty, "diff_sha256": digest}


def versions() -> Dict[str, Optional[str]]:
    """Python, the packages (from their metadata: nothing is imported), CUDA, cuDNN and NCCL as torch sees them."""
    out: Dict[str, Optional[str]] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    out["cuda"] = torch.version.cuda
    out["cudnn"] = str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else None
    try:
        nccl = torch.cuda.nccl.version() if torch.cuda.is_available() else None
        out["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else (None if nccl is None else str(nccl))
    except (AttributeError, RuntimeError):
        out["nccl"] = None
    return out


def numerics_env(environ: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """The environment variables of :data:`ENV_NAMES` / :data:`ENV_PREFIXES` that are set, and torch's
    TF32 and matmul-precision settings."""
    env = os.environ if environ is None else environ
    out: Dict[str, Any] = {k: env[k] for k in sorted(env) if k in ENV_NAMES or k.startswith(ENV_PREFIXES)}
    out["torch_tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    out["torch_tf32_cudnn"] = torch.backends.cudnn.allow_tf32
    out["torch_float32_matmul_precision"] = torch.get_float32_matmul_precision()
    out["torch_threads"] = torch.get_num_threads()
    return out


def hardware(device: torch.device) -> Dict[str, Any]:
    """This node's accelerator: the GPU model and count when the run is on CUDA, else the CPU."""
    if device.type == "cuda":
        return {"gpu": torch.cuda.get_device_name(device), "gpus_per_node": torch.cuda.device_count()}
    return {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}


def collect(device: torch.device, world_size: int, hosts: Sequence[str], argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """The provenance record of a run (plain types, for ``config.json``).

    Args:
        device: this process's device.
        world_size: the number of processes.
        hosts: the host name of every rank, in rank order.
        argv: the command line (default: ``sys.argv``).
    """
    argv = sys.argv if argv is None else argv
    return {"git": git_state(), "versions": versions(), "hardware": hardware(device), "world_size": world_size,
            "hosts": sorted(set(hosts)), "command": shlex.join([Path(sys.executable).name, *argv]),
            "environment": numerics_env()}


def summary(p: Dict[str, Any]) -> str:
    """The short block printed at start."""
    g, v = p["git"], p["versions"]
    code = "not a git checkout" if g.get("commit") is None else (
        g["commit"][:12] + (f" + uncommitted changes (diff {g['diff_sha256']})" if g["dirty"] else ""))
    hw = p["hardware"]
    where = (f"{hw['gpu']} x {hw['gpus_per_node']} per node" if "gpu" in hw else f"CPU ({hw['cpu']}, {hw['cpu_count']} cores)")
    stack = ", ".join(f"{k} {v[k]}" for k in ("python", "torch", "torchvision", "timm", "open_clip_torch", "cuda",
                                                  "cudnn", "nccl") if v.get(k))
    env = ", ".join(f"{k}={val}" for k, val in p["environment"].items())
    return "\n".join([f"code: {code}", f"stack: {stack}",
                      f"hardware: {where}; {p['world_size']} process(es) on {len(p['hosts'])} host(s): "
                      f"{', '.join(p['hosts'][:4])}{' ...' if len(p['hosts']) > 4 else ''}",
                      f"command: {p['command']}", f"numerics: {env}"])
