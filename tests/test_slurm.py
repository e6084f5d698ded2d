"""The SLURM glue that needs no cluster: ranks from SLURM's variables, time limits, and the rendered scripts."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from addpipe.slurm.submit import Allocation, SlurmError, render, seconds, signal_lead
from addpipe.train.distributed import first_host, from_slurm
from conftest import TINY_CONFIG, run_cli
from test_train import clean_env

ADDPIPE = [sys.executable, "-m", "addpipe.pipeline"]


def test_an_srun_task_takes_rank_world_and_rendezvous_from_slurm():
    step = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
            "SLURM_JOB_NODELIST": "gpu[007-010]", "SLURM_JOB_ID": "123456"}
    found = from_slurm(step)
    assert found == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu007", "MASTER_PORT": "23456"}
    # the step's own task count wins over the job's; a rendezvous the script exported is kept
    assert from_slurm({**step, "SLURM_STEP_NUM_TASKS": "4", "MASTER_ADDR": "h", "MASTER_PORT": "1"}) == \
        {"RANK": "5", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}
    # the batch script itself is no step of tasks: one process, whatever the job's task count
    assert from_slurm({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "1"}) == {}
    assert from_slurm({**step, "SLURM_STEP_ID": "batch"}) == {}


@pytest.mark.parametrize("nodelist, first", [("node7", "node7"), ("a[03-05,9],b1", "a03"), ("x1,x2", "x1"),
                                             ("gpu[12]", "gpu12")])
def test_the_first_host_of_a_node_list(nodelist, first, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # the list's own syntax, as where scontrol is missing
    assert first_host(nodelist) == first


@pytest.mark.parametrize("limit, expected", [("30", 1800), ("2:00", 120), ("48:00:00", 172800), ("1-12", 129600),
                                             ("1-0:30", 88200), ("2-00:00:30", 172830)])
def test_slurm_time_limits(limit, expected):
    assert seconds(limit) == expected


@pytest.mark.parametrize("limit", ["", "soon", "1:2:3:4", "0", "-5"])
def test_bad_time_limits_are_refused(limit):
    with pytest.raises(SlurmError, match="SLURM time|longer than zero"):
        seconds(limit)


def test_the_time_limit_warning_leaves_room_to_checkpoint():
    assert signal_lead(172800, None) == 600  # ten minutes before a long limit
    assert signal_lead(120, None) == 60 and signal_lead(3600, None) == 600 and signal_lead(1200, None) == 300
    assert signal_lead(120, 30) == 30
    with pytest.raises(SlurmError, match="between 0 and the time limit"):
        signal_lead(120, 120)


def test_rendering_replaces_the_templates_defaults(tmp_path):
    gpu = render("train.sbatch", Allocation(nodes=4, gpus_per_node=8, time="48:00:00", partition="gpu",
                                            log_dir=tmp_path, extra=["--qos=high"]), requeue_signal=True)
    lines = [line for line in gpu.splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --nodes=4" in lines and "#SBATCH --gpus-per-node=8" in lines and "#SBATCH --ntasks-per-node=8" in lines
    assert "#SBATCH --partition=gpu" in lines and "#SBATCH --signal=B:USR1@600" in lines and "#SBATCH --qos=high" in lines
    assert f"#SBATCH --output={tmp_path}/%x-%j.out" in lines and "#SBATCH --open-mode=append" in lines
    assert sum(line.startswith("#SBATCH --nodes") for line in lines) == 1  # replaced, not added beside
    assert f"ADDPIPE_PYTHON:-{sys.executable}" in gpu and "scontrol requeue" in gpu
    cpu = render("train.sbatch", Allocation(nodes=2, tasks_per_node=3, time="10:00", log_dir=tmp_path), requeue_signal=True)
    assert "#SBATCH --ntasks-per-node=3" in cpu and "#SBATCH --gpus-per-node" not in cpu and "#SBATCH --signal=B:USR1@150" in cpu
    # the script bash runs is the template's body: it parses
    path = tmp_path / "rendered.sbatch"
    path.write_text(gpu)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0


def test_slurm_train_dry_run_prints_the_script_and_submits_nothing(tmp_path):
    result = run_cli("slurm", "train", "--config", str(TINY_CONFIG), "--nodes", "2", "--gpus-per-node", "4", "--time",
                     "1:00:00", "--log-dir", str(tmp_path / "logs"), "--dry-run", "--zero", "3", "steps=10", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "#SBATCH --nodes=2" in result.stdout and "#SBATCH --gpus-per-node=4" in result.stdout
    assert result.stdout.rstrip().splitlines()[-1].endswith(f"{TINY_CONFIG} --zero 3 steps=10")
    assert not (tmp_path / "logs").exists()
    (tmp_path / "urls.parquet").write_bytes(b"")  # it must exist: a missing table is refused before sbatch
    prep = run_cli("slurm", "prep", "--urls", "urls.parquet", "--out", str(tmp_path / "out"), "--tasks", "3", "--dry-run",
                   "--set", "embed.batch_size=4", cwd=tmp_path)
    assert prep.returncode == 0, prep.stderr
    commands = [line for line in prep.stdout.splitlines() if line.startswith("sbatch ")]
    assert len(commands) == 3 and "--dependency=afterok:DOWNLOAD_JOB --kill-on-invalid-dep=yes" in commands[1]
    assert "--dependency=afterok:EMBED_JOB --kill-on-invalid-dep=yes" in commands[2]
    assert "#SBATCH --array=0-2" in prep.stdout and commands[1].endswith("--set embed.batch_size=4")
    # a dry run writes nothing, so it names no file in the log directory: the script printed, saved under a name
    for output in (result.stdout, prep.stdout):
        assert not re.search(re.escape(str(tmp_path / "logs")) + r"\S*\.sbatch", output) and "JOBID" not in output
    assert "# save the script above as prep_embed.sbatch" in prep.stdout and commands[1].startswith(
        "sbatch --parsable --dependency=afterok:DOWNLOAD_JOB --kill-on-invalid-dep=yes prep_embed.sbatch ")


@pytest.mark.parametrize("args, message", [
    (["--time", "soon"], "--time 'soon' is not a SLURM time"),
    (["--nodes", "0"], "--nodes must be at least 1"),
    (["--gpus-per-node", "-1"], "--gpus-per-node must be 0"),
])
def test_slurm_train_refuses_bad_allocations_clearly(tmp_path, args, message):
    result = run_cli("slurm", "train", "--config", str(TINY_CONFIG), *args, "--dry-run", cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_slurm_commands_off_a_cluster_say_so(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", f"{sys.executable.rsplit('/', 1)[0]}:/usr/bin/nonexistent")
    missing = run_cli("slurm", "train", "--config", str(tmp_path / "nope.yaml"), "--dry-run", cwd=tmp_path)
    assert missing.returncode == 2 and "config not found" in missing.stderr
    result = run_cli("slurm", "train", "--config", str(TINY_CONFIG), cwd=tmp_path)
    assert result.returncode == 2 and "sbatch not found" in result.stderr, result.stderr


def test_slurm_train_refuses_what_addpipe_train_refuses_before_submitting(tmp_path, monkeypatch):
    """A typo in an override or an option of `addpipe train` is refused in-process, with `addpipe train`'s own
    message, before sbatch (here there is none: the check must come first) and on a dry run."""
    monkeypatch.setenv("PATH", f"{sys.executable.rsplit('/', 1)[0]}:/usr/bin/nonexistent")
    direct = run_cli("train", "--config", str(TINY_CONFIG), "stepz=4", cwd=tmp_path)
    assert direct.returncode == 2 and "unknown config key stepz" in direct.stderr
    for dry in ([], ["--dry-run"]):
        result = run_cli("slurm", "train", "--config", str(TINY_CONFIG), *dry, "--zero", "3", "stepz=4", cwd=tmp_path)
        assert result.returncode == 2 and result.stderr == direct.stderr, result.stderr
        zero = run_cli("slurm", "train", "--config", str(TINY_CONFIG), *dry, "--zero", "7", cwd=tmp_path)
        assert zero.returncode == 2 and "engine.zero must be 0, 1, 2 or 3, got 7" in zero.stderr, zero.stderr
        option = run_cli("slurm", "train", "--config", str(TINY_CONFIG), *dry, "--zeroo", "3", cwd=tmp_path)
        assert option.returncode == 2 and "addpipe train would refuse these arguments: No such option: --zeroo" in \
            option.stderr and "Traceback" not in option.stderr
    assert not (tmp_path / "logs").exists()


def test_slurm_prep_refuses_a_missing_table_and_bad_settings_before_submitting(tmp_path):
    env = {**clean_env(), "PATH": f"{sys.executable.rsplit('/', 1)[0]}:/usr/bin/nonexistent"}
    base = ADDPIPE + ["slurm", "prep", "--out", str(tmp_path / "out"), "--dry-run"]
    missing = subprocess.run(base + ["--urls", str(tmp_path / "nope.parquet")], capture_output=True, text=True, env=env)
    assert missing.returncode == 2 and f"URL table not found: {tmp_path / 'nope.parquet'}" in missing.stderr
    (tmp_path / "urls.parquet").write_bytes(b"")
    typo = subprocess.run(base + ["--urls", str(tmp_path / "urls.parquet"), "--set", "embed.batch_sise=4"],
                          capture_output=True, text=True, env=env)
    assert typo.returncode == 2 and "unknown config key embed.batch_sise" in typo.stderr, typo.stderr


def test_requests_are_fitted_to_the_partition_as_sinfo_describes_it():
    from addpipe.slurm.submit import fit_cpus, parse_sinfo

    text = "n1|cpu*|2|(null)\nn2|cpu*|4|(null)\ng1|gpu|64|gpu:a100:8(S:0-1)\ng2|gpu|48|gpu:8\n"
    cpu, gpu = parse_sinfo(text, None), parse_sinfo(text, "gpu")
    assert (cpu.name, sorted(cpu.cpus), cpu.gpus) == ("cpu", [2, 4], [0, 0])
    assert (gpu.name, sorted(gpu.cpus), gpu.gpus) == ("gpu", [48, 64], [8, 8]) and parse_sinfo(text, "nope") is None
    notes: list[str] = []
    # the template's 16 CPUs fit no node of the cpu partition: cut to what one node has, and said
    assert fit_cpus("prep download", None, 16, 1, Allocation(), cpu, notes) == 4 and "asking for 4" in notes[0]
    assert fit_cpus("prep merge", None, 16, 1, Allocation(nodes=2), cpu, []) == 2  # two nodes: the smaller one's
    with pytest.raises(SlurmError, match="do not fit partition cpu, whose nodes have at most 4 CPUs"):
        fit_cpus("prep embed", 16, 8, 1, Allocation(), cpu, [])
    with pytest.raises(SlurmError, match="partition cpu has 2 node"):
        fit_cpus("train", None, None, 1, Allocation(nodes=3), cpu, [])
    with pytest.raises(SlurmError, match="has 0 node.* with 4 GPU"):
        fit_cpus("train", None, None, 4, Allocation(gpus_per_node=4), cpu, [])
    # training: the node's share per GPU, as `--help` promises
    assert fit_cpus("train", None, None, 8, Allocation(nodes=2, gpus_per_node=8), gpu, notes) == 6
    assert fit_cpus("train", None, None, 1, Allocation(), None, []) is None  # no sinfo: the template's


def test_a_signal_after_the_run_is_ignored_for_the_rest_of_the_process():
    """A time-limit SIGUSR1 during the exit of a finished run used to kill the task (exit 138: Python puts back the
    default action while it shuts down). Once the loop's scope ends, the command line's request ignores them."""
    import signal

    from addpipe.train.preemption import StopRequest

    previous = signal.getsignal(signal.SIGUSR1)
    request = StopRequest()
    try:
        with request:  # the command line's, held to the end of the process
            with request:  # the training loop's
                assert signal.getsignal(signal.SIGUSR1) == request._handle
            assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN and signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
            signal.raise_signal(signal.SIGUSR1)  # a no-op now, not the end of this process
            with request:  # a second run in the same process catches them again
                assert signal.getsignal(signal.SIGTERM) == request._handle
        assert signal.getsignal(signal.SIGUSR1) == previous
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_clip_scores_do_not_depend_on_batches_resume_points_or_threads(tmp_path):
    """A requeued embed task restarts its shard with other batch boundaries, maybe another embed.batch_size or
    thread count; its embeddings (and so the float16 files and every score) must be the same bits. Without the fixed
    forward shape, a batch of 8 differed from single images in the last bit of float32 (1 in 4 rows)."""
    import numpy as np
    import torch
    from PIL import Image

    from addpipe.clip import CPU_FORWARD_ROWS, EmbedConfig, load_clip
    from addpipe.dataprep.tiny import build_tiny_clip

    tiny = build_tiny_clip(tmp_path / "clip")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(21)]
    captions = [f"photo {i} of a {'very ' * (i % 6)}small thing" for i in range(21)]
    threads = torch.get_num_threads()
    try:
        results = []
        for batch_size, count, start in ((1, 1, 0), (64, 2, 0), (8, 1, 0), (5, 2, 0), (3, 1, 7), (16, 2, 13)):
            torch.set_num_threads(count)
            embedder = load_clip(EmbedConfig(model=tiny["model"], model_config=tiny["model_config"],
                                             pretrained=tiny["pretrained"], device="cpu", batch_size=batch_size))
            assert embedder.forward_rows == CPU_FORWARD_ROWS  # on the CPU, whatever embed.batch_size says
            chunks = range(start, len(images), batch_size)  # `start`: a task resumed part-way
            image = np.concatenate([embedder.images(images[i : i + batch_size]) for i in chunks])
            text = np.concatenate([embedder.texts(captions[i : i + batch_size]) for i in chunks])
            results.append((start, image, text))
    finally:
        torch.set_num_threads(threads)
    _, reference_image, reference_text = results[0]
    for start, image, text in results[1:]:
        assert np.array_equal(image, reference_image[start:]) and np.array_equal(text, reference_text[start:])


def test_the_native_op_cache_is_per_install_and_a_wait_on_its_lock_is_logged(tmp_path, caplog):
    """One cache per Python/torch/DeepSpeed version; a process that waits for another's build says whose, and
    keeps saying it; a lock file that torch's killed build left behind is removed (torch would wait forever)."""
    import fcntl
    import logging
    import threading

    import torch

    import os
    import time

    from addpipe.train.backends.deepspeed_ops import BUILD_LOCK, CACHE_ROOT, STALE_TORCH_LOCK, native_build_lock, native_ops_cache

    tag = native_ops_cache().name
    assert native_ops_cache().parent == CACHE_ROOT and f"torch{torch.__version__.split('+')[0]}" in tag
    assert f"py{sys.version_info.major}{sys.version_info.minor}" in tag and "deepspeed0." in tag
    cache = tmp_path / "cache"
    cache.mkdir()
    holder = open(cache / BUILD_LOCK, "a+")  # another process's build (a flock is per open file, like a process's)
    fcntl.flock(holder, fcntl.LOCK_EX)
    holder.write("host node7 pid 4242 rank 0 since 2026-12-03T10:00:00\n")
    holder.flush()
    entered = threading.Event()

    def build():
        with native_build_lock(cache, report_every=0.3):
            entered.set()
    caplog.set_level(logging.INFO, logger="addpipe.train.backends.deepspeed_ops")
    waiter = threading.Thread(target=build)
    waiter.start()
    try:
        assert not entered.wait(1.0)  # it waits ...
        waits = [r.getMessage() for r in caplog.records if "waiting" in r.getMessage()]
        assert len(waits) >= 2 and "host node7 pid 4242 rank 0" in waits[0] and str(cache) in waits[0]  # ... and says so
    finally:
        fcntl.flock(holder, fcntl.LOCK_UN)
        holder.close()
        waiter.join(10)
    assert entered.is_set() and any("is free after" in r.getMessage() for r in caplog.records)
    # torch's lock file: a build or load in progress (named, left), or left by a killed build: removed only in addpipe's
    # own cache and only when old
    (cache / "deepspeed_shm_comm").mkdir()
    (cache / "deepspeed_shm_comm" / "lock").touch()
    with native_build_lock(cache):
        pass
    assert (cache / "deepspeed_shm_comm" / "lock").exists() and "torch waits until it goes" in caplog.text
    old = time.time() - 2 * STALE_TORCH_LOCK
    os.utime(cache / "deepspeed_shm_comm" / "lock", (old, old))
    with native_build_lock(cache):  # still not ours to remove: this cache is not addpipe's own
        pass
    assert (cache / "deepspeed_shm_comm" / "lock").exists()


@pytest.mark.cluster
@pytest.mark.slow
def test_on_a_real_cluster_requests_fit_its_nodes_and_a_failed_stage_cancels_the_rest(slurm, tmp_path):
    """Against tests/slurm_cluster.py (two nodes of 2 CPUs): sinfo decides the CPUs (the templates' 16 and 8 would
    pend forever with PartitionConfig), and a download that fails makes SLURM cancel the embed array and the merge
    instead of leaving them pending forever (DependencyNeverSatisfied)."""
    env = {**clean_env(), "SLURM_CONF": str(slurm.conf)}
    urls = tmp_path / "urls.parquet"
    urls.write_bytes(b"not a table")  # exists, so it is submitted; the download job then fails at once
    base = ADDPIPE + ["slurm", "prep", "--urls", str(urls), "--out", str(tmp_path / "out"), "--log-dir", str(tmp_path / "logs")]
    dry = subprocess.run(base + ["--dry-run"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.count(f"#SBATCH --cpus-per-task={slurm.cpus}") == 3 and "--cpus-per-task=16" not in dry.stdout
    assert "the script asks for 16 CPUs per task" in dry.stderr and f"asking for {slurm.cpus}" in dry.stderr
    too_many = subprocess.run(base + ["--dry-run", "--cpus-per-task", "16"], capture_output=True, text=True, env=env)
    assert too_many.returncode == 2 and "PartitionConfig" in too_many.stderr, too_many.stderr
    train = subprocess.run(ADDPIPE + ["slurm", "train", "--config", str(TINY_CONFIG), "--nodes", "2", "--dry-run"],
                           capture_output=True, text=True, env=env, cwd=tmp_path)
    assert train.returncode == 0 and f"#SBATCH --cpus-per-task={slurm.cpus}" in train.stdout, train.stderr
    three = subprocess.run(ADDPIPE + ["slurm", "train", "--config", str(TINY_CONFIG), "--nodes", "3", "--dry-run"],
                           capture_output=True, text=True, env=env, cwd=tmp_path)
    assert three.returncode == 2 and "has 2 node(s), the job asks for 3" in three.stderr, three.stderr
    result = subprocess.run(base + ["--tasks", "2", "--cpus-per-task", "1"], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    download, embed, merge = (result.stdout.split("submitted download ")[1].replace(" -> embed array ", " ")
                              .replace(" -> merge ", " ").replace("(2 tasks)", "").split(";")[0].split())
    assert slurm.wait_job(download, 300) == "FAILED"
    for job in (f"{embed}_0", f"{embed}_1", merge):
        assert slurm.wait_job(job, 120) == "CANCELLED", (job, slurm.job_field(job, "Reason"))


def test_loading_clip_logs_nothing_on_the_root_logger(tmp_path):
    """open_clip's `INFO root: ...` lines (config, tokenizer) stayed in every prep log."""
    from addpipe.dataprep.tiny import build_tiny_clip

    tiny = build_tiny_clip(tmp_path / "clip")
    script = ("import logging; logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')\n"
              "from addpipe.clip import EmbedConfig, load_clip\n"
              f"load_clip(EmbedConfig(model={tiny['model']!r}, model_config={tiny['model_config']!r}, "
              f"pretrained={tiny['pretrained']!r}, device='cpu'))\nlogging.info('after')\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=clean_env())
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("INFO root")] == ["INFO root: after"], result.stderr
