"""Helpers that run real servers for tests and benchmarks: uvicorn in a thread, PostgreSQL from Debian's package."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

from addpipe.eval.server import ServerThread  # noqa: F401 (re-exported for the tests)


def _as_postgres(command: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root; Debian's package brings a `postgres` user for this.
    return ["runuser", "-u", "postgres", "--"] + command if os.geteuid() == 0 else command


class PostgresServer:
    """A throwaway PostgreSQL cluster in `directory` on a free port; `available()` says whether one can start."""

    BIN = Path("/usr/lib/postgresql")

    def __init__(self, directory: Optional[Path] = None):
        # The cluster's directory must be reachable by the `postgres` user: pytest's tmp dirs are root-only,
        # so a fresh directory directly under the system temp dir is used unless one is given.
        self.directory = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="addpipe-pg-"))
        self.port: Optional[int] = None
        self.bin = self._find_bin()

    @classmethod
    def _find_bin(cls) -> Optional[Path]:
        if shutil.which("initdb"):
            return Path(shutil.which("initdb")).resolve().parent  # the real bin dir: it also has createdb
        versions = sorted(cls.BIN.glob("*/bin/initdb")) if cls.BIN.exists() else []
        return versions[-1].parent if versions else None

    def available(self) -> bool:
        return self.bin is not None and (os.geteuid() != 0 or shutil.which("runuser") is not None)

    def __enter__(self) -> "PostgresServer":
        data = self.directory / "data"
        self.directory.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.directory, "postgres")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        subprocess.run(_as_postgres([str(self.bin / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"]),
                       check=True, capture_output=True)
        subprocess.run(_as_postgres([str(self.bin / "pg_ctl"), "-D", str(data), "-w", "-l", str(self.directory / "log"),
                                     "-o", f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c max_connections=200",
                                     "start"]), check=True, capture_output=True)
        return self

    def create_database(self, name: str) -> str:
        subprocess.run(_as_postgres([str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name]),
                       check=True, capture_output=True)
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def __exit__(self, *exc) -> None:
        subprocess.run(_as_postgres([str(self.bin / "pg_ctl"), "-D", str(self.directory / "data"), "-m", "immediate", "stop"]),
                       capture_output=True)
        shutil.rmtree(self.directory, ignore_errors=True)
