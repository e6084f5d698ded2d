"""Rank helpers: process-group set-up for one process, torchrun or the deepspeed launcher, CPU or GPU."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import io
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

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
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(native_ops_cache()))
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


CACHE_ROOT = Path.home() / ".cache" / "addpipe" / "torch_extensions"


def native_ops_cache(root: Path = CACHE_ROOT) -> Path:
    """Where DeepSpeed's JIT-built native ops are kept unless TORCH_EXTENSIONS_DIR says otherwise: one directory per
    Python, torch and DeepSpeed version (and CUDA build), so that two installs never rebuild, or wait on, each other's."""
    try:
        from importlib.metadata import version

        deepspeed_version = version("deepspeed")
    except Exception:  # not installed: nothing will be built
        deepspeed_version = "none"
    cuda = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    tag = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__.split('+')[0]}-{cuda}-deepspeed{deepspeed_version}"
    return root / tag


BUILD_LOCK = ".addpipe-build.lock"
"""flock()ed by the process that builds (or checks) the ops in a cache; it holds 'host pid rank since' of that process.
Unlike torch's own lock file, the kernel releases it when its holder dies."""


@contextlib.contextmanager
def native_build_lock(cache: Path, report_every: float = 30.0):
    """Hold the cache's build lock; while another process holds it, say who, and keep saying so every
    `report_every` seconds. Inside, a torch `lock` file left in an op's build directory can only be a build that
    was killed (every addpipe build holds this lock): torch would wait on it forever without a word, so it goes."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / BUILD_LOCK, "a+") as handle:
        started = time.monotonic()
        reported = None
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - started
                if reported is None or waited - reported >= report_every:
                    handle.seek(0)
                    holder = handle.read().strip() or "another process"
                    logger.warning("waiting %.0f s so far for %s, which is building or loading DeepSpeed's native ops "
                                   "in %s", waited, holder, cache)
                    reported = waited
                time.sleep(0.2)
        if reported is not None:
            logger.info("the build lock of %s is free after %.0f s", cache, time.monotonic() - started)
        try:  # who holds it, for whoever waits: informational, so a full disk or a file-size limit must not stop us
            handle.seek(0)
            handle.truncate()
            handle.write(f"host {socket.gethostname()} pid {os.getpid()} rank {os.environ.get('RANK', '0')} since "
                         f"{time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
            handle.flush()
        except OSError:
            pass
        for stale in cache.glob("*/lock"):
            describe_torch_lock(stale, cache)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                handle.seek(0)
                handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)


STALE_TORCH_LOCK = 900
"""Seconds after which a torch build lock in addpipe's own cache counts as left by a killed build (a build takes
about a minute; every process that loads an op holds the lock for a moment, even when nothing needs building)."""


def describe_torch_lock(lock: Path, cache: Path) -> None:
    """torch's own lock file in an op's build directory: a build in progress (or a load: torch takes it for a moment
    every time), or one left by a killed build, which torch would wait on forever without a word."""
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_TORCH_LOCK and cache.resolve().is_relative_to(CACHE_ROOT.resolve()):
        logger.warning("removing %s, left %.0f s ago by a build that was killed (torch would wait on it forever)", lock, age)
        lock.unlink(missing_ok=True)
    else:
        logger.log(logging.WARNING if age > 60 else logging.INFO, "%s exists (%.0f s old): torch waits until it goes. "
                   "A build is running, or one was killed: then delete it", lock, age)


@contextlib.contextmanager
def watch_torch_lock(lock: Path, cache: Path, every: float = 30.0):
    """Say so every `every` seconds while torch waits on `lock` inside the block."""
    done = threading.Event()

    def watch() -> None:
        while not done.wait(every):
            if lock.exists():
                describe_torch_lock(lock, cache)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()


def build_native_ops(engine=None) -> None:
    """Build (once per cache) or load DeepSpeed's native CPU ops before the process group starts, under the cache's
    build lock: the shared-memory communication op (its first build takes about a minute on a small machine and
    needs a C++ compiler) and, with CPU offload, cpu_adam. The log says when a build starts and how long it took.
    Only rank 0 prints DeepSpeed's and torch's build messages; the other ranks keep theirs unless the build fails."""
    if torch.cuda.is_available():
        return
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    names = ["ShareMemCommBuilder"]
    if getattr(engine, "offload_optimizer", "none") != "none":
        names.append("CPUAdamBuilder")
    builders = [b for b in (get_accelerator().create_op_builder(n) for n in names)
                if b is not None and deepspeed.ops.__compatible_ops__.get(b.NAME, False)]
    if not builders:
        return
    cache = Path(os.environ["TORCH_EXTENSIONS_DIR"])
    quiet = rank() != 0
    with native_build_lock(cache):
        for builder in builders:
            built = any(cache.glob(f"{builder.NAME}/*.so"))
            if not built and not quiet:
                logger.info("building DeepSpeed's %s op (once per install: about a minute, needs a C++ compiler) in %s",
                            builder.NAME, cache)
            started = time.monotonic()
            captured = io.StringIO()
            try:
                with contextlib.redirect_stdout(captured) if quiet else contextlib.nullcontext(), \
                        watch_torch_lock(cache / builder.NAME / "lock", cache):
                    builder.load(verbose=False)
            except BaseException:
                sys.stdout.write(captured.getvalue())
                raise
            if not built and not quiet:
                logger.info("DeepSpeed's %s op built in %.0f s", builder.NAME, time.monotonic() - started)


def initialize(engine=None) -> torch.device:
    """Start the process group (once) and return this rank's device. `engine`: the training config's engine
    section (its process_group, and whether DeepSpeed should set the group up: it keeps its own handle on it)."""
    prepare_environment()
    die_with_launcher()
    if torch.cuda.is_available():
        # Where SLURM binds one GPU to each task (--gpus-per-task=1) every task sees one device, 0, whatever its
        # local rank; DeepSpeed takes LOCAL_RANK as the device index, so it is made one here.
        os.environ["LOCAL_RANK"] = str(local_rank() % torch.cuda.device_count())
        torch.cuda.set_device(local_rank())
    group = getattr(engine, "process_group", "auto")
    if group == "auto":
        group = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        if getattr(engine, "backend", "deepspeed") == "deepspeed":
            import deepspeed

            build_native_ops(engine)
            # its "built successfully" line, once per rank: rank 0's is enough
            with contextlib.redirect_stdout(io.StringIO()) if rank() != 0 else contextlib.nullcontext():
                deepspeed.init_distributed(dist_backend=group)
        else:
            dist.init_process_group(backend=group)
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
