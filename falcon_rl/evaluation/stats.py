"""Confidence intervals and paired tests over seeds, for comparing schedulers in a sweep."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats

from falcon_rl.evaluation.errors import EvaluationError

# The exact two-sided Wilcoxon signed-rank test cannot reach p < 0.05 with fewer pairs
# than this (its smallest p-value at n = 5 is 2 / 2**5 = 0.0625).
WILCOXON_MIN_PAIRS = 6


def mean_confidence_interval(
    values: Sequence[float] | np.ndarray, confidence: float = 0.95
) -> tuple[float, float]:
    """Compute the mean and the half-width of its Student-t confidence interval.

    :param values: one value per seed; at least one.
    :param confidence: coverage of the interval, in (0, 1).
    :return: ``(mean, half_width)``; the half-width is NaN for a single value.
    """
    sample = _as_sample(values, "values")
    _validate_confidence(confidence)
    mean = float(sample.mean())
    n = len(sample)
    if n == 1:
        return mean, math.nan
    standard_error = sample.std(ddof=1) / math.sqrt(n)
    critical_value = stats.t.ppf((1.0 + confidence) / 2.0, df=n - 1)
    return mean, float(critical_value * standard_error)


def paired_comparison(
    a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, confidence: float = 0.95
) -> dict[str, float | int | None]:
    """Compare two runs paired by seed: the mean of ``a - b`` with a t interval and tests.

    :param a: one value per seed of the first scheduler.
    :param b: the value for the same seeds, in the same order, of the second scheduler.
    :param confidence: coverage of the interval on the mean difference, in (0, 1).
    :return: ``mean_diff``, ``ci_half_width``, ``t`` and ``p_value`` (two-sided paired t-test),
        ``n``, and ``wilcoxon_p_value`` (two-sided signed-rank test), which is ``None`` with
        fewer than 6 pairs. Both tests give NaN when every difference is zero, and the
        t-test and the half-width give NaN for a single pair.
    """
    first = _as_sample(a, "a")
    second = _as_sample(b, "b")
    if first.shape != second.shape:
        raise EvaluationError(
            f"a and b must have one value per seed each, got {len(first)} and {len(second)}"
        )
    differences = first - second
    n = len(differences)
    mean_diff, half_width = mean_confidence_interval(differences, confidence)

    # Neither test is defined when every difference is zero, so both report NaN then.
    has_difference = bool(np.any(differences != 0))
    t_statistic, p_value = math.nan, math.nan
    if n > 1 and has_difference:
        result = stats.ttest_rel(first, second)
        t_statistic, p_value = float(result.statistic), float(result.pvalue)

    wilcoxon_p_value: float | None = None
    if n >= WILCOXON_MIN_PAIRS:
        wilcoxon_p_value = float(stats.wilcoxon(first, second).pvalue) if has_difference else math.nan

    return {
        "mean_diff": mean_diff,
        "ci_half_width": half_width,
        "t": t_statistic,
        "p_value": p_value,
        "n": n,
        "wilcoxon_p_value": wilcoxon_p_value,
    }


def _as_sample(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    sample = np.asarray(values, dtype=np.float64)
    if sample.ndim != 1 or len(sample) == 0:
        raise EvaluationError(
            f"{name} must be a non-empty 1-D sequence of numbers, got shape {sample.shape}"
        )
    if not np.isfinite(sample).all():
        raise EvaluationError(f"{name} contains NaN or infinite values: {sample.tolist()}")
    return sample


def _validate_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise EvaluationError(f"confidence must lie in (0, 1), got {confidence}")
