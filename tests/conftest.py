"""Shared fixtures: tiny random-init model directories and digit shards, built once per session."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)

# Every process the suite starts inherits this marker (daemons in their own sessions included), so the session can
# find whatever a test left running. A leftover daemon can hold the pipe of whoever runs the suite open and stall it
# long after pytest has printed its summary.
SESSION_MARK = "ADDPIPE_TEST_SESSION"
os.environ[SESSION_MARK] = uuid.uuid4().hex


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    """`addpipe ARGS` in this process, through the command line's own error mapping (pipeline.cli.invoke): for the
    error paths, which a fresh interpreter made ~40 s each under load for an answer that takes a fraction of a
    second. Its stdout, stderr and log records come back as a finished process's would; the signal handlers a
    command installs are put back."""
    import contextlib
    import io
    import logging

    from addpipe.pipeline.cli import invoke

    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root, handlers = logging.getLogger(), {n: signal.getsignal(n) for n in (signal.SIGTERM, signal.SIGUSR1)}
    level, code, here = root.level, 0, os.getcwd()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            invoke([str(a) for a in args])
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    finally:
        os.chdir(here)
        root.removeHandler(handler)
        root.setLevel(level)
        for number, previous in handlers.items():
            signal.signal(number, previous)
    return subprocess.CompletedProcess(["addpipe", *args], code, out.getvalue(), err.getvalue())


def leftover_processes() -> list[tuple[int, str]]:
    """(pid, command line) of live processes this session started and left running (Linux /proc): those carrying
    its marker (exec'd programs and the daemons they start) and this process's descendants (forked children, such
    as DataLoader workers, which keep the environment the interpreter started with, without the marker)."""
    mark = f"{SESSION_MARK}={os.environ[SESSION_MARK]}".encode()
    parents, marked, commands = {}, set(), {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if fields[0] == "Z":
                continue  # already dead, waiting to be reaped by its parent
            pid = int(entry.name)
            parents[pid] = int(fields[1])
            commands[pid] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
            if mark in (entry / "environ").read_bytes().split(b"\0"):
                marked.add(pid)
        except OSError:  # gone meanwhile, or not ours to read
            continue

    def descends(pid: int) -> bool:
        seen = set()
        while pid in parents and pid not in seen:
            seen.add(pid)
            pid = parents[pid]
            if pid == os.getpid():
                return True
        return False

    return [(pid, commands[pid]) for pid in sorted(commands) if pid in marked or descends(pid)]


CLUSTER_MODULES = ("test_clusters.py",)
CLUSTER_WORDS = ("slurm", "spark", "real_cluster")


def xdist_scope(nodeid: str) -> str:
    """The unit pytest-xdist sends to one worker (`-n 2`, what the README's test command runs): a module, so that its
    module-scoped fixtures (a shared reference run, a seven-config torchrun launch) are built once; and one unit for
    every test on a local SLURM or Spark cluster (found by name; pytest_collection_modifyitems checks that the names
    cover the `cluster` mark), so that one cluster starts and its scheduler's waits overlap the other worker's
    computing."""
    module, _, name = nodeid.partition("::")
    if module.endswith(CLUSTER_MODULES) or any(word in name for word in CLUSTER_WORDS):
        return "cluster"
    return module


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    # xdist's own loadgroup marks do not reach its scheduler under pytest 9.2 (node ids are no longer assignable),
    # so the grouping is a scheduler of ours: LoadScopeScheduling with the scope above.
    from xdist.scheduler import LoadScopeScheduling

    class ByModuleAndCluster(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_scope(nodeid)

    return ByModuleAndCluster(config, log)


def pytest_collection_modifyitems(config, items):
    unscoped = [item.nodeid for item in items if item.get_closest_marker("cluster") and xdist_scope(item.nodeid) != "cluster"]
    if unscoped:
        raise pytest.UsageError(f"cluster tests the xdist scope would not keep together (name them with one of "
                                f"{CLUSTER_WORDS} or list their module in CLUSTER_MODULES): {unscoped}")


def pytest_unconfigure(config):
    """End, and name, any process a test started and did not stop."""
    if not Path("/proc/self/environ").exists():
        return
    for pid, command in leftover_processes():
        if "multiprocessing.resource_tracker" in command or "multiprocessing.forkserver" in command:
            continue  # this interpreter's own helpers: they exit with it
        print(f"conftest: a test left pid {pid} running, killed: {command}", file=sys.stderr)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    from addpipe.train.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("models") / "sd", "sd")


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory) -> Path:
    from addpipe.train.tiny import build_tiny_sd3_pipeline

    return build_tiny_sd3_pipeline(tmp_path_factory.mktemp("tiny_sd3") / "pipe")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    from addpipe.train.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("models") / "sdxl", "sdxl")


@pytest.fixture(scope="session")
def tiny_dino(tmp_path_factory) -> Path:
    from addpipe.train.tiny import build_tiny_dinov2

    return build_tiny_dinov2(tmp_path_factory.mktemp("models") / "dinov2", image_size=32)


@pytest.fixture(scope="session")
def digit_shards(tmp_path_factory) -> Path:
    from addpipe.dataprep.digits import write_digit_shards

    return write_digit_shards(tmp_path_factory.mktemp("shards"), 96, 16, samples_per_shard=12)


@pytest.fixture(scope="session")
def tiny_student(tiny_sd, tiny_dino, digit_shards, tmp_path_factory) -> Path:
    """A student exported by the trainer after two ADD steps on the tiny SD teacher (timesteps 999/749/499/249), for the
    tests that need an exported student and not how it was trained: trained once per session."""
    from addpipe.config import load
    from addpipe.train.config import TrainConfig
    from addpipe.train.loop import train

    run = tmp_path_factory.mktemp("tiny_student") / "run"
    return train(load(TrainConfig, TINY_CONFIG, tiny_overrides(tiny_sd, tiny_dino, digit_shards, run, steps=2)))


def tiny_overrides(teacher: Path, dino: Path, shards: Path, run_dir: Path, **extra) -> list[str]:
    """Overrides on configs/tiny.yaml pointing at the session's tiny models and shards."""
    values = {
        "run_dir": str(run_dir), "model.teacher": str(teacher), "discriminator.feature_network": str(dino),
        "data.shards": str(shards), "log.tensorboard": "false", "log.progress": "false",
        "checkpoint.every": "1000", "log.every": "1",
    }
    values.update({k: str(v) for k, v in extra.items()})
    return [f"{k}={v}" for k, v in values.items()]


def torchrun_batch(jobs: list[dict], root: Path, processes: int = 2, env: Optional[dict] = None) -> None:
    """Train runs [{"overrides", "report", "resume"?, "copy"?, "config"?}] one after another in a single torchrun
    launch of tests/dist_worker.py (about twenty seconds of start-up each otherwise); their reports land where
    each job says."""
    import json

    jobs = [{**job, "config": str(job.get("config", TINY_CONFIG)), "report": str(job["report"]), "overrides": [str(o) for o in job["overrides"]],
             "copy": [str(c) for c in job["copy"]] if job.get("copy") else None} for job in jobs]
    path = root / "torchrun_jobs.json"
    path.write_text(json.dumps(jobs))
    drop = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}  # in-process trainers set them
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               str(Path(__file__).with_name("dist_worker.py")), "batch", str(path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800, cwd=Path(__file__).parent,
                            env={**{k: v for k, v in os.environ.items() if k not in drop}, **(env or {})})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny.yaml"
TINY_D2G_CONFIG = REPO / "configs" / "tiny_d2g.yaml"


def _cluster(module_name: str, tmp_path_factory):
    """Start the cluster a tests/<module>.py describes, or skip saying which package is missing; stop it after."""
    import importlib

    module = importlib.import_module(module_name)
    why = module.missing()
    if why:
        pytest.skip(why)
    cluster = module.Cluster(tmp_path_factory.mktemp(module_name)).start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A two-node SLURM cluster on this machine (tests/slurm_cluster.py), shared by the session's cluster tests."""
    yield from _cluster("slurm_cluster", tmp_path_factory)


@pytest.fixture(scope="session")
def spark(tmp_path_factory):
    """A Spark standalone master and two workers on 127.0.0.1 (tests/spark_cluster.py)."""
    yield from _cluster("spark_cluster", tmp_path_factory)

