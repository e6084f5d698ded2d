"""A real two-node SLURM cluster on 127.0.0.1, for the cluster tests (and by hand: `python tests/slurm_cluster.py DIR`).

Debian's slurm-wlm and munge: one munged with its own socket and key, one slurmctld, and two slurmd started with
`-N NAME` on distinct ports, so one machine looks like two nodes. The node names are this machine's hostname and
`localhost`, both of which resolve to it: the job scripts take the rendezvous address from the first node's name.
Everything runs as the current user out of one directory; `stop()` ends exactly the daemons it started, by PID.

Settings that matter for the tests: `proctrack/linuxproc` and `task/none` (no cgroups in a container),
`AuthInfo=cred_expire=` short, because a requeued job is held for that long before it may run again (120 s by
default), `sched_interval=1` so that it then starts within a second (the main scheduling pass runs every 60 s by
default), and `KillWait`, the grace between SIGTERM and SIGKILL that a preempted trainer has to checkpoint in.
A second partition, `urgent`, on the same nodes and of a higher priority tier, preempts jobs of the default one
(`preempt/partition_prio`, `PreemptMode=CANCEL`: the preempted job is cancelled, PreemptTime set, unless it requeues
itself): the tests preempt a training job by submitting there.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol")


def missing() -> Optional[str]:
    """Why a cluster cannot start here, or None."""
    absent = [name for name in DAEMONS if shutil.which(name) is None and not Path(f"/usr/sbin/{name}").exists()]
    if absent:
        return f"SLURM/munge not installed ({', '.join(absent)} missing): apt-get install slurm-wlm munge"
    try:
        socket.gethostbyname(socket.gethostname())
    except OSError:
        return f"this machine's hostname {socket.gethostname()!r} does not resolve"
    return None


def _which(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _free_ports(count: int) -> list[int]:
    sockets, ports = [], []
    for _ in range(count):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sockets.append(sock)
        ports.append(sock.getsockname()[1])
    for sock in sockets:
        sock.close()
    return ports


class SlurmCluster:
    def __init__(self, root: Path, kill_wait: int = 30, cred_expire: int = 5, cpus: int = 2):
        self.root = Path(root)
        self.nodes = [socket.gethostname(), "localhost"]
        self.kill_wait, self.cred_expire, self.cpus = kill_wait, cred_expire, cpus
        self.pids: list[int] = []
        self.conf = self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """The environment a client command (sbatch, squeue, scontrol) needs to talk to this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def _write_config(self) -> None:
        ctld_port, *node_ports = _free_ports(1 + len(self.nodes))
        user = os.environ.get("USER") or __import__("pwd").getpwuid(os.getuid()).pw_name
        nodes = "\n".join(f"NodeName={name} NodeHostname={socket.gethostname()} NodeAddr=127.0.0.1 Port={port} "
                          f"CPUs={self.cpus} State=UNKNOWN" for name, port in zip(self.nodes, node_ports))
        self.conf.write_text(f"""ClusterName=addpipe
SlurmctldHost={socket.gethostname()}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
AuthInfo=socket={self.root}/munge.sock,cred_expire={self.cred_expire}
CredType=cred/munge
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool-%n
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd-%n.pid
SlurmctldLogFile={self.root}/slurmctld.log
SlurmdLogFile={self.root}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
KillWait={self.kill_wait}
MinJobAge=600
JobRequeue=1
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
{nodes}
PreemptType=preempt/partition_prio
PreemptMode=CANCEL
PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4 PriorityTier=1
PartitionName=urgent Nodes={','.join(self.nodes)} Default=NO MaxTime=INFINITE State=UP OverSubscribe=NO PriorityTier=2
""")

    def _spawn(self, args: list[str], log: str) -> int:
        with open(self.root / log, "ab") as out:
            process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.pids.append(process.pid)
        return process.pid

    def start(self, timeout: float = 60) -> "SlurmCluster":
        try:
            return self._start(timeout)
        except BaseException:
            self.stop()  # never leave a half-started cluster behind
            raise

    def _start(self, timeout: float) -> "SlurmCluster":
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "state").mkdir(exist_ok=True)
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o600)
        self._write_config()
        self._spawn([_which("munged"), "--foreground", "--force", f"--socket={self.root}/munge.sock",
                     f"--key-file={key}", f"--pid-file={self.root}/munged.pid", f"--log-file={self.root}/munged.log",
                     f"--seed-file={self.root}/munged.seed"], "munged.out")
        self._wait_for(lambda: (self.root / "munge.sock").exists(), timeout, "munged")
        self._spawn([_which("slurmctld"), "-D", "-i", "-f", str(self.conf)], "slurmctld.out")
        for name in self.nodes:
            self._spawn([_which("slurmd"), "-D", "-N", name, "-f", str(self.conf)], f"slurmd-{name}.out")
        self._wait_for(self._nodes_idle, timeout, "both nodes idle")
        return self

    def _nodes_idle(self) -> bool:
        found = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, env=self.env)
        states = dict(line.split() for line in found.stdout.splitlines() if line.strip())
        return all(states.get(name, "").startswith("idle") for name in self.nodes)

    def _wait_for(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            time.sleep(0.5)
        logs = "".join(f"\n--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(self.root.glob("*.log")) + sorted(self.root.glob("*.out")))
        self.stop()
        raise RuntimeError(f"SLURM test cluster: {what} not ready after {timeout:.0f} s{logs}")

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """A client command against this cluster."""
        return subprocess.run(list(args), capture_output=True, text=True, env=self.env, check=check)

    def job_state(self, job: str) -> str:
        found = self.run("scontrol", "show", "job", job, "-o", check=False).stdout
        for field in found.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return "UNKNOWN"

    def job_field(self, job: str, name: str) -> str:
        found = self.run("scontrol", "show", "job", job, "-o", check=False).stdout
        for field in found.split():
            if field.startswith(f"{name}="):
                return field.split("=", 1)[1]
        return ""

    def wait_job(self, job: str, timeout: float, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                         "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.job_state(job)
            if state in states:
                return state
            time.sleep(1)
        raise TimeoutError(f"job {job} still {self.job_state(job)} after {timeout:.0f} s")

    def stop(self) -> None:
        for pid in reversed(self.pids):
            try:
                os.killpg(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        for pid in self.pids:
            while time.monotonic() < deadline:
                try:
                    if os.waitpid(pid, os.WNOHANG)[0]:
                        break
                except ChildProcessError:
                    break
                time.sleep(0.1)
            else:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.pids.clear()


Cluster = SlurmCluster


if __name__ == "__main__":  # start one by hand; Ctrl-C stops it
    cluster = SlurmCluster(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/addpipe-slurm")).start()
    print(f"export SLURM_CONF={cluster.conf}", flush=True)
    try:
        signal.pause()
    finally:
        cluster.stop()
