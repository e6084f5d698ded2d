"""The input URL table: read it in any supported format, check its columns, normalise it for img2dataset.

The normalised table (`<out>/input/urls.parquet`) has `url`, `caption`, a `row_id` (the row's position in
the input, which every later stage carries so each input row can be accounted for) and every other input
column, renamed only where it would collide with a field img2dataset writes itself.

URLs whose scheme may not be fetched (`download.allowed_schemes`) never reach img2dataset, whose urllib
would happily read `file:` paths, fetch `ftp:` and decode `data:`: their url is blanked in the table it
reads (an empty url fails there at once, without any I/O) and `<out>/input/refused.parquet` keeps the
original url and the reason, which the embed stage puts back so the report counts them like any failure.
"""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path
from typing import Optional

import pandas as pd

from addpipe.dataprep.config import InputConfig
from addpipe.files import write_parquet_atomic
from addpipe.tables import InputError, detect_format, read_one  # noqa: F401 - InputError is this stage's error too

# Fields img2dataset puts into each sample's metadata; an input column of the same name would be overwritten.
IMG2DATASET_FIELDS = {"key", "status", "error_message", "width", "height", "original_width", "original_height",
                      "exif", "sha256", "md5", "sha512", "url", "caption"}


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
    if len(table) == 0:
        names = ", ".join(str(p) for p in files)
        raise InputError(f"input table {root} has no rows (read {names}): nothing to curate")
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


def refusal(url: str, allowed: list[str]) -> Optional[str]:
    """Why `url` must not be fetched, or None. The scheme is read exactly as urllib.request (img2dataset's
    fetcher) reads it, so whitespace, `<URL:...>` wrappers and upper case cannot smuggle one past the check."""
    try:
        scheme = urllib.request.Request(url).type
    except ValueError:  # no scheme at all: a relative or absolute path, '//host/x', ''
        return "scheme not allowed: (none)"
    if scheme in allowed:
        return None
    return f"scheme not allowed: {scheme if scheme.isprintable() else ascii(scheme)}"


def refuse_schemes(table: pd.DataFrame, allowed: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """-> (the table with refused urls blanked, the refused rows: row_id, url, reason)."""
    reasons = pd.Series([refusal(str(url), allowed) for url in table["url"]], index=table.index, dtype=object)
    refused = reasons.notna()
    out = pd.DataFrame({"row_id": table.loc[refused, "row_id"].to_numpy(), "url": table.loc[refused, "url"].to_numpy(),
                        "reason": reasons[refused].to_numpy()})
    table = table.copy()
    table.loc[refused, "url"] = ""
    return table, out


def refused_path(out_dir: Path) -> Path:
    return Path(out_dir) / "input" / "refused.parquet"


def read_refused(out_dir: Path) -> pd.DataFrame:
    """The refused rows indexed by row_id (empty when none were, or for an output written before the check)."""
    path = refused_path(out_dir)
    table = pd.read_parquet(path) if path.exists() else pd.DataFrame({"row_id": [], "url": [], "reason": []})
    return table.astype({"row_id": "int64"}).set_index("row_id")


def restore_refused(rows: pd.DataFrame, refused: pd.DataFrame) -> pd.DataFrame:
    """img2dataset's rows with each refused row's original url and its reason put back."""
    hit = rows["row_id"].isin(refused.index).to_numpy()
    if hit.any():
        ids = rows.loc[hit, "row_id"].to_numpy()
        rows.loc[hit, "url"] = refused.loc[ids, "url"].to_numpy()
        rows.loc[hit, "status"] = "failed_to_download"
        rows.loc[hit, "error_message"] = refused.loc[ids, "reason"].to_numpy()
    return rows


def write_normalised(config: InputConfig, out_dir: Path, allowed_schemes: list[str]) -> tuple[Path, list[str], int]:
    """Write `<out_dir>/input/urls.parquet` (and refused.parquet) once, atomically; -> (path, carried columns, rows).
    urls.parquet is written last: its presence marks the stage done."""
    path = Path(out_dir) / "input" / "urls.parquet"
    if path.exists():
        table = pd.read_parquet(path)
        carried = [c for c in table.columns if c not in ("url", "caption")]
        return path, carried, len(table)
    table, carried = normalise(read_table(config), config)
    table, refused = refuse_schemes(table, allowed_schemes)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_parquet_atomic(refused, refused_path(out_dir))
    write_parquet_atomic(table, path)
    return path, carried, len(table)
