"""An arm against cross-entropy over seeds: the per-seed final accuracies paired by seed (each seed is one
pre-training, one data order and one initialisation that both arms share), their mean difference with a 95 %
t interval, a two-sided paired t-test and the number of seeds the arm wins."""
from __future__ import annotations

import math
import statistics


def paired_comparison(arm: dict[str, float], reference: dict[str, float]) -> dict | None:
    """``arm`` against ``reference``, each {seed: accuracy}, over the seeds both have: {"mean_difference",
    "ci95": [low, high], "p_value", "wins", "seeds"} (interval and p-value None with one seed, and where every
    seed's difference is the same, marked ``no_spread``); None when they share no seed."""
    seeds = sorted(set(arm) & set(reference), key=str)
    if not seeds:
        return None
    differences = [arm[seed] - reference[seed] for seed in seeds]
    count, mean = len(differences), statistics.fmean(differences)
    result = {"mean_difference": mean, "ci95": None, "p_value": None,
              "wins": sum(d > 0 for d in differences), "seeds": count}
    if count < 2:
        return result
    from scipy import stats  # a dependency of JAX's; imported only here, so the report stays light otherwise
    error = statistics.stdev(differences) / math.sqrt(count)
    if error == 0:  # every seed moved by the same amount: nothing to test against, not a sure difference
        result["no_spread"] = True
        return result
    quantile = float(stats.t.ppf(0.975, count - 1))
    result.update(ci95=[mean - quantile * error, mean + quantile * error],
                  p_value=float(2 * stats.t.sf(abs(mean) / error, count - 1)))
    return result


def equivalence_p_value(differences: list[float], margin: float) -> float | None:
    """Two one-sided paired t-tests (TOST) that the mean difference lies within ±``margin``: the larger of
    the two p-values (small = equivalent within the margin); None with fewer than two seeds or no spread."""
    count = len(differences)
    if count < 2:
        return None
    error = statistics.stdev(differences) / math.sqrt(count)
    if error == 0:
        return None
    from scipy import stats
    mean = statistics.fmean(differences)
    above_lower = float(stats.t.sf((mean + margin) / error, count - 1))  # H0: mean <= -margin
    below_upper = float(stats.t.cdf((mean - margin) / error, count - 1))  # H0: mean >= +margin
    return max(above_lower, below_upper)


def holm(p_values: list[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of a family of p-values (None entries are left out and stay None)."""
    present = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(present):
        running = max(running, min(1.0, (len(present) - rank) * p))
        adjusted[i] = running
    return adjusted


ALPHA = 0.05


def verdict(comparison: dict, adjusted_p: float | None, adjusted_equivalence_p: float | None) -> str:
    """One word for a comparison: "better" or "worse" where the (adjusted) paired t-test rejects no
    difference, "equivalent" where the (adjusted) TOST rejects a difference beyond the margin, else
    "inconclusive"."""
    if adjusted_p is not None and adjusted_p < ALPHA:
        return "better" if comparison["mean_difference"] > 0 else "worse"
    if adjusted_equivalence_p is not None and adjusted_equivalence_p < ALPHA:
        return "equivalent"
    return "inconclusive"
