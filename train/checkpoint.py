"""Atomic, resumable checkpoints of both engines plus each rank's trainer state.

Layout of `run_dir/checkpoints/`:
    step_00000100/student/...        DeepSpeed checkpoint of the student engine (model, optimizer, lr schedule)
    step_00000100/discriminator/...  the same for the heads
    step_00000100/trainer_rank00000.pt  step, RNG states, data stream positions, EMA shard, log accumulator of this rank
    step_00000100/config.yaml        the resolved config the checkpoint was trained with
    step_00000100/COMPLETE           written last: step, layout (world size, ZeRO stages) and every file's size
    latest                           name of the newest complete checkpoint (replaced atomically)

Everything is written into a `.tmp` directory first and renamed into place, so a crash mid-save never
leaves a checkpoint that looks complete. Ranks are assumed to share the file system, as DeepSpeed does.
A complete checkpoint whose files no longer have their recorded sizes (truncated by a full disk, a partial
copy) or cannot be read is passed over for the previous one, with a warning naming the file.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from addpipe.files import write_text_atomic
from addpipe.train import distributed
from addpipe.train.rundir import RunDirError, describe_write_error

logger = logging.getLogger(__name__)
ENGINE_NAMES = ("student", "discriminator")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed as asked (printed without a traceback)."""


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


def complete_checkpoints(run_dir: Path) -> list[Path]:
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / "COMPLETE").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def latest(run_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint: the one `latest` names if it is complete, else the highest step."""
    found = candidates(run_dir)
    return found[0] if found else None


def candidates(run_dir: Path) -> list[Path]:
    """Complete checkpoints, the one to try first first: `latest`'s, then the rest from the highest step down."""
    found = complete_checkpoints(run_dir)[::-1]
    pointer = checkpoint_dir(run_dir) / "latest"
    if pointer.is_file():
        named = checkpoint_dir(run_dir) / pointer.read_text().strip()
        if named in found:
            found.remove(named)
            found.insert(0, named)
    return found


def _file_sizes(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}


def save(run_dir: Path, step: int, engines: dict[str, Any], trainer_state: dict[str, Any], keep_last: int,
         layout: Optional[dict[str, Any]] = None, config_text: str = "") -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory. A write the file system refuses
    (full, read-only, over quota) is a RunDirError naming the file."""
    root = checkpoint_dir(run_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".step_{step:08d}.tmp"
    try:
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
            if config_text:
                (tmp / "config.yaml").write_text(config_text)
            info = {"step": step, "world_size": distributed.world_size(), "layout": layout or {}, "files": _file_sizes(tmp)}
            (tmp / "COMPLETE").write_text(json.dumps(info))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            write_text_atomic(root / "latest", final.name)
            for old in complete_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
    except (OSError, RuntimeError) as error:
        if isinstance(error, RunDirError):
            raise
        # torch.save reports a full disk as a RuntimeError ("file write failed"), DeepSpeed as an OSError
        where = Path(getattr(error, "filename", None) or tmp)
        hint = "" if isinstance(error, OSError) else " (is the disk full, over quota or read-only?)"
        raise RunDirError(f"saving checkpoint step {step} failed: {describe_write_error(where, error)}{hint}") from None
    distributed.barrier()
    return final


def damage(path: Path) -> Optional[str]:
    """What is wrong with a complete checkpoint's files (missing, or not the recorded size), or None."""
    info = json.loads((path / "COMPLETE").read_text())
    for name, size in info.get("files", {}).items():
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        if file.stat().st_size != size:
            return f"{file} is {file.stat().st_size} bytes, {size} were written"
    return None


def check_layout(path: Path, layout: dict[str, Any]) -> None:
    """Refuse a resume whose process count or ZeRO stages differ from the checkpoint's."""
    info = json.loads((path / "COMPLETE").read_text())
    if info["world_size"] != distributed.world_size():
        raise CheckpointError(
            f"checkpoint {path} was written by {info['world_size']} process(es), this run has {distributed.world_size()}: "
            f"resume with {info['world_size']} (e.g. torchrun --nproc_per_node {info['world_size']})")
    recorded = info.get("layout", {})
    for key, value in layout.items():
        if key in recorded and recorded[key] != value:
            raise CheckpointError(f"checkpoint {path} was written with {key}={recorded[key]}, this run asks for {value}: "
                                  f"resume with {key}={recorded[key]} or start a new run_dir")


def load(path: Path, engines: dict[str, Any]) -> dict[str, Any]:
    """Collective: load both engines and return this rank's trainer state (RNG already restored)."""
    for name, engine in engines.items():
        loaded, _ = engine.load_checkpoint(str(path), tag=name, load_optimizer_states=True, load_lr_scheduler_states=True)
        if loaded is None:
            raise CheckpointError(f"DeepSpeed found no {name} engine state in {path / name}")
    state = torch.load(path / f"trainer_rank{distributed.rank():05d}.pt", weights_only=False)
    restore_rng(state.pop("rng"))
    return state


def load_latest(run_dir: Path, engines: dict[str, Any], layout: dict[str, Any],
                device: torch.device) -> Optional[tuple[Path, dict[str, Any]]]:
    """Collective: the newest checkpoint that is intact and loads, with this rank's trainer state; a damaged one
    is passed over for the one before it, with a warning. None when the run has no complete checkpoint."""
    found = candidates(run_dir)
    problems = []
    for path in found:
        check_layout(path, layout)
        problem = damage(path)
        state = None
        if problem is None:
            try:
                state = load(path, engines)
            except CheckpointError:
                raise
            except Exception as error:  # torch.load's zip errors do not say which file: this does
                problem = f"it cannot be read ({type(error).__name__}: {str(error).strip().splitlines()[0]})"
        if not distributed.any_rank(problem is not None, device):
            return path, state
        problems.append(f"{path}: {problem or 'unreadable on another rank'}")
        if distributed.is_main():
            logger.warning("checkpoint %s is damaged: %s; trying the previous complete checkpoint", path,
                           problem or "unreadable on another rank")
    if found:
        raise CheckpointError(f"no checkpoint in {checkpoint_dir(run_dir)} could be resumed: {'; '.join(problems)}")
    return None
