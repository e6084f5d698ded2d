"""Atomic checkpoints in one format for every backend, readable on any number of ranks.

Layout of `run_dir/checkpoints/`:
    step_00000100/state/             torch.distributed.checkpoint (DCP) files: for each trained model, its fp32
                                     master weights (`<model>.model.<parameter>`), Adam moments
                                     (`<model>.optim.<parameter>.exp_avg|exp_avg_sq`) and, for the EMA'd model,
                                     `<model>.ema.<parameter>`; sharded tensors stay shards, whole ones are written
                                     by one owner rank each
    step_00000100/trainer.json       step, schedules, optimizer step counts, every data stream's cursor, the log
                                     accumulator summed over ranks, the backend and process count that wrote it
    step_00000100/rng_rank00000.pt   each rank's RNG states (restored when the process count is the same)
    step_00000100/config.yaml        the resolved config the checkpoint was trained with
    step_00000100/COMPLETE           written last: step, writer, every file's size and CRC-32
    latest                           name of the newest complete checkpoint (replaced atomically)

DCP records each tensor's global shape and reads any region of it back, so a checkpoint written by W ranks
loads on W' ranks, and one written by DeepSpeed loads into FSDP2 and the other way round: both backends write
the same entries. Everything is written into a `.tmp` directory first and renamed into place, so a crash mid-save
never leaves a checkpoint that looks complete. A complete checkpoint whose files no longer have their recorded
sizes (truncated by a full disk, a partial copy) or checksums (bytes changed in place: a bad disk, a bad copy, a
stray write), or that cannot be read, is passed over for the previous one, with a warning naming the file; the
checkpoint a run resumes from, and so the "last good checkpoint" its errors name, has been verified.

Checksums are CRC-32 (zlib, ~1.4 GB/s on one core here, 3-4x blake2b): they guard against damage, not against an
attacker. Each rank sums the files it wrote itself, right after writing them (still in its page cache), and at
resume each rank verifies every world_size-th file, so neither costs one rank a pass over the whole checkpoint.
Checkpoints written before checksums existed still load, on their sizes alone, and the log says so.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import zlib
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from addpipe.files import write_text_atomic
from addpipe.train import distributed
from addpipe.train.rundir import RunDirError, describe_write_error
from addpipe.errors import UserError

logger = logging.getLogger(__name__)
STATE = "state"


class CheckpointError(UserError, RuntimeError):
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


def file_checksum(path: Path, chunk: int = 8 << 20) -> str:
    """CRC-32 of a file, streamed in 8 MiB chunks: `crc32:<8 hex digits>`."""
    value = 0
    with open(path, "rb") as file:
        while block := file.read(chunk):
            value = zlib.crc32(block, value)
    return f"crc32:{value:08x}"


def _checksums(directory: Path, files: list[Path]) -> dict[str, str]:
    return {str(p.relative_to(directory)): file_checksum(p) for p in files}


def _own_files(tmp: Path, rank: int) -> list[Path]:
    """The files this rank wrote: its DCP data files (DCP's FileSystemWriter names them `__<rank>_<n>.distcp`) and its
    RNG state. Whatever no rank claims (DCP's .metadata, a file named otherwise by another torch) rank 0 sums."""
    state = tmp / STATE
    own = sorted(p for p in state.iterdir() if p.is_file() and p.name.startswith(f"__{rank}_")) if state.is_dir() else []
    return own + [tmp / f"rng_rank{rank:05d}.pt"]


def _tensor_entries(models: dict[str, Any], ema: Optional[tuple[str, list[torch.Tensor]]]) -> dict[str, Any]:
    """Collective: every trained model's entries, keyed `<model>.<entry>`."""
    entries: dict[str, Any] = {}
    for name, model in models.items():
        entries.update({f"{name}.{key}": value for key, value in model.checkpoint_state().items()})
    if ema is not None:
        name, shadow = ema
        entries.update(models[name].parameter_entries(f"{name}.ema", shadow))
    return entries


def save(run_dir: Path, step: int, models: dict[str, Any], trainer_state: dict[str, Any], keep_last: int,
         ema: Optional[tuple[str, list[torch.Tensor]]] = None, config_text: str = "") -> Path:
    """Collective: every rank calls it. `models`: name -> backends.Trained; `ema`: (model name, its EMA shadow in
    local-tensor layout); `trainer_state`: what trainer.json holds (the same on every rank; rank 0 writes it).
    Returns the final checkpoint directory. A write the file system refuses is a RunDirError naming the file."""
    import torch.distributed.checkpoint as dcp

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
        dcp.save(_tensor_entries(models, ema), checkpoint_id=str(tmp / STATE))
        torch.save(rng_state(), tmp / f"rng_rank{distributed.rank():05d}.pt")
        # summed by the rank that wrote them, while they are in its page cache; the gather is the barrier
        gathered = distributed.all_gather_objects(_checksums(tmp, _own_files(tmp, distributed.rank())))
        if distributed.is_main():
            (tmp / "trainer.json").write_text(json.dumps(trainer_state))
            if config_text:
                (tmp / "config.yaml").write_text(config_text)
            sizes = _file_sizes(tmp)
            sums = {name: value for part in gathered for name, value in part.items()}
            sums.update(_checksums(tmp, [tmp / name for name in sizes if name not in sums]))
            info = {"step": step, "world_size": distributed.world_size(), "backend": trainer_state.get("backend"),
                    "files": sizes, "checksums": {name: sums[name] for name in sizes}}
            (tmp / "COMPLETE").write_text(json.dumps(info))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            write_text_atomic(root / "latest", final.name)
            for old in complete_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
    except (OSError, RuntimeError, dcp.api.CheckpointException) as error:
        if isinstance(error, RunDirError):
            raise
        error = first_failure(error)
        # torch.save and DCP report a full disk as a RuntimeError ("file write failed"), others as an OSError
        where = Path(getattr(error, "filename", None) or tmp)
        hint = "" if isinstance(error, OSError) else " (is the disk full, over quota or read-only?)"
        raise RunDirError(f"saving checkpoint step {step} failed: {describe_write_error(where, error)}{hint}") from None
    distributed.barrier()
    return final


def first_failure(error: BaseException) -> BaseException:
    """DCP wraps each rank's own error in a CheckpointException (a BaseException, printed as a traceback per rank):
    the first rank's error is the one worth reporting."""
    from torch.distributed.checkpoint.api import CheckpointException

    if isinstance(error, CheckpointException) and error.failures:
        return next(iter(error.failures.values()))[0]
    return error


def damage(path: Path, rank: int = 0, world_size: int = 1) -> Optional[str]:
    """What is wrong with a complete checkpoint's files (missing, not the recorded size, or, among every
    `world_size`-th file from `rank` on, not the recorded checksum), or None."""
    info = json.loads((path / "COMPLETE").read_text())
    if not (path / "trainer.json").is_file():
        return f"{path} predates this format (no trainer.json): it can only be read by the addpipe that wrote it"
    for name, size in info.get("files", {}).items():
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        if file.stat().st_size != size:
            return f"{file} is {file.stat().st_size} bytes, {size} were written"
    for index, (name, expected) in enumerate(sorted(info.get("checksums", {}).items())):
        if index % world_size == rank and (actual := file_checksum(path / name)) != expected:
            return f"{path / name} has checksum {actual}, {expected} was written: its bytes changed after the save"
    return None


def has_checksums(path: Path) -> bool:
    return "checksums" in json.loads((path / "COMPLETE").read_text())


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(value.shape)  # a DTensor's shape is its global shape


def check_fits(path: Path, template: dict[str, Any]) -> None:
    """Refuse a checkpoint whose tensors do not fit the model being resumed, naming the first that does not."""
    import torch.distributed.checkpoint as dcp

    saved = dcp.FileSystemReader(str(path / STATE)).read_metadata().state_dict_metadata
    for key in sorted(template):
        if key not in saved:
            raise CheckpointError(f"checkpoint {path} does not fit this model: it has no {key} (another architecture, "
                                  "method or model? resume in a new run_dir)")
        shape = tuple(getattr(saved[key], "size", ()))
        if shape != _shape(template[key]):
            raise CheckpointError(f"checkpoint {path} does not fit this model: {key} is {list(shape)} there and "
                                  f"{list(_shape(template[key]))} here (another architecture? resume in a new run_dir)")


def loader(path: Path) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """Collective: `load(template)` fills the template's tensors from the checkpoint (DTensors in place, shard by
    shard) and returns it."""
    import torch.distributed.checkpoint as dcp

    def load(template: dict[str, Any]) -> dict[str, Any]:
        template = dict(template)
        check_fits(path, template)
        dcp.load(template, checkpoint_id=str(path / STATE))
        return template
    return load


def prefixed(load: Callable[[dict[str, Any]], dict[str, Any]], prefix: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A loader that adds `<prefix>.` to the keys a model asks for and takes it off again."""
    def load_prefixed(template: dict[str, Any]) -> dict[str, Any]:
        loaded = load({f"{prefix}.{key}": value for key, value in template.items()})
        return {key[len(prefix) + 1:]: value for key, value in loaded.items()}
    return load_prefixed


def load(path: Path, models: dict[str, Any], ema_model: Optional[str] = None) -> tuple[dict[str, Any], Optional[list[torch.Tensor]]]:
    """Collective: fill every trained model (and its optimizer) from `path`; -> (trainer.json's state, the EMA
    shadow in the EMA'd model's local layout, or None when the checkpoint has none)."""
    state = json.loads((path / "trainer.json").read_text())
    read = loader(path)
    for name, model in models.items():
        model.load_checkpoint_state(prefixed(read, name))
        model.set_optimizer_steps(int(state["optimizer_steps"][name]))
    shadow = None
    if ema_model is not None and state.get("ema"):
        shadow = models[ema_model].load_parameter_entries(f"{ema_model}.ema", read)
    rng = path / f"rng_rank{distributed.rank():05d}.pt"
    if state.get("world_size") == distributed.world_size() and rng.is_file():
        restore_rng(torch.load(rng, weights_only=False))
    return state, shadow


def start_from(run_dir: Path, models: dict[str, Any], ema_model: Optional[str], device: torch.device,
               resume: bool) -> Optional[tuple[Path, dict[str, Any], Optional[list[torch.Tensor]]]]:
    """Collective: where a run starts. With `resume`, load_latest (None, said in the log, when there is none yet: a
    requeued job's first start, or a rerun of a job that never saved); without, a run directory that already holds
    checkpoints is refused rather than overwritten."""
    if not resume:
        newest = latest(run_dir)
        if newest is not None:
            raise CheckpointError(f"{run_dir} already holds checkpoints (newest: {newest.name}): pass --resume to "
                                  "continue that run, or give a new run_dir")
        return None
    found = load_latest(run_dir, models, ema_model, device)
    if found is None and distributed.is_main():
        logger.info("--resume: no checkpoint in %s yet; starting from step 0", run_dir)
    return found


def load_latest(run_dir: Path, models: dict[str, Any], ema_model: Optional[str],
                device: torch.device) -> Optional[tuple[Path, dict[str, Any], Optional[list[torch.Tensor]]]]:
    """Collective: the newest checkpoint that is intact and loads, with trainer.json's state and the EMA; a damaged
    one is passed over for the one before it, with a warning. None when the run has no complete checkpoint."""
    found = candidates(run_dir)
    problems = []
    for path in found:
        # Every rank verifies its share of the files; all learn the first problem before any starts DCP's collective read
        seen = distributed.all_gather_objects(damage(path, distributed.rank(), distributed.world_size()))
        problem = next((p for p in seen if p is not None), None)
        result = None
        if problem is None:
            try:
                result = load(path, models, ema_model)
            except BaseException as error:  # DCP wraps read errors in a CheckpointException, not an Exception
                cause = first_failure(error)
                if isinstance(cause, CheckpointError) or not isinstance(cause, Exception):  # Ctrl-C, a misfit
                    if cause is error:
                        raise
                    raise cause from None
                # torch's and DCP's read errors do not say which checkpoint: this does
                problem = f"it cannot be read ({type(cause).__name__}: {str(cause).strip().splitlines()[0]})"
        if not distributed.any_rank(problem is not None, device):
            if not has_checksums(path) and distributed.is_main():
                logger.warning("checkpoint %s has no checksums (written by an older addpipe): only its file sizes were "
                               "checked before resuming from it", path)
            return path, result[0], result[1]
        problems.append(f"{path}: {problem or 'unreadable on another rank'}")
        if distributed.is_main():
            logger.warning("checkpoint %s is damaged: %s; trying the previous complete checkpoint", path,
                           problem or "unreadable on another rank")
    if found:
        raise CheckpointError(f"no checkpoint in {checkpoint_dir(run_dir)} could be resumed: {'; '.join(problems)}")
    return None


def read_tensors(path: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint whose key starts with `prefix`, whole, in this process (no process group
    needed): for inspecting a checkpoint or comparing two."""
    import torch.distributed.checkpoint as dcp

    saved = dcp.FileSystemReader(str(Path(path) / STATE)).read_metadata().state_dict_metadata
    template = {key: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
                for key, meta in saved.items() if key.startswith(prefix) and hasattr(meta, "size")}
    dcp.load(template, checkpoint_id=str(Path(path) / STATE), no_dist=True)
    return template
