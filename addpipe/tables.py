"""Reading tables of rows (URL tables for curation, prompt lists for ODE pairs) in the formats users bring them in:
parquet, csv, tsv, jsonl or json, each optionally gzipped, and for prompts plain text with one per line."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from addpipe.errors import UserError

TABLE_FORMATS = ("parquet", "csv", "csv.gz", "tsv", "tsv.gz", "jsonl", "jsonl.gz", "json", "json.gz")


class InputError(UserError, ValueError):
    """An input table that cannot be used as it is."""


def detect_format(path: Path, configured: str = "auto", formats: tuple[str, ...] = TABLE_FORMATS,
                  setting: str = "input.format") -> str:
    """The format `configured`, or the one the file's suffix names (longest match: csv.gz before csv)."""
    if configured != "auto":
        return configured
    name = path.name.lower()
    for fmt in sorted(formats, key=len, reverse=True):
        if name.endswith("." + fmt):
            return fmt
    raise InputError(f"cannot tell the format of {path} from its suffix; set {setting} to one of {', '.join(formats)}")


def read_one(path: Path, fmt: str) -> pd.DataFrame:
    """One input file; a file that cannot be parsed as `fmt` (empty, truncated, malformed) is an InputError naming it."""
    compression = "gzip" if fmt.endswith(".gz") else None
    base = fmt.removesuffix(".gz")
    if path.stat().st_size == 0:
        raise InputError(f"input file {path} is empty (0 bytes)")
    try:
        if base == "parquet":
            # No Arrow thread pool: its workers can still be finishing when a process that read a table exits right
            # after (an error on an empty table), and then abort it ("terminate called without an active exception",
            # apache/arrow#34314). A URL table is read once; the download that follows dwarfs the read.
            return pd.read_parquet(path, use_threads=False)
        if base in ("csv", "tsv"):
            return pd.read_csv(path, sep="\t" if base == "tsv" else ",", compression=compression, keep_default_na=False,
                               na_values=[""], dtype_backend="numpy_nullable")
        if base == "txt":
            lines = path.read_text(encoding="utf-8").splitlines()
            return pd.DataFrame({"prompt": lines})
        return pd.read_json(path, lines=base == "jsonl", compression=compression)
    except Exception as error:  # pandas, pyarrow and gzip each raise their own types for a bad file
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"cannot read input file {path} as {fmt}: {detail}") from error
