"""Rank helpers: the environment of one process, torchrun, srun or the deepspeed launcher, CPU or GPU, and the
collectives every stage uses. How a backend starts its process group is the backend's (train/backends/)."""

from __future__ import annotations

import ctypes
import logging
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare_environment() -> None:
    """Fill in what a plain `python -m addpipe...` lacks; torchrun and deepspeed set these themselves.

    DeepSpeed needs RANK/WORLD_SIZE/MASTER_ADDR even for one process (docs/engineering.md), compiles its native
    ops on first use (cached here across runs), and must be told it is on the CPU when no GPU exists.
    """
    if "RANK" not in os.environ:
        os.environ.update(from_slurm(os.environ) or {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    os.environ.setdefault("LOCAL_RANK", os.environ.get("RANK", "0"))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list ("gpu[003-010,017],cpu1" -> "gpu003"): `scontrol show hostnames` where
    it runs, else the list's own syntax."""
    try:
        found = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
        if found.returncode == 0 and found.stdout.split():
            return found.stdout.split()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    head = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if head is None:
        return nodelist
    prefix, ranges = head.groups()
    return prefix + (ranges.split(",")[0].split("-")[0] if ranges else "")


def from_slurm(env) -> dict[str, str]:
    """Rank, world size, local rank and rendezvous for a task that `srun` started without torchrun, or {} outside an
    srun step. The batch script itself also sees SLURM_PROCID=0 and the job's task count, but it is no step of
    tasks (it has no numeric SLURM_STEP_ID): a `python -m addpipe.pipeline train` run from it stays one process.
    The rendezvous port is derived from the job id so that every task picks the same one without talking."""
    if not env.get("SLURM_STEP_ID", "").isdigit() or "SLURM_PROCID" not in env:
        return {}
    tasks = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or "1"
    found = {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": tasks, "LOCAL_RANK": env.get("SLURM_LOCALID", "0")}
    if "MASTER_ADDR" not in env:
        found["MASTER_ADDR"] = first_host(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1")
    if "MASTER_PORT" not in env:
        found["MASTER_PORT"] = str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
    return found


def launched_by_a_launcher() -> bool:
    """Started by torchrun (it sets TORCHELASTIC_RUN_ID) or by DeepSpeed's per-node launcher."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return True
    try:
        parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return False
    return b"deepspeed.launcher.launch" in parent


def die_with_launcher() -> None:
    """Make this worker end when its launcher ends. torchrun starts each worker in a session of its own, so a
    `kill -9` of torchrun used to leave the workers training on into the run directory. Linux only; a process
    started by hand (a shell, nohup) is left alone: its parent's end must not stop it."""
    if not sys.platform.startswith("linux") or not launched_by_a_launcher():
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_PDEATHSIG = 1
    libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != parent:  # the launcher died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def initialize(start_group: Optional[Callable[[str], None]] = None, process_group: str = "auto") -> torch.device:
    """Start the process group (once) and return this rank's device. `start_group(name)` starts it for a backend
    that must set it up itself (DeepSpeed keeps its own handle on the group; train/backends/ says how); default
    torch's init_process_group. `process_group`: nccl, gloo, or auto (nccl on a GPU, else gloo)."""
    prepare_environment()
    die_with_launcher()
    if torch.cuda.is_available():
        # Where SLURM binds one GPU to each task (--gpus-per-task=1) every task sees one device, 0, whatever its
        # local rank; DeepSpeed takes LOCAL_RANK as the device index, so it is made one here.
        os.environ["LOCAL_RANK"] = str(local_rank() % torch.cuda.device_count())
        torch.cuda.set_device(local_rank())
    group = process_group
    if group == "auto":
        group = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        (start_group or (lambda name: dist.init_process_group(backend=name)))(group)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized() and world_size() > 1:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is true on any: used so that all ranks stop together."""
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    return bool(all_reduce_sum(value).item() > 0)


def broadcast_object(value):
    if dist.is_initialized() and world_size() > 1:
        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]
    return value


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast(tensor: torch.Tensor, src: int) -> torch.Tensor:
    """Broadcast a tensor from rank `src` in place; CPU tensors go through the GPU where the group is NCCL."""
    if not (dist.is_initialized() and world_size() > 1):
        return tensor
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        moved = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        dist.broadcast(moved, src=src)
        tensor.copy_(moved.cpu())
        return tensor
    dist.broadcast(tensor, src=src)
    return tensor


def all_gather_objects(value) -> list:
    """Every rank's `value`, in rank order, on every rank."""
    if not (dist.is_initialized() and world_size() > 1):
        return [value]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered
