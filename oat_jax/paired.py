"""An arm against cross-entropy over seeds: the per-seed final accuracies paired by seed (each seed is one
pre-training, one data order and one initialisation that both arms share), their mean difference with a 95 %
t interval, a two-sided paired t-test and the number of seeds the arm wins."""
from __future__ import annotations

import math
import statistics


def paired_comparison(arm: dict[str, float], reference: dict[str, float]) -> dict | None:
    """``arm`` against ``reference``, each {seed: accuracy}, over the seeds both have: {"mean_difference",
    "ci95": [low, high], "p_value", "wins", "seeds"} (interval and p-value None with one seed); None when
    they share no seed."""
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
    if error == 0:  # every seed moved by the same amount: no spread to test against
        result.update(ci95=[mean, mean], p_value=1.0 if mean == 0 else 0.0)
        return result
    quantile = float(stats.t.ppf(0.975, count - 1))
    result.update(ci95=[mean - quantile * error, mean + quantile * error],
                  p_value=float(2 * stats.t.sf(abs(mean) / error, count - 1)))
    return result
