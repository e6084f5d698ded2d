"""Ratings from paired votes: win rates with intervals, online Elo, Bradley–Terry with bootstrap intervals.

A vote compares arm `a` with arm `b` on one question and says `a`, `b` or `tie`; a tie counts half a
win for each side everywhere (win rates, Elo, Bradley–Terry). All functions are pure: DataFrames in,
numbers out, so each is tested against a hand computation.

Elo follows FastChat's online update (K=4, base 10, scale 400, start 1000): it depends on vote order,
which is why Bradley–Terry, the order-free maximum-likelihood fit of the same model, is the headline
number and gets the bootstrap intervals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pandas as pd

CHOICES = ("a", "b", "tie")


@dataclass(frozen=True)
class EloSettings:
    k: float = 4.0
    base: float = 10.0
    scale: float = 400.0
    initial: float = 1000.0


def scores(votes: pd.DataFrame) -> np.ndarray:
    """1 when `a` won, 0 when `b` won, 0.5 for a tie."""
    unknown = set(votes["choice"]) - set(CHOICES)
    if unknown:
        raise ValueError(f"unknown vote choices {sorted(unknown)}; expected {CHOICES}")
    return votes["choice"].map({"a": 1.0, "b": 0.0, "tie": 0.5}).to_numpy(dtype=np.float64)


def online_elo(votes: pd.DataFrame, settings: EloSettings = EloSettings()) -> dict[str, float]:
    """Sequential Elo over votes in their order (FastChat's compute_elo)."""
    ratings: dict[str, float] = {}
    for a, b, s in zip(votes["arm_a"], votes["arm_b"], scores(votes)):
        ra, rb = ratings.setdefault(a, settings.initial), ratings.setdefault(b, settings.initial)
        expected_a = 1.0 / (1.0 + settings.base ** ((rb - ra) / settings.scale))
        ratings[a] = ra + settings.k * (s - expected_a)
        ratings[b] = rb + settings.k * ((1.0 - s) - (1.0 - expected_a))
    return ratings


def pair_counts(votes: pd.DataFrame, arms: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(wins[i, j] = wins of i over j with ties as halves, games[i, j] = votes between i and j)."""
    index = {arm: i for i, arm in enumerate(arms)}
    wins = np.zeros((len(arms), len(arms)))
    games = np.zeros((len(arms), len(arms)))
    a = votes["arm_a"].map(index).to_numpy()
    b = votes["arm_b"].map(index).to_numpy()
    s = scores(votes)
    np.add.at(wins, (a, b), s)
    np.add.at(wins, (b, a), 1.0 - s)
    np.add.at(games, (a, b), 1.0)
    np.add.at(games, (b, a), 1.0)
    return wins, games


def bradley_terry(votes: pd.DataFrame, arms: list[str], settings: EloSettings = EloSettings(),
                  iterations: int = 10_000, tolerance: float = 1e-10) -> dict[str, float]:
    """Maximum-likelihood Bradley–Terry strengths on the Elo scale.

    P(i beats j) = p_i / (p_i + p_j); fitted with Hunter's (2004) minorise-maximise updates
    p_i <- W_i / sum_j n_ij / (p_i + p_j), and reported as initial + scale * log_base(p_i / geometric mean),
    so a 3:1 record between two arms is a gap of 400 * log10(3) = 190.8 points. An arm with no wins (or
    no losses) has no finite MLE; its strength is clipped at 1e-6 (1e6) of the others'."""
    wins, games = pair_counts(votes, arms)
    total_wins = wins.sum(axis=1)
    strength = np.ones(len(arms))
    for _ in range(iterations):
        denominator = (games / (strength[:, None] + strength[None, :] + 1e-300)).sum(axis=1)
        updated = np.where(denominator > 0, total_wins / np.maximum(denominator, 1e-300), strength)
        updated = np.clip(updated, 1e-6, None)
        updated /= math.exp(np.log(updated).mean())
        updated = np.clip(updated, 1e-6, 1e6)
        if np.max(np.abs(np.log(updated) - np.log(strength))) < tolerance:
            strength = updated
            break
        strength = updated
    log_strength = np.log(strength) - np.log(strength).mean()
    return {arm: settings.initial + settings.scale * log_strength[i] / math.log(settings.base) for i, arm in enumerate(arms)}


def wilson_interval(successes: float, trials: float, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for a proportion (ties enter as half successes)."""
    if trials <= 0:
        return (float("nan"), float("nan"))
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    # the bounds hold p itself: at p = 1 (or 0) rounding could leave the upper (lower) bound a hair inside it
    return (max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half)))


def win_rate_matrix(votes: pd.DataFrame, arms: list[str]) -> dict[str, list[list[Optional[float]]]]:
    """rate[i][j] = share of i's votes against j that i won (ties half), with Wilson 95% bounds and counts."""
    wins, games = pair_counts(votes, arms)
    rate, low, high = ([[None] * len(arms) for _ in arms] for _ in range(3))
    for i in range(len(arms)):
        for j in range(len(arms)):
            if i != j and games[i, j] > 0:
                rate[i][j] = wins[i, j] / games[i, j]
                low[i][j], high[i][j] = wilson_interval(wins[i, j], games[i, j])
    return {"arms": arms, "rate": rate, "low": low, "high": high, "games": games.astype(int).tolist()}


def bootstrap(votes: pd.DataFrame, arms: list[str], settings: EloSettings = EloSettings(), rounds: int = 1000,
              seed: int = 0) -> dict[str, dict[str, float]]:
    """Bradley–Terry on `rounds` resamples of the votes (with replacement): 95% rating and rank intervals."""
    rng = np.random.default_rng(seed)
    samples = np.zeros((rounds, len(arms)))
    for r in range(rounds):
        resampled = votes.iloc[rng.integers(0, len(votes), size=len(votes))]
        fitted = bradley_terry(resampled, arms, settings, iterations=2000, tolerance=1e-8)
        samples[r] = [fitted[arm] for arm in arms]
    ranks = (-samples).argsort(axis=1).argsort(axis=1) + 1  # 1 = best in that resample
    out = {}
    for i, arm in enumerate(arms):
        out[arm] = {"low": float(np.percentile(samples[:, i], 2.5)), "high": float(np.percentile(samples[:, i], 97.5)),
                    "rank_low": int(np.percentile(ranks[:, i], 2.5)), "rank_high": int(np.percentile(ranks[:, i], 97.5))}
    return out


def rater_accuracy(votes: pd.DataFrame) -> pd.DataFrame:
    """Per rater: golden votes answered and the share that matched the known answer."""
    golden = votes[votes["expected"].notna()] if "expected" in votes.columns else votes.iloc[0:0]
    correct = (golden["choice"] == golden["expected"]).groupby(golden["rater"]).agg(["count", "mean"])
    correct.columns = ["golden_votes", "golden_accuracy"]
    totals = votes.groupby("rater").size().rename("votes")
    return pd.concat([totals, correct], axis=1).fillna({"golden_votes": 0})


def reliable_raters(votes: pd.DataFrame, min_accuracy: float, min_golden: int) -> set[str]:
    """Raters who answered at least `min_golden` golden pairs with at least `min_accuracy` correct."""
    table = rater_accuracy(votes)
    ok = (table["golden_votes"] >= min_golden) & (table["golden_accuracy"].fillna(0) >= min_accuracy)
    return set(table.index[ok])
