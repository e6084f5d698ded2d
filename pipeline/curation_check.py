"""How well the demo's curation did against what the loopback web planted: the dedup's precision and recall on the
planted copies and re-encodings, and how well the CLIP score separates matching from shuffled captions.

The web (demo.web_rows) records which served rows copy which: byte-identical copies (the exact filter's job) and
JPEG re-encodings (only the near-duplicate filter can find them). A planted row counts towards recall when it and
its source both reached the dedup stage and the source was kept: only then is it a duplicate of a kept image."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

FILTER_OF = {"exact_copy": "exact_duplicate", "reencoding": "near_duplicate"}


def row_index(url: str) -> int:
    """The web table's row of a demo URL (…/digits/000123.png -> 123)."""
    found = re.search(r"/digits/(\d+)\.\w+$", url)
    if found is None:
        raise ValueError(f"{url} is not a demo digit URL")
    return int(found.group(1))


def dedup_accuracy(decisions: pd.DataFrame, planted: dict[str, dict[int, int]]) -> dict[str, dict[str, Any]]:
    """Per planted kind: {"planted", "eligible", "found", "drops", "precision", "recall"} where drops are the rows
    its filter removed and found those of them that are planted copies of a kept image."""
    reason = dict(zip(decisions["url"].map(row_index), decisions["reason"]))
    result = {}
    for kind, copies in planted.items():
        label = FILTER_OF[kind]
        reached = {row: source for row, source in copies.items()
                   if reason.get(row) in ("kept", label) and reason.get(source) == "kept"}
        drops = {row for row, why in reason.items() if why == label}
        found = drops & set(copies)
        result[kind] = {"planted": len(copies), "eligible": len(reached), "drops": len(drops), "found": len(found),
                        "precision": len(found) / len(drops) if drops else None,
                        "recall": len(set(reached) & drops) / len(reached) if reached else None}
    return result


def caption_separation(rows: pd.DataFrame, images: np.ndarray, texts: np.ndarray, seed: int = 0) -> dict[str, float]:
    """CLIP cosine of every embedded image with its own caption against a caption drawn from another row; -> the
    two means and the ROC AUC (the chance a matching pair outscores a shuffled one; 0.5 = the score says nothing)."""
    from sklearn.metrics import roc_auc_score

    if len(images) < 2:
        raise ValueError("caption separation needs at least two embedded images")
    count = len(texts)
    other = (np.arange(count) + np.random.default_rng(seed).integers(1, count, size=count)) % count  # never itself
    captions = rows["caption"].to_numpy()
    negative = captions != captions[other]  # a drawn caption with the same text is no negative
    matching, shuffled = (images * texts).sum(1), (images * texts[other]).sum(1)[negative]
    labels = np.r_[np.ones(len(matching)), np.zeros(len(shuffled))]
    return {"matching_mean": float(matching.mean()), "shuffled_mean": float(shuffled.mean()),
            "auc": float(roc_auc_score(labels, np.r_[matching, shuffled]))}


def curation_check(prep_dir: Path, planted: dict[str, dict[int, int]]) -> dict[str, Any]:
    """The demo's curation quality from prep's decisions and embeddings (prep/shards/_decisions.parquet)."""
    from addpipe.dataprep.prep import embedding_reader
    from addpipe.dataprep.report import summarise

    decisions = pd.read_parquet(prep_dir / "shards" / "_decisions.parquet")
    embedded = decisions[decisions["embedding_index"] >= 0].sort_values(["shard", "key"], kind="stable")
    images = embedding_reader(prep_dir, "img")(embedded)
    texts = embedding_reader(prep_dir, "text")(embedded)
    nearest = summarise(decisions["nearest_similarity"])  # prep's own summary: rows with no earlier kept image left out
    return {"dedup": dedup_accuracy(decisions, planted),
            "caption_separation": caption_separation(embedded, images, texts),
            "nearest_similarity_median": nearest["median"] if nearest else None}


def load_planted(path: Path) -> dict[str, dict[int, int]]:
    return {kind: {int(row): int(source) for row, source in copies.items()}
            for kind, copies in json.loads(path.read_text()).items()}
