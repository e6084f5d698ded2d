"""How far a generated feature set is from a reference set, each with an interval: Fréchet distance at the stated
sample counts (bootstrap), FD extrapolated to infinitely many samples (FD∞), kernel inception distance (KID, subsets)
and k-NN precision and recall (bootstrap).

Why more than FD: FD is biased upwards by a term that shrinks like 1/N, so at a few hundred samples most of the
number is that term, and two arms scored on different counts do not compare. KID's estimator is unbiased (about 0
for two draws of one distribution, at any N); FD∞ removes the 1/N term by extrapolation; precision and recall split
the distance into fidelity (generated samples inside the reference's support) and diversity (reference samples
inside the generated support), which a single distance mixes up: a collapsed generator can score a fair FD.

Every function takes two float arrays (N, D) of features, whatever network made them (eval/metrics.py), and a seed:
the same inputs give the same numbers. An interval is the central 95% (`low`, `high`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from addpipe.eval.metrics import frechet_between, frechet_distance, statistics

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


@dataclass(frozen=True)
class Estimate:
    """A metric's value and its 95% interval; `method` says how the interval was made."""

    value: float
    low: float
    high: float
    method: str
    details: dict[str, Any] = field(default_factory=dict)


def _as_array(features: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2 or len(array) < 2:
        count = len(array) if array.ndim == 2 else "no"
        raise ValueError(f"{name} set: distances need at least 2 feature vectors (an (N, D) array), got {count} "
                         f"(shape {array.shape})")
    return array


def bootstrap(values: Sequence[float], statistic: Callable[[np.ndarray], float] = np.mean, resamples: int = 1000,
              seed: int = 0) -> Estimate:
    """A per-sample quantity's statistic (a mean, a share, a median) with the percentile bootstrap interval."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        raise ValueError("bootstrap needs at least one value")
    rng = np.random.default_rng(seed)
    draws = np.array([statistic(data[rng.integers(0, data.size, data.size)]) for _ in range(resamples)])
    low, high = np.percentile(draws, [2.5, 97.5])
    return Estimate(float(statistic(data)), float(low), float(high), f"percentile bootstrap, {resamples} resamples")


def frechet(reference: np.ndarray, generated: np.ndarray, resamples: int = 25, seed: int = 0) -> Estimate:
    """FD between the two sets as given (stated with both counts: FD depends on them), and value ± 1.96 x the
    standard deviation of FD over bootstrap resamples of the generated set, the reference held fixed as the
    yardstick every arm is measured against. Resampling both sets was measured 2x too wide (64-d Gaussians, 1,000
    per set: std 0.47 against 0.22 between independent draws; repeated samples shift both sets' finite-sample
    terms); the generated set alone gives 0.29 against 0.23 with the reference fixed. The resampled FDs sit above the
    value (repeats act like a smaller N), so their spread, not their percentiles, is used."""
    reference, generated = _as_array(reference, "reference"), _as_array(generated, "generated")
    fixed = statistics(reference)  # the yardstick's mean and covariance: once, not per resample
    value = frechet_distance(*statistics(generated), *fixed)
    rng = np.random.default_rng(seed)
    draws = [frechet_distance(*statistics(generated[rng.integers(0, len(generated), len(generated))]), *fixed)
             for _ in range(resamples)]
    spread = float(np.std(draws, ddof=1)) if resamples > 1 else 0.0
    return Estimate(value, value - Z95 * spread, value + Z95 * spread,
                    f"value ± 1.96 x bootstrap std ({resamples} resamples of the generated set, the reference fixed)",
                    {"generated": len(generated), "reference": len(reference)})


def sizes_for(largest: int, points: int = 8, smallest_share: float = 0.2) -> list[int]:
    """Sample counts for FD∞, evenly spaced in 1/N from smallest_share x largest to largest (the fit is in 1/N)."""
    smallest = max(2, int(round(largest * smallest_share)))
    if largest < 4 or smallest >= largest:
        raise ValueError(f"FD∞ needs at least 4 samples per set and a range of counts, got {largest}")
    inverse = np.linspace(1.0 / smallest, 1.0 / largest, points)
    return sorted({int(round(1.0 / x)) for x in inverse})


def frechet_infinity(reference: np.ndarray, generated: np.ndarray, points: int = 8, draws: int = 3,
                     seed: int = 0) -> Estimate:
    """FD∞ (Chong & Forsyth, "Effectively unbiased FID and Inception Score and where to find them", CVPR 2020): FD of
    N samples from each set at several N, a least-squares line FD = FD∞ + slope / N, FD∞ its intercept; interval
    from the intercept's standard error. Both sets are subsampled to the same N, so both sets' finite-sample terms
    are extrapolated away (up to the smaller set's count); `draws` subsets per N are averaged."""
    reference, generated = _as_array(reference, "reference"), _as_array(generated, "generated")
    rng = np.random.default_rng(seed)
    counts = sizes_for(min(len(reference), len(generated)), points)
    values = []
    for count in counts:
        values.append(float(np.mean([frechet_between(generated[rng.choice(len(generated), count, replace=False)],
                                                     reference[rng.choice(len(reference), count, replace=False)])
                                     for _ in range(draws)])))
    x = 1.0 / np.asarray(counts, dtype=np.float64)
    y = np.asarray(values)
    design = np.stack([np.ones_like(x), x], axis=1)
    (intercept, slope), *_ = np.linalg.lstsq(design, y, rcond=None)
    residual = y - design @ np.array([intercept, slope])
    dof = max(1, len(x) - 2)
    covariance = (residual @ residual / dof) * np.linalg.inv(design.T @ design)
    error = float(np.sqrt(max(covariance[0, 0], 0.0)))
    return Estimate(float(intercept), float(intercept - Z95 * error), float(intercept + Z95 * error),
                    "intercept ± 1.96 x its standard error (least squares in 1/N)",
                    {"sizes": counts, "fd": values, "slope": float(slope)})


def kernel_scale(reference: np.ndarray, network: str) -> Optional[float]:
    """KID's kernel takes x·y·gamma: the published KID uses gamma = 1/D on Inception's pool features (None here:
    torchmetrics' default). The cubic kernel is not scale-free, and other feature spaces have other scales (the demo's
    classifier: x·y/D near 40, so the kernel's values are about 10^5 and KID is noise); there gamma is one over the
    reference's mean squared norm, which puts x·y·gamma near cos(x, y)."""
    if network == "inception":
        return None
    return float(1.0 / np.mean(np.sum(np.asarray(reference, dtype=np.float64) ** 2, axis=1)))


def kid(reference: np.ndarray, generated: np.ndarray, subsets: int = 100, subset_size: Optional[int] = None,
        seed: int = 0, gamma: Optional[float] = None) -> Estimate:
    """KID (Bińkowski et al., 2018): the unbiased estimator of squared MMD with the cubic polynomial kernel
    k(x, y) = (gamma x·y + 1)^3 (gamma = 1/D unless given: kernel_scale), averaged over `subsets` random subsets of `subset_size` samples from each set
    (torchmetrics' KernelInceptionDistance on these features). The default subset size is half the smaller set
    (at most 1000): the spread of half-size subsets estimates the full set's sampling spread (half-sampling, the
    delete-N/2 jackknife), so the interval is mean ± 1.96 x std. That holds where KID's variance falls like 1/N (an
    arm unlike the reference); near KID = 0 it falls like 1/N^2 and the half-size spread overstates the full set's by
    up to sqrt(3): conservative. Above 2000 samples per set the subsets stay at 1000 and the interval is that of a
    1000-sample estimate: wider than the full set's, never narrower."""
    from torchmetrics.image.kid import KernelInceptionDistance

    reference, generated = _as_array(reference, "reference"), _as_array(generated, "generated")
    size = subset_size or min(1000, min(len(reference), len(generated)) // 2)
    if size < 2 or size > min(len(reference), len(generated)):
        raise ValueError(f"KID subset size {size} must be between 2 and the smaller set's count "
                         f"({min(len(reference), len(generated))})")
    with warnings.catch_warnings():  # it warns that it keeps every feature in memory: these are already in memory
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(feature=torch.nn.Identity(), subsets=subsets, subset_size=size,
                                         gamma=None if gamma is None else float(gamma))
    metric.update(torch.from_numpy(reference), real=True)
    metric.update(torch.from_numpy(generated), real=False)
    with torch.random.fork_rng(devices=[]):  # its subsets come from torch's global generator: seed it, then restore
        torch.manual_seed(seed)
        mean, std = (float(t) for t in metric.compute())
    return Estimate(mean, mean - Z95 * std, mean + Z95 * std,
                    f"mean ± 1.96 x std over {subsets} subsets of {size} per set",
                    {"subsets": subsets, "subset_size": size, "std": std,
                     "gamma": gamma if gamma is not None else 1.0 / reference.shape[1]})


def paired_kid_margin(reference: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float = 1.0, subsets: int = 100,
                      subset_size: Optional[int] = None, seed: int = 0, gamma: Optional[float] = None) -> Estimate:
    """KID(a) - scale x KID(b) for two arms whose rows are paired (row i of each: the same prompt from the same
    noise), both measured on the same reference subset and the same prompts in every subset. What the arms share (the
    reference draw, the prompts, the noise) then cancels in the difference, which the two KIDs' separate intervals
    cannot see: "a beats b" holds when the interval's upper end is below 0 (scale 1), "KID(a) <= c KID(b)" when it
    is at or below 0 (scale c). Subsets of half the pairs (at most 1000), interval mean ± 1.96 x std as for kid()."""
    from torchmetrics.image.kid import maximum_mean_discrepancy, poly_kernel  # what kid() computes, per subset

    reference, a, b = _as_array(reference, "reference"), _as_array(a, "a"), _as_array(b, "b")
    if len(a) != len(b):
        raise ValueError(f"paired arms need one row per pair, got {len(a)} and {len(b)} rows")
    size = subset_size or min(1000, min(len(reference), len(a)) // 2)
    if size < 2 or size > min(len(reference), len(a)):
        raise ValueError(f"KID subset size {size} must be between 2 and the smaller set's count ({min(len(reference), len(a))})")
    gamma = 1.0 / reference.shape[1] if gamma is None else float(gamma)
    generator = torch.Generator().manual_seed(seed)
    ref, xa, xb = torch.from_numpy(reference), torch.from_numpy(a), torch.from_numpy(b)
    margins = []
    for _ in range(subsets):
        r = ref[torch.randperm(len(ref), generator=generator)[:size]]
        pick = torch.randperm(len(xa), generator=generator)[:size]
        k_rr = poly_kernel(r, r, gamma=gamma)  # shared by both arms
        kids = [float(maximum_mean_discrepancy(k_rr, poly_kernel(r, x[pick], gamma=gamma), poly_kernel(x[pick], x[pick], gamma=gamma)))
                for x in (xa, xb)]
        margins.append(kids[0] - scale * kids[1])
    mean, std = float(np.mean(margins)), float(np.std(margins))
    return Estimate(mean, mean - Z95 * std, mean + Z95 * std,
                    f"paired: mean ± 1.96 x std over {subsets} subsets of {size} pairs and {size} reference samples",
                    {"subsets": subsets, "subset_size": size, "scale": scale, "gamma": gamma})


def _kth_neighbour_radii(points: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """Distance from each point to its k-th nearest other point of the same set."""
    radii = []
    for start in range(0, len(points), chunk):
        distances = torch.cdist(points[start:start + chunk], points)
        radii.append(distances.kthvalue(k + 1, dim=1).values)  # the +1 skips the point itself (distance 0)
    return torch.cat(radii)


def _inside(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int = 1024) -> np.ndarray:
    """For each query, whether it lies within some centre's radius (inside the set's k-NN manifold)."""
    found = []
    for start in range(0, len(queries), chunk):
        distances = torch.cdist(queries[start:start + chunk], centres)
        found.append((distances <= radii.unsqueeze(0)).any(dim=1))
    return torch.cat(found).numpy()


def precision_recall(reference: np.ndarray, generated: np.ndarray, k: int = 3, seed: int = 0) -> tuple[Estimate, Estimate]:
    """Improved precision and recall (Kynkäänniemi et al., NeurIPS 2019): each set's manifold is the union of balls
    around its samples reaching their k-th nearest neighbour; precision = share of generated samples inside the
    reference manifold (fidelity), recall = share of reference samples inside the generated one (diversity). The
    larger set is subsampled to the smaller one's count (the radii depend on N). Intervals: Wilson score intervals
    over the samples tested against a manifold (a bootstrap collapses to a point at a share of 1); the manifold's
    own sampling variability is not in them."""
    from addpipe.eval.ratings import wilson_interval

    reference, generated = _as_array(reference, "reference"), _as_array(generated, "generated")
    count = min(len(reference), len(generated))
    if count <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set, got {count}")
    rng = np.random.default_rng(seed)
    real = torch.from_numpy(reference[np.sort(rng.choice(len(reference), count, replace=False))])
    fake = torch.from_numpy(generated[np.sort(rng.choice(len(generated), count, replace=False))])
    shares = []
    for inside in (_inside(fake, real, _kth_neighbour_radii(real, k)), _inside(real, fake, _kth_neighbour_radii(fake, k))):
        hits = int(inside.sum())
        low, high = wilson_interval(hits, count)
        shares.append(Estimate(hits / count, low, high, "Wilson score interval", {"k": k, "samples": count}))
    return shares[0], shares[1]


def compare(reference: np.ndarray, generated: np.ndarray, seed: int = 0, fd_resamples: int = 25,
            kid_subsets: int = 100, k: int = 3, kid_gamma: Optional[float] = None) -> dict[str, Estimate]:
    """Every distance of this module between the two sets, under the names metrics.json gives them:
    {"frechet_distance", "fd_infinity", "kid", "precision", "recall"}."""
    found = {"frechet_distance": frechet(reference, generated, fd_resamples, seed),
             "kid": kid(reference, generated, kid_subsets, seed=seed, gamma=kid_gamma)}
    found["fd_infinity"] = frechet_infinity(reference, generated, seed=seed)
    found["precision"], found["recall"] = precision_recall(reference, generated, k, seed=seed)
    return found
