"""Helpers that run real servers for tests and benchmarks: uvicorn in a thread, PostgreSQL from Debian's package."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from addpipe.eval.server import ServerThread  # noqa: F401 (re-exported for the tests)


class ServeProcess:
    """`addpipe eval serve` in its own process on a free loopback port, as a study runs it; stopped by PID."""

    def __init__(self, study: Path, db_url: str, threads: Optional[int] = None, workers: int = 1):
        self.study, self.db_url, self.threads, self.workers = Path(study), db_url, threads, workers
        self.process: Optional[subprocess.Popen] = None
        self.port: Optional[int] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "ServeProcess":
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
        command = [sys.executable, "-m", "addpipe.pipeline", "eval", "serve", "--study", str(self.study), "--db", self.db_url,
                   "--port", str(self.port), "--no-access-log", "--workers", str(self.workers)]
        command += ["--threads", str(self.threads)] if self.threads else []
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"eval serve exited: {self.process.stderr.read().decode()[-2000:]}")
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.1)
        self.process.kill()
        raise RuntimeError("eval serve did not start within 60 s")

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


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
