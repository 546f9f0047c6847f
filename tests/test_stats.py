"""The study statistics against SciPy's tests, on constructed samples."""

import numpy as np
import pytest
from scipy import stats as scipy_stats

from experiments import stats


def test_welch_difference_matches_scipy_and_covers_the_truth():
  rng = np.random.default_rng(0)
  a, b = rng.normal(10, 1, size=5), rng.normal(9, 0.3, size=4)
  d = stats.welch_difference(a, b)
  ref = scipy_stats.ttest_ind(b, a, equal_var=False)
  assert d.mean == pytest.approx(b.mean() - a.mean())
  assert d.p == pytest.approx(ref.pvalue)
  assert d.dof == pytest.approx(ref.df)
  # The interval is where the t statistic stays inside the 97.5% quantile.
  se = np.sqrt(a.var(ddof=1) / 5 + b.var(ddof=1) / 4)
  q = scipy_stats.t.ppf(0.975, ref.df)
  assert (d.low, d.high) == pytest.approx((d.mean - q * se, d.mean + q * se))
  # Over many repetitions, about 95% of the intervals hold the true -1.
  hits = sum(
      (lambda d: d.low <= -1 <= d.high)(stats.welch_difference(
          rng.normal(10, 1, 5), rng.normal(9, 0.3, 4)))
      for _ in range(2000))
  assert 0.93 < hits / 2000 < 0.97


def test_paired_difference_matches_scipy():
  a = np.array([7.1, 6.9, 7.4, 7.0, 6.8])
  b = a - np.array([0.3, 0.1, 0.4, 0.2, 0.25])
  d = stats.paired_difference(a, b)
  ref = scipy_stats.ttest_rel(b, a)
  assert d.mean == pytest.approx(-0.25)
  assert d.p == pytest.approx(ref.pvalue)
  assert d.high < 0  # every pair improved: the interval excludes 0


def test_degenerate_and_bad_samples():
  d = stats.paired_difference([1.0, 2.0], [1.0, 2.0])
  assert (d.mean, d.low, d.high, d.p) == (0.0, 0.0, 0.0, 1.0)
  with pytest.raises(ValueError, match="at least two values"):
    stats.welch_difference([1.0], [2.0, 3.0])
  with pytest.raises(ValueError, match="as many values"):
    stats.paired_difference([1.0, 2.0], [1.0, 2.0, 3.0])
