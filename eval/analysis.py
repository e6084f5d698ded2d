"""From votes to the study's ratings, and from generations + references to its automated metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from addpipe.eval.db import QUESTIONS
from addpipe.eval.ratings import (EloSettings, bootstrap, bradley_terry, online_elo, rater_accuracy, reliable_raters,
                                  wilson_interval, win_rate_matrix)


def arm_table(generations: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    frame = pd.DataFrame(generations)
    out = {}
    for arm, rows in frame.groupby("arm"):
        out[str(arm)] = {"steps": int(rows["steps"].iloc[0]), "guidance": float(rows["guidance"].iloc[0]),
                         "images": int(len(rows)), "latency_median_s": float(rows["latency_s"].median()),
                         "latency_p90_s": float(rows["latency_s"].quantile(0.9))}
    return out


def ratings_for(votes: pd.DataFrame, settings: EloSettings, rounds: int, seed: int) -> Optional[dict[str, Any]]:
    if votes.empty:
        return None
    arms = sorted(set(votes["arm_a"]) | set(votes["arm_b"]))
    fitted = bradley_terry(votes, arms, settings)
    intervals = bootstrap(votes, arms, settings, rounds=rounds, seed=seed) if rounds else {}
    elo = online_elo(votes, settings)
    order = sorted(arms, key=fitted.get, reverse=True)
    return {
        "votes": int(len(votes)),
        "arms": order,
        "bradley_terry": {arm: {"rating": fitted[arm], **intervals.get(arm, {})} for arm in order},
        "elo": {arm: elo[arm] for arm in order},
        "win_rate": win_rate_matrix(votes, order),
    }


def analyse(votes: pd.DataFrame, generations: list[dict[str, Any]], min_accuracy: float = 0.7, min_golden: int = 2,
            rounds: int = 1000, seed: int = 0, settings: EloSettings = EloSettings()) -> dict[str, Any]:
    """Ratings per question and for both questions pooled, per category, with unreliable raters removed."""
    raters = rater_accuracy(votes) if len(votes) else pd.DataFrame(columns=["votes", "golden_votes", "golden_accuracy"])
    kept = reliable_raters(votes, min_accuracy, min_golden) if min_golden > 0 and len(votes) else set(raters.index)
    regular = votes[(~votes["golden"].astype(bool)) & votes["rater"].isin(kept)] if len(votes) else votes
    result: dict[str, Any] = {
        "settings": {"min_golden_accuracy": min_accuracy, "min_golden_votes": min_golden, "bootstrap_rounds": rounds,
                     "elo": {"k": settings.k, "base": settings.base, "scale": settings.scale, "initial": settings.initial}},
        "raters": {str(name): {"votes": int(row["votes"]), "golden_votes": int(row["golden_votes"]),
                               "golden_accuracy": None if pd.isna(row.get("golden_accuracy")) else float(row["golden_accuracy"]),
                               "kept": name in kept} for name, row in raters.iterrows()},
        "arms": arm_table(generations) if generations else {},
        "questions": {},
        "categories": {},
    }
    for question in [q for q in QUESTIONS if q in set(regular.get("question", []))] + ["combined"]:
        subset = regular if question == "combined" else regular[regular["question"] == question]
        result["questions"][question] = ratings_for(subset, settings, rounds, seed)
    if len(regular):
        for category, subset in regular.groupby("category"):
            if subset["arm_a"].nunique() + subset["arm_b"].nunique() >= 2:
                result["categories"][str(category or "uncategorised")] = ratings_for(subset, settings, 0, seed)
    return result


FEATURES_FILE = "features.npz"  # the reference's and each arm's features, with the arms' prompt ids
MIN_FOR_DISTANCES = 8  # fewer samples per set: FD alone (KID's half subsets, FD∞'s range of N and k-NN need more)


def distance_metrics(reference: np.ndarray, generated: np.ndarray, seed: int = 0, resamples: int = 25,
                     network: str = "") -> dict[str, Any]:
    """FD at the sets' counts, FD∞, KID, precision and recall, as metrics.json keeps them: each value under its
    name, its 95% interval under "intervals", the counts under "samples" and FD's curve in N under "fd_curve".
    `network` names the feature space (KID's kernel scale depends on it: eval/distances.kernel_scale)."""
    from addpipe.eval.distances import compare, frechet, kernel_scale

    if len(generated) < 2:  # one image has no spread: nothing to fit a distance to, the other arms still get theirs
        return {"samples": {"generated": len(generated), "reference": len(reference)},
                "distances_skipped": "an arm with fewer than 2 images gets no distances"}
    if min(len(reference), len(generated)) < MIN_FOR_DISTANCES:
        fd = frechet(reference, generated, resamples, seed)
        return {"frechet_distance": fd.value, "intervals": {"frechet_distance": [fd.low, fd.high]},
                "samples": {"generated": len(generated), "reference": len(reference)},
                "distances_skipped": f"KID, FD-infinity, precision and recall need {MIN_FOR_DISTANCES} samples per set"}
    found = compare(reference, generated, seed=seed, fd_resamples=resamples, kid_gamma=kernel_scale(reference, network))
    out: dict[str, Any] = {name: estimate.value for name, estimate in found.items()}
    out["intervals"] = {name: [estimate.low, estimate.high] for name, estimate in found.items()}
    out["samples"] = {"generated": len(generated), "reference": len(reference),
                      "kid_subset_size": found["kid"].details["subset_size"], "kid_gamma": found["kid"].details["gamma"],
                      "precision_recall_k": found["precision"].details["k"]}
    out["fd_curve"] = {"sizes": found["fd_infinity"].details["sizes"], "fd": found["fd_infinity"].details["fd"]}
    return out


def share_interval(share: float, count: int) -> list[float]:
    """A share of `count` yes/no outcomes (adherence): its Wilson score interval, which stays open at 0% and 100%."""
    return list(wilson_interval(share * count, count))


def automated_metrics(study_dir: Path, generations: list[dict[str, Any]], reference: Optional[str], features: str,
                      clip_embedder=None, device: str = "cpu", limit: Optional[int] = None, batch_size: int = 32,
                      classifier: Optional[str] = None, resamples: int = 25, seed: int = 0) -> dict[str, Any]:
    """Per arm: distances to the reference set in `features` space (FD at the stated counts, FD-infinity, KID,
    precision, recall), CLIP score, latency, and with a content `classifier` directory the prompt adherence (share
    of images showing the requested classes); every value with a 95% interval under "intervals"."""
    from PIL import Image

    from addpipe.eval.distances import bootstrap as bootstrap_interval  # (ratings' bootstrap resamples votes)
    from addpipe.eval.metrics import clip_scores, features_of, iter_images, load_feature_network

    frame = pd.DataFrame(generations)
    arms = arm_table(generations)
    out: dict[str, Any] = {"features": features, "reference": reference, "arms": {}}
    network = load_feature_network(features, device) if reference else None
    judge = None
    if classifier:
        from addpipe.eval.classifier import adherence, load_classifier

        judge = load_classifier(classifier, device)
    reference_features = features_of(iter_images(reference, limit), network, batch_size, "reference features") if network else None
    if reference_features is not None:
        out["reference_images"] = int(len(reference_features))
    kept: dict[str, np.ndarray] = {}
    for arm, rows in frame.groupby("arm"):
        images = [Image.open(Path(study_dir) / path).convert("RGB") for path in rows["image"]]
        entry: dict[str, Any] = dict(arms[str(arm)])
        latency = bootstrap_interval(rows["latency_s"].to_numpy(), np.median, seed=seed)
        entry["intervals"] = {"latency_median_s": [latency.low, latency.high]}
        if network is not None:
            generated = features_of(images, network, batch_size, f"{arm} features")
            kept[f"features::{arm}"], kept[f"prompt_ids::{arm}"] = generated.astype(np.float32), rows["prompt_id"].to_numpy()
            found = distance_metrics(reference_features, generated, seed, resamples, network.name)
            entry["intervals"].update(found.pop("intervals"))
            entry.update(found)
        if clip_embedder is not None:
            scores = np.concatenate([clip_scores(images[i:i + batch_size], list(rows["prompt"])[i:i + batch_size], clip_embedder)
                                     for i in range(0, len(images), batch_size)])
            score = bootstrap_interval(scores, seed=seed)
            entry["clip_score"] = score.value
            entry["intervals"]["clip_score"] = [score.low, score.high]
        if judge is not None:
            entry["adherence"] = adherence(judge, images, list(rows["prompt"]))
            if "all" in entry["adherence"]:
                entry["intervals"]["adherence"] = share_interval(entry["adherence"]["all"], entry["adherence"]["counted"])
        out["arms"][str(arm)] = entry
    if kept:  # for paired comparisons later (arms on the same prompts and noise): no feature pass again
        np.savez(Path(study_dir) / FEATURES_FILE, reference=reference_features.astype(np.float32), **kept)
        out["features_file"] = FEATURES_FILE
    return out


def load_features(study_dir: Path) -> dict[str, np.ndarray]:
    """The study's features file as arrays ({} when there is none), read once for any number of paired_features."""
    path = Path(study_dir) / FEATURES_FILE
    if not path.is_file():
        return {}
    with np.load(path) as stored:
        return dict(stored)


def paired_features(stored: dict[str, np.ndarray], a: str, b: str) -> Optional[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(reference, a's rows, b's rows) from load_features, a and b on the prompts both drew, row for row; None when
    an arm is missing."""
    if f"features::{a}" not in stored or f"features::{b}" not in stored:
        return None
    rows = [dict(zip(stored[f"prompt_ids::{arm}"].tolist(), stored[f"features::{arm}"])) for arm in (a, b)]
    common = sorted(set(rows[0]) & set(rows[1]))
    return (stored["reference"].astype(np.float64), np.stack([rows[0][i] for i in common]).astype(np.float64),
            np.stack([rows[1][i] for i in common]).astype(np.float64))


def write_json(path: Path, data: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(data, indent=2, default=float))


def run_ratings(study_dir: Path, db_url: str, min_accuracy: float = 0.7, min_golden: int = 2, rounds: int = 1000,
                seed: int = 0, settings: EloSettings = EloSettings()) -> dict[str, Any]:
    """`addpipe eval elo`: votes from the database -> ratings.json and the report."""
    from addpipe.eval.db import connect, session_factory
    from addpipe.eval.report import write_report
    from addpipe.eval.study import read_generations
    from addpipe.eval.votes import votes_frame

    engine = connect(db_url)
    with session_factory(engine)() as session:
        votes = votes_frame(session)
    engine.dispose()
    analysis = analyse(votes, read_generations(study_dir), min_accuracy, min_golden, rounds, seed, settings)
    write_json(Path(study_dir) / "ratings.json", analysis)
    metrics_path = Path(study_dir) / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else None
    analysis["report"] = {k: str(v) for k, v in write_report(study_dir, analysis, metrics).items()}
    return analysis


def run_metrics(study_dir: Path, reference: Optional[str], features: str, clip_model: Optional[str] = None,
                device: str = "auto", limit: Optional[int] = None, batch_size: int = 32,
                classifier: Optional[str] = None, resamples: int = 25, seed: int = 0) -> dict[str, Any]:
    """`addpipe eval metrics`: distances / CLIP score / adherence / latency with intervals -> metrics.json (and into
    the report)."""
    from addpipe.eval.report import write_report
    from addpipe.eval.study import read_generations
    from addpipe.devices import resolve_device

    target = str(resolve_device(device))
    embedder = None
    if clip_model:
        from addpipe.clip import embed_config_from_spec, load_clip

        embedder = load_clip(embed_config_from_spec(clip_model, target))
    metrics = automated_metrics(study_dir, read_generations(study_dir), reference, features, embedder, target, limit, batch_size,
                                classifier, resamples, seed)
    write_json(Path(study_dir) / "metrics.json", metrics)
    ratings_path = Path(study_dir) / "ratings.json"
    analysis = json.loads(ratings_path.read_text()) if ratings_path.exists() else {
        "questions": {}, "categories": {}, "raters": {}, "arms": metrics["arms"],
        "settings": {"min_golden_accuracy": None, "min_golden_votes": None}}
    write_report(study_dir, analysis, metrics)
    return metrics
