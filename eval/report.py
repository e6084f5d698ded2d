"""The study report: ratings with intervals, win-rate heatmaps and quality against latency, as PNG plus
Markdown and HTML pages that show them with the numbers."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Optional

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_ratings(ratings: dict[str, Any], title: str, path: Path) -> Path:
    plt = _plt()
    arms = ratings["arms"][::-1]
    bt = ratings["bradley_terry"]
    values = np.array([bt[a]["rating"] for a in arms])
    low = np.array([bt[a].get("low", bt[a]["rating"]) for a in arms])
    high = np.array([bt[a].get("high", bt[a]["rating"]) for a in arms])
    figure, axis = plt.subplots(figsize=(6, 0.5 * len(arms) + 1.4))
    # a percentile interval need not contain the point estimate (undefeated arms are clipped): bars stop at it
    axis.errorbar(values, range(len(arms)), xerr=[np.maximum(values - low, 0), np.maximum(high - values, 0)], fmt="o", capsize=4, color="tab:blue", label="Bradley–Terry, 95% CI")
    axis.scatter([ratings["elo"][a] for a in arms], range(len(arms)), marker="x", color="tab:orange", label="online Elo")
    axis.set_yticks(range(len(arms)), arms)
    axis.set_xlabel("rating (Elo scale)")
    axis.set_title(f"{title} ({ratings['votes']} votes)")
    axis.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_win_rates(ratings: dict[str, Any], title: str, path: Path) -> Path:
    plt = _plt()
    matrix = ratings["win_rate"]
    arms = matrix["arms"]
    values = np.array([[np.nan if v is None else v for v in row] for row in matrix["rate"]])
    figure, axis = plt.subplots(figsize=(1.1 * len(arms) + 2.5, 1.0 * len(arms) + 1.5))
    image = axis.imshow(values, vmin=0, vmax=1, cmap="RdBu")
    for i in range(len(arms)):
        for j in range(len(arms)):
            if not np.isnan(values[i, j]):
                axis.text(j, i, f"{values[i, j]:.2f}\n[{matrix['low'][i][j]:.2f}, {matrix['high'][i][j]:.2f}]\nn={matrix['games'][i][j]}",
                          ha="center", va="center", fontsize=7)
    axis.set_xticks(range(len(arms)), arms, rotation=30, ha="right")
    axis.set_yticks(range(len(arms)), arms)
    axis.set_xlabel("opponent")
    axis.set_ylabel("win rate of")
    axis.set_title(title)
    figure.colorbar(image, ax=axis, fraction=0.046)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_quality_latency(analysis: dict[str, Any], path: Path, question: str = "quality") -> Optional[Path]:
    ratings = analysis["questions"].get(question) or analysis["questions"].get("combined")
    arms = analysis.get("arms", {})
    if not ratings or not arms:
        return None
    plt = _plt()
    figure, axis = plt.subplots(figsize=(6, 4))
    for arm in ratings["arms"]:
        if arm not in arms:
            continue
        bt = ratings["bradley_terry"][arm]
        x = arms[arm]["latency_median_s"]
        axis.errorbar([x], [bt["rating"]], yerr=[[max(0.0, bt["rating"] - bt.get("low", bt["rating"]))],
                                                 [max(0.0, bt.get("high", bt["rating"]) - bt["rating"])]],
                      fmt="o", capsize=4)
        axis.annotate(f"{arm} ({arms[arm]['steps']} steps)", (x, bt["rating"]), textcoords="offset points", xytext=(6, 4), fontsize=8)
    axis.set_xscale("log")
    axis.set_xlabel("median latency per image (s, log scale)")
    axis.set_ylabel(f"Bradley–Terry rating ({question if question in analysis['questions'] else 'combined'})")
    axis.set_title("Quality against latency")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write_report(study_dir: Path, analysis: dict[str, Any], metrics: Optional[dict[str, Any]] = None) -> dict[str, Path]:
    out = Path(study_dir) / "report"
    out.mkdir(exist_ok=True)
    plots: dict[str, Path] = {}
    for question, ratings in analysis["questions"].items():
        if ratings:
            plots[f"ratings_{question}"] = plot_ratings(ratings, f"Ratings: {question}", out / f"ratings_{question}.png")
            plots[f"winrate_{question}"] = plot_win_rates(ratings, f"Win rates: {question}", out / f"winrate_{question}.png")
    latency = plot_quality_latency(analysis, out / "quality_vs_latency.png")
    if latency:
        plots["quality_vs_latency"] = latency
    lines = ["# Study report", ""]
    kept = [n for n, r in analysis["raters"].items() if r["kept"]]
    lines.append(f"Raters: {len(analysis['raters'])}, kept after golden-pair screening: {len(kept)} "
                 f"(min accuracy {analysis['settings']['min_golden_accuracy']}, min golden votes {analysis['settings']['min_golden_votes']}).")
    lines.append("")
    for question, ratings in analysis["questions"].items():
        if not ratings:
            continue
        lines += [f"## {question} ({ratings['votes']} votes)", "", "| rank | arm | Bradley–Terry | 95% CI | rank CI | online Elo | steps | median latency (s) |",
                  "|---:|---|---:|---|---|---:|---:|---:|"]
        for rank, arm in enumerate(ratings["arms"], start=1):
            bt = ratings["bradley_terry"][arm]
            info = analysis["arms"].get(arm, {})
            interval = f"[{bt['low']:.0f}, {bt['high']:.0f}]" if "low" in bt else ""
            rank_ci = f"{bt['rank_low']}–{bt['rank_high']}" if "rank_low" in bt else ""
            lines.append(f"| {rank} | {arm} | {bt['rating']:.0f} | {interval} | {rank_ci} | {ratings['elo'][arm]:.0f} | "
                         f"{info.get('steps', '')} | {info.get('latency_median_s', float('nan')):.3g} |")
        lines += ["", f"![ratings](ratings_{question}.png) ![win rates](winrate_{question}.png)", ""]
    if analysis["categories"]:
        lines += ["## Per category (both questions, Bradley–Terry)", "", "| category | votes | order |", "|---|---:|---|"]
        for category, ratings in analysis["categories"].items():
            if ratings:
                order = ", ".join(f"{a} {ratings['bradley_terry'][a]['rating']:.0f}" for a in ratings["arms"])
                lines.append(f"| {category} | {ratings['votes']} | {order} |")
        lines.append("")
    if metrics:
        lines += ["## Automated metrics", "", f"Features: `{metrics['features']}`, reference: `{metrics.get('reference')}`", "",
                  "| arm | steps | Fréchet distance | CLIP score | adherence | median latency (s) | p90 latency (s) |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for arm, entry in metrics["arms"].items():
            fd = f"{entry['frechet_distance']:.2f}" if "frechet_distance" in entry else ""
            cs = f"{entry['clip_score']:.2f}" if "clip_score" in entry else ""
            ad = f"{entry['adherence']['all']:.1%}" if "all" in entry.get("adherence", {}) else ""
            lines.append(f"| {arm} | {entry['steps']} | {fd} | {cs} | {ad} | {entry['latency_median_s']:.3g} | {entry['latency_p90_s']:.3g} |")
        lines.append("")
    if latency:
        lines += ["![quality against latency](quality_vs_latency.png)", ""]
    markdown = "\n".join(lines)
    (out / "report.md").write_text(markdown)
    (out / "report.html").write_text(markdown_to_html(markdown))
    return {"markdown": out / "report.md", "html": out / "report.html", **plots}


def markdown_to_html(markdown: str, title: str = "Study report") -> str:
    """Just enough Markdown (headings, tables, images, paragraphs) for the report's own output."""
    body, table = [], []

    def flush_table() -> None:
        if table:
            rows = [r for r in table if not set(r.replace("|", "").strip()) <= set("-:")]
            cells = [[html.escape(c.strip()) for c in r.strip().strip("|").split("|")] for r in rows]
            head = "".join(f"<th>{c}</th>" for c in cells[0])
            rest = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in cells[1:])
            body.append(f"<table><tr>{head}</tr>{rest}</table>")
            table.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush_table()
        if line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("!["):
            for part in line.split(") "):
                alt, _, src = part.strip().removeprefix("![").rstrip(")").partition("](")
                body.append(f'<img src="{html.escape(src)}" alt="{html.escape(alt)}">')
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    flush_table()
    style = "body{font-family:system-ui,sans-serif;margin:2rem;max-width:1100px}td,th{padding:.2rem .6rem;border-bottom:1px solid #ddd}img{max-width:48%;margin:.3rem}"
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style></head><body>{''.join(body)}</body></html>"
