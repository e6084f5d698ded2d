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
    from addpipe.plots import pyplot

    if not metrics_jsonl.is_file():
        return None
    records = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line.strip()]
    plt = pyplot()
    figure, axes = plt.subplots(2, 2, figsize=(10, 6.5))
    for axis, (key, title) in zip(axes.flat, TRAINING_CURVES):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            axis.plot(*zip(*points), marker="o" if len(points) < 20 else None)
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("step")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def curation_lines(check: dict[str, Any] | None) -> list[str]:
    """The curation judged against what the demo's web planted (pipeline/curation_check.py)."""
    if not check:
        return []
    names = {"exact_copy": "byte-identical copies (exact filter)", "reencoding": "JPEG re-encodings (near-duplicate filter)"}
    lines = ["How well it did against what the demo's web planted: precision = planted copies among the rows the filter "
             "dropped; recall = share of the planted copies of a kept image that it dropped.", "",
             "| planted | served | copies of a kept image | dropped by the filter | of them planted | precision | recall |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    def share(value: float | None) -> str:
        return "" if value is None else f"{value:.0%}"

    for kind, entry in check["dedup"].items():
        lines.append(f"| {names.get(kind, kind)} | {entry['planted']} | {entry['eligible']} | {entry['drops']} | "
                     f"{entry['found']} | {share(entry['precision'])} | {share(entry['recall'])} |")
    separation = check["caption_separation"]
    lines += ["", f"CLIP score (the tiny CLIP trained on the served images and captions): mean cosine "
              f"{separation['matching_mean']:.2f} with the image's own caption against {round(separation['shuffled_mean'], 2) + 0.0:.2f} "
              f"with another row's; a matching caption outscores a shuffled one with probability {separation['auc']:.1%} "
              f"(ROC AUC). Median similarity of an image to its nearest earlier kept image: "
              f"{check['nearest_similarity_median']:.4f}.", ""]
    return lines


def metric_rows(metrics: dict[str, Any], baseline: str = "teacher-50", real: dict[str, Any] | None = None) -> list[str]:
    """The demo's metrics table: distances (classifier features) with their 95% intervals, adherence per field,
    latency; the real digits of the prompts last, as the floor the metric can resolve."""
    from addpipe.eval.report import DISTANCES, distance_cells, with_interval

    arms = metrics["arms"]
    base = arms.get(baseline, {}).get("latency_median_s")
    fields = sorted({f for entry in arms.values() for f in entry.get("adherence", {}) if f not in ("all", "counted")})
    lines = ["| arm | steps | guidance | " + " | ".join(title for _, title, _ in DISTANCES) + " | adherence, all | "
             + " | ".join(f"adherence, {f}" for f in fields) + " | median latency (s) | speed-up vs " + baseline + " |",
             "|---|---:|---:|" + "---:|" * len(DISTANCES) + "---:|" + "---:|" * len(fields) + "---:|---:|"]
    for arm, entry in arms.items():
        adherence = entry.get("adherence", {})
        speed = f"{base / entry['latency_median_s']:.1f}×" if base else ""
        lines.append(f"| {arm} | {entry['steps']} | {entry.get('guidance', 0)} | " + " | ".join(distance_cells(entry))
                     + f" | {with_interval(entry, 'adherence', '.1%', value=adherence.get('all'))} | "
                     + " | ".join(f"{adherence.get(f, float('nan')):.1%}" for f in fields)
                     + f" | {entry['latency_median_s']:.4f} | {speed} |")
    if real:  # the floor: what the real images of these prompts score
        lines.append("| real digits of these prompts | | | " + " | ".join(distance_cells(real))
                     + f" | {with_interval(real, 'adherence', '.1%')} | " + " | ".join("" for _ in fields) + " | | |")
    return lines


def write_demo_report(out: Path, summary: dict[str, Any]) -> Path:
    from addpipe.eval.report import markdown_to_html, plot_distances

    out = Path(out)
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    prep = summary["prep"]
    seconds = {name: value for name, value in summary["seconds"].items() if value is not None}
    lines = ["# addpipe demo", "",
             "Time on this machine, per stage, as measured by the run that did the work: "
             + ", ".join(f"{name} {value:.0f} s" for name, value in seconds.items())
             + f" (total {sum(seconds.values()):.0f} s)."
             + (f" This run reused: {', '.join(summary['reused'])} (finished earlier; its rerun took "
                f"{summary['this_run_seconds']:.0f} s)." if summary.get("reused") else ""), "",
             "## Generated images", "",
             "Top row: the teacher at 50 DDIM steps with guidance 3. Below: the ADD student at 1, 2 and 4 steps (no guidance); "
             "same prompts and noise per column.", "", "![image grid](demo_grid.png)", "",
             "## Data curation (addpipe prep)", "",
             f"{prep['input_rows']} URL rows in, {prep['kept']} samples kept in {prep['shards']} shard{'' if prep['shards'] == 1 else 's'}. Every row's fate:", "",
             "| reason | rows |", "|---|---:|"]
    lines += [f"| {reason} | {count} |" for reason, count in prep["reasons"].items()]
    lines += [""] + curation_lines(summary.get("curation_check"))
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
    prompts = summary["settings"]["prompts"]
    lines += ["## Automated metrics", "",
              "Distances to the curated images in the feature space of the content classifier (a CNN trained on the real "
              "data, not the discriminator's backbone): FD (Fréchet distance, the FID of this feature space) at the arm's "
              "image count, FD∞ (FD extrapolated to infinitely many images), KID (kernel distance, unbiased, ×10³), "
              "precision (fidelity) and recall (diversity). Adherence: the share of images in which that classifier sees "
              "what the prompt asked for. Brackets: 95% intervals.", ""]
    from addpipe.eval.report import distance_verdict, rating_verdict, speed_verdict, vote_counts

    lines += metric_rows(summary["metrics"], real=summary.get("real")) + [""]
    verdicts = [v for v in (distance_verdict(summary["metrics"]["arms"], "kid", "KID"),
                            distance_verdict(summary["metrics"]["arms"], "fd_infinity", "FD∞"),
                            speed_verdict(summary["metrics"]["arms"])) if v]
    if verdicts:
        lines += [" ".join(verdicts), ""]
    real_adherence = (summary.get("real") or {}).get("adherence")
    if isinstance(real_adherence, (int, float)):
        lines += [f"The real digits score {real_adherence:.1%} on adherence, not 100%: that is the classifier's own error "
                  "on real, varied handwriting (its held-out accuracy is in the Models table). A generated arm at or "
                  "above the real row draws digits the classifier finds easier to read than real ones; it does not "
                  "follow prompts better than the data.", ""]
    if plot_distances(summary["metrics"]["arms"], plots / "distances.png"):
        lines += ["![distances with their 95% intervals](plots/distances.png)", ""]
    if summary.get("real"):
        lines += [f"**Read FID with care at {prompts} images per arm.** The Fréchet distance of a finite sample is biased "
                  "upwards, and at this count that small-sample term is most of the number: the real digits whose captions "
                  f"are the prompts score {summary['real']['frechet_distance']:.1f}, not 0. Differences between arms smaller "
                  "than a few points are not resolved here: compare arms on KID and FD∞ (not biased by the count) and "
                  "their intervals; the reproduction table (`addpipe demo --full`: 1,000 prompts, 3 seeds) is the place to "
                  "compare arms.", ""]
    ratings = summary.get("ratings")
    if ratings:
        judging = summary.get("judging", {})
        answered = (f"{judging['votes']} votes on the study's {judging['pairs']} image pairs, "
                    f"{judging['assignments']} assignments answered in this run" if "pairs" in judging else "")
        lines += ["## Pairwise study (judge-model raters)", "",
                  f"{len(judging.get('judges', []))} judge raters voted through the rating server and database "
                  f"({answered}); "
                  f"{sum(r['kept'] for r in ratings['raters'].values())} of {len(ratings['raters'])} passed the golden-pair screening. "
                  "Bradley–Terry ratings with 95% bootstrap intervals. " + vote_counts(ratings), ""]
        for question, result in ratings["questions"].items():
            if not result:
                continue
            lines += [f"**{question}** ({result['votes']} votes)", "", "| arm | Bradley–Terry | 95% CI | online Elo |", "|---|---:|---|---:|"]
            for arm in result["arms"]:
                bt = result["bradley_terry"][arm]
                ci_text = f"{bt['low']:.0f}–{bt['high']:.0f}" if "low" in bt else ""
                lines.append(f"| {arm} | {bt['rating']:.0f} | {ci_text} | {result['elo'][arm]:.0f} |")
            lines += ["", rating_verdict(result), ""]
        report_plots = sorted((out / "study" / "report").glob("*.png"))
        lines += [" ".join(f"![{p.stem}]({os.path.relpath(p, out)})" for p in report_plots), "",
                  "Full study report: [study/report/report.html](study/report/report.html)", ""]
    markdown = "\n".join(lines)
    (out / "report.md").write_text(markdown)
    path = out / "report.html"
    path.write_text(markdown_to_html(markdown, "addpipe demo"))
    return path
