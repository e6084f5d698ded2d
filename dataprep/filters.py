"""Filter decisions over the scores of all shards: each row gets the first rule it fails, or "kept".

Rules run in a fixed order, each on the rows the previous ones left, so the report can count rows
entering and leaving every stage. Per-row rules are pure functions of a row's scores; the two global
rules (keep the top CLIP fraction, duplicates) see every row still alive, which is why they run in the
merge step after all shards are scored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import pandas as pd

from addpipe.dataprep.config import DedupConfig, FilterConfig
from addpipe.dataprep.dedup import near_duplicates

KEPT = "kept"


def short_error(status: str, message: Optional[str]) -> str:
    """A failed download's reason, stable enough to count: status plus the message's first line,
    with addresses, ports and source paths that vary between rows taken out."""
    text = str(message or "").strip().splitlines()[0] if message else ""
    text = re.sub(r"\S+\.(?:cpp|py|c|h):\d+", "", text)          # OpenCV's source locations
    text = re.sub(r"https?://\S+|127\.0\.0\.1:\d+", "<url>", text)
    text = re.sub(r"\s+", " ", text).strip(" :")
    return f"{status}: {text}" if text else str(status)


@dataclass
class Stage:
    name: str
    entered: int
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def left(self) -> int:
        return self.entered - sum(self.dropped.values())

    def as_dict(self) -> dict:
        return {"stage": self.name, "entered": self.entered, "dropped": dict(self.dropped), "left": self.left}


def per_row_rules(table: pd.DataFrame, config: FilterConfig) -> list[tuple[str, str, Callable[[pd.DataFrame], pd.Series]]]:
    """(stage, reason, failing-mask function) for every rule that applies to this input."""
    rules = [
        ("caption", "caption_empty", lambda t: t["caption_words"] == 0),
        ("caption", "caption_too_short", lambda t: (t["caption_words"] < config.min_caption_words)
         | (t["caption_chars"] < config.min_caption_chars)),
        ("size", "too_small", lambda t: t[["original_width", "original_height"]].min(axis=1) < config.min_resolution),
        ("size", "aspect_ratio", lambda t: t["aspect_ratio"] > config.max_aspect_ratio),
    ]
    if config.max_watermark is not None and config.watermark_column in table.columns:
        rules.append(("watermark", "watermark", lambda t: pd.to_numeric(t[config.watermark_column], errors="coerce") > config.max_watermark))
    if config.max_unsafe is not None and config.unsafe_column in table.columns:
        rules.append(("unsafe", "unsafe", lambda t: pd.to_numeric(t[config.unsafe_column], errors="coerce") > config.max_unsafe))
    if config.min_clip_similarity is not None:
        rules.append(("clip", "low_clip_similarity", lambda t: t["clip_similarity"] < config.min_clip_similarity))
    return rules


def top_fraction_cut(values: pd.Series, fraction: float) -> pd.Series:
    """Rows outside the top `fraction` by value (ties broken by order, so exactly ceil(f*n) are kept)."""
    keep = int(np.ceil(fraction * len(values)))
    order = np.argsort(-values.to_numpy(dtype=np.float64), kind="stable")
    outside = np.ones(len(values), dtype=bool)
    outside[order[:keep]] = False
    return pd.Series(outside, index=values.index)


def decide(scores: pd.DataFrame, filters: FilterConfig, dedup: DedupConfig,
           embeddings: Callable[[pd.DataFrame], np.ndarray]) -> tuple[pd.DataFrame, list[Stage]]:
    """-> (scores plus `reason` and `nearest_similarity` columns, the stage counts).

    `embeddings(rows)` returns the image embeddings of `rows` in order (read from the embedding files).
    """
    table = scores.sort_values(["shard", "key"], kind="stable").reset_index(drop=True)
    reason = pd.Series(KEPT, index=table.index, dtype=object)
    table["nearest_similarity"] = np.nan
    stages: list[Stage] = []

    def apply(stage_name: str, mask: pd.Series, label) -> None:
        alive = reason == KEPT
        hit = alive & mask.astype("boolean").fillna(False).astype(bool)
        if stages and stages[-1].name == stage_name:
            stage = stages[-1]
        else:
            stage = Stage(stage_name, int(alive.sum()))
            stages.append(stage)
        labels = label(table[hit]) if callable(label) else pd.Series(label, index=table.index[hit])
        for value, count in labels.value_counts(sort=False).items():
            stage.dropped[value] = stage.dropped.get(value, 0) + int(count)
        reason[hit] = labels

    apply("download", table["status"] != "success",
          lambda rows: pd.Series([short_error(s, m) for s, m in zip(rows["status"], rows["error_message"])], index=rows.index, dtype=object))
    for stage_name, label, rule in per_row_rules(table, filters):
        apply(stage_name, rule(table), label)
    if filters.clip_keep_fraction is not None:
        alive = reason == KEPT
        cut = top_fraction_cut(table.loc[alive, "clip_similarity"], filters.clip_keep_fraction)
        apply("clip", cut.reindex(table.index, fill_value=False), "below_clip_top_fraction")
    if filters.aesthetic_weights and filters.min_aesthetic is not None:
        apply("aesthetic", table["aesthetic"] < filters.min_aesthetic, "low_aesthetic")
    if dedup.enabled:
        alive = reason == KEPT
        repeated = table.loc[alive, "sha256"].duplicated(keep="first").reindex(table.index, fill_value=False)
        apply("dedup", repeated, "exact_duplicate")
        alive = reason == KEPT
        rows = table[alive]
        duplicate, nearest = near_duplicates(embeddings(rows), dedup.threshold, dedup.block_size, dedup.backend, dedup.faiss_index)
        table.loc[alive, "nearest_similarity"] = nearest
        apply("dedup", pd.Series(duplicate, index=rows.index).reindex(table.index, fill_value=False), "near_duplicate")
    table["reason"] = reason
    return table, stages
