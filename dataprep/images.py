"""Images already on disk as the input of curation (`addpipe prep --images DIR`): one table row per image file,
its caption from a sidecar text file, read by the same download stage as a URL table through `file:` URLs that the
guard confines to DIR. Everything after that (resizing, CLIP and aesthetic scores, filters, dedup, the report, the
shard contract, resuming) is URL curation's, unchanged."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from addpipe.tables import InputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTION_SUFFIXES = (".txt", ".caption")


def local_image_table(directory: Path) -> pd.DataFrame:
    """url (file: URI), caption (the stripped text of `<name>.txt` or `<name>.caption` beside the image, else
    empty: the caption filters then drop the row and say so) and path (relative to `directory`), for every image
    file under `directory`, in path order, hidden files and folders left out."""
    root = Path(directory).expanduser().resolve()
    if not root.is_dir():
        raise InputError(f"--images {directory}: not a directory")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise InputError(f"--images {directory}: no image files ({', '.join(IMAGE_SUFFIXES)}) under it")
    rows = []
    for path in files:
        caption = ""
        for suffix in CAPTION_SUFFIXES:
            sidecar = path.with_suffix(suffix)
            if sidecar.is_file():
                caption = sidecar.read_text(encoding="utf-8", errors="replace").strip()
                break
        rows.append({"url": path.as_uri(), "caption": caption, "path": str(path.relative_to(root))})
    return pd.DataFrame(rows)
