"""Atomic file writes shared by every stage: write beside the target, then rename over it, so a reader (or a
rerun after a crash) sees either the old file or the whole new one, never a torn one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` for a temporary path in the same directory, then move it over `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))


def write_parquet_atomic(table, path: Path) -> None:
    """A pandas DataFrame as parquet, without its index."""
    write_atomic(path, lambda tmp: table.to_parquet(tmp, index=False))
