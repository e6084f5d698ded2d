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

from conftest import TINY_CONFIG, tiny_overrides
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


def student_weights(run):
    return load_file(str(next((run / "student/unet").glob("*.safetensors"))))


@pytest.fixture(scope="module")
def reference(tiny_sd, tiny_dino, digit_shards, tmp_path_factory):
    directory = tmp_path_factory.mktemp("reference")
    overrides = tiny_overrides(tiny_sd, tiny_dino, digit_shards, directory / "run", steps=3, **COMMON, **layout(1))
    return run_worker("reference", 1, directory / "report.json", overrides)


@pytest.mark.slow
@pytest.mark.parametrize("backend, processes, extra", [
    ("deepspeed", 1, {"engine.zero": 2}),
    ("deepspeed", 2, {"engine.zero": 3, "model.frozen_placement": "partition"}),
    ("fsdp2", 1, {}),
    # activation checkpointing recomputes the same values: FSDP2 with it still matches the reference without it
    ("fsdp2", 2, {"model.frozen_placement": "partition", "model.gradient_checkpointing": True}),
])
def test_backends_match_a_plain_pytorch_reference(backend, processes, extra, reference, tiny_sd, tiny_dino, digit_shards,
                                                  tmp_path):
    run = tmp_path / "run"
    overrides = tiny_overrides(tiny_sd, tiny_dino, digit_shards, run, steps=3, **COMMON, **layout(processes),
                               **{"engine.backend": backend, **extra})
    report = run_worker("train", processes, tmp_path / "report.json", overrides)
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


@pytest.fixture(scope="module")
def resharding(tiny_sd, tiny_dino, digit_shards, tmp_path_factory):
    """The uninterrupted run, and each first half once (copied for every test that resumes it)."""
    root = tmp_path_factory.mktemp("resharding")
    # the EMA by half-life: its images are counted from the step and the global batch, the same on 1 or 2 ranks
    common = {**COMMON, "optim.ema_decay": 0, "optim.ema_halflife_kimg": 0.02, "checkpoint.every": 2, "engine.zero": 3}

    def overrides(run, steps, backend, processes):
        return tiny_overrides(tiny_sd, tiny_dino, digit_shards, run, steps=steps, **common, **layout(processes),
                              **{"engine.backend": backend})

    run_worker("train", 1, root / "whole.json", overrides(root / "whole", 4, "fsdp2", 1))
    halves = {}

    def first_half(backend, processes):
        if (backend, processes) not in halves:
            run = root / f"first-{backend}-{processes}"
            run_worker("train", processes, root / f"{run.name}.json", overrides(run, 2, backend, processes))
            halves[(backend, processes)] = run
        return halves[(backend, processes)]

    return {"whole": root / "whole", "first_half": first_half, "overrides": overrides}


@pytest.mark.slow
@pytest.mark.parametrize("first, second", [
    (("deepspeed", 2), ("deepspeed", 1)),
    (("deepspeed", 1), ("deepspeed", 2)),
    (("fsdp2", 2), ("fsdp2", 1)),
    (("fsdp2", 1), ("fsdp2", 2)),
    (("deepspeed", 2), ("fsdp2", 1)),
    (("fsdp2", 2), ("deepspeed", 2)),
])
def test_a_checkpoint_resumes_on_another_number_of_ranks_and_backend(first, second, resharding, tmp_path):
    """Saved at step 2 by one layout, resumed to step 4 by another: the weights, Adam moments, EMA, schedule and data
    position carry over, the parameters loaded equal those saved exactly, and the result is the uninterrupted run's."""
    import shutil

    from addpipe.train.checkpoint import read_tensors

    split = tmp_path / "split"
    shutil.copytree(resharding["first_half"](*first), split)
    saved = read_tensors(split / "checkpoints" / "step_00000002", "student.")
    resumed = run_worker("train", second[1], tmp_path / "second.json", resharding["overrides"](split, 4, *second), resume=True)

    assert resumed["step_at_start"] == 2 and resumed["world_size"] == second[1]
    model = {k[len("student.model."):]: v for k, v in saved.items() if k.startswith("student.model.")}
    ema = {k[len("student.ema."):]: v for k, v in saved.items() if k.startswith("student.ema.")}
    assert model and ema and resumed["loaded_digest"] == tensor_digest(model)  # exact, bit for bit
    assert resumed["ema_at_start"] == tensor_digest(ema)
    warmup = 10  # configs/tiny.yaml: the rate the schedule gives after two steps
    assert resumed["lr_at_start"] == pytest.approx(5e-5 * 3 / warmup)
    whole = resharding["whole"]
    ours, theirs = metrics(split), metrics(whole)
    assert [m["step"] for m in ours] == [m["step"] for m in theirs] == [1, 2, 3, 4]
    for a, b in zip(ours, theirs):
        for term in TERMS:
            assert a[term] == pytest.approx(b[term], rel=2e-3, abs=1e-5), (a["step"], term)
    a, b = student_weights(whole), student_weights(split)
    for key in a:
        torch.testing.assert_close(a[key].float(), b[key].float(), atol=1e-4, rtol=1e-3, msg=key)
