"""The run directory: one trainer at a time, and failures to write it reported with the path.

Two trainers on one `run_dir` would interleave checkpoints and metrics. Rank 0 of a run holds an exclusive
POSIX record lock (`lockf`) on `run_dir/.lock` for its whole life; the kernel drops it when the process dies,
however it dies, so a crashed or killed run never leaves a stale lock behind. A record lock rather than
`flock`: forked children (DataLoader workers) do not inherit it, so it never outlives the trainer in them,
and it also works across the nodes of an NFS mount. The lock file names its holder (pid, host, start time)
for the message a second trainer gets.
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import os
import socket
from pathlib import Path
from typing import Optional

from addpipe.files import write_text_atomic
from addpipe.errors import UserError

LOCK_NAME = ".lock"
# errno values that mean "the user's run directory cannot take this write", not a bug in addpipe
WRITE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.ENOTDIR}


class RunDirError(UserError, RuntimeError):
    """The run directory cannot be used: another trainer holds it, or it cannot be written (printed without a traceback)."""


def describe_write_error(path: Path, error: BaseException) -> str:
    reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error).strip().splitlines()[0]
    return f"cannot write {path}: {reason}"


def is_write_error(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in WRITE_ERRNOS


class RunDirLock:
    """Exclusive use of a run directory by this process (rank 0); `acquire` creates the directory."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.fd: Optional[int] = None

    def acquire(self) -> "RunDirLock":
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise RunDirError(f"run directory {self.run_dir} cannot be used: {describe_write_error(self.path, error)}") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EACCES, errno.EAGAIN):
                os.close(fd)
                raise RunDirError(f"run directory {self.run_dir} cannot be locked: {error.strerror}") from None
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            raise RunDirError(
                f"another trainer ({holder}) is using {self.run_dir}: wait for it to finish or stop it, or use another "
                "run_dir. A killed launcher can leave its workers running; `pgrep -af addpipe` finds them") from None
        try:
            os.ftruncate(fd, 0)
            started = dt.datetime.now().isoformat(timespec="seconds")
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {started}\n".encode(), 0)
        except OSError as error:
            os.close(fd)
            raise RunDirError(f"run directory {self.run_dir} cannot be used: {describe_write_error(self.path, error)}") from None
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the lock
            self.fd = None


def write_config(run_dir: Path, text: str) -> None:
    """`run_dir/config.yaml`, atomically; a write the directory refuses is a RunDirError naming the file."""
    path = Path(run_dir) / "config.yaml"
    try:
        write_text_atomic(path, text)
    except OSError as error:
        raise RunDirError(describe_write_error(path, error)) from None
