"""Per-shard stage: CLIP embeddings (clip-retrieval's layout) and every per-row score.

For download shard `i` it writes
- `embeddings/img_emb/img_emb_{i:05d}.npy`, `embeddings/text_emb/text_emb_{i:05d}.npy` (float16, L2-normalised)
  and `embeddings/metadata/metadata_{i:05d}.parquet` (key, row_id, url, caption), row-aligned, which is
  what clip-retrieval's inference writes and what its index tools (autofaiss, clip-retrieval back) read;
- `scores/{i:05d}.parquet`: every input row of the shard (failed downloads included) with its
  download status and the scores: clip_similarity, aesthetic, sizes, caption length.

Scores are computed from the stored float16 embeddings, so the merge step (which reads the files) and
this step agree exactly. `scores/` is written last: its presence marks the shard finished.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm import tqdm

from addpipe.dataprep.aesthetic import AestheticPredictor
from addpipe.clip import ClipEmbedder
from addpipe.shards import read_images
from addpipe.dataprep.table import restore_refused
from addpipe.files import write_atomic, write_parquet_atomic

logger = logging.getLogger(__name__)


def caption_stats(captions: pd.Series) -> tuple[pd.Series, pd.Series]:
    text = captions.fillna("").astype(str).str.strip()
    return text.str.split().str.len().fillna(0).astype(int), text.str.len().astype(int)


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:  # a handle: np.save would append .npy to a path without it
            np.save(handle, array)
    write_atomic(path, write)


def embed_shard(shard: int, download_dir: Path, out_dir: Path, embedder: ClipEmbedder,
                aesthetic: Optional[AestheticPredictor], batch_size: int, refused: Optional[pd.DataFrame] = None) -> Path:
    """Embed and score one download shard; returns the scores file (skipped when it already exists).
    `refused` (table.read_refused) puts back the url and reason of rows whose scheme was never fetched."""
    scores_path = out_dir / "scores" / f"{shard:05d}.parquet"
    if scores_path.exists():
        return scores_path
    name = f"{shard:05d}"
    rows = pd.read_parquet(download_dir / f"{name}.parquet").sort_values("key", kind="stable").reset_index(drop=True)
    if refused is not None:
        rows = restore_refused(rows, refused)
    images = read_images(download_dir / f"{name}.tar")
    success = rows["status"] == "success"
    rows["embedding_index"] = -1
    pixels: list[Image.Image] = []
    index_of: dict[int, int] = {}
    for position in np.flatnonzero(success.to_numpy()):
        key = rows.at[position, "key"]
        try:
            with Image.open(io.BytesIO(images[key][1])) as image:
                image.load()
                pixels.append(image.convert("RGB"))
        except Exception as error:  # img2dataset wrote it, so this is rare: count it, do not stop
            rows.at[position, "status"] = "failed_to_decode"
            rows.at[position, "error_message"] = f"{type(error).__name__}: {error}"
            continue
        index_of[position] = len(pixels) - 1
    embedded = list(index_of)
    captions = [str(rows.at[p, "caption"] or "") for p in embedded]
    image_parts, text_parts = [], []
    for start in tqdm(range(0, len(embedded), batch_size), desc=f"embed shard {name}", leave=False, disable=None):
        image_parts.append(embedder.images(pixels[start : start + batch_size]).astype(np.float16))
        text_parts.append(embedder.texts(captions[start : start + batch_size]).astype(np.float16))
    if image_parts:
        image_emb, text_emb = np.concatenate(image_parts), np.concatenate(text_parts)
    else:  # a shard with no usable image still gets (0, dim) files, as index tools expect
        image_emb = text_emb = np.zeros((0, embedder.texts([""]).shape[1]), np.float16)
    for path in ("embeddings/img_emb", "embeddings/text_emb", "embeddings/metadata", "scores"):
        (out_dir / path).mkdir(parents=True, exist_ok=True)
    atomic_save_npy(out_dir / "embeddings/img_emb" / f"img_emb_{name}.npy", image_emb)
    atomic_save_npy(out_dir / "embeddings/text_emb" / f"text_emb_{name}.npy", text_emb)
    metadata = rows.loc[embedded, ["key", "row_id", "url", "caption"]].reset_index(drop=True)
    write_parquet_atomic(metadata, out_dir / "embeddings/metadata" / f"metadata_{name}.parquet")

    rows["shard"] = shard
    rows["clip_similarity"] = np.nan
    rows["aesthetic"] = np.nan
    if embedded:
        rows.loc[embedded, "embedding_index"] = np.arange(len(embedded))
        image32, text32 = image_emb.astype(np.float32), text_emb.astype(np.float32)
        rows.loc[embedded, "clip_similarity"] = np.einsum("nd,nd->n", image32, text32)
        if aesthetic is not None:
            with torch.no_grad():
                device = next(aesthetic.parameters()).device
                rows.loc[embedded, "aesthetic"] = aesthetic(torch.from_numpy(image32).to(device)).float().cpu().numpy()
    rows["caption_words"], rows["caption_chars"] = caption_stats(rows["caption"])
    short = rows[["original_width", "original_height"]].min(axis=1)
    rows["aspect_ratio"] = rows[["original_width", "original_height"]].max(axis=1) / short
    write_parquet_atomic(rows.drop(columns=[c for c in ("exif",) if c in rows.columns]), scores_path)
    return scores_path
