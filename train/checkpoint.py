"""Atomic, resumable checkpoints of both engines plus each rank's trainer state.

Layout of `run_dir/checkpoints/`:
    step_00000100/student/...        DeepSpeed checkpoint of the student engine (model, optimizer, lr schedule)
    step_00000100/discriminator/...  the same for the heads
    step_00000100/trainer_rank00000.pt  step, RNG states, data stream positions, EMA shard of this rank
    step_00000100/COMPLETE           written last; a directory without it is ignored
    latest                           name of the newest complete checkpoint (replaced atomically)

Everything is written into a `.tmp` directory first and renamed into place, so a crash mid-save never
leaves a checkpoint that looks complete. Ranks are assumed to share the file system, as DeepSpeed does.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from addpipe.train import distributed

ENGINE_NAMES = ("student", "discriminator")


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def complete_checkpoints(run_dir: Path) -> list[Path]:
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / "COMPLETE").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def latest(run_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint: the one `latest` names if it is complete, else the highest step."""
    pointer = checkpoint_dir(run_dir) / "latest"
    if pointer.is_file():
        candidate = checkpoint_dir(run_dir) / pointer.read_text().strip()
        if (candidate / "COMPLETE").is_file():
            return candidate
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def save(run_dir: Path, step: int, engines: dict[str, Any], trainer_state: dict[str, Any], keep_last: int) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory."""
    root = checkpoint_dir(run_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".step_{step:08d}.tmp"
    if distributed.is_main():
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # left over from a save that crashed
        tmp.mkdir()
    distributed.barrier()
    for name, engine in engines.items():
        engine.save_checkpoint(str(tmp), tag=name, save_latest=False)
    torch.save({**trainer_state, "rng": rng_state()}, tmp / f"trainer_rank{distributed.rank():05d}.pt")
    distributed.barrier()
    if distributed.is_main():
        (tmp / "COMPLETE").write_text(json.dumps({"step": step, "world_size": distributed.world_size()}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(root / "latest", final.name)
        for old in complete_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return final


def load(path: Path, engines: dict[str, Any]) -> dict[str, Any]:
    """Collective: load both engines and return this rank's trainer state (RNG already restored)."""
    info = json.loads((path / "COMPLETE").read_text())
    if info["world_size"] != distributed.world_size():
        raise RuntimeError(
            f"checkpoint {path} was written by {info['world_size']} ranks, this run has {distributed.world_size()}: "
            "resume with the same number of processes"
        )
    for name, engine in engines.items():
        loaded, _ = engine.load_checkpoint(str(path), tag=name, load_optimizer_states=True, load_lr_scheduler_states=True)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load the {name} engine from {path / name}")
    state = torch.load(path / f"trainer_rank{distributed.rank():05d}.pt", weights_only=False)
    restore_rng(state.pop("rng"))
    return state
