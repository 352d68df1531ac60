"""Distributed initialisation for every launcher our users have, in one function.

:func:`init_distributed` works out which launcher started the process:

* ``torchrun`` / ``python -m torch.distributed.run``: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR``, ``MASTER_PORT``;
* ``python -m torch.distributed.launch`` on old and new PyTorch: the same variables, plus the local
  rank as ``--local_rank N`` or ``--local-rank=N`` (both spellings are accepted by the scripts) when
  ``--use-env`` is not given;
* SLURM ``srun``: ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``; the master is the first
  host of ``SLURM_JOB_NODELIST``, the port comes from ``--dist_port`` or ``MASTER_PORT``;
* OpenMPI (``--dist_on_itp``): ``OMPI_COMM_WORLD_RANK`` / ``_SIZE`` / ``_LOCAL_RANK``;
* a plain single process (none of the above).

A half-set environment (``RANK`` without ``WORLD_SIZE``, say) is refused with a message naming the
missing variables instead of hanging in a rendezvous. NCCL on CUDA, gloo on CPU.
"""
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional

from util.run.errors import UserError

import torch
import torch.distributed as dist

_log = logging.getLogger(__name__)
DEFAULT_PORT = 29500
_CONTROL: Optional["dist.ProcessGroup"] = None  # gloo group for control messages (None: the default group)


@dataclass
class DistInfo:
    """Where this process stands in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "single"
    master_addr: Optional[str] = None
    master_port: Optional[int] = None
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list, as ``scontrol show hostnames`` would list it.

    ``"gpu[003-004,9],cpu1"`` -> ``"gpu003"``; ``"rack[1-2]-node[05-08]"`` -> ``"rack1-node05"``.
    Commas inside brackets separate ranges, not hosts.
    """
    s = nodelist.strip()
    depth, end = 0, len(s)
    for i, c in enumerate(s):
        depth += (c == "[") - (c == "]")
        if c == "," and depth == 0:
            end = i
            break
    host = re.sub(r"\[([^\[\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0], s[:end])
    if not host or "[" in host or "]" in host:
        raise UserError(f"Cannot parse SLURM_JOB_NODELIST={nodelist!r}; set MASTER_ADDR explicitly.")
    return host


def _ints(env: Mapping[str, str], names: List[str]) -> Dict[str, int]:
    out = {}
    for n in names:
        try:
            out[n] = int(env[n])
        except ValueError:
            raise UserError(f"Environment variable {n}={env[n]!r} is not an integer.") from None
    return out


def detect(
    env: Mapping[str, str],
    local_rank_flag: int = -1,
    dist_on_itp: bool = False,
    dist_port: Optional[int] = None,
) -> DistInfo:
    """Work out rank, world size and rendezvous address from the environment (no side effects)."""
    if dist_on_itp:
        need = ["OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"]
        missing = [n for n in need if n not in env]
        if missing:
            raise UserError(f"--dist_on_itp needs the OpenMPI variables {', '.join(missing)}; launch with mpirun.")
        v = _ints(env, need)
        return DistInfo(
            v["OMPI_COMM_WORLD_RANK"], v["OMPI_COMM_WORLD_SIZE"], v["OMPI_COMM_WORLD_LOCAL_RANK"], "openmpi",
            env.get("MASTER_ADDR"),
            dist_port or (_ints(env, ["MASTER_PORT"])["MASTER_PORT"] if "MASTER_PORT" in env else DEFAULT_PORT),
        )

    torch_vars = ["RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"]
    present = [n for n in torch_vars if n in env]
    # RANK / WORLD_SIZE mark a torchrun-style launch; MASTER_ADDR / MASTER_PORT alone do not (a SLURM
    # batch script exports them for srun tasks)
    if "RANK" in env or "WORLD_SIZE" in env:
        missing = [n for n in torch_vars if n not in env]
        if "LOCAL_RANK" not in env and local_rank_flag < 0:
            missing.append("LOCAL_RANK (or --local_rank)")
        if missing:
            raise UserError(
                f"Half-set distributed environment: {', '.join(present)} set but {', '.join(missing)} "
                f"missing. Launch with torchrun (which sets all of them), or unset "
                f"{', '.join(present)} for a single-process run."
            )
        v = _ints(env, ["RANK", "WORLD_SIZE", "MASTER_PORT"])
        local = int(env["LOCAL_RANK"]) if "LOCAL_RANK" in env else local_rank_flag
        if not 0 <= v["RANK"] < v["WORLD_SIZE"]:
            raise UserError(f"RANK={v['RANK']} is outside 0..WORLD_SIZE-1 (WORLD_SIZE={v['WORLD_SIZE']}).")
        return DistInfo(v["RANK"], v["WORLD_SIZE"], local, "torchrun", env["MASTER_ADDR"], v["MASTER_PORT"])

    if "SLURM_PROCID" in env or "SLURM_NTASKS" in env:
        need = ["SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_NODELIST"]
        missing = [n for n in need if n not in env]
        if missing:
            raise UserError(
                f"Half-set SLURM environment: {', '.join(missing)} missing. Start the job with srun "
                f"inside an allocation (sbatch / salloc)."
            )
        v = _ints(env, ["SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"])
        if v["SLURM_NTASKS"] > 1:
            addr = env.get("MASTER_ADDR") or first_slurm_host(env["SLURM_JOB_NODELIST"])
            port = dist_port or (_ints(env, ["MASTER_PORT"])["MASTER_PORT"] if "MASTER_PORT" in env else DEFAULT_PORT)
            return DistInfo(v["SLURM_PROCID"], v["SLURM_NTASKS"], v["SLURM_LOCALID"], "slurm", addr, port)
        # one task in an allocation (an interactive salloc shell): a plain single process

    # a single process; LOCAL_RANK alone (or --local_rank) still picks the GPU
    local = _ints(env, ["LOCAL_RANK"])["LOCAL_RANK"] if "LOCAL_RANK" in env else local_rank_flag
    return DistInfo(0, 1, max(local, 0), "single")


def init_distributed(device: Optional[str] = None, local_rank: int = -1, dist_on_itp: bool = False,
                     dist_url: str = "env://", dist_port: Optional[int] = None) -> DistInfo:
    """Detect the launcher, pick the device, and join the process group when there are several.

    Args:
        device: ``--device`` (``cuda``, ``cpu``, or empty: CUDA when available); on GPUs the local
            rank's device.
        local_rank: ``--local_rank`` of ``torch.distributed.launch`` (-1: not given).
        dist_on_itp / dist_url / dist_port: the OpenMPI switch, rendezvous URL and SLURM master port.

    Returns:
        The :class:`DistInfo`, with ``device`` set.
    """
    global _CONTROL
    info = detect(os.environ, local_rank, dist_on_itp, dist_port)
    info.device = resolve_device(device, info.local_rank)
    if info.distributed and not dist.is_initialized():
        # torchrun already exported these; for SLURM / OpenMPI the detected values win over stale
        # variables (--dist_port over an inherited MASTER_PORT)
        os.environ["MASTER_ADDR"] = info.master_addr or os.environ.get("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(info.master_port or DEFAULT_PORT)
        backend = "nccl" if info.device.type == "cuda" else "gloo"
        kwargs = {"device_id": info.device} if info.device.type == "cuda" else {}
        dist.init_process_group(backend, init_method=dist_url or "env://", world_size=info.world_size, rank=info.rank,
                                **kwargs)
        # small control messages (the stop flag, the resume decision) travel on a CPU group, so they
        # never wait for, or synchronise with, the GPU stream
        _CONTROL = dist.new_group(backend="gloo") if backend != "gloo" else None
    return info


def resolve_device(requested: Optional[str], local_rank: int = 0) -> torch.device:
    """``--device``: ``cuda`` (the local rank's GPU), ``cpu``, or empty for CUDA when available.

    When the scheduler shows each task only its own GPU (``srun --gpus-per-task=1``), that GPU is
    ``cuda:0`` whatever the local rank.
    """
    name = (requested or ("cuda" if torch.cuda.is_available() else "cpu")).lower()
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} requested but CUDA is not available; use --device cpu.")
        count = torch.cuda.device_count()
        index = int(name.split(":")[1]) if ":" in name else (local_rank if count > 1 else 0)
        if index >= count:
            raise UserError(f"Local rank / device index {index} but only {count} GPU(s) are visible to this process; "
                            f"start at most {count} processes per node or check CUDA_VISIBLE_DEVICES.")
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device(name)


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if get_world_size() > 1:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all processes (in place; a no-op in a single process)."""
    if get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_min(t: torch.Tensor) -> torch.Tensor:
    """The minimum of a tensor over all processes (in place; a no-op in a single process)."""
    if get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t


def control_group() -> Optional["dist.ProcessGroup"]:
    """The CPU (gloo) group for small control messages; ``None`` means the default group (already gloo)."""
    return _CONTROL


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (a picklable value; also a synchronisation point)."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_CONTROL)
    return box[0]


def all_gather_object(obj: Any) -> List[Any]:
    """``obj`` of every rank, in rank order, on every rank (picklable values)."""
    if get_world_size() == 1:
        return [obj]
    out: List[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj, group=_CONTROL)
    return out


def cleanup() -> None:
    global _CONTROL
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _CONTROL = None
