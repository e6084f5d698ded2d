"""`addpipe prep`: URL table -> img2dataset shards -> embeddings and scores -> filters and dedup -> shards + report.

Stages and what marks them finished (a rerun skips finished work, so killing the run anywhere and
running it again gives the same result):
  input     input/urls.parquet                 the normalised table with row ids
  download  download/NNNNN_stats.json          img2dataset's own incremental mode
  embed     scores/NNNNN.parquet               per shard; shards split over SLURM array tasks by id
  merge     decisions.parquet, shards/NNNNN.tar, report.json
Each stage directory records a fingerprint of the settings it was built with. Changed download settings
are an error (downloads are expensive and a mix would be inconsistent); changed embedding or filter
settings rebuild the affected stages.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from addpipe.dataprep import download as download_stage
from addpipe.dataprep.config import PrepConfig
from addpipe.dataprep.embed import embed_shard
from addpipe.dataprep.filters import decide
from addpipe.dataprep.report import build_report
from addpipe.dataprep.table import read_refused, write_normalised
from addpipe.dataprep.write import write_output_shard
from addpipe.files import write_parquet_atomic, write_text_atomic
from addpipe.config import to_dict, to_yaml
from addpipe.errors import UserError

logger = logging.getLogger(__name__)


class PrepError(UserError, RuntimeError):
    """A prep run that cannot go on as asked (printed without a traceback by the CLI)."""


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def input_settings(config: PrepConfig) -> dict[str, Any]:
    download = to_dict(config.download)
    for local_only in ("processes", "threads", "distributor", "spark_master"):  # how, not what, is downloaded
        download.pop(local_only)
    if not download["allowed_networks"]:  # outputs written before the setting existed keep their fingerprint
        download.pop("allowed_networks")
    urls = os.path.abspath(os.path.expanduser(config.input.urls)) if config.input.urls else ""
    return {"input": {**to_dict(config.input), "urls": urls}, "download": download}


def embed_settings(config: PrepConfig) -> dict[str, Any]:
    embed = to_dict(config.embed)
    for local_only in ("batch_size", "device"):
        embed.pop(local_only)
    return {"embed": embed, "aesthetic_weights": config.filter.aesthetic_weights}


def merge_settings(config: PrepConfig) -> dict[str, Any]:
    return {"embed": embed_settings(config), "filter": to_dict(config.filter), "dedup": to_dict(config.dedup)}


def check_fingerprint(directory: Path, settings: dict[str, Any], rebuild: bool, record: bool = True) -> None:
    """Make `directory` belong to `settings`: a new directory records them (unless record=False, for a
    caller that records only once its stage has succeeded); a directory built with other settings is
    rebuilt (rebuild=True) or refused."""
    marker = directory / "_fingerprint.json"
    if marker.exists():
        recorded = json.loads(marker.read_text())
        if recorded.get("digest") == _digest(settings):
            return
        if not rebuild:
            raise PrepError(
                f"{directory} was built with other settings ({json.dumps(recorded.get('settings'))}); "
                f"now: {json.dumps(settings)}. Use a new --out, or delete {directory} to start it again."
            )
        logger.warning("settings changed since %s was built: rebuilding it", directory)
        shutil.rmtree(directory)
    if record:
        directory.mkdir(parents=True, exist_ok=True)
        write_text_atomic(marker, json.dumps({"digest": _digest(settings), "settings": settings}, indent=2))


def out_dir(config: PrepConfig) -> Path:
    if not config.out:
        raise PrepError("no output directory: give --out (or out=... in the config)")
    return Path(os.path.expanduser(config.out))


def check_input(config: PrepConfig) -> Path:
    """The URL table exists and an output directory is given; -> the output directory."""
    table = os.path.expanduser(config.input.urls or "")
    if table and "://" not in table and not Path(table).exists():  # the first thing wrong is the first thing said
        raise PrepError(f"URL table {config.input.urls} does not exist")
    return out_dir(config)


def check_models_present(config: PrepConfig) -> None:
    """Offline, the models the scores need (open_clip weights, the aesthetic predictor) must be cached: said before
    the download starts, not after it, and without retrying the hub."""
    from addpipe.assets import missing_offline

    missing = missing_offline(config)
    if missing:
        raise PrepError("\n".join(missing) if len(missing) == 1 else
                        f"{len(missing)} models missing:\n" + "\n".join(f"  {line}" for line in missing))


def run_download(config: PrepConfig, models_first: bool = False) -> list[int]:
    """Normalise the input table and download it; -> the shard ids. `models_first` (the whole prep): once the table
    is known good, check that the scoring models are there before downloading anything."""
    root = check_input(config)
    settings = input_settings(config)
    check_fingerprint(root / "input", settings, rebuild=False, record=False)
    # validates the table before anything is recorded
    urls, carried, rows = write_normalised(config.input, root, config.download.allowed_schemes)
    check_fingerprint(root / "input", settings, rebuild=False)
    write_text_atomic(root / "prep_config.yaml", to_yaml(config))
    logger.info("input: %d rows, carrying columns %s", rows, carried)
    if models_first:
        check_models_present(config)
    return download_stage.download(urls, carried, rows, config.download, root / "download")


def downloaded_shards(root: Path) -> list[int]:
    done = download_stage.finished_shards(root / "download")
    if not done:
        raise PrepError(f"{root / 'download'} has no finished shards: run `addpipe prep download` first")
    return done


def run_embed(config: PrepConfig, task_index: int = 0, task_count: int = 1) -> list[int]:
    """Embed and score the downloaded shards whose id % task_count == task_index; -> the shards this run embedded
    (a rerun or requeued task skips those already scored, and says so)."""
    if not 0 <= task_index < task_count:
        raise PrepError(f"task index {task_index} is outside 0..{task_count - 1}")
    check_models_present(config)
    root = out_dir(config)
    mine = [s for s in downloaded_shards(root) if s % task_count == task_index]
    settings = embed_settings(config)
    for directory in (root / "embeddings", root / "scores"):
        if task_count == 1:
            check_fingerprint(directory, settings, rebuild=True)
        else:  # array tasks must not delete each other's work: a mismatch is an error there
            check_fingerprint(directory, settings, rebuild=False)
    todo = [s for s in mine if not (root / "scores" / f"{s:05d}.parquet").exists()]
    logger.info("embed task %d/%d: %d shard(s), %d already scored (skipped), %d to embed", task_index, task_count,
                len(mine), len(mine) - len(todo), len(todo))
    if todo:
        from addpipe.dataprep.aesthetic import load_aesthetic
        from addpipe.clip import load_clip

        embedder = load_clip(config.embed)
        aesthetic = load_aesthetic(config.filter.aesthetic_weights, embedder.device) if config.filter.aesthetic_weights else None
        refused = read_refused(root)
        for shard in tqdm(todo, desc="embed + score shards", disable=None):
            embed_shard(shard, root / "download", root, embedder, aesthetic, config.embed.batch_size, refused)
    return todo


def load_scores(root: Path) -> pd.DataFrame:
    shards = downloaded_shards(root)
    missing = [s for s in shards if not (root / "scores" / f"{s:05d}.parquet").exists()]
    if missing:
        raise PrepError(f"shards {missing[:10]}{' ...' if len(missing) > 10 else ''} are not embedded yet: "
                        "run `addpipe prep embed` (all array tasks) first")
    return pd.concat([pd.read_parquet(root / "scores" / f"{s:05d}.parquet") for s in shards], ignore_index=True)


def embedding_reader(root: Path, kind: str = "img"):
    """rows (sorted by shard, key, as `decide` passes them) -> their image (kind "img") or caption ("text")
    embeddings in that order, read from the per-shard npy files (memory-mapped: only the rows asked for load)."""
    def read(rows: pd.DataFrame) -> np.ndarray:
        parts = [np.zeros((0, 1), dtype=np.float32)]
        for shard, group in rows.groupby("shard", sort=False):
            array = np.load(root / "embeddings" / f"{kind}_emb" / f"{kind}_emb_{int(shard):05d}.npy", mmap_mode="r")
            parts.append(np.asarray(array[group["embedding_index"].to_numpy()], dtype=np.float32))
        return np.concatenate(parts[1:]) if len(parts) > 1 else parts[0]
    return read


def run_merge(config: PrepConfig) -> dict[str, Any]:
    """Global filters and dedup over all shards, then output shards and the report."""
    root = out_dir(config)
    scores = load_scores(root)
    settings = merge_settings(config)
    check_fingerprint(root / "shards", settings, rebuild=True)
    decisions_path = root / "shards" / "_decisions.parquet"
    decisions, stages = decide(scores, config.filter, config.dedup, embedding_reader(root))
    write_parquet_atomic(decisions, decisions_path)
    for shard in tqdm(sorted(decisions["shard"].unique()), desc="write shards", disable=None):
        write_output_shard(int(shard), decisions, root / "download", root / "shards")
    report = build_report(decisions, stages, config, root)
    logger.info("prep: %d of %d rows kept -> %s", report["kept"], report["input_rows"], report["shard_pattern"])
    return report


def run_prep(config: PrepConfig) -> dict[str, Any]:
    run_download(config, models_first=True)
    run_embed(config)
    return run_merge(config)
