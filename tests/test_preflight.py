"""Preflight: what would make a run fail is said before anything heavy, one line per problem, and a refused run
leaves nothing behind (no lock, no config.yaml)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import TINY_CONFIG, run_cli, tiny_overrides

# Runs `addpipe train` in a fresh interpreter through the CLI's own error mapping, then reports what was imported.
PROBE = """
import json, sys, time
from addpipe.pipeline.cli import invoke
started = time.monotonic()
try:
    invoke(sys.argv[1:])
    code = 0
except SystemExit as stop:
    code = stop.code
print(json.dumps({"code": code, "seconds": time.monotonic() - started,
                  "deepspeed": "deepspeed" in sys.modules}))
"""


def probe(*args: str) -> tuple[dict, str]:
    result = subprocess.run([sys.executable, "-c", PROBE, "train", *args], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


@pytest.mark.slow  # a subprocess
def test_every_problem_is_named_at_once_before_deepspeed_or_any_model_loads(tiny_sd, tiny_dino, digit_shards, tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    run = blocked / "run"  # cannot be created: its parent is a file
    overrides = tiny_overrides(tmp_path / "no_such_teacher", tiny_dino, f"{digit_shards}/{{00000..00011}}.tar", run,
                               **{"discriminator.text_encoder": "nobody/missing-clip"})
    report, stderr = probe("-c", str(TINY_CONFIG), *overrides)
    assert report["code"] == 2 and not report["deepspeed"], (report, stderr[-2000:])
    assert report["seconds"] < 20 and "Traceback" not in stderr
    lines = [line.strip() for line in stderr.splitlines()]
    assert "error: 4 problems:" in lines, stderr
    assert (f"model.teacher: directory not found: {tmp_path / 'no_such_teacher'} (a hub id is `owner/name`)") in lines
    assert ("discriminator.text_encoder: nobody/missing-clip is not in the cache (the default HF cache) "
            "(HF_HUB_OFFLINE=1: run `addpipe fetch` where there is a network)") in lines
    assert any(line.startswith("data.shards: 4 of 12 shards are missing:") for line in lines)
    assert f"run_dir: {blocked} is not a directory" in lines
    assert not (tmp_path / "no_such_teacher").exists()


def test_a_refused_run_leaves_no_lock_and_dry_run_refuses_what_the_run_would(tiny_sd, tiny_dino, digit_shards, tmp_path):
    run = tmp_path / "run"
    not_a_pipeline = tmp_path / "unet_only"
    (not_a_pipeline / "unet").mkdir(parents=True)
    refused = run_cli("train", "-c", str(TINY_CONFIG), *tiny_overrides(not_a_pipeline, tiny_dino, digit_shards, run))
    assert refused.returncode == 2 and "is not a diffusers pipeline directory (no model_index.json)" in refused.stderr
    assert not run.exists()  # refused before the lock: no .lock, no config.yaml
    dry = run_cli("train", "-c", str(TINY_CONFIG), "--dry-run", *tiny_overrides(tiny_sd, tiny_dino, tmp_path / "none", run))
    assert dry.returncode == 2 and "data.shards: 1 of 1 shards are missing: " in dry.stderr and "run_dir:" in dry.stdout
    good = run_cli("train", "-c", str(TINY_CONFIG), "--dry-run", *tiny_overrides(tiny_sd, tiny_dino, digit_shards, run))
    assert good.returncode == 0, good.stderr[-2000:]
