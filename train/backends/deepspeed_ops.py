"""DeepSpeed's native CPU ops (the shared-memory communication op; cpu_adam with CPU offload), built once per
install under a lock that says who holds it, and DeepSpeed's start of the process group.

The ops are JIT-built by torch's cpp_extension into TORCH_EXTENSIONS_DIR, which torch guards with a lock file that a
killed build leaves behind forever; here every build also holds an flock (released by the kernel when its holder
dies), the log says when a build starts, how long it took and whom a waiting process waits for.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path

import torch

from addpipe.train.distributed import rank

logger = logging.getLogger(__name__)


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


SHM_COMM = "ADDPIPE_DEEPSPEED_SHM_COMM"
"""Set to 1 to build and use DeepSpeed's shared-memory collectives on the CPU."""


def skip_shm_comm() -> bool:
    """On the CPU, leave out DeepSpeed's shared-memory communication op unless SHM_COMM asks for it: it serves only
    inference_all_reduce (tensor-parallel inference), never a training collective (those go through gloo either
    way), and its first JIT build is a C++ compile of one to four minutes on a small machine, once per install."""
    if torch.cuda.is_available() or os.environ.get(SHM_COMM, "0") == "1":
        return False
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False  # what deepspeed.comm reads before building it
    return True


def start_process_group(engine, group: str) -> None:
    """DeepSpeed's own start of the process group (it keeps a handle on it), after its native ops are ready."""
    import deepspeed

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(native_ops_cache()))
    skip_shm_comm()
    build_native_ops(engine)
    # its "built successfully" line, once per rank: rank 0's is enough
    with contextlib.redirect_stdout(io.StringIO()) if rank() != 0 else contextlib.nullcontext():
        deepspeed.init_distributed(dist_backend=group)
