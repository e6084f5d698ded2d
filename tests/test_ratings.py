"""Ratings against hand computations: Elo updates, Bradley–Terry closed forms, recovery of known
strengths from synthetic votes, Wilson intervals, bootstrap coverage and golden-pair rater accuracy."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from addpipe.eval.ratings import (EloSettings, bootstrap, bradley_terry, online_elo, rater_accuracy, reliable_raters,
                                  wilson_interval, win_rate_matrix)


def votes(rows):
    return pd.DataFrame(rows, columns=["arm_a", "arm_b", "choice"])


def test_online_elo_matches_the_update_rule_by_hand():
    ratings = online_elo(votes([("x", "y", "a"), ("x", "y", "b"), ("y", "z", "tie")]))
    # vote 1: equal ratings, expected 0.5 -> x +2, y -2
    x, y, z = 1002.0, 998.0, 1000.0
    # vote 2: y wins; expected score of x = 1 / (1 + 10^((998 - 1002) / 400))
    e = 1 / (1 + 10 ** ((y - x) / 400))
    x, y = x + 4 * (0 - e), y + 4 * (1 - (1 - e))
    # vote 3: y-z tie
    e = 1 / (1 + 10 ** ((z - y) / 400))
    y, z = y + 4 * (0.5 - e), z + 4 * (0.5 - (1 - e))
    assert ratings == pytest.approx({"x": x, "y": y, "z": z}, abs=1e-9)
    custom = online_elo(votes([("x", "y", "a")]), EloSettings(k=32, initial=1500))
    assert custom == pytest.approx({"x": 1516.0, "y": 1484.0})


def test_bradley_terry_closed_forms():
    # two arms, 3 wins to 1: p_x / p_y = 3 -> a gap of 400 log10 3, centred on 1000
    r = bradley_terry(votes([("x", "y", "a")] * 3 + [("x", "y", "b")]), ["x", "y"])
    assert r["x"] - r["y"] == pytest.approx(400 * math.log10(3), abs=1e-6)
    assert (r["x"] + r["y"]) / 2 == pytest.approx(1000)
    # ties count half: 2 wins, 2 ties, 0 losses = 3 : 1
    r2 = bradley_terry(votes([("x", "y", "a")] * 2 + [("x", "y", "tie")] * 2), ["x", "y"])
    assert r2["x"] - r2["y"] == pytest.approx(400 * math.log10(3), abs=1e-6)
    # a consistent three-arm case: strengths 4 : 2 : 1 with exactly expected counts on every pair
    rows = [("a", "b", "a")] * 2 + [("a", "b", "b")] * 1 + [("b", "c", "a")] * 2 + [("b", "c", "b")] * 1 \
        + [("a", "c", "a")] * 4 + [("a", "c", "b")] * 1
    r3 = bradley_terry(votes(rows), ["a", "b", "c"])
    assert r3["a"] - r3["b"] == pytest.approx(400 * math.log10(2), abs=1e-5)
    assert r3["b"] - r3["c"] == pytest.approx(400 * math.log10(2), abs=1e-5)


def test_bradley_terry_recovers_known_strengths_and_bootstrap_covers_them():
    rng = np.random.default_rng(1)
    truth = {"teacher": 1150.0, "add4": 1050.0, "add1": 950.0, "baseline": 850.0}
    arms = list(truth)
    rows = []
    for _ in range(4000):
        i, j = rng.choice(len(arms), size=2, replace=False)
        a, b = arms[i], arms[j]
        p = 1 / (1 + 10 ** ((truth[b] - truth[a]) / 400))
        rows.append((a, b, "a" if rng.random() < p else "b"))
    table = votes(rows)
    fitted = bradley_terry(table, arms)
    for arm in arms:
        assert fitted[arm] == pytest.approx(truth[arm], abs=20)
    intervals = bootstrap(table, arms, rounds=100, seed=0)
    for rank, arm in enumerate(arms, start=1):
        assert intervals[arm]["low"] <= truth[arm] <= intervals[arm]["high"]
        assert intervals[arm]["low"] < fitted[arm] < intervals[arm]["high"]
        assert intervals[arm]["rank_low"] == intervals[arm]["rank_high"] == rank  # 4000 votes separate 100 points
    order = sorted(online_elo(table), key=online_elo(table).get, reverse=True)
    assert order == arms  # online Elo agrees on the order


def test_win_rate_matrix_and_wilson_interval():
    table = votes([("x", "y", "a")] * 6 + [("y", "x", "a")] * 2 + [("x", "y", "tie")] * 2)
    matrix = win_rate_matrix(table, ["x", "y"])
    assert matrix["games"] == [[0, 10], [10, 0]]
    assert matrix["rate"][0][1] == pytest.approx(7 / 10) and matrix["rate"][1][0] == pytest.approx(3 / 10)
    # Wilson by hand for p = 0.7, n = 10
    z, n, p = 1.959964, 10, 0.7
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert (matrix["low"][0][1], matrix["high"][0][1]) == pytest.approx((centre - half, centre + half))
    assert wilson_interval(0, 0) != wilson_interval(0, 0)  # NaN: no games, no interval


def test_golden_pairs_score_raters():
    table = pd.DataFrame({
        "rater": ["r1"] * 4 + ["r2"] * 4,
        "arm_a": ["x"] * 8, "arm_b": ["y"] * 8,
        "choice": ["a", "a", "b", "a", "b", "b", "a", "a"],
        "expected": ["a", "a", None, None, "a", "a", None, None],
    })
    accuracy = rater_accuracy(table)
    assert accuracy.loc["r1", "golden_accuracy"] == 1.0 and accuracy.loc["r2", "golden_accuracy"] == 0.0
    assert accuracy.loc["r1", "golden_votes"] == 2 and accuracy.loc["r1", "votes"] == 4
    assert reliable_raters(table, min_accuracy=0.75, min_golden=2) == {"r1"}
    assert reliable_raters(table, min_accuracy=0.75, min_golden=3) == set()


def ratings_of(**arms) -> dict:
    """A ratings entry as analysis.ratings_for returns it: arm -> (rating, low, high), best first."""
    order = sorted(arms, key=lambda a: -arms[a][0])
    return {"arms": order, "votes": 600, "elo": {a: arms[a][0] for a in order},
            "bradley_terry": {a: {"rating": r, "low": lo, "high": hi} for a, (r, lo, hi) in arms.items()}}


def test_the_report_says_in_words_what_the_intervals_resolve():
    from addpipe.eval.report import distance_verdict, rating_axis, rating_verdict, speed_verdict, vote_counts

    overlapping = ratings_of(**{"teacher-4": (1002, 999, 1003), "teacher-50": (1000, 998, 1002), "add-1": (998, 997, 1002)})
    assert rating_verdict(overlapping).startswith("**Verdict: the raters prefer no arm over another.**")
    apart = ratings_of(a=(1100, 1080, 1120), b=(1000, 980, 1020), c=(990, 970, 1010))
    assert rating_verdict(apart) == ("**Verdict: a above b, c** (95% intervals apart); the other 1 of 3 pairs of arms "
                                     "overlap: not resolved.")
    # a 5-point spread is drawn on a 100-point axis (plus margins), a wide one as it is
    assert rating_axis([1000, 998], [997, 996], [1003, 1001]) == (996 - 51.5, 1003 + 51.5)  # (100 - 7) / 2 + 5
    assert rating_axis([1200, 900], [1150, 850], [1250, 950]) == (845, 1255)

    arms = {"add-1": {"latency_median_s": 0.0509, "kid": 0.0068, "intervals": {"kid": [-0.043, 0.057]}},
            "teacher-50": {"latency_median_s": 2.1081, "kid": -0.0018, "intervals": {"kid": [-0.046, 0.043]}},
            "teacher-1": {"latency_median_s": 0.02, "kid": 0.085, "intervals": {"kid": [0.062, 0.108]}}}
    assert speed_verdict(arms) == "teacher-1 is 105.4× faster than teacher-50 (0.02 s against 2.11 s per image, median)."
    assert distance_verdict(arms) == ("On KID, teacher-50 is lowest; resolved as worse (interval wholly above "
                                      "teacher-50's): teacher-1; not resolved from it: add-1.")
    del arms["teacher-1"]
    assert distance_verdict(arms).startswith("On KID, teacher-50 is lowest but no arm is resolved from it")

    analysis = {"raters": {"a": {"votes": 4040, "golden_votes": 40, "kept": True},
                           "b": {"votes": 4032, "golden_votes": 32, "kept": True},
                           "c": {"votes": 4024, "golden_votes": 24, "kept": False}},
                "questions": {"quality": {"votes": 4000}, "adherence": {"votes": 4000}, "combined": {"votes": 8000}}}
    assert vote_counts(analysis) == ("12096 votes in all: 96 on golden pairs (the screening's known answers, never "
                                     "rated), 4000 from raters the screening dropped, and 8000 rated (quality 4000, "
                                     "adherence 4000; 'combined' pools the questions).")
