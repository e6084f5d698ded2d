"""Training on a real two-node SLURM cluster (tests/slurm_cluster.py): `addpipe slurm train` submits, srun starts
one CPU rank per node without torchrun, and the run equals a two-rank torchrun run of the same config, also when
it is preempted (`scontrol requeue`: SIGTERM), told its time is nearly up (SIGUSR1 to the batch script) or runs
into a real time limit: each time every rank checkpoints at a step boundary, the job requeues and resumes, and
metrics.jsonl holds every step once."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import TINY_CONFIG, tiny_overrides, torchrun_batch
from test_train import clean_env

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
STEPS = 16  # enough that a signal sent after step 2 (it takes a second or two to reach the tasks) lands mid-run
LONG_STEPS = 200  # longer than one start trains under the time-limit test's 2-minute limit (about 120 steps)
ADDPIPE = [sys.executable, "-m", "addpipe.pipeline"]
# Bitwise equality needs the same reductions on both sides, so the same thread count: torchrun would give each of its
# two ranks one thread, the batch script one per CPU of the task (two here), and addpipe's defaults follow them.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
BACKENDS = {"deepspeed": {"engine.backend": "deepspeed", "engine.zero": 3},
            "fsdp2": {"engine.backend": "fsdp2"}}


def settings(request, run: Path, backend: str, steps: int = STEPS) -> list[str]:
    # one sample per rank per step: the two ranks' streams are the same whichever launcher starts them
    return tiny_overrides(request.getfixturevalue("tiny_sd"), request.getfixturevalue("tiny_dino"),
                          request.getfixturevalue("digit_shards"), run, steps=steps,
                          **{"data.batch_size": 1, "data.num_workers": 1, **BACKENDS[backend]})


def weights(run: Path) -> dict:
    return load_file(str(next((run / "student" / "unet").glob("*.safetensors"))))


def logged_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def torchrun_reference(request, tmp_path_factory):
    """The same config, two ranks under torchrun on one machine, uninterrupted: both backends' runs in one launch,
    made on first use. -> backend -> its run directory."""
    found: dict[str, Path] = {}

    def get(backend: str) -> Path:
        if not found:
            root = tmp_path_factory.mktemp("torchrun")
            runs = {name: root / name / "run" for name in BACKENDS}
            torchrun_batch([{"report": root / f"{name}.json", "overrides": settings(request, run, name)}
                            for name, run in runs.items()], root, env=ONE_THREAD)
            found.update(runs)
        return found[backend]
    return get


def submit(slurm, tmp_path: Path, overrides: list[str], *options: str) -> tuple[str, Path]:
    """`addpipe slurm train` on 2 nodes; -> (job id, its log)."""
    logs = tmp_path / "logs"
    result = subprocess.run(ADDPIPE + ["slurm", "train", "--config", str(TINY_CONFIG), "--nodes", "2", "--log-dir",
                                       str(logs), *options, *overrides],
                            capture_output=True, text=True, env={**clean_env(), **ONE_THREAD, "SLURM_CONF": str(slurm.conf)},
                            cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    job = result.stdout.split("submitted job ")[1].split(";")[0]
    return job, logs / f"addpipe-train-{job}.out"


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def finished(slurm, job: str, run: Path, log: Path, timeout: float = 600) -> str:
    """Wait for the job to end for good (a requeued job passes through PENDING again); -> its log."""
    state = slurm.wait_job(job, timeout)
    text = log.read_text() if log.exists() else ""
    assert state == "COMPLETED", f"job {job} ended {state}:\n{text[-6000:]}"
    return text


def same_as_reference(run: Path, reference: Path) -> None:
    assert logged_steps(run) == list(range(1, STEPS + 1))  # every step once, across the restarts
    a, b = weights(run), weights(reference)
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max().item() == 0.0, key


def signal_after_the_export(slurm, job: str, run: Path) -> int:
    """The time-limit warning arriving after the work is done: SIGUSR1 to the batch script again and again, from the
    export until the job has ended (so some land while the tasks exit). -> how many were sent."""
    wait_until(lambda: (run / "student").is_dir() or slurm.job_state(job) not in ("RUNNING", "PENDING", "COMPLETING"),
               600, "the export")
    sent = 0
    while slurm.job_state(job) in ("RUNNING", "COMPLETING"):
        sent += slurm.run("scancel", "--signal=USR1", "--batch", job, check=False).returncode == 0
        time.sleep(0.1)
    return sent


def stopped_at(text: str, signal_name: str) -> list[int]:
    return [int(line.split("at step ")[1].split(";")[0]) for line in text.splitlines()
            if line.startswith(f"stopped by {signal_name} at step ")]


@pytest.mark.parametrize("backend, interrupt", [("deepspeed", "requeue-then-preempt"), ("fsdp2", "cancel-then-usr1")])
def test_slurm_train_preempted_checkpoints_requeues_and_equals_torchrun(request, slurm, torchrun_reference, tmp_path,
                                                                         backend, interrupt):
    """deepspeed: `scontrol requeue` (SIGTERM to every task; SLURM requeues the job itself), then a preemption by a
    job of a higher-tier partition (PreemptMode=CANCEL: the batch script requeues). fsdp2: a plain `scancel`, which
    must cancel for good (checkpoint, no requeue); the same command submitted again resumes; then SIGUSR1 to the
    batch script (what the time-limit warning does) requeues it, and the warning again after the export changes
    nothing: COMPLETED. Each time every rank checkpoints at a step boundary; the student equals torchrun's."""
    run = tmp_path / "run"
    overrides = settings(request, run, backend)
    job, log = submit(slurm, tmp_path, overrides, "--time", "20:00")
    try:
        wait_until(lambda: len(logged_steps(run)) >= 2, 300, "two logged steps")
    except AssertionError as error:  # say where it stood: pending, running silent, or failed
        raise AssertionError(f"{error}; job {job} {slurm.job_state(job)}, {len(logged_steps(run))} step(s) logged; "
                             f"its log:\n{log.read_text()[-4000:] if log.exists() else '(none yet)'}") from None
    if interrupt == "requeue-then-preempt":
        slurm.run("scontrol", "requeue", job)

        def resumed_two_steps() -> bool:
            stops = stopped_at(log.read_text() if log.exists() else "", "SIGTERM")
            return bool(stops) and "start 2," in log.read_text() and len(logged_steps(run)) >= stops[0] + 2
        wait_until(resumed_two_steps, 300, "two more steps after the requeue")
        # a job that needs both nodes whole, in a partition of a higher tier: it preempts (cancels) the training
        urgent = slurm.run("sbatch", "--parsable", "-p", "urgent", "-N", "2", "-c", str(slurm.cpus), "-o", "/dev/null",
                           "--wrap", "sleep 1").stdout.strip()
        assert slurm.wait_job(urgent, 300) == "COMPLETED"
        text = finished(slurm, job, run, log)
        assert "SLURM is requeueing job" in text and "checkpoint written (it was preempted): requeueing job" in text
        assert f"job {job} requeued: it resumes" in text and "start 3," in text and "the requeue was refused" not in text
        assert len(stopped_at(text, "SIGTERM")) == 2, text[-4000:]
    else:
        slurm.run("scancel", job)
        assert slurm.wait_job(job, 120) == "CANCELLED"
        time.sleep(slurm.cred_expire + 5)  # a requeued job would be pending, then running again, by now
        text = log.read_text()
        assert slurm.job_state(job) == "CANCELLED" and slurm.job_field(job, "Restarts") == "0", text[-3000:]
        assert f"job {job} was cancelled: it stays cancelled" in text and "requeueing" not in text
        step = stopped_at(text, "SIGTERM")[0]  # cheap here: the checkpoint is written within KillWait
        assert logged_steps(run) == list(range(1, step + 1))
        job, log = submit(slurm, tmp_path, overrides, "--time", "20:00")  # the same command: resumes
        wait_until(lambda: len(logged_steps(run)) >= step + 2, 300, "two steps after the resubmission")
        slurm.run("scancel", "--signal=USR1", "--batch", job)
        wait_until(lambda: "start 2," in log.read_text(), 300, "the requeued start")
        sent = signal_after_the_export(slurm, job, run)
        text = finished(slurm, job, run, log)
        assert sent >= 1 and f"job {job} requeued: it resumes" in text and "the requeue was refused" not in text
        assert f"resumed from {run}/checkpoints/step_{step:08d} at step {step}" in text
        assert len(stopped_at(text, "SIGUSR1")) == 1, text[-4000:]
        assert slurm.job_field(job, "ExitCode") == "0:0", text[-3000:]
    assert "Traceback" not in text
    # readable at scale: no library deprecation noise or loading bars, rank 1 silent but for its signal lines,
    # no carriage returns (a progress bar's) in the log file
    assert "Warning" not in text and "Loading weights" not in text and "INFO" not in re.sub(r"INFO addpipe\.[\w.]+: ", "", text)
    assert "\r" not in text and text.count("built successfully") <= text.count("=== addpipe train: job")
    assert all("received on rank 1" in line for line in text.splitlines() if "rank 1" in line), text[-4000:]
    same_as_reference(run, torchrun_reference(backend))


def test_slurm_train_survives_its_time_limit_by_requeueing(request, slurm, tmp_path):
    """A 2-minute limit, warned 30 s before (SLURM checks the limits every half minute or so, so the warning comes up
    to that much earlier), for a run that needs longer than that: each start ends in a checkpoint and a requeue, never in the
    limit's kill, until the run completes with every step logged once."""
    run = tmp_path / "run"
    steps = LONG_STEPS
    job, log = submit(slurm, tmp_path, settings(request, run, "fsdp2", steps=steps), "--time", "2:00",
                      "--signal-before", "30")
    text = finished(slurm, job, run, log, timeout=1200)
    assert "#SBATCH --signal=B:USR1@30" in (log.parent / f"train-{job}.sbatch").read_text()
    assert "stopped by SIGUSR1" in text and "start 2," in text, text[-4000:]
    assert "DUE TO TIME LIMIT" not in text and "Traceback" not in text, text[-4000:]
    assert logged_steps(run) == list(range(1, steps + 1))
    assert (run / "student" / "unet").is_dir()
