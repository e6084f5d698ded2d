"""`addpipe demo --full`: the ADD paper's central claim and its ablations, reproduced at small scale on CPU.

Per seed: the ADD student (configs/tiny.yaml), a LoRA student (the same run with adapters on the teacher's UNet
instead of a full copy) and five ablations are trained from the same teacher, data and feature network
(distillation only, adversarial only, no image conditioning, and the two distillation weightings c(t) the config
does not use); then the teacher at 1, 2, 4 and 50 guided steps, the student and the LoRA student at 1, 2 and 4
steps (the LoRA as a `teacher+student_lora` arm: diffusers loads and fuses it) and each ablation at 1 step
generate the same held-out prompts from the same noise. Diffusion2GAN joins the table: the teacher's ODE pairs for the
curated captions (DDIM, 50 steps, the table's guidance) and a LatentLPIPS trained on the curated data are made once;
per seed its one-step generator and its regression-only ablation (E-LatentLPIPS without the GAN) are trained, and
the table reports their cost, pairs included, beside ADD's. Quality is the Fréchet distance in the
feature space of the content classifier (a CNN trained on the real data, not the discriminator's
backbone); prompt adherence is that classifier's accuracy on the requested digit and colours.

The targets are checked on every seed separately. Each (seed, variant) run and each study is resumable,
and the table is rewritten after every seed, so a long run that stops still reports what it finished.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from statistics import mean, stdev
from typing import Any, Optional

from addpipe.pipeline.demo import (CONFIG, CONFIG_D2G, DemoSettings, curate, evaluate, feature_models, real_reference, teacher_directory,
                                   train_student)

WEIGHTINGS = ("exponential", "sds", "nfsd")
# The LoRA student: this teacher's UNet is tiny (32/64 channels, one attention block per level), so the adapters
# also take the convolutions (as LCM-LoRA and DMD2 do); rank = alpha, the LCM-LoRA convention, and a rate ten times
# the full student's, the usual step between full and LoRA fine-tuning.
LORA = ["student.lora.rank=16", "student.lora.alpha=16", "student.lora.convolutions=true", "optim.student_lr=5e-4"]


def variants(config: Path = CONFIG) -> dict[str, list[str]]:
    """The ADD run ("add": `config` as it stands) and its ablations, each as overrides on top of `config`. The
    weighting ablations are the two c(t) the config does not use, so the table compares all three."""
    from addpipe.config import load
    from addpipe.train.config import TrainConfig

    default = load(TrainConfig, config, []).distill.weighting
    return {"add": [], "lora": LORA, "distillation-only": ["distill.adversarial=false"], "adversarial-only": ["distill.distillation=false"],
            "no-image-conditioning": ["discriminator.image_conditioning=false"],
            **{weighting: [f"distill.weighting={weighting}"] for weighting in WEIGHTINGS if weighting != default}}


# Diffusion2GAN on the demo: configs/tiny_d2g.yaml (a one-step generator whose discriminator, the teacher's
# pretrained UNet encoder, takes a rate near the student's).
D2G = ["method=diffusion2gan"]
PAIR_STEPS = 50


def d2g_variants(pairs: Path, lpips: Path) -> dict[str, list[str]]:
    """Diffusion2GAN's runs on the demo's pairs: the method, and its regression-only ablation."""
    common = D2G + [f"data.shards={pairs}", f"d2g.lpips={lpips}"]
    return {"d2g": common, "d2g-regression": common + ["d2g.adversarial=false"]}


def latent_lpips(settings: DemoSettings, out: Path, shards: str, teacher: Path) -> Path:
    """The LatentLPIPS Diffusion2GAN regresses with, trained on the curated data (train/methods/diffusion2gan/perceptual.py)."""
    from addpipe.pipeline.demo import FIELDS, done, mark_done
    from addpipe.train.methods.diffusion2gan.perceptual import train_latent_lpips

    directory = out / "models" / "latent_lpips"
    if not done(directory):
        # as long as the other feature networks' training: a third of the DINOv2's steps for the trunk, a sixth for the heads
        train_latent_lpips(shards, teacher, directory, FIELDS, settings.resolution, seed=settings.seed,
                           trunk_steps=max(1, settings.backbone_steps // 3), head_steps=max(1, settings.backbone_steps // 6))
        mark_done(directory)
    return directory / "latent_lpips.pth"


def ode_pairs(settings: DemoSettings, out: Path, shards: str, teacher: Path) -> tuple[Path, dict[str, Any]]:
    """The teacher's ODE pairs for every curated caption; -> (shards, cost of the run that made them)."""
    import time

    from addpipe.config import load
    from addpipe.pipeline.demo import done, mark_done
    from addpipe.shards import expand_shards, read_samples
    from addpipe.train.config import TrainConfig
    from addpipe.train.methods.diffusion2gan.pairs import collect_pairs

    directory = out / "pairs"
    cost_path = out / "pairs_cost.json"
    if done(directory):
        return directory, json.loads(cost_path.read_text())
    captions = [files["txt"].decode().strip() for shard in expand_shards(shards)
                for files in read_samples(Path(shard)).values() if "txt" in files]
    prompts = out / "pairs_prompts.txt"
    prompts.write_text("\n".join(captions) + "\n")
    config = load(TrainConfig, CONFIG_D2G, [f"model.teacher={teacher}", f"data.resolution={settings.resolution}",
                                        f"pairs.guidance={GUIDANCE}", f"pairs.steps={PAIR_STEPS}", "pairs.batch_size=64",
                                        "pairs.samples_per_shard=100", f"pairs.seed={settings.seed}"])
    started = time.monotonic()
    counts = collect_pairs(config, str(prompts), str(directory), device=settings.device)
    cost = {"pairs": counts["pairs"], "seconds": round(time.monotonic() - started, 1),
            "teacher_unet_evaluations": counts["pairs"] * PAIR_STEPS * (2 if GUIDANCE > 1 else 1),
            "sampler": f"DDIM {PAIR_STEPS} steps, guidance {GUIDANCE}"}
    cost_path.write_text(json.dumps(cost, indent=2))
    mark_done(directory, cost)
    return directory, cost


TEACHER_STEPS = (1, 2, 4, 50)
GUIDANCE = 3.0
# Images per arm in the table: FD's small-sample term is most of a 200-image FD here (real digits score 60-80 at
# 200, about 25 at 1,000), so the table evaluates 1,000 prompts; the 50-step teacher, 100 UNet calls an image,
# stays at the demo's count (--prompts), which FD-infinity and KID make comparable.
FULL_PROMPTS = 1000


def arms_for(teacher: Path, students: dict[str, Path], slow_prompts: Optional[int] = None) -> list[str]:
    """Every arm of the table; the 50-step teacher on the first `slow_prompts` prompts only (all when None)."""
    arms = [f"teacher-{n}={teacher}:steps={n}:cfg={GUIDANCE}:scheduler=ddim"
            + (f":prompts={slow_prompts}" if n == 50 and slow_prompts else "") for n in TEACHER_STEPS]
    arms += [f"add-{n}={students['add']}:steps={n}" for n in (1, 2, 4)]
    if "lora" in students:  # the adapters on their base, loaded by diffusers (the export users get)
        arms += [f"lora-{n}={teacher}+{students['lora'].parent / 'student_lora'}:steps={n}" for n in (1, 2, 4)]
    arms += [f"{name}-1={path}:steps=1" for name, path in students.items() if name not in ("add", "lora")]
    return arms


def kid_ratio(arms: dict[str, dict[str, Any]], a: str, b: str) -> tuple[float, list[float]]:
    """KID(a) / KID(b) and a conservative interval for it: the two intervals' worst cases, [low_a / high_b,
    high_a / low_b] (the upper end is infinite when b's interval reaches 0: b is not told apart from the reference)."""
    (low_a, high_a), (low_b, high_b) = arms[a]["intervals"]["kid"], arms[b]["intervals"]["kid"]
    value = arms[a]["kid"] / arms[b]["kid"] if arms[b]["kid"] > 0 else math.inf
    upper = high_a / low_b if low_b > 0 else math.inf
    lower = low_a / high_b if high_b > 0 else -math.inf
    return value, [lower, upper]


def check_targets(arms: dict[str, dict[str, Any]], study: Optional[Path] = None) -> dict[str, dict[str, Any]]:
    """The issue's targets on one seed's metrics, those whose arms were run; each -> {"value", "target", "met"},
    on FID and, where the arms have KID, on KID with an interval. With the study's features (eval/analysis.py keeps
    them), a KID target "KID(a) <= c KID(b)" is judged on the paired margin KID(a) - c KID(b) over the prompts both
    arms drew (met when its interval's upper end is at or below 0, below 0 for "beats"); without them, on the ratio's
    conservative interval from the two KIDs' own intervals."""
    from addpipe.eval.analysis import load_features, paired_features
    from addpipe.eval.distances import paired_kid_margin

    fid = {arm: entry["frechet_distance"] for arm, entry in arms.items()}
    stored = load_features(study) if study is not None else {}
    found = {}

    def ratio(name: str, a: str, b: str, target: str, limit: float, strict: bool = False) -> None:
        if a in fid and b in fid:
            value = fid[a] / fid[b]
            found[name] = {"value": value, "target": target, "met": value < limit if strict else value <= limit}
        if not (a in arms and b in arms and "kid" in arms[a] and "kid" in arms[b]):
            return
        value, interval = kid_ratio(arms, a, b)
        check: dict[str, Any] = {"value": value, "target": target, "metric": "kid"}
        paired = paired_features(stored, a, b)
        if paired is not None:
            reference, features_a, features_b = paired
            margin = paired_kid_margin(reference, features_a, features_b, scale=limit,
                                       gamma=arms[a].get("samples", {}).get("kid_gamma"))
            check.update(margin=[margin.low, margin.high], pairs=len(features_a),
                         met=margin.high < 0 if strict else margin.high <= 0)
        else:
            check.update(interval=interval, met=interval[1] < limit if strict else interval[1] <= limit)
        found[name.replace("FID", "KID") + (" (on KID)" if "FID" not in name else "")] = check

    ratio("1-step student FID <= 0.5 x teacher 1-step FID", "add-1", "teacher-1", "<= 0.5", 0.5)
    ratio("1-step student beats distillation-only", "add-1", "distillation-only-1", "< 1", 1.0, strict=True)
    ratio("1-step student beats adversarial-only", "add-1", "adversarial-only-1", "< 1", 1.0, strict=True)
    ratio("2-step student FID <= 1.25 x teacher 4-step FID", "add-2", "teacher-4", "<= 1.25", 1.25)
    if all(f"add-{n}" in arms for n in (1, 2, 4)):
        adherence = min(arms[f"add-{n}"]["adherence"]["all"] for n in (1, 2, 4))
        found["student adherence >= 95% (worst of 1/2/4 steps)"] = {"value": adherence, "target": ">= 0.95",
                                                                   "met": adherence >= 0.95}
    ratio("stretch: 1-step student FID <= teacher 4-step FID", "add-1", "teacher-4", "<= 1", 1.0)
    if "d2g-1" in fid:
        ratio("1-step D2G FID <= 0.5 x teacher 1-step FID", "d2g-1", "teacher-1", "<= 0.5", 0.5)
        ratio("1-step D2G beats its regression-only ablation", "d2g-1", "d2g-regression-1", "< 1", 1.0, strict=True)
        found["reported: 1-step D2G FID / 1-step ADD FID"] = {
            "value": fid["d2g-1"] / fid["add-1"], "target": "(reported)", "met": None}
        found["reported: 1-step D2G FID / teacher 4-step FID"] = {
            "value": fid["d2g-1"] / fid["teacher-4"], "target": "(reported)", "met": None}
    return found


def summarise(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Per arm across seeds: FID mean ± std and per seed; KID, FD-infinity, precision and recall per seed with their
    intervals; the sample counts; per target, each seed's value (and interval) and whether it was met."""
    arms = list(next(iter(per_seed.values()))["metrics"]["arms"])
    table = {}
    for arm in arms:
        entries = [s["metrics"]["arms"][arm] for s in per_seed.values()]
        fids = [e["frechet_distance"] for e in entries]
        entry = entries[0]
        table[arm] = {"steps": entry["steps"], "guidance": entry.get("guidance", 0.0), "fid": fids,
                      "fid_mean": mean(fids), "fid_std": stdev(fids) if len(fids) > 1 else 0.0,
                      "adherence_mean": mean(e["adherence"]["all"] for e in entries),
                      "latency_median_s": mean(e["latency_median_s"] for e in entries),
                      "samples": entry.get("samples", {})}
        table[arm].update(per_seed_distances(entries))
    targets = {}
    for seed, result in per_seed.items():
        for name, check in result["targets"].items():
            targets.setdefault(name, {"target": check["target"], "values": {}, "met": {}, "intervals": {}})
            targets[name]["values"][seed] = check["value"]
            targets[name]["met"][seed] = check["met"]
            if "interval" in check:
                targets[name]["intervals"][seed] = check["interval"]
            if "margin" in check:
                targets[name].setdefault("margins", {})[seed] = check["margin"]
    real = [s["real"] for s in per_seed.values() if "real" in s]
    reference = None
    if real:
        fids = [r["frechet_distance"] for r in real]
        reference = {"fid": fids, "fid_mean": mean(fids), "fid_std": stdev(fids) if len(fids) > 1 else 0.0,
                     "adherence_mean": mean(r["adherence"] for r in real), "samples": real[0].get("samples", {}),
                     **per_seed_distances(real)}
    return {"seeds": sorted(per_seed), "arms": table, "targets": targets, "real": reference}


def per_seed_distances(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """{"kid": [per seed], "kid_intervals": [[low, high] per seed], ...} for the distances the entries have; FD's
    intervals as "fid_intervals" (its values are the table's "fid")."""
    out: dict[str, Any] = {}
    if all("frechet_distance" in e.get("intervals", {}) for e in entries):
        out["fid_intervals"] = [e["intervals"]["frechet_distance"] for e in entries]
    for name in ("kid", "fd_infinity", "precision", "recall"):
        if all(name in e for e in entries):
            out[name] = [e[name] for e in entries]
            out[f"{name}_intervals"] = [e["intervals"][name] for e in entries]
    return out


FAMILIES = {"teacher": (0, "tab:gray"), "add": (1, "tab:blue"), "lora": (2, "tab:purple"), "d2g": (3, "tab:red")}


def family(arm: str) -> tuple[int, str]:
    """(rank in the table, bar colour): teacher, ADD student, LoRA student, Diffusion2GAN, then the ablations."""
    return FAMILIES.get(arm.rsplit("-", 1)[0], (4, "tab:orange"))


def order(arm: str) -> tuple[int, int]:
    return family(arm)[0], int(arm.rsplit("-", 1)[1])


def seed_cells(row: dict[str, Any], name: str, spec: str, scale: float = 1.0) -> str:
    """ "1.20 [0.80, 1.60]; 0.90 [...]": a distance per seed with its 95% interval."""
    if name not in row:
        return ""
    return "; ".join(f"{v * scale:{spec}} [{lo * scale:{spec}}, {hi * scale:{spec}}]"
                     for v, (lo, hi) in zip(row[name], row[f"{name}_intervals"]))


def write_table(out: Path, summary: dict[str, Any]) -> Path:
    from addpipe.eval.report import markdown_to_html

    seeds = summary["seeds"]
    arms = sorted(summary["arms"], key=order)
    real = summary.get("real")
    counts = sorted({(row["samples"].get("generated"), row["samples"].get("reference")) for row in summary["arms"].values()
                     if row.get("samples")}, key=str)
    lines = ["# ADD reproduction at small scale", "",
             f"Seeds: {', '.join(map(str, seeds))}. All distances are to the curated images in the content classifier's "
             "feature space (lower is better). FID: Fréchet distance at the stated counts ("
             + ("; ".join(f"{g} generated against {r} reference images" for g, r in counts) or "see metrics.json")
             + "), mean ± std over seeds; it is biased upwards at few samples, so arms on different counts compare on "
             "FD∞ (FD extrapolated to infinitely many samples) and KID (unbiased; ×10³) instead. Brackets: 95% intervals "
             "per seed (FID: bootstrap; KID: half-size subsets; FD∞: the fit; precision and recall: Wilson, k = 3). Adherence: share "
             "of images showing the requested digit, ink and background colour. `real images of the prompts`: the real "
             "digits whose captions are the held-out prompts, scored the same way.", "",
             "| arm | steps | guidance | images | FID | FID per seed | FD∞ per seed | KID ×10³ per seed | precision | recall | "
             "adherence | median latency (s) |", "|---|---:|---:|---:|---:|---|---|---|---|---|---:|---:|"]

    def row_line(name: str, row: dict[str, Any], steps: str, guidance: str, latency: str) -> str:
        return (f"| {name} | {steps} | {guidance} | {row.get('samples', {}).get('generated', '')} | "
                f"{row['fid_mean']:.2f} ± {row['fid_std']:.2f} | "
                + (seed_cells(row, "fid", ".2f") if "fid_intervals" in row else ", ".join(f"{v:.2f}" for v in row["fid"]))
                + f" | {seed_cells(row, 'fd_infinity', '.2f')} | {seed_cells(row, 'kid', '.2f', 1000.0)} | "
                f"{seed_cells(row, 'precision', '.2f')} | {seed_cells(row, 'recall', '.2f')} | {row['adherence_mean']:.1%} | {latency} |")

    if real:
        lines.append(row_line("real images of the prompts", real, "", "", ""))
    for arm in arms:
        row = summary["arms"][arm]
        lines.append(row_line(arm, row, str(row["steps"]), f"{row['guidance']:g}", f"{row['latency_median_s']:.4f}"))
    lines += ["", "## Targets (checked on each seed)", "",
              "On FID as before, and on KID with an interval. A KID target KID(a) <= c x KID(b) is judged on the paired "
              "margin KID(a) - c x KID(b): both arms on the same reference subsets and the same prompts (same noise) in each "
              "of 100 half-size subsets, so what they share cancels; it holds on a seed when the margin's 95% interval ends "
              "at or below 0 (below 0 for \"beats\"). The value column gives KID(a)/KID(b) and the margin's interval (×10³). "
              "Without the study's features, the ratio's conservative interval [low_a / high_b, high_a / low_b] is used "
              "instead (shown in brackets).", "", "| target | required | value per seed | met on all seeds |", "|---|---|---|---|"]
    for name, check in summary["targets"].items():
        intervals, margins = check.get("intervals", {}), check.get("margins", {})
        values = ", ".join(f"{v:.3f}" + (f" [{intervals[seed][0]:.3f}, {intervals[seed][1]:.3f}]" if seed in intervals else "")
                           + (f" (margin ×10³ [{margins[seed][0] * 1e3:.2f}, {margins[seed][1] * 1e3:.2f}])" if seed in margins else "")
                           for seed, v in check["values"].items())
        if any(m is None for m in check["met"].values()):  # a comparison the table reports, not a target
            lines.append(f"| {name} | {check['target']} | {values} | |")
            continue
        met = all(check["met"].values())
        lines.append(f"| {name} | {check['target']} | {values} | {'yes' if met else 'no (' + str(sum(check['met'].values())) + '/' + str(len(check['met'])) + ')'} |")
    cost = summary.get("cost")
    if cost:
        lines += ["", "## Training cost (this machine, wall time)", "", "| what | cost |", "|---|---|"]
        lines += [f"| {name} | {value} |" for name, value in cost.items()]
    plot_table(out / "reproduction_fid.png", summary, arms)
    lines += ["", "![FID, FD∞ and KID per arm](reproduction_fid.png)", ""]
    markdown = "\n".join(lines)
    (out / "reproduction.md").write_text(markdown)
    (out / "reproduction.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / "reproduction.html").write_text(markdown_to_html(markdown, "ADD reproduction"))
    return out / "reproduction.md"


def plot_table(path: Path, summary: dict[str, Any], arms: list[str]) -> Path:
    """FID per arm (bars: mean over seeds, dots: seeds; the image count where an arm had fewer), then FD∞ and KID
    per arm and seed with their 95% intervals (both comparable across image counts)."""
    from addpipe.plots import pyplot

    plt = pyplot()
    real = summary.get("real")
    panels = [name for name in ("fd_infinity", "kid") if all(name in summary["arms"][arm] for arm in arms)]
    width = max(6, 0.7 * len(arms))
    figure, axes = plt.subplots(1, 1 + len(panels), figsize=(width * (1 + len(panels)), 3.8), squeeze=False)
    axis = axes[0][0]
    most = max((summary["arms"][arm].get("samples", {}).get("generated") or 0) for arm in arms)
    for i, arm in enumerate(arms):
        row = summary["arms"][arm]
        axis.bar(i, row["fid_mean"], color=family(arm)[1], alpha=0.6)
        axis.scatter([i] * len(row["fid"]), row["fid"], color="black", s=10, zorder=3)
        count = row.get("samples", {}).get("generated")
        if count and count < most:  # FD rises at fewer images: say so where the bar stands
            axis.annotate(f"{count} images", (i, max(row["fid"])), textcoords="offset points", xytext=(0, 4),
                          ha="center", fontsize=7)
    if real:
        axis.axhline(real["fid_mean"], color="tab:green", linestyle="--", linewidth=1, label="real images of the prompts")
        axis.legend(fontsize=8, loc="upper right")
    axis.set_xticks(range(len(arms)), arms, rotation=45, ha="right", fontsize=8)
    axis.set_ylabel("FID (classifier features)")
    axis.set_title("FID at each arm's image count: teacher (grey), ADD (blue), LoRA (purple),\n"
                   "Diffusion2GAN (red), ablations (orange); dots: seeds", fontsize=9)
    seeds = len(summary["seeds"])
    titles = {"fd_infinity": ("FD∞ (classifier features)", 1.0, "FD∞ per seed with its 95% interval (extrapolated to infinitely many images)"),
              "kid": ("KID ×10³ (classifier features)", 1000.0, "KID per seed with its 95% interval (unbiased: 0 = the reference's distribution)")}
    for axis, name in zip(axes[0][1:], panels):
        label, scale, title = titles[name]
        for i, arm in enumerate(arms):
            row = summary["arms"][arm]
            for k, (value, (low, high)) in enumerate(zip(row[name], row[f"{name}_intervals"])):
                x = i + (k - (seeds - 1) / 2) * 0.18
                axis.errorbar(x, value * scale, yerr=[[max(value - low, 0) * scale], [max(high - value, 0) * scale]], fmt="o",
                              color=family(arm)[1], markersize=3, capsize=2)
        if real and name in real:
            axis.axhline(mean(real[name]) * scale, color="tab:green", linestyle="--", linewidth=1)
        axis.axhline(0.0, color="gray", linewidth=0.8)
        axis.set_xticks(range(len(arms)), arms, rotation=45, ha="right", fontsize=8)
        axis.set_ylabel(label)
        axis.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def check_runs(only: Optional[list[str]]) -> list[str]:
    """The run names asked for (all by default); an unknown one is a ValueError naming the valid ones."""
    names = list(variants()) + list(d2g_variants(Path(), Path()))
    unknown = sorted(set(only or []) - set(names))
    if unknown:
        raise ValueError(f"unknown run(s) {', '.join(unknown)} for --runs: choose from {', '.join(names)}")
    return list(only or names)


def run_reproduction(settings: DemoSettings, seeds: int = 3, only: Optional[list[str]] = None) -> Path:
    """Train every variant (or those `only` names) on every seed, evaluate, and write reproduction.{md,json,html}
    with the plot."""
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    prep = curate(settings, out)
    shards = prep["shard_pattern"]
    teacher = teacher_directory(settings, out)
    dino, classifier = feature_models(settings, out, shards)
    full = out / "full"
    per_seed: dict[int, dict[str, Any]] = {}
    report = None
    runs = variants()
    wanted = set(check_runs(only)) | {"add"}  # the targets are the ADD student's
    cost: dict[str, Any] = {}
    if wanted & {"d2g", "d2g-regression"}:
        pairs, pair_cost = ode_pairs(settings, out, shards, teacher)
        runs.update(d2g_variants(pairs, latent_lpips(settings, out, shards, teacher)))
        cost["ODE pairs (once, shared by the seeds)"] = (f"{pair_cost['pairs']} pairs, "
                                                         f"{pair_cost['teacher_unet_evaluations']:,} teacher UNet evaluations "
                                                         f"({pair_cost['sampler']}), {pair_cost['seconds']:.0f} s")
    runs = {name: overrides for name, overrides in runs.items() if name in wanted}
    table_settings = replace(settings, prompts=max(settings.prompts, FULL_PROMPTS))
    for k in range(seeds):
        seed = settings.seed + k
        students = {}
        for name, overrides in runs.items():
            students[name] = train_student(full / f"seed{seed}" / name, teacher, dino, shards, settings, seed, overrides)
            seconds = training_seconds(full / f"seed{seed}" / name)
            if seconds is not None and name in ("add", "lora", "d2g", "d2g-regression"):
                cost.setdefault(f"{name} training, {settings.steps} steps (per seed)", [])
                cost[f"{name} training, {settings.steps} steps (per seed)"].append(f"{seconds:.0f} s")
        result = evaluate(full / f"seed{seed}" / "study", arms_for(teacher, students, settings.prompts), table_settings,
                          shards, classifier, judges=0, seed=seed)
        if any(math.isnan(e.get("frechet_distance", math.nan)) for e in result["metrics"]["arms"].values()):
            raise RuntimeError(f"a Fréchet distance is NaN in {full / f'seed{seed}' / 'study' / 'metrics.json'}")
        per_seed[seed] = {"metrics": result["metrics"], "targets": check_targets(result["metrics"]["arms"], full / f"seed{seed}" / "study"),
                          "real": real_reference(table_settings, shards, classifier, seed)}
        report = write_table(full, {**summarise(per_seed), "cost": {k: ", ".join(v) if isinstance(v, list) else v
                                                                    for k, v in cost.items()}})
    return report


def training_seconds(run_dir: Path) -> Optional[float]:
    """Wall time of a run's steps from its metrics.jsonl (first to last logged step, plus one step's mean)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    times = [json.loads(line)["time"] for line in path.read_text().splitlines() if line.strip()]
    if len(times) < 2:
        return None
    return (times[-1] - times[0]) * len(times) / (len(times) - 1)
