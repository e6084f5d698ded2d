"""What `addpipe train` checks before anything heavy (DeepSpeed, an op build, a model load, a download): every path
the config names, the hub models when offline, the shards, the run directory. Each problem is one line naming the
key and the fix; the run (and `--dry-run`) stops on them, before taking the run directory's lock.

The checks read only small files (a model_index.json, a config.json, directory listings), so a wrong path is an
error in seconds rather than after the DeepSpeed import and the models' loading, minutes into a job on a busy node.
"""

from __future__ import annotations

import os
from pathlib import Path

from addpipe.assets import Asset, looks_local, marked_fields, missing_offline
from addpipe.errors import UserError


class PreflightError(UserError, RuntimeError):
    """What would make the run fail, found before it starts."""


def _local_models(config) -> list[tuple[str, str, str]]:
    """(key, value, kind) of every model field that names a local path."""
    return [(key, value, kind) for key, value, kind, _ in marked_fields(config)
            if kind in ("pipeline", "model") and looks_local(value)]


def problems(config) -> list[str]:
    """Every problem found, one line each (empty: go)."""
    from addpipe.shards import ShardError, expand_shards
    from addpipe.train.families import family_of_index

    found = []
    for key, value, kind in _local_models(config):
        path = Path(os.path.expanduser(value))
        if path.is_file() and kind == "pipeline":
            found.append(f"{key}: {value} is a single-file checkpoint: convert it first, `addpipe convert {value} "
                         "--out DIR`, then pass DIR")
        elif not path.is_dir():
            found.append(f"{key}: directory not found: {value} (a hub id is `owner/name`)")
        elif kind == "pipeline":
            index = path / "model_index.json"
            if not index.is_file():
                found.append(f"{key}: {value} is not a diffusers pipeline directory (no model_index.json); a single-file "
                             "checkpoint becomes one with `addpipe convert`")
            else:
                import json

                try:
                    family_of_index(json.loads(index.read_text()), value)
                except ValueError as error:
                    found.append(f"{key}: {error}")
        elif not (path / "config.json").is_file():
            found.append(f"{key}: {value} has no config.json: not a saved model directory")
    # offline, hub ids must be in the cache: say which are not, now, instead of retrying the hub
    found += missing_offline(config, ("pipeline", "model"))
    try:
        expand_shards(config.data.shards)
    except ShardError as error:
        found.append(f"data.shards: {error}")
    found += _run_dir_problems(Path(config.run_dir))
    return found


def _run_dir_problems(run_dir: Path) -> list[str]:
    """A run directory that cannot be created or written (checked without creating it)."""
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return [f"run_dir: {existing} is not a directory"]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [f"run_dir: {existing} is not writable by this user"]
    return []


def check(config) -> None:
    """Raise PreflightError listing every problem, one per line."""
    found = problems(config)
    if found:
        raise PreflightError("\n".join(found) if len(found) == 1 else
                             f"{len(found)} problems:\n" + "\n".join(f"  {line}" for line in found))


__all__ = ["Asset", "PreflightError", "check", "problems"]
