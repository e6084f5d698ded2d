"""The input URL table: read it in any supported format, check its columns, normalise it for img2dataset.

The normalised table (`<out>/input/urls.parquet`) has `url`, `caption`, a `row_id` (the row's position in
the input, which every later stage carries so each input row can be accounted for) and every other input
column, renamed only where it would collide with a field img2dataset writes itself.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from addpipe.dataprep.config import INPUT_FORMATS, InputConfig

# Fields img2dataset puts into each sample's metadata; an input column of the same name would be overwritten.
IMG2DATASET_FIELDS = {"key", "status", "error_message", "width", "height", "original_width", "original_height",
                      "exif", "sha256", "md5", "sha512", "url", "caption"}


class InputError(ValueError):
    """An input table that cannot be used as it is."""


def detect_format(path: Path, configured: str) -> str:
    if configured != "auto":
        return configured
    name = path.name.lower()
    for fmt in sorted(INPUT_FORMATS, key=len, reverse=True):
        if name.endswith("." + fmt):
            return fmt
    raise InputError(f"cannot tell the format of {path} from its suffix; set input.format to one of {', '.join(INPUT_FORMATS)}")


def read_one(path: Path, fmt: str) -> pd.DataFrame:
    compression = "gzip" if fmt.endswith(".gz") else None
    base = fmt.removesuffix(".gz")
    if base == "parquet":
        return pd.read_parquet(path)
    if base in ("csv", "tsv"):
        return pd.read_csv(path, sep="\t" if base == "tsv" else ",", compression=compression, keep_default_na=False,
                           na_values=[""], dtype_backend="numpy_nullable")
    return pd.read_json(path, lines=base == "jsonl", compression=compression)


def read_table(config: InputConfig) -> pd.DataFrame:
    """All rows of the input (a file, or every matching file of a directory in name order)."""
    if not config.urls:
        raise InputError("input.urls is empty: give the URL table with --urls (parquet, csv, tsv or jsonl, optionally .gz)")
    root = Path(os.path.expanduser(config.urls))
    if root.is_dir():
        files = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith((".", "_")))
        if config.format != "auto":
            files = [p for p in files if p.name.lower().endswith("." + config.format)]
        if not files:
            raise InputError(f"no input files in directory {root}")
    elif root.is_file():
        files = [root]
    else:
        raise InputError(f"input table {root} does not exist")
    frames = [read_one(path, detect_format(path, config.format)) for path in files]
    table = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    missing = [c for c in (config.url_column, config.caption_column) if c not in table.columns]
    if missing:
        raise InputError(
            f"input {root} has no column {', '.join(repr(c) for c in missing)}; its columns are: "
            f"{', '.join(map(str, table.columns))} (set input.url_column / input.caption_column)"
        )
    return table


def normalise(table: pd.DataFrame, config: InputConfig) -> tuple[pd.DataFrame, list[str]]:
    """-> (table with url, caption, row_id and the carried columns; names of the carried columns)."""
    extra = [c for c in table.columns if c not in (config.url_column, config.caption_column)]
    renamed = {c: (f"input_{c}" if c in IMG2DATASET_FIELDS or c == "row_id" else str(c)) for c in extra}
    out = pd.DataFrame({
        "url": table[config.url_column].astype("string").fillna(""),
        # A missing caption becomes empty text so it reaches the caption filter and is counted there.
        "caption": table[config.caption_column].astype("string").fillna(""),
        "row_id": pd.RangeIndex(len(table)).astype("int64"),
    })
    for column in extra:
        out[renamed[column]] = table[column].to_numpy()
    return out, ["row_id"] + [renamed[c] for c in extra]


def write_normalised(config: InputConfig, out_dir: Path) -> tuple[Path, list[str], int]:
    """Write `<out_dir>/input/urls.parquet` once (atomic); -> (path, carried columns, row count)."""
    path = Path(out_dir) / "input" / "urls.parquet"
    if path.exists():
        table = pd.read_parquet(path)
        carried = [c for c in table.columns if c not in ("url", "caption")]
        return path, carried, len(table)
    table, carried = normalise(read_table(config), config)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".parquet.tmp")
    table.to_parquet(tmp, index=False)
    os.replace(tmp, path)
    return path, carried, len(table)
