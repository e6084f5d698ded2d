"""A real Spark standalone cluster on 127.0.0.1 for the tests: one master and two workers, from pyspark's own
distribution (its bin/spark-class and jars) and the machine's Java. `stop()` ends what it started, by PID."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional


def missing() -> Optional[str]:
    try:
        import pyspark  # noqa: F401
    except ImportError:
        return "pyspark not installed (pip install pyspark)"
    if shutil.which("java") is None:
        return "no Java runtime (apt-get install openjdk-17-jre-headless)"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SparkCluster:
    def __init__(self, root: Path, workers: int = 2, cores: int = 1):
        import pyspark

        self.root = Path(root)
        self.home = Path(pyspark.__file__).parent
        self.workers, self.cores = workers, cores
        self.port, self.ui = _free_port(), _free_port()
        self.master = f"spark://127.0.0.1:{self.port}"
        self.processes: list[subprocess.Popen] = []

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SPARK_HOME": str(self.home), "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable,
                "SPARK_WORKER_DIR": str(self.root / "work"), "SPARK_LOG_DIR": str(self.root / "logs"),
                "SPARK_NO_DAEMONIZE": "1"}

    def _spawn(self, args: list[str], log: str) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / log, "ab") as out:
            self.processes.append(subprocess.Popen([str(self.home / "bin" / "spark-class"), *args], stdout=out,
                                                   stderr=subprocess.STDOUT, env=self.env, start_new_session=True))

    def alive_workers(self) -> int:
        """From the master's web UI; 0 while it is still coming up (refused, or not yet JSON)."""
        import json

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ui}/json/", timeout=2) as response:
                return int(json.load(response).get("aliveworkers", 0))
        except (OSError, ValueError, AttributeError):
            return 0

    def start(self, timeout: float = 120) -> "SparkCluster":
        try:
            return self._start(timeout)
        except BaseException:
            self.stop()  # never leave a half-started cluster behind
            raise

    def _start(self, timeout: float) -> "SparkCluster":
        self._spawn(["org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", str(self.port),
                     "--webui-port", str(self.ui)], "master.log")
        for index in range(self.workers):
            self._spawn(["org.apache.spark.deploy.worker.Worker", self.master, "--host", "127.0.0.1", "--cores",
                         str(self.cores), "--memory", "1g", "--webui-port", str(_free_port()),
                         "--work-dir", str(self.root / f"work{index}")], f"worker{index}.log")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.alive_workers() >= self.workers:
                return self
            if any(p.poll() is not None for p in self.processes):
                break
            time.sleep(1)
        logs = "".join(f"\n--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(self.root.glob("*.log")))
        self.stop()
        raise RuntimeError(f"Spark test cluster: {self.workers} workers not alive after {timeout:.0f} s{logs}")

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.processes.clear()


Cluster = SparkCluster
