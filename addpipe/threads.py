"""How many threads torch, OpenMP and MKL may use: the CPUs this process was allotted, shared by its node's ranks.

torch defaults to every core of the machine. Beside another job (a second rank, a DataLoader, a neighbour on a shared
node) that oversubscribes the cores, and OpenMP's spinning threads then wait on each other: a VAE was measured 15x
slower that way. The defaults are set as environment variables before torch is imported (it reads them once, when
it starts), so `--help` still imports nothing heavy. Set ADDPIPE_THREADS, or OMP_NUM_THREADS yourself, to override.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, Optional

VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def cgroup_cpus(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> Optional[int]:
    """A container's CPU quota (cgroup v2 `cpu.max`: "quota period", or "max" for none), rounded up."""
    try:
        quota, period = cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, math.ceil(int(quota) / int(period)))


def allotted_cpus(environ: Mapping[str, str], affinity: Optional[int] = None, quota: Optional[int] = None) -> int:
    """The CPUs one process may use: its CPU affinity (SLURM's and taskset's binding), the container's quota and
    SLURM_CPUS_PER_TASK, whichever is smallest, divided among the ranks torchrun starts on this node."""
    if affinity is None:
        affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limits = [affinity] + [value for value in (quota, _integer(environ.get("SLURM_CPUS_PER_TASK"))) if value]
    ranks = _integer(environ.get("LOCAL_WORLD_SIZE")) or 1
    return max(1, min(limits) // ranks)


def thread_defaults(environ: Mapping[str, str], affinity: Optional[int] = None, quota: Optional[int] = None) -> dict[str, str]:
    """The variables to set: none the user has set; ADDPIPE_THREADS when given, else allotted_cpus."""
    wanted = environ.get("ADDPIPE_THREADS")
    if wanted is not None and (_integer(wanted) or 0) < 1:
        raise ValueError(f"ADDPIPE_THREADS must be a positive integer, got {wanted!r}")
    count = str(_integer(wanted) if wanted is not None else allotted_cpus(environ, affinity, quota))
    return {name: count for name in VARIABLES if name not in environ}


def apply_thread_defaults() -> dict[str, str]:
    """Set the thread variables in this process's environment (before torch loads); -> what was set."""
    chosen = thread_defaults(os.environ, quota=cgroup_cpus())
    os.environ.update(chosen)
    return chosen


def _integer(value: Optional[str]) -> Optional[int]:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None
