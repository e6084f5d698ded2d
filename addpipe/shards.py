"""The shard contract every stage shares: WebDataset tars as img2dataset writes them (see docs in the README).

Per sample: an image (`jpg`, `jpeg`, `png` or `webp`), a caption (`txt`) and metadata (`json`: url, width,
height, original size, sha256 and any scores). Per shard: `NNNNN.tar`, `NNNNN.parquet` listing every input row
with its status and error, and `NNNNN_stats.json` counting them. Shard sets are named by brace patterns,
directories, or several of either joined by '::'.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import pandas as pd
import webdataset as wds
from braceexpand import braceexpand
from PIL import Image

from addpipe.errors import UserError

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")



@dataclass
class ShardSample:
    key: str
    image: Optional[Image.Image]
    caption: str
    meta: dict[str, Any] = field(default_factory=dict)
    error: Optional[str] = None   # a row that failed: listed in the parquet, not written to the tar


def encode_jpeg(image: Image.Image, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def read_samples(tar_path: Path) -> dict[str, dict[str, bytes]]:
    """key -> {extension: bytes} of a WebDataset tar."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar_path) as tar:
        for member in tar:
            if member.isfile():
                key, _, extension = member.name.rpartition("/")[2].partition(".")
                samples.setdefault(key, {})[extension] = tar.extractfile(member).read()
    return samples


def read_images(tar_path: Path) -> dict[str, tuple[str, bytes]]:
    """key -> (extension, bytes) of every image in a WebDataset tar."""
    return {key: next((ext, files[ext]) for ext in IMAGE_KEYS if ext in files)
            for key, files in read_samples(tar_path).items() if any(ext in files for ext in IMAGE_KEYS)}


def write_tar(path: Path, samples: list[dict[str, Any]]) -> None:
    """A WebDataset tar of `samples` (dicts with `__key__`), with a fixed mtime so reruns are byte-identical."""
    with open(path, "wb") as handle:
        writer = wds.TarWriter(handle, mtime=0)
        for sample in samples:
            writer.write(sample)
        writer.close()


def write_tar_shard(path: Path, samples: list[dict[str, Any]], rows: list[dict[str, Any]], stats: dict[str, Any]) -> None:
    """Write `samples` (WebDataset dicts with `__key__`) to `path`, then its `.parquet` (one row per input
    row) and `_stats.json`. The tar is renamed into place last, so a present tar means a finished shard;
    a fixed mtime makes reruns byte-identical."""
    path = Path(path)
    tmp = path.with_suffix(".tar.tmp")
    write_tar(tmp, samples)
    parquet_tmp = path.with_suffix(".parquet.tmp")
    pd.DataFrame(rows).to_parquet(parquet_tmp, index=False)
    os.replace(parquet_tmp, path.with_suffix(".parquet"))
    path.with_name(path.stem + "_stats.json").write_text(json.dumps(stats, sort_keys=True))
    os.replace(tmp, path)


def write_shard(samples: list[ShardSample], path: Path) -> dict[str, int]:
    """Write one shard of in-memory images (JPEG-encoded) with its parquet/stats siblings."""
    rows, records = [], []
    for sample in samples:
        row = {"key": sample.key, "caption": sample.caption, **{k: v for k, v in sample.meta.items() if not isinstance(v, (dict, list))}}
        if sample.error is not None or sample.image is None:
            rows.append({**row, "status": "failed", "error_message": sample.error or "no image"})
            continue
        data = encode_jpeg(sample.image)
        meta = {"key": sample.key, "caption": sample.caption, "width": sample.image.width,
                "height": sample.image.height, "original_width": sample.meta.get("original_width", sample.image.width),
                "original_height": sample.meta.get("original_height", sample.image.height),
                "sha256": hashlib.sha256(data).hexdigest(), **sample.meta, "status": "success"}
        records.append({"__key__": sample.key, "jpg": data, "txt": sample.caption, "json": json.dumps(meta)})
        rows.append({**row, "status": "success", "error_message": None})
    stats = {"count": len(samples), "successes": len(records), "failed_to_download": len(samples) - len(records)}
    write_tar_shard(path, records, rows, stats)
    return stats


def write_shards(samples: Iterable[ShardSample], out_dir: Path, samples_per_shard: int) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, chunk = [], []
    for sample in samples:
        chunk.append(sample)
        if len(chunk) == samples_per_shard:
            paths.append(out_dir / f"{len(paths):05d}.tar")
            write_shard(chunk, paths[-1])
            chunk = []
    if chunk:
        paths.append(out_dir / f"{len(paths):05d}.tar")
        write_shard(chunk, paths[-1])
    return paths


def shard_pattern(paths: list[Path]) -> str:
    """A brace pattern covering consecutively numbered shards: dir/{00000..00007}.tar."""
    if len(paths) == 1:
        return str(paths[0])
    return f"{paths[0].parent}/{{{paths[0].stem}..{paths[-1].stem}}}.tar"


class ShardError(UserError, FileNotFoundError):
    """Shards that are missing or too few for the data layout."""


def expand_shards(spec: str) -> list[str]:
    """'a/{000..009}.tar' brace patterns, directories of .tar files, or several joined by '::'."""
    if not spec:
        raise ShardError("data.shards is empty: give a brace pattern like '/data/{00000..00099}.tar' or a directory")
    paths: list[str] = []
    for part in spec.split("::"):
        part = os.path.expanduser(part.strip())
        if part and os.path.isdir(part):
            paths.extend(sorted(str(p) for p in Path(part).glob("*.tar")))
        elif part:
            paths.extend(braceexpand(part))
    if not paths:
        raise ShardError(f"no shards found for {spec!r}")
    remote = ("pipe:", "http://", "https://", "s3://", "gs://")
    missing = [p for p in paths if not p.startswith(remote) and not os.path.isfile(p)]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ShardError(f"{len(missing)} of {len(paths)} shards are missing: {shown}")
    return paths
