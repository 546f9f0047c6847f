"""Statistics of a comparison over seeds: means, differences, intervals."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from scipy import stats as _scipy_stats

__all__ = ["Difference", "paired_difference", "welch_difference"]


class Difference(NamedTuple):
  """A difference of means, b - a, with its 95% confidence interval.

  Attributes:
    mean: the estimated difference.
    low, high: the 95% confidence interval.
    p: the two-sided p-value of "no difference".
    dof: degrees of freedom of the t distribution used.
  """

  mean: float
  low: float
  high: float
  p: float
  dof: float


def _sample(name, values) -> np.ndarray:
  v = np.asarray(values, np.float64)
  if v.ndim != 1 or len(v) < 2:
    raise ValueError(f"{name} needs at least two values, got {values!r}.")
  return v


def welch_difference(a, b, confidence: float = 0.95) -> Difference:
  """mean(b) - mean(a) with Welch's t interval (unequal variances).

  >>> d = welch_difference([1.0, 2.0, 3.0], [2.0, 3.0, 4.0])
  >>> round(d.mean, 3), round(d.low, 3), round(d.high, 3), round(d.dof, 1)
  (1.0, -1.267, 3.267, 4.0)
  """
  a, b = _sample("a", a), _sample("b", b)
  va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
  diff = float(b.mean() - a.mean())
  se = math.sqrt(va + vb)
  if se == 0:
    return Difference(diff, diff, diff, 0.0 if diff else 1.0, math.inf)
  dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
  t = _scipy_stats.t.ppf(0.5 + confidence / 2, dof)
  p = 2 * _scipy_stats.t.sf(abs(diff) / se, dof)
  return Difference(diff, float(diff - t * se), float(diff + t * se),
                    float(p), float(dof))


def paired_difference(a, b, confidence: float = 0.95) -> Difference:
  """mean(b - a) over pairs (e.g. two networks trained with one seed), with
  the t interval of the paired differences.

  >>> d = paired_difference([1.0, 2.0, 3.0], [1.5, 2.4, 3.6])
  >>> round(d.mean, 3), round(d.low, 3), round(d.high, 3)
  (0.5, 0.252, 0.748)
  """
  a, b = _sample("a", a), _sample("b", b)
  if a.shape != b.shape:
    raise ValueError(f"pairs need as many values, got {len(a)} and {len(b)}.")
  d = b - a
  n = len(d)
  se = d.std(ddof=1) / math.sqrt(n)
  if se == 0:
    m = float(d.mean())
    return Difference(m, m, m, 0.0 if m else 1.0, float(n - 1))
  t = _scipy_stats.t.ppf(0.5 + confidence / 2, n - 1)
  p = 2 * _scipy_stats.t.sf(abs(d.mean()) / se, n - 1)
  return Difference(float(d.mean()), float(d.mean() - t * se),
                    float(d.mean() + t * se), float(p), float(n - 1))
