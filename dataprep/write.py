"""Output shards in the shard contract (addpipe/shards.py): the kept samples of download shard i go to shard i.

Images are copied byte for byte (img2dataset already encoded them); each sample's json is
img2dataset's metadata plus every score. The shard's parquet lists every input row of the shard with its
final status (success / filtered / failed_to_download ...) and the reason in `error_message`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from addpipe.dataprep.filters import KEPT
from addpipe.shards import read_samples, write_tar_shard

SCORE_COLUMNS = ("clip_similarity", "aesthetic", "nearest_similarity", "caption_words", "caption_chars", "aspect_ratio")
DROPPED_COLUMNS = ("embedding_index", "shard", "reason")


def _plain(value: Any) -> Any:
    """JSON-safe scalars: numpy types to Python, NaN to None."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if value is pd.NA or value is pd.NaT:
        return None
    return value


def write_output_shard(shard: int, decisions: pd.DataFrame, download_dir: Path, shards_dir: Path) -> dict[str, int]:
    """Write shard `shard` from its rows of `decisions` unless it exists; -> its stats."""
    name = f"{shard:05d}"
    path = shards_dir / f"{name}.tar"
    if path.exists():
        return json.loads((shards_dir / f"{name}_stats.json").read_text())
    rows = decisions[decisions["shard"] == shard].sort_values("key", kind="stable")
    kept = rows[rows["reason"] == KEPT]
    raw = read_samples(download_dir / f"{name}.tar") if len(kept) else {}
    samples = []
    for _, row in kept.iterrows():
        files = raw[row["key"]]
        meta = json.loads(files["json"]) if "json" in files else {}
        meta.update({column: _plain(row[column]) for column in SCORE_COLUMNS if column in row.index})
        meta.pop("exif", None)
        sample = {"__key__": row["key"], "txt": files.get("txt", str(row["caption"]).encode()), "json": json.dumps(meta, sort_keys=True).encode()}
        for extension in ("jpg", "png", "webp"):
            if extension in files:
                sample[extension] = files[extension]
        samples.append(sample)
    listing = rows.drop(columns=[c for c in DROPPED_COLUMNS if c in rows.columns]).copy()
    failed_download = rows["status"] != "success"
    listing["status"] = np.where(rows["reason"] == KEPT, "success", np.where(failed_download, rows["status"], "filtered"))
    listing["error_message"] = np.where(rows["reason"] == KEPT, None, rows["reason"])
    stats = {"count": int(len(rows)), "successes": int(len(kept)), "failed_to_download": int(failed_download.sum()),
             "filtered": int(len(rows) - len(kept) - failed_download.sum())}
    write_tar_shard(path, samples, listing.to_dict("records"), stats)
    return stats
