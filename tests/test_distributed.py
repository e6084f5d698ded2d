"""Both backends on one and two CPU processes (gloo) against a plain-PyTorch reference of the same ADD steps, and
checkpoints that reshard: saved on W ranks, resumed on W' ranks or on the other backend."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_CONFIG, tiny_overrides, torchrun_batch
from test_train import clean_env

WORKER = Path(__file__).with_name("dist_worker.py")
TERMS = ("loss/generator_adversarial", "loss/distillation", "loss/discriminator_real", "loss/discriminator_fake", "loss/r1")


def run_worker(mode, processes, report, overrides, resume=False):
    """The worker under torchrun, or, for one process, in this process (a second's start instead of twenty)."""
    if mode == "train" and processes == 1:
        import dist_worker

        from addpipe.config import load
        from addpipe.train.config import TrainConfig

        return dist_worker.train(load(TrainConfig, TINY_CONFIG, overrides), resume)
    if mode == "reference":
        command = [sys.executable, str(WORKER), "reference", str(TINY_CONFIG), str(report), *overrides]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                   str(WORKER), "train", str(TINY_CONFIG), str(report), *overrides] + (["--resume"] if resume else [])
    result = subprocess.run(command, capture_output=True, text=True, env=clean_env(), timeout=900, cwd=Path(__file__).parent)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return json.loads(report.read_text())


def layout(processes):
    """Global batch 4 in two streams either way: one rank with two, or two ranks with one each. Local batch norm
    groups of 2 keep each stream's samples in their own group in both layouts."""
    return {"data.batch_size": 4 // processes, "data.num_workers": 2 // processes}


# The plain-PyTorch reference (dist_worker.py) builds heads without spectral norm: compare like with like.
COMMON = {"discriminator.virtual_batch_size": 2, "student.backward_simulation": 0.5, "log.every": 1,
          "discriminator.spectral_norm": "false"}


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def student_weights(run, folder="unet"):
    return load_file(str(next((run / "student" / folder).glob("*.safetensors"))))


@pytest.fixture(scope="module")
def reference(tiny_sd, tiny_dino, digit_shards, tmp_path_factory):
    directory = tmp_path_factory.mktemp("reference")
    overrides = tiny_overrides(tiny_sd, tiny_dino, digit_shards, directory / "run", steps=3, **COMMON, **layout(1))
    return run_worker("reference", 1, directory / "report.json", overrides)


MATCH = [
    ("deepspeed", 1, {"engine.zero": 2}),
    ("deepspeed", 2, {"engine.zero": 3, "model.frozen_placement": "partition"}),
    ("fsdp2", 1, {}),
    # activation checkpointing recomputes the same values: FSDP2 with it still matches the reference without it
    ("fsdp2", 2, {"model.frozen_placement": "partition", "model.gradient_checkpointing": True}),
]
RESHARD = [
    (("deepspeed", 2), ("deepspeed", 1)),
    (("deepspeed", 1), ("deepspeed", 2)),
    (("fsdp2", 2), ("fsdp2", 1)),
    (("fsdp2", 1), ("fsdp2", 2)),
    (("deepspeed", 2), ("fsdp2", 1)),
    (("fsdp2", 2), ("deepspeed", 2)),
]
# The EMA by half-life: its images are counted from the step and the global batch, the same on 1 or 2 ranks.
RESHARD_COMMON = {**COMMON, "optim.ema_decay": 0, "optim.ema_halflife_kimg": 0.02, "checkpoint.every": 2,
                  "engine.zero": 3}


# A flow-matching SD3 teacher (tests/test_flow.py): the same ADD steps on one rank and on two, on each backend.
SD3 = {"deepspeed": {"engine.zero": 3}, "fsdp2": {"model.frozen_placement": "partition"}}


def match_overrides(tiny_sd, tiny_dino, digit_shards, run, backend, processes, extra):
    return tiny_overrides(tiny_sd, tiny_dino, digit_shards, run, steps=3, **COMMON, **layout(processes),
                          **{"engine.backend": backend, **extra})


@pytest.fixture(scope="module")
def runs(tiny_sd, tiny_sd3, tiny_dino, digit_shards, tmp_path_factory):
    """Every training run of this module: the one-rank ones in this process, all the two-rank ones in a single torchrun
    launch (one start-up instead of seven). -> {key: (run directory, report)}; the keys: ("match", backend,
    processes), ("first", backend, processes) (steps 1-2 of the resharding runs), ("resume", first, second)
    (steps 3-4 from a copy of that first half) and "whole" (steps 1-4 uninterrupted)."""
    root = tmp_path_factory.mktemp("runs")

    def reshard(run, steps, backend, processes):
        return tiny_overrides(tiny_sd, tiny_dino, digit_shards, run, steps=steps, **RESHARD_COMMON, **layout(processes),
                              **{"engine.backend": backend})

    found, jobs = {}, []

    def plan(key, run, overrides, processes, resume=False, copy=None):
        report = root / f"{run.name}.json"
        found[key] = (run, report)
        if processes == 2:
            jobs.append({"report": report, "overrides": overrides, "resume": resume, "copy": copy})
        else:
            if copy:
                import shutil

                shutil.copytree(*copy)
            report.write_text(json.dumps(run_worker("train", 1, report, overrides, resume=resume)))

    for backend, processes, extra in MATCH:
        run = root / f"match-{backend}-{processes}"
        plan(("match", backend, processes), run, match_overrides(tiny_sd, tiny_dino, digit_shards, run, backend,
                                                                 processes, extra), processes)
    plan("whole", root / "whole", reshard(root / "whole", 4, "fsdp2", 1), 1)
    for backend, extra in SD3.items():
        for processes in (1, 2):
            run = root / f"sd3-{backend}-{processes}"
            plan(("sd3", backend, processes), run, tiny_overrides(
                tiny_sd3, tiny_dino, digit_shards, run, steps=2, **COMMON, **layout(processes),
                **{"engine.backend": backend, "student.num_timesteps": 2, **extra}), processes)
    firsts = sorted({first for first, _ in RESHARD}, key=lambda layout_: layout_[1])  # one-rank halves first
    for backend, processes in firsts:
        run = root / f"first-{backend}-{processes}"
        plan(("first", backend, processes), run, reshard(run, 2, backend, processes), processes)
    for first, second in sorted(RESHARD, key=lambda pair: pair[1][1]):  # two-rank resumes join the launch
        run = root / f"resume-{'-'.join(map(str, first))}-to-{'-'.join(map(str, second))}"
        if second[1] == 1 and first[1] == 2:
            continue  # a one-rank resume of a two-rank half: after the launch, below
        plan(("resume", first, second), run, reshard(run, 4, *second), second[1], resume=True,
             copy=(found[("first", *first)][0], run))
    torchrun_batch(jobs, root)
    for first, second in RESHARD:  # the one-rank resumes of two-rank halves
        if ("resume", first, second) not in found:
            run = root / f"resume-{'-'.join(map(str, first))}-to-{'-'.join(map(str, second))}"
            plan(("resume", first, second), run, reshard(run, 4, *second), second[1], resume=True,
                 copy=(found[("first", *first)][0], run))
    return {key: (run, json.loads(report.read_text())) for key, (run, report) in found.items()}


@pytest.mark.slow
@pytest.mark.parametrize("backend, processes, extra", MATCH)
def test_backends_match_a_plain_pytorch_reference(backend, processes, extra, reference, runs):
    run, report = runs[("match", backend, processes)]
    assert report["world_size"] == processes and report["linear_untouched"]
    if processes == 2:  # really sharded: each rank holds about half of the student
        assert all(count <= report["full_numel"] // 2 + 5000 for count in report["local_numel_per_rank"]), report
        assert sum(report["local_numel_per_rank"]) >= report["full_numel"]
    for step, (ours, theirs) in enumerate(zip(metrics(run), reference["losses"]), start=1):
        for term in TERMS:
            assert ours[term] == pytest.approx(theirs[term], rel=2e-3, abs=1e-5), (step, term)
    trained = student_weights(run)
    for key, value in reference["student"].items():
        torch.testing.assert_close(trained[key].float(), torch.tensor(value), atol=1e-4, rtol=1e-3, msg=key)


def tensor_digest(tensors):
    return hashlib.sha256(b"".join(tensors[k].float().numpy().tobytes() for k in sorted(tensors))).hexdigest()


@pytest.mark.slow
@pytest.mark.parametrize("first, second", RESHARD)
def test_a_checkpoint_resumes_on_another_number_of_ranks_and_backend(first, second, runs):
    """Saved at step 2 by one layout, resumed to step 4 by another: the weights, Adam moments, EMA, schedule and data
    position carry over, the parameters loaded equal those saved exactly, and the result is the uninterrupted run's."""
    from addpipe.train.checkpoint import read_tensors

    saved = read_tensors(runs[("first", *first)][0] / "checkpoints" / "step_00000002", "student.")
    split, resumed = runs[("resume", first, second)]

    assert resumed["step_at_start"] == 2 and resumed["world_size"] == second[1]
    model = {k[len("student.model."):]: v for k, v in saved.items() if k.startswith("student.model.")}
    ema = {k[len("student.ema."):]: v for k, v in saved.items() if k.startswith("student.ema.")}
    assert model and ema and resumed["loaded_digest"] == tensor_digest(model)  # exact, bit for bit
    assert resumed["ema_at_start"] == tensor_digest(ema)
    warmup = 10  # configs/tiny.yaml: the rate the schedule gives after two steps
    assert resumed["lr_at_start"] == pytest.approx(5e-5 * 3 / warmup)
    whole = runs["whole"][0]
    ours, theirs = metrics(split), metrics(whole)
    assert [m["step"] for m in ours] == [m["step"] for m in theirs] == [1, 2, 3, 4]
    for a, b in zip(ours, theirs):
        for term in TERMS:
            assert a[term] == pytest.approx(b[term], rel=2e-3, abs=1e-5), (a["step"], term)
    a, b = student_weights(whole), student_weights(split)
    for key in a:
        torch.testing.assert_close(a[key].float(), b[key].float(), atol=1e-4, rtol=1e-3, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("backend", list(SD3))
def test_an_sd3_teacher_trains_alike_on_one_rank_and_two(backend, runs):
    (one, _), (two, report) = runs[("sd3", backend, 1)], runs[("sd3", backend, 2)]
    assert report["world_size"] == 2
    assert all(count <= report["full_numel"] // 2 + 5000 for count in report["local_numel_per_rank"]), report
    for a, b in zip(metrics(one), metrics(two), strict=True):
        for term in TERMS:
            assert a[term] == pytest.approx(b[term], rel=2e-3, abs=1e-5), (a["step"], term)
    a, b = student_weights(one, "transformer"), student_weights(two, "transformer")
    for key in a:
        torch.testing.assert_close(a[key].float(), b[key].float(), atol=1e-4, rtol=1e-3, msg=key)


# HSDP: four ranks as 2 x 2 (sharded within pairs, replicated across them) against one rank; four data streams either
# way (one rank with four loader workers, or four ranks with one each); batch norm per sample, as a rank holds one.
HSDP_COMMON = {**RESHARD_COMMON, "discriminator.virtual_batch_size": 1, "engine.backend": "fsdp2",
               "model.frozen_placement": "partition"}


@pytest.fixture(scope="module")
def hsdp_runs(tiny_sd, tiny_dino, digit_shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("hsdp")

    def overrides(run, steps, processes):
        return tiny_overrides(tiny_sd, tiny_dino, digit_shards, run, steps=steps, **HSDP_COMMON,
                              **{"data.batch_size": 4 // processes, "data.num_workers": 4 // processes,
                                 "engine.shard_group": 2 if processes == 4 else 0})

    jobs = [{"report": root / f"{name}.json", "overrides": overrides(root / name, steps, 4)}
            for name, steps in (("hsdp-whole", 4), ("hsdp-first", 2))]
    torchrun_batch(jobs, root, processes=4)
    reports = {name: json.loads((root / f"{name}.json").read_text()) for name in ("hsdp-whole", "hsdp-first")}
    reports["one-whole"] = run_worker("train", 1, None, overrides(root / "one-whole", 4, 1))
    import shutil

    shutil.copytree(root / "hsdp-first", root / "one-resumed")
    reports["one-resumed"] = run_worker("train", 1, None, overrides(root / "one-resumed", 4, 1), resume=True)
    return {name: (root / name, report) for name, report in reports.items()}


@pytest.mark.slow
def test_hsdp_on_2x2_ranks_equals_one_rank_and_its_checkpoint_resumes_on_one(hsdp_runs):
    run, report = hsdp_runs["hsdp-whole"]
    assert report["world_size"] == 4
    half = report["full_numel"] // 2  # each rank holds half of the student (a pair's shard), not a quarter
    assert all(half - 5000 <= count <= half + 5000 for count in report["local_numel_per_rank"]), report
    reference = hsdp_runs["one-whole"][0]
    for other in (run, hsdp_runs["one-resumed"][0]):
        for a, b in zip(metrics(other), metrics(reference), strict=True):
            for term in TERMS:
                assert a[term] == pytest.approx(b[term], rel=2e-3, abs=1e-5), (other.name, a["step"], term)
        ours, theirs = student_weights(other), student_weights(reference)
        for key in theirs:
            torch.testing.assert_close(ours[key].float(), theirs[key].float(), atol=1e-4, rtol=1e-3, msg=key)
    resumed = hsdp_runs["one-resumed"][1]
    assert resumed["step_at_start"] == 2 and resumed["world_size"] == 1


def test_a_shard_group_is_fsdp2s_and_must_divide_the_ranks(tiny_sd, tiny_dino, digit_shards, tmp_path):
    from addpipe.config import ConfigError, load
    from addpipe.train.backends.fsdp2 import FSDP2Backend
    from addpipe.train.config import TrainConfig

    base = tiny_overrides(tiny_sd, tiny_dino, digit_shards, tmp_path / "run")
    with pytest.raises(ConfigError, match="engine.shard_group .*FSDP2's"):
        load(TrainConfig, TINY_CONFIG, base + ["engine.backend=deepspeed", "engine.shard_group=2"])
    config = load(TrainConfig, TINY_CONFIG, base + ["engine.backend=fsdp2", "engine.shard_group=2"])
    with pytest.raises(ValueError, match="engine.shard_group=2 does not divide the 1 ranks"):
        FSDP2Backend(config.engine, torch.device("cpu"), torch.float32)
