"""A checkpoint damaged without changing its size (bytes overwritten in place) is detected by its checksums at resume
and passed over for the previous verified one, on both backends; the "last good checkpoint" a non-finite loss names is
that verified one; a checkpoint written before checksums existed still loads, and the log says it was not verified."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from addpipe.config import load
from addpipe.train import checkpoint
from addpipe.train.config import TrainConfig
from addpipe.train.report import NonFiniteLossError
from conftest import TINY_CONFIG, tiny_overrides

SETTINGS = {"checkpoint.every": 2, "checkpoint.keep_last": 3}


def overrides(request, run: Path, backend: str, **extra) -> list[str]:
    return tiny_overrides(request.getfixturevalue("tiny_sd"), request.getfixturevalue("tiny_dino"),
                          request.getfixturevalue("digit_shards"), run, **{"engine.backend": backend, **SETTINGS, **extra})


@pytest.fixture(scope="module", params=["deepspeed", "fsdp2"])
def trained(request, tmp_path_factory):
    """A 4-step run of each backend with checkpoints at steps 2 and 4."""
    from addpipe.train.loop import train

    run = tmp_path_factory.mktemp(request.param) / "run"
    train(load(TrainConfig, TINY_CONFIG, overrides(request, run, request.param, steps=4)))
    return request.param, run


def overwrite_middle(path: Path, size: int = 4096) -> None:
    """Overwrite up to `size` bytes in the middle of `path` with their complement, in place: the file keeps its size."""
    data = bytearray(path.read_bytes())
    length = min(size, len(data))
    start = (len(data) - length) // 2
    data[start:start + length] = bytes(255 - b for b in data[start:start + length])
    with open(path, "r+b") as file:
        file.write(data)


def test_every_file_of_a_checkpoint_is_checksummed_and_same_size_damage_is_named(trained):
    backend, run = trained
    step = run / "checkpoints" / "step_00000004"
    info = json.loads((step / "COMPLETE").read_text())
    names = set(info["files"])
    kinds = {"state/.metadata", "trainer.json", "rng_rank00000.pt", "config.yaml"}
    assert kinds <= names and any(n.startswith("state/__0_") and n.endswith(".distcp") for n in names), names
    assert set(info["checksums"]) == names - {"COMPLETE"} and all(v.startswith("crc32:") for v in info["checksums"].values())
    assert checkpoint.damage(step) is None
    for name in sorted(names - {"COMPLETE"}):
        file = step / name
        intact = file.read_bytes()
        try:
            overwrite_middle(file)
            assert file.stat().st_size == len(intact)
            problem = checkpoint.damage(step)
            assert problem is not None and problem.startswith(f"{file} has checksum crc32:"), (backend, name, problem)
            assert "its bytes changed after the save" in problem
            # split over 2 ranks, exactly one of them finds it
            assert [checkpoint.damage(step, rank, 2) is not None for rank in (0, 1)].count(True) == 1, name
        finally:
            file.write_bytes(intact)
    assert checkpoint.damage(step) is None


@pytest.mark.parametrize("damaged_file", ["state/__0_0.distcp", "trainer.json"])
def test_same_size_damage_falls_back_and_the_last_good_checkpoint_named_is_the_verified_one(request, trained, tmp_path,
                                                                                            caplog, damaged_file):
    """The issue's case: 4 KiB overwritten in a checkpoint file. Resuming passes over the damaged step 4 for step 2, and
    a non-finite loss (forced here) names step 2, not the damaged checkpoint, as the last good one."""
    from addpipe.train.loop import train

    backend, original = trained
    run = tmp_path / "run"
    shutil.copytree(original, run)
    damaged = run / "checkpoints" / "step_00000004" / damaged_file
    overwrite_middle(damaged)
    with caplog.at_level(logging.WARNING), pytest.raises(NonFiniteLossError) as stopped:
        train(load(TrainConfig, TINY_CONFIG, overrides(request, run, backend, steps=6, **{"distill.weight": ".nan"})),
              resume=True)
    assert f"checkpoint {run / 'checkpoints' / 'step_00000004'} is damaged: {damaged} has checksum" in caplog.text, \
        caplog.text[-3000:]
    assert "non-finite loss at step 3" in str(stopped.value)
    assert str(stopped.value).endswith(f"last good checkpoint: {run / 'checkpoints' / 'step_00000002'}")


def test_a_checkpoint_without_checksums_still_loads_and_says_it_was_not_verified(request, trained, tmp_path, caplog):
    from addpipe.train.loop import train

    backend, original = trained
    run = tmp_path / "run"
    shutil.copytree(original, run)
    complete = run / "checkpoints" / "step_00000004" / "COMPLETE"
    info = json.loads(complete.read_text())
    del info["checksums"]  # as written before checksums existed
    complete.write_text(json.dumps(info))
    with caplog.at_level(logging.WARNING), pytest.raises(NonFiniteLossError) as stopped:
        train(load(TrainConfig, TINY_CONFIG, overrides(request, run, backend, steps=6, **{"distill.weight": ".nan"})),
              resume=True)
    assert f"checkpoint {complete.parent} has no checksums (written by an older addpipe)" in caplog.text
    assert "non-finite loss at step 5" in str(stopped.value)  # resumed from step 4
