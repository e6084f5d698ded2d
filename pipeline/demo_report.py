"""The demo's report: one HTML page (and its Markdown) over every stage's outputs, with plots."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

TRAINING_CURVES = [("loss/distillation", "distillation loss"), ("loss/generator_adversarial", "generator adversarial loss"),
                   ("logits/real", "discriminator logit, real"), ("logits/fake", "discriminator logit, fake")]


def plot_training(metrics_jsonl: Path, path: Path) -> Path | None:
    """The ADD losses and discriminator logits against the step, one panel each."""
    from addpipe.eval.report import _plt

    if not metrics_jsonl.is_file():
        return None
    records = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line.strip()]
    plt = _plt()
    figure, axes = plt.subplots(1, len(TRAINING_CURVES), figsize=(4 * len(TRAINING_CURVES), 3))
    for axis, (key, title) in zip(axes, TRAINING_CURVES):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            axis.plot(*zip(*points))
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("step")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def metric_rows(metrics: dict[str, Any], baseline: str = "teacher-50") -> list[str]:
    arms = metrics["arms"]
    base = arms.get(baseline, {}).get("latency_median_s")
    fields = sorted({f for entry in arms.values() for f in entry.get("adherence", {}) if f not in ("all", "counted")})
    lines = ["| arm | steps | guidance | FID (classifier features) | adherence, all | "
             + " | ".join(f"adherence, {f}" for f in fields) + " | median latency (s) | speed-up vs " + baseline + " |",
             "|---|---:|---:|---:|---:|" + "---:|" * len(fields) + "---:|---:|"]
    for arm, entry in arms.items():
        adherence = entry.get("adherence", {})
        speed = f"{base / entry['latency_median_s']:.1f}×" if base else ""
        lines.append(f"| {arm} | {entry['steps']} | {entry.get('guidance', 0)} | {entry.get('frechet_distance', float('nan')):.2f} | "
                     f"{adherence.get('all', float('nan')):.1%} | " + " | ".join(f"{adherence.get(f, float('nan')):.1%}" for f in fields)
                     + f" | {entry['latency_median_s']:.4f} | {speed} |")
    return lines


def write_demo_report(out: Path, summary: dict[str, Any]) -> Path:
    from addpipe.eval.report import markdown_to_html

    out = Path(out)
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    prep = summary["prep"]
    lines = ["# addpipe demo", "",
             f"Total {summary['total_seconds']:.0f} s on this machine; per stage: "
             + ", ".join(f"{k} {v:.0f} s" for k, v in summary["seconds"].items()) + ".", "",
             "## Generated images", "",
             "Top row: the teacher at 50 DDIM steps with guidance 3. Below: the ADD student at 1, 2 and 4 steps (no guidance), "
             "same prompts.", "", "![image grid](demo_grid.png)", "",
             "## Data curation (addpipe prep)", "",
             f"{prep['input_rows']} URL rows in, {prep['kept']} samples kept in {prep['shards']} shards. Every row's fate:", "",
             "| reason | rows |", "|---|---:|"]
    lines += [f"| {reason} | {count} |" for reason, count in prep["reasons"].items()]
    prep_plots = [os.path.relpath(Path(p) if Path(p).is_absolute() else out / "prep" / p, out) for p in prep.get("plots", {}).values()]
    lines += ["", " ".join(f"![{Path(p).stem}]({p})" for p in prep_plots), ""] if prep_plots else [""]
    lines += ["## Models", "", "| model | trained on | held-out accuracy |", "|---|---|---|"]
    for name, directory, config in (("DINOv2-architecture ViT (discriminator features)", summary["models"]["dinov2"], "addpipe_backbone.json"),
                                    ("content classifier (FID features, adherence, judge)", summary["models"]["classifier"], "addpipe_classifier.json")):
        info = json.loads((Path(directory) / config).read_text())
        accuracy = ", ".join(f"{k} {v:.1%}" for k, v in info.get("holdout_accuracy", {}).items())
        lines.append(f"| {name} | {info.get('images')} curated images, {info.get('steps')} steps | {accuracy} |")
    lines += ["", f"Teacher: `{summary['teacher']}`. Student: `{summary['student']}`.", ""]
    curves = plot_training(Path(summary["student"]).parent / "metrics.jsonl", plots / "training.png")
    if curves:
        lines += ["## ADD training", "", "![training curves](plots/training.png)", ""]
    lines += ["## Automated metrics", "",
              "FID: Fréchet distance to the curated images in the feature space of the content classifier (a CNN trained on "
              "the real data, not the discriminator's backbone). Adherence: the share of images in which that classifier "
              "sees what the prompt asked for.", ""]
    lines += metric_rows(summary["metrics"]) + [""]
    ratings = summary.get("ratings")
    if ratings:
        judging = summary.get("judging", {})
        lines += ["## Pairwise study (judge-model raters)", "",
                  f"{len(judging.get('judges', []))} judge raters voted through the rating server and database "
                  f"({judging.get('votes', 0)} pairs in this run); "
                  f"{sum(r['kept'] for r in ratings['raters'].values())} of {len(ratings['raters'])} passed the golden-pair screening. "
                  "Bradley–Terry ratings with 95% bootstrap intervals:", ""]
        for question, result in ratings["questions"].items():
            if not result:
                continue
            lines += [f"**{question}** ({result['votes']} votes)", "", "| arm | Bradley–Terry | 95% CI | online Elo |", "|---|---:|---|---:|"]
            for arm in result["arms"]:
                bt = result["bradley_terry"][arm]
                ci_text = f"{bt['low']:.0f}–{bt['high']:.0f}" if "low" in bt else ""
                lines.append(f"| {arm} | {bt['rating']:.0f} | {ci_text} | {result['elo'][arm]:.0f} |")
            lines.append("")
        report_plots = sorted((out / "study" / "report").glob("*.png"))
        lines += [" ".join(f"![{p.stem}]({os.path.relpath(p, out)})" for p in report_plots), "",
                  "Full study report: study/report/report.html", ""]
    markdown = "\n".join(lines)
    (out / "report.md").write_text(markdown)
    path = out / "report.html"
    path.write_text(markdown_to_html(markdown, "addpipe demo"))
    return path
