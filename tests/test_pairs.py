"""`addpipe pairs` (Diffusion2GAN's ODE pairs) on tiny SD- and SDXL-style teachers: each stored latent is the
teacher's DDIM sample from the stored noise (checked against the update rule written out by hand, and against
diffusers' own SDXL pipeline given the prompt), any split over tasks and ranks writes the same files as one worker,
a killed run resumes without losing or repeating a pair, and every prompt is accounted for."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from addpipe.config import load
from addpipe.tables import InputError
from addpipe.train.config import TrainConfig
from conftest import TINY_D2G_CONFIG
from test_train import clean_env

PROMPTS = ["a handwritten seven in red on a blue background", "a handwritten two in white on a black background",
           "", "a handwritten one in green on a white background", "a handwritten zero in blue on a red background"]


def settings(teacher: Path, **extra) -> list[str]:
    values = {"model.teacher": str(teacher), "data.resolution": 16, "pairs.steps": 5, "pairs.guidance": 3.0,
              "pairs.samples_per_shard": 2, "pairs.batch_size": 2, **extra}
    return [f"{k}={v}" for k, v in values.items()]


def config(teacher: Path, **extra) -> TrainConfig:
    return load(TrainConfig, TINY_D2G_CONFIG, settings(teacher, **extra))


@pytest.fixture
def prompts(tmp_path) -> Path:
    path = tmp_path / "prompts.parquet"
    import pandas as pd

    pd.DataFrame({"caption": PROMPTS, "other": range(len(PROMPTS))}).to_parquet(path)
    return path


def read_pairs(out: Path) -> dict[int, dict[str, np.ndarray | str]]:
    found = {}
    for tar in sorted(out.glob("*.tar")):
        for sample in wds.tarfile_samples([{"url": str(tar)}]):
            index = json.loads(sample["json"])["index"]
            assert index not in found, f"pair {index} stored twice"
            found[index] = {key: np.load(io.BytesIO(sample[key])) for key in
                            ("noise.npy", "latents.npy", "prompt_embeds.npy", "pooled_embeds.npy")}
            found[index]["txt"] = sample["txt"].decode()
    return found


def files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_stored_latents_are_the_teachers_ddim_samples_with_guidance(tiny_sd, prompts, tmp_path):
    """The DDIM update with classifier-free guidance, written out: eps = eps_u + g (eps_c - eps_u),
    x0 = (x - sqrt(1 - a_t) eps) / sqrt(a_t), x <- sqrt(a_prev) x0 + sqrt(1 - a_prev) eps."""
    from diffusers import DDIMScheduler

    from addpipe.train.models import encode_prompts, load_teacher, unconditional
    from addpipe.train.methods.diffusion2gan.pairs import collect_pairs, pair_noise

    cfg = config(tiny_sd)
    counts = collect_pairs(cfg, str(prompts), str(tmp_path / "out"), progress=False)
    assert counts == {"prompts": 5, "shards": 3, "worker_shards": 3, "reused_shards": 0, "written_shards": 3,
                      "pairs": 4, "skipped": 1, "complete": True, "total_pairs": 4, "total_skipped": 1}
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary == {"prompts": 5, "pairs": 4, "skipped": 1, "skipped_by_reason": {"empty prompt": 1}, "shards": 3}
    stored = read_pairs(tmp_path / "out")
    assert sorted(stored) == [0, 1, 3, 4]  # the empty prompt is not sampled ...
    receipt = json.loads((tmp_path / "out" / "00001.json").read_text())
    assert receipt["skipped"] == {"2": "empty prompt"} and receipt["pairs"] == 1  # ... and is accounted for

    teacher = load_teacher(cfg.model)
    # The ODE starts where the one-step generator reads its noise, T-1 (Diffusion2GAN's timesteps, as its export
    # records them); the teacher's own "leading" spacing would have started at 801 (981 at 50 steps).
    scheduler = DDIMScheduler.from_config(teacher.scheduler_config, timestep_spacing="trailing")
    scheduler.set_timesteps(5)
    assert scheduler.timesteps.tolist() == [999, 799, 599, 399, 199]
    leading = DDIMScheduler.from_config(teacher.scheduler_config)
    leading.set_timesteps(5)
    assert teacher.scheduler_config["timestep_spacing"] == "leading" and leading.timesteps[0] == 801
    from addpipe.train.methods.diffusion2gan.pairs import ode_scheduler

    assert ode_scheduler(teacher.scheduler_config, 5).timesteps.tolist() == scheduler.timesteps.tolist()
    assert json.loads((tmp_path / "out" / "pairs.json").read_text())["signature"]["timestep_spacing"] == "trailing"
    alphas = scheduler.alphas_cumprod
    step = scheduler.config.num_train_timesteps // 5
    empty = unconditional(teacher, "cpu").hidden_states
    for index, pair in stored.items():
        assert pair["txt"] == PROMPTS[index]
        noise = pair_noise(0, index, tuple(pair["noise.npy"].shape))
        assert noise.shape == (4, 8, 8)  # the tiny VAE halves 16 px
        torch.testing.assert_close(torch.from_numpy(pair["noise.npy"]), noise)
        text = encode_prompts(teacher, [PROMPTS[index]], "cpu").hidden_states
        torch.testing.assert_close(torch.from_numpy(pair["prompt_embeds.npy"]), text[0])
        x = noise[None]
        with torch.no_grad():
            for t in scheduler.timesteps.tolist():
                eps_u = teacher.unet(x, t, encoder_hidden_states=empty).sample
                eps_c = teacher.unet(x, t, encoder_hidden_states=text).sample
                eps = eps_u + 3.0 * (eps_c - eps_u)
                a_t = alphas[t]
                a_prev = alphas[t - step] if t - step >= 0 else scheduler.final_alpha_cumprod
                x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
                x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        torch.testing.assert_close(torch.from_numpy(pair["latents.npy"]), x[0], atol=5e-5, rtol=1e-4)
    # another prompt's noise differs; the same (seed, index) draws the same noise anywhere
    assert not torch.equal(pair_noise(0, 0, (4, 2, 2)), pair_noise(0, 1, (4, 2, 2)))
    assert not torch.equal(pair_noise(0, 0, (4, 2, 2)), pair_noise(1, 0, (4, 2, 2)))


def test_sdxl_pairs_equal_diffusers_own_pipeline_given_the_prompt(tiny_sdxl, tmp_path):
    """Stored text embeddings are what the SDXL pipeline computes itself from the prompt (both encoders, zeros for
    the unconditional branch, the size conditioning of an uncropped image at the training resolution)."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    from addpipe.train.methods.diffusion2gan.pairs import collect_pairs

    (tmp_path / "p.txt").write_text("\n".join(PROMPTS[:2]) + "\n")
    collect_pairs(config(tiny_sdxl), str(tmp_path / "p.txt"), str(tmp_path / "out"), progress=False)
    stored = read_pairs(tmp_path / "out")
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    pipe.set_progress_bar_config(disable=True)
    for index in (0, 1):
        theirs = pipe(PROMPTS[index], latents=torch.from_numpy(stored[index]["noise.npy"])[None], num_inference_steps=5,
                      guidance_scale=3.0, height=16, width=16, output_type="latent").images[0]
        torch.testing.assert_close(torch.from_numpy(stored[index]["latents.npy"]), theirs, atol=1e-5, rtol=1e-4)


def test_any_split_over_tasks_and_ranks_writes_the_same_files(tiny_sd, prompts, tmp_path, monkeypatch):
    from addpipe.train.methods.diffusion2gan.pairs import collect_pairs

    cfg = config(tiny_sd)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    collect_pairs(cfg, str(prompts), str(tmp_path / "one"), progress=False)
    for task in (1, 0):  # two array tasks, in either order: the last to finish sums the set up
        counts = collect_pairs(cfg, str(prompts), str(tmp_path / "tasks"), task=task, tasks=2, progress=False)
        assert counts["worker_shards"] == (2 if task == 0 else 1) and counts["complete"] is (task == 0)
    monkeypatch.setenv("WORLD_SIZE", "3")  # three ranks of one task
    for rank in (2, 0, 1):
        monkeypatch.setenv("RANK", str(rank))
        assert collect_pairs(cfg, str(prompts), str(tmp_path / "ranks"), progress=False)["worker_shards"] == 1
    assert files(tmp_path / "one") == files(tmp_path / "tasks") == files(tmp_path / "ranks")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    again = collect_pairs(cfg, str(prompts), str(tmp_path / "one"), progress=False)
    assert again["reused_shards"] == 3 and again["written_shards"] == 0  # a rerun does nothing
    with pytest.raises(ValueError, match="--task 2 is not in 0..1"):
        collect_pairs(cfg, str(prompts), str(tmp_path / "bad"), task=2, tasks=2)


@pytest.mark.slow
def test_a_killed_pair_run_resumes_without_losing_or_repeating_a_pair(tiny_sd, tmp_path):
    lines = [f"a handwritten {i % 10} in red on a blue background" for i in range(24)]
    (tmp_path / "p.txt").write_text("\n".join(lines) + "\n")
    command = [sys.executable, "-m", "addpipe.pipeline", "pairs", "-c", str(TINY_D2G_CONFIG), "--prompts",
               str(tmp_path / "p.txt"), *settings(tiny_sd, **{"pairs.samples_per_shard": 3, "pairs.steps": 12})]
    from addpipe.train.methods.diffusion2gan.pairs import collect_pairs

    whole = collect_pairs(load(TrainConfig, TINY_D2G_CONFIG, command[command.index("--prompts") + 2:]), str(tmp_path / "p.txt"),
                          str(tmp_path / "whole"), progress=False)  # in this process: the reference, uninterrupted
    assert whole["pairs"] == 24 and whole["written_shards"] == 8
    killed = subprocess.Popen(command + ["--out", str(tmp_path / "killed")], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=clean_env())
    deadline = time.monotonic() + 300
    while len(list((tmp_path / "killed").glob("*.json"))) < 3 and time.monotonic() < deadline:  # manifest + 2 receipts
        time.sleep(0.05)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    done = len(list((tmp_path / "killed").glob("0*.json")))
    assert 2 <= done < 8, f"{done} shards were receipted before the kill"
    resumed = subprocess.run(command + ["--out", str(tmp_path / "killed")], capture_output=True, text=True,
                             env=clean_env(), timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{done} shard(s) already done" in resumed.stdout
    assert "the set is complete: 24 pairs + 0 skipped = 24 prompts" in resumed.stdout
    left = {name: data for name, data in files(tmp_path / "killed").items() if not name.endswith(".tmp")}
    assert left == files(tmp_path / "whole")  # byte for byte: nothing repeated, nothing lost
    assert sorted(read_pairs(tmp_path / "killed")) == list(range(24))


def test_bad_prompt_tables_and_a_different_set_are_refused_by_name(tiny_sd, prompts, tmp_path):
    from addpipe.train.methods.diffusion2gan.pairs import collect_pairs

    with pytest.raises(InputError, match="has no column 'prompt'; its columns are: caption, other"):
        collect_pairs(config(tiny_sd, **{"pairs.prompt_column": "prompt"}), str(prompts), str(tmp_path / "o"))
    with pytest.raises(InputError, match="does not exist"):
        collect_pairs(config(tiny_sd), str(tmp_path / "nope.parquet"), str(tmp_path / "o"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(InputError, match="is empty"):
        collect_pairs(config(tiny_sd), str(tmp_path / "empty.txt"), str(tmp_path / "o"))
    collect_pairs(config(tiny_sd), str(prompts), str(tmp_path / "set"), progress=False)
    with pytest.raises(InputError, match=r"holds ODE pairs of another set \(signature: .*'guidance': 3.0.*'guidance': 5.0"):
        collect_pairs(config(tiny_sd, **{"pairs.guidance": 5.0}), str(prompts), str(tmp_path / "set"))
    result = subprocess.run([sys.executable, "-m", "addpipe.pipeline", "pairs", "-c", str(TINY_D2G_CONFIG), "--prompts",
                             str(prompts), "--out", str(tmp_path / "set"), *settings(tiny_sd, **{"pairs.steps": 7})],
                            capture_output=True, text=True, env=clean_env(), timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr and "another set" in result.stderr, result.stderr


@pytest.mark.cluster
@pytest.mark.slow
def test_slurm_pairs_array_with_a_requeued_task_equals_one_local_worker(tiny_sd, slurm, tmp_path):
    """`addpipe slurm pairs --tasks 2` on the two-node cluster, task 1 requeued after its first shard: the files are
    the ones a single local worker writes."""
    from addpipe.train.methods.diffusion2gan.pairs import collect_pairs

    lines = [f"a handwritten {i % 10} in white on a black background" for i in range(16)]
    (tmp_path / "p.txt").write_text("\n".join(lines) + "\n")
    overrides = settings(tiny_sd, **{"pairs.steps": 25})
    collect_pairs(load(TrainConfig, TINY_D2G_CONFIG, overrides), str(tmp_path / "p.txt"), str(tmp_path / "local"),
                  progress=False)
    out, logs = tmp_path / "cluster", tmp_path / "logs"
    result = subprocess.run([sys.executable, "-m", "addpipe.pipeline", "slurm", "pairs", "--config", str(TINY_D2G_CONFIG),
                             "--prompts", str(tmp_path / "p.txt"), "--out", str(out), "--tasks", "2",
                             "--cpus-per-task", "1", "--log-dir", str(logs), *overrides],
                            capture_output=True, text=True, env={**clean_env(), "SLURM_CONF": str(slurm.conf)},
                            cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    job = result.stdout.split("submitted pairs array ")[1].split()[0]
    deadline = time.monotonic() + 600
    while not (out / "00001.json").exists():  # task 1's first shard (1, 3, 5, 7 are its)
        assert time.monotonic() < deadline, "\n".join(p.read_text()[-3000:] for p in logs.glob("*.out"))
        time.sleep(0.05)
    state = slurm.job_state(f"{job}_1")
    slurm.run("scontrol", "requeue", f"{job}_1")
    assert state == "RUNNING", f"task 1 was {state} when requeued: it must be cut off mid-way"
    for task in (0, 1):
        assert slurm.wait_job(f"{job}_{task}", 600) == "COMPLETED", "\n".join(p.read_text()[-3000:] for p in logs.glob("*.out"))
    assert int(slurm.job_field(f"{job}_1", "Restarts") or 0) >= 1
    assert files(out) == files(tmp_path / "local")
