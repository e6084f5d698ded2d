"""What an interrupted or misused training run must survive: kill -9 and resume (metrics logged once, averaged
right), a changed learning rate on resume, a damaged newest checkpoint, a second trainer on the same run
directory, a launcher killed under its workers, and user mistakes that must end as clear errors (exit 2)."""

from __future__ import annotations

import json
import re
import logging
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from addpipe.config import load
from addpipe.train.config import TrainConfig
from conftest import TINY_CONFIG, tiny_overrides, run_cli
from test_train import clean_env, unet_weights

ADDPIPE = [sys.executable, "-m", "addpipe.pipeline"]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def overrides(request, run: Path, **extra) -> list[str]:
    return tiny_overrides(request.getfixturevalue("tiny_sd"), request.getfixturevalue("tiny_dino"),
                          request.getfixturevalue("digit_shards"), run, **extra)


def wait_for(condition, timeout: float, what: str, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def logged_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except json.JSONDecodeError:
            pass
    return steps


@pytest.mark.slow
def test_kill_9_and_resume_logs_every_step_once_with_the_uninterrupted_averages(request, tmp_path):
    """Log windows of 2 steps, checkpoints every 3: the run is killed after logging step 4, so its newest checkpoint
    (step 3) sits inside a window. The resumed run trims the lines after step 3, and the window ending at step 4
    averages steps 3 and 4 as the uninterrupted run does, because the log accumulator was checkpointed."""
    from addpipe.train.loop import train

    settings = {"steps": 10, "checkpoint.every": 3, "checkpoint.keep_last": 5, "log.every": 2}
    whole = tmp_path / "whole"  # the reference and the resume in this process: only the kill needs its own
    train(load(TrainConfig, TINY_CONFIG, overrides(request, whole, **settings)))

    split = tmp_path / "split"
    command = ADDPIPE + ["train", "-c", str(TINY_CONFIG), *overrides(request, split, **settings)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=clean_env())
    try:
        wait_for(lambda: 4 in logged_steps(split) or process.poll() is not None, 300, "step 4 in metrics.jsonl")
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
    assert (split / "checkpoints" / "latest").read_text() == "step_00000003", "killed too late to test a spanned window"
    assert 4 in logged_steps(split)  # logged after the checkpoint: must not appear twice

    train(load(TrainConfig, TINY_CONFIG, overrides(request, split, **settings)), resume=True)
    resumed, reference = metrics(split), metrics(whole)
    assert [r["step"] for r in resumed] == [r["step"] for r in reference] == [2, 4, 6, 8, 10]
    for a, b in zip(resumed, reference):
        for term in ("loss/generator_adversarial", "loss/distillation", "loss/discriminator_real", "loss/r1", "lr/student"):
            assert a[term] == pytest.approx(b[term], rel=1e-4, abs=1e-7), (a["step"], term)


@pytest.fixture(scope="module")
def uninterrupted_8_steps(request, tmp_path_factory):
    """Eight steps in one go (in this process: the run's weights do not depend on where they are computed)."""
    from addpipe.train.loop import train

    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    train(load(TrainConfig, TINY_CONFIG, overrides(request, run, steps=8, **{"log.every": 1})))
    return run


@pytest.mark.parametrize("signal_number, every, repeats", [
    (signal.SIGTERM, 1000, 1),
    (signal.SIGUSR1, 1, 3),  # a checkpoint written every step: the signals land in writes, and come again
], ids=["SIGTERM", "SIGUSR1-thrice-during-checkpoint-writes"])
@pytest.mark.slow
def test_a_stop_signal_checkpoints_the_step_exits_75_and_resume_equals_the_uninterrupted_run(request, tmp_path,
                                                                                            uninterrupted_8_steps,
                                                                                            signal_number, every, repeats):
    """Outside SLURM too: the step in progress finishes, is logged and checkpointed; nothing after it runs."""
    from addpipe.train.loop import train
    from addpipe.train.preemption import REQUEUE_EXIT

    settings = {"steps": 8, "log.every": 1, "checkpoint.every": every, "checkpoint.keep_last": 20}
    split = tmp_path / "split"
    command = ADDPIPE + ["train", "-c", str(TINY_CONFIG), *overrides(request, split, **settings)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
    try:
        wait_for(lambda: len(logged_steps(split)) >= 2 or process.poll() is not None, 300, "two logged steps")
        for _ in range(repeats):
            process.send_signal(signal_number)
            time.sleep(0.05)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == REQUEUE_EXIT, stderr[-3000:]
    step = logged_steps(split)[-1]
    assert 2 <= step < 8 and (split / "checkpoints" / "latest").read_text() == f"step_{step:08d}"
    assert not list((split / "checkpoints").glob(".*.tmp"))  # no write left half-done
    assert f"stopped by {signal.Signals(signal_number).name} at step {step}; checkpoint" in stderr
    assert "Traceback" not in stderr
    train(load(TrainConfig, TINY_CONFIG, overrides(request, split, **settings)), resume=True)  # in this process
    assert logged_steps(split) == list(range(1, 9))
    a, b = unet_weights(split / "student"), unet_weights(uninterrupted_8_steps / "student")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_changed_learning_rate_on_resume_is_used_and_recorded(request, tmp_path, caplog):
    from addpipe.train.loop import Trainer, train

    run = tmp_path / "run"
    train(load(TrainConfig, TINY_CONFIG, overrides(request, run, steps=2, **{"optim.student_lr": 5e-5})))
    config = load(TrainConfig, TINY_CONFIG, overrides(request, run, steps=3, **{"optim.student_lr": 1e-5,
                                                                                "optim.discriminator_lr": 1e-3}))
    with caplog.at_level(logging.WARNING):
        trainer = Trainer(config, resume=True)
    warmup = config.optim.warmup_steps
    expected = 1e-5 * min(1.0, (trainer.step + 1) / warmup)  # the schedule's factor at the resumed step
    assert trainer.step == 2
    for group in trainer.models['student'].engine.optimizer.param_groups:
        assert group["lr"] == pytest.approx(expected) and group["initial_lr"] == 1e-5
    assert trainer.models["discriminator"].engine.optimizer.param_groups[0]["initial_lr"] == 1e-3
    assert "optim.student_lr changed since step_00000002: 5e-05 -> 1e-05; the new value is used" in caplog.text
    assert "student_lr: 1.0e-05" in (run / "config.yaml").read_text()
    trainer.run()
    step3 = metrics(run)[-1]
    # reported after the step: the rate the schedule set for the next one, scaled from the new base
    assert step3["step"] == 3 and step3["lr/student"] == pytest.approx(1e-5 * min(1.0, 4 / warmup))

    # A resume that is refused (another teacher architecture: the checkpoint's tensors do not fit) names the first
    # tensor that does not fit and leaves config.yaml as the run that trained wrote it.
    recorded = (run / "config.yaml").read_text()
    refused = run_cli("train", "-c", str(TINY_CONFIG), "--resume",
                  *overrides(request, run, steps=4, **{"model.teacher": request.getfixturevalue("tiny_sdxl")}))
    assert refused.returncode == 2 and re.search(r"does not fit this model: .*student\.model\.", refused.stderr), refused.stderr[-2000:]
    assert "Traceback" not in refused.stderr and (run / "config.yaml").read_text() == recorded


@pytest.mark.slow
def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_one(request, tmp_path, caplog):
    from addpipe.train.loop import train

    settings = {"checkpoint.every": 2, "checkpoint.keep_last": 3}
    whole = train(load(TrainConfig, TINY_CONFIG, overrides(request, tmp_path / "whole", steps=6, **settings)))
    run = tmp_path / "run"
    train(load(TrainConfig, TINY_CONFIG, overrides(request, run, steps=4, **settings)))
    damaged = run / "checkpoints" / "step_00000004" / "state" / "__0_0.distcp"
    damaged.write_bytes(damaged.read_bytes()[:1000])  # a copy cut short
    with caplog.at_level(logging.WARNING):
        resumed = train(load(TrainConfig, TINY_CONFIG, overrides(request, run, steps=6, **settings)), resume=True)
    assert f"checkpoint {run / 'checkpoints' / 'step_00000004'} is damaged: {damaged} is 1000 bytes" in caplog.text
    a, b = unet_weights(whole), unet_weights(resumed)
    for key in a:  # resumed from step 2, the result is the uninterrupted run's
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4, msg=key)
    assert [m["step"] for m in metrics(run)] == [1, 2, 3, 4, 5, 6]

    # Nothing intact left: garbage of the recorded size passes the size check and fails the checksum; a clear error
    # naming every checkpoint tried, through the CLI too.
    for path in (run / "checkpoints").glob("step_*/state/__0_0.distcp"):
        path.write_bytes(bytes(path.stat().st_size))
    result = run_cli("train", "-c", str(TINY_CONFIG), "--resume", *overrides(request, run, steps=8, **settings))
    assert result.returncode == 2 and "could be resumed" in result.stderr, result.stderr[-2000:]
    assert "step_00000006" in result.stderr and "step_00000002" in result.stderr
    assert "its bytes changed after the save" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_one_trainer_per_run_directory(request, tmp_path):
    """A second trainer is refused while the first holds the run directory; once the holder dies (kill -9), the OS
    has dropped its lock and a trainer can start."""
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from addpipe.train.rundir import RunDirLock; "
                               "RunDirLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(600)", str(run)],
                              stdout=subprocess.PIPE, text=True, env=clean_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        refused = run_cli("train", "-c", str(TINY_CONFIG), *overrides(request, run, steps=1))
        assert refused.returncode == 2 and f"another trainer (pid {holder.pid} on" in refused.stderr, refused.stderr[-2000:]
        assert str(run) in refused.stderr and not (run / "config.yaml").exists() and not (run / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    started = run_cli("train", "-c", str(TINY_CONFIG), *overrides(request, run, steps=1))
    assert started.returncode == 0, started.stderr[-2000:]
    assert (run / "checkpoints" / "latest").read_text() == "step_00000001"
    again = run_cli("train", "-c", str(TINY_CONFIG), *overrides(request, run, steps=2))  # no --resume
    assert again.returncode == 2 and "already holds checkpoints" in again.stderr and "--resume" in again.stderr


def test_a_non_finite_loss_ends_as_a_clear_error(request, tmp_path):
    nan = run_cli("train", "-c", str(TINY_CONFIG), *overrides(request, tmp_path / "nan", steps=3, **{"distill.weight": ".nan"}))
    assert nan.returncode == 2 and "error: non-finite loss at step 1" in nan.stderr and "Traceback" not in nan.stderr


@pytest.mark.slow  # a subprocess
@pytest.mark.parametrize("limit, expected", [(0, "cannot write {run}/.lock: File too large"),
                                             (200_000, "saving checkpoint step 2 failed: cannot write {run}/checkpoints/")])
def test_a_full_run_directory_is_named_not_a_traceback(request, tmp_path, limit, expected):
    """RLIMIT_FSIZE makes every write past `limit` bytes fail with EFBIG, as a full disk fails them, also for root
    (who ignores a read-only mode). No file at all: the run directory is refused at once; small files only: the
    first checkpoint cannot be saved (torch.save's own message for it is cryptic: a hint is added)."""
    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    run = tmp_path / "run"
    result = subprocess.run(ADDPIPE + ["train", "-c", str(TINY_CONFIG), *overrides(request, run, steps=2)],
                            capture_output=True, text=True, env=clean_env(), preexec_fn=small_files, timeout=600)
    assert result.returncode == 2, result.stderr[-3000:]
    assert expected.format(run=run) in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_workers_die_with_a_killed_torchrun_and_free_the_run_directory(request, tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "addpipe.pipeline", "train", "-c", str(TINY_CONFIG),
               *overrides(request, run, steps=500, **{"data.batch_size": 4})]
    launcher = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=clean_env(),
                                start_new_session=True)

    def workers() -> list[int]:
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != launcher.pid:
                try:
                    cmdline = (entry / "cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                if str(run).encode() in b" ".join(cmdline) and b"torch.distributed.run" not in cmdline[1:3]:
                    found.append(int(entry.name))
        return found

    try:
        wait_for(lambda: logged_steps(run), 600, "the first logged step", interval=0.5)
        assert len(workers()) >= 2
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
        wait_for(lambda: not workers(), 30, "the workers to exit after their launcher", interval=0.2)
    finally:
        for pid in workers():
            os.kill(pid, signal.SIGKILL)
        if launcher.poll() is None:
            launcher.kill()
    from addpipe.train.rundir import RunDirError, RunDirLock

    def free() -> bool:  # an exiting process drops its memory (and cmdline) a moment before its files
        try:
            RunDirLock(run).acquire().release()
            return True
        except RunDirError:
            return False

    wait_for(free, 10, "the run directory's lock to be released", interval=0.1)
