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

from addpipe.dataprep.config import INPUT_FORMATS, InputConfig
from addpipe.files import write_parquet_atomic

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
    """One input file; a file that cannot be parsed as `fmt` (empty, truncated, malformed) is an InputError naming it."""
    compression = "gzip" if fmt.endswith(".gz") else None
    base = fmt.removesuffix(".gz")
    if path.stat().st_size == 0:
        raise InputError(f"input file {path} is empty (0 bytes)")
    try:
        if base == "parquet":
            return pd.read_parquet(path)
        if base in ("csv", "tsv"):
            return pd.read_csv(path, sep="\t" if base == "tsv" else ",", compression=compression, keep_default_na=False,
                               na_values=[""], dtype_backend="numpy_nullable")
        return pd.read_json(path, lines=base == "jsonl", compression=compression)
    except Exception as error:  # pandas, pyarrow and gzip each raise their own types for a bad file
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"cannot read input file {path} as {fmt}: {detail}") from error


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
