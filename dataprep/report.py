"""The curation report: rows counted at every stage with the reason each was dropped, plus histograms."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from addpipe.dataprep.config import PrepConfig
from addpipe.files import write_text_atomic
from addpipe.dataprep.filters import KEPT, Stage

# score column -> (plot title, the config threshold drawn on it)
HISTOGRAMS = {
    "clip_similarity": ("CLIP image-caption cosine similarity", lambda c: c.filter.min_clip_similarity),
    "aesthetic": ("LAION aesthetic score", lambda c: c.filter.min_aesthetic if c.filter.aesthetic_weights else None),
    "short_side": ("original shorter side (px)", lambda c: c.filter.min_resolution),
    "caption_words": ("caption words", lambda c: c.filter.min_caption_words),
    "nearest_similarity": ("similarity to nearest earlier kept image", lambda c: c.dedup.threshold if c.dedup.enabled else None),
}


def summarise(values: pd.Series) -> Optional[dict[str, float]]:
    values = pd.to_numeric(values, errors="coerce").dropna()
    values = values[values > -1] if values.name == "nearest_similarity" else values
    if values.empty:
        return None
    q = values.quantile([0.05, 0.5, 0.95])
    return {"count": int(len(values)), "mean": float(values.mean()), "min": float(values.min()),
            "p05": float(q[0.05]), "median": float(q[0.5]), "p95": float(q[0.95]), "max": float(values.max())}


def histograms(decisions: pd.DataFrame, config: PrepConfig, plot_dir: Path) -> dict[str, str]:
    from addpipe.plots import pyplot

    plt = pyplot()
    plot_dir.mkdir(parents=True, exist_ok=True)
    table = decisions.copy()
    table["short_side"] = table[["original_width", "original_height"]].min(axis=1)
    written = {}
    for column, (title, threshold_of) in HISTOGRAMS.items():
        if column not in table.columns:
            continue
        downloaded = table[table["status"] == "success"]
        values = pd.to_numeric(downloaded[column], errors="coerce")
        if column == "nearest_similarity":
            values = values[values > -1]
        if values.dropna().empty:
            continue
        kept = values[downloaded.loc[values.index, "reason"] == KEPT].dropna()
        threshold = threshold_of(config)
        figure, axis = plt.subplots(figsize=(6, 3.6))
        count = min(50, max(5, int(np.sqrt(len(values.dropna()))) * 2))
        if column == "nearest_similarity":
            # what decides lies within a hair of 1 (duplicates at 0.99+): show the cosine distance on a log scale
            values, kept = (1 - values).clip(lower=1e-6), (1 - kept).clip(lower=1e-6)
            threshold = None if threshold is None else max(1 - threshold, 1e-6)
            bins = np.geomspace(values.min(), max(values.max(), values.min() * 10), count)
            axis.set_xscale("log")
            title = "distance to nearest earlier kept image (1 - cosine)"
        elif values.dropna().nunique() <= 12:
            # a few distinct values (pixel sizes, word counts): one bar each, wide enough to see beside the threshold
            present = np.sort(values.dropna().unique())
            span = np.ptp(np.append(present, threshold if threshold is not None else present[0])) or 1.0
            width = max(0.8 * np.diff(present).min() if len(present) > 1 else 0.0, 0.04 * span)
            bins = np.unique(np.concatenate([present - width / 2, present + width / 2]))
        else:
            bins = np.histogram_bin_edges(values.dropna(), bins=count)
        axis.hist(values.dropna(), bins=bins, color="0.75", label=f"downloaded ({values.notna().sum()})")
        axis.hist(kept, bins=bins, color="tab:blue", alpha=0.8, label=f"kept ({len(kept)})")
        if threshold is not None:
            label = f"threshold {1 - threshold:g} (distance {threshold:.1g})" if column == "nearest_similarity" else f"threshold {threshold:g}"
            axis.axvline(threshold, color="tab:red", linestyle="--", label=label)
        axis.set_title(title)
        axis.set_ylabel("rows")
        axis.legend(fontsize=8)
        figure.tight_layout()
        path = plot_dir / f"{column}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written[column] = str(path.relative_to(plot_dir.parent))
    return written


def build_report(decisions: pd.DataFrame, stages: list[Stage], config: PrepConfig, out_dir: Path) -> dict[str, Any]:
    reasons = decisions["reason"].value_counts().sort_index()
    report = {
        "input_rows": int(len(decisions)),
        "kept": int((decisions["reason"] == KEPT).sum()),
        "shards": int(decisions["shard"].nunique()),
        "stages": [stage.as_dict() for stage in stages],
        "reasons": {str(k): int(v) for k, v in reasons.items()},
        "scores": {c: summarise(decisions.loc[decisions["status"] == "success", c]) for c in
                   ("clip_similarity", "aesthetic", "nearest_similarity", "caption_words") if c in decisions.columns},
        "plots": histograms(decisions, config, out_dir / "plots"),
        "shard_pattern": shard_pattern_for(out_dir / "shards", int(decisions["shard"].max()) + 1 if len(decisions) else 0),
    }
    assert sum(report["reasons"].values()) == report["input_rows"]  # every input row has exactly one fate
    write_text_atomic(out_dir / "report.json", json.dumps(report, indent=2))
    write_text_atomic(out_dir / "report.md", markdown(report, config))
    return report


def shard_pattern_for(shards_dir: Path, count: int) -> str:
    return str(shards_dir / "00000.tar") if count <= 1 else f"{shards_dir}/{{00000..{count - 1:05d}}}.tar"


def markdown(report: dict[str, Any], config: PrepConfig) -> str:
    kept, total = report["kept"], report["input_rows"]
    lines = [
        "# Curation report", "",
        f"Input `{config.input.urls}`: **{total}** rows, **{kept}** kept ({100 * kept / max(1, total):.1f}%) "
        f"in {report['shards']} shard(s): `{report['shard_pattern']}`", "",
        "## Stages", "", "| stage | entered | dropped | left | why |", "|---|---:|---:|---:|---|",
    ]
    for stage in report["stages"]:
        why = "; ".join(f"{reason} ({count})" for reason, count in sorted(stage["dropped"].items(), key=lambda kv: -kv[1]))
        lines.append(f"| {stage['stage']} | {stage['entered']} | {sum(stage['dropped'].values())} | {stage['left']} | {why} |")
    lines += ["", "## Every row's fate", "", "| reason | rows |", "|---|---:|"]
    lines += [f"| {reason} | {count} |" for reason, count in sorted(report["reasons"].items(), key=lambda kv: -kv[1])]
    lines += ["", "## Scores (downloaded rows)", "", "| score | mean | p05 | median | p95 |", "|---|---:|---:|---:|---:|"]
    for name, summary in report["scores"].items():
        if summary:
            lines.append(f"| {name} | {summary['mean']:.4g} | {summary['p05']:.4g} | {summary['median']:.4g} | {summary['p95']:.4g} |")
    lines += [""] + [f"![{name}]({path})" for name, path in report["plots"].items()] + [""]
    return "\n".join(lines)
