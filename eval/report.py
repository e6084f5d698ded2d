"""The study report: ratings with intervals, win-rate heatmaps and quality against latency, as PNG plus
Markdown and HTML pages that show them with the numbers."""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np

from addpipe.plots import pyplot


def plot_ratings(ratings: dict[str, Any], title: str, path: Path) -> Path:
    plt = pyplot()
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
    axis.set_xlim(*rating_axis(values, low, high))
    axis.set_xlabel("rating (Elo scale; 100 points = a 64% win probability)")
    axis.set_title(f"{title} ({ratings['votes']} votes)")
    axis.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


MIN_RATING_SPAN = 100.0
"""The ratings plot shows at least this many Elo points (a 100-point gap is a 64% win probability), so a 3-point
spread, which is no preference at all, does not fill the axis and look like one."""


def rating_axis(values, low, high) -> tuple[float, float]:
    """The ratings plot's x range: the points and intervals, widened to MIN_RATING_SPAN when they span less."""
    lowest, highest = float(min(np.min(low), np.min(values))), float(max(np.max(high), np.max(values)))
    pad = max(0.0, MIN_RATING_SPAN - (highest - lowest)) / 2 + 5
    return lowest - pad, highest + pad


def separated(ratings: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """(arm, the arms it is rated above with confidence): its Bradley–Terry 95% interval lies wholly above theirs."""
    bt = ratings["bradley_terry"]
    found = []
    for arm in ratings["arms"]:
        if "low" not in bt[arm]:
            continue
        below = [other for other in ratings["arms"] if other != arm and "high" in bt[other]
                 and bt[arm]["low"] > bt[other]["high"]]
        if below:
            found.append((arm, below))
    return found


def rating_verdict(ratings: dict[str, Any]) -> str:
    """The ratings in words: which preferences the 95% intervals resolve, and that the rest are not resolved."""
    if not any("low" in entry for entry in ratings["bradley_terry"].values()):
        return "No intervals (too few votes to bootstrap): no preference can be read from these ratings."
    pairs = separated(ratings)
    if not pairs:
        return (f"**Verdict: the raters prefer no arm over another.** Every arm's 95% interval overlaps every other's "
                f"({ratings['votes']} votes): the differences in rating are within what chance gives.")
    resolved = "; ".join(f"{arm} above {', '.join(below)}" for arm, below in pairs)
    count = sum(len(below) for _, below in pairs)
    total = len(ratings["arms"]) * (len(ratings["arms"]) - 1) // 2
    return (f"**Verdict: {resolved}** (95% intervals apart); the other {total - count} of {total} pairs of arms "
            "overlap: not resolved.")


def speed_verdict(arms: dict[str, dict[str, Any]]) -> str:
    """The fastest arm against the slowest, by median latency per image."""
    timed = {arm: entry["latency_median_s"] for arm, entry in arms.items() if entry.get("latency_median_s")}
    if len(timed) < 2:
        return ""
    fast, slow = min(timed, key=timed.get), max(timed, key=timed.get)
    return (f"{fast} is {timed[slow] / timed[fast]:.1f}× faster than {slow} ({timed[fast]:.3g} s against "
            f"{timed[slow]:.3g} s per image, median).")


def distance_verdict(arms: dict[str, dict[str, Any]], name: str = "kid", title: str = "KID") -> str:
    """Which arms are resolved as worse than the best on one distance (their interval lies wholly above the best
    arm's), in words."""
    scored = {arm: entry for arm, entry in arms.items() if name in entry and entry.get("intervals", {}).get(name)}
    if len(scored) < 2:
        return ""
    best = min(scored, key=lambda arm: scored[arm][name])
    ceiling = scored[best]["intervals"][name][1]
    worse = [arm for arm in scored if arm != best and scored[arm]["intervals"][name][0] > ceiling]
    if not worse:
        return (f"On {title}, {best} is lowest but no arm is resolved from it: every interval overlaps its own. "
                "More prompts narrow the intervals.")
    return (f"On {title}, {best} is lowest; resolved as worse (interval wholly above {best}'s): {', '.join(worse)}; "
            f"not resolved from it: {', '.join(a for a in scored if a not in worse and a != best) or 'none'}.")


def plot_win_rates(ratings: dict[str, Any], title: str, path: Path) -> Path:
    plt = pyplot()
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
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(8, 5))
    for number, arm in enumerate(ratings["arms"]):
        if arm not in arms:
            continue
        bt = ratings["bradley_terry"][arm]
        x = arms[arm]["latency_median_s"]
        axis.errorbar([x], [bt["rating"]], yerr=[[max(0.0, bt["rating"] - bt.get("low", bt["rating"]))],
                                                 [max(0.0, bt.get("high", bt["rating"]) - bt["rating"])]],
                      fmt="o", capsize=4)
        steps = arms[arm]["steps"]
        # arms of one model sit close together: alternate the labels above and below their points
        axis.annotate(f"{arm} ({steps} step{'' if steps == 1 else 's'})", (x, bt["rating"]), textcoords="offset points",
                      xytext=(6, 6 if number % 2 == 0 else -12), fontsize=8)
    axis.set_xscale("log")
    # matplotlib labels log-scale minor ticks (2x10^-2, 3x10^-2 ...) on a narrow range, and they collide: label
    # 1, 2 and 5 of each decade in plain numbers instead
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    axis.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    axis.xaxis.set_minor_formatter(NullFormatter())
    axis.set_xlabel("median latency per image (s, log scale)")
    axis.set_ylabel(f"Bradley–Terry rating ({question if question in analysis['questions'] else 'combined'})")
    axis.set_title("Quality against latency")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


# (name in metrics.json, column title, format): the distance columns of every report, in this order
DISTANCES = (("frechet_distance", "FD", ".2f"), ("fd_infinity", "FD∞", ".2f"), ("kid", "KID ×10³", ".2f"),
             ("precision", "precision", ".2f"), ("recall", "recall", ".2f"))


def with_interval(entry: dict[str, Any], name: str, spec: str, scale: float = 1.0, value: Optional[float] = None) -> str:
    """ "69.10 [66.02, 72.31]": a metric (entry[name], or `value`) with its 95% interval from entry["intervals"];
    "" when there is no value."""
    value = entry.get(name) if value is None else value
    if not isinstance(value, (int, float)):
        return ""
    interval = entry.get("intervals", {}).get(name)
    text = f"{value * scale:{spec}}"
    return text + (f" [{interval[0] * scale:{spec}}, {interval[1] * scale:{spec}}]" if interval else "")


def distance_cells(entry: dict[str, Any]) -> list[str]:
    return [with_interval(entry, name, spec, 1000.0 if name == "kid" else 1.0) for name, _, spec in DISTANCES]


def metrics_section(metrics: dict[str, Any]) -> list[str]:
    arms = metrics["arms"]
    counts = {(e.get("samples", {}).get("generated"), e.get("samples", {}).get("reference")) for e in arms.values()}
    stated = "; ".join(f"{g} generated against {r} reference images" for g, r in sorted(counts, key=str) if g)
    lines = ["## Automated metrics", "", f"Features: `{metrics['features']}`, reference: `{metrics.get('reference')}`"
             + (f" (FD at {stated})" if stated else "") + ". Brackets: 95% intervals (FD: bootstrap of the generated images, the reference fixed; FD∞: "
             "the extrapolation's fit; KID: half-size subsets; precision, recall and adherence: Wilson; CLIP score and latency: "
             "bootstrap of the images). FD depends on the sample "
             "count and is biased upwards at few samples; FD∞ and KID are not: compare arms on those when counts differ.", "",
             "| arm | steps | " + " | ".join(title for _, title, _ in DISTANCES) + " | CLIP score | adherence | median latency (s) | p90 latency (s) |",
             "|---|---:|" + "---:|" * len(DISTANCES) + "---:|---:|---:|---:|"]
    verdicts = [v for v in (distance_verdict(arms, "kid", "KID"), distance_verdict(arms, "fd_infinity", "FD∞"),
                            speed_verdict(arms)) if v]
    for arm, entry in arms.items():
        ad = with_interval(entry, "adherence", ".1%", value=entry.get("adherence", {}).get("all"))
        lines.append(f"| {arm} | {entry['steps']} | " + " | ".join(distance_cells(entry)) + f" | {with_interval(entry, 'clip_score', '.2f')} | "
                     f"{ad} | {with_interval(entry, 'latency_median_s', '.3g')} | {entry['latency_p90_s']:.3g} |")
    return lines + [""] + ([" ".join(verdicts), ""] if verdicts else [])


def plot_distances(arms: dict[str, dict[str, Any]], path: Path) -> Optional[Path]:
    """FD, FD∞, KID and precision/recall per arm, each with its interval as an error bar; None without distances."""
    names = [arm for arm, entry in arms.items() if "kid" in entry]
    if not names:
        return None
    plt = pyplot()
    panels = (("frechet_distance", "FD (at the stated counts)"), ("fd_infinity", "FD∞ (extrapolated)"),
              ("kid", "KID ×10³"), ("precision", "precision (o) and recall (x)"))
    figure, axes = plt.subplots(1, 4, figsize=(max(10, 1.1 * len(names) * 2), 3.2))
    positions = np.arange(len(names))
    for axis, (name, title) in zip(axes, panels):
        series = [(name, "o", 0.0)] + ([("recall", "x", 0.15)] if name == "precision" else [])
        for key, marker, shift in series:
            scale = 1000.0 if key == "kid" else 1.0
            values = np.array([arms[a][key] for a in names]) * scale
            low = np.array([arms[a]["intervals"][key][0] for a in names]) * scale
            high = np.array([arms[a]["intervals"][key][1] for a in names]) * scale
            # clipped at 0: a bound equal to its value can land a rounding error on the wrong side
            axis.errorbar(positions + shift, values, yerr=[np.clip(values - low, 0, None), np.clip(high - values, 0, None)],
                          fmt=marker, capsize=3)
        if name == "kid":
            axis.axhline(0.0, color="gray", linewidth=0.8)
        axis.set_title(title, fontsize=9)
        axis.set_xticks(positions, names, rotation=45, ha="right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def vote_counts(analysis: dict[str, Any]) -> str:
    """Where every vote went: golden pairs (screening, not rated), raters screened out, and the rated ones."""
    raters = analysis["raters"].values()
    total = sum(r["votes"] for r in raters)
    golden = sum(r["golden_votes"] for r in raters)
    dropped = sum(r["votes"] - r["golden_votes"] for r in raters if not r["kept"])
    rated = total - golden - dropped
    per_question = ", ".join(f"{q} {r['votes']}" for q, r in analysis["questions"].items() if r and q != "combined")
    return (f"{total} votes in all: {golden} on golden pairs (the screening's known answers, never rated), {dropped} "
            f"from raters the screening dropped, and {rated} rated ({per_question}; 'combined' pools the questions).")


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
    lines.append(vote_counts(analysis))
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
        lines += ["", rating_verdict(ratings), "", f"![ratings](ratings_{question}.png) ![win rates](winrate_{question}.png)", ""]
    if analysis["categories"]:
        lines += ["## Per category (both questions, Bradley–Terry)", "", "| category | votes | order |", "|---|---:|---|"]
        for category, ratings in analysis["categories"].items():
            if ratings:
                order = ", ".join(f"{a} {ratings['bradley_terry'][a]['rating']:.0f}" for a in ratings["arms"])
                lines.append(f"| {category} | {ratings['votes']} | {order} |")
        lines.append("")
    if metrics:
        lines += metrics_section(metrics)
        distances = plot_distances(metrics["arms"], out / "distances.png")
        if distances:
            plots["distances"] = distances
            lines += ["![distances with their intervals](distances.png)", ""]
    if latency:
        lines += ["![quality against latency](quality_vs_latency.png)", ""]
    markdown = "\n".join(lines)
    (out / "report.md").write_text(markdown)
    (out / "report.html").write_text(markdown_to_html(markdown))
    return {"markdown": out / "report.md", "html": out / "report.html", **plots}


_INLINE = [(re.compile(r"\*\*(.+?)\*\*"), r"<strong>\1</strong>"), (re.compile(r"`([^`]+)`"), r"<code>\1</code>"),
           (re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)"), r'<a href="\2">\1</a>')]


def inline_html(text: str) -> str:
    """Escaped text with the Markdown the reports write inline: **bold**, `code` and [links](target)."""
    text = html.escape(text, quote=False)
    for pattern, replacement in _INLINE:
        text = pattern.sub(replacement, text)
    return text


def markdown_to_html(markdown: str, title: str = "Study report") -> str:
    """Just enough Markdown (headings, tables, images, paragraphs, bold, code, links) for the reports' own output.
    An image alone on its line spans the page; several on one line share it."""
    body, table = [], []

    def flush_table() -> None:
        if table:
            rows = [r for r in table if not set(r.replace("|", "").strip()) <= set("-:")]
            cells = [[inline_html(c.strip()) for c in r.strip().strip("|").split("|")] for r in rows]
            head = "".join(f"<th>{c}</th>" for c in cells[0])
            rest = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in cells[1:])
            body.append(f"<div class='table'><table><tr>{head}</tr>{rest}</table></div>")
            table.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush_table()
        heading = re.match(r"(#{1,3}) (.*)", line)
        if heading:
            level = len(heading.group(1))
            body.append(f"<h{level}>{inline_html(heading.group(2))}</h{level}>")
        elif line.startswith("!["):
            parts = line.split(") ")
            for part in parts:
                alt, _, src = part.strip().removeprefix("![").rstrip(")").partition("](")
                size = "wide" if len(parts) == 1 else "half"
                body.append(f'<img class="{size}" src="{html.escape(src)}" alt="{html.escape(alt)}">')
        elif line.strip():
            body.append(f"<p>{inline_html(line)}</p>")
    flush_table()
    style = ("body{font-family:system-ui,sans-serif;margin:2rem;max-width:1200px}"
             "td,th{padding:.2rem .6rem;border-bottom:1px solid #ddd;white-space:nowrap;text-align:left}"
             "div.table{overflow-x:auto}img.half{max-width:48%;margin:.3rem}img.wide{max-width:100%;margin:.3rem 0}"
             "code{background:#f3f3f3;padding:0 .2rem}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style>"
            f"</head><body>{''.join(body)}</body></html>")


def labelled_grid(images, row_labels: list[str], column_labels: list[str], path: Path, cell: int = 128) -> Path:
    """A grid of images (tensor N x 3 x H x W in [0, 1], row-major, len(row_labels) rows) upscaled by nearest
    neighbour to `cell` pixels, so a 32-pixel sample stays sharp, with each row and column named."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    rows, columns = len(row_labels), len(column_labels)
    if images.shape[0] != rows * columns:
        raise ValueError(f"{images.shape[0]} images do not fill {rows} rows x {columns} columns")
    font = ImageFont.load_default(size=13)
    left, top, gap = 150, 56, 4
    canvas = Image.new("RGB", (left + columns * (cell + gap), top + rows * (cell + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    pixels = (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    for index, array in enumerate(pixels):
        row, column = divmod(index, columns)
        tile = Image.fromarray(array).resize((cell, cell), Image.NEAREST)
        canvas.paste(tile, (left + column * (cell + gap), top + row * (cell + gap)))
    for column, label in enumerate(column_labels):
        text = "\n".join(textwrap.wrap(label, width=max(8, cell // 8))[:3])
        draw.multiline_text((left + column * (cell + gap) + 2, 4), text, fill="black", font=font, spacing=2)
    for row, label in enumerate(row_labels):
        text = "\n".join(textwrap.wrap(label, width=18)[:4])
        draw.multiline_text((6, top + row * (cell + gap) + cell // 2 - 10), text, fill="black", font=font, spacing=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
