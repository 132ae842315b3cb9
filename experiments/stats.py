"""Statistics over data draws × seeds: intervals that include the data draw, and paired comparisons.

Every error array is ``[draws, seeds]``: ``draws`` independent data draws (teacher or base, conditions, inputs),
``seeds`` adapter initialisations and batch orders within each draw. Seeds within a draw are not independent
samples of the data-draw variance, so every interval treats the draw as the unit: the runs of a draw are
averaged first and the t-interval runs over the ``draws`` draw means (``draws - 1`` degrees of freedom).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import scipy.stats


class Interval(NamedTuple):
    """A point estimate with a 95% interval ``[low, high]``."""

    estimate: float
    low: float
    high: float


def _t_half(values: np.ndarray) -> float:
    if values.shape[0] < 2:
        return float("nan")
    return float(scipy.stats.t.ppf(0.975, values.shape[0] - 1) * values.std(ddof=1) / math.sqrt(values.shape[0]))


def draw_interval(errors: np.ndarray) -> tuple[float, float]:
    """Mean of ``errors [draws, seeds]`` and the half-width of the 95% t-interval over the draws' seed means."""
    draw_means = np.asarray(errors, np.float64).mean(axis=1)
    return float(draw_means.mean()), _t_half(draw_means)


def log_interval(errors: np.ndarray) -> Interval:
    """Geometric mean of ``errors [draws, seeds]`` with a 95% t-interval over the draws (in log space)."""
    draw_logs = np.log(np.asarray(errors, np.float64)).mean(axis=1)
    mean, half = float(draw_logs.mean()), _t_half(draw_logs)
    return Interval(math.exp(mean), math.exp(mean - half), math.exp(mean + half))


def _paired(errors: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``errors / reference`` as float64 ``[draws, seeds]``; arrays of other shapes are refused, never broadcast
    (one draw against three would pair every draw with the first)."""
    errors, reference = np.asarray(errors, np.float64), np.asarray(reference, np.float64)
    if errors.shape != reference.shape:
        raise ValueError(f"paired errors must have the same [draws, seeds] shape; got {errors.shape} and "
                         f"{reference.shape}.")  # fmt: skip
    return errors / reference


CONVERGED = 0.10  # the convergence criterion of the budget doublings: every draw's error within 10 %


def per_draw_ratio(errors: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``[draws]``: each draw's geometric mean over seeds of ``errors / reference`` (the draw's point of
    :func:`paired_ratio`)."""
    return np.exp(np.log(_paired(errors, reference)).mean(axis=1))


def paired_ratio(errors: np.ndarray, reference: np.ndarray) -> Interval:
    """``errors / reference`` on the same draws and seeds: geometric mean ratio and its draw-level 95% interval.

    Both arrays are ``[draws, seeds]`` from the same data draws; the log ratio is averaged over seeds per draw
    and the t-interval runs over draws. A ratio above 1 with ``low > 1`` means ``errors`` is worse on every
    plausible draw distribution, not only on these draws."""
    return log_interval(_paired(errors, reference))


def median(errors: np.ndarray) -> float:
    """Median over all draws and seeds."""
    return float(np.median(np.asarray(errors, np.float64)))


def paired_pvalue(errors: np.ndarray, reference: np.ndarray) -> float:
    """Two-sided p-value of "the geometric-mean ratio ``errors / reference`` is 1", at draw level.

    The one-sample t-test of the draws' mean log ratios against 0 (``draws - 1`` degrees of freedom): the test
    whose 95% acceptance region is exactly the interval of :func:`paired_ratio`, so ``p < 0.05`` iff that interval
    excludes 1. ``nan`` with fewer than 2 draws."""
    draw_logs = np.log(_paired(errors, reference)).mean(axis=1)
    if draw_logs.shape[0] < 2:
        return float("nan")
    std = draw_logs.std(ddof=1)
    if std == 0:
        return 0.0 if draw_logs.mean() != 0 else 1.0
    t = draw_logs.mean() / (std / math.sqrt(draw_logs.shape[0]))
    return float(2.0 * scipy.stats.t.sf(abs(t), draw_logs.shape[0] - 1))


def equivalence_pvalue(errors: np.ndarray, reference: np.ndarray, margin: float = 0.10) -> float:
    """p-value of "the geometric-mean ratio ``errors / reference`` lies outside ``[1/(1+margin), 1+margin]``", at
    draw level: the larger of the two one-sided t-tests (TOST) on the draws' mean log ratios (``draws - 1``
    degrees of freedom). ``p < 0.05`` iff the 90% interval of the ratio lies inside the margins: the two methods
    are shown equivalent within ``margin``, a stronger statement than an interval that merely contains 1.

    >>> rng = np.random.default_rng(0)
    >>> a = rng.uniform(1.0, 2.0, (6, 3))
    >>> equivalence_pvalue(a * 1.01, a) < 0.05, equivalence_pvalue(a * 1.5, a) < 0.05
    (True, False)
    """
    draw_logs = np.log(_paired(errors, reference)).mean(axis=1)
    n, bound = draw_logs.shape[0], math.log1p(margin)
    if n < 2:
        return float("nan")
    se = draw_logs.std(ddof=1) / math.sqrt(n)
    if se == 0:
        return 0.0 if abs(draw_logs.mean()) < bound else 1.0
    lower = scipy.stats.t.sf((draw_logs.mean() + bound) / se, n - 1)  # H0: log ratio <= -bound
    upper = scipy.stats.t.cdf((draw_logs.mean() - bound) / se, n - 1)  # H0: log ratio >= +bound
    return float(max(lower, upper))


def holm(pvalues: list[float] | np.ndarray) -> np.ndarray:
    """Holm–Bonferroni adjusted p-values of a family of ``m`` comparisons (step-down, family-wise error rate).

    .. math::

        \\tilde p_{(i)} = \\max_{j \\le i} \\min\\bigl(1, (m - j + 1)\\, p_{(j)}\\bigr)

    with ``p_(1) <= ... <= p_(m)`` the sorted p-values; rejecting ``p̃ < α`` controls the probability of any false
    rejection at ``α``. ``nan`` p-values are never rejected (adjusted to ``nan``) and do not count in ``m``.

    >>> holm([0.01, 0.04, 0.03, 0.005]).round(3).tolist()
    [0.03, 0.06, 0.06, 0.02]
    """
    p = np.asarray(pvalues, np.float64)
    out = np.full(p.shape, np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    m = finite.size
    order = finite[np.argsort(p[finite], kind="stable")]
    running = 0.0
    for i, idx in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[idx]))
        out[idx] = running
    return out
