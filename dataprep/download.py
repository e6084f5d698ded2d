"""Download stage: img2dataset, called through its Python API, writes WebDataset shards.

img2dataset is itself resumable: in its `incremental` mode a shard counts as done once its
`_stats.json` exists (written last), and unfinished shards are downloaded again from scratch. Its
multiprocessing distributor uses the spawn start method, so the caller must be an importable module or a
`__main__`-guarded script (the `addpipe` console script is).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Iterator

from addpipe.dataprep.config import DownloadConfig

logger = logging.getLogger(__name__)


def shard_count(rows: int, config: DownloadConfig) -> int:
    return max(1, math.ceil(rows / config.samples_per_shard))


def finished_shards(download_dir: Path) -> list[int]:
    return sorted(int(p.name.split("_")[0]) for p in Path(download_dir).glob("*_stats.json"))


@contextlib.contextmanager
def spark_session(config: DownloadConfig) -> Iterator[None]:
    """With distributor=pyspark and spark_master set, a session on that cluster for the download's duration (img2dataset
    takes the active session); its executors run this interpreter, so they import the same img2dataset."""
    if config.distributor != "pyspark":
        yield
        return
    # The executors' Python is the driver's PYSPARK_PYTHON (else `python3` on their PATH, which lacks img2dataset
    # in a virtual environment): this interpreter, unless the user chose one. Local sessions included.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    if not config.spark_master:
        yield
        return
    from pyspark.sql import SparkSession

    if SparkSession.getActiveSession() is not None:
        logger.info("download: using the active SparkSession, not download.spark_master=%s", config.spark_master)
        yield
        return
    try:
        spark = (SparkSession.builder.master(config.spark_master).appName("addpipe-download")
                 .getOrCreate())
    except Exception as error:  # py4j's errors carry a Java stack: the first line says what happened
        raise RuntimeError(f"download.spark_master={config.spark_master}: no Spark session could be started: "
                           f"{str(error).strip().splitlines()[0]}") from None
    try:
        yield
    finally:
        spark.stop()


@contextlib.contextmanager
def quiet_bar_off_terminal() -> Iterator[None]:
    """img2dataset's own bar (its multiprocessing distributor's tqdm, in this process) drawn only on a terminal.

    In a SLURM log its carriage returns make one endless line; off a terminal img2dataset's logger process still
    prints its periodic plain "worker - success: ..." lines, and prep logs each stage it finishes.
    """
    import img2dataset.distributor as distributor
    from tqdm import tqdm

    original = distributor.tqdm
    distributor.tqdm = functools.partial(tqdm, disable=None)  # None: off when stderr is not a terminal
    try:
        yield
    finally:
        distributor.tqdm = original


def download(urls_parquet: Path, carried_columns: list[str], rows: int, config: DownloadConfig, download_dir: Path) -> list[int]:
    """Run img2dataset over the normalised table unless every shard is already finished; -> shard ids."""
    expected = list(range(shard_count(rows, config)))
    if finished_shards(download_dir) == expected:
        logger.info("download: all %d shards already finished", len(expected))
        return expected
    if config.distributor == "pyspark":
        try:
            import pyspark  # noqa: F401
        except ImportError as error:
            raise RuntimeError(
                "download.distributor=pyspark needs pyspark (pip install pyspark) and a Spark session "
                "(img2dataset uses the active one, or starts a local one)"
            ) from error
    from img2dataset import download as img2dataset_download

    from addpipe.dataprep.fetch import Guard, guarded_img2dataset

    guard = Guard(tuple(config.allowed_schemes), tuple(config.allowed_networks), tuple(config.allowed_file_roots))
    with spark_session(config), guarded_img2dataset(guard), quiet_bar_off_terminal():
        img2dataset_download(
            url_list=str(urls_parquet),
            input_format="parquet",
            url_col="url",
            caption_col="caption",
            save_additional_columns=list(carried_columns),
            output_folder=str(download_dir),
            output_format="webdataset",
            image_size=config.image_size,
            resize_mode=config.resize_mode,
            resize_only_if_bigger=config.resize_only_if_bigger,
            min_image_size=config.min_image_size,
            max_image_area=config.max_image_area,
            max_aspect_ratio=config.max_aspect_ratio if config.max_aspect_ratio is not None else math.inf,
            encode_format=config.encode_format,
            encode_quality=config.encode_quality,
            processes_count=config.processes,
            thread_count=config.threads,
            timeout=config.timeout,
            retries=config.retries,
            number_sample_per_shard=config.samples_per_shard,
            user_agent_token=config.user_agent_token,
            disallowed_header_directives=list(config.disallowed_header_directives),  # [] switches the check off
            distributor=config.distributor,
            incremental_mode="incremental",
            compute_hash="sha256",
            enable_wandb=False,
        )
    done = finished_shards(download_dir)
    if done != expected:
        raise RuntimeError(f"img2dataset finished {len(done)} of {len(expected)} shards in {download_dir}; rerun to retry the rest")
    return expected


def shard_stats(download_dir: Path, shard: int) -> dict:
    return json.loads((Path(download_dir) / f"{shard:05d}_stats.json").read_text())
